"""Benchmark: `nas-search --budget B` against `--timeout B` on the same config - when each run ends, and what it finds.

`--timeout` stops starting trials after B seconds (the running one finishes, the config's `trials` still caps the
count); `--budget` plans for B seconds from the launch (trials as many as fit, a trial cut at the deadline). Each
pair of runs shares a seed (a fresh SQLite study each), the pair's order swapped every repeat; wall time is from
the launch of the process to its exit. Prints every run, then the medians, the spread and the targets: every
budget run ends within 10 % of B, and its best CV loss is no worse than the timeout run's.

    .venv/bin/python scripts/bench_budget.py --config configs/digits.yaml --seconds 90 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import optuna

from nas.study import best_at, improvements

VARIANTS = ("budget", "timeout")


def run(config: str, folder: Path, variant: str, seed: int, seconds: float) -> dict:
    """One nas-search run: its wall time, trials, and best CV loss (of trials ended by `seconds` from launch)."""
    storage = f"sqlite:///{folder / f'{variant}-{seed}.db'}"
    limit = ["--budget", f"{seconds:g}s"] if variant == "budget" else ["--timeout", f"{seconds:g}"]
    command = [sys.executable, "-m", "nas", "search", "--config", config, "--study", "s", "--storage", storage]
    command += ["--seed", str(seed), "--no-progress", *limit]
    launched_at, launched = time.time(), datetime.now()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - launched_at
    if proc.returncode != 0:
        sys.exit(f"{variant} seed {seed} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    points = improvements(trials, start=launched)
    return {
        "variant": variant,
        "seed": seed,
        "wall": wall,
        "trials": sum(t.state.is_finished() for t in trials),
        "best": best_at(points, float("inf")),
        "best_in_time": best_at(points, seconds),  # of the trials that ended within `seconds` of the launch
        "late": sum(
            t.datetime_complete is not None and (t.datetime_complete - launched).total_seconds() > seconds
            for t in trials
        ),
        "summary": next((line for line in proc.stdout.splitlines() if line.startswith("Time budget")), ""),
    }


def shown(loss: float | None) -> str:
    return "none" if loss is None else f"{loss:.4f}"


def worse_or_none(loss: float | None) -> float:
    """A run that found nothing ranks below any that found something."""
    return float("inf") if loss is None else loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.runs):
            for variant in VARIANTS if seed % 2 == 0 else VARIANTS[::-1]:
                rows.append(run(args.config, Path(tmp), variant, seed, args.seconds))
                r = rows[-1]
                said = (
                    f"{r['wall']:6.1f} s, {r['trials']:2} trials ({r['late']} ended after {args.seconds:g} s), "
                    f"best CV loss {shown(r['best'])} (by {args.seconds:g} s: {shown(r['best_in_time'])})"
                )
                print(f"seed {seed} {variant:7}: {said}")
                if r["summary"]:
                    print(f"               {r['summary']}")
    print(f"\n{args.runs} runs each of {args.config}, {args.seconds:g} s:")
    print("| variant | wall s, median [min–max] | trials | best CV loss, median [min–max] | mean ± std |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        walls, bests = [r["wall"] for r in mine], [r["best"] for r in mine if r["best"] is not None]
        found = (
            f"{statistics.median(bests):.4f} [{min(bests):.4f}–{max(bests):.4f}] | "
            + (f"{statistics.fmean(bests):.4f} ± {statistics.stdev(bests):.4f}" if len(bests) > 1 else "—")
            if bests
            else "none | —"
        )
        print(
            f"| --{variant} {args.seconds:g} | {statistics.median(walls):.1f} [{min(walls):.1f}–{max(walls):.1f}] | "
            f"{statistics.median(r['trials'] for r in mine):g} | {found} |"
            + (f" ({len(mine) - len(bests)} found none)" if len(bests) < len(mine) else "")
        )
    budget = [r for r in rows if r["variant"] == "budget"]
    within = sum(abs(r["wall"] - args.seconds) <= 0.1 * args.seconds for r in budget)
    pairs = {r["seed"]: r for r in rows if r["variant"] == "timeout"}
    no_worse = sum(worse_or_none(pairs[r["seed"]]["best"]) >= worse_or_none(r["best"]) for r in budget)
    in_time = sum(worse_or_none(pairs[r["seed"]]["best_in_time"]) >= worse_or_none(r["best"]) for r in budget)
    print(f"target: every --budget run ends within 10 % of {args.seconds:g} s: {within}/{len(budget)}")
    print(f"target: --budget's best CV loss no worse than --timeout's, seed by seed: {no_worse}/{len(budget)}")
    print(
        f"        and no worse than what --timeout had found by {args.seconds:g} s (its trials ended in time): "
        f"{in_time}/{len(budget)}"
    )


if __name__ == "__main__":
    main()
