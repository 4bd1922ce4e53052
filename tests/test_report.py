"""`nas-report` on real Optuna studies in SQLite, scored by a synthetic loss instead of training."""

import math
import re

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta

from nas.cli import report_main
from nas.errors import StudyError
from nas.search.archspec import describe_layout, norm_group
from nas.search.space import Space
from nas.study.best_so_far import improvements
from nas.study.report import write_report

SPACE = {
    "stages": {"int": [1, 2]},
    "block": {
        "norm": {"type": {"choice": ["batch", "none"]}, "position": {"choice": ["pre_conv", "post_conv", "post_act"]}}
    },
    "training": {"lr": {"float": [0.001, 0.1], "log": True}},
}
TYPE_COST = {"batch": 0.2, "none": 1.0}
POSITION_COST = {"pre_conv": 0.15, "post_conv": 0.0, "post_act": 0.05}
FAILING_TRIAL = 7


def synthetic_objective(trial: optuna.Trial) -> float:
    """A loss driven by the norm choices and the learning rate, so importances have something to find."""
    spec = Space(SPACE).sample(trial)
    trial.set_user_attr("arch", spec)
    if trial.number == FAILING_TRIAL:
        trial.set_user_attr("fail_reason", "loss is not finite at epoch 2")
        raise ValueError("loss is not finite")
    norm = spec["stages"][0]["blocks"][0]["norm"]
    loss = (
        TYPE_COST[norm["type"]]
        + POSITION_COST.get(norm.get("position"), 0.0)
        + 0.1 * abs(math.log10(spec["training"]["lr"]) + 2)
    )
    bn = norm["type"] == "batch"
    trial.set_user_attr("cv_loss_std", 0.01)
    trial.set_user_attr("cv_accuracy", 1.0 - loss / 2)
    trial.set_user_attr("params", 1000 * len(spec["stages"]))
    trial.set_user_attr("train_mode_loss", loss)
    trial.set_user_attr("eval_mode_loss", loss + (0.1 if bn else 0.0))
    trial.set_user_attr("recalibrated_loss", loss + (0.02 if bn else 0.0))
    return loss


def make_study(path, name: str, n_trials: int, running: bool = False, objective=synthetic_objective) -> str:
    """A SQLite study of `n_trials` scored trials (one FAIL among them when there are enough)."""
    url = f"sqlite:///{path}"
    study = optuna.create_study(storage=url, study_name=name, sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr(
        "run_config",
        {
            "dataset": {"name": "digits"},
            "search_space": "space.yaml",
            "study": {"name": name, "trials": 30},
            "evaluation": {"folds": 3, "epochs": 1},
            "device": "cpu",
            "space": SPACE,
        },
    )
    scratch = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=0)
    )  # in memory, then one write per trial: fast
    scratch.optimize(objective, n_trials=n_trials, catch=(ValueError,))
    study.add_trials(scratch.get_trials())
    if running:  # a search in progress: asked, sampled, never told
        Space(SPACE).sample(study.ask())
    return url


@pytest.fixture(scope="module")
def live_study(tmp_path_factory):
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the planted FAIL trial would log a traceback
    url = make_study(tmp_path_factory.mktemp("db") / "nas.db", "live", 16, running=True)
    return url, optuna.load_study(study_name="live", storage=url)


@pytest.fixture(scope="module")
def report(live_study, tmp_path_factory):
    url, _ = live_study
    out = tmp_path_factory.mktemp("report")
    path = write_report(url, "live", out, top=4)
    return path, path.read_text()


def section(text: str, heading: str) -> str:
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_report_names_the_best_trial_and_its_loss(live_study, report):
    _, study = live_study
    path, text = report
    assert path.name == "report.md"
    assert f"best: trial {study.best_trial.number}, CV loss {study.best_value:.4f}" in text


def test_summary_counts_trials_by_state_and_lists_fail_reasons(report):
    _, text = report
    assert "15 complete, 1 running, 1 fail (17 in all" in text
    assert f"loss is not finite at epoch 2 (trial {FAILING_TRIAL})" in section(text, "Failed trials")
    assert "- dataset: name=digits" in text


