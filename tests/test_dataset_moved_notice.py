"""A continuation whose stored dataset.root / cache / download changed since this host last ran the study says so
(issue 29 §2): whoever can write the storage can rewrite the run config a resume trusts. What this host last saw
is kept in a local file, not in the study the same writer could rewrite."""

import optuna
import pytest
from conftest import write_digits_run

from nas.cli import search_main
from nas.study.schema import RUN_CONFIG_ATTR

SPACE = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}
NOTICE = "since this host last ran it"


@pytest.fixture
def ran(tmp_path, monkeypatch, capsys):
    """Study 'c' run once on this host from its YAML; yields its storage URL."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url = f"sqlite:///{tmp_path}/nas.db"
    write_digits_run(tmp_path, SPACE, url, {"name": "c", "sampler": "random", "trials": 1}, {"folds": 2, "epochs": 1})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0
    assert NOTICE not in capsys.readouterr().err  # the first run on this host has nothing to compare with
    return url


def resume(url: str, capsys) -> list[str]:
    assert search_main(["--resume", "--study", "c", "--storage", url, "--no-progress"]) == 0
    return [line for line in capsys.readouterr().err.splitlines() if NOTICE in line]


def test_a_resume_on_a_stored_config_whose_dataset_was_rewritten_says_so_once(ran, tmp_path, capsys):
    storage = optuna.storages.get_storage(ran)  # a raw Optuna client, as anyone who can write the storage
    study_id = storage.get_study_id_from_name("c")
    config = storage.get_study_system_attrs(study_id)[RUN_CONFIG_ATTR]
    theirs = str(tmp_path / "theirs")
    config["dataset"].update(root="/etc", cache=theirs, download=True)
    storage.set_study_system_attr(study_id, RUN_CONFIG_ATTR, config)

    assert resume(ran, capsys) == [
        f"Study 'c' changed since this host last ran it: dataset.root null -> \"/etc\"; "
        f'dataset.cache "auto" -> "{theirs}"; dataset.download false -> true (a resume '
        "takes these from the study, and whoever can write its storage can rewrite them; "
        "check them)"
    ]
    assert resume(ran, capsys) == []  # this host has now run it so: said once


def test_an_unchanged_resume_says_nothing_and_the_record_names_no_url(ran, tmp_path, capsys):
    assert resume(ran, capsys) == []
    record = (tmp_path / "state" / "bnnas" / "last_seen.json").read_text()
    assert "nas.db" not in record and '"cache": "auto"' in record
