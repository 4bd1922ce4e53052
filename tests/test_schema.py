"""nas.study.schema on real Optuna studies in SQLite: typed reads of stored attributes (a wrong type is a
StoredAttrError naming where it is), which trials are scored and counted, the run config, the stop request."""

import math
import time

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from nas.errors import StudyError
from nas.study.schema import (
    COMPARE_CELL_ATTR,
    COMPARE_REEVAL_ATTR,
    HISTORY_ATTR,
    LEGACY_RUN_CONFIG_ATTR,
    RUN_CONFIG_ATTR,
    STOP_ATTR,
    SUMMARY_ATTR,
    StoredAttrError,
    budget_count,
    config_value,
    counts_toward_budget,
    is_duplicate,
    is_failure,
    is_scored,
    read_cell,
    read_config_history,
    read_reevaluation,
    read_run_config,
    read_stop_request,
    request_stop,
    scored_trials,
    trial_attr,
    write_run_config,
)
from nas.study.storage import quiet_optuna, storage_of

CONFIG = {"dataset": {"name": "digits"}, "study": {"name": "s", "trials": 4}, "evaluation": {"folds": 2, "epochs": 1}}


def new_study(tmp_path, name: str = "s") -> optuna.Study:
    with quiet_optuna():
        return optuna.create_study(storage=f"sqlite:///{tmp_path}/nas.db", study_name=name)


def stored(study: optuna.Study, **trial) -> optuna.trial.FrozenTrial:
    """`trial` added to the study and read back from the storage (as JSON went in and came out)."""
    study.add_trial(create_trial(**{"state": TrialState.COMPLETE, "value": 1.0, **trial}))
    return study.get_trials()[-1]


def test_trial_attr_returns_the_value_of_its_stored_type_or_the_default(tmp_path):
    trial = stored(
        new_study(tmp_path),
        user_attrs={"params": 1234, "cv_accuracy": 1, "arch": {"stages": []}, "fail_reason": "x", "macs": None},
    )
    assert trial_attr(trial, "params") == 1234
    accuracy = trial_attr(trial, "cv_accuracy")
    assert accuracy == 1.0 and type(accuracy) is float  # an int stored where a number is expected reads as a float
    assert trial_attr(trial, "arch") == {"stages": []} and trial_attr(trial, "fail_reason") == "x"
    assert trial_attr(trial, "cv_loss_std") is None and trial_attr(trial, "cv_loss_std", 0.0) == 0.0  # absent
    assert trial_attr(trial, "macs", -1) == -1  # stored as None: absent


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("params", True, "expected an integer, holds a boolean True"),
        ("params", 12.5, "expected an integer, holds a number 12.5"),
        ("cv_accuracy", "0.9", "expected a number, holds a string '0.9'"),
        ("cv_accuracy", math.nan, "expected a number, holds a number nan"),
        ("arch", ["stages"], "expected a mapping, holds a list ['stages']"),
        ("duplicate_of", "3", "expected an integer, holds a string '3'"),
        ("fail_reason", {"why": "x"}, "expected a string, holds a mapping {'why': 'x'}"),
        ("arch", "x" * 100, "expected a mapping, holds a string '" + "x" * 59 + "…"),
    ],
)
def test_a_trial_attr_of_another_type_is_a_stored_attr_error_naming_trial_and_attr(tmp_path, name, value, expected):
    study = new_study(tmp_path)
    stored(study)
    trial = stored(study, user_attrs={name: value})
    with pytest.raises(StoredAttrError) as raised:
        trial_attr(trial, name)
    assert str(raised.value) == f"trial 1: user attr '{name}': {expected}"
    assert isinstance(raised.value, StudyError)  # the commands' one-line exit 2


def test_only_complete_trials_that_trained_their_own_candidate_with_a_finite_value_are_scored_best_first(tmp_path):
    study = new_study(tmp_path)
    plan = [
        dict(value=0.5),  # 0 scored
        dict(value=0.1, user_attrs={"duplicate_of": 0}),  # 1 a repeat kept COMPLETE by an older nas-search
        dict(state=TrialState.FAIL, value=None, user_attrs={"duplicate_of": 0}),  # 2 a repeat
        dict(state=TrialState.PRUNED, value=None, intermediate_values={0: 0.05}),  # 3 pruned
        dict(state=TrialState.FAIL, value=None, user_attrs={"fail_reason": "loss is nan"}),  # 4 failed
        dict(value=0.3),  # 5 scored, the best
        dict(value=0.5),  # 6 scored, tied with 0: after it
        dict(value=math.inf),  # 7 complete, but its value ranks nowhere
        dict(state=TrialState.RUNNING, value=None),  # 8 still running
    ]
    for trial in plan:
        stored(study, **trial)
    trials = study.get_trials()
    assert [t.number for t in scored_trials(trials)] == [5, 0, 6]
    assert [t.number for t in trials if is_scored(t)] == [0, 5, 6]
    assert [t.number for t in trials if counts_toward_budget(t)] == [0, 3, 5, 6, 7] and budget_count(trials) == 5
    assert [t.number for t in trials if is_duplicate(t)] == [1, 2]
    assert [t.number for t in trials if is_failure(t)] == [4]  # the repeat (2) is FAIL only to keep it from samplers


