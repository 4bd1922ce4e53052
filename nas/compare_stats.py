"""The statistics of a comparison: per-cell intervals, paired tests against the best cell, Holm's correction.

Cells are re-evaluated under the same fresh seeds (seed i draws the same folds and the same
initial weights' seeds for every cell), so they are paired by seed: a cell is compared with
the best one by a paired t-test on the per-seed differences of CV loss (two-sided), and the
p-values of the comparisons are corrected for their number with Holm's step-down method. A
cell whose corrected p is at least `ALPHA` is indistinguishable from the best at this budget.
"""

from __future__ import annotations

import math
import statistics

from scipy import stats

ALPHA = 0.05
TEST = "paired t-test on per-seed CV-loss differences (two-sided), Holm-corrected over the comparisons with the best cell"


def interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and the t-interval of the mean (half-width 0 for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def paired_p(values: dict, best: dict) -> tuple[float, int]:
    """Two-sided paired t-test p-value over the seeds both cells have, and how many they share.

    Identical losses on every shared seed give p = 1 (no evidence of a difference)."""
    seeds = sorted(set(values) & set(best))
    diffs = [values[s] - best[s] for s in seeds]
    if len(seeds) < 2:
        return math.nan, len(seeds)
    if all(d == diffs[0] for d in diffs):
        return (1.0 if diffs[0] == 0 else 0.0), len(seeds)
    return float(stats.ttest_rel([values[s] for s in seeds], [best[s] for s in seeds]).pvalue), len(seeds)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error); NaN stays NaN and does not count."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = list(p_values), 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


def rank_cells(losses: dict[str, dict], accuracies: dict[str, dict]) -> dict[str, dict]:
    """Per cell (label -> {seed: value}): intervals of loss and accuracy, p vs the best, the verdict.

    The best cell has the lowest mean re-evaluated CV loss. Cells without any re-evaluation are left out.
    """
    scored = {label: v for label, v in losses.items() if v}
    if not scored:
        return {}
    best = min(scored, key=lambda label: statistics.fmean(scored[label].values()))
    others = [label for label in scored if label != best]
    raw = [paired_p(scored[label], scored[best]) for label in others]
    adjusted = holm([p for p, _ in raw])
    out = {}
    for label in scored:
        row = {"loss": interval(list(scored[label].values())), "accuracy": interval(list(accuracies[label].values()))}
        if label == best:
            row.update(p=None, p_holm=None, paired_seeds=len(scored[label]), verdict="best")
        else:
            k = others.index(label)
            p, shared = raw[k]
            row.update(p=p, p_holm=adjusted[k], paired_seeds=shared, verdict=_verdict(adjusted[k]))
        out[label] = row
    return out


def _verdict(p_holm: float) -> str:
    if math.isnan(p_holm):
        return "untested"  # fewer than two seeds shared with the best
    return "worse" if p_holm < ALPHA else "indistinguishable"
