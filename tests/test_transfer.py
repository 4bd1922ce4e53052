"""nas-finetune: each bn-mode changes exactly the tensors it should, head replacement, adabn on a
constructed shift, and the command end to end on a tiny model exported by the real export code."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_digits_run

from nas.cli import export_main, finetune_main, search_main
from nas.data.datasets import load_dataset
from nas.deploy.export import load_exported
from nas.deploy.finetune import adapt, labelled_subset
from nas.errors import DataError, NasError
from nas.models.build import build
from nas.search.config import DatasetConfig

CPU = torch.device("cpu")
SPACE = {
    "stages": 2,
    "width": 8,
    "block": {"norm": {"type": "batch", "position": "post_conv"}},
    "training": {"batch_size": 64, "optimizer": "adamw", "lr": 0.01},
}
SHIFT = [{"contrast": 0.5}, {"brightness": 0.5}]  # an affine change of every input: what running statistics absorb
HP = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 1e-4, "l1": 0.0, "label_smoothing": 0.0, "batch_size": 32}
NORM = {"eps": 1e-5, "affine": True}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A BatchNorm model searched (1 trial) and exported (2 epochs) on digits by the real CLI."""
    root = tmp_path_factory.mktemp("transfer")
    config = write_digits_run(
        root,
        SPACE,
        f"sqlite:///{root}/nas.db",
        {"name": "tiny", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 1},
    )
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    assert (
        export_main(
            [
                "--storage",
                f"sqlite:///{root}/nas.db",
                "--study",
                "tiny",
                "--out",
                str(root / "exported"),
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    return root / "exported"


@pytest.fixture(scope="module")
def target_config(exported) -> Path:
    path = exported.parent / "shifted.yaml"
    config = yaml.safe_load((exported.parent / "run.yaml").read_text())
    config["dataset"]["transforms"] = SHIFT
    path.write_text(yaml.safe_dump(config))
    return path


def shifted(meta: dict, transforms=SHIFT, **dataset):
    return load_dataset(DatasetConfig(transforms=transforms, **dataset), CPU, normalization=meta["normalization"])


def mixed_model() -> torch.nn.Module:
    """One stage each of BatchNorm, batch renorm and GroupNorm (no running statistics)."""
    block = {"type": "plain", "kernel": 3, "activation": "relu", "dropout": 0.0}
    norms = [
        {"type": "batch", "position": "post_conv", "momentum": 0.1, "track_running_stats": True, **NORM},
        {
            "type": "batch_renorm",
            "position": "post_conv",
            "momentum": 0.1,
            "r_max": 3.0,
            "d_max": 5.0,
            "warmup": 0,
            **NORM,
        },
        {"type": "group", "position": "pre_conv", "groups": 2, **NORM},
    ]
    stages = [{"width": 8, "downsample": "none", "blocks": [{**block, "norm": norm}]} for norm in norms]
    torch.manual_seed(0)
    return build({"stages": stages, "training": HP}, (1, 8, 8), 10)


def kinds(model: torch.nn.Module) -> dict[str, str]:
    """Every state_dict entry by what it is: conv, head, norm_affine, running_stats, step_count."""
    out = {}
    for name in model.state_dict():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        leaf = name.rsplit(".", 1)[1]
        if name.startswith("head."):
            out[name] = "head"
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv1d)):
            out[name] = "conv"
        elif leaf in ("running_mean", "running_var"):
            out[name] = "running_stats"
        elif leaf == "num_batches_tracked":
            out[name] = "step_count"
        else:
            out[name] = "norm_affine"
    return out


EXPECTED_CHANGES = {
    ("freeze", 5): {"conv", "head"},
    ("adabn", 0): {"running_stats"},
    ("adabn", 5): {"running_stats", "head"},
    ("bn-only", 5): {"norm_affine", "head", "running_stats", "step_count"},
    ("full", 5): {"conv", "head", "norm_affine", "running_stats", "step_count"},
}


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "per_class"), list(EXPECTED_CHANGES))
def test_each_mode_changes_exactly_the_tensors_it_should(exported, mode, per_class):
    model = mixed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt(model, shifted(load_exported(exported).meta), mode, per_class, 2, 0, CPU, HP)
    after = model.state_dict()
    what = kinds(model)
    assert set(what.values()) == {"conv", "head", "norm_affine", "running_stats", "step_count"}
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    expected = {name for name, kind in what.items() if kind in EXPECTED_CHANGES[mode, per_class]}
    assert changed == expected
    assert set(result.changed_tensors) == expected
    group_affine = {n for n in what if n.startswith("features.stage3_block1.norm.")}
    assert group_affine and (group_affine <= changed) == (
        mode in ("bn-only", "full")
    )  # GroupNorm counts as a norm layer
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable


