"""Bad stored attributes (issue 29.6): any writer of the storage can give an attribute another type. The dashboard
names the attribute, leaves it out and shows the rest of the study; Resume is refused while the run config is bad."""

import re

import optuna
import pytest
from bottle import html_escape
from dashboard_support import Dashboard, make_study

from nas.study.schema import COMPARE_CELL_ATTR, HISTORY_ATTR, RUN_CONFIG_ATTR, STOP_ATTR
from nas.study.storage import quiet_optuna

pytestmark = pytest.mark.system  # starts a dashboard server process

STUDY_ATTRS = {  # study name -> (system attr, how the good value becomes bad, what the page must name)
    "budget-str": (RUN_CONFIG_ATTR, lambda c: c | {"study": c["study"] | {"trials": "5"}}, "key study.trials"),
    "config-list": (RUN_CONFIG_ATTR, lambda c: ["digits"], f"study attr '{RUN_CONFIG_ATTR}': expected a mapping"),
    "study-list": (RUN_CONFIG_ATTR, lambda c: c | {"study": [30]}, "key study.trials: expected a mapping"),
    "beat-str": (
        RUN_CONFIG_ATTR,
        lambda c: c | {"study": c["study"] | {"heartbeat_seconds": "soon"}},
        "key study.heartbeat_seconds",
    ),
    "objectives-str": (RUN_CONFIG_ATTR, lambda c: c | {"objectives": "cv_loss"}, "key objectives: expected a list"),
    "history-dict": (HISTORY_ATTR, lambda _: {"at": "now"}, f"study attr '{HISTORY_ATTR}': expected a list"),
    "history-changes": (HISTORY_ATTR, lambda _: [{"changes": ["folds"]}], f"'{HISTORY_ATTR}'[0].changes[0]"),
    "stop-str": (STOP_ATTR, lambda _: "now", f"study attr '{STOP_ATTR}': expected a number"),
    "worker-str": ("nas:worker:elsewhere:1:2", lambda _: "alive", None),  # liveness skips it: nothing to name
}
TRIAL_ATTRS = {  # study name -> (user attr of the best trial, its bad value, what the page must name after the number)
    "arch-str": ("arch", "conv-bn-relu", ": user attr 'arch': expected a mapping"),
    "arch-no-spec": ("arch", {"stages": "oops"}, ": user attr 'arch': expected an ArchSpec"),
    "accuracy-str": ("cv_accuracy", "high", ": user attr 'cv_accuracy': expected a number"),
    "params-list": ("params", [1, 2], ": user attr 'params': expected an integer"),
    "reason-dict": ("fail_reason", {"why": 1}, ": user attr 'fail_reason': expected a string"),
}
IN_LIST = {RUN_CONFIG_ATTR, STOP_ATTR, "arch", "cv_accuracy"}  # what the list reads (of trials: the best one's)


def clone(store, source: str, name: str, trial_attr: tuple | None = None) -> None:
    """`source` copied as a raw Optuna client may write it: trials (the best one's `trial_attr` set), study attrs."""
    old = optuna.load_study(study_name=source, storage=store)
    new = optuna.create_study(storage=store, study_name=name, directions=old.directions)
    for t in old.get_trials():
        attrs = t.user_attrs | (dict([trial_attr]) if trial_attr and t.number == old.best_trial.number else {})
        new.add_trial(
            optuna.trial.create_trial(
                state=t.state,
                values=t.values,
                params=t.params,
                distributions=t.distributions,
                user_attrs=attrs,
                system_attrs=t.system_attrs,
                intermediate_values=t.intermediate_values,
            )
        )
    for key, value in store.get_study_system_attrs(old._study_id).items():
        store.set_study_system_attr(new._study_id, key, value)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stored")
    url = make_study(folder, "good", trials=2)
    store = optuna.storages.get_storage(url)
    with quiet_optuna():
        for name, (key, bad, _) in STUDY_ATTRS.items():
            clone(store, "good", name)
            study_id = store.get_study_id_from_name(name)
            store.set_study_system_attr(study_id, key, bad(store.get_study_system_attrs(study_id)[RUN_CONFIG_ATTR]))
        for name, (key, value, _) in TRIAL_ATTRS.items():
            clone(store, "good", name, (key, value))
        clone(store, "good", "cell-bad")  # a comparison cell attr of the wrong shape
        cell = store.get_study_id_from_name("cell-bad")
        store.set_study_system_attr(cell, COMPARE_CELL_ATTR, {"factors": ["norm"], "levels": []})
    dash = Dashboard(url, folder / "work")
    dash.best = optuna.load_study(study_name="good", storage=store).best_trial.number
    yield dash
    dash.close()


