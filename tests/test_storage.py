"""nas.study.storage: opening a study's storage, one route for every command. A search's storage is refused in one
line naming the path when it cannot be written, and the folder of a new SQLite file is made; reading never
creates a database, and a missing study is named with the studies that exist."""

import importlib.util
import os
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import NORM_AND_LR_SPACE, write_digits_run

import nas.study.storage
from nas.cli import search_main
from nas.errors import StudyError
from nas.study.storage import (
    delete_study_system_attr,
    load_existing_study,
    open_for_search,
    open_to_read,
    quiet_optuna,
    sqlite_path,
    storage_of,
)

SPACE = {"stages": 1, "width": 8, "training": {"lr": 0.05}}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    write_digits_run(
        tmp_path,
        NORM_AND_LR_SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "s", "sampler": "random", "trials": 3, "heartbeat_seconds": 1},
        {"folds": 2, "epochs": 1},
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def storage_url(run_dir) -> str:
    return f"sqlite:///{run_dir}/nas.db"


def make_studies(url: str, *names: str) -> None:
    with quiet_optuna():
        for name in names:
            optuna.create_study(storage=url, study_name=name)


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(StudyError) as raised:
        call(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_sqlite_path_is_the_file_of_a_local_sqlite_url_only(tmp_path):
    assert sqlite_path(f"sqlite:///{tmp_path}/nas.db") == tmp_path / "nas.db"
    assert sqlite_path("sqlite:///runs/nas.db?timeout=5") == sqlite_path("sqlite:///runs/nas.db")
    assert str(sqlite_path("sqlite:///runs/nas.db")) == "runs/nas.db"  # relative to the working folder
    assert sqlite_path("sqlite:///~/nas.db") == Path.home() / "nas.db"
    others = ("sqlite:///:memory:", "sqlite://", "postgresql://u@h/db", "grpc://h:1")
    assert [sqlite_path(url) for url in others] == [None] * 4


def test_storage_of_opens_a_url_to_the_studies_written_through_another_handle(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    make_studies(url, "a", "b")
    assert sorted(s.study_name for s in storage_of(url).get_all_studies()) == ["a", "b"]


def test_open_for_search_makes_the_folder_of_a_new_sqlite_file_and_a_storage_a_search_can_use(tmp_path):
    url = f"sqlite:///{tmp_path}/runs/nas.db"
    storage = open_for_search(url, heartbeat_seconds=1, retries=2)
    assert (tmp_path / "runs").is_dir()
    with quiet_optuna():
        study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2
    assert storage.heartbeat_interval == 1  # a crashed worker's trial goes stale and is retried


@pytest.mark.parametrize("name", ["nas.db", "nas.log"])
def test_a_storage_path_deeper_into_missing_folders_is_refused_as_a_likely_typo_and_nothing_is_made(tmp_path, name):
    path = tmp_path / "tpyo" / "runs" / name
    url = f"sqlite:///{path}" if name.endswith(".db") else str(path)

    message = refusal(open_for_search, url, 1, 0)

    missing = tmp_path / "tpyo"
    assert message == f"study.storage: the folder {missing} does not exist; create it, or check the path of {url} " + (
        "for a typo"
    )
    assert not (tmp_path / "tpyo").exists()


def test_open_for_search_refuses_a_read_only_sqlite_file_in_one_line_naming_it(tmp_path):
    db = tmp_path / "nas.db"
    make_studies(f"sqlite:///{db}", "s")
    db.chmod(0o444)  # no write bit: read-only even for root
    before = db.read_bytes()
    message = refusal(open_for_search, f"sqlite:///{db}", 1, 0, what="--storage")
    assert message == (
        f"--storage: the SQLite file {db} is read-only; make it writable (chmod u+w) or use another --storage"
    )
    assert db.read_bytes() == before


def test_open_for_search_refuses_a_folder_it_cannot_make_and_a_path_that_is_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    assert refusal(open_for_search, f"sqlite:///{tmp_path}/file/sub/nas.db", 1, 0).startswith(
        f"study.storage: cannot create {tmp_path}/file/sub: "
    )
    (tmp_path / "folder.db").mkdir()
    assert refusal(open_for_search, f"sqlite:///{tmp_path}/folder.db", 1, 0) == (
        f"study.storage: {tmp_path}/folder.db is not a file"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_open_for_search_refuses_a_folder_sqlite_cannot_write_its_journal_into(tmp_path):
    db = tmp_path / "runs" / "nas.db"
    db.parent.mkdir()
    make_studies(f"sqlite:///{db}", "s")
    db.parent.chmod(0o555)
    try:
        message = refusal(open_for_search, f"sqlite:///{db}", 1, 0)
    finally:
        db.parent.chmod(0o755)
    assert (
        message
        == f"study.storage: the folder {db.parent} is not writable (SQLite writes its lock or journal beside nas.db)"
    )


def test_open_to_read_refuses_a_missing_sqlite_file_without_creating_it(tmp_path):
    missing = tmp_path / "runs" / "nas.db"
    message = refusal(open_to_read, f"sqlite:///{missing}")
    assert message == f"--storage: {missing} does not exist (start a search with nas-search first)"
    assert not missing.exists() and not missing.parent.exists()


def test_open_to_read_refuses_a_file_that_is_not_sqlite_in_one_line_and_leaves_it_alone(tmp_path):
    garbage = tmp_path / "nas.db"
    garbage.write_bytes(b"not a database\n" * 100)
    message = refusal(open_to_read, f"sqlite:///{garbage}")
    assert message.startswith(f"--storage: cannot read sqlite:///{garbage}: ")
    assert garbage.read_bytes() == b"not a database\n" * 100


def test_open_to_read_reads_and_steers_the_studies_of_a_storage(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    make_studies(url, "a")
    storage = open_to_read(url)
    assert [s.study_name for s in storage.get_all_studies()] == ["a"]
    study_id = storage.get_study_id_from_name("a")
    storage.set_study_system_attr(study_id, "nas:stop_requested_at", 1.0)  # the dashboard's Stop
    assert storage_of(url).get_study_system_attrs(study_id)["nas:stop_requested_at"] == 1.0


def test_a_study_system_attr_is_deleted_from_the_storage(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    make_studies(url, "a")
    storage = storage_of(url)
    study_id = storage.get_study_id_from_name("a")
    storage.set_study_system_attr(study_id, "nas:worker:h:1:0", {"pid": 1})
    storage.set_study_system_attr(study_id, "nas:keep", 1)
    delete_study_system_attr(open_to_read(url), study_id, "nas:worker:h:1:0")  # through Optuna's cache too
    assert storage_of(url).get_study_system_attrs(study_id) == {"nas:keep": 1}


def test_load_existing_study_loads_one_that_exists_and_names_the_others_when_it_does_not(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    make_studies(url, "beta", "alpha")
    study = load_existing_study(url, "alpha")
    assert study.study_name == "alpha" and study.trials == []
    assert refusal(load_existing_study, url, "gamma") == (
        f"--study: no study named 'gamma' in {url} (studies there: alpha, beta)"
    )
    empty = f"sqlite:///{tmp_path}/empty.db"
    open_for_search(empty, 1, 0)  # Optuna's tables, no study
    assert refusal(load_existing_study, empty, "gamma").endswith("(studies there: none)")


def test_load_existing_study_refuses_a_missing_file_without_creating_it_and_names_an_unreadable_one(tmp_path):
    missing = tmp_path / "nas.db"
    assert refusal(load_existing_study, f"sqlite:///{missing}", "s") == (
        f"--study: no study named 's' in sqlite:///{missing} (the file {missing} does not exist)"
    )
    assert not missing.exists()
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    assert refusal(load_existing_study, f"sqlite:///{tmp_path}/notes.db", "s").startswith(
        f"--storage: cannot read study 's' from sqlite:///{tmp_path}/notes.db: "
    )


def test_a_worker_that_loses_the_race_to_create_a_fresh_storages_tables_uses_the_winners(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/nas.db"
    config = write_digits_run(
        tmp_path, SPACE, url, {"name": "race", "sampler": "random", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    real, calls = nas.study.storage.make_storage, []

    def the_other_worker_was_first(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:  # the other pod creates the tables while this one is creating them too
            optuna.storages.RDBStorage(url).engine.dispose()
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE trial_intermediate_values",
                {},
                Exception("table trial_intermediate_values already exists"),
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(nas.study.storage, "make_storage", the_other_worker_was_first)
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    assert len(calls) >= 2
    assert [t.state for t in optuna.load_study(study_name="race", storage=url).get_trials()] == [
        optuna.trial.TrialState.COMPLETE
    ]


def test_a_storage_file_that_is_not_sqlite_is_refused_and_left_alone(run_dir, capsys):
    (run_dir / "notes.db").write_text("not a database\n" * 100)
    before = (run_dir / "notes.db").read_bytes()
    assert search_main(["--config", "run.yaml", "--storage", f"sqlite:///{run_dir}/notes.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "study.storage: cannot open" in err
    assert (run_dir / "notes.db").read_bytes() == before


def test_an_unwritable_storage_path_is_one_line(run_dir, capsys):
    (run_dir / "file").write_text("x")
    assert search_main(["--config", "run.yaml", "--storage", f"sqlite:///{run_dir}/file/sub/nas.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "study.storage" in err


@pytest.mark.parametrize("resume", [False, True])
def test_a_read_only_sqlite_file_is_one_line_and_left_alone(run_dir, capsys, resume):
    assert search_main(["--config", "run.yaml", "--trials", "1", "--epochs", "1", "--no-progress"]) == 0
    db = run_dir / "nas.db"
    db.chmod(0o444)
    before = db.read_bytes()
    capsys.readouterr()
    argv = ["--resume", "--study", "s", "--storage", storage_url(run_dir)] if resume else ["--config", "run.yaml"]
    assert search_main([*argv, "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"study.storage: the SQLite file {db} is read-only; make it writable (chmod u+w) or use another --storage\n"
    )
    assert db.read_bytes() == before


@pytest.mark.parametrize("url", ["foo://x/y", "redis://localhost/0"])
def test_nas_search_refuses_a_storage_url_it_cannot_write_in_one_line(tmp_path, capsys, url):
    write_digits_run(tmp_path, NORM_AND_LR_SPACE, "sqlite:///unused.db", {"name": "s", "trials": 1}, {"epochs": 1})

    code = search_main(["--config", str(tmp_path / "run.yaml"), "--storage", url, "--no-progress"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"cannot open {url}: not a storage URL nas-search writes (sqlite:///FILE, postgresql://" in err


@pytest.mark.parametrize(
    ("url", "package"),
    [("mysql://u:p@localhost/db", "mysqlclient"), ("mysql+pymysql://u:p@localhost/db", "pymysql")],
)
def test_a_missing_database_driver_names_the_package_to_install(tmp_path, capsys, url, package):
    driver = "MySQLdb" if package == "mysqlclient" else package
    if importlib.util.find_spec(driver):
        pytest.skip(f"{driver} is installed here")
    write_digits_run(tmp_path, NORM_AND_LR_SPACE, "sqlite:///unused.db", {"name": "s", "trials": 1}, {"epochs": 1})

    code = search_main(["--config", str(tmp_path / "run.yaml"), "--storage", url, "--no-progress"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"cannot open {url}: its database driver is not installed: pip install {package}" in err
    assert not (tmp_path / "unused.db").exists()
