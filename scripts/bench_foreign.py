"""Benchmark: training a timm model inside bnnas's training loop vs a plain hand-written loop.

Both train the same timm model (built from the same ArchSpec and seed) on the same data, same batches
(index slices of tensors already on the device), same optimizer (SGD, Nesterov momentum 0.9, weight
decay) and cosine schedule, for the same epochs, then validate once. "bnnas" is `nas.training.fit`, the
loop `cross_validate` runs for each fold of a foreign model; "plain" is the loop a timm user writes.
The two alternate, `--repeats` times, in one process; each row is the median with the range, and the
ratio is plain / bnnas seconds (1.00 = same throughput; the target is >= 0.95).

    .venv/bin/python scripts/bench_foreign.py --device cpu --model resnet10t --epochs 2 --repeats 5
    .venv/bin/python scripts/bench_foreign.py --device cuda --dataset cifar-shaped --model resnet18
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from nas.build import build
from nas.data import Dataset, load_dataset
from nas.search import DatasetConfig, default_spec
from nas.training import autocast, evaluate, fit, make_optimizer, on_device_layout, prepare_model, resolve_device

TARGET = 0.95
HP = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "l1": 0.0, "label_smoothing": 0.0, "batch_size": 64}


def cifar_shaped(n: int, device: torch.device) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return Dataset("cifar-shaped", x, y, x[:256], y[:256], [str(c) for c in range(10)], "none").to(device)


def plain_loop(model, x, y, train_idx, val_idx, epochs: int, device: torch.device, seed: int) -> float:
    """What a timm user writes: shuffle, slice, forward, backward, step; validate at the end."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, HP)
    steps = len(train_idx) // HP["batch_size"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, epochs * steps) / (epochs * steps)))
    )
    for _ in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator).to(train_idx.device)]
        for idx in order[: steps * HP["batch_size"]].split(HP["batch_size"]):
            with autocast(device):
                loss = F.cross_entropy(model(on_device_layout(x[idx], device)).float(), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return evaluate(model, x[val_idx], y[val_idx], device)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar-shaped"])
    parser.add_argument("--model", default="resnet10t", help="a timm model name")
    parser.add_argument("--norm", default="batch", help="the catalogue norm put in place of the model's own")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cifar-n", type=int, default=4096)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = (
        load_dataset(DatasetConfig(name="digits"), device)
        if args.dataset == "digits"
        else cifar_shaped(args.cifar_n, device)
    )
    # the spec a search samples: the model's norms replaced by --norm
    spec = default_spec({"model": {"timm": args.model, "norm": {"type": args.norm}}, "training": HP})
    n = len(data.y_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(data.y_train.device)
    train_idx, val_idx = perm[: n * 2 // 3], perm[n * 2 // 3 :]
    x, y = data.x_train, data.y_train

    def fresh(seed: int):
        torch.manual_seed(seed)
        return prepare_model(build(spec, data.input_shape, data.num_classes), device)

    def timed(variant: str, seed: int) -> float:
        model = fresh(seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "bnnas":
            fit(model, data, train_idx, val_idx, HP, args.epochs, device, seed=seed)
        else:
            plain_loop(model, x, y, train_idx, val_idx, args.epochs, device, seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed("plain", 99)  # warm-up: first-call costs (allocator, kernels) out of the timed runs
    seconds: dict[str, list[float]] = {"bnnas": [], "plain": []}
    for repeat in range(args.repeats):
        for variant in ("bnnas", "plain") if repeat % 2 == 0 else ("plain", "bnnas"):
            seconds[variant].append(timed(variant, repeat))
    steps = args.epochs * (len(train_idx) // HP["batch_size"])
    print(
        f"timm {args.model} (norm {args.norm}) on {data.name} ({device.type}, {torch.get_num_threads()} CPU threads): "
        f"{args.epochs} epochs, {steps} steps of batch {HP['batch_size']}, then one validation; "
        f"{args.repeats} interleaved runs each, median (min-max)"
    )
    print(f"  {'loop':<6} {'seconds':>8} {'(range)':>15} {'images/s':>9}")
    for variant, runs in seconds.items():
        median = statistics.median(runs)
        images = steps * HP["batch_size"] / median
        print(f"  {variant:<6} {median:8.3f} {f'({min(runs):.3f}-{max(runs):.3f})':>15} {images:9.0f}")
    ratio = statistics.median(seconds["plain"]) / statistics.median(seconds["bnnas"])
    pairs = [p / b for b, p in zip(seconds["bnnas"], seconds["plain"])]
    print(f"  plain / bnnas: {ratio:.3f} (each repeat's pair: min {min(pairs):.3f}, max {max(pairs):.3f})")
    print(f"  target: bnnas within 5% of plain (>= {TARGET}): {'met' if ratio >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
