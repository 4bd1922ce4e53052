"""Benchmark: trials per hour of nas-search with --workers N (or --ray --ray-workers N) on one device.

Small candidates leave most of a GPU idle, so several worker processes (one study, one SQLite
file) may finish more trials an hour than one. Each N runs the same command on a fresh study:
the same config, trials, seed and device; wall time includes the processes' start-up, as a
search pays for it too. The counts are interleaved (1, 2, 4, 1, 2, 4, ...) `--repeats` times,
so a slow spell of the machine hits every count; each row is the median, with the range.

With --ray the workers are Ray tasks on one local Ray cluster started once for the whole run
(its start-up is not timed: a cluster outlives its searches); on a GPU each of N workers
reserves 1/N of it (--gpus-per-trial), so the rows are 1, 2, 4 trials per GPU.

    .venv/bin/python scripts/bench_workers.py --device cuda --dataset cifar-shaped --trials 16
    .venv/bin/python scripts/bench_workers.py --device cpu --dataset digits --trials 4 --workers 1,2
    .venv/bin/python scripts/bench_workers.py --ray --device cpu --trials 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
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
    np.savez(
        path,
        x_train=rng.random((n, 3, 32, 32), dtype=np.float32),
        y_train=rng.integers(0, 10, n),
        x_test=rng.random((256, 3, 32, 32), dtype=np.float32),
        y_test=rng.integers(0, 10, 256),
    )
    return path


def local_ray(workers: int, gpus: int) -> str:
    """A local Ray cluster with a CPU slot for every worker (as --workers oversubscribes too); its address."""
    import ray

    # address="local": a new cluster of its own, even where another one runs on this machine (ray.init()
    # would join that one, and refuse the CPU and GPU counts)
    ray.init(address="local", num_cpus=workers, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def launch_flags(n: int, ray_address: str | None, gpu: bool) -> list[str]:
    if ray_address is None:
        return ["--workers", str(n)]
    return ["--ray", ray_address, "--ray-workers", str(n), "--gpus-per-trial", f"{1 / n:.4g}" if gpu else "0"]


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
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs of each count (the median is reported)"
    )
    parser.add_argument(
        "--ray", action="store_true", help="start the workers as Ray tasks (nas-search --ray) on a local Ray cluster"
    )
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    gpu = args.device == "cuda" or (args.device == "auto" and __import__("torch").cuda.is_available())
    ray_address = local_ray(max(counts), int(gpu)) if args.ray else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dataset = {"name": "digits"}
        if args.dataset == "cifar-shaped":
            dataset = {"name": "npz", "root": str(cifar_shaped_npz(folder, args.cifar_n)), "augment": "crop_flip"}
        config = {
            "dataset": dataset,
            "search_space": str(ROOT / "search_spaces" / "bn_placement.yaml"),
            "study": {"sampler": "tpe", "seed": 0, "trials": args.trials},
            "evaluation": {"folds": args.folds, "epochs": args.epochs, "fold_mode": args.fold_mode},
            "device": args.device,
        }
        (folder / "run.yaml").write_text(yaml.safe_dump(config))
        launcher = (
            "Ray workers (nas-search --ray, one local Ray cluster)" if args.ray else "workers (nas-search --workers)"
        )
        print(
            f"{args.dataset} on {args.device}: {args.trials} trials of {args.folds} folds x {args.epochs} epochs "
            f"(fold_mode {args.fold_mode}), search space bn_placement.yaml, a fresh SQLite study per run; {launcher}, "
            f"{args.repeats} interleaved runs per count, median (min-max)"
        )
        seconds: dict[int, list[float]] = {n: [] for n in counts}
        for repeat in range(args.repeats):
            for n in counts:
                flags = launch_flags(n, ray_address, gpu)
                command = [
                    sys.executable,
                    "-m",
                    "nas.cli",
                    "--config",
                    str(folder / "run.yaml"),
                    *flags,
                    "--no-progress",
                    "--study",
                    f"w{n}r{repeat}",
                    "--storage",
                    f"sqlite:///{folder}/w{n}r{repeat}.db",
                ]
                start = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True)
                seconds[n].append(time.perf_counter() - start)
                if proc.returncode != 0:
                    sys.exit(
                        f"{' '.join(flags)} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
                    )
        print(f"  {'workers':>7} {'seconds':>9} {'(range)':>13} {'trials/hour':>12} {'vs first':>9}")
        base = None
        for n in counts:
            median = statistics.median(seconds[n])
            rate = args.trials / median * 3600
            base = base or rate
            spread = f"({min(seconds[n]):.1f}-{max(seconds[n]):.1f})"
            print(f"  {n:7d} {median:9.1f} {spread:>13} {rate:12.0f} {rate / base:8.2f}x")


if __name__ == "__main__":
    main()
