"""nas-export round trip: retrain, fold, save, verify in a fresh process; multi-objective Pareto fronts."""

import json
import subprocess
import sys

import optuna
import pytest
import torch
import yaml

from nas.cli import bench_main, export_main, search_main
from nas.data.datasets import load_dataset
from nas.deploy.export import FILES, load_exported, sha256
from nas.errors import IntegrityError
from nas.models.build import build, count_parameters
from nas.search.config import DatasetConfig
from nas.study.schema import counts_toward_budget

SPACE = {
    "stages": 2,
    "width": 8,
    "block": {
        "norm": {
            "type": {"choice": ["batch", "batch_renorm", "group"]},
            "position": {"choice": ["pre_conv", "post_conv", "post_act"]},
        }
    },
    "training": {"batch_size": 64},
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A small digits study with three trials, made once through the CLI."""
    root = tmp_path_factory.mktemp("export")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    config = {
        "dataset": {"name": "digits"},
        "search_space": str(root / "space.yaml"),
        "study": {"name": "tiny", "storage": f"sqlite:///{root}/nas.db", "sampler": "random", "trials": 3, "seed": 1},
        "evaluation": {"folds": 2, "epochs": 1},
        "device": "cpu",
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert search_main(["--config", str(root / "run.yaml"), "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def exported(study_dir):
    out = study_dir / "exported"
    assert (
        export_main(
            ["--storage", f"sqlite:///{study_dir}/nas.db", "--study", "tiny", "--out", str(out), "--epochs", "2"]
        )
        == 0
    )
    return out


@pytest.mark.slow
def test_export_writes_hashed_files_for_the_best_trial(study_dir, exported):
    meta = json.loads((exported / "model.json").read_text())
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir}/nas.db")
    assert meta["trial"] == study.best_trial.number and meta["arch"] == study.best_trial.user_attrs["arch"]
    assert meta["input_shape"] == [1, 8, 8] and meta["classes"] == [str(i) for i in range(10)]
    assert len(meta["normalization"]["mean"]) == 1 and 0.5 < meta["test"]["accuracy"] <= 1.0
    assert meta["fold_max_abs_diff"] <= 1e-4
    assert {name: sha256(exported / name) for name in (*FILES, "model.onnx")} == meta["files"]
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.slow
def test_exported_files_load_without_the_nas_package_and_match_the_eval_model(exported):
    data = load_dataset(DatasetConfig())
    model = load_exported(exported).model
    with torch.no_grad():
        expected = model(data.x_test)
    torch.save({"x": data.x_test, "expected": expected}, exported.parent / "check.pt")
    script = (
        "import sys; sys.modules['nas'] = None; import torch\n"
        f"d = torch.load({str(exported.parent / 'check.pt')!r}, weights_only=True)\n"
        f"ts = torch.jit.load({str(exported / 'model.ts')!r})\n"
        f"ep = torch.export.load({str(exported / 'model.pt2')!r}).module()\n"
        "for m in (ts, ep):\n"
        "    out = m(d['x'])\n"
        "    print((out - d['expected']).abs().max().item(), (out.argmax(1) == d['expected'].argmax(1)).all().item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.split("\n")[:2]:
        gap, same = line.split()
        assert float(gap) <= 1e-4 and same == "True"


def test_a_changed_file_is_refused_on_load(exported, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in exported.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    weights = torch.load(copy / "weights.pt", weights_only=True)
    next(iter(weights.values())).add_(1.0)
    torch.save(weights, copy / "weights.pt")
    with pytest.raises(IntegrityError, match="sha256"):
        load_exported(copy)


def test_export_of_a_missing_trial_or_study_is_one_line(study_dir, capsys):
    storage = f"sqlite:///{study_dir}/nas.db"
    assert export_main(["--storage", storage, "--study", "tiny", "--trial", "99", "--out", str(study_dir / "x")]) == 2
    assert export_main(["--storage", storage, "--study", "nope", "--out", str(study_dir / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no trial 99" in err[0] and "no study named 'nope'" in err[1]


def refuse_to_train(*args, **kwargs):
    raise AssertionError("training started before --out was checked")


def test_an_out_that_cannot_be_written_fails_before_training(study_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("nas.training.train.fit", refuse_to_train)
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    out = blocker / "sub"  # below a regular file: not writable, even for root

    code = export_main(["--storage", f"sqlite:///{study_dir}/nas.db", "--study", "tiny", "--out", str(out)])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"--out: cannot write to {out}: ") and captured.err.count("\n") == 1  # no "Training"
    assert captured.out == ""
    assert blocker.read_text() == "a regular file"


def test_bench_prints_every_variant_with_ratios(exported, capsys):
    argv = ["--model", str(exported), "--batch-sizes", "1,8", "--repeats", "3", "--warmup", "1"]
    assert bench_main(argv) == 0
    assert "TorchScript folded" not in capsys.readouterr().out  # code files: timed only when trusted
    assert bench_main([*argv, "--trust-code"]) == 0
    out = capsys.readouterr().out
    rows = [
        line
        for line in out.splitlines()
        if line.split("  ")[0] in ("eager unfolded", "eager folded", "TorchScript folded", "torch.export folded")
    ]
    assert len(rows) == 8  # every variant at both batch sizes
    assert all(line.split()[-1] == "1.00" for line in rows if line.startswith("eager unfolded"))
    assert "MACs per sample" in out and "params" in out


def test_multi_objective_search_prints_a_pareto_front_and_exports_any_of_it(study_dir, capsys):
    storage = f"sqlite:///{study_dir}/mo.db"
    args = [
        "--config",
        str(study_dir / "run.yaml"),
        "--storage",
        storage,
        "--study",
        "mo",
        "--sampler",
        "nsga2",
        "--trials",
        "4",
        "--set",
        "objectives=[cv_loss, params]",
        "--no-progress",
    ]
    assert search_main(args) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="mo", storage=storage)
    front = [t for t in study.best_trials if counts_toward_budget(t)]  # a repeated proposal is never listed
    assert len(study.directions) == 2 and front
    assert "Pareto front of 'mo'" in out
    listed = {int(line.split()[0]) for line in out.splitlines() if line[:1].isdigit()}
    by_number = {t.number: t for t in study.get_trials()}
    assert listed == {t.number for t in front}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        scored = by_number[t.user_attrs.get("duplicate_of", t.number)].user_attrs
        # the objective is the folded model's count, kept under its own name; `params` stays the trainable count
        trainable = count_parameters(build(scored["arch"], (1, 8, 8), 10))
        assert t.values[1] == scored["folded_params"] and scored["params"] == trainable
    assert (
        export_main(["--storage", storage, "--study", "mo", "--out", str(study_dir / "mo_out"), "--epochs", "1"]) == 2
    )
    assert "Pareto front" in capsys.readouterr().err
    pick = front[-1].number
    assert (
        export_main(
            [
                "--storage",
                storage,
                "--study",
                "mo",
                "--trial",
                str(pick),
                "--out",
                str(study_dir / "mo_out"),
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    assert json.loads((study_dir / "mo_out" / "model.json").read_text())["trial"] == pick


def test_latency_objective_is_measured_per_candidate(study_dir):
    storage = f"sqlite:///{study_dir}/lat.db"
    args = [
        "--config",
        str(study_dir / "run.yaml"),
        "--storage",
        storage,
        "--study",
        "lat",
        "--trials",
        "2",
        "--set",
        "objectives=[cv_loss, latency_ms, macs]",
        "--set",
        "evaluation.latency_batch_size=8",
        "--no-progress",
    ]
    assert search_main(args) == 0
    for t in optuna.load_study(study_name="lat", storage=storage).get_trials():
        assert t.values[1] == t.user_attrs["latency_ms"] > 0 and t.values[2] == t.user_attrs["macs"] > 0


@pytest.mark.slow
def test_exporting_a_batch_dependent_model_says_what_it_does_at_batch_1(tmp_path, capsys):
    space = {
        "stages": 2,
        "width": 8,
        "block": {"norm": {"type": "batch", "track_running_stats": False}},
        "training": {"batch_size": 32},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = {
        "dataset": {"name": "digits"},
        "search_space": "space.yaml",
        "device": "cpu",
        "evaluation": {"folds": 2, "epochs": 1},
        "study": {"name": "bd", "storage": f"sqlite:///{tmp_path}/nas.db", "sampler": "random", "trials": 1},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert search_main(["--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        export_main(
            [
                "--storage",
                f"sqlite:///{tmp_path}/nas.db",
                "--study",
                "bd",
                "--out",
                str(tmp_path / "out"),
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    note = meta["batch_dependent"]
    assert meta["test"]["batch_size"] == note["scored_batch_size"] == 32
    assert 0.0 <= note["accuracy_at_batch_1"] <= 1.0 and note["samples_at_batch_1"] == 360
    assert (
        "depends on the inputs batched with it" in out
        and f"at batch 1 its accuracy is {note['accuracy_at_batch_1']:.4f}" in out
    )


def test_an_out_that_is_a_file_is_refused_as_not_a_folder(tmp_path):
    from nas.deploy.export import check_writable
    from nas.errors import NasError

    path = tmp_path / "model"
    path.write_text("a file")
    with pytest.raises(NasError, match=r"^--out: .*/model is a file, not a folder; choose a folder for the export$"):
        check_writable(path)
    assert path.read_text() == "a file"