def test_the_run_config_is_read_from_the_system_attr_or_from_an_older_studys_user_attr(tmp_path):
    study = new_study(tmp_path)
    storage, study_id = study._storage, study._study_id
    assert read_run_config(storage, study_id) is None  # not made by nas-search
    study.set_user_attr(LEGACY_RUN_CONFIG_ATTR, CONFIG)  # where bnnas kept it before `nas:run_config`
    assert read_run_config(storage_of(f"sqlite:///{tmp_path}/nas.db"), study_id) == CONFIG
    newer = {**CONFIG, "study": {"name": "s", "trials": 9}}
    storage.set_study_system_attr(study_id, RUN_CONFIG_ATTR, newer)
    assert read_run_config(storage, study_id) == newer  # the system attr wins


@pytest.mark.parametrize(
    "system, where",
    [(False, "study user attr 'run_config'"), (True, "study attr 'nas:run_config'")],
)
def test_a_run_config_that_is_no_mapping_is_a_stored_attr_error_naming_the_attr(tmp_path, system, where):
    study = new_study(tmp_path)
    if system:
        study._storage.set_study_system_attr(study._study_id, RUN_CONFIG_ATTR, ["digits"])
    else:
        study.set_user_attr(LEGACY_RUN_CONFIG_ATTR, "digits, 3 folds")
    with pytest.raises(StoredAttrError, match=f"^{where}: expected a mapping, holds a "):
        read_run_config(study._storage, study._study_id)


def test_writing_the_run_config_moves_an_older_studys_user_attr_to_the_system_attr(tmp_path):
    study = new_study(tmp_path)
    study.set_user_attr(LEGACY_RUN_CONFIG_ATTR, {"old": True})
    write_run_config(study._storage, study._study_id, CONFIG, {"sha256": "abc"}, "bnnas: digits")
    reread = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/nas.db")
    assert reread.user_attrs == {SUMMARY_ATTR: "bnnas: digits"}  # `optuna studies` shows one short line
    system = reread._storage.get_study_system_attrs(reread._study_id)
    assert system[RUN_CONFIG_ATTR] == CONFIG and system["nas:data"] == {"sha256": "abc"}
    assert read_run_config(reread._storage, reread._study_id) == CONFIG


def test_config_value_reads_one_key_of_a_stored_config_with_its_type():
    assert config_value(CONFIG, "study.trials", int) == 4
    assert config_value(CONFIG, "evaluation.pruner", str, "none") == "none"  # absent: the default
    assert config_value({"objectives": ["cv_loss", "params"]}, "objectives", list) == ["cv_loss", "params"]
    with pytest.raises(StoredAttrError, match=r"key study\.trials: expected an integer, holds a string 'four'"):
        config_value({"study": {"trials": "four"}}, "study.trials", int)
    with pytest.raises(StoredAttrError, match=r"key study\.trials: expected a mapping on the way, holds a string"):
        config_value({"study": "s"}, "study.trials", int)
    with pytest.raises(StoredAttrError, match=r"key objectives: expected a list of names, holds a list \[1\]"):
        config_value({"objectives": [1]}, "objectives", list)


def test_a_config_history_entry_of_another_shape_is_named_by_its_index(tmp_path):
    study = new_study(tmp_path)
    storage, study_id = study._storage, study._study_id
    assert read_config_history(storage, study_id) == []
    good = {"changes": [{"key": "evaluation.folds", "old": 2, "new": 3}]}
    storage.set_study_system_attr(study_id, HISTORY_ATTR, [good])
    assert read_config_history(storage, study_id) == [good]
    storage.set_study_system_attr(study_id, HISTORY_ATTR, [good, {"changes": [{"key": "x"}]}])
    with pytest.raises(
        StoredAttrError, match=r"^study attr 'nas:config_history'\[1\]\.changes\[0\]: expected a mapping of key"
    ):
        read_config_history(storage, study_id)


def test_a_stop_request_round_trips_through_the_storage_as_the_time_it_was_asked(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    study = new_study(tmp_path)
    assert read_stop_request(study._storage, study._study_id) is None
    before = time.time()
    request_stop(url, "s")  # by URL, as the dashboard and scripts do
    after = time.time()
    asked = read_stop_request(storage_of(url), study._study_id)  # any other process reading the storage sees it
    assert before <= asked <= after
    request_stop(study._storage, "s")  # by storage, again: the later time is kept
    assert asked <= read_stop_request(storage_of(url), study._study_id) <= time.time()


def test_a_stop_request_of_another_type_is_a_stored_attr_error(tmp_path):
    study = new_study(tmp_path)
    study._storage.set_study_system_attr(study._study_id, STOP_ATTR, "now")
    with pytest.raises(StoredAttrError, match="^study attr 'nas:stop_requested_at': expected a number, holds a string"):
        read_stop_request(study._storage, study._study_id)


def test_a_compare_cell_and_its_reevaluation_are_read_only_in_the_shape_nas_compare_writes():
    cell = {"factors": ["norm"], "levels": {"norm": "batch"}}
    reeval = {"trial": 3, "seeds": {"1": {"cv_loss": 0.4, "cv_accuracy": 0.9}, "2": {"failed": "loss is nan"}}}
    attrs = {COMPARE_CELL_ATTR: cell, COMPARE_REEVAL_ATTR: reeval}
    assert read_cell(attrs, "c") == cell and read_reevaluation(attrs, "c") == reeval
    assert read_cell({}, "c") is None and read_reevaluation({}, "c") == {}
    with pytest.raises(StoredAttrError, match=r"^study 'c': study attr 'nas:compare:cell': expected"):
        read_cell({COMPARE_CELL_ATTR: {"factors": "norm", "levels": {}}}, "c")
    with pytest.raises(StoredAttrError, match=r"^study 'c': study attr 'nas:compare:reeval': expected"):
        read_reevaluation({COMPARE_REEVAL_ATTR: {"trial": 3, "seeds": {"1": {"cv_loss": "low"}}}}, "c")
