"""How long `python -m nas COMMAND --help` takes, for every command, against a baseline checkout side by side.

    python scripts/bench_help.py --baseline /tmp/old-checkout --runs 5

Each run starts a fresh interpreter (what a user waits for); the two trees alternate within each round, so a busy
moment hits both. Prints the median and the range per command and tree, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def commands() -> list[str]:
    """The commands `python -m nas --help` lists (indented four spaces under "commands:")."""
    listed = subprocess.run(
        [sys.executable, "-m", "nas", "--help"],
        env={**os.environ, "PYTHONPATH": str(HERE)},
        cwd=HERE,
        capture_output=True,
    )
    return [line.split()[0] for line in listed.stdout.decode().splitlines() if line.startswith("    ") and line.split()]


def seconds(tree: Path, command: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nas", command, "--help"], env=env, cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of bnnas to compare with")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trees = {"this": HERE, "baseline": args.baseline.resolve()}
    names = commands()
    times: dict[tuple[str, str], list[float]] = {(c, t): [] for c in names for t in trees}
    for _ in range(args.runs):
        for command in names:
            for name, tree in trees.items():
                times[command, name].append(seconds(tree, command))
    print(f"{'command':<14} {'this (s)':>22} {'baseline (s)':>22} {'ratio':>6}   ({args.runs} runs each, interleaved)")
    for command in names:
        cells = []
        for name in trees:
            t = times[command, name]
            cells.append(f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})")
        ratio = statistics.median(times[command, "this"]) / statistics.median(times[command, "baseline"])
        print(f"{command:<14} {cells[0]:>22} {cells[1]:>22} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
