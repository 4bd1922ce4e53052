"""Training the k folds together: the same models as one fold after another, pruning, faults, fallback."""

import copy
import math
import subprocess
import sys

import optuna
import pytest
import torch
from torch import nn

from conftest import write_digits_run
import nas.train
from nas.build import build
from nas.config import DatasetConfig
from nas.data import Dataset, load_dataset, stratified_folds
from nas.errors import TrialError
from nas.evaluate import cross_validate, fold_seed
from nas.folds_together import train_together
from nas.norms import NORMS, NormType
from nas.space import default_spec
from nas.train import fit

CPU = torch.device("cpu")
HP = {"lr": 0.05, "weight_decay": 1e-3, "l1": 1e-4, "label_smoothing": 0.1, "batch_size": 32}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetConfig())


def small(data: Dataset, n: int = 240) -> tuple[Dataset, list]:
    """The first n digits, 3 folds of 160 training samples each (5 steps of 32 an epoch)."""
    subset = copy.copy(data)
    subset.x_train, subset.y_train = data.x_train[:n], data.y_train[:n]
    return subset, stratified_folds(subset.y_train, 3, 0)


def spec_for(norm: dict, block: dict | None = None, optimizer: str = "sgd") -> dict:
    return default_spec({"stages": 2, "width": 8, "block": {"norm": norm, **(block or {})}, "training": {**HP, "optimizer": optimizer}})


def models_for(spec: dict, data: Dataset, seeds: list[int]) -> list[nn.Module]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(build(spec, data.input_shape, data.num_classes))
    return out


def assert_same_state(spec: dict, data: Dataset, folds: list, epochs: int = 1, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every fold's parameters and buffers after `epochs` are the same trained together as alone."""
    seeds = [fold_seed(0, 7, k) for k in range(len(folds))]
    alone = models_for(spec, data, seeds)
    for model, (train_idx, _), seed in zip(alone, folds, seeds):
        fit(model, data, train_idx, None, spec["training"], epochs, CPU, seed)
    together = models_for(spec, data, seeds)
    train_together(together, data, folds, spec["training"], epochs, CPU, seeds)
    for f, (a, b) in enumerate(zip(alone, together)):
        expected, actual = a.state_dict(), b.state_dict()
        assert expected.keys() == actual.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"fold {f + 1} {name}: {m}")
        assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), models_for(spec, data, seeds)[f].state_dict().values()))


POSITIONS = ["pre_conv", "post_conv", "post_act"]
NORM_TYPES = ["batch", "batch_renorm", "group", "layer", "instance"]


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_together_trains_every_norm_and_position_to_the_same_parameters_and_running_stats(digits, norm_type, position):
    data, folds = small(digits)
    norm = {"type": norm_type, "position": position, "momentum": 0.2, "groups": 4, "warmup": 3}
    # AdamW only where no gradient is zero in exact arithmetic: a conv bias that instance norm
    # cancels gets rounding noise for a gradient, which Adam turns into full steps of either sign.
    adamw = position == "post_act" and norm_type != "instance"
    assert_same_state(spec_for(norm, optimizer="adamw" if adamw else "sgd"), data, folds)


