"""Benchmark: what each search strategy finds per unit of wall time, across tasks, against a hand-designed baseline.

Every strategy runs `nas-search --budget` on a fresh SQLite study per task and seed for the same
wall-clock budget. A strategy is `SAMPLER[/STARTUP][+PRUNER][@Kx]`: `tpe+hyperband`, `tpe/4+hyperband`
(TPE's random start-up count 4, `study.startup_trials`), `random@2x` (random search at twice the
budget, the standard bar for multi-fidelity methods). Runs are interleaved (seed by seed, task by
task, every strategy in turn, the order rotated each seed), so drift of a shared machine hits all
alike. From each run: the best CV loss found by 25 / 50 / 100 % of the budget (time from the
process launch: start-up and data loading are part of what a user waits for), and optionally the
final best trial exported (`nas-export`: retrained on the whole training split, tested on the
held-out split) and a fixed hand-designed CNN (2 stages of 32 / 64 channels, BatchNorm after each
conv, ReLU, max pooling, SGD-Nesterov at the schema's default hyperparameters) under the same CV.

Tasks: a run config, or `digits` (configs/digits.yaml), `shifted` (configs/digits_shifted.yaml),
`signals` (an .npz of 1-D waveforms: sine / square / sawtooth / triangle, random frequency and
phase, noise; 600 training signals of length 64; written here) and `images` (an image folder of
32x32 RGB PNGs, CIFAR-shaped, made from the digits on random colours and shifted, loaded at
8x8; written here). Each task keeps its
config's space, folds and epochs; strategies are ranked per task by the median over seeds of the
final best CV loss, and across tasks by the median of those ranks.

    .venv/bin/python scripts/bench_search.py --tasks digits,shifted,signals,images --budget-seconds 45 --seeds 3 \
        --strategies tpe+hyperband,tpe/4+hyperband,random+hyperband,random@2x --out experiments/search_defaults
    .venv/bin/python scripts/bench_search.py --config configs/digits.yaml --budget-seconds 170 --seeds 3 \
        --strategies random,tpe,gp,tpe+hyperband,tpe+successive_halving --baseline --export \
        --out experiments/search_strategies/digits

Prints the tables (median [min-max] over seeds) and writes `--out`/results.json, table.md and curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import yaml

from nas.search import PRUNER_NAMES, SAMPLER_NAMES, default_spec, load_run_config
from nas.study import best_at, improvements

FRACTIONS = (0.25, 0.5, 1.0)
BASELINE = default_spec({"stages": 2, "width": 32, "block": {"norm": {"type": "batch", "position": "post_conv"}}})
REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"digits": REPO / "configs" / "digits.yaml", "shifted": REPO / "configs" / "digits_shifted.yaml"}
SPACE = REPO / "search_spaces" / "bn_placement.yaml"


def parse_strategy(text: str) -> dict:
    """`SAMPLER[/STARTUP][+PRUNER][@Kx]` as its parts."""
    head, _, times = text.partition("@")
    head, _, pruner = head.partition("+")
    sampler, _, startup = head.partition("/")
    ok = (
        sampler in SAMPLER_NAMES
        and (pruner or "none") in PRUNER_NAMES
        and (not startup or startup.isdigit())
        and (not times or (times.endswith("x") and times[:-1].replace(".", "", 1).isdigit()))
    )
    if not ok:
        sys.exit(
            f"--strategies: '{text}' is not SAMPLER[/STARTUP][+PRUNER][@Kx] (samplers: {', '.join(SAMPLER_NAMES)}; "
            f"pruners: {', '.join(PRUNER_NAMES)}; e.g. tpe/4+hyperband, random@2x)"
        )
    return {
        "sampler": sampler,
        "pruner": pruner or "none",
        "startup": int(startup) if startup else None,
        "times": float(times[:-1]) if times else 1.0,
    }


def write_signals(path: Path, n_train: int = 600, n_test: int = 300, length: int = 64, seed: int = 0) -> None:
    """Four waveforms (sine, square, sawtooth, triangle) at a random frequency, phase and amplitude, in noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length, endpoint=False)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        phase = 2 * np.pi * (rng.uniform(2, 6, (n, 1)) * t + rng.uniform(0, 1, (n, 1)))
        waves = np.stack(
            [np.sin(phase), np.sign(np.sin(phase)), (phase / np.pi) % 2 - 1, 2 * np.abs((phase / np.pi) % 2 - 1) - 1]
        )
        x = waves[y, np.arange(n)] * rng.uniform(0.5, 1.5, (n, 1)) + rng.normal(0, 0.8, (n, length))
        return x.astype(np.float32), y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def write_images(root: Path, seed: int = 0) -> None:
    """The digits as 32x32 RGB PNGs (ink on a random colour, a random shift) in root/{train,test}/<digit>/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    test = set(rng.permutation(len(digits.target))[: len(digits.target) // 4].tolist())
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        ink = np.kron(image / 16.0, np.ones((3, 3)))  # 24x24
        canvas = np.zeros((32, 32))
        dy, dx = rng.integers(0, 9, 2)
        canvas[dy : dy + 24, dx : dx + 24] = ink
        background = rng.uniform(0, 1, 3)
        colour = 1 - background  # the ink stands out whatever the background
        rgb = (1 - canvas[..., None]) * background + canvas[..., None] * colour
        folder = root / ("test" if i in test else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"{i}.png")


def task_config(task: str, folder: Path) -> Path:
    """The run config of `task`: a path as given, a repository config, or one written with its data."""
    if task in CONFIGS:
        return CONFIGS[task]
    if task not in ("signals", "images"):
        path = Path(task).resolve()
        if not path.is_file():
            sys.exit(f"--tasks: '{task}' is neither a config file nor one of digits, shifted, signals, images")
        return path
    if task == "signals":
        write_signals(folder / "signals.npz")
        dataset = {"name": "npz", "root": str(folder / "signals.npz")}
    else:
        write_images(folder / "images")
        dataset = {
            "name": "imagefolder",
            "root": str(folder / "images"),
            "image_size": 8,  # as cheap as digits on 2 cores; the colours and shifts make it another task
            "cache": str(folder / "cache"),
        }
    config = {
        "dataset": dataset,
        "search_space": str(SPACE),
        "study": {"name": task, "sampler": "tpe"},
        "evaluation": {"folds": 3, "epochs": 12},
        "device": "auto",
    }
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_search(task: str, config: Path, folder: Path, strategy: str, seed: int, budget: float, args) -> dict:
    """One strategy, one seed: a fresh study searched for its budget; its anytime curve and final best."""
    plan = parse_strategy(strategy)
    own = budget * plan["times"]
    name = f"{task}-{strategy}-{seed}".replace("/", "_")
    storage = f"sqlite:///{folder / name}.db"
    command = [
        sys.executable, "-m", "nas", "search", "--config", str(config), "--study", "s", "--storage", storage,
        "--sampler", plan["sampler"], "--set", f"evaluation.pruner={plan['pruner']}", "--seed", str(seed),
        "--budget", f"{own}s", "--no-progress",
    ]  # fmt: skip
    if plan["startup"] is not None:
        command += ["--set", f"study.startup_trials={plan['startup']}"]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    launched = datetime.now()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = (datetime.now() - launched).total_seconds()
    if proc.returncode != 0:
        sys.exit(
            f"{task} {strategy} seed {seed} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        )
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    points = [p for p in improvements(trials, start=launched) if p[0] <= own]
    final = points[-1] if points else None
    row = {
        "task": task,
        "strategy": strategy,
        "seed": seed,
        "budget_seconds": own,
        "wall_seconds": wall,
        "curve": points,
        "trials": sum(t.state.is_finished() for t in trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "best": {f"{f:g}": best_at(points, f * own) for f in FRACTIONS},
    }
    if final is not None:
        best = next(t for t in trials if t.number == final[2])
        row["best_trial"] = {
            "number": best.number,
            "cv_loss": best.value,
            "cv_accuracy": best.user_attrs.get("cv_accuracy"),
        }
        if args.export:
            row["best_trial"]["test_accuracy"] = export_accuracy(
                storage, best.number, Path(storage.removeprefix("sqlite:///") + ".export")
            )
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


def mean_std(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return "—"
    return f"{statistics.fmean(known):.4f} ± {statistics.stdev(known):.4f}"


def task_table(task: str, rows: list[dict], baselines: list[dict], strategies: list[str], budget: float) -> str:
    """One task: best CV loss by 25 / 50 / 100 % of each strategy's own budget, its trials, its final best."""
    mine = {strategy: [r for r in rows if r["task"] == task and r["strategy"] == strategy] for strategy in strategies}
    seeds = max(len(runs) for runs in mine.values())
    exported = any("test_accuracy" in r.get("best_trial", {}) for runs in mine.values() for r in runs)
    lines = [
        f"**{task}**: best CV loss by wall time (budget {budget:g} s from launch, times a strategy's @Kx; median "
        f"[min–max] over {seeds} seed(s); mean ± std of the final best)",
        "",
        "| strategy | 25 % | 50 % | 100 % | mean ± std | trials (pruned) | CV acc of final best |"
        + (" test acc of final best |" if exported else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if exported else ""),
    ]
    for strategy, runs in mine.items():
        best = [r.get("best_trial", {}) for r in runs]
        cells = [spread([r["best"][f"{f:g}"] for r in runs]) for f in FRACTIONS]
        counts = f"{statistics.median(r['trials'] for r in runs):g} ({statistics.median(r['pruned'] for r in runs):g})"
        lines.append(
            f"| {strategy} | {' | '.join(cells)} | {mean_std([r['best']['1'] for r in runs])} | {counts} | "
            f"{spread([b.get('cv_accuracy') for b in best])} |"
            + (f" {spread([b.get('test_accuracy') for b in best])} |" if exported else "")
        )
    mine_baselines = [b for b in baselines if b["task"] == task]
    if mine_baselines:
        cv = spread([b["cv_loss"] for b in mine_baselines])
        lines.append(
            "| baseline: hand-designed 2-stage CNN + BatchNorm "
            f"(one trial, {statistics.median(b['cv_seconds'] for b in mine_baselines):.0f} s) "
            f"| {cv} | {cv} | {cv} | {mean_std([b['cv_loss'] for b in mine_baselines])} | 1 | "
            f"{spread([b['cv_accuracy'] for b in mine_baselines])} |"
            + (f" {spread([b['test_accuracy'] for b in mine_baselines])} |" if exported else "")
        )
    return "\n".join(lines)


