"""Exports kept in Optuna's artifact store beside the study: optuna-dashboard lists them, and nas-export restores an
earlier export of the same trial and settings instead of training it again."""

import json

import optuna
import pytest
from conftest import NORM_AND_LR_SPACE, write_digits_run
from optuna.artifacts import get_all_artifact_meta

from nas.cli import export_main, search_main
from nas.deploy.export import load_exported

pytestmark = pytest.mark.slow


@pytest.fixture
def searched(tmp_path, monkeypatch):
    config = write_digits_run(
        tmp_path,
        NORM_AND_LR_SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "a", "sampler": "random", "trials": 2},
        {"folds": 2, "epochs": 1},
    )
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    return tmp_path


def export(folder, *extra: str) -> int:
    return export_main(["--storage", f"sqlite:///{folder}/nas.db", "--study", "a", "--epochs", "1", *extra])


def test_an_export_is_kept_beside_the_study_and_the_same_export_again_is_restored_not_retrained(
    searched, capsys, monkeypatch
):
    assert export(searched, "--out", "first") == 0
    study = optuna.load_study(study_name="a", storage=f"sqlite:///{searched}/nas.db")
    (kept,) = get_all_artifact_meta(study)
    best = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert kept.filename.startswith(f"export-trial-{best.number}-") and kept.mimetype == "application/zip"
    assert (searched / "nas.db.artifacts" / kept.artifact_id).is_file()
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("the same export was trained again")

    monkeypatch.setattr("nas.training.train.fit", no_training)
    assert export(searched, "--out", "again") == 0
    assert "Restored trial" in capsys.readouterr().err
    first, again = (json.loads((searched / name / "model.json").read_text()) for name in ("first", "again"))
    assert again == first and load_exported(searched / "again").meta["files"] == first["files"]  # sha256s checked
    assert len(get_all_artifact_meta(study)) == 1


def test_other_settings_or_retrain_train_again_and_none_keeps_nothing(searched):
    assert export(searched, "--out", "one") == 0
    assert export(searched, "--out", "two", "--seed", "7") == 0  # another seed: another model
    assert export(searched, "--out", "three", "--retrain") == 0
    assert export(searched, "--out", "four", "--artifacts", "none") == 0
    study = optuna.load_study(study_name="a", storage=f"sqlite:///{searched}/nas.db")
    names = [meta.filename for meta in get_all_artifact_meta(study)]
    assert len(names) == 3 and len(set(names)) == 2  # --retrain kept a second copy of the first


def test_optuna_dashboard_lists_a_kept_export_and_serves_it_under_its_prefix(searched, tmp_path):
    from dashboard_support import Dashboard

    assert export(searched, "--out", "exported") == 0
    storage = f"sqlite:///{searched}/nas.db"
    study = optuna.load_study(study_name="a", storage=storage)
    (kept,) = get_all_artifact_meta(study)
    site = Dashboard(storage, tmp_path / "work")
    try:
        detail = site.api(f"/optuna/api/studies/{study._study_id}")
        status, _, body = site.get(f"/optuna/artifacts/{study._study_id}/{kept.artifact_id}", **site.auth())
        moved, headers, _ = site.get(f"/artifacts/{study._study_id}/{kept.artifact_id}", **site.auth())
    finally:
        site.close()
    assert [a["filename"] for a in detail["artifacts"]] == [kept.filename]
    assert status == 200 and body.startswith("PK")  # the zip itself
    assert moved == 302 and dict(headers)["Location"] == f"/optuna/artifacts/{study._study_id}/{kept.artifact_id}"


def test_a_fine_tuned_export_is_kept_with_the_study_its_source_came_from(searched, tmp_path):
    from nas.cli import finetune_main

    assert export(searched, "--out", "exported") == 0
    target = tmp_path / "target.yaml"
    target.write_text("dataset: {name: digits, transforms: [{contrast: 0.5}]}\ndevice: cpu\n")
    storage = f"sqlite:///{searched}/nas.db"
    args = ["--model", "exported", "--config", str(target), "--bn-mode", "full", "--epochs", "1"]

    assert finetune_main([*args, "--out", "tuned", "--storage", storage]) == 0
    study = optuna.load_study(study_name="a", storage=storage)
    names = sorted(meta.filename for meta in get_all_artifact_meta(study))  # Optuna keeps them in no order
    assert len(names) == 2 and names[1].startswith("finetune-trial-") and "-full-" in names[1]
    assert finetune_main([*args, "--out", "elsewhere", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert not (tmp_path / "elsewhere").exists()  # refused before any training
