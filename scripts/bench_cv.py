"""Benchmark: one candidate's k-fold evaluation with the folds trained one by one vs together.

Times `nas.evaluate.cross_validate` end to end (models built, k folds trained, validated and
their BN diagnostics computed, as a trial of nas-search does) with `fold_mode` `sequential`
and `together`, alternating, repeated, in one run; prints median seconds and the ratio.

    .venv/bin/python scripts/bench_cv.py --device cpu --dataset digits
    .venv/bin/python scripts/bench_cv.py --device cuda --dataset cifar-shaped
    .venv/bin/python scripts/bench_cv.py --trial 7 --storage sqlite:///runs/nas.db --study digits-bn

Targets: together >= 1.4x faster on CPU digits (k = 3); >= 3x on CUDA with CIFAR-shaped data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nas.config import DatasetConfig, load_run_config
from nas.data import Dataset, load_dataset, stratified_folds
from nas.evaluate import cross_validate
from nas.space import default_spec
from nas.train import resolve_device

# A representative digits CNN: two stages (32, 64 channels), BatchNorm after each conv.
SPEC = default_spec({"width": 32, "training": {"batch_size": 64}})
DIGITS_EPOCHS = load_run_config(Path(__file__).parent.parent / "configs" / "digits.yaml").evaluation.epochs
TARGETS = {"digits": ("cpu", 1.4), "cifar-shaped": ("cuda", 3.0)}


def cifar_shaped(n: int, device: torch.device, seed: int = 0) -> Dataset:
    """n random normalized 3x32x32 images in 10 classes, augmented with crop and flip like CIFAR-10."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return Dataset("cifar-shaped", x, y, x[:256], y[:256], [str(c) for c in range(10)], "crop_flip").to(device)


def candidate(args) -> dict:
    """The spec to time: --spec (JSON text or a file), a study's --trial, or SPEC."""
    if args.trial is not None:
        import optuna

        study = optuna.load_study(study_name=args.study, storage=args.storage)
        return study.trials[args.trial].user_attrs["arch"]
    if args.spec:
        text = args.spec if args.spec.lstrip().startswith("{") else open(args.spec).read()
        return json.loads(text)
    return SPEC


def run(spec: dict, data: Dataset, folds, epochs: int, device: torch.device, mode: str) -> tuple[float, float, dict]:
    """(wall seconds, this process's CPU seconds, score) of one k-fold evaluation."""
    start, cpu = time.perf_counter(), time.process_time()
    score = cross_validate(spec, data, folds, epochs, device, fold_mode=mode)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dataset", default="digits", choices=list(TARGETS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=DIGITS_EPOCHS,
                        help="epochs per fold in each timed evaluation (default: configs/digits.yaml's, as a trial of the default search)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cifar-n", type=int, default=10000, help="number of generated CIFAR-shaped images")
    parser.add_argument("--spec", help="an ArchSpec as JSON text or a JSON file (default: a two-stage BatchNorm CNN)")
    parser.add_argument("--trial", type=int, help="time this trial's ArchSpec from --study in --storage")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--study", default="digits-bn")
    parser.add_argument("--storage", default="sqlite:///runs/nas.db")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(DatasetConfig(), device) if args.dataset == "digits" else cifar_shaped(args.cifar_n, device)
    folds = stratified_folds(data.y_train, args.folds, 0)
    spec = candidate(args)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {args.dataset}: "
          f"{len(data.y_train)} samples of {data.input_shape}, {args.folds} folds x {args.epochs} epochs, "
          f"batch {spec['training']['batch_size']}; timed: cross_validate end to end")
    for mode in ("sequential", "together"):  # warm-up: allocator, cuDNN autotuning, lazy imports
        *_, score = run(spec, data, folds, 1, device, mode)
    if score["fold_mode"] != "together":
        print(f"this spec trains sequentially even when asked for together: {score.get('fold_mode_fallback')}")
        return
    wall, cpu = {"sequential": [], "together": []}, {"sequential": [], "together": []}
    for r in range(args.repeats):  # alternate (and swap who goes first) so drift hits both alike
        for mode in (("sequential", "together") if r % 2 == 0 else ("together", "sequential")):
            seconds, cpu_seconds, _ = run(spec, data, folds, args.epochs, device, mode)
            wall[mode].append(seconds)
            cpu[mode].append(cpu_seconds)
    seq, tog = statistics.median(wall["sequential"]), statistics.median(wall["together"])
    seq_cpu, tog_cpu = statistics.median(cpu["sequential"]), statistics.median(cpu["together"])
    print(f"  {'median':>8} {'sequential s':>13} {'together s':>11} {'speed-up':>9}")
    print(f"  {'wall':>8} {seq:13.3f} {tog:11.3f} {seq / tog:8.2f}x")
    # On a shared machine waiting for a core inflates wall time; CPU time counts only the work.
    print(f"  {'CPU':>8} {seq_cpu:13.3f} {tog_cpu:11.3f} {seq_cpu / tog_cpu:8.2f}x")
    print("  (wall, sequential: " + " ".join(f"{t:.3f}" for t in wall["sequential"])
          + "; together: " + " ".join(f"{t:.3f}" for t in wall["together"]) + ")")
    target_device, target = TARGETS[args.dataset]
    if device.type == target_device:
        print(f"  target: together >= {target}x faster on {target_device}: {'met' if seq / tog >= target else 'NOT met'} ({seq / tog:.2f}x)")
    else:
        print(f"  target: together >= {target}x faster on {target_device}: not measured here (device {device.type})")


if __name__ == "__main__":
    main()
