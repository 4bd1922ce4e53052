"""Plots and tables about a study: which normalization choices mattered.

`write_report(storage, study_name, out_dir)` writes `out_dir/report.md` and the PNGs it shows.
It is meant to be run while a search is still writing the study, so it only reads: one snapshot
of the trials, of which only COMPLETE ones are scored (the others are counted), and never a
write to the study. Everything is sorted and seeded (fANOVA seed 0, fixed jitter), so the same
study gives the same report.md. Plots are drawn offline on matplotlib `Figure` objects (Agg
renderer, no pyplot state) and each PNG is written to a temporary name and renamed, so a reader
never sees half a file.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib
import numpy as np
import optuna
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nas.errors import NasError, StudyError, one_line
from nas.output import atomic_write, atomic_write_text, markdown_table
from nas.search.archspec import (
    FINETUNE_AXES,
    NO_POSITION,
    NORM_ORDER,
    POSITION_ORDER,
    SETTING_ABBREV,
    UNKNOWN,
    describe_activations,
    describe_block_types,
    describe_layout,
    describe_training,
    norm_group,
    order_key,
)
from nas.search.config import StudyConfig
from nas.study.artifacts import keep_folder, open_store
from nas.study.best_so_far import clock, improvements
from nas.study.contract import show
from nas.study.schema import (
    ARCH_ATTR,
    FAIL_REASON_ATTR,
    VERSION_ATTR,
    counts_toward_budget,
    finite,
    is_duplicate,
    is_failure,
    read_config_history,
    read_run_config,
)
from nas.study.storage import load_existing_study, quiet_optuna
from nas.study.workers import describe_workers, live_workers

DPI = 110
MIN_TRIALS = 3  # below this, importances and group comparisons are noise, not data
IMPORTANCE_SEED = 0

# `orientation` replaced `vert` in matplotlib 3.10 (and `vert` warns from 3.11); pyproject allows 3.7.
HORIZONTAL = {"orientation": "horizontal"} if matplotlib.__version_info__ >= (3, 10) else {"vert": False}
PLOT_NAMES = ("history.png", "anytime.png", "importances.png", "norm_type_position.png", "bn_diagnostics.png")
STATE_ORDER = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class Row:
    """One complete trial with the labels the report groups it by."""

    trial: FrozenTrial
    norm_type: str
    position: str

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def loss(self) -> float:
        return self.trial.value

    @property
    def attrs(self) -> dict:
        return self.trial.user_attrs

    @property
    def group(self) -> str:
        return self.norm_type if self.position == NO_POSITION else f"{self.norm_type} @ {self.position}"


def write_report(storage: str, study_name: str, out_dir, top: int = 10, artifacts: str | None = None) -> Path:
    """Write report.md and its PNGs into `out_dir` (created); returns the path of report.md. The folder is also kept
    as a zip artifact of the study (`report-<UTC time>.zip`; `artifacts`: the store's folder, "none" for none;
    default beside a local storage file), so optuna-dashboard shows each report made of the study."""
    if top < 1:
        raise NasError(f"--top: must be at least 1, got {top}")
    study = open_study(storage, study_name)
    trials = study.get_trials(deepcopy=False)  # one snapshot: a live search keeps adding trials
    out = _make_dir(Path(out_dir))
    minimize = study.direction == StudyDirection.MINIMIZE
    rows = complete_rows(trials, minimize)
    plots = Plots(out)
    sections = [
        header(study, storage, trials, rows),
        config_history(study, trials),
        failures(trials),
        history(rows, minimize, plots),
        anytime(trials, minimize, plots),
        importances(rows, study.direction, plots),
        norm_groups(rows, minimize, plots),
        top_table(rows, top),
        bn_diagnostics(rows, plots),
    ]
    path = out / "report.md"
    text = "\n\n".join("\n".join(lines) for lines in sections) + "\n"
    atomic_write_text(path, text)
    plots.remove_stale()
    store = None if artifacts == "none" else open_store(storage, artifacts)
    if store is not None:
        keep_folder(study, store, out, f"report-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.zip")
    return path


# --- reading the study ---------------------------------------------------------------------


def open_study(storage: str, study_name: str) -> optuna.Study:
    """Load a study for reading; a missing study or storage is a StudyError naming what exists."""
    study = load_existing_study(storage, study_name)
    if len(study.directions) != 1:
        raise StudyError(
            f"--study: '{study_name}' has {len(study.directions)} objectives; nas-report reads single-objective studies"
        )
    return study


def _make_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NasError(f"--out: cannot create {path}: {exc.strerror or exc}") from None
    return path


def complete_rows(trials: Iterable[FrozenTrial], minimize: bool = True) -> list[Row]:
    """The COMPLETE trials with a finite value, best first (ties by trial number)."""
    done = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and counts_toward_budget(t) and t.value is not None and np.isfinite(t.value)
    ]
    done.sort(key=lambda t: ((t.value if minimize else -t.value), t.number))
    return [Row(t, *norm_group(t.user_attrs.get(ARCH_ATTR, {}))) for t in done]


# --- writing files -------------------------------------------------------------------------


class Plots:
    """Saves the report's PNGs into one folder and removes the ones a previous report left behind."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.made = out_dir, set()

    def save(self, fig: Figure, name: str, alt: str, caption: str) -> list[str]:
        """Write `fig` as `name`; returns the markdown that shows it with its caption."""
        fig.set_layout_engine("tight")
        atomic_write(self.out_dir / name, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
        self.made.add(name)
        return [f"![{alt}]({name})", "", f"*{caption}*"]

    def remove_stale(self) -> None:
        for name in PLOT_NAMES:
            if name not in self.made:
                with suppress(FileNotFoundError):
                    (self.out_dir / name).unlink()


def _not_made(name: str, reason: str) -> list[str]:
    return [f"*{reason}; {name} not made.*"]


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    return fig, fig.add_subplot()


def _spans_decade(values: Iterable[float]) -> bool:
    """True when positive values span more than 10x: then a log axis shows them better."""
    values = [v for v in values if np.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def _type_colors(types: Iterable[str]) -> dict[str, tuple]:
    """A fixed color per norm type (catalogue order), so the same type has the same color everywhere."""
    cmap = colormaps["tab10"]
    ordered = sorted(set(types), key=order_key(NORM_ORDER))
    return {name: cmap(i % 10) for i, name in enumerate(ordered)}


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --- sections: each returns its markdown lines ---------------------------------------------


def header(study: optuna.Study, storage: str, trials: list[FrozenTrial], rows: list[Row]) -> list[str]:
    counts = Counter(t.state for t in trials if not is_duplicate(t))
    states = [s for s in STATE_ORDER if counts[s]] + sorted(
        (s for s in counts if s not in STATE_ORDER), key=lambda s: s.name
    )
    repeats = sum(map(is_duplicate, trials))
    summary = ", ".join([f"{counts[s]} {s.name.lower()}" for s in states] + [f"{repeats} repeated"] * bool(repeats))
    summary = summary or "none yet"
    lines = [
        f"# Study report: {study.study_name}",
        "",
        f"- storage: `{storage}`",
        f"- direction: {study.direction.name.lower()} (objective: cross-validated validation loss)",
        f"- trials: {summary} ({len(trials)} in all; only complete trials are scored below)",
        f"- workers: {_workers_line(study)}",
    ]
    duplicates = sum(map(is_duplicate, trials))
    if duplicates:
        lines.append(
            f"- duplicates: {duplicates} proposal(s) repeated a finished trial's parameters; recorded without "
            "training, not counted toward the budget and left out below"
        )
    if rows:
        best = rows[0]
        std, acc = best.attrs.get("cv_loss_std"), best.attrs.get("cv_accuracy")
        loss = _loss(best.loss) + (f" ± {std:.4f}" if std is not None else "")
        lines.append(f"- best: trial {best.number}, CV loss {loss}, CV accuracy {_loss(acc)}, norm {best.group}")
    if len(rows) < MIN_TRIALS:
        what = (
            "no complete trials yet" if not rows else f"only {len(rows)} complete trial{'s' if len(rows) > 1 else ''}"
        )
        lines += [
            "",
            f"**Not enough data: {what}.** Importances need at least {MIN_TRIALS}; "
            "rerun nas-report as the search goes on.",
        ]
    config = read_run_config(study._storage, study._study_id)
    if config is not None:
        lines += ["", *run_config_summary(config)]
    return lines


def _workers_line(study: optuna.Study) -> str:
    config = read_run_config(study._storage, study._study_id) or {}
    beat = float(config.get("study", {}).get("heartbeat_seconds", StudyConfig.heartbeat_seconds))
    workers = live_workers(study._storage, study._study_id, 2 * beat)
    return f"{len(workers)} live: {describe_workers(workers)}" if workers else "none live"


def config_history(study: optuna.Study, trials: list[FrozenTrial]) -> list[str]:
    """The forced changes of the study's contract, and how many trials ran under each config version."""
    history = read_config_history(study._storage, study._study_id)
    if not history:
        return [
            "## Config history",
            "",
            "No forced change: every trial ran under the same dataset, data, evaluation, objectives, seed and space.",
        ]
    per_version = Counter(
        t.user_attrs.get(VERSION_ATTR, 0) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    )
    rows = [["0", "(first)", "", "", str(per_version.get(0, 0))]]
    for version, entry in enumerate(history, start=1):
        changes = "; ".join(f"`{c['key']}`: {show(c['old'])} → {show(c['new'])}" for c in entry.get("changes", []))
        rows.append(
            [
                str(version),
                str(entry.get("at", "")),
                str(entry.get("source", "")),
                changes,
                str(per_version.get(version, 0)),
            ]
        )
    return [
        "## Config history",
        "",
        "The study was continued with `--force` after its contract changed; "
        "trials of different versions were scored differently.",
        "",
        *markdown_table(["version", "from", "config", "changes", "finished trials"], rows),
    ]


def run_config_summary(config: dict) -> list[str]:
    """The stored run config in a few lines, the search space folded away."""

    def flat(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k}={flat(v)}" for k, v in value.items())
        return str(value)

    lines = ["## Run config", ""]
    lines += [
        f"- {key}: {flat(config[key])}"
        for key in ("dataset", "search_space", "study", "evaluation", "device")
        if key in config
    ]
    if "space" in config:
        space = yaml.safe_dump(config["space"], sort_keys=False, default_flow_style=None, width=100).rstrip()
        lines += ["", "<details><summary>search space</summary>", "", "```yaml", space, "```", "", "</details>"]
    return lines


def failures(trials: list[FrozenTrial], limit: int = 10) -> list[str]:
    """Failed trials grouped by reason, most frequent first."""
    failed = [t for t in trials if is_failure(t)]  # repeats are FAIL only to keep them from the sampler
    if not failed:
        return ["## Failed trials", "", "None."]
    by_reason: dict[str, list[int]] = {}
    for t in failed:
        reason = one_line(str(t.user_attrs.get(FAIL_REASON_ATTR, ""))) or "no fail_reason recorded"
        by_reason.setdefault(reason[:200], []).append(t.number)
    ordered = sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[1][0]))
    lines = ["## Failed trials", ""]
    for reason, numbers in ordered[:limit]:
        shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
        lines.append(f"- {reason} (trial{'s' if len(numbers) > 1 else ''} {shown})")
    if len(ordered) > limit:
        lines.append(f"- ... and {len(ordered) - limit} more reasons")
    return lines


