"""Training the k folds together: the same models as one fold after another, pruning, faults, fallback."""

import copy
import dataclasses
import math
import subprocess
import sys

import optuna
import pytest
import torch
from conftest import write_digits_run
from torch import nn

import nas.training.train
from nas.data.datasets import Dataset, load_dataset, stratified_folds
from nas.errors import TrialError
from nas.models.build import build
from nas.models.norms import NORMS, NormType
from nas.search.config import DatasetConfig
from nas.search.space import default_spec, validate_space
from nas.training.cross_validation import cross_validate, fold_seed
from nas.training.folds_together import train_together
from nas.training.train import batches, cosine_schedule, fit, optimizer_for

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


def spec_for(norm: dict, block: dict | None = None, optimizer: str = "sgd", hp: dict | None = None) -> dict:
    """A candidate of a space that the space's own validation accepts (a typo fails here, not silently)."""
    space = {
        "stages": 2,
        "width": 8,
        "block": {"norm": norm, **(block or {})},
        "training": {**HP, "optimizer": optimizer, **(hp or {})},
    }
    return default_spec(validate_space(space, "test space"))


def models_for(spec: dict, data: Dataset, seeds: list[int]) -> list[nn.Module]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(build(spec, data.input_shape, data.num_classes))
    return out


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Kernels and their summation order change with the thread count: the tolerances must hold for both."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def trained_alone(
    spec: dict, data: Dataset, folds: list, seeds: list[int], epochs: int, dtype: torch.dtype
) -> list[nn.Module]:
    """One fold after another with `nas.training.train.fit`, in `dtype` (float64: the reference the float32 runs
    are measured against)."""
    models = [m.to(dtype) for m in models_for(spec, data, seeds)]
    as_dtype = dataclasses.replace(data, x_train=data.x_train.to(dtype), x_test=data.x_test.to(dtype))
    for model, (train_idx, _), seed in zip(models, folds, seeds):
        fit(model, as_dtype, train_idx, None, spec["training"], epochs, CPU, seed=seed)
    return models


SLACK = 8.0  # times the float32 one-by-one run's own distance from the float64 run
UPDATE_SHARE = 1024 * torch.finfo(torch.float32).eps  # ~1.2e-4 of what training changed in a tensor


def assert_close_as_float32_allows(actual: dict, expected32: dict, exact: dict, initial: dict, what: str) -> None:
    """Each tensor of `actual` is as close to the float64 run `exact` as float32 can promise.

    Stacked grouped convs and plain convs take different kernels and summation orders, so
    bit-level agreement is no property. What is: the stacked run lies within SLACK times the
    one-by-one float32 run's own distance from the float64 run, or within 1,024 float32 ulps
    (relative) of how far training moved the tensor: rounding in each step is relative to the
    activations and gradients that make the update, not to the tensor's value (a running mean
    near 0 is a sum of large terms), plus SLACK float32 ulps of the largest change anywhere in the
    model (a gradient that is zero in exact arithmetic comes out as rounding noise in one kernel
    and as zero in another). A wrong gradient, step count or statistic errs by a sizeable share of
    the update itself, orders of magnitude beyond that.
    """
    assert actual.keys() == exact.keys()
    floating = [name for name, t in exact.items() if t.is_floating_point()]
    largest = max((exact[n].double() - initial[n].double()).abs().max().item() for n in floating)
    for name, reference in exact.items():
        if not reference.is_floating_point():
            assert torch.equal(actual[name], expected32[name]), f"{what} {name}"
            continue
        reference = reference.double()
        own_error = (expected32[name].double() - reference).abs().max().item()
        update = (reference - initial[name].double()).abs().max().item()
        error = (actual[name].double() - reference).abs().max().item()
        assert error <= SLACK * own_error + UPDATE_SHARE * update + SLACK * torch.finfo(torch.float32).eps * largest, (
            f"{what} {name}: {error:.2e} from float64; one by one in float32 {own_error:.2e}; "
            f"training moved it {update:.2e}"
        )