def ranks(rows: list[dict], strategies: list[str], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task, each strategy's rank (1: lowest) by the median over seeds of its final best CV loss (none: last)."""
    table = {}
    for task in tasks:
        medians = {}
        for strategy in strategies:
            finals = [r["best"]["1"] for r in rows if r["task"] == task and r["strategy"] == strategy]
            known = [v for v in finals if v is not None]
            medians[strategy] = statistics.median(known) if len(known) == len(finals) and known else math.inf
        table[task] = {s: 1 + sum(v < medians[s] for v in medians.values()) for s in strategies}
    return table


def rank_table(rows: list[dict], strategies: list[str], tasks: list[str]) -> str:
    """The strategies by their median rank across tasks (ties share the better rank)."""
    per_task = ranks(rows, strategies, tasks)
    lines = [
        "Rank per task by the median final best CV loss over seeds (1: lowest), and the median rank across tasks",
        "",
        "| strategy | " + " | ".join(tasks) + " | median rank |",
        "|---|" + "---|" * len(tasks) + "---|",
    ]
    order = sorted(strategies, key=lambda s: (statistics.median(per_task[t][s] for t in tasks), strategies.index(s)))
    for strategy in order:
        cells = " | ".join(str(per_task[t][strategy]) for t in tasks)
        lines.append(f"| {strategy} | {cells} | {statistics.median(per_task[t][strategy] for t in tasks):g} |")
    return "\n".join(lines)


def plot(rows: list[dict], strategies: list[str], tasks: list[str], budget: float, path: Path) -> None:
    """Per task: median best-so-far per strategy against time, with the min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for strategy in strategies:
            runs = [r for r in rows if r["task"] == task and r["strategy"] == strategy]
            own = runs[0]["budget_seconds"]
            grid = [own * i / 200 for i in range(201)]
            curves = [[best_at([tuple(p) for p in r["curve"]], t) for t in grid] for r in runs]
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
        ax.axvline(budget, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel="seconds since launch", ylabel="best CV loss so far", title=task)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", help="comma-separated: digits, shifted, signals, images or config paths")
    parser.add_argument("--config", help="one run config as the only task (as --tasks PATH)")
    parser.add_argument("--budget-seconds", type=float, default=170.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default="random,tpe,gp,tpe+hyperband,tpe+successive_halving")
    parser.add_argument("--epochs", type=int, help="every task's epochs (default: each config's own)")
    parser.add_argument("--baseline", action="store_true", help="also score the hand-designed CNN on each task")
    parser.add_argument("--export", action="store_true", help="also export each final best and test it")
    parser.add_argument("--out", default="runs/bench_search", help="folder for results.json, table.md and curves.png")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    for strategy in strategies:
        parse_strategy(strategy)
    tasks = (args.tasks or args.config or "digits").split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, baselines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {task: task_config(task, Path(tmp)) for task in tasks}
        for seed in range(args.seeds):
            for task in tasks:
                if args.baseline:
                    baselines.append({"task": task, **run_baseline(configs[task], seed)})
                    print(f"{task} seed {seed}: baseline CV loss {baselines[-1]['cv_loss']:.4f}", flush=True)
                turn = seed % len(strategies)  # rotate who goes first, so drift over a seed hits all alike
                for strategy in strategies[turn:] + strategies[:turn]:
                    rows.append(run_search(task, configs[task], Path(tmp), strategy, seed, args.budget_seconds, args))
                    run = rows[-1]
                    print(
                        f"{task} seed {seed}: {strategy}: {run['trials']} trials in {run['wall_seconds']:.0f} s "
                        f"(budget {run['budget_seconds']:g} s), best CV loss {run['best']['1']}",
                        flush=True,
                    )
    text = "\n\n".join(
        [task_table(task, rows, baselines, strategies, args.budget_seconds) for task in tasks]
        + ([rank_table(rows, strategies, tasks)] if len(tasks) > 1 else [])
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "tasks": {task: str(configs[task]) for task in tasks},
                "budget_seconds": args.budget_seconds,
                "seeds": args.seeds,
                "strategies": strategies,
                "runs": rows,
                "baseline": baselines,
                "baseline_spec": BASELINE,
            },
            indent=1,
        )
        + "\n"
    )
    (out / "table.md").write_text(text + "\n")
    plot(rows, strategies, tasks, args.budget_seconds, out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
