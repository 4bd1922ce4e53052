"""The trainer: the L1 penalty on conv weights is applied and shrinks them."""

import torch
from torch import nn

from nas.data.datasets import load_dataset, stratified_folds
from nas.models.build import build
from nas.search.config import DatasetConfig
from nas.search.space import default_spec
from nas.training.train import EVAL_BATCH, batch_dependent, evaluate, fit, scoring_batch_size


def conv_l1_after_training(l1: float) -> float:
    data = load_dataset(DatasetConfig())
    train_idx, val_idx = stratified_folds(data.y_train, 3, 0)[0]
    spec = default_spec({"stages": 1, "width": 8, "training": {"l1": l1, "weight_decay": 0.0, "lr": 0.05}})
    torch.manual_seed(0)
    model = build(spec, data.input_shape, data.num_classes)
    fit(model, data, train_idx, val_idx, spec["training"], 2, torch.device("cpu"), seed=0)
    return sum(m.weight.abs().sum().item() for m in model.modules() if isinstance(m, nn.Conv2d))


def test_l1_penalty_shrinks_conv_weights():
    assert conv_l1_after_training(1e-2) < 0.85 * conv_l1_after_training(0.0)


def test_a_batch_dependent_model_is_scored_in_batches_of_its_training_size():
    """BatchNorm without running statistics normalizes with each evaluated batch: scoring it on up to
    1,024 samples at once would be transductive, so it is scored as it was trained."""
    data = load_dataset(DatasetConfig())
    train_idx, val_idx = stratified_folds(data.y_train, 3, 0)[0]
    spec = default_spec(
        {
            "stages": 2,
            "width": 8,
            "block": {"norm": {"type": "batch", "track_running_stats": False}},
            "training": {"batch_size": 16},
        }
    )
    torch.manual_seed(0)
    model = build(spec, data.input_shape, data.num_classes)
    assert batch_dependent(model) and scoring_batch_size(model, spec["training"]) == 16
    result = fit(model, data, train_idx, val_idx, spec["training"], 1, torch.device("cpu"), seed=0)
    x_val, y_val = data.x_train[val_idx], data.y_train[val_idx]
    assert result.val_loss == evaluate(model, x_val, y_val, torch.device("cpu"), batch_size=16)[0]
    assert (
        result.val_loss != evaluate(model, x_val, y_val, torch.device("cpu"))[0]
    )  # the whole split as one batch: another number


def test_a_model_with_running_statistics_is_not_batch_dependent():
    spec = default_spec({"stages": 2, "width": 8, "block": {"norm": {"type": "batch"}}})
    model = build(spec, (1, 8, 8), 10)
    assert not batch_dependent(model) and scoring_batch_size(model, spec["training"]) == EVAL_BATCH


def test_max_steps_caps_the_optimizer_steps_and_the_schedule_spans_them(monkeypatch):
    data = load_dataset(DatasetConfig())
    train_idx = stratified_folds(data.y_train, 3, 0)[0][0]  # 958 samples: 14 steps of 64 an epoch
    spec = default_spec({"stages": 1, "width": 8})
    torch.manual_seed(0)
    model = build(spec, data.input_shape, data.num_classes)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(module.training))
    lrs = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    fit(model, data, train_idx, None, spec["training"], 3, torch.device("cpu"), seed=0, max_steps=20)
    assert len(lrs) == 20 == sum(forwards)  # 14 + 6, not 3 x 14
    assert lrs[0] == spec["training"]["lr"] and lrs[-1] < 0.01 * lrs[0]  # the cosine reaches ~0 at the 20th step


def norm_scales_after_training(bn_sparsity: float) -> torch.Tensor:
    data = load_dataset(DatasetConfig())
    train_idx, val_idx = stratified_folds(data.y_train, 3, 0)[0]
    hp = {"bn_sparsity": bn_sparsity, "weight_decay": 0.0, "lr": 0.05}
    spec = default_spec({"stages": 2, "width": 16, "training": hp})
    torch.manual_seed(0)
    model = build(spec, data.input_shape, data.num_classes)
    fit(model, data, train_idx, val_idx, spec["training"], 3, torch.device("cpu"), seed=0)
    return torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])


def test_bn_sparsity_pushes_norm_scales_toward_zero():
    plain, sparse = norm_scales_after_training(0.0), norm_scales_after_training(0.1)
    assert sparse.sum() < 0.5 * plain.sum() and sparse.median() < 0.5 * plain.median()


def test_a_trials_score_summarizes_its_fold_models_norm_scales_and_none_without_norms():
    from nas.training import cross_validate

    data = load_dataset(DatasetConfig())
    folds = stratified_folds(data.y_train, 2, 0)
    for hp, norm in (({"bn_sparsity": 0.3}, "batch"), ({}, "batch"), ({}, "none")):
        spec = default_spec({"stages": 2, "width": 8, "block": {"norm": {"type": norm}}, "training": hp})
        score = cross_validate(spec, data, folds, 2, torch.device("cpu"))
        if norm == "none":
            assert "norm_scales" not in score
            continue
        summary = score["norm_scales"]
        assert summary["count"] == 2 * (8 + 16)  # two folds of two BatchNorms
        assert summary["p10"] <= summary["p50"] <= summary["p90"] and 0.0 <= summary["below_0.01"] <= 1.0
        if hp:
            assert summary["p50"] < 0.5
        else:
            assert summary["p50"] > 0.8 and summary["below_0.01"] == 0.0
