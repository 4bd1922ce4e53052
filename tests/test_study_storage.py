"""Opening a study's storage: two workers starting on one fresh storage both get it (the recipes' pods race)."""

import optuna
import sqlalchemy
from conftest import write_digits_run

import nas.study.storage
from nas.cli import search_main

SPACE = {"stages": 1, "width": 8, "training": {"lr": 0.05}}


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
