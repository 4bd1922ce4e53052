"""nas-compare: cells from factors, equal budgets, paired re-evaluations, the tests' arithmetic, and resuming.

End-to-end runs use real digits, real SQLite and real processes, with a tiny space and budget."""

import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import write_digits_run
from optuna.trial import TrialState
from scipy import stats

from nas.cli import compare_main, search_main
from nas.compare.run import key_factor, make_cells, parse_factors, reeval_seeds, used_keys, variant_factor
from nas.compare.stats import interval, rank_cells
from nas.errors import ConfigError
from nas.search.config import load_run_config
from nas.study.schema import COMPARE_REEVAL_ATTR, counts_toward_budget

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {
        "norm": {
            "type": {"choice": ["batch", "group", "none"]},
            "position": {"choice": ["pre_conv", "post_conv"]},
            "momentum": {"float": [0.01, 0.5], "log": True},
            "groups": 4,
        }
    },
    "training": {"lr": {"float": [0.01, 0.1], "log": True}, "batch_size": 32},
}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_digits_run(
        tmp_path, SPACE, f"sqlite:///{tmp_path}/nas.db", {"name": "c", "sampler": "random"}, {"folds": 2, "epochs": 1}
    )
    return tmp_path


def cfg_of(run_dir):
    return load_run_config(run_dir / "run.yaml")


# --- cells ---------------------------------------------------------------------------------------


def test_a_position_is_not_a_cell_of_its_own_where_the_norm_is_none(run_dir):
    cfg = cfg_of(run_dir)
    factors = parse_factors(cfg, ["block.norm.type", "block.norm.position"], [])
    cells = make_cells(cfg.space, factors)
    assert [c.label(factors) for c in cells] == [
        "batch,pre_conv",
        "batch,post_conv",
        "group,pre_conv",
        "group,post_conv",
        "none,n/a",
    ]
    # each cell's space fixes its levels and keeps the rest of the space searchable
    batch_pre = cells[0].space["block"]["norm"]
    assert (batch_pre["type"], batch_pre["position"]) == ("batch", "pre_conv") and "float" in batch_pre["momentum"]


def test_used_keys_follow_the_conditional_space():
    assert "block.norm.momentum" in used_keys({"block": {"norm": {"type": "batch"}}})
    unused = used_keys({"block": {"norm": {"type": "none"}}})
    assert "block.norm.position" not in unused and "block.norm.momentum" not in unused
    assert "block.norm.groups" in used_keys({"block": {"norm": {"type": {"choice": ["batch", "group"]}}}})


def test_levels_pick_values_the_space_allows(run_dir):
    cfg = cfg_of(run_dir)
    factor = key_factor(cfg.space, "space.yaml", "block.norm.momentum", [0.01, 0.1])
    assert factor.levels == ("0.01", "0.1") and factor.overrides["0.1"] == {"block.norm.momentum": 0.1}
    assert parse_factors(cfg, ["block.norm.momentum"], ["block.norm.momentum=1e-2,0.1"])[0].levels == ("0.01", "0.1")
    # a key the space leaves out takes any valid value: affine on / off
    assert key_factor(cfg.space, "space.yaml", "block.norm.affine", [True, False]).levels == ("true", "false")


@pytest.mark.parametrize(
    "factors, levels, says",
    [
        (["block.norm.typ"], [], "block.norm.typ: not a key of the search space; did you mean 'block.norm.type'?"),
        (["block.norm"], [], "block.norm: is a section, not a key"),
        (["block.norm.momentum"], [], "is not a choice in"),
        (["width"], [], "it is the constant 8"),
        (["block.norm.type"], ["block.norm.type=batch,layer"], "layer is not allowed by"),
        (["block.norm.momentum"], ["block.norm.momentum=0.9,0.1"], "0.9 is not allowed by"),
        (["block.norm.type"], ["block.norm.type=batch,batch"], "levels repeat"),
        (["block.norm.type"], ["block.norm.type=none"], "makes 1 cell: a comparison needs at least two"),
        (["block.norm.position"], ["block.norm.position=pre_conv", "block.norm.type=none"], "names no --factor"),
        (["block.norm.type", "block.norm.type"], [], "a factor is given twice"),
    ],
)
def test_bad_factors_exit_2_with_one_line_and_write_nothing(run_dir, capsys, factors, levels, says):
    argv = [
        "--config",
        "run.yaml",
        "--no-progress",
        *(a for f in factors for a in ("--factor", f)),
        *(a for lv in levels for a in ("--levels", lv)),
    ]
    assert compare_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err
    assert not (run_dir / "nas.db").exists()