def history(rows: list[Row], minimize: bool, plots: Plots) -> list[str]:
    lines = ["## Optimization history", ""]
    if not rows:
        return lines + _not_made("history.png", "No complete trials yet")
    ordered = sorted(rows, key=lambda r: r.number)
    numbers, losses = [r.number for r in ordered], [r.loss for r in ordered]
    best = list((np.minimum if minimize else np.maximum).accumulate(losses))
    fig, ax = _figure()
    ax.scatter(numbers, losses, s=18, color="tab:blue", alpha=0.7, label="complete trial")
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    if _spans_decade(losses):
        ax.set_yscale("log")
    ax.set(title="Optimization history", xlabel="trial number", ylabel="CV loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)  # below: never over the points
    return lines + plots.save(
        fig,
        "history.png",
        "optimization history",
        "CV loss of each complete trial by trial number; the red line is the best so far.",
    )


def anytime(trials: list[FrozenTrial], minimize: bool, plots: Plots) -> list[str]:
    """Best CV loss so far against wall time since the study's first trial started."""
    lines = ["## Best CV loss against wall time", ""]
    points = improvements(trials) if minimize else []
    if not points:
        return lines + _not_made("anytime.png", "No complete trials yet" if minimize else "Not a minimized CV loss")
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    first = min(t.datetime_start for t in trials if t.datetime_start)
    total = (max(ends) - first).total_seconds() / 60
    minutes = [at / 60 for at, _, _ in points] + [total]
    values = [value for _, value, _ in points]
    fig, ax = _figure()
    ax.step(minutes, values + values[-1:], where="post", color="tab:red")
    ax.scatter(minutes[:-1], values, s=18, color="tab:red", zorder=3)
    for at, value, number in points:
        ax.annotate(str(number), (at / 60, value), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if _spans_decade(values):
        ax.set_yscale("log")
    ax.set(
        title="Best CV loss against wall time",
        xlabel="minutes since the first trial started (pauses between runs included)",
        ylabel="best CV loss so far",
    )
    ax.grid(alpha=0.3)
    lines.append(
        f"{len(points)} improvements in {clock(total * 60)} (m:ss); the last, trial {points[-1][2]} "
        f"({points[-1][1]:.4f}), came at {clock(points[-1][0])}."
    )
    lines.append("")
    return lines + plots.save(
        fig,
        "anytime.png",
        "best CV loss against wall time",
        "Best CV loss found by each moment of the search; each point is an improvement, "
        "labelled with its trial number.",
    )


def importances(rows: list[Row], direction: StudyDirection, plots: Plots) -> list[str]:
    """fANOVA importances (seed 0) over the parameters every complete trial has."""
    lines = ["## Parameter importances", ""]
    values, reason = _fanova(rows, direction)
    if values is None:
        return lines + _not_made("importances.png", f"Importances unavailable: {reason}")
    rated = list(values.items())
    every_param = sorted({name for r in rows for name in r.trial.params})
    left_out = [name for name in every_param if name not in values]
    lines += [
        f"fANOVA (optuna `FanovaImportanceEvaluator(seed={IMPORTANCE_SEED})`) over {len(rows)} complete trials. "
        "It covers only parameters present in every complete trial: conditional ones "
        "(e.g. `block.norm.position`, absent when `block.norm.type` is `none`) are left out. "
        "They rate the trials this sampler chose to run, which a sampler such as TPE spends unequally: for a fair, "
        'equal-budget answer to "does this choice matter?" run `nas-compare --factor KEY` (one study per level, '
        "re-evaluated over fresh seeds, with intervals and tests).",
        "",
        *markdown_table(
            ["rank", "parameter", "importance"],
            [[str(i + 1), f"`{name}`", f"{v:.3f}"] for i, (name, v) in enumerate(rated)],
        ),
    ]
    if left_out:
        lines += ["", "Not rated (absent from some complete trials): " + ", ".join(f"`{n}`" for n in left_out) + "."]
    fig, ax = _figure(7.0, 1.2 + 0.35 * len(rated))
    names, shares = [n for n, _ in rated][::-1], [v for _, v in rated][::-1]
    ax.barh(names, shares, color="tab:blue")
    for y, v in enumerate(shares):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set(
        title="Parameter importances (fANOVA, seed 0)",
        xlabel="share of CV-loss variance",
        xlim=(0, max(shares) * 1.15 or 1),
    )
    return (
        lines
        + [""]
        + plots.save(
            fig,
            "importances.png",
            "parameter importances",
            "Share of CV-loss variance each parameter explains (fANOVA).",
        )
    )


def _fanova(rows: list[Row], direction: StudyDirection) -> tuple[dict | None, str]:
    """Importances on an in-memory copy of the complete trials: the snapshot we report, untouched study."""
    if len(rows) < MIN_TRIALS:
        return None, f"needs at least {MIN_TRIALS} complete trials, the study has {len(rows)}"
    if len({r.loss for r in rows}) == 1:
        return None, "every complete trial has the same CV loss"
    with quiet_optuna():
        copy = optuna.create_study(direction=direction)
        copy.add_trials([r.trial for r in sorted(rows, key=lambda r: r.number)])
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
            values = optuna.importance.get_param_importances(copy, evaluator=evaluator)
        except (RuntimeError, ValueError) as exc:
            return None, one_line(exc)
    if not values:
        return None, "no parameter is present in every complete trial"
    return {name: float(v) for name, v in values.items()}, ""


def norm_groups(rows: list[Row], minimize: bool, plots: Plots) -> list[str]:
    """CV loss by norm type x position: a table of best / median (n) and a box plot per group."""
    first, second = _axes(rows)
    lines = [f"## CV loss by {first} x {second}", ""]
    if not rows:
        return lines + _not_made("norm_type_position.png", "No complete trials yet")
    best = min if minimize else max
    types = sorted({r.norm_type for r in rows}, key=order_key(NORM_ORDER))
    positions = sorted({r.position for r in rows}, key=order_key(POSITION_ORDER))
    cells = []
    for kind in types:
        cell_row = [f"**{kind}**"]
        for where in positions:
            losses = [r.loss for r in rows if (r.norm_type, r.position) == (kind, where)]
            cell_row.append(f"{best(losses):.4f} / {statistics.median(losses):.4f} ({len(losses)})" if losses else "")
        cells.append(cell_row)
    lines += [
        "Cells: best / median CV loss (number of complete trials). A trial whose blocks differ is counted as `mixed` "
        "on that axis; residual blocks take their ordering (`residual:original` / `residual:preact`) as position.",
        "",
        *markdown_table([f"{first} \\ {second}", *positions], cells),
        "",
    ]
    return lines + _group_plot(rows, minimize, plots)


def _axes(rows: list[Row]) -> tuple[str, str]:
    """What the groups are by: norm type x position; BN mode x statistics for a study fine-tuning a checkpoint."""
    tuning = rows and all("finetune" in r.attrs.get(ARCH_ATTR, {}) for r in rows)
    return FINETUNE_AXES if tuning else ("norm type", "position")


def _group_plot(rows: list[Row], minimize: bool, plots: Plots) -> list[str]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    sign = 1 if minimize else -1
    order = sorted(groups, key=lambda g: (sign * statistics.median(r.loss for r in groups[g]), g))
    colors = _type_colors(r.norm_type for r in rows)
    fig, ax = _figure(7.5, 1.4 + 0.45 * len(order))
    data = [[r.loss for r in groups[g]] for g in order]
    ax.boxplot(
        data,
        widths=0.6,
        **HORIZONTAL,
        showfliers=False,
        medianprops={"color": "black"},
        boxprops={"color": "0.4"},
        whiskerprops={"color": "0.4"},
        capprops={"color": "0.4"},
    )
    jitter = np.random.default_rng(0)
    for y, g in enumerate(order, start=1):
        losses = [r.loss for r in groups[g]]
        ax.scatter(
            losses,
            y + jitter.uniform(-0.15, 0.15, len(losses)),
            s=16,
            alpha=0.8,
            color=colors[groups[g][0].norm_type],
            zorder=3,
        )
    ax.set_yticks(range(1, len(order) + 1), labels=[f"{g}  (n={len(groups[g])})" for g in order])
    ax.invert_yaxis()  # best median on top
    if _spans_decade(r.loss for r in rows):
        ax.set_xscale("log")
    first, second = _axes(rows)
    ax.set(title=f"CV loss by {first} @ {second} (best median on top)", xlabel="CV loss", ylabel=f"{first} @ {second}")
    ax.grid(axis="x", alpha=0.3)
    return plots.save(
        fig,
        "norm_type_position.png",
        "CV loss by norm type and position",
        "CV loss per norm type @ position: box = quartiles, dots = trials, sorted by median.",
    )


def top_table(rows: list[Row], k: int) -> list[str]:
    lines = [f"## Top {k} trials", ""]
    if not rows:
        return lines + ["No complete trials yet."]
    table = []
    for rank, r in enumerate(rows[:k], start=1):
        arch, attrs = r.attrs.get(ARCH_ATTR, {}), r.attrs
        std, acc, params = attrs.get("cv_loss_std"), attrs.get("cv_accuracy"), attrs.get("params")
        loss = _loss(r.loss) + (f" ± {std:.4f}" if std is not None else "")
        table.append(
            [
                str(rank),
                str(r.number),
                loss,
                _loss(acc),
                f"{params:,}" if isinstance(params, int) else UNKNOWN,
                describe_layout(arch),
                describe_activations(arch),
                describe_block_types(arch),
                describe_training(arch),
            ]
        )
    legend = ", ".join(f"{short}={name}" for name, short in SETTING_ABBREV.items() if short != name)
    return lines + [
        *markdown_table(
            [
                "rank",
                "trial",
                "CV loss ± std",
                "CV acc",
                "params",
                "norm layout (per block)",
                "activation",
                "block",
                "optimizer / lr / batch",
            ],
            table,
        ),
        "",
        f"Layout: `sXbY` = stage X block Y, `a..b` = blocks a to b alike, `type@position(settings)`; {legend}; "
        "booleans 1/0.",
    ]


def bn_diagnostics(rows: list[Row], plots: Plots) -> list[str]:
    """Running statistics vs batch statistics on the same validation data, per norm type."""
    lines = ["## BN diagnostics", ""]
    have = [r for r in rows if finite(r.attrs.get("eval_mode_loss")) and finite(r.attrs.get("train_mode_loss"))]
    if not have:
        return lines + [
            "The study has no BN diagnostics (no complete trial records `eval_mode_loss` and `train_mode_loss`)."
        ]
    recal = any(finite(r.attrs.get("recalibrated_loss")) for r in have)
    table = []
    for kind in sorted({r.norm_type for r in have}, key=order_key(NORM_ORDER)):
        of_kind = [r for r in have if r.norm_type == kind]
        gaps = [r.attrs["eval_mode_loss"] - r.attrs["train_mode_loss"] for r in of_kind]
        row = [f"**{kind}**", str(len(of_kind)), f"{statistics.median(gaps):+.4f}"]
        if recal:
            deltas = [
                r.attrs["recalibrated_loss"] - r.attrs["eval_mode_loss"]
                for r in of_kind
                if finite(r.attrs.get("recalibrated_loss"))
            ]
            row.append(f"{statistics.median(deltas):+.4f} ({len(deltas)})" if deltas else "")
        table.append(row)
    columns = [_axes(have)[0], "trials", "median eval - train mode loss"] + (
        ["median recalibrated - eval loss (n)"] if recal else []
    )
    lines += [
        "Validation loss with running statistics (eval mode) vs batch statistics (train mode), same data. "
        "A positive gap means the running statistics serve the model worse than the batch's own"
        + (
            "; a negative recalibrated - eval value means re-estimating them on the training fold helped."
            if recal
            else "."
        ),
        "",
        *markdown_table(columns, table),
        "",
    ]
    return lines + _bn_plot(have, plots)


def _bn_plot(rows: list[Row], plots: Plots) -> list[str]:
    colors = _type_colors(r.norm_type for r in rows)
    fig, ax = _figure(6.0, 5.0)
    for kind in colors:
        of_kind = [r for r in rows if r.norm_type == kind]
        ax.scatter(
            [r.attrs["train_mode_loss"] for r in of_kind],
            [r.attrs["eval_mode_loss"] for r in of_kind],
            s=22,
            alpha=0.8,
            color=colors[kind],
            label=kind,
        )
    values = [r.attrs[key] for r in rows for key in ("train_mode_loss", "eval_mode_loss")]
    low, high = min(values), max(values)
    ax.plot([low, high], [low, high], color="0.5", linestyle="--", linewidth=1, label="y = x")
    if _spans_decade(values):
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(
        title="Running vs batch statistics",
        xlabel="validation loss, norm in train mode (batch stats)",
        ylabel="validation loss, eval mode (running stats)",
    )
    ax.grid(alpha=0.3)
    ax.legend(title="norm type", fontsize=8)
    return plots.save(
        fig,
        "bn_diagnostics.png",
        "BN diagnostics",
        "Each complete trial's validation loss with batch vs running statistics; "
        "above the dashed line, running statistics hurt.",
    )