def test_head_is_replaced_when_the_class_count_differs_and_kept_when_equal(exported, tmp_path):
    x = load_dataset(DatasetConfig(), CPU)  # digits, to cut five classes out of
    raw_train = (x.x_train * torch.tensor(x.std).view(1, -1, 1, 1) + torch.tensor(x.mean).view(1, -1, 1, 1)).numpy()
    raw_test = (x.x_test * torch.tensor(x.std).view(1, -1, 1, 1) + torch.tensor(x.mean).view(1, -1, 1, 1)).numpy()
    keep_train, keep_test = x.y_train.numpy() < 5, x.y_test.numpy() < 5
    np.savez(
        tmp_path / "five.npz",
        x_train=raw_train[keep_train],
        y_train=x.y_train.numpy()[keep_train],
        x_test=raw_test[keep_test],
        y_test=x.y_test.numpy()[keep_test],
    )
    source = load_exported(exported)
    five = load_dataset(
        DatasetConfig(name="npz", root=str(tmp_path / "five.npz")), CPU, normalization=source.meta["normalization"]
    )
    model = source.model
    old_head = model.head
    result = adapt(model, five, "freeze", 5, 1, 0, CPU, HP)
    assert result.head_replaced and result.before is None
    assert (
        model.head is not old_head and model.head.out_features == 5 and model.head.in_features == old_head.in_features
    )
    with pytest.raises(NasError, match="new head needs labels"):
        adapt(load_exported(exported).model, five, "adabn", 0, 1, 0, CPU, HP)
    same = load_exported(exported).model
    kept = same.head
    result = adapt(same, shifted(source.meta), "freeze", 5, 1, 0, CPU, HP)
    assert not result.head_replaced and same.head is kept and result.before is not None


def test_adabn_lowers_the_target_loss_compared_with_freeze_on_a_constructed_shift(exported):
    source = load_exported(exported)
    target = shifted(source.meta)
    hp = source.meta["arch"]["training"]
    clean = source.meta["test"]["loss"]
    adabn_alone = adapt(load_exported(exported).model, target, "adabn", 0, 0, 0, CPU, hp)
    assert adabn_alone.before["loss"] > 2 * clean  # the shift hurts the model as it is
    assert adabn_alone.after["loss"] < 0.75 * adabn_alone.before["loss"]  # what freeze keeps: the source statistics
    for seed in (0, 1):
        with_labels = adapt(load_exported(exported).model, target, "adabn", 5, 5, seed, CPU, hp)
        freeze = adapt(load_exported(exported).model, target, "freeze", 5, 5, seed, CPU, hp)
        assert with_labels.after["loss"] < freeze.after["loss"]


def test_labelled_subset_is_stratified_seeded_and_refuses_more_than_there_is():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 30)
    picked = labelled_subset(y, 5, seed=3)
    assert torch.bincount(y[picked]).tolist() == [5, 5, 5]
    assert torch.equal(picked, labelled_subset(y, 5, seed=3))
    assert not torch.equal(picked, labelled_subset(y, 5, seed=4))
    assert len(labelled_subset(y, None, seed=0)) == len(y)
    with pytest.raises(DataError, match="class 1 has only 7"):
        labelled_subset(y, 8, seed=0)


