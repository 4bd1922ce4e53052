"""The statistics of a comparison: which cells are worse than the best, at a family-wise error of ALPHA.

Every cell is re-evaluated under the same fresh seeds, so each pair of cells is compared by a
paired t-test on its own per-seed differences (a seed's folds and initial weights move both
cells alike). A cell is declared *worse* when it is shown worse than at least one other cell,
Bonferroni-corrected over all k(k-1)/2 pairs: the best cell is picked from the same data, so the
family has to hold every pair the pick could have made (testing only the k-1 pairs with the
picked best, as before, let equal cells be declared worse 12 % of the time at 12 cells).
Each pair keeps its own variance, so cells whose scores scatter differently over seeds (no norm
at batch 32 against BatchNorm) do not borrow each other's: a pooled error term (Tukey's range
in the two-way ANOVA, Hsu's MCB) assumes equal variances (sphericity) and errs far above ALPHA
when they differ. The price is power at few seeds; every cell reports the difference it could
have detected. The same pairwise intervals, simultaneous over all pairs, bound each cell's gap
to the best of the others: mu_i - min_{j != i} mu_j.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy import stats

ALPHA = 0.05
TEST = (
    "paired t-tests on the per-seed CV-loss differences of every pair of cells, Bonferroni-corrected over all "
    "k(k-1)/2 pairs; a cell is worse when it is shown worse than at least one other cell (family-wise error <= "
    "alpha for any number of cells, each pair with its own variance)"
)


def interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and the t-interval of the mean (half-width 0 for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def critical_t(cells: int, seeds: int, alpha: float = ALPHA) -> float:
    """The paired t a pair's difference must exceed: two-sided alpha split over the k(k-1)/2 pairs, n-1 df."""
    return float(stats.t.ppf(1 - alpha / (cells * (cells - 1)), seeds - 1))


def pairwise(table: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-seed difference of cell i minus cell j and its simultaneous half-width (rows cells, columns seeds).

    Tables may be stacked on leading axes (simulations); the diagonal is NaN."""
    k, n = table.shape[-2:]
    diffs = table[..., :, None, :] - table[..., None, :, :]
    mean, sd = diffs.mean(-1), diffs.std(-1, ddof=1)
    half = critical_t(k, n, alpha) * sd / math.sqrt(n)
    diagonal = np.eye(k, dtype=bool)
    return np.where(diagonal, np.nan, mean), np.where(diagonal, np.nan, half)


def worse_than_best(table: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Which cells the test declares worse (the decision rank_cells makes; vectorized for simulations)."""
    mean, half = pairwise(table, alpha)
    return np.nanmax(mean - half, -1) > 0


def rank_cells(losses: dict[str, dict], accuracies: dict[str, dict], alpha: float = ALPHA) -> dict[str, dict]:
    """Per cell (label -> {seed: value}): loss and accuracy intervals, the gap to the best of the others, the verdict.

    The test uses the seeds every re-evaluated cell has (a failed re-evaluation drops that seed for all),
    so all pairs are compared on the same folds and initializations. Cells without any re-evaluation are left out.
    """
    scored = {label: v for label, v in losses.items() if v}
    if not scored:
        return {}
    labels = list(scored)
    shared = sorted(set.intersection(*(set(v) for v in scored.values())))
    k, n = len(labels), len(shared)
    own = [
        statistics.fmean(scored[label][s] for s in shared) if n else statistics.fmean(scored[label].values())
        for label in labels
    ]
    b = int(np.argmin(own))
    testable = k >= 2 and n >= 2
    comparison = {
        "cells": k,
        "pairs": k * (k - 1) // 2,
        "seeds_used": n,
        "alpha": alpha,
        "df": max(n - 1, 0),
        "t": critical_t(k, n, alpha) if testable else math.nan,
        "best_mean": own[b],
    }
    if testable:
        table = np.array([[scored[label][s] for s in shared] for label in labels])
        mean, half = pairwise(table, alpha)
    out = {}
    for i, label in enumerate(labels):
        row = {
            "loss": interval(list(scored[label].values())),
            "accuracy": interval(list(accuracies[label].values())),
            "shared_mean": own[i],
            "paired_seeds": n,
            "comparison": comparison,
        }
        others = [own[j] for j in range(k) if j != i]
        estimate = own[i] - min(others) if others else math.nan
        if testable:
            low, high = np.nanmax(mean[i] - half[i]), np.nanmax(mean[i] + half[i])
            reference = b if i != b else int(np.nanargmax(mean[i]))  # the best, or for the best its runner-up
            margin = float(half[i, reference])
            row.update(
                gap={"estimate": estimate, "low": float(low), "high": float(high)},
                margin=margin,
                # no power: a cell with twice the best's loss could not be told from it
                no_power=bool(margin >= own[b]),
                p=None if i == b else _adjusted_p(table, i, comparison["pairs"]),
            )
            verdict = "worse" if low > 0 else "indistinguishable"
        else:
            row.update(
                gap={"estimate": estimate, "low": math.nan, "high": math.nan},
                margin=math.nan,
                no_power=True,
                p=None if i == b else math.nan,
            )
            verdict = "untested"  # fewer than two cells, or fewer than two seeds shared by the cells
        row["verdict"] = "best" if i == b else verdict
        out[label] = row
    return out


def _adjusted_p(table: np.ndarray, i: int, pairs: int) -> float:
    """The smallest alpha at which cell i is shown worse than some other cell (Bonferroni over all pairs)."""
    best = 1.0
    for j in range(len(table)):
        diffs = table[i] - table[j]
        if j == i or diffs.mean() <= 0:
            continue
        if np.all(diffs == diffs[0]):
            return 0.0  # worse by the same amount on every seed
        best = min(best, float(stats.ttest_1samp(diffs, 0.0).pvalue))
    return min(1.0, pairs * best)