def test_a_factor_whose_key_no_cell_uses_is_one_cell(run_dir, capsys):
    argv = ["--config", "run.yaml", "--factor", "block.norm.position", "--set", "search_space=none.yaml"]
    (run_dir / "none.yaml").write_text(
        yaml.safe_dump(
            {**SPACE, "block": {"norm": {"type": "none", "position": {"choice": ["pre_conv", "post_conv"]}}}}
        )
    )
    assert compare_main(argv) == 2
    assert "makes 1 cell" in capsys.readouterr().err


def test_named_variants_override_the_space(run_dir):
    (run_dir / "variants.yaml").write_text(
        yaml.safe_dump(
            {
                "bn_only": {"block.norm.type": "batch", "block": {"dropout": 0.0}},
                "dropout_only": {"block": {"norm": {"type": "none"}, "dropout": {"float": [0.1, 0.4]}}},
                "none": {"block.norm.type": "none"},
            }
        )
    )
    factor = variant_factor(run_dir / "variants.yaml", cfg_of(run_dir).space)
    assert factor.name == "variants" and factor.levels == ("bn_only", "dropout_only", "none")
    cells = make_cells(cfg_of(run_dir).space, [factor])
    assert (
        cells[1].space["block"]["dropout"] == {"float": [0.1, 0.4]}
        and cells[1].space["block"]["norm"]["type"] == "none"
    )
    assert cells[0].space["block"]["norm"]["position"] == {
        "choice": ["pre_conv", "post_conv"]
    }  # the rest stays searchable


@pytest.mark.parametrize(
    "variants, says",
    [
        (
            {"a": {"block.norm.kind": "batch"}, "b": {}},
            "variants.yaml: a: block.norm.kind: not a key of the search space",
        ),
        ({"a": {"block.dropout": 1.5}, "b": {}}, "block.dropout"),
        ({"a": {"block.norm.type": "batch"}}, "at least two variant names"),
        ({"a": "batch", "b": {}}, "variants.yaml: a: expected a mapping"),
    ],
)
def test_bad_variants_name_the_file_and_the_variant(run_dir, variants, says):
    (run_dir / "variants.yaml").write_text(yaml.safe_dump(variants))
    with pytest.raises(ConfigError, match=None) as exc:
        variant_factor(run_dir / "variants.yaml", cfg_of(run_dir).space)
    assert says in str(exc.value) and str(run_dir / "variants.yaml") in str(exc.value)


# --- statistics ----------------------------------------------------------------------------------


def test_interval_is_the_t_interval_of_the_mean():
    values = [0.2, 0.25, 0.3, 0.22]
    got = interval(values)
    half = stats.t.ppf(0.975, 3) * stats.tstd(values) / 2
    assert got["mean"] == pytest.approx(0.2425) and got["high"] - got["mean"] == pytest.approx(half)
    assert got["low"] == pytest.approx(got["mean"] - half)


def test_ranking_marks_the_best_and_its_equals():
    losses = {
        "a": {"1": 0.10, "2": 0.12, "3": 0.11, "4": 0.13},
        "b": {"1": 0.11, "2": 0.12, "3": 0.10, "4": 0.14},  # the same as a, seed by seed
        "c": {"1": 0.30, "2": 0.33, "3": 0.31, "4": 0.35},
    }  # clearly worse on every seed
    ranked = rank_cells(losses, {k: {s: 1 - v for s, v in d.items()} for k, d in losses.items()})
    assert ranked["a"]["verdict"] == "best"
    assert ranked["b"]["verdict"] == "indistinguishable" and ranked["c"]["verdict"] == "worse"
    assert ranked["c"]["p"] < 0.05 <= ranked["b"]["p"]  # the adjusted p agrees with the verdicts


def test_reevaluation_seeds_are_fresh_and_shared():
    seeds = reeval_seeds(0, 5)
    assert len(set(seeds)) == 5 and seeds == reeval_seeds(0, 5) and 0 not in seeds
    assert reeval_seeds(1, 5) != seeds


# --- end to end ----------------------------------------------------------------------------------

