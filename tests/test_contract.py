"""The study is a contract: a continuation that would score trials differently is refused in one line and
writes nothing, unless forced (then the change is recorded); the budget and the like may change freely."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import write_digits_run
from sklearn.datasets import load_digits

from nas.cli import export_main, search_main
from nas.dashboard.state import detail
from nas.data.datasets import load_dataset
from nas.search.config import DatasetConfig
from nas.study.report import write_report
from nas.study.schema import HISTORY_ATTR, RUN_CONFIG_ATTR, config_of_trial, read_config_history, read_run_config

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "c", "sampler": "random", "trials": 2},
        {"folds": 2, "epochs": 1},
    )
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0
    return tmp_path


def study(run_dir) -> optuna.Study:
    return optuna.load_study(study_name="c", storage=f"sqlite:///{run_dir}/nas.db")


def snapshot(run_dir) -> tuple:
    """Everything a refused continuation must leave as it was."""
    s = study(run_dir)
    trials = [(t.number, t.state, t.params, t.value, t.user_attrs) for t in s.get_trials()]
    return trials, s._storage.get_study_user_attrs(s._study_id), s._storage.get_study_system_attrs(s._study_id)


def write_npz(path: Path, scale: float = 1.0) -> Path:
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0 * scale
    np.savez(path, x_train=x[:1400], y_train=digits.target[:1400], x_test=x[1400:], y_test=digits.target[1400:])
    return path


def write_config(run_dir, name: str, dataset: dict) -> Path:
    config = yaml.safe_load((run_dir / "run.yaml").read_text())
    config["dataset"] = dataset
    (run_dir / name).write_text(yaml.safe_dump(config))
    return run_dir / name


def refused(capsys, argv) -> str:
    """The one-line refusal (status lines and notices before it are stderr's too)."""
    assert search_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.splitlines()[-1] + "\n"


def test_a_continuation_on_other_data_is_refused_naming_the_key_and_both_values_and_writes_nothing(run_dir, capsys):
    npz = write_config(run_dir, "npz.yaml", {"name": "npz", "root": str(write_npz(run_dir / "d.npz"))})
    before = snapshot(run_dir)
    err = refused(capsys, ["--config", "npz.yaml", "--trials", "4", "--no-progress"])
    assert err.startswith(f'{npz.name}: dataset.name: study \'c\' was run with "digits"; this run has "npz"')
    assert "--force" in err
    assert snapshot(run_dir) == before


def test_an_evaluation_change_by_flag_names_the_flag(run_dir, capsys):
    before = snapshot(run_dir)
    err = refused(capsys, ["--config", "run.yaml", "--trials", "4", "--folds", "3"])
    assert err.startswith("--folds: evaluation.folds: study 'c' was run with 2; this run has 3")
    err = refused(capsys, ["--config", "run.yaml", "--trials", "4", "--set", "evaluation.fold_mode=sequential"])
    assert err.startswith("--set: evaluation.fold_mode:") and '"together"' in err and '"sequential"' in err
    space = yaml.safe_load((run_dir / "space.yaml").read_text())
    space["width"] = 16
    (run_dir / "space.yaml").write_text(yaml.safe_dump(space))
    err = refused(capsys, ["--config", "run.yaml", "--trials", "4"])
    assert err.startswith("run.yaml: space.width: study 'c' was run with 8; this run has 16")
    assert snapshot(run_dir) == before


def test_budget_timeout_device_and_sampler_may_change(run_dir):
    assert (
        search_main(
            [
                "--config",
                "run.yaml",
                "--trials",
                "3",
                "--timeout",
                "600",
                "--device",
                "cpu",
                "--sampler",
                "tpe",
                "--no-progress",
            ]
        )
        == 0
    )
    s = study(run_dir)
    config = read_run_config(s._storage, s._study_id)
    assert config["study"]["trials"] == 3 and config["study"]["sampler"] == "tpe"
    assert read_config_history(s._storage, s._study_id) == []


def test_a_run_that_trains_nothing_leaves_the_stored_config(run_dir, capsys):
    before = snapshot(run_dir)
    assert search_main(["--config", "run.yaml", "--trials", "1"]) == 0
    assert "nothing to run" in capsys.readouterr().err
    assert snapshot(run_dir) == before
    s = study(run_dir)
    assert read_run_config(s._storage, s._study_id)["study"]["trials"] == 2


@pytest.mark.slow
def test_force_continues_records_the_change_and_each_trial_keeps_its_own_config(run_dir, capsys):
    assert search_main(["--config", "run.yaml", "--trials", "3", "--epochs", "2", "--force", "--no-progress"]) == 0
    assert "recorded as config version 1" in capsys.readouterr().err
    s = study(run_dir)
    history = read_config_history(s._storage, s._study_id)
    assert [c["key"] for c in history[0]["changes"]] == ["evaluation.epochs"]
    assert (history[0]["changes"][0]["old"], history[0]["changes"][0]["new"]) == (1, 2)
    trials = s.get_trials()
    assert [t.user_attrs["config_version"] for t in trials] == [0, 0, 1]
    assert [config_of_trial(s, t)[0]["evaluation"]["epochs"] for t in trials] == [1, 1, 2]
    report = write_report(f"sqlite:///{run_dir}/nas.db", "c", run_dir / "report").read_text()
    assert "## Config history" in report and "`evaluation.epochs`: 1 → 2" in report
    page = detail(s._storage, "c")
    assert page["config_history"][0]["changes"][0]["key"] == "evaluation.epochs"


def test_changed_data_content_is_refused_by_search_and_by_export(tmp_path, monkeypatch, capsys):
    npz = write_npz(tmp_path / "d.npz")
    write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "c", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 1},
    )
    write_config(tmp_path, "run.yaml", {"name": "npz", "root": str(npz)})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0
    write_npz(npz, scale=0.5)  # same shape and classes, other values
    err = refused(capsys, ["--config", "run.yaml", "--trials", "2"])
    assert "data.sha256" in err
    assert (
        export_main(["--study", "c", "--storage", f"sqlite:///{tmp_path}/nas.db", "--out", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from what study 'c' was searched on: sha256" in err
    assert not (tmp_path / "out" / "model.json").exists()


def test_optuna_studies_stays_readable(run_dir):
    optuna_cli = Path(sys.executable).with_name("optuna")
    proc = subprocess.run(
        [str(optuna_cli), "studies", "--storage", f"sqlite:///{run_dir}/nas.db"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "| c " in line)
    assert len(row) < 250 and "bnnas: digits, 2 folds x 1 epochs, random, budget 2" in row


def test_an_older_study_keeps_working_and_its_config_moves_out_of_the_user_attrs(run_dir):
    s = study(run_dir)
    config = read_run_config(s._storage, s._study_id)
    # as bnnas stored it before: the whole run config as the user attr `run_config`
    engine = s._storage._backend.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM study_system_attributes WHERE key LIKE 'nas:%'")
    s.set_user_attr("run_config", config)
    assert (
        search_main(
            ["--resume", "--study", "c", "--storage", f"sqlite:///{run_dir}/nas.db", "--trials", "3", "--no-progress"]
        )
        == 0
    )
    s = study(run_dir)
    assert "run_config" not in s.user_attrs
    assert s._storage.get_study_system_attrs(s._study_id)[RUN_CONFIG_ATTR]["study"]["trials"] == 3
    assert HISTORY_ATTR not in s._storage.get_study_system_attrs(s._study_id)


def test_the_data_fingerprint_names_shape_classes_sizes_and_content(tmp_path):
    a = load_dataset(DatasetConfig(name="npz", root=str(write_npz(tmp_path / "a.npz")))).fingerprint
    again = load_dataset(DatasetConfig(name="npz", root=str(write_npz(tmp_path / "b.npz")))).fingerprint
    other = load_dataset(DatasetConfig(name="npz", root=str(write_npz(tmp_path / "c.npz", scale=0.5)))).fingerprint
    assert a == again
    assert (a["sample_shape"], a["train"], a["test"], len(a["classes"])) == ([1, 8, 8], 1400, 397, 10)
    assert other["sha256"] != a["sha256"] and {k: v for k, v in other.items() if k != "sha256"} == {
        k: v for k, v in a.items() if k != "sha256"
    }
    json.dumps(a)


def test_augment_compares_as_what_it_resolves_to_on_the_dataset(run_dir, capsys):
    """digits: `auto` is `none`, so spelling it out continues the study; `crop_flip` is another contract."""
    assert search_main(["--config", "run.yaml", "--trials", "3", "--set", "dataset.augment=none", "--no-progress"]) == 0
    s = study(run_dir)
    assert len(s.trials) == 3 and read_config_history(s._storage, s._study_id) == []
    before = snapshot(run_dir)
    err = refused(capsys, ["--config", "run.yaml", "--trials", "4", "--set", "dataset.augment=crop_flip"])
    assert err.startswith('--set: dataset.augment: study \'c\' was run with "none"; this run has "crop_flip"')
    assert snapshot(run_dir) == before


def test_cifar_auto_augment_continues_as_crop_flip_and_not_as_none(tmp_path, monkeypatch, capsys):
    from tests.test_data import write_cifar

    write_cifar(tmp_path / "cifar", "cifar10", monkeypatch, n_train_per_file=4, n_test=6, n_classes=2)
    write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "c", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 1},
    )
    write_config(tmp_path, "run.yaml", {"name": "cifar10", "root": str(tmp_path / "cifar"), "augment": "auto"})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0  # stored: auto

    err = refused(capsys, ["--config", "run.yaml", "--trials", "2", "--set", "dataset.augment=none"])
    assert err.startswith('--set: dataset.augment: study \'c\' was run with "crop_flip"; this run has "none"')
    assert (
        search_main(["--config", "run.yaml", "--trials", "2", "--set", "dataset.augment=crop_flip", "--no-progress"])
        == 0
    )
    s = study(tmp_path)
    assert len(s.trials) == 2 and read_config_history(s._storage, s._study_id) == []


def version1_fingerprint(x_train, y_train, x_test, y_test, classes) -> dict:
    """The data fingerprint as bnnas wrote it before version 2: 8-bit images hashed as float32 in [0, 1]."""
    digest = hashlib.sha256()
    for x, y in ((x_train, y_train), (x_test, y_test)):
        digest.update(np.ascontiguousarray(np.asarray(x, np.uint8).astype(np.float32) / 255.0).data)
        digest.update(np.asarray(y, np.int64).data)
    return {
        "sample_shape": [3, 32, 32],
        "classes": classes,
        "train": len(y_train),
        "test": len(y_test),
        "sha256": digest.hexdigest(),
    }


def test_a_study_fingerprinted_in_version_1_continues_on_the_same_data_and_refuses_other_data(
    tmp_path, monkeypatch, capsys
):
    import shutil

    from nas.study.schema import DATA_ATTR
    from tests.test_data import write_cifar

    cifar = dict(name="cifar10", monkeypatch=monkeypatch, n_train_per_file=4, n_test=6, n_classes=2)
    raw = write_cifar(tmp_path / "cifar", **cifar)
    write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "c", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 1},
    )
    write_config(tmp_path, "run.yaml", {"name": "cifar10", "root": str(tmp_path / "cifar")})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0
    s = study(tmp_path)
    current = s._storage.get_study_system_attrs(s._study_id)[DATA_ATTR]
    assert current["version"] == 2
    s._storage.set_study_system_attr(s._study_id, DATA_ATTR, version1_fingerprint(*raw))  # as an older bnnas stored it

    shutil.rmtree(tmp_path / "cifar")
    write_cifar(tmp_path / "cifar", **cifar, seed=1)  # same shape, classes and sizes; other pixels
    before = snapshot(tmp_path)
    err = refused(capsys, ["--config", "run.yaml", "--trials", "2"])
    old_sha256 = version1_fingerprint(*raw)["sha256"]
    assert err.startswith(f"run.yaml: data.sha256: study 'c' was run with \"{old_sha256[:10]}")
    assert snapshot(tmp_path) == before

    shutil.rmtree(tmp_path / "cifar")
    write_cifar(tmp_path / "cifar", **cifar)  # the data it was searched on
    assert search_main(["--config", "run.yaml", "--trials", "2", "--no-progress"]) == 0
    s = study(tmp_path)
    assert len(s.trials) == 2 and read_config_history(s._storage, s._study_id) == []
    assert s._storage.get_study_system_attrs(s._study_id)[DATA_ATTR] == current  # stored again, in version 2