def named(site, name: str) -> str | None:
    if name in TRIAL_ATTRS:
        return f"trial {site.best}{TRIAL_ATTRS[name][2]}"
    return STUDY_ATTRS[name][2]


def in_list(name: str) -> bool:
    return (STUDY_ATTRS.get(name) or TRIAL_ATTRS.get(name))[0] in IN_LIST


CASES = [*STUDY_ATTRS, *TRIAL_ATTRS]


def test_the_list_names_each_bad_attribute_and_shows_every_study(site):
    """One worker's string `arch` or budget made the study 'unreadable', hiding its trials, best and buttons."""
    status, _, page = site.get("/")
    assert status == 200
    rows = {s["name"]: s for s in site.api("/api/studies")["studies"]}
    good = rows["good"]
    assert good["stored_problems"] == [] and good["state"] == "finished" and good["best_trial"] is not None
    for name in CASES:
        row = rows[name]
        assert row["state"] != "unreadable", (name, row["error"])
        assert row["finished"] == 2, name
        if in_list(name):
            assert any(named(site, name) in line for line in row["stored_problems"]), (name, row["stored_problems"])
            assert html_escape(named(site, name)) in page, name
        else:
            assert row["stored_problems"] == [], name
    assert (
        html_escape(f"study 'cell-bad': study attr '{COMPARE_CELL_ATTR}': expected") in page
    )  # named; the list still came


@pytest.mark.parametrize("name", CASES)
def test_the_study_page_and_api_show_the_rest_of_the_study(site, name):
    links = site.links(name)
    status, _, page = site.get(links["page"])
    assert status == 200
    data = site.api(links["api"])
    assert data["state"] != "unreadable"
    if named(site, name):
        assert html_escape(named(site, name)) in page
        assert any(named(site, name) in line for line in data["stored_problems"])
    good = site.study("good")
    assert [t["number"] for t in data["trials"]] == [t["number"] for t in good["trials"]] == [0, 1]
    assert len(re.findall(r'<tr class="trial-', page)) == 2
    other = 1 - site.best  # the trial that kept every attribute: shown as in the good study
    assert data["trials"][other] == good["trials"][other]
    assert data["history"] == good["history"] and data["norm_grid"]["types"]


@pytest.mark.parametrize("name", [n for n, (key, _, _) in STUDY_ATTRS.items() if key == RUN_CONFIG_ATTR])
def test_resume_is_refused_with_the_reason_while_the_run_config_is_bad(site, name):
    """nas-search --resume cannot read a bad stored config: the button is off and says why, a POST is refused."""
    assert site.study(name)["resumable"] is False
    actions_html = site.get("/")[2].split(f'data-study="{html_escape(name)}"')[1].split("</tr>")[0]
    resume = re.search(r'<button type="submit" data-action="resume" ([^>]*)>', actions_html).group(1)
    assert resume.startswith("disabled") and html_escape(named(site, name)) in resume
    status, body = site.act(name, "resume", {"trials": 3})
    assert status == 409 and named(site, name) in body["error"]
    assert site.study(name)["worker"] is None  # nothing was started


@pytest.mark.parametrize("name", ["arch-str", "arch-no-spec"])
def test_a_bad_arch_of_the_best_trial_refuses_export_best_only(site, name):
    """Only what needs the bad attribute is off: Export best (which rebuilds the arch) says why; Resume stays."""
    data, good = site.study(name), site.study("good")
    assert data["resumable"] is True and data["best_trial"] == good["best_trial"] and data["best_layout"] is None
    assert named(site, name) in data["export_refused"] and good["export_refused"] is None
    status, body = site.act(name, "export")
    assert status == 409 and named(site, name) in body["error"] and site.study(name)["exports"] == []
    assert site.study("accuracy-str")["export_refused"] is None  # another bad attr of the best: its arch still exports
    other = 1 - site.best
    assert data["trials"][site.best]["layout"] == ""
    assert data["trials"][other]["layout"] == good["trials"][other]["layout"] != ""
