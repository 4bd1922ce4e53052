"""What `nas-compare` shows and writes: the ranked table, compare.md, compare.json and compare.png.

Every "±" is the sample SD over the re-evaluation seeds; every interval is labelled with what it is.
`restat` recomputes a stored comparison's statistics from its per-seed scores (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from nas import output
from nas.compare.stats import TEST, rank_cells

VERDICTS = {"best": "best", "indistinguishable": "= best", "worse": "worse", "untested": "untested"}
COUNTS = ("trained", "pruned", "failed", "repeated")
NEGATIVE = "†"  # a loss interval whose lower bound is below 0
SHORT = "‡"  # a cell whose search stopped short of its budget


def ranked(result: dict) -> list[dict]:
    """The best cell first, then by mean CV loss over the seeds the test used; cells without a re-evaluation last."""

    def key(cell):
        stats = cell.get("stats")
        if not stats:
            return (2, 0.0)
        return (stats["verdict"] != "best", stats.get("shared_mean", stats["loss"]["mean"]))

    return sorted(result["cells"], key=key)


def comparison(result: dict) -> dict | None:
    """The comparison-wide figures (seeds used, df, sigma, margin) that every cell's stats carry."""
    stats = [c["stats"] for c in result["cells"] if c.get("stats")]
    return next((s["comparison"] for s in stats if "comparison" in s), None)


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


def _trials(cell: dict) -> str:
    counts = cell.get("counts")
    text = "/".join(str(counts.get(k, 0)) for k in COUNTS) if counts else str(cell.get("trials", 0))
    return text + (f" {SHORT}" if cell.get("exhausted") else "")


def _verdict(stats: dict) -> str:
    text = VERDICTS[stats["verdict"]]
    if stats["verdict"] == "indistinguishable" and stats.get("no_power"):
        text += " (no power)"
    return text


def _gap(stats: dict) -> str:
    gap = stats.get("gap")
    if not gap:
        return ""
    if math.isnan(gap["low"]):
        return f"{gap['estimate']:+.4f}"
    return f"{gap['estimate']:+.4f} [{gap['low']:+.4f}, {gap['high']:+.4f}]"


def _margin(stats: dict) -> str:
    margin = stats.get("margin")
    return "" if margin is None or math.isnan(margin) or stats["verdict"] == "best" else f"{margin:.4f}"


def rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The table: a column per factor, what each cell's study holds, the search's best, the re-evaluation, the test."""
    columns = result["columns"]
    counted = any(c.get("counts") for c in result["cells"])
    header = [
        *columns.values(),
        "trials " + "/".join(COUNTS) if counted else "trials",
        "search best",
        "CV loss mean ± SD over seeds",
        "95 % t-interval of the mean",
        "CV acc mean ± SD over seeds",
        "gap to best of others [95 % simultaneous]",
        "detectable gap",
        "p (adjusted)",
        "verdict",
    ]
    body = []
    for cell in ranked(result):
        levels = [cell["levels"][name] for name in columns]
        stats = cell.get("stats")
        if not stats:
            body.append([*levels, _trials(cell), "-", cell.get("summary", ""), "", "", "", "", "", ""])
            continue
        loss, acc = stats["loss"], stats["accuracy"]
        shown = "-" if math.isnan(loss["low"]) else f"[{loss['low']:.4f}, {loss['high']:.4f}]"
        if loss["low"] < 0:
            shown += f" {NEGATIVE}"
        body.append(
            [
                *levels,
                _trials(cell),
                f"{cell['search_cv_loss']:.4f}",
                f"{loss['mean']:.4f} ± {loss['sd']:.4f}",
                shown,
                f"{acc['mean']:.4f} ± {acc['sd']:.4f}",
                _gap(stats),
                _margin(stats),
                _p(stats.get("p")),
                _verdict(stats),
            ]
        )
    return header, body


def test_line(result: dict) -> str:
    """What the test could detect here: per cell, the gap to the best it had to exceed to be declared worse."""
    comp = comparison(result)
    if comp is None:
        return "No cell was re-evaluated: nothing was tested."
    used = f"the {comp['seeds_used']} seeds all {comp['cells']} re-evaluated cells share (of {len(result['seeds'])})"
    if math.isnan(comp["t"]):
        return f"Untested: {used}; the test needs two cells and two shared seeds."
    stats = [c["stats"] for c in result["cells"] if c.get("stats") and c["stats"]["verdict"] != "best"]
    margins = sorted(s["margin"] for s in stats)
    line = (
        f"Worse = shown worse than at least one other cell by a paired t-test over {used}: |t| > {comp['t']:.3f} "
        f"(two-sided alpha {comp['alpha']} split over {comp['pairs']} pairs, {comp['df']} df). Detectable gap: the "
        f"difference from the best a cell had to exceed to be declared worse, here {margins[0]:.4f} to "
        f"{margins[-1]:.4f}."
    )
    if any(s["no_power"] and s["verdict"] == "indistinguishable" for s in stats):
        line += (
            f" No power: where a cell's detectable gap is at least the best cell's mean loss "
            f"({comp['best_mean']:.4f}), a cell with twice the best's loss could pass as `= best`; there "
            "`= best (no power)` says nothing."
        )
    return line


def footnotes(result: dict) -> list[str]:
    """The marks a table uses, each explained; nothing is clipped."""
    notes = []
    negative = [c["label"] for c in result["cells"] if c.get("stats") and c["stats"]["loss"]["low"] < 0]
    if negative:
        notes.append(
            f"{NEGATIVE} lower bound below 0, which no loss can have ({', '.join(negative)}): the t-interval "
            "assumes normal errors, and with these few seeds its half-width exceeds the mean; it says the "
            "cell's mean is unresolved, not that a negative loss is possible (shown as computed, "
            "not clipped)."
        )
    for cell in result["cells"]:
        if cell.get("exhausted"):
            budget = result["trials_per_cell"]
            notes.append(f"{SHORT} {cell['label']}: short of its budget of {budget}: {cell['exhausted']}")
    return notes


def text_table(result: dict) -> str:
    header, body = rows(result)
    table = output.text_table([header, *body])
    del table[1]  # nas-compare's table has no rule under its header
    return "\n".join([*table, test_line(result), *footnotes(result)])


def markdown(result: dict, command: str) -> str:
    header, body = rows(result)
    seeds = len(result["seeds"])
    counted = any(c.get("counts") for c in result["cells"])
    held = (
        " The trials column counts what each cell's study holds: candidates trained, pruned, failed, and "
        "proposals that repeated an earlier candidate."
        if counted
        else " The trials column counts the trials each cell's study holds."
    )
    lines = [
        "# nas-compare",
        "",
        f"`{command}`",
        "",
        f"{result['dataset']}, {result['folds']}-fold CV x {result['epochs']} epochs; each cell searched by "
        f"`{result['sampler']}` with a budget of {result['trials_per_cell']} finished candidates (its own "
        f"study `{result['base_study']}[...]` in `{result['storage']}`).{held} Then each cell's best spec was "
        f"cross-validated again under {seeds} fresh seeds, the same for every cell, so cells are paired by seed. Fresh "
        "seeds are new CV splits and new initial weights of the same training samples, not new data: the spread "
        "says how a cell's score moves with the split and the initialization, not with another sample of the "
        "population.",
        "",
        "± is the sample SD over the seeds. The 95 % t-interval is of each cell's own mean (per cell, not corrected "
        "for the number of cells). The gap is the cell's mean minus the lowest mean of the other cells, with 95 % "
        "simultaneous intervals (all cells at once).",
        "",
        f"Test: {result.get('test', TEST)}. It assumes each pair's per-seed differences are roughly normal. `= best` "
        "means not shown worse: the cell may be worse by up to its gap's upper bound.",
        "",
        test_line(result),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in body),
        "",
        *(f"{note}\n" for note in footnotes(result)),
    ]
    best = ranked(result)[0]
    if best.get("stats"):
        tied = [c for c in result["cells"] if c.get("stats") and c["stats"]["verdict"] == "indistinguishable"]
        names = ", ".join(result["columns"].values())
        lines.append(f"Best ({names}): {best['label']}; {len(tied)} other cell(s) not shown worse at this budget.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Each cell's gap to the best of the others with its 95 % simultaneous interval, coloured by verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in ranked(result) if c.get("stats") and "gap" in c["stats"]][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.4 * len(cells)))
    colors = {"best": "tab:green", "indistinguishable": "tab:olive", "worse": "tab:gray", "untested": "tab:gray"}
    for y, cell in enumerate(cells):
        gap = cell["stats"]["gap"]
        ends = (0.0, 0.0) if math.isnan(gap["high"]) else (gap["estimate"] - gap["low"], gap["high"] - gap["estimate"])
        color = colors[cell["stats"]["verdict"]]
        ax.errorbar(gap["estimate"], y, xerr=[[ends[0]], [ends[1]]], fmt="o", capsize=3, color=color)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(cells)), [f"{c['label']} ({_verdict(c['stats'])})" for c in cells], fontsize=8)
    comp = comparison(result) or {}
    seeds = comp.get("seeds_used", 0)
    ax.set(
        xlabel=f"CV-loss gap to the best of the other cells, 95 % simultaneous interval ({seeds} seeds)",
        title=f"nas-compare: {', '.join(result['columns'].values())} (right of 0 = worse)",
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def restat(result: dict) -> dict:
    """The stored comparison with its statistics recomputed from each cell's per-seed losses and accuracies."""
    cells = result["cells"]
    ranking = rank_cells(
        {c["label"]: c.get("losses") or {} for c in cells}, {c["label"]: c.get("accuracies") or {} for c in cells}
    )
    return {**result, "test": TEST, "cells": [{**c, "stats": ranking.get(c["label"])} for c in cells]}


def write(result: dict, folder: str | Path, command: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "compare.md", folder / "compare.json", folder / "compare.png"]
    paths[0].write_text(markdown(result, command))
    paths[1].write_text(json.dumps({"command": command, **result}, indent=1) + "\n")
    plot(result, paths[2])
    return paths
