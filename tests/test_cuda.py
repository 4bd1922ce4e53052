"""The CUDA path, run for real on a GPU (skipped without one; scripts/gpu_check.sh runs these):
bf16 autocast, channels_last, data on the device, both fold modes, out-of-memory recovery,
several workers on one GPU, and export from a CUDA-trained model."""

import json
import subprocess
import sys

import optuna
import pytest
import torch
from conftest import CUDA_TEST_DEVICE, write_digits_run
from optuna.trial import TrialState

from nas.cli import export_main, search_main
from nas.data.datasets import load_dataset, stratified_folds
from nas.models.build import build
from nas.search.config import DatasetConfig
from nas.search.space import default_spec
from nas.training.cross_validation import cross_validate
from nas.training.train import autocast, fit, prepare_model, resolve_device, uses_channels_last

pytestmark = pytest.mark.cuda
SPACE = {
    "stages": 2,
    "width": 16,
    "block": {"norm": {"type": {"choice": ["batch", "batch_renorm", "group"]}}},
    "training": {"optimizer": "adamw", "lr": {"float": [3.0e-3, 1.0e-2], "log": True}},
}


@pytest.fixture(scope="module")
def device():
    return resolve_device(CUDA_TEST_DEVICE)


@pytest.fixture(scope="module")
def digits(device):
    return load_dataset(DatasetConfig(), device)


def on_device(tmp_path, name, trials, **evaluation) -> str:
    """A digits run on the test device; returns the storage URL."""
    config = write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": name, "sampler": "random", "trials": trials},
        {"folds": 2, "epochs": 2, **evaluation},
    )
    text = config.read_text().replace("device: cpu", f"device: {CUDA_TEST_DEVICE}")
    config.write_text(text)
    return f"sqlite:///{tmp_path}/nas.db"


def test_data_lives_on_the_device_and_training_uses_bf16_and_channels_last(digits, device):
    assert digits.x_train.device.type == device.type
    spec = default_spec({"stages": 2, "width": 16, "training": {"optimizer": "adamw", "lr": 0.003}})
    torch.manual_seed(0)
    model = prepare_model(build(spec, digits.input_shape, digits.num_classes), device)
    conv = model.features.stage2_block1.conv.weight  # 16 input channels: one channel would be both layouts at once
    assert conv.device.type == device.type
    assert conv.is_contiguous(memory_format=torch.channels_last) == uses_channels_last(device)
    with autocast(device):
        logits = model(
            digits.x_train[:8].contiguous(memory_format=torch.channels_last)
            if uses_channels_last(device)
            else digits.x_train[:8]
        )
    assert logits.dtype == (torch.bfloat16 if device.type == "cuda" else torch.float32)
    train_idx, val_idx = stratified_folds(digits.y_train, 3, 0)[0]
    result = fit(model, digits, train_idx, val_idx, spec["training"], 10, device, seed=0)
    assert result.val_accuracy > 0.8  # trains, in bf16, to far above chance (0.1)


def test_both_fold_modes_train_the_same_candidate_alike(digits, device):
    folds = stratified_folds(digits.y_train, 3, 0)
    spec = default_spec({"stages": 2, "width": 16, "block": {"norm": {"type": "batch"}}})
    together = cross_validate(spec, digits, folds, 3, device, fold_mode="together")
    sequential = cross_validate(spec, digits, folds, 3, device, fold_mode="sequential")
    assert together["fold_mode"] == "together" and sequential["fold_mode"] == "sequential"
    # bf16 rounds differently in grouped and plain convs: alike within a few percent, not bit for bit
    assert together["cv_loss"] == pytest.approx(sequential["cv_loss"], rel=0.1)
    assert together["cv_accuracy"] == pytest.approx(sequential["cv_accuracy"], abs=0.02)


def test_out_of_memory_fails_the_trial_releases_memory_and_the_search_goes_on(tmp_path, monkeypatch, device):
    import nas.training.cross_validation

    real_fit, calls, before = nas.training.cross_validation.fit, [], []

    def fit_that_runs_out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            if device.type == "cuda":
                before.append(torch.cuda.memory_allocated())
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(nas.training.cross_validation, "fit", fit_that_runs_out_of_memory_once)
    url = on_device(tmp_path, "oom", 2, fold_mode="sequential")
    assert search_main(["--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    trials = optuna.load_study(study_name="oom", storage=url).get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"].startswith("CUDA out of memory")
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2
    if device.type == "cuda":  # the failed candidate's model was released before the next trial
        assert torch.cuda.memory_allocated() <= before[0]


def test_two_workers_share_one_gpu_and_end_with_exactly_the_budget(tmp_path):
    url = on_device(tmp_path, "two", 4)
    proc = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", str(tmp_path / "run.yaml"), "--workers", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    trials = optuna.load_study(study_name="two", storage=url).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_model_searched_and_exported_on_the_device_is_verified_on_the_cpu(tmp_path):
    url = on_device(tmp_path, "ex", 1)
    assert search_main(["--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    assert (
        export_main(["--storage", url, "--study", "ex", "--out", str(tmp_path / "out"), "--device", CUDA_TEST_DEVICE])
        == 0
    )
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["test"]["accuracy"] > 0.2 and meta["fold_max_abs_diff"] <= 1e-4  # trained (chance: 0.1), folded exactly


def test_uint8_images_in_memory_and_streamed_to_the_device_give_the_same_fold_losses(tmp_path, device):
    from nas.data.samples import CompactImages, StreamedImages
    from tests.test_data import write_imagefolder

    write_imagefolder(tmp_path / "data", per_class=16, size=(16, 16))
    cfg = DatasetConfig(name="imagefolder", root=str(tmp_path / "data"), augment="crop_flip")
    held = load_dataset(cfg, device)
    streamed = load_dataset(DatasetConfig(**{**cfg.__dict__, "device_memory": 0.0}), device)
    assert isinstance(held.x_train, CompactImages) and held.x_train.pixels.device.type == device.type
    assert isinstance(streamed.x_train, StreamedImages) and streamed.x_train[:4].device.type == device.type
    folds = stratified_folds(held.y_train, 2, 0)
    spec = default_spec({"stages": 2, "width": 8, "training": {"batch_size": 8}})
    for fold_mode in ("together", "sequential"):
        a = cross_validate(spec, held, folds, 2, device, fold_mode=fold_mode)["fold_losses"]
        b = cross_validate(spec, streamed, folds, 2, device, fold_mode=fold_mode)["fold_losses"]
        assert a == pytest.approx(
            b, abs=1e-5 if device.type == "cpu" else 1e-3
        )  # cuDNN's bf16 kernels need not repeat bit for bit