@pytest.mark.slow
def test_finetune_command_writes_a_verified_export_and_metrics(exported, target_config, tmp_path):
    script = Path(sys.executable).parent / "nas-finetune"
    out = tmp_path / "tuned"
    proc = subprocess.run(
        [
            str(script),
            "--model",
            str(exported),
            "--config",
            str(target_config),
            "--bn-mode",
            "bn-only",
            "--labels-per-class",
            "5",
            "--epochs",
            "2",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    tuned = load_exported(out)  # checks every sha256
    metrics = json.loads((out / "metrics.json").read_text())
    assert {
        "before",
        "after",
        "mode",
        "labels_per_class",
        "seed",
        "epochs",
        "trained_parameters",
        "changed_tensors",
        "transforms",
    } <= set(metrics)
    assert (
        metrics["mode"] == "bn-only"
        and metrics["labels_per_class"] == 5
        and metrics["seed"] == 1
        and metrics["train_samples"] == 50
    )
    assert all(".norm." in n or n.startswith("head.") for n in metrics["trained_parameters"])
    assert metrics["after"]["accuracy"] == tuned.meta["test"]["accuracy"] and tuned.meta["fold_max_abs_diff"] <= 1e-4
    assert (
        tuned.meta["finetune"]["mode"] == "bn-only"
        and tuned.meta["normalization"] == load_exported(exported).meta["normalization"]
    )
    target = shifted(tuned.meta)
    with torch.no_grad():
        accuracy = (tuned.model(target.x_test).argmax(1) == target.y_test).float().mean().item()
    assert accuracy == pytest.approx(metrics["after"]["accuracy"])


@pytest.mark.slow
def test_adabn_alone_is_the_default_for_adabn(exported, target_config, tmp_path, capsys):
    assert (
        finetune_main(
            [
                "--model",
                str(exported),
                "--config",
                str(target_config),
                "--bn-mode",
                "adabn",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["labels_per_class"] == 0 and metrics["trained_parameters"] == [] and metrics["epochs"] == 0
    assert all(n.endswith(("running_mean", "running_var")) for n in metrics["changed_tensors"])


@pytest.mark.slow
def test_missing_model_folder_exits_2_with_one_line(target_config, tmp_path):
    script = Path(sys.executable).parent / "nas-finetune"
    proc = subprocess.run(
        [str(script), "--model", str(tmp_path / "nowhere"), "--config", str(target_config), "--bn-mode", "full"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nowhere/model.json: not found" in proc.stderr


def test_an_out_that_cannot_be_written_fails_before_adapting(exported, target_config, tmp_path, capsys, monkeypatch):
    def refuse_to_adapt(*args, **kwargs):
        raise AssertionError("adaptation started before --out was checked")

    monkeypatch.setattr("nas.deploy.finetune.adapt", refuse_to_adapt)
    (tmp_path / "file").write_text("a regular file")
    out = tmp_path / "file" / "sub"

    code = finetune_main(
        ["--model", str(exported), "--config", str(target_config), "--bn-mode", "full", "--out", str(out)]
    )

    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"--out: cannot write to {out}: ") and captured.err.count("\n") == 1
    assert captured.out == ""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--bn-mode", "thaw"], "invalid choice: 'thaw'"),
        (["--bn-mode", "full", "--labels-per-class", "-3"], "expected a count >= 0 or 'all'"),
    ],
)
def test_bad_flags_are_usage_errors(exported, target_config, capsys, args, words):
    with pytest.raises(SystemExit) as info:
        finetune_main(["--model", str(exported), "--config", str(target_config), *args])
    assert info.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"dataset": {"name": "digits", "transforms": [{"contrast": 0.5}, {"blur": 1}]}},
            "dataset.transforms[1].blur: unknown transform",
        ),
        (
            {"dataset": {"name": "digits", "transforms": [{"noise": -0.1}]}},
            "dataset.transforms[0].noise: must be >= 0.0",
        ),
        (None, "--labels-per-class: 0 leaves full nothing to train on"),
        ({}, "class 0 has only"),
    ],
)
def test_bad_input_exits_2_with_one_line(exported, target_config, tmp_path, capsys, change, words):
    config = yaml.safe_load(target_config.read_text())
    config["search_space"] = str(target_config.parent / "space.yaml")
    config.update(change or {})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    per_class = "0" if change is None else "500"
    code = finetune_main(
        [
            "--model",
            str(exported),
            "--config",
            str(tmp_path / "bad.yaml"),
            "--bn-mode",
            "full",
            "--labels-per-class",
            per_class,
            "--out",
            str(tmp_path / "out"),
            "-q",  # the refusal alone
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()
