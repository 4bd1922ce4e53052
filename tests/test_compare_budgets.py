"""nas-compare shows each cell's budget as it is: what its study holds, a cell that stopped short marked (not a
comparison aborted), a rerun that would keep more trials than it asks for refused, and refusals before anything
trains (several objectives); its storage opened like every other command's (a grpc:// proxy).

Real digits, real SQLite and real nas-compare runs with tiny spaces and budgets."""

import json

import optuna
import pytest
import yaml
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import compare_main
from nas.study.schema import is_duplicate

# batch: 2 candidates (lr); group: 4 (lr x groups): a budget of 3 runs the batch cell's space out
FINITE = {
    "stages": 1,
    "width": 8,
    "block": {
        "norm": {
            "type": {"choice": ["batch", "group"]},
            "position": "post_conv",
            "momentum": 0.1,
            "groups": {"choice": [2, 4]},
        }
    },
    "training": {"lr": {"choice": [0.03, 0.1]}, "batch_size": 32},
}
RUN = ["--config", "run.yaml", "--factor", "block.norm.type", "--seeds", "2", "--no-progress"]


def holdings(storage: str, name: str) -> dict:
    """What the study holds, counted here from its trials' states."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    own = [t for t in trials if not is_duplicate(t)]
    return {
        "trained": sum(t.state == TrialState.COMPLETE for t in own),
        "pruned": sum(t.state == TrialState.PRUNED for t in own),
        "failed": sum(t.state == TrialState.FAIL for t in own),
        "repeated": len(trials) - len(own),
    }


@pytest.fixture(scope="module")
def finite(tmp_path_factory):
    """One comparison of 3 trials per cell where the batch cell has only 2 candidates."""
    folder = tmp_path_factory.mktemp("finite")
    storage = f"sqlite:///{folder}/nas.db"
    write_digits_run(folder, FINITE, storage, {"name": "f", "sampler": "random"}, {"folds": 2, "epochs": 1})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        code = compare_main([*RUN, "--trials-per-cell", "3", "--out", "out"])
    return folder, storage, code, json.loads((folder / "out" / "compare.json").read_text())


def test_each_cell_shows_the_candidates_it_trained_pruned_failed_and_repeated(finite):
    _, storage, code, result = finite
    assert code == 0
    for cell in result["cells"]:
        assert cell["counts"] == holdings(storage, cell["study"])
        assert cell["trials"] == sum(cell["counts"].values())
    group = next(c for c in result["cells"] if c["levels"]["block.norm.type"] == "group")
    assert group["counts"]["trained"] + group["counts"]["pruned"] == 3 and group["exhausted"] is None


def test_a_cell_whose_space_ran_out_is_marked_and_compared(finite, capsys):
    _, _, code, result = finite
    batch = next(c for c in result["cells"] if c["levels"]["block.norm.type"] == "batch")
    assert batch["counts"]["trained"] + batch["counts"]["pruned"] == 2  # its whole space
    assert batch["exhausted"].startswith("Stopped") and batch["stats"] is not None  # said, and still re-evaluated


def test_a_rerun_with_a_smaller_budget_than_a_cell_holds_is_refused_in_one_line(finite, capsys, monkeypatch):
    folder, storage, _, _ = finite
    before = {c: len(optuna.load_study(study_name=c, storage=storage).get_trials()) for c in ("f[batch]", "f[group]")}
    monkeypatch.chdir(folder)
    assert compare_main([*RUN, "--trials-per-cell", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "--trials-per-cell 2: cell study 'f[group]' already holds 3 finished candidates"
    )
    assert {
        c: len(optuna.load_study(study_name=c, storage=storage).get_trials()) for c in before
    } == before  # nothing ran


@pytest.mark.slow
def test_a_cell_stopped_by_failures_in_a_row_is_marked_and_the_others_still_compared(tmp_path, monkeypatch, capsys):
    space = {
        "stages": 1,
        "width": 8,
        "block": {"norm": {"type": "batch"}},
        "training": {"lr": {"float": [0.01, 0.1], "log": True}, "batch_size": 32},
    }
    variants = {
        "sane": {},
        "diverges": {"training.lr": {"float": [1.0e8, 1.0e9], "log": True}},
    }  # its loss is nan at once
    (tmp_path / "variants.yaml").write_text(yaml.safe_dump(variants))
    write_digits_run(
        tmp_path,
        space,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "v", "sampler": "random", "max_consecutive_failures": 2},
        {"folds": 2, "epochs": 1},
    )
    monkeypatch.chdir(tmp_path)
    code = compare_main(
        [
            "--config",
            "run.yaml",
            "--factor",
            "lr=variants.yaml",
            "--trials-per-cell",
            "2",
            "--seeds",
            "2",
            "--no-progress",
            "--out",
            "out",
        ]
    )
    assert code == 0, capsys.readouterr().err
    cells = {c["levels"]["lr"]: c for c in json.loads((tmp_path / "out" / "compare.json").read_text())["cells"]}
    bad, good = cells["diverges"], cells["sane"]
    assert bad["counts"]["trained"] == 0 and bad["counts"]["failed"] >= 2 and bad["exhausted"] and bad["stats"] is None
    assert good["counts"]["trained"] + good["counts"]["pruned"] == 2 and good["exhausted"] is None
    assert good["stats"]["verdict"] == "best"


def one_epoch_run(tmp_path, monkeypatch) -> None:
    """run.yaml in tmp_path (the finite space, random, 2 folds x 1 epoch), the working folder."""
    write_digits_run(
        tmp_path,
        FINITE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "o", "sampler": "random"},
        {"folds": 2, "epochs": 1, "pruner": "none"},
    )
    monkeypatch.chdir(tmp_path)


def test_several_objectives_are_refused_before_any_cell_trains(tmp_path, monkeypatch, capsys):
    one_epoch_run(tmp_path, monkeypatch)
    assert compare_main([*RUN, "--trials-per-cell", "1", "--set", "objectives=[cv_loss, params]"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "--set: objectives: nas-compare searches and ranks cells by cv_loss alone; this config has cv_loss, params "
        "(use objectives: [cv_loss])\n"
    )
    assert not (tmp_path / "nas.db").exists()  # no cell was searched


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("study.budget", "10m", "a time budget"),
        ("study.stop_after", "3", "a stop on stagnation"),
        ("study.warm_start.study", "other", "a warm start"),
    ],
)
def test_what_would_make_cells_unequal_is_refused_before_any_cell_trains(
    tmp_path, monkeypatch, capsys, key, value, what
):
    one_epoch_run(tmp_path, monkeypatch)
    assert compare_main([*RUN, "--trials-per-cell", "1", "--set", f"{key}={value}"]) == 2
    assert capsys.readouterr().err == (
        f"--set: {key}: nas-compare gives every cell exactly --trials-per-cell trials from scratch; {what} would "
        "make the cells differ (leave it out)\n"
    )
    assert not (tmp_path / "nas.db").exists()  # no cell was searched


@pytest.mark.slow
def test_a_comparison_reaches_its_studies_through_a_grpc_proxy(tmp_path, monkeypatch):
    pytest.importorskip("grpc")
    from tests.test_grpc_proxy import start_proxy

    behind = f"sqlite:///{tmp_path}/behind.db"
    proxy, url = start_proxy(behind)
    try:
        write_digits_run(tmp_path, FINITE, url, {"name": "g", "sampler": "random"}, {"folds": 2, "epochs": 1})
        monkeypatch.chdir(tmp_path)
        assert compare_main([*RUN, "--trials-per-cell", "1"]) == 0
        assert compare_main([*RUN, "--trials-per-cell", "1"]) == 0  # the rerun reads what is done through the proxy too
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    names = optuna.get_all_study_names(behind)
    assert sorted(names) == ["g[batch]", "g[group]"]
    assert all(holdings(behind, n)["trained"] == 1 for n in names)
