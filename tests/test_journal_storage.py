"""A journal file as the study's storage (what `optuna --storage PATH` and optuna-dashboard take): search, resume,
report, export and the dashboard all open it, and Optuna's own CLI reads what bnnas wrote."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import NORM_AND_LR_SPACE, write_digits_run
from dashboard_support import Dashboard

from nas.cli import export_main, report_main, search_main
from nas.study.storage import open_to_read, quiet_optuna, storage_of

pytestmark = pytest.mark.slow


def journal_trials(path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    with quiet_optuna():
        return optuna.load_study(study_name=name, storage=storage).get_trials()


def test_every_command_opens_a_journal_file_and_optunas_cli_reads_it(tmp_path, monkeypatch, capsys):
    journal = tmp_path / "runs" / "nas.log"
    config = write_digits_run(
        tmp_path,
        NORM_AND_LR_SPACE,
        str(journal),
        {"name": "j", "sampler": "random", "trials": 2},
        {"folds": 2, "epochs": 1},
    )
    monkeypatch.chdir(tmp_path)

    assert search_main(["--config", str(config), "--no-progress"]) == 0
    assert [t.state.name for t in journal_trials(journal, "j")] == ["COMPLETE", "COMPLETE"]
    assert search_main(["--resume", "--study", "j", "--storage", str(journal), "--trials", "3", "--no-progress"]) == 0
    assert len(journal_trials(journal, "j")) == 3

    assert report_main(["--storage", str(journal), "--study", "j", "--out", "report"]) == 0
    assert "- trials: 3 complete (3 in all" in (tmp_path / "report" / "report.md").read_text()
    assert export_main(["--storage", str(journal), "--study", "j", "--out", "export", "--epochs", "1"]) == 0
    exported = json.loads((tmp_path / "export" / "model.json").read_text())
    best = min((t for t in journal_trials(journal, "j")), key=lambda t: t.value)
    assert exported["trial"] == best.number

    capsys.readouterr()
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("optuna")), "studies", "--storage", str(journal), "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [s["name"] for s in json.loads(listed.stdout)] == ["j"]

    assert [s.study_name for s in open_to_read(str(journal)).get_all_studies()] == ["j"]
    site = Dashboard(str(journal), tmp_path / "work")
    try:
        row = {s["name"]: s for s in site.api("/api/studies")["studies"]}["j"]
        names = {s["study_name"] for s in site.api("/optuna/api/studies")["study_summaries"]}
    finally:
        site.close()
    assert row["finished"] == 3 and names == {"j"}


def test_a_bare_path_to_a_sqlite_file_opens_it_as_sqlite_as_optuna_dashboard_does(tmp_path):
    db = tmp_path / "nas.db"
    with quiet_optuna():
        optuna.create_study(storage=f"sqlite:///{db}", study_name="s")

    assert isinstance(storage_of(str(db)), optuna.storages.RDBStorage)
    assert [s.study_name for s in open_to_read(str(db)).get_all_studies()] == ["s"]


def test_optuna_storage_stands_in_for_a_storage_not_given_as_for_the_optuna_cli(tmp_path, monkeypatch, capsys):
    journal = tmp_path / "env.log"
    config = write_digits_run(
        tmp_path, NORM_AND_LR_SPACE, "sqlite:///unused.db", {"name": "e", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTUNA_STORAGE", str(journal))

    assert search_main(["--config", str(config), "--no-progress"]) == 0  # over the config's study.storage
    assert len(journal_trials(journal, "e")) == 1 and not (tmp_path / "unused.db").exists()
    assert report_main(["--study", "e", "--out", "report"]) == 0  # a reader's default too
    assert search_main(["--resume", "--study", "e", "--trials", "2", "--no-progress"]) == 0
    assert len(journal_trials(journal, "e")) == 2
    flag = tmp_path / "flag.log"
    assert search_main(["--config", str(config), "--storage", str(flag), "--no-progress"]) == 0  # a flag wins
    assert len(journal_trials(flag, "e")) == 1
