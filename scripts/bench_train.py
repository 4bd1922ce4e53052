"""Benchmark: `nas.training.train.fit` against the plain PyTorch training loop, side by side in one run.

bnnas keeps small datasets as normalized tensors on the device, takes batches as index
slices and augments a whole batch at once (DESIGN.md, "Performance design"). This script
checks that the design pays: it trains the same model on the same data for the same
epochs (a) with `nas.training.train.fit` and (b) the way torchvision's examples do it (a
`torch.utils.data.Dataset` of raw uint8 images, per-sample PIL transforms, a shuffling
`DataLoader`), with the same optimizer, cosine schedule, loss and autocast.

    .venv/bin/python scripts/bench_train.py --device cpu
    .venv/bin/python scripts/bench_train.py --device cuda --workloads cifar --cifar-n 50000

Targets: digits, ours <= 0.9x standard on the CPU; CIFAR-shaped, ours <= 0.3x on CUDA.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from nas.build import build
from nas.data import Dataset, load_dataset
from nas.search import DatasetConfig, default_spec
from nas.training import autocast, fit, make_optimizer, prepare_model, resolve_device

SPEC = default_spec({"width": 32, "training": {"batch_size": 64}})
VAL = 256  # both ways end with one pass over the first VAL training samples, as fit does
TARGETS = {"digits": ("cpu", 0.9), "cifar": ("cuda", 0.3)}


class RawImages(torch.utils.data.Dataset):
    """torchvision-style: uint8 HWC arrays, made PIL images and transformed one sample at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)  # as MNIST / CIFAR10 do
        return self.transform(image), int(self.labels[i])


def digits(device: torch.device) -> tuple[Dataset, np.ndarray]:
    """nas's digits and the same images as uint8 HWC (within 1/510 of them: a timing benchmark)."""
    data = load_dataset(DatasetConfig(), device)
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    raw = (data.x_train.cpu() * std + mean).mul(255).round().clamp(0, 255).byte()
    return data, raw.permute(0, 2, 3, 1).numpy()


def cifar_like(n: int, device: torch.device, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """n random 32x32x3 uint8 images in 10 classes, normalized per channel as load_dataset does."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = torch.as_tensor(rng.integers(0, 10, n), dtype=torch.long)
    x = raw.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    x = torch.from_numpy((x - mean) / std)
    data = Dataset(
        "cifar_like",
        x,
        labels,
        x[:VAL],
        labels[:VAL],
        [str(c) for c in range(10)],
        "crop_flip",
        mean.reshape(-1).tolist(),
        std.reshape(-1).tolist(),
    )
    return data.to(device), raw


def fresh_model(data: Dataset, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return prepare_model(build(SPEC, data.input_shape, data.num_classes), device)


def run_ours(data: Dataset, device: torch.device, epochs: int, seed: int) -> float:
    """Seconds for fit(): `epochs` training epochs plus its one validation pass (model built untimed)."""
    model = fresh_model(data, device, seed)
    train_idx = torch.arange(len(data.y_train), device=device)
    start = time.perf_counter()
    fit(model, data, train_idx, train_idx[:VAL], SPEC["training"], epochs, device, seed=seed)
    _sync(device)
    return time.perf_counter() - start


def run_standard(data: Dataset, raw: np.ndarray, device: torch.device, epochs: int, seed: int, workers: int) -> float:
    """Seconds for the DataLoader loop: the same epochs plus one validation pass (model built untimed).

    DataLoader creation and worker start-up are timed: a training run pays for them too.
    """
    model = fresh_model(data, device, seed)
    hp = SPEC["training"]
    labels = data.y_train.cpu().numpy()
    to_tensor = [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    augment = (
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if data.augment == "crop_flip" else []
    )
    cuda = device.type == "cuda"
    start = time.perf_counter()
    loader = DataLoader(
        RawImages(raw, labels, transforms.Compose(augment + to_tensor)),
        batch_size=hp["batch_size"],
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(RawImages(raw[:VAL], labels[:VAL], transforms.Compose(to_tensor)), batch_size=1024)
    optimizer = make_optimizer(model, hp)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    layout = torch.channels_last if cuda and raw.ndim == 4 else torch.contiguous_format
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)
            with autocast(device):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=hp["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        loss.item()  # fit checks the loss is finite once an epoch: the same sync here
    model.eval()
    with torch.no_grad():
        for x, y in val_loader:
            with autocast(device):
                F.cross_entropy(model(x.to(device, memory_format=layout)).float(), y.to(device)).item()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, data: Dataset, raw: np.ndarray, device: torch.device, args) -> None:
    def ours_fn(epochs, seed):
        return run_ours(data, device, epochs, seed)

    def standard_fn(epochs, seed):
        return run_standard(data, raw, device, epochs, seed, args.num_workers)

    ours_fn(1, 0), standard_fn(1, 0)  # warm-up: allocator, cuDNN autotuning, lazy imports
    ours, standard = [], []
    for r in range(args.repeats):  # alternate, so drift in machine speed hits both alike
        ours.append(ours_fn(args.epochs, r) / args.epochs)
        standard.append(standard_fn(args.epochs, r) / args.epochs)
    o, s = statistics.median(ours), statistics.median(standard)
    print(
        f"\n{name}: {len(data.y_train)} samples of {data.input_shape}, batch {SPEC['training']['batch_size']}, "
        f"augment {data.augment}, {args.epochs} epochs x {args.repeats} repeats, median"
    )
    print(f"  {'ours s/epoch':>14} {'standard s/epoch':>17} {'ratio':>7}")
    print(f"  {o:14.4f} {s:17.4f} {o / s:7.3f}")
    print(f"  (ours all: {' '.join(f'{t:.4f}' for t in ours)}; standard all: {' '.join(f'{t:.4f}' for t in standard)})")
    target_device, target = TARGETS[name]
    if device.type == target_device:
        verdict = "met" if o / s <= target else "NOT met"
        print(f"  target: ours <= {target}x standard on {target_device}: {verdict} ({o / s:.3f}x)")
    else:
        print(f"  target: ours <= {target}x standard on {target_device}: not measured here (device {device.type})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workloads", default="digits,cifar", help="comma-separated: digits, cifar")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--cifar-n", type=int, default=10000, help="number of generated 32x32x3 images")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the standard way")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"DataLoader num_workers={args.num_workers}; timed: training epochs + one validation pass "
        f"over {VAL} samples, model construction untimed"
    )
    makers = {"digits": lambda: digits(device), "cifar": lambda: cifar_like(args.cifar_n, device)}
    for name in args.workloads.split(","):
        bench(name, *makers[name](), device, args)


if __name__ == "__main__":
    main()