def test_every_png_the_report_shows_exists_and_is_a_png(report):
    path, text = report
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(shown) == {
        "history.png",
        "anytime.png",
        "importances.png",
        "norm_type_position.png",
        "bn_diagnostics.png",
    }
    for name in shown:
        data = (path.parent / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert not list(path.parent.glob("*.tmp*")) and not list(path.parent.glob(".*.tmp*"))  # no temporary left


def test_best_so_far_is_plotted_against_wall_time_and_trial_number(live_study, report):
    _, study = live_study
    _, text = report
    points = improvements(study.get_trials())
    assert f"## Best CV loss against wall time\n\n{len(points)} improvements in " in text
    assert f"the last, trial {points[-1][2]} ({points[-1][1]:.4f})" in text and points[-1][1] == study.best_value
    assert "## Optimization history" in text  # against trial number


def test_importances_rate_the_parameters_every_trial_has(report):
    _, text = report
    ranked = [row[1] for row in table_rows(section(text, "Parameter importances"))]
    assert set(ranked) == {"`stages`", "`block.norm.type`", "`training.lr`"}
    assert ranked[0] == "`block.norm.type`"  # it drives the synthetic loss most
    assert "`block.norm.position`" in section(text, "Parameter importances").split("Not rated", 1)[1]
    assert "`nas-compare --factor KEY`" in section(text, "Parameter importances")  # where the fair answer is


def test_type_position_table_has_a_cell_for_each_group_present(live_study, report):
    _, study = live_study
    _, text = report
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    groups = {(t.params["block.norm.type"], t.params.get("block.norm.position", "n/a")) for t in done}
    rows = table_rows(section(text, "CV loss by norm type x position"))
    header = [line for line in section(text, "CV loss by norm type x position").splitlines() if line.startswith("|")][0]
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    filled = {(row[0].strip("*"), columns[i]) for row in rows for i, cell in enumerate(row[1:]) if cell}
    assert filled == groups
    for row in rows:
        for cell in row[1:]:
            assert not cell or re.fullmatch(r"\d+\.\d{4} / \d+\.\d{4} \(\d+\)", cell)


def test_top_table_has_k_rows_best_first_with_the_full_norm_layout(live_study, report):
    _, study = live_study
    _, text = report
    rows = table_rows(section(text, "Top 4 trials"))
    assert len(rows) == 4
    assert rows[0][1] == str(study.best_trial.number)
    losses = [float(row[2].split(" ± ")[0]) for row in rows]
    assert losses == sorted(losses)
    assert rows[0][5] == describe_layout(study.best_trial.user_attrs["arch"])


def test_bn_diagnostics_give_the_median_gap_per_norm_type(report):
    _, text = report
    rows = {row[0]: row for row in table_rows(section(text, "BN diagnostics"))}
    assert rows["**batch**"][2] == "+0.1000" and rows["**none**"][2] == "+0.0000"
    assert rows["**batch**"][3].startswith("-0.0800")


def test_report_is_deterministic_and_leaves_the_study_as_it_was(live_study, report):
    url, study = live_study
    path, text = report
    before = [(t.number, t.state, t.value, t.user_attrs) for t in study.get_trials()]
    again = write_report(url, "live", path.parent, top=4)
    assert again.read_text() == text
    assert [(t.number, t.state, t.value, t.user_attrs) for t in study.get_trials()] == before


@pytest.mark.parametrize("n_complete", [0, 1, 2])
def test_too_few_complete_trials_give_a_report_that_says_so(tmp_path, n_complete):
    url = make_study(tmp_path / "nas.db", "young", n_complete, running=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "importances.png").write_bytes(b"left by an older report")
    text = write_report(url, "young", out).read_text()
    assert "Not enough data" in text
    assert "Importances unavailable: needs at least 3 complete trials" in text and "importances.png not made" in text
    assert not (out / "importances.png").exists()  # a stale plot from an older report is not left to mislead
    if n_complete == 0:
        assert "No complete trials yet; history.png not made" in text
    else:
        assert (out / "history.png").read_bytes().startswith(b"\x89PNG")


def test_a_study_without_diagnostics_says_it_has_none(tmp_path):
    url = make_study(tmp_path / "nas.db", "plain", 4, objective=lambda t: Space(SPACE).sample(t)["training"]["lr"])
    text = write_report(url, "plain", tmp_path / "out").read_text()
    assert "The study has no BN diagnostics" in text and not (tmp_path / "out" / "bn_diagnostics.png").exists()


def test_unknown_study_or_missing_file_is_a_study_error_naming_what_exists(live_study, tmp_path):
    url, _ = live_study
    with pytest.raises(StudyError, match=r"no study named 'nope' .*studies there: live"):
        write_report(url, "nope", tmp_path)
    missing = tmp_path / "absent.db"
    with pytest.raises(StudyError, match="does not exist"):
        write_report(f"sqlite:///{missing}", "live", tmp_path)
    assert not missing.exists()  # reading never creates a database
    garbage = tmp_path / "garbage.db"
    garbage.write_text("not a database")
    with pytest.raises(StudyError, match=r"cannot read study 'live' from sqlite:///"):
        write_report(f"sqlite:///{garbage}", "live", tmp_path)


def test_norm_group_names_mixed_and_residual_layouts():
    block = lambda norm, **extra: {"kernel": 3, "activation": "relu", "dropout": 0.0, "norm": norm, **extra}  # noqa: E731
    bn = {"type": "batch", "position": "post_act", "momentum": 0.1, "eps": 1e-5}
    plain = {"stages": [{"width": 8, "blocks": [block(bn), block(bn)]}]}
    mixed = {"stages": [{"width": 8, "blocks": [block(bn), block({"type": "none"})]}]}
    moved = {"stages": [{"width": 8, "blocks": [block(bn), block({**bn, "position": "pre_conv"})]}]}
    residual = {"stages": [{"width": 8, "blocks": [block(bn, type="residual", residual={"order": "preact"})]}]}
    assert norm_group(plain) == ("batch", "post_act")
    assert norm_group(mixed) == ("mixed", "mixed")
    assert norm_group(moved) == ("batch", "mixed")
    assert norm_group(residual) == ("batch", "residual:preact")
    assert describe_layout(plain) == "s1b1..s1b2 batch@post_act(m=0.1,eps=1e-05)"
    assert describe_layout(mixed) == "s1b1 batch@post_act(m=0.1,eps=1e-05); s1b2 none"


def test_cli_writes_the_report_and_maps_an_unknown_study_to_exit_2(live_study, tmp_path, capsys):
    url, _ = live_study
    study = optuna.load_study(study_name="live", storage=url)
    reports = {meta.artifact_id for meta in get_all_artifact_meta(study)}  # the module's other reports
    assert report_main(["--storage", url, "--study", "live", "--out", str(tmp_path / "r"), "--top", "3"]) == 0
    said = capsys.readouterr()
    assert said.err.strip() == f"wrote {tmp_path / 'r' / 'report.md'}" and said.out == ""  # a status line, no results
    (kept,) = [meta for meta in get_all_artifact_meta(study) if meta.artifact_id not in reports]  # this report's
    assert kept.filename.startswith("report-") and kept.mimetype == "application/zip"
    assert report_main(["--storage", url, "--study", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope" in err


def test_repeats_are_counted_as_repeats_not_as_failures(tmp_path):
    """nas-search records a repeat as FAIL with `duplicate_of` so samplers ignore it; the report must not call it
    a failure."""
    url = make_study(tmp_path / "nas.db", "repeats", 4)
    study = optuna.load_study(study_name="repeats", storage=url)
    repeat = study.ask()
    repeat.set_user_attr("duplicate_of", 0)
    repeat.set_user_attr("fail_reason", "repeat of trial 0 (not trained)")
    study.tell(repeat, state=optuna.trial.TrialState.FAIL)
    text = write_report(url, "repeats", tmp_path / "out").read_text()
    assert "4 complete, 1 repeated (5 in all" in text
    assert section(text, "Failed trials").strip() == "None."
