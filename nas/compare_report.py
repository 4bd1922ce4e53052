"""What `nas-compare` shows and writes: the ranked table, compare.md, compare.json and compare.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

from nas.compare_stats import ALPHA

VERDICTS = {"best": "best", "indistinguishable": "= best", "worse": "worse", "untested": "untested"}


def ranked(result: dict) -> list[dict]:
    """Cells by mean re-evaluated CV loss; cells without a re-evaluation last."""
    return sorted(result["cells"], key=lambda c: (c["stats"] is None, c["stats"]["loss"]["mean"] if c["stats"] else 0.0))


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


def rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The table: one column per factor, then the search's best, the re-evaluation and the verdict."""
    columns = result["columns"]
    header = [*columns.values(), "trials", "search best", "CV loss mean ± sd", "95 % CI", "CV acc mean ± sd", "p (Holm)", "verdict"]
    body = []
    for cell in ranked(result):
        levels = [cell["levels"][name] for name in columns]
        stats = cell["stats"]
        if stats is None:
            body.append([*levels, str(cell.get("trials", 0)), "-", cell["summary"], "", "", "", ""])
            continue
        loss, acc = stats["loss"], stats["accuracy"]
        body.append([*levels, str(cell["trials"]), f"{cell['search_cv_loss']:.4f}", f"{loss['mean']:.4f} ± {loss['sd']:.4f}",
                     f"[{loss['low']:.4f}, {loss['high']:.4f}]", f"{acc['mean']:.4f} ± {acc['sd']:.4f}", _p(stats["p_holm"]),
                     VERDICTS[stats["verdict"]]])
    return header, body


def text_table(result: dict) -> str:
    header, body = rows(result)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *body])


def markdown(result: dict, command: str) -> str:
    header, body = rows(result)
    seeds = len(result["seeds"])
    best = ranked(result)[0]
    lines = [
        "# nas-compare", "",
        f"`{command}`", "",
        f"{result['dataset']}, {result['folds']}-fold CV x {result['epochs']} epochs; each cell searched by `{result['sampler']}` "
        f"for {result['trials_per_cell']} trials (its own study `{result['base_study']}[...]` in `{result['storage']}`), then its best "
        f"spec cross-validated again under {seeds} fresh seeds (the same seeds, so the same folds and initializations, for every cell). "
        f"Intervals: 95 % t-intervals of the mean over the seeds. Test: {result['test']}; `= best` means corrected p >= {ALPHA}.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in body), "",
    ]
    if best["stats"] is not None:
        tied = [c for c in result["cells"] if c["stats"] and c["stats"]["verdict"] == "indistinguishable"]
        names = ", ".join(result["columns"].values())
        lines.append(f"Best ({names}): {best['label']}; {len(tied)} other cell(s) indistinguishable from it at this budget.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Each cell's mean re-evaluated CV loss with its 95 % interval; the best and its equals highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in ranked(result) if c["stats"] is not None][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.4 * len(cells)))
    colors = {"best": "tab:green", "indistinguishable": "tab:olive", "worse": "tab:gray", "untested": "tab:gray"}
    for y, cell in enumerate(cells):
        loss = cell["stats"]["loss"]
        half = 0.0 if math.isnan(loss["high"]) else loss["high"] - loss["mean"]
        ax.errorbar(loss["mean"], y, xerr=half, fmt="o", capsize=3, color=colors[cell["stats"]["verdict"]])
    ax.set_yticks(range(len(cells)), [c["label"] for c in cells], fontsize=8)
    ax.set(xlabel=f"CV loss, mean and 95 % CI over {len(result['seeds'])} seeds", title=f"nas-compare: {', '.join(result['columns'].values())}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, folder: str | Path, command: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "compare.md", folder / "compare.json", folder / "compare.png"]
    paths[0].write_text(markdown(result, command))
    paths[1].write_text(json.dumps({"command": command, **result}, indent=1) + "\n")
    plot(result, paths[2])
    return paths