def assert_same_state(spec: dict, data: Dataset, folds: list, epochs: int = 1) -> None:
    """Every fold's parameters and buffers after `epochs` are the same trained together as alone."""
    seeds = [fold_seed(0, 7, k) for k in range(len(folds))]
    exact = trained_alone(spec, data, folds, seeds, epochs, torch.float64)
    alone = trained_alone(spec, data, folds, seeds, epochs, torch.float32)
    together = models_for(spec, data, seeds)
    train_together(together, data, folds, spec["training"], epochs, CPU, seeds)
    untrained = models_for(spec, data, seeds)
    for f in range(len(folds)):
        assert_close_as_float32_allows(
            together[f].state_dict(),
            alone[f].state_dict(),
            exact[f].state_dict(),
            untrained[f].state_dict(),
            f"fold {f + 1}",
        )
        assert any(
            not torch.equal(p, q) for p, q in zip(together[f].state_dict().values(), untrained[f].state_dict().values())
        )


POSITIONS = ["pre_conv", "post_conv", "post_act"]
NORM_TYPES = ["batch", "batch_renorm", "group", "layer", "instance"]


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_together_trains_every_norm_and_position_to_the_same_parameters_and_running_stats(
    digits, threads, norm_type, position
):
    data, folds = small(digits)
    norm = {"type": norm_type, "position": position, "momentum": 0.2, "groups": 4, "warmup": 3}
    # AdamW only where no gradient is zero in exact arithmetic: a conv bias that instance norm
    # cancels gets rounding noise for a gradient, which Adam turns into full steps of either sign.
    adamw = position == "post_act" and norm_type != "instance"
    assert_same_state(spec_for(norm, optimizer="adamw" if adamw else "sgd"), data, folds)


@pytest.mark.parametrize("norm_type", ["batch", "group"])
def test_together_trains_channels_last_models_as_on_cuda(digits, threads, monkeypatch, norm_type):
    """The CUDA layout, run on the CPU: channels_last weights (L1 on, as in HP) and inputs."""
    monkeypatch.setattr(nas.training.train, "uses_channels_last", lambda device: True)
    data, folds = small(digits)
    assert_same_state(spec_for({"type": norm_type, "position": "post_conv", "groups": 4}), data, folds)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_together_matches_sequential_without_norm_for_both_optimizers(digits, threads, optimizer):
    data, folds = small(digits)
    assert_same_state(spec_for({"type": "none"}, optimizer=optimizer), data, folds)


@pytest.mark.parametrize(
    "order,norm_type", [("original", "batch"), ("preact", "batch_renorm"), ("original", "group"), ("preact", "none")]
)
def test_together_matches_sequential_for_residual_blocks(digits, threads, order, norm_type):
    data, folds = small(digits)
    block = {"type": "residual", "residual": {"order": order, "zero_init": True}}
    assert_same_state(
        spec_for({"type": norm_type, "position": "post_conv"}, block, "adamw" if order == "preact" else "sgd"),
        data,
        folds,
    )


def test_together_matches_sequential_with_crop_flip_augmentation_and_frozen_batch_norm_affine(digits, threads):
    data, folds = small(digits)
    data.augment = "crop_flip"
    assert_same_state(spec_for({"type": "batch", "affine": False, "track_running_stats": False}), data, folds)


def test_together_matches_sequential_on_one_dimensional_signals(threads):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(240, 32, generator=gen), torch.arange(240) % 3
    data = Dataset("signals", x, y, x[:10], y[:10], ["a", "b", "c"])
    assert_same_state(spec_for({"type": "batch"}), data, stratified_folds(y, 3, 0))


