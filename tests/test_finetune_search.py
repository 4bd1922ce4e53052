"""A fine-tuning strategy searched (`model.weights` + `finetune` in the space): Optuna samples the BN mode and the
rest define-by-run, every fold starts from the pinned checkpoint, the study contract compares the checkpoint's bytes,
nas-export retrains with the found strategy, nas-compare compares BN modes, and bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from nas.cli import compare_main, export_main, predict_main, search_main
from nas.search.config import DatasetConfig

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402 - timm brings safetensors

GREY = {"mean": [0.5], "std": [0.5], "input_size": 16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """test_resnet trained on grey 16x16 digits (`trained`), and the same network as initialized (`untrained`)."""
    from nas.data.datasets import load_dataset
    from nas.search.space import training_defaults
    from nas.training.train import fit

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(folder / "untrained.safetensors"))
    data = load_dataset(DatasetConfig(name="digits", image_size=16), "cpu", normalization=GREY)
    hp = {**training_defaults(), "optimizer": "adamw", "lr": 3e-3}
    fit(model, data, torch.arange(len(data.y_train)), None, hp, 6, torch.device("cpu"))
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(folder / "trained.safetensors"))
    return {"trained": folder / "trained.safetensors", "untrained": folder / "untrained.safetensors"}


def write_run(folder: Path, weights: str, finetune: dict, *, trials: int = 1, dataset: dict | None = None, **model):
    folder.mkdir(parents=True, exist_ok=True)
    space = {
        "model": {"timm": "test_resnet", "weights": weights, **GREY, **model},
        "finetune": finetune,
        "training": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32},
    }
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    config = {
        "dataset": {"name": "digits", **(dataset or {})},
        "search_space": "space.yaml",
        "study": {"name": "ft", "storage": f"sqlite:///{folder / 'ft.db'}", "trials": trials, "seed": 0},
        "evaluation": {"folds": 2, "epochs": 2},
        "device": "cpu",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder / "run.yaml"


def trials_of(config: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="ft", storage=f"sqlite:///{config.parent / 'ft.db'}")
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_every_fold_starts_from_the_checkpoint_so_a_trained_one_scores_far_better(checkpoints, tmp_path, capsys):
    """Linear probes of a trained and an untrained checkpoint of one architecture: only the weights differ."""
    scores = {}
    for name, path in checkpoints.items():
        config = write_run(tmp_path / name, str(path), {"bn_mode": "linear-probe"})
        assert search_main(["--config", str(config), "--no-progress"]) == 0
        said = "Checkpoint input: mean [0.500], std [0.500] (model.mean, model.std), images 1x16x16"
        assert said in capsys.readouterr().err
        (trial,) = trials_of(config)
        scores[name] = trial.value
        weights = trial.user_attrs["arch"]["model"]["weights"]
        assert weights["file"] == str(path) and len(weights["sha256"]) == 64
    assert scores["trained"] < 0.5 < 1.5 < scores["untrained"], scores


def test_the_strategy_is_sampled_define_by_run_and_stored_in_the_spec(checkpoints, tmp_path):
    finetune = {
        "bn_mode": {"choice": ["adabn", "bn-only", "linear-probe", "full"]},
        "recalibrate": {"choice": [False, True]},
        "unfreeze_stages": {"int": [1, 2]},
        "epochs": {"int": [1, 2]},
    }
    config = write_run(tmp_path, "checkpoints.safetensors", finetune, trials=8)
    (tmp_path / "checkpoints.safetensors").write_bytes(checkpoints["trained"].read_bytes())  # relative to the space
    assert search_main(["--config", str(config), "--no-progress", "--sampler", "random"]) == 0
    trials = trials_of(config)
    assert len(trials) == 8
    for trial in trials:
        strategy, params = trial.user_attrs["arch"]["finetune"], trial.params
        mode = params["finetune.bn_mode"]
        assert strategy["bn_mode"] == mode and strategy["epochs"] == params["finetune.epochs"]
        assert ("finetune.recalibrate" in params) == (mode != "adabn")  # adabn always re-estimates
        assert strategy["recalibrate"] == params.get("finetune.recalibrate", True)
        assert ("finetune.unfreeze_stages" in params) == (mode in ("bn-only", "full"))  # head-only modes: no stages
        assert trial.user_attrs["arch"]["model"]["weights"]["file"] == str(tmp_path / "checkpoints.safetensors")
    trained = {t.params["finetune.bn_mode"]: t.user_attrs["params"] for t in trials}
    if {"linear-probe", "full"} <= set(trained):
        features = timm.create_model("test_resnet").num_features
        assert trained["linear-probe"] == features * 10 + 10 < trained["full"]  # the head alone


def test_a_changed_checkpoint_is_refused_on_resume_and_a_forced_change_is_recorded(checkpoints, tmp_path, capsys):
    config = write_run(tmp_path, "ckpt.safetensors", {"bn_mode": "linear-probe"}, trials=1)
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(checkpoints["trained"].read_bytes())
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    ckpt.write_bytes(checkpoints["untrained"].read_bytes())  # same architecture, other weights
    capsys.readouterr()
    storage = f"sqlite:///{tmp_path / 'ft.db'}"
    assert search_main(["--resume", "--study", "ft", "--storage", storage, "--trials", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.sha256: " in err and "the file changed since the study was made" in err and err.count("\n") == 1
    assert search_main(["--config", str(config), "--trials", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "space.model.sha256" in err and err.count("\n") == 1, err
    assert search_main(["--config", str(config), "--trials", "2", "--no-progress", "--force"]) == 0
    assert len(trials_of(config)) == 2


def test_export_retrains_with_the_found_strategy_and_the_result_predicts(checkpoints, tmp_path, capsys):
    config = write_run(tmp_path, str(checkpoints["trained"]), {"bn_mode": "freeze", "unfreeze_stages": 1})
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    out = tmp_path / "exported"
    storage = f"sqlite:///{tmp_path / 'ft.db'}"
    assert export_main(["--storage", storage, "--study", "ft", "--out", str(out)]) == 0
    assert "(fine-tuning its checkpoint: freeze, last 1 stage)" in capsys.readouterr().err
    meta = json.loads((out / "model.json").read_text())
    assert meta["test"]["accuracy"] > 0.8  # from a digits checkpoint, two epochs are plenty
    assert meta["preprocessing"]["mean"] == [0.5] and meta["preprocessing"]["resize"] == [16, 16]  # as the space said
    exported = torch.load(out / "weights.pt", weights_only=True)
    from safetensors.torch import load_file

    source = load_file(str(checkpoints["trained"]))
    frozen = [k for k in source if k.startswith(("conv1.", "bn1.", "layer1.")) and "num_batches" not in k]
    assert frozen and all(torch.equal(exported[k], source[k]) for k in frozen)  # freeze, last stage only: kept
    assert not torch.equal(exported["fc.weight"], source["fc.weight"])  # the head trained
    import numpy as np
    from sklearn.datasets import load_digits

    np.save(tmp_path / "raw.npy", load_digits().images[:3])
    assert predict_main(["--model", str(out), str(tmp_path / "raw.npy")]) == 0


@pytest.mark.slow
def test_nas_compare_answers_which_bn_mode_at_equal_budgets(checkpoints, tmp_path, capsys):
    config = write_run(tmp_path, str(checkpoints["trained"]), {"bn_mode": {"choice": ["adabn", "full"]}})
    args = ["--config", str(config), "--factor", "finetune.bn_mode", "--trials-per-cell", "1", "--seeds", "2"]
    assert compare_main([*args, "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    cells = {cell["levels"]["finetune.bn_mode"]: cell for cell in result["cells"]}
    assert set(cells) == {"adabn", "full"}
    for mode, cell in cells.items():
        study = optuna.load_study(study_name=cell["study"], storage=f"sqlite:///{tmp_path / 'ft.db'}")
        assert {t.user_attrs["arch"]["finetune"]["bn_mode"] for t in study.trials} == {mode}


def test_a_label_budget_keeps_k_training_samples_per_class_and_the_whole_test_split():
    from nas.data.datasets import load_dataset

    full = load_dataset(DatasetConfig(name="digits"))
    few = load_dataset(DatasetConfig(name="digits", labels_per_class=7, labels_seed=1))
    assert torch.equal(torch.bincount(few.y_train), torch.full((10,), 7))
    assert torch.equal(few.y_test, full.y_test) and few.fingerprint == full.fingerprint  # the source is the same
    other = load_dataset(DatasetConfig(name="digits", labels_per_class=7, labels_seed=2))
    assert not torch.equal(few.x_train, other.x_train)


def test_an_older_study_without_label_keys_keeps_its_contract():
    from nas.study.contract import contract, differences

    old = {"dataset": {"name": "digits", "image_size": None}, "evaluation": {}, "space": {}}
    new = {"dataset": {"name": "digits", "image_size": None, "labels_per_class": None, "labels_seed": 0}}
    assert differences(contract(old, None), contract({**old, **new}, None)) == []
    budget = {"dataset": {**new["dataset"], "labels_per_class": 50}}
    assert [key for key, _, _ in differences(contract(old, None), contract({**old, **budget}, None))] == [
        "dataset.labels_per_class",
        "dataset.labels_seed",
    ]


BAD = [
    (
        {"finetune": {"bn_mode": "full"}, "model": None},
        "space.yaml: finetune: fine-tunes a checkpoint: set model.weights",
    ),
    ({"model": {"norm": {"type": "group"}}}, "space.yaml: model.norm: a checkpoint's norm layers are its own"),
    ({"model": {"weights": "missing.safetensors"}}, "space.yaml: model.weights: file not found: "),
    ({"model": {"sha256": "0" * 64}}, "space.yaml: model.sha256: "),
    ({"model": {"timm": "test_efficientnet"}}, "space.yaml: model.weights: "),
    ({"finetune": {"bn_mode": "full", "unfreeze_stages": {"int": [1, 9]}}}, "finetune.unfreeze_stages: up to 9;"),
    ({"finetune": {"bn_mode": "ful"}}, "space.yaml: finetune.bn_mode: "),
    ({"model": {"std": [0.5, 0.5]}}, "space.yaml: model.std: 2 values for 1 means"),
    ({"model": {"input_size": 0}}, "space.yaml: model.input_size: "),
    ({"dataset": {"labels_per_class": 1000}}, "dataset.labels_per_class: 1000 asked, but class 0 has only"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m.split(": ")[1] for _, m in BAD])
def test_bad_fine_tuning_input_is_one_line_exit_2_and_no_study(checkpoints, tmp_path, capsys, change, message):
    config = write_run(tmp_path, str(checkpoints["trained"]), {"bn_mode": "full"}, dataset=change.get("dataset"))
    space = yaml.safe_load((tmp_path / "space.yaml").read_text())
    for section in ("model", "finetune"):
        if section in change and change[section] is None:
            space[section] = {"timm": "test_resnet"}
        elif section in change:
            if section == "model" and "timm" in change["model"]:
                space["model"].pop("timm")
            space[section] = {**space.get(section, {}), **change[section]}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert search_main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "ft.db").exists() or not optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'ft.db'}")


def test_a_searched_epoch_count_refuses_a_pruner(checkpoints, tmp_path, capsys):
    config = write_run(tmp_path, str(checkpoints["trained"]), {"epochs": {"int": [1, 3]}})
    run = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**run, "evaluation": {**run["evaluation"], "pruner": "median"}}))
    assert search_main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "run.yaml: evaluation.pruner: median compares trials epoch by epoch, but finetune.epochs is searched" in err


@pytest.mark.parametrize("kind", ["pickled code", "truncated", "not a checkpoint"])
def test_a_bad_weights_file_is_refused_before_any_trial(checkpoints, tmp_path, capsys, kind):
    path = tmp_path / "bad.pt"
    if kind == "pickled code":
        torch.save({"conv1.weight": torch.zeros(1), "hook": print}, path)  # loading would call into builtins
        message = "holds pickled objects other than tensors (print); refused"
    elif kind == "truncated":
        torch.save(timm.create_model("test_resnet").state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
        message = "not a PyTorch checkpoint"
    else:
        path.write_text("weights: none\n")
        message = "not a PyTorch checkpoint"
    config = write_run(tmp_path, str(path), {"bn_mode": "full"})
    assert search_main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{tmp_path / 'space.yaml'}: model.weights: {path}: ") and message in err, err
    assert err.count("\n") == 1
