"""Planned contrasts from nas-compare's stored per-seed scores: at each depth and block type, BatchNorm and
LayerNorm against no norm, and BatchNorm against LayerNorm (paired over the 5 seeds every cell shares).

nas-compare's own test corrects over all 276 pairs of 24 cells, which leaves it almost no power at 5 seeds; these
are the 36 comparisons the question is about, with p from paired t-tests, uncorrected and Bonferroni over the 36.
Reads DATASET/compare.json (no training) and writes DATASET/contrasts.md.

    .venv/bin/python experiments/mlp_bn_gradients/contrasts.py breast_cancer
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy import stats

HERE = Path(__file__).parent
PAIRS = (("batch", "none"), ("layer", "none"), ("batch", "layer"))


def main(dataset: str) -> None:
    cells = json.loads((HERE / dataset / "compare.json").read_text())["cells"]
    by_levels = {(c["levels"]["norm.type"], c["levels"]["layers"], c["levels"]["residual"]): c for c in cells}
    depths = sorted({c["levels"]["layers"] for c in cells}, key=int)
    rows = []
    for residual in ("false", "true"):
        for depth in depths:
            for a, b in PAIRS:
                first, second = by_levels[(a, depth, residual)]["losses"], by_levels[(b, depth, residual)]["losses"]
                seeds = sorted(set(first) & set(second))
                diffs = [first[s] - second[s] for s in seeds]
                p = stats.ttest_rel([first[s] for s in seeds], [second[s] for s in seeds]).pvalue
                rows.append((residual, depth, a, b, diffs, p))
    lines = [*cell_table(by_levels, depths, dataset), ""]
    lines += [
        f"# Planned contrasts, {dataset}: CV loss differences paired over seeds",
        "",
        "Each row: the first norm's re-evaluated CV loss minus the second's, mean ± SD over the seeds both cells "
        f"share; p from a paired t-test, uncorrected and Bonferroni-corrected over these {len(rows)} contrasts. "
        "Negative: the first norm is better.",
        "",
        f"| block | depth | contrast | difference mean ± SD | p | p (x {len(rows)}) |",
        "|---|---|---|---|---|---|",
    ]
    for residual, depth, a, b, diffs, p in rows:
        block = "residual" if residual == "true" else "plain"
        spread = statistics.stdev(diffs)
        lines.append(
            f"| {block} | {depth} | {a} - {b} | {statistics.fmean(diffs):+.4f} ± {spread:.4f} | {p:.3g} | "
            f"{min(1.0, p * len(rows)):.3g} |"
        )
    (HERE / dataset / "contrasts.md").write_text("\n".join(lines) + "\n")


def cell_table(by_levels: dict, depths: list[str], dataset: str) -> list[str]:
    """Every cell's re-evaluated CV loss and accuracy, mean ± SD over seeds: norm and block type by depth."""
    lines = [
        f"# CV loss by cell, {dataset}: mean ± SD over seeds (accuracy below)",
        "",
        "| norm | block | " + " | ".join(f"depth {d}" for d in depths) + " |",
        "|---|---|" + "---|" * len(depths),
    ]
    for norm in ("batch", "layer", "none"):
        for residual in ("false", "true"):
            cells = [by_levels[(norm, depth, residual)] for depth in depths]
            texts = []
            for cell in cells:
                losses, accuracies = list(cell["losses"].values()), list(cell["accuracies"].values())
                texts.append(
                    f"{statistics.fmean(losses):.4g} ± {statistics.stdev(losses):.2g}<br>"
                    f"acc {statistics.fmean(accuracies):.3f}"
                )
            lines.append(f"| {norm} | {'residual' if residual == 'true' else 'plain'} | " + " | ".join(texts) + " |")
    return lines


if __name__ == "__main__":
    main(sys.argv[1])