COMPARE = [
    "--config",
    "run.yaml",
    "--factor",
    "block.norm.type",
    "--levels",
    "block.norm.type=batch,none",
    "--trials-per-cell",
    "2",
    "--seeds",
    "2",
    "--no-progress",
    "--out",
    "out",
]


def norm_type(trial):
    return trial.user_attrs["arch"]["stages"][0]["blocks"][0]["norm"]["type"]


def cell_trials(run_dir, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir}/nas.db").get_trials()


@pytest.mark.slow
def test_a_comparison_gives_equal_budgets_paired_reevaluations_and_its_files(run_dir, capsys):
    assert compare_main(COMPARE) == 0
    printed = capsys.readouterr().err  # the progress lines; the table is stdout's
    assert (
        "Comparison: 2 cells x 2 trials + 2 cells x 2 seeds = 8 trainings (each 2 folds x 1 epochs); 0 done already"
        in printed
    )
    assert "cell 1/2: trial 2/2" in printed and "re-evaluating trial" in printed
    result = json.loads((run_dir / "out" / "compare.json").read_text())
    assert [c["study"] for c in result["cells"]] == ["c[batch]", "c[none]"]
    seeds = [str(s) for s in reeval_seeds(0, 2)]
    for cell in result["cells"]:
        trials = cell_trials(run_dir, cell["study"])
        assert sum(counts_toward_budget(t) for t in trials) == 2  # exactly the same budget in every cell
        assert {norm_type(t) for t in trials} == {cell["levels"]["block.norm.type"]}
        assert sorted(cell["losses"]) == seeds  # the same fresh seeds for every cell
        best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        assert cell["best_trial"] == best.number and cell["search_cv_loss"] == best.value
        assert cell["stats"]["loss"]["mean"] == pytest.approx(sum(cell["losses"].values()) / 2)
    verdicts = sorted(c["stats"]["verdict"] for c in result["cells"])
    assert verdicts[0] == "best" and verdicts[1] in ("indistinguishable", "worse")
    md = (run_dir / "out" / "compare.md").read_text()
    assert (
        "| type | trials trained/pruned/failed/repeated | search best |" in md and "nas-compare --config run.yaml" in md
    )
    assert (run_dir / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_same_command_resumes_without_training_again(run_dir, capsys):
    assert compare_main(COMPARE) == 0
    first = json.loads((run_dir / "out" / "compare.json").read_text())
    capsys.readouterr()
    assert compare_main(COMPARE) == 0
    printed = capsys.readouterr().err
    assert "8 trainings (each 2 folds x 1 epochs); 8 done already" in printed and "re-evaluating" not in printed
    again = json.loads((run_dir / "out" / "compare.json").read_text())
    assert [c["losses"] for c in again["cells"]] == [c["losses"] for c in first["cells"]]
    assert all(len(cell_trials(run_dir, c["study"])) == 2 for c in again["cells"])
    # a cell is a study like any other: nas-search --resume (the dashboard's Resume) continues it within its cell
    assert (
        search_main(
            [
                "--resume",
                "--study",
                "c[batch]",
                "--storage",
                f"sqlite:///{run_dir}/nas.db",
                "--trials",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert [norm_type(t) for t in cell_trials(run_dir, "c[batch]")] == ["batch"] * 3


@pytest.mark.slow
def test_an_interrupted_comparison_resumes_where_it_stopped(run_dir):
    command = [sys.executable, "-m", "nas", "compare", *COMPARE[:-2], "--trials-per-cell", "3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each progress line as it is printed
    proc = subprocess.Popen(command, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # the printed progress is the synchronisation: stop inside the second cell
        if line.startswith("  cell 2/2: trial 1/3"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    first = cell_trials(run_dir, "c[batch]")
    study = optuna.load_study(study_name="c[batch]", storage=f"sqlite:///{run_dir}/nas.db")
    stored = study._storage.get_study_system_attrs(study._study_id)[COMPARE_REEVAL_ATTR]
    assert len(stored["seeds"]) == 2  # the first cell was done, re-evaluations included
    proc = subprocess.run(command, cwd=run_dir, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "done already" in proc.stderr and "cell 1/2: re-evaluating" not in proc.stderr
    assert [t.number for t in cell_trials(run_dir, "c[batch]")] == [
        t.number for t in first
    ]  # nothing of cell 1 ran again
    second = cell_trials(run_dir, "c[none]")
    assert sum(counts_toward_budget(t) for t in second) == 3 and not [
        t for t in second if t.state == TrialState.RUNNING
    ]
