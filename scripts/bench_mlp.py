"""Benchmark: an MLP candidate's k-fold CV training against a plain hand-written PyTorch loop of the same MLP.

Three ways to cross-validate one MLP (Linear -> BatchNorm1d -> ReLU layers, SGD-Nesterov, cosine rate, the
same batches' size and count), timed end to end in one run, interleaved (the order rotates every repeat):

    hand-written   nn.Sequential built by hand, one fold after another, a plain loop over shuffled index slices
    sequential     nas.training.cross_validate(fold_mode="sequential"), as nas-search trains a fold at a time
    together       nas.training.cross_validate(fold_mode="together"): the k folds as one stacked model

and prints each one's median training throughput (samples trained per second over all folds), the spread
(min-max over repeats) and the ratios: sequential within 5 % of hand-written, together faster than sequential.

    .venv/bin/python scripts/bench_mlp.py                      # breast_cancer, 5 folds, 3 x 256 BN MLP
    .venv/bin/python scripts/bench_mlp.py --dataset digits_vectors --width 128 --repeats 9
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from nas.data import load_dataset, stratified_folds
from nas.search import DatasetConfig, default_spec
from nas.training import cross_validate

VARIANTS = ("hand-written", "sequential", "together")


def spec_for(args) -> dict:
    space = {
        "model": "mlp",
        "layers": args.layers,
        "width": args.width,
        "norm": {"type": "batch", "position": "post_linear"},
        "training": {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "batch_size": args.batch_size},
    }
    return default_spec(space)


def hand_written(features: int, classes: int, width: int, layers: int) -> nn.Module:
    """The same MLP as the spec, written out: Linear (no bias, BN follows) -> BatchNorm1d -> ReLU, then a Linear."""
    parts, size = [], features
    for _ in range(layers):
        parts += [nn.Linear(size, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        size = width
    return nn.Sequential(*parts, nn.Linear(size, classes))


def plain_cv(data, folds, args, seed: int = 0) -> float:
    """k folds, one after another, with the plainest loop PyTorch allows; returns the mean validation loss."""
    losses = []
    for k, (train_idx, val_idx) in enumerate(folds):
        torch.manual_seed(seed + k)
        model = hand_written(data.input_shape[0], data.num_classes, args.width, args.layers)
        weights = [p for p in model.parameters() if p.ndim > 1]
        others = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.SGD(
            [{"params": weights, "weight_decay": 5e-4}, {"params": others, "weight_decay": 0.0}],
            lr=0.05,
            momentum=0.9,
            nesterov=True,
        )
        steps = len(train_idx) // args.batch_size
        total = args.epochs * steps
        cosine = lambda step, total=total: 0.5 * (1 + math.cos(math.pi * step / total))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        generator = torch.Generator().manual_seed(seed + k)
        for _ in range(args.epochs):
            model.train()
            order = train_idx[torch.randperm(len(train_idx), generator=generator)]
            for step in range(steps):
                idx = order[step * args.batch_size : (step + 1) * args.batch_size]
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(data.x_train[val_idx]), data.y_train[val_idx]).item())
    return statistics.fmean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="breast_cancer", help="a table: breast_cancer, wine, digits_vectors")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    data = load_dataset(DatasetConfig(name=args.dataset))
    folds = stratified_folds(data.y_train, args.folds, 0)
    spec = spec_for(args)
    runs = {
        "hand-written": lambda: plain_cv(data, folds, args),
        "sequential": lambda: cross_validate(spec, data, folds, args.epochs, device, fold_mode="sequential"),
        "together": lambda: cross_validate(spec, data, folds, args.epochs, device, fold_mode="together"),
    }
    samples = sum(len(train) // args.batch_size * args.batch_size for train, _ in folds) * args.epochs
    for run in runs.values():  # warm-up: lazy imports, allocator
        run()
    seconds = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate who goes first so drift hits all alike
        for name in order:
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    print(
        f"{args.dataset}: {len(data.y_train)} training samples, {args.folds} folds x {args.epochs} epochs, MLP "
        f"{args.layers} x {args.width} (Linear-BatchNorm1d-ReLU), batch {args.batch_size}, {torch.get_num_threads()} "
        f"threads, {args.repeats} interleaved repeats"
    )
    print(f"  {'variant':13} {'median s':>9} {'min-max s':>15} {'samples/s':>10}")
    for name in VARIANTS:
        times = seconds[name]
        median = statistics.median(times)
        print(f"  {name:13} {median:9.4f} {min(times):7.4f}-{max(times):<7.4f} {samples / median:10.0f}")
    hand, seq, tog = (statistics.median(seconds[name]) for name in VARIANTS)
    pairs = sorted(s / h for s, h in zip(seconds["sequential"], seconds["hand-written"]))
    print(
        f"  sequential / hand-written time: {seq / hand:.3f} (each repeat's pair: {pairs[0]:.3f}-{pairs[-1]:.3f}); "
        f"target <= 1.05: {'met' if seq / hand <= 1.05 else 'NOT met'}"
    )
    speed = sorted(s / t for s, t in zip(seconds["sequential"], seconds["together"]))
    print(
        f"  together speed-up over sequential: {seq / tog:.2f}x (each repeat's pair: {speed[0]:.2f}-{speed[-1]:.2f}x); "
        f"target > 1: {'met' if seq / tog > 1 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
