"""nas-compare's statistics: the stated family-wise error holds for any number of cells and for cells that scatter
differently, real differences are found, the figures match scipy's paired t-test, and the report says what each is."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from nas.compare.report import markdown, restat, text_table
from nas.compare.stats import ALPHA, critical_t, rank_cells, worse_than_best

DRAWS = 4000
SEEDS = 5


def null_tables(rng, cells, draws=DRAWS, seeds=SEEDS, shift=None, noise=0.01):
    """Per-seed losses of `cells` equal cells: a mean, a block effect per seed shared by every cell, and noise."""
    block = rng.normal(0.0, 0.05, (draws, 1, seeds))  # a seed's folds and initializations move every cell alike
    table = 0.2 + block + rng.normal(0.0, 1.0, (draws, cells, seeds)) * np.reshape(noise, (-1, 1))
    if shift is not None:
        table[:, 1:, :] += np.asarray(shift)[:, None]
    return table


def old_procedure(table):
    """The procedure before issue 28: best by mean, paired t-tests against it on the same seeds, Holm-corrected."""
    means = table.mean(-1)
    best = means.argmin(-1)
    rows = np.arange(len(table))
    diffs = table - table[rows, best][:, None, :]
    p = stats.ttest_1samp(diffs, 0.0, axis=-1).pvalue
    p[rows, best] = np.inf  # the best is not tested
    order = np.sort(p, -1)[:, :-1]  # the k-1 comparisons, smallest first
    m = order.shape[-1]
    holm = np.maximum.accumulate(np.minimum(1.0, order * (m - np.arange(m))), -1)
    return (holm < ALPHA).any(-1)


def margin_of_error(rate=ALPHA, draws=DRAWS):
    return 3 * math.sqrt(rate * (1 - rate) / draws)


@pytest.mark.parametrize("cells", [2, 4, 12])
def test_equal_cells_are_declared_worse_at_most_alpha_of_the_time(cells):
    table = null_tables(np.random.default_rng(cells), cells)
    assert worse_than_best(table).any(-1).mean() <= ALPHA + margin_of_error()


def test_equal_cells_that_scatter_differently_are_declared_worse_at_most_alpha_of_the_time():
    # residual SDs as far apart as in compare_norm_small_batch_shifted (BatchNorm ~0.01, no norm at batch 32 ~0.18)
    noise = np.geomspace(0.005, 0.2, 12)
    table = null_tables(np.random.default_rng(5), 12, noise=noise)
    assert worse_than_best(table).any(-1).mean() <= ALPHA + margin_of_error()


def test_the_old_procedure_exceeds_its_alpha_at_12_cells():
    table = null_tables(np.random.default_rng(12), 12)
    assert old_procedure(table).mean() > ALPHA + margin_of_error()


def test_a_real_difference_is_found():
    rng = np.random.default_rng(7)
    table = null_tables(rng, 4, draws=1000, shift=[0.0, 0.0, 0.04])  # one cell 4 noise SDs worse
    worse = worse_than_best(table)
    assert worse[:, 3].mean() > 0.95  # found nearly always
    assert worse[:, 1:3].any(-1).mean() <= ALPHA + margin_of_error(draws=1000)  # the equal ones still are not


def test_rank_cells_makes_the_vectorized_decision():
    table = null_tables(np.random.default_rng(3), 4, draws=20, shift=[0.0, 0.01, 0.02])
    for draw in table:
        losses = {f"c{i}": {str(s): float(v) for s, v in enumerate(row)} for i, row in enumerate(draw)}
        ranked = rank_cells(losses, losses)
        worse = worse_than_best(draw)
        assert [ranked[f"c{i}"]["verdict"] == "worse" for i in range(4)] == list(worse)
        for i in range(4):
            p = ranked[f"c{i}"]["p"]
            assert p is None or (p < ALPHA) == worse[i]  # the adjusted p says the same as the margin


def test_the_critical_value_is_the_published_t_for_two_cells_and_bonferroni_beyond():
    assert critical_t(2, 5) == pytest.approx(2.776, abs=1e-3) and critical_t(2, 2) == pytest.approx(12.706, abs=1e-3)
    assert critical_t(4, 5) == pytest.approx(stats.t.ppf(1 - 0.05 / 12, 4))  # 6 pairs, two-sided


def test_the_adjusted_p_is_scipys_paired_t_test_times_the_pairs():
    rng = np.random.default_rng(2)
    table = rng.normal(0.2, 0.01, (4, 6)) + np.array([[0.0], [0.002], [0.01], [0.03]])
    losses = {f"c{i}": dict(enumerate(row)) for i, row in enumerate(table)}
    ranked = rank_cells(losses, losses)
    for i in range(1, 4):
        below = [j for j in range(4) if table[j].mean() < table[i].mean()]
        p = min(stats.ttest_rel(table[i], table[j]).pvalue for j in below)
        assert ranked[f"c{i}"]["p"] == pytest.approx(min(1.0, 6 * p), rel=1e-6)


def test_two_cells_are_the_two_sided_paired_t_test():
    rng = np.random.default_rng(11)
    a, b = rng.normal(0.2, 0.01, 6), rng.normal(0.21, 0.01, 6)
    losses = {"a": dict(enumerate(a)), "b": dict(enumerate(b))}
    ranked = rank_cells(losses, losses)
    worse = "a" if a.mean() > b.mean() else "b"
    assert ranked[worse]["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-4)


def test_a_missing_seed_is_left_out_for_every_cell():
    losses = {
        "a": {"1": 0.10, "2": 0.12, "3": 0.11, "4": 0.13},
        "b": {"1": 0.11, "2": 0.12, "3": 0.10},  # seed 4 failed
        "c": {"1": 0.30, "2": 0.33, "3": 0.31, "4": 9.0},
    }
    ranked = rank_cells(losses, losses)
    without = rank_cells({k: {s: v for s, v in d.items() if s != "4"} for k, d in losses.items()}, losses)
    assert ranked["a"]["paired_seeds"] == 3 and ranked["c"]["comparison"]["seeds_used"] == 3
    assert ranked["c"]["gap"] == without["c"]["gap"] and ranked["c"]["p"] == without["c"]["p"]
    assert ranked["c"]["loss"]["n"] == 4  # its own mean ± SD still shows every seed it has
    assert ranked["c"]["verdict"] == "worse" and ranked["b"]["verdict"] == "indistinguishable"


def test_one_shared_seed_is_untested():
    losses = {"a": {"1": 0.1, "2": 0.2}, "b": {"1": 0.5, "3": 0.6}}  # one seed in common
    ranked = rank_cells(losses, losses)
    assert ranked["a"]["verdict"] == "best" and ranked["b"]["verdict"] == "untested"


def result_of(losses, seeds, counts=None, exhausted=None):
    """A compare.json-like result around rank_cells, as nas-compare builds it."""
    cells = [
        {
            "label": label,
            "levels": {"type": label},
            "study": f"s[{label}]",
            "trials": 4,
            "search_cv_loss": min(v.values()),
            "losses": v,
            "accuracies": {s: 0.5 for s in v},
            "summary": "",
            **({"counts": counts} if counts else {}),
            "exhausted": exhausted if label == "none" else None,
        }
        for label, v in losses.items()
    ]
    return restat(
        {
            "cells": cells,
            "columns": {"type": "type"},
            "seeds": seeds,
            "dataset": "digits",
            "folds": 3,
            "epochs": 1,
            "sampler": "tpe",
            "trials_per_cell": 4,
            "base_study": "s",
            "storage": "sqlite:///x.db",
        }
    )


def test_two_noisy_seeds_say_no_power_and_show_a_negative_bound_unclipped():
    losses = {"batch": {"1": 0.2, "2": 1.9}, "none": {"1": 2.3, "2": 2.2}}  # chance level: ln 10 = 2.3
    result = result_of(losses, [1, 2])
    none = next(c for c in result["cells"] if c["label"] == "none")
    assert none["stats"]["verdict"] == "indistinguishable" and none["stats"]["no_power"]
    table = text_table(result)
    assert "= best (no power)" in table and "No power" in table
    batch = next(c for c in result["cells"] if c["label"] == "batch")["stats"]["loss"]
    assert batch["low"] < 0 and f"[{batch['low']:.4f}, {batch['high']:.4f}] †" in table  # as computed, marked
    assert "lower bound below 0, which no loss can have (batch)" in table


def test_the_report_labels_every_figure_and_shows_each_cells_budget():
    losses = {"batch": {"1": 0.10, "2": 0.12, "3": 0.11}, "none": {"1": 0.30, "2": 0.33, "3": 0.31}}
    result = result_of(
        losses,
        [1, 2, 3],
        counts={"trained": 3, "pruned": 1, "failed": 2, "repeated": 5},
        exhausted="its search ended with 4/6 candidates finished",
    )
    md = markdown(result, "nas-compare ...")
    assert "| type | trials trained/pruned/failed/repeated | search best | CV loss mean ± SD over seeds |" in md
    assert "| none | 3/1/2/5 ‡ |" in md and "‡ none: short of its budget of 4: its search ended with 4/6" in md
    assert "± is the sample SD over the seeds" in md
    assert "new CV splits and new initial weights of the same training samples, not new data" in md
    margin = next(c for c in result["cells"] if c["label"] == "none")["stats"]["margin"]
    assert f"| {margin:.4f} | <0.001 | worse |" in md and "No power" not in md
    # an older compare.json (no counts) shows its trial count
    old = result_of(losses, [1, 2, 3])
    assert "| batch | 4 |" in markdown(old, "nas-compare ...")
    json.dumps(result)  # what compare.json stores