def reference_training(
    model: nn.Module, data: Dataset, train_idx: torch.Tensor, hp: dict, epochs: int, seed: int, steps: int
) -> nn.Module:
    """The documented training of one fold, written out with plain PyTorch (no nas.training.train helper):
    each epoch a permutation drawn from the fold's generator, its first `steps` full batches,
    SGD-Nesterov with weight decay on weights of rank > 1 only, L1 on the conv kernels, and a
    cosine learning rate from `lr` to 0 over all `epochs * steps` steps."""
    generator = torch.Generator().manual_seed(seed)
    weights = [p for p in model.parameters() if p.ndim > 1]
    optimizer = torch.optim.SGD(
        [
            {"params": weights, "weight_decay": hp["weight_decay"]},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=hp["lr"],
        momentum=0.9,
        nesterov=True,
    )
    kernels = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    bs, total, done = hp["batch_size"], epochs * steps, 0
    for _ in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = hp["lr"] * 0.5 * (1 + math.cos(math.pi * done / total))
            idx = order[step * bs : (step + 1) * bs]
            loss = torch.nn.functional.cross_entropy(
                model(data.x_train[idx]), data.y_train[idx], label_smoothing=hp["label_smoothing"]
            )
            loss = loss + hp["l1"] * sum(w.abs().sum() for w in kernels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
    return model


def test_the_reference_training_is_what_fit_does_on_folds_of_one_size(digits):
    data, folds = small(digits)  # 160 training samples a fold: 5 steps of 32
    spec = spec_for({"type": "batch", "position": "post_conv"})
    seeds = [fold_seed(0, 3, k) for k in range(3)]
    for model, reference, (train_idx, _), seed in zip(
        models_for(spec, data, seeds), models_for(spec, data, seeds), folds, seeds
    ):
        fit(model, data, train_idx, None, spec["training"], 2, CPU, seed=seed)
        reference_training(reference, data, train_idx, spec["training"], 2, seed, steps=5)
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


def test_folds_of_unequal_size_train_together_for_the_smallest_folds_steps_over_several_epochs(digits, threads):
    data, _ = small(digits, n=241)
    folds = stratified_folds(data.y_train, 3, 0)  # 160, 161, 161 training samples
    spec = spec_for(
        {"type": "batch", "position": "post_conv"}, hp={"batch_size": 23}
    )  # 6, 7, 7 full batches: together takes 6
    assert sorted(len(train) // 23 for train, _ in folds) == [6, 7, 7]
    seeds, epochs = [fold_seed(0, 5, k) for k in range(3)], 3
    together = models_for(spec, data, seeds)
    train_together(together, data, folds, spec["training"], epochs, CPU, seeds)
    untrained = models_for(spec, data, seeds)
    as64 = dataclasses.replace(data, x_train=data.x_train.double())
    for f, (train_idx, _) in enumerate(folds):
        exact = reference_training(
            models_for(spec, data, seeds)[f].double(), as64, train_idx, spec["training"], epochs, seeds[f], steps=6
        )
        alone = reference_training(
            models_for(spec, data, seeds)[f], data, train_idx, spec["training"], epochs, seeds[f], steps=6
        )
        assert_close_as_float32_allows(
            together[f].state_dict(), alone.state_dict(), exact.state_dict(), untrained[f].state_dict(), f"fold {f + 1}"
        )


def test_the_shared_batches_helper_draws_full_shuffled_batches():
    indices = torch.arange(100, 171)  # 71 samples
    drawn = batches(indices, 16, torch.Generator().manual_seed(3))
    assert [len(b) for b in drawn] == [16] * 4  # the last 7 are dropped
    flat = torch.cat(drawn)
    assert len(set(flat.tolist())) == 64 and set(flat.tolist()) <= set(indices.tolist())
    assert flat.tolist() != sorted(flat.tolist())  # shuffled
    again = torch.cat(batches(indices, 16, torch.Generator().manual_seed(3)))
    assert torch.equal(flat, again)  # the generator decides
    assert [len(b) for b in batches(indices[:5], 16, torch.Generator())] == [
        5
    ]  # a fold smaller than a batch: one batch of all


def test_the_shared_cosine_schedule_falls_from_the_base_rate_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    schedule = cosine_schedule(optimizer, 8)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [0.4 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(9)] + [0.0]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[0] == 0.4 and seen[4] == pytest.approx(0.2) and seen[8] == seen[9] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_shared_optimizer_decays_only_its_decay_group(optimizer):
    weight, bias = nn.Parameter(torch.tensor([[1.0, -2.0]])), nn.Parameter(torch.tensor([0.5]))
    opt = optimizer_for([weight], [bias], {"optimizer": optimizer, "lr": 0.1, "weight_decay": 0.01})
    weight.grad, bias.grad = torch.tensor([[0.2, 0.4]]), torch.tensor([0.3])
    opt.step()
    if optimizer == "sgd":  # first Nesterov step: buffer = g + wd * p; update = g + wd * p + 0.9 * buffer
        g = torch.tensor([[0.2, 0.4]]) + 0.01 * torch.tensor([[1.0, -2.0]])
        assert torch.allclose(weight.data, torch.tensor([[1.0, -2.0]]) - 0.1 * 1.9 * g)
        assert torch.allclose(bias.data, torch.tensor([0.5 - 0.1 * 1.9 * 0.3]))
    else:  # AdamW's first step moves each value by lr * sign(g), after decoupled decay lr * wd * p
        assert torch.allclose(weight.data, torch.tensor([[1.0, -2.0]]) * (1 - 0.1 * 0.01) - 0.1, atol=1e-6)
        assert torch.allclose(bias.data, torch.tensor([0.5 - 0.1]), atol=1e-6)


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
    score = cross_validate(
        spec_for({"type": "batch"}), data, folds, 2, CPU, on_epoch=reports.append, fold_mode="together"
    )
    assert [(r.fold, r.epoch) for r in reports] == [(None, 0), (None, 1)]
    assert reports[-1].loss == pytest.approx(score["cv_loss"]) and reports[-1].accuracy == pytest.approx(
        score["cv_accuracy"]
    )
    assert reports[-1].fold_losses == pytest.approx(score["fold_losses"])  # and each fold's own


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
    import nas.training.folds_together

    def out_of_memory(device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(nas.training.folds_together, "autocast", out_of_memory)
    data, folds = small(digits)
    score = cross_validate(spec_for({"type": "batch"}), data, folds, 1, CPU, fold_mode="together")
    assert score["fold_mode"] == "sequential" and score["fold_mode_fallback"].startswith(
        "CUDA out of memory with 3 folds together"
    )


SPACE = {"stages": 1, "width": 8, "block": {"norm": {"type": {"choice": ["batch", "batch_renorm", "group"]}}}}


def run_search(tmp_path, mode: str, pruner: str = "none") -> list[optuna.trial.FrozenTrial]:
    folder = tmp_path / mode
    folder.mkdir()
    storage = f"sqlite:///{folder}/nas.db"
    config = write_digits_run(
        folder,
        SPACE,
        storage,
        {"name": "s", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 2, "fold_mode": mode, "pruner": pruner},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return optuna.load_study(study_name="s", storage=storage).get_trials()


@pytest.mark.slow
def test_a_search_with_folds_together_stores_the_same_trial_attributes_as_sequential(tmp_path):
    together, sequential = run_search(tmp_path, "together", pruner="median"), run_search(tmp_path, "sequential")
    assert [set(t.user_attrs) for t in together] == [set(t.user_attrs) for t in sequential]
    assert [t.user_attrs["fold_mode"] for t in together + sequential] == ["together", "sequential"]
    for t in together:  # the median pruner saw one report an epoch: the mean over the folds
        assert sorted(t.intermediate_values) == [1, 2]  # epochs trained
        assert t.intermediate_values[2] == pytest.approx(sum(t.user_attrs["fold_losses"]) / 2)


def test_together_matches_sequential_with_bn_sparsity_on_every_affine_norm(digits, threads):
    data, folds = small(digits)
    for norm in ({"type": "batch"}, {"type": "group", "groups": 4}, {"type": "batch_renorm"}):
        assert_same_state(spec_for(norm, hp={"bn_sparsity": 1e-2}), data, folds)
