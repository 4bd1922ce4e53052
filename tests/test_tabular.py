"""Tabular data end to end: a CSV file written by the test, scikit-learn's bundled tables, standardization with the
training split's statistics, bad tables refused in one line, and the MLP family from search to nas-predict."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

from nas.cli import search_main
from nas.data.datasets import load_dataset
from nas.errors import DataError
from nas.search.config import DatasetConfig

FEATURES = ["age", "dose", "weight"]


def write_table(path: Path, rows: int = 60, seed: int = 0, header=None, cells=None) -> Path:
    """A table whose class (`outcome`: low / high) follows `dose`; `cells` overrides cells by (row, column)."""
    rng = np.random.default_rng(seed)
    header = header or [*FEATURES, "outcome"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for i in range(rows):
            label = "high" if i % 2 else "low"
            values = {
                "age": f"{rng.normal(50, 10):.2f}",
                "dose": f"{rng.normal(100 if label == 'high' else 20, 5):.3f}",
                "weight": f"{rng.normal(70, 15):.1f}",
                "outcome": label,
            }
            for (row, column), value in (cells or {}).items():
                if row == i:
                    values[column] = value
            writer.writerow([values.get(name, "1") for name in header])
    return path


def test_a_csv_table_is_standardized_per_feature_with_the_training_splits_statistics(tmp_path):
    data = load_dataset(DatasetConfig(name="csv", root=str(write_table(tmp_path / "t.csv")), target="outcome"))
    assert data.input_shape == (3,) and data.classes == ["high", "low"]
    assert len(data.y_train) == 48 and len(data.y_test) == 12  # 20 %, stratified
    assert torch.allclose(data.x_train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.x_train.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert len(data.mean) == 3 and data.mean[1] > 40  # dose: the raw mean, per feature
    assert data.raw.columns == tuple(FEATURES) and data.raw.layout == "F"
    again = load_dataset(DatasetConfig(name="csv", root=str(tmp_path / "t.csv"), target="outcome", split_seed=1))
    assert not torch.equal(again.y_test, data.y_test) or not torch.equal(again.x_test, data.x_test)


def test_a_stated_test_file_is_the_test_split_and_may_order_its_columns_differently(tmp_path):
    write_table(tmp_path / "train.csv")
    write_table(tmp_path / "test.csv", rows=10, seed=1, header=["outcome", "weight", "dose", "age"])
    cfg = DatasetConfig(name="csv", root=str(tmp_path / "train.csv"), test_root=str(tmp_path / "test.csv"))
    cfg.target = "outcome"
    data = load_dataset(cfg)
    assert len(data.y_train) == 60 and len(data.y_test) == 10
    raw_test = np.loadtxt(tmp_path / "test.csv", delimiter=",", skiprows=1, usecols=(3, 2, 1))  # age, dose, weight
    expected = (raw_test - np.array(data.mean)) / np.array(data.std)
    assert np.allclose(data.x_test.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize(
    "name, classes, features", [("breast_cancer", 2, 30), ("wine", 3, 13), ("digits_vectors", 10, 64)]
)
def test_the_bundled_tables_load_offline_as_feature_vectors(name, classes, features):
    data = load_dataset(DatasetConfig(name=name))
    assert data.input_shape == (features,) and data.num_classes == classes
    assert len(data.raw.columns) == features


@pytest.mark.parametrize(
    "change, words",
    [
        (
            {"target": "outcom"},
            "dataset.target: {root} has no column 'outcom' (columns: age, dose, weight, outcome); "
            "did you mean 'outcome'?",
        ),
        (
            {"target": "DOSE"},
            "dataset.target: {root} has no column 'DOSE' (columns: age, dose, weight, outcome); did you mean 'dose'?",
        ),
        ({"cells": {(3, "dose"): ""}}, "dataset.root: {root} line 5: column 'dose' is missing a value"),
        ({"cells": {(3, "dose"): "NaN"}}, "dataset.root: {root} line 5: column 'dose' is missing a value"),
        (
            {"cells": {(0, "age"): "inf"}},
            "dataset.root: {root} line 2: column 'age' holds inf (features must be finite)",
        ),
        (
            {"cells": {(7, "weight"): "heavy"}},
            "dataset.root: {root} line 9: column 'weight' holds 'heavy', not a number",
        ),
        ({"constant": True}, "dataset.root: column sex is constant over the training split: drop it"),
        ({"one_class": True}, "dataset.root: the training split has one class only (low)"),
    ],
)
def test_a_bad_table_is_refused_in_one_line_naming_file_column_and_line(tmp_path, change, words):
    root = tmp_path / "t.csv"
    header = [*FEATURES, "sex", "outcome"] if change.get("constant") else None
    write_table(root, header=header, cells=change.get("cells"))
    if change.get("one_class"):
        root.write_text("\n".join(line for line in root.read_text().splitlines() if not line.endswith("high")) + "\n")
    with pytest.raises(DataError) as caught:
        load_dataset(DatasetConfig(name="csv", root=str(root), target=change.get("target", "outcome")))
    assert str(caught.value).startswith(words.format(root=root)), str(caught.value)


def write_run(folder: Path, dataset: dict, space: dict, study: dict | None = None, evaluation: dict | None = None):
    """`space.yaml` and `run.yaml` in `folder`: the dataset, a study in runs/t.db, 2 folds x 1 epoch on the CPU."""
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    config = {
        "dataset": dataset,
        "search_space": "space.yaml",
        "study": {"name": "t", "storage": f"sqlite:///{folder}/runs/t.db", "trials": 1, **(study or {})},
        "evaluation": evaluation or {"folds": 2, "epochs": 1},
        "device": "cpu",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return config


def test_a_bad_table_exits_2_in_one_line_and_writes_no_study(tmp_path, monkeypatch, capsys):
    write_table(tmp_path / "t.csv", cells={(4, "age"): "?"})
    write_run(tmp_path, {"name": "csv", "root": "t.csv", "target": "outcome"}, {"model": "mlp", "layers": 1})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "column 'age' is missing a value" in err and "line 6" in err
    assert not (tmp_path / "runs" / "t.db").exists()


def test_an_mlp_on_images_is_refused_before_any_trial(tmp_path, monkeypatch, capsys):
    write_run(tmp_path, {"name": "digits"}, {"model": "mlp"})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model: mlp takes vectors (F,); the data's samples have shape 1x8x8" in err


def test_the_generated_chain_on_a_table_is_refused_before_any_trial(tmp_path, monkeypatch, capsys):
    write_run(tmp_path, {"name": "wine"}, {"stages": 1, "width": 8})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "space.yaml: model: the data are a table's feature vectors" in err
    assert "use model: mlp" in err and not (tmp_path / "runs" / "t.db").exists()


def run(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m nas COMMAND ARGS...` in a real process."""
    return subprocess.run(
        [sys.executable, "-m", "nas", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_an_mlp_searched_on_a_csv_exports_with_bn_folded_and_predicts_csv_rows_and_arrays(tmp_path):
    write_table(tmp_path / "train.csv", rows=80)
    space = {
        "model": "mlp",
        "layers": 2,
        "width": 16,
        "norm": {"type": "batch", "position": {"choice": ["pre_linear", "post_linear", "post_act"]}},
        "training": {"batch_size": 16},
    }
    dataset = {"name": "csv", "root": "train.csv", "target": "outcome"}
    config = write_run(tmp_path, dataset, space, {"trials": 3, "sampler": "random"}, {"folds": 3, "epochs": 4})
    storage = config["study"]["storage"]
    searched = run("search", "--config", "run.yaml", "--no-progress", cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr
    trials = optuna.load_study(study_name="t", storage=storage).get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert trials and all(t.user_attrs["fold_mode"] == "together" for t in trials)  # the MLP's folds train as one model
    exported = run("export", "--storage", storage, "--study", "t", "--out", "out", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    pre = meta["preprocessing"]
    assert pre["columns"] == FEATURES and pre["target"] == "outcome" and pre["raw_layout"] == "F"
    # Rows to predict: columns in another order, the target column kept; and the same rows as a .npy array.
    write_table(tmp_path / "new.csv", rows=6, seed=5, header=["weight", "outcome", "age", "dose"])
    rows = list(csv.DictReader((tmp_path / "new.csv").open()))
    np.save(tmp_path / "new.npy", np.array([[float(r[c]) for c in FEATURES] for r in rows]))
    outputs = {}
    for runtime in ("eager", "onnx", "ts"):
        predicted = run("predict", "--model", "out", "new.csv", "new.npy", "--runtime", runtime, "--json", cwd=tmp_path)
        assert predicted.returncode == 0, predicted.stderr
        outputs[runtime] = json.loads(predicted.stdout)
    eager = outputs["eager"]
    assert [p["input"] for p in eager[:2]] == ["new.csv[line 2]", "new.csv[line 3]"]
    by_csv, by_npy = eager[:6], eager[6:]
    assert [p["class"] for p in by_csv] == [p["class"] for p in by_npy]
    assert sum(p["class"] == r["outcome"] for p, r in zip(by_csv, rows)) >= 5  # dose separates the classes
    for runtime in ("onnx", "ts"):
        assert [p["class"] for p in outputs[runtime]] == [p["class"] for p in eager]
    # nas-bench times it; nas-finetune adapts it to a shifted table (AdaBN) and writes a verified export again.
    benched = run("bench", "--model", "out", "--batch-sizes", "1,8", "--repeats", "3", cwd=tmp_path)
    assert benched.returncode == 0 and "eager folded" in benched.stdout, benched.stderr
    write_table(tmp_path / "shifted.csv", rows=40, seed=3, cells={(i, "age"): "80" for i in range(0, 40, 3)})
    target = {**config, "dataset": {"name": "csv", "root": "shifted.csv", "target": "outcome"}}
    (tmp_path / "target.yaml").write_text(yaml.safe_dump(target))
    tuned = run(
        "finetune", "--model", "out", "--config", "target.yaml", "--bn-mode", "adabn", "--out", "tuned", cwd=tmp_path
    )
    assert tuned.returncode == 0, tuned.stderr
    assert json.loads((tmp_path / "tuned" / "model.json").read_text())["preprocessing"]["columns"] == FEATURES
    write_table(tmp_path / "wrong.csv", rows=2, header=["age", "dose", "height"])
    refused = run("predict", "--model", "out", "wrong.csv", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "wrong.csv: its columns differ from the training data's: it lacks weight; has extra height" in refused.stderr


def test_an_npz_of_feature_vectors_with_feature_names_is_standardized_per_feature(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal([0, 100, -50], [1, 30, 5], size=(60, 3)).astype(np.float32)
    y = np.arange(60) % 2
    common = {"x_train": x[:50], "y_train": y[:50], "x_test": x[50:], "y_test": y[50:]}
    np.savez(tmp_path / "v.npz", feature_names=np.array(FEATURES), **common)
    np.savez(tmp_path / "s.npz", **common)
    vectors = load_dataset(DatasetConfig(name="npz", root=str(tmp_path / "v.npz")))
    assert torch.allclose(vectors.x_train.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert vectors.raw.columns == tuple(FEATURES) and len(vectors.mean) == 3
    signals = load_dataset(DatasetConfig(name="npz", root=str(tmp_path / "s.npz")))
    assert len(signals.mean) == 1  # without names: one signal channel, as before
    np.savez(tmp_path / "bad.npz", feature_names=np.array(["a", "b"]), **common)
    with pytest.raises(DataError, match="feature_names has shape \\(2,\\)"):
        load_dataset(DatasetConfig(name="npz", root=str(tmp_path / "bad.npz")))


def test_the_study_contract_holds_a_tables_target_and_split_and_older_studies_keep_theirs():
    from nas.study.contract import contract, differences

    table = {"dataset": {"name": "csv", "root": "t.csv", "target": "outcome", "test_fraction": 0.2, "split_seed": 0}}
    terms = contract(table, None)["dataset"]
    assert terms["target"] == "outcome" and terms["test_fraction"] == 0.2 and terms["split_seed"] == 0
    moved = {"dataset": {**table["dataset"], "split_seed": 1}}
    assert [d[0] for d in differences(contract(table, None), contract(moved, None))] == ["dataset.split_seed"]
    older = {"dataset": {"name": "digits"}}  # stored before these keys existed
    now = {"dataset": {"name": "digits", "target": None, "test_root": None, "test_fraction": 0.2, "split_seed": 0}}
    assert differences(contract(older, None), contract(now, None)) == []


def test_a_feature_constant_in_training_keeps_its_scale_so_a_new_value_stays_finite():
    data = load_dataset(DatasetConfig(name="digits_vectors"))
    corner = data.raw.columns.index("pixel_0_0")  # 0 in every training digit
    assert data.std[corner] == pytest.approx(1.0) and data.mean[corner] == 0.0
    assert float(data.x_train[:, corner].abs().max()) == 0.0
