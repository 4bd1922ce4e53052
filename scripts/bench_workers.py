"""Benchmark: trials per hour of nas-search with --workers N on one device, N = 1, 2, 4 by default.

Small candidates leave most of a GPU idle, so several worker processes (one study, one SQLite
file) may finish more trials an hour than one. Each N runs the same command on a fresh study:
the same config, trials, seed and device; wall time includes the processes' start-up, as a
search pays for it too.

    .venv/bin/python scripts/bench_workers.py --device cuda --dataset cifar-shaped --trials 16
    .venv/bin/python scripts/bench_workers.py --device cpu --dataset digits --trials 4 --workers 1,2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent


def cifar_shaped_npz(folder: Path, n: int) -> Path:
    """n random 3x32x32 images in 10 classes (and a test split) as an npz dataset file."""
    rng = np.random.default_rng(0)
    path = folder / "cifar_shaped.npz"
    np.savez(path, x_train=rng.random((n, 3, 32, 32), dtype=np.float32), y_train=rng.integers(0, 10, n),
             x_test=rng.random((256, 3, 32, 32), dtype=np.float32), y_test=rng.integers(0, 10, 256))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar-shaped"])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--trials", type=int, default=8, help="trials per measurement")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--cifar-n", type=int, default=10000)
    parser.add_argument("--fold-mode", default="together", choices=["together", "sequential"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dataset = {"name": "digits"}
        if args.dataset == "cifar-shaped":
            dataset = {"name": "npz", "root": str(cifar_shaped_npz(folder, args.cifar_n)), "augment": "crop_flip"}
        config = {"dataset": dataset, "search_space": str(ROOT / "search_spaces" / "bn_placement.yaml"),
                  "study": {"sampler": "tpe", "seed": 0, "trials": args.trials},
                  "evaluation": {"folds": args.folds, "epochs": args.epochs, "fold_mode": args.fold_mode}, "device": args.device}
        (folder / "run.yaml").write_text(yaml.safe_dump(config))
        print(f"{args.dataset} on {args.device}: {args.trials} trials of {args.folds} folds x {args.epochs} epochs "
              f"(fold_mode {args.fold_mode}), search space bn_placement.yaml, a fresh SQLite study per row")
        print(f"  {'workers':>7} {'seconds':>9} {'trials/hour':>12} {'vs 1 worker':>12}")
        base = None
        for n in [int(w) for w in args.workers.split(",")]:
            command = [sys.executable, "-m", "nas.cli", "--config", str(folder / "run.yaml"), "--workers", str(n), "--no-progress",
                       "--study", f"w{n}", "--storage", f"sqlite:///{folder}/w{n}.db"]
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"--workers {n} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            rate = args.trials / seconds * 3600
            base = base or rate
            print(f"  {n:7d} {seconds:9.1f} {rate:12.0f} {rate / base:11.2f}x")


if __name__ == "__main__":
    main()
