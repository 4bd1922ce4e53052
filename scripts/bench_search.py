"""Benchmark: what each search strategy finds per unit of wall time, against a hand-designed baseline.

Every strategy (a sampler, optionally `+` a pruner: `random`, `tpe`, `gp`, `tpe+hyperband`,
`tpe+successive_halving`, `random+median`, ...) runs `nas-search` on a fresh SQLite study per
seed for the same wall-clock budget (`--timeout`; a trial running at the deadline finishes but
counts only if it ended within the budget). Runs are interleaved (seed by seed, every strategy
in turn), so drift of a shared machine hits all alike. From each run: the best CV loss found by
25 / 50 / 100 % of the budget (time from the process launch: start-up and data loading are part
of what a user waits for), and the final best trial exported (`nas-export`: retrained on the
whole training split, tested on the held-out test split). The baseline is a fixed hand-designed
CNN (2 stages of 32 / 64 channels, BatchNorm after each conv, ReLU, max pooling, SGD-Nesterov at
the schema's default hyperparameters) scored with the same CV and the same export.

    .venv/bin/python scripts/bench_search.py --config configs/digits.yaml --budget-seconds 170 --seeds 3 \\
        --strategies random,tpe,gp,tpe+hyperband,tpe+successive_halving --out experiments/search_strategies/digits

Prints a table (median [min-max] over seeds) and writes `--out`/results.json, table.md and curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import optuna

from nas.search import PRUNER_NAMES, SAMPLER_NAMES, default_spec, load_run_config
from nas.study import best_at, improvements

FRACTIONS = (0.25, 0.5, 1.0)
BASELINE = default_spec({"stages": 2, "width": 32, "block": {"norm": {"type": "batch", "position": "post_conv"}}})


def parse_strategy(text: str) -> tuple[str, str]:
    sampler, _, pruner = text.partition("+")
    if sampler not in SAMPLER_NAMES or (pruner or "none") not in PRUNER_NAMES:
        sys.exit(
            f"--strategies: '{text}' is not SAMPLER[+PRUNER] (samplers: {', '.join(SAMPLER_NAMES)}; pruners: "
            f"{', '.join(PRUNER_NAMES)})"
        )
    return sampler, pruner or "none"


def run_search(config: Path, folder: Path, strategy: str, seed: int, budget: float) -> dict:
    """One strategy, one seed: a fresh study searched for `budget` seconds; its anytime curve and final best."""
    sampler, pruner = parse_strategy(strategy)
    storage = f"sqlite:///{folder / f'{strategy}-{seed}.db'}"
    command = [
        sys.executable,
        "-m",
        "nas",
        "search",
        "--config",
        str(config),
        "--study",
        "s",
        "--storage",
        storage,
        "--sampler",
        sampler,
        "--set",
        f"evaluation.pruner={pruner}",
        "--seed",
        str(seed),
        "--trials",
        "100000",
        "--timeout",
        str(budget),
        "--no-progress",
    ]
    launched = datetime.now()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = (datetime.now() - launched).total_seconds()
    if proc.returncode != 0:
        sys.exit(f"{strategy} seed {seed} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    points = [p for p in improvements(trials, start=launched) if p[0] <= budget]
    final = points[-1] if points else None
    row = {
        "strategy": strategy,
        "seed": seed,
        "wall_seconds": wall,
        "curve": points,
        "trials": sum(t.state.is_finished() for t in trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "best": {f"{f:g}": best_at(points, f * budget) for f in FRACTIONS},
    }
    if final is not None:
        best = next(t for t in trials if t.number == final[2])
        row["best_trial"] = {
            "number": best.number,
            "cv_loss": best.value,
            "cv_accuracy": best.user_attrs.get("cv_accuracy"),
            "test_accuracy": export_accuracy(storage, best.number, folder / f"{strategy}-{seed}-export"),
        }
    return row


def export_accuracy(storage: str, trial: int, out: Path) -> float:
    """Test accuracy of a trial as `nas-export` retrains and tests it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas",
            "export",
            "--storage",
            storage,
            "--study",
            "s",
            "--trial",
            str(trial),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"nas-export of trial {trial} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "model.json").read_text())["test"]["accuracy"]


def run_baseline(config: Path, seed: int) -> dict:
    """The hand-designed CNN under the same CV (the seed's folds) and the same export-style test."""
    import torch

    from nas.build import build
    from nas.data import load_dataset, stratified_folds
    from nas.training import cross_validate, evaluate, fit, fold_seed, prepare_model, resolve_device, scoring_batch_size

    cfg = load_run_config(config, [("study.seed", seed)])
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, device)
    folds = stratified_folds(data.y_train, cfg.evaluation.folds, seed)
    start = time.perf_counter()
    score = cross_validate(
        BASELINE, data, folds, cfg.evaluation.epochs, device, study_seed=seed, fold_mode=cfg.evaluation.fold_mode
    )
    cv_seconds = time.perf_counter() - start
    train_seed = fold_seed(seed, 0, cfg.evaluation.folds)
    torch.manual_seed(train_seed)
    model = prepare_model(build(BASELINE, data.input_shape, data.num_classes), device)
    fit(
        model,
        data,
        torch.arange(len(data.y_train), device=device),
        None,
        BASELINE["training"],
        cfg.evaluation.epochs,
        device,
        seed=train_seed,
    )
    _, test_accuracy = evaluate(
        model, data.x_test, data.y_test, device, scoring_batch_size(model, BASELINE["training"])
    )
    return {
        "seed": seed,
        "cv_loss": score["cv_loss"],
        "cv_accuracy": score["cv_accuracy"],
        "test_accuracy": test_accuracy,
        "cv_seconds": cv_seconds,
    }


def spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    missing = f" ({len(values) - len(known)} none)" if len(known) < len(values) else ""
    return f"{statistics.median(known):.4f} [{min(known):.4f}–{max(known):.4f}]{missing}"


def table(rows: list[dict], baselines: list[dict], strategies: list[str], budget: float, seeds: int) -> str:
    header = (
        f"Best CV loss by wall time (budget {budget:g} s from launch; median [min–max] over {seeds} seed(s)); "
        "final best: its CV accuracy and its exported test accuracy"
    )
    lines = [
        header,
        "",
        "| strategy | 25 % | 50 % | 100 % | trials (pruned) | CV acc of final best | test acc of final best |",
        "|---|---|---|---|---|---|---|",
    ]
    for strategy in strategies:
        mine = [r for r in rows if r["strategy"] == strategy]
        best = [r.get("best_trial", {}) for r in mine]
        cells = [spread([r["best"][f"{f:g}"] for r in mine]) for f in FRACTIONS]
        counts = f"{statistics.median(r['trials'] for r in mine):g} ({statistics.median(r['pruned'] for r in mine):g})"
        lines.append(
            f"| {strategy} | {' | '.join(cells)} | {counts} | {spread([b.get('cv_accuracy') for b in best])} | "
            f"{spread([b.get('test_accuracy') for b in best])} |"
        )
    cv = spread([b["cv_loss"] for b in baselines])
    lines.append(
        "| baseline: hand-designed 2-stage CNN + BatchNorm "
        f"(one trial, {statistics.median(b['cv_seconds'] for b in baselines):.0f} s) "
        f"| {cv} | {cv} | {cv} | 1 | {spread([b['cv_accuracy'] for b in baselines])} "
        f"| {spread([b['test_accuracy'] for b in baselines])} |"
    )
    return "\n".join(lines)


def plot(rows: list[dict], baselines: list[dict], strategies: list[str], budget: float, path: Path) -> None:
    """Median best-so-far per strategy against time, with the min-max band over seeds, and the baseline's CV loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [budget * i / 200 for i in range(201)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for strategy in strategies:
        curves = [[best_at([tuple(p) for p in r["curve"]], t) for t in grid] for r in rows if r["strategy"] == strategy]
        xs, mid, low, high = [], [], [], []
        for i, t in enumerate(grid):
            values = [c[i] for c in curves if c[i] is not None]
            if len(values) == len(curves):
                xs.append(t)
                mid.append(statistics.median(values))
                low.append(min(values))
                high.append(max(values))
        (line,) = ax.plot(xs, mid, label=strategy)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.axhline(
        statistics.median(b["cv_loss"] for b in baselines),
        color="black",
        linestyle="--",
        label="hand-designed baseline",
    )
    ax.set(
        xlabel="seconds since launch",
        ylabel="best CV loss so far",
        title="What each strategy finds per wall-clock second",
    )
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--budget-seconds", type=float, default=170.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default="random,tpe,gp,tpe+hyperband,tpe+successive_halving")
    parser.add_argument("--out", default="runs/bench_search", help="folder for results.json, table.md and curves.png")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    for strategy in strategies:
        parse_strategy(strategy)
    config, out = Path(args.config).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, baselines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            baselines.append(run_baseline(config, seed))
            print(
                f"seed {seed}: baseline CV loss {baselines[-1]['cv_loss']:.4f}, test accuracy "
                f"{baselines[-1]['test_accuracy']:.4f}",
                flush=True,
            )
            for strategy in strategies:
                rows.append(run_search(config, Path(tmp), strategy, seed, args.budget_seconds))
                best = rows[-1].get("best_trial", {})
                print(
                    f"seed {seed}: {strategy}: {rows[-1]['trials']} trials, best CV loss {rows[-1]['best']['1']}, "
                    f"CV acc {best.get('cv_accuracy')}, test acc {best.get('test_accuracy')}",
                    flush=True,
                )
    text = table(rows, baselines, strategies, args.budget_seconds, args.seeds)
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": str(args.config),
                "budget_seconds": args.budget_seconds,
                "seeds": args.seeds,
                "runs": rows,
                "baseline": baselines,
                "baseline_spec": BASELINE,
            },
            indent=1,
        )
        + "\n"
    )
    (out / "table.md").write_text(text + "\n")
    plot(rows, baselines, strategies, args.budget_seconds, out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