@pytest.mark.parametrize("norm_type", ["batch", "group"])
def test_together_trains_channels_last_models_as_on_cuda(digits, monkeypatch, norm_type):
    """The CUDA layout, run on the CPU: channels_last weights (L1 on, as in HP) and inputs.

    Grouped and plain convs then take different kernels, so the tolerance is looser than above.
    """
    monkeypatch.setattr(nas.train, "uses_channels_last", lambda device: True)
    data, folds = small(digits)
    assert_same_state(spec_for({"type": norm_type, "position": "post_conv", "groups": 4}), data, folds, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_together_matches_sequential_without_norm_for_both_optimizers(digits, optimizer):
    data, folds = small(digits)
    assert_same_state(spec_for({"type": "none"}, optimizer=optimizer), data, folds)


@pytest.mark.parametrize("order,norm_type", [("post", "batch"), ("preact", "batch_renorm"), ("post", "group"), ("preact", "none")])
def test_together_matches_sequential_for_residual_blocks(digits, order, norm_type):
    data, folds = small(digits)
    block = {"type": "residual", "residual": {"order": order, "zero_init": True}}
    assert_same_state(spec_for({"type": norm_type, "position": "post_conv"}, block, "adamw" if order == "preact" else "sgd"), data, folds)


def test_together_matches_sequential_with_crop_flip_augmentation_and_frozen_batch_norm_affine(digits):
    data, folds = small(digits)
    data.augment = "crop_flip"
    assert_same_state(spec_for({"type": "batch", "affine": False, "track_running_stats": False}), data, folds)


def test_together_matches_sequential_on_one_dimensional_signals():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(240, 32, generator=gen), torch.arange(240) % 3
    data = Dataset("signals", x, y, x[:10], y[:10], ["a", "b", "c"])
    assert_same_state(spec_for({"type": "batch"}), data, stratified_folds(y, 3, 0))


def test_dropout_draws_its_own_masks_when_folds_train_together(digits):
    data, folds = small(digits)
    seeds = [0, 0, 0]  # identical folds but for dropout: only its masks can tell them apart
    same = [(folds[0][0], folds[0][1])] * 3

    def trained(dropout: float) -> list[nn.Module]:
        spec = spec_for({"type": "batch"}, {"dropout": dropout})
        models = models_for(spec, data, seeds)
        train_together(models, data, same, spec["training"], 1, CPU, seeds)
        return models

    without = trained(0.0)
    assert all(torch.equal(without[0].head.weight, m.head.weight) for m in without[1:])
    with_dropout = trained(0.5)
    assert not torch.equal(with_dropout[0].head.weight, with_dropout[1].head.weight)
    assert all(torch.isfinite(m.head.weight).all() for m in with_dropout)


def test_score_has_the_same_keys_and_fold_losses_in_both_modes(digits):
    data, folds = small(digits)
    spec = spec_for({"type": "batch"})
    together = cross_validate(spec, data, folds, 2, CPU, recalibrate_bn=True, fold_mode="together")
    sequential = cross_validate(spec, data, folds, 2, CPU, recalibrate_bn=True, fold_mode="sequential")
    assert together.keys() == sequential.keys()
    assert (together["fold_mode"], sequential["fold_mode"]) == ("together", "sequential")
    for key in ("fold_losses", "fold_accuracies", "eval_mode_loss", "train_mode_loss", "recalibrated_loss"):
        assert together[key] == pytest.approx(sequential[key], rel=1e-4), key


def test_epoch_reports_are_the_mean_over_folds(digits):
    data, folds = small(digits)
    reports = []
    score = cross_validate(spec_for({"type": "batch"}), data, folds, 2, CPU, on_epoch=lambda *a: reports.append(a), fold_mode="together")
    assert [(fold, epoch) for fold, epoch, _, _ in reports] == [(None, 0), (None, 1)]
    assert reports[-1][2] == pytest.approx(score["cv_loss"]) and reports[-1][3] == pytest.approx(score["cv_accuracy"])


def test_nan_in_one_fold_fails_the_trial_naming_that_fold(digits):
    data, _ = small(digits)
    folds = stratified_folds(data.y_train, 2, 0)
    data.x_train = data.x_train.clone()
    data.x_train[folds[1][1][0]] = float("nan")  # in fold 2's validation split: fold 1 trains on it
    with pytest.raises(TrialError, match=r"^fold 1: training loss is nan at epoch \d"):
        cross_validate(spec_for({"type": "batch"}), data, folds, 2, CPU, fold_mode="together")


def test_a_layer_with_no_stacked_form_falls_back_to_sequential_and_says_why(digits, monkeypatch):
    # Local response norm mixes neighbouring channels: stacked, it would mix the folds.
    monkeypatch.setitem(NORMS, "lrn", NormType(lambda num_features, dims: nn.LocalResponseNorm(2)))
    data, folds = small(digits)
    spec = spec_for({"type": "batch"})
    for stage in spec["stages"]:
        stage["blocks"][0]["norm"] = {"type": "lrn", "position": "post_act"}
    score = cross_validate(spec, data, folds, 1, CPU, fold_mode="together")
    assert score["fold_mode"] == "sequential" and "LocalResponseNorm" in score["fold_mode_fallback"]
    assert all(math.isfinite(loss) for loss in score["fold_losses"])


def test_out_of_memory_with_the_folds_together_falls_back_to_sequential(digits, monkeypatch):
    import nas.folds_together

    def out_of_memory(device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(nas.folds_together, "autocast", out_of_memory)
    data, folds = small(digits)
    score = cross_validate(spec_for({"type": "batch"}), data, folds, 1, CPU, fold_mode="together")
    assert score["fold_mode"] == "sequential" and score["fold_mode_fallback"].startswith("CUDA out of memory with 3 folds together")


SPACE = {"stages": 1, "width": 8, "block": {"norm": {"type": {"choice": ["batch", "batch_renorm", "group"]}}}}


def run_search(tmp_path, mode: str, pruner: str = "none") -> list[optuna.trial.FrozenTrial]:
    folder = tmp_path / mode
    folder.mkdir()
    storage = f"sqlite:///{folder}/nas.db"
    config = write_digits_run(folder, SPACE, storage, {"name": "s", "sampler": "random", "trials": 1},
                              {"folds": 2, "epochs": 2, "fold_mode": mode, "pruner": pruner})
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "--config", str(config), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return optuna.load_study(study_name="s", storage=storage).get_trials()


def test_a_search_with_folds_together_stores_the_same_trial_attributes_as_sequential(tmp_path):
    together, sequential = run_search(tmp_path, "together", pruner="median"), run_search(tmp_path, "sequential")
    assert [set(t.user_attrs) for t in together] == [set(t.user_attrs) for t in sequential]
    assert [t.user_attrs["fold_mode"] for t in together + sequential] == ["together", "sequential"]
    for t in together:  # the median pruner saw one report an epoch: the mean over the folds
        assert sorted(t.intermediate_values) == [0, 1]
        assert t.intermediate_values[1] == pytest.approx(sum(t.user_attrs["fold_losses"]) / 2)
