"""Benchmark: loading an image folder with bnnas's decode-once cache against torchvision's ImageFolder way.

Writes an image folder of random-content PNGs (`--images`, default 20,000 at 64x64, RGB, 10
classes; 10 % in test/), then times, round-robin over `--repeats`:

  first load     `nas.data.image_cache.load_image_folder` into an empty cache: list, decode in
                 parallel (threads), write the uint8 cache
  cached load    the same call once the cache holds the folder: memory-map the arrays and
                 read every byte once (np.ascontiguousarray), as training would
  ImageFolder    `torchvision.datasets.ImageFolder` + PILToTensor through a
                 `DataLoader(num_workers=2, batch_size=256)`: one epoch of the training split read

and one training epoch of a fixed candidate (`nas.training.train.fit` over the whole training split) with
the samples held four ways: float32 normalized up front (bnnas before uint8 storage), uint8 in
memory normalized per batch, uint8 streamed from the memory-mapped cache (a prefetching thread),
and ImageFolder + per-sample transforms through a DataLoader(num_workers=2) with the same loop.
It prints medians, the p10-p90 spread and the ratios, with the bytes per sample in memory as
uint8 and as float32. Targets on the 2-core CPU: cached load >= 10x faster than a first decode;
a streamed epoch within 1.3x of an in-memory one; an in-memory uint8 epoch no slower than float32.

    .venv/bin/python scripts/bench_data.py
    .venv/bin/python scripts/bench_data.py --images 2000 --size 32 --repeats 2   # a quick run
    python scripts/bench_data.py --device cuda   # the epochs on a GPU: uint8 on the device vs streamed
                                                 # (pinned, non-blocking)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from nas.build import build
from nas.data import Dataset, load_dataset, load_image_folder
from nas.search import DatasetConfig, default_spec
from nas.training import autocast, fit, make_optimizer, on_device_layout, prepare_model, resolve_device

TARGET = 10.0  # cached load at least this many times faster than the first decode
STREAM_TARGET = 1.3  # a streamed epoch at most this many times an in-memory one
SPEC = default_spec({"stages": 2, "width": 16, "training": {"batch_size": 128, "lr": 0.05}})


def write_folder(root: Path, images: int, size: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(images):
        split = "test" if i % 10 == 0 else "train"
        folder = root / split / f"c{(i // 10) % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def first_load(root: Path, scratch: Path) -> float:
    cache = Path(tempfile.mkdtemp(dir=scratch))
    start = time.perf_counter()
    load_image_folder(root, None, str(cache))
    seconds = time.perf_counter() - start
    shutil.rmtree(cache)
    return seconds


def cached_load(root: Path, cache: Path) -> float:
    start = time.perf_counter()
    splits = load_image_folder(root, None, str(cache))
    for split in splits.values():
        np.ascontiguousarray(split.images)
    return time.perf_counter() - start


def image_folder_epoch(root: Path) -> float:
    start = time.perf_counter()
    folder = torchvision.datasets.ImageFolder(str(root / "train"), transform=v2.PILToTensor())
    for images, _ in DataLoader(folder, batch_size=256, num_workers=2):
        images.sum()
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_ours(data: Dataset, device: torch.device, seed: int = 0) -> float:
    """One epoch of fit() over the whole training split (the model built untimed)."""
    torch.manual_seed(seed)
    model = prepare_model(build(SPEC, data.input_shape, data.num_classes), device)
    _sync(device)
    start = time.perf_counter()
    fit(
        model,
        data,
        torch.arange(len(data.y_train), device=data.y_train.device),
        None,
        SPEC["training"],
        1,
        device,
        seed=seed,
    )
    _sync(device)
    return time.perf_counter() - start


def epoch_dataloader(root: Path, data: Dataset, device: torch.device, seed: int = 0) -> float:
    """One epoch of the same model and loss through ImageFolder, per-sample transforms and DataLoader(num_workers=2)."""
    torch.manual_seed(seed)
    model = prepare_model(build(SPEC, data.input_shape, data.num_classes), device)
    optimizer = make_optimizer(model, SPEC["training"])
    cuda = device.type == "cuda"
    transform = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])
    start = time.perf_counter()
    loader = DataLoader(
        torchvision.datasets.ImageFolder(str(root / "train"), transform=transform),
        batch_size=SPEC["training"]["batch_size"],
        shuffle=True,
        drop_last=True,
        num_workers=2,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(seed),
    )
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(on_device_layout(x, device)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def summary(seconds: list[float]) -> tuple[float, float, float]:
    p10, p90 = np.percentile(seconds, [10, 90])
    return statistics.median(seconds), float(p10), float(p90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where the folder and caches go (default: a temporary folder)")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where the epochs train (default %(default)s)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    root, cache = scratch / "folder", scratch / "cache"
    start = time.perf_counter()
    write_folder(root, args.images, args.size)
    print(
        f"image folder: {args.images} PNGs, {args.size}x{args.size} RGB, written in "
        f"{time.perf_counter() - start:.1f} s ({root})"
    )
    load_image_folder(root, None, str(cache))  # the entry the cached loads read
    config = DatasetConfig(name="imagefolder", root=str(root), cache=str(cache), augment="none")
    held = load_dataset(config, device)
    streamed = load_dataset(DatasetConfig(**{**config.__dict__, "device_memory": 0.0}), device)
    floats = Dataset(
        held.name,
        held.x_train.float(),
        held.y_train,
        held.x_test.float(),
        held.y_test,
        held.classes,
        "none",
        held.mean,
        held.std,
    )
    loads = {
        "first load (decode + cache)": lambda: first_load(root, scratch),
        "cached load": lambda: cached_load(root, cache),
        "ImageFolder + DataLoader(2), one epoch": lambda: image_folder_epoch(root),
    }
    epochs = {
        "float32 in memory (before)": lambda: epoch_ours(floats, device),
        "uint8 in memory": lambda: epoch_ours(held, device),
        "uint8 streamed from the cache": lambda: epoch_ours(streamed, device),
        "ImageFolder + DataLoader(2)": lambda: epoch_dataloader(root, held, device),
    }
    times = {name: [] for name in (*loads, *epochs)}
    epoch_ours(held, device)  # untimed: the first epoch of a process pays for thread pools and allocator warm-up
    for _ in range(args.repeats):  # round-robin: drift spreads over every variant alike
        for name, run in {**loads, **epochs}.items():
            times[name].append(run())
    print(
        f"{args.repeats} repeats, medians (p10-p90), epochs on {device.type}, {torch.get_num_threads()} torch threads"
    )
    medians = {}
    for name, seconds in times.items():
        if name == next(iter(epochs)):
            print(f"one training epoch of {len(held.y_train)} images (2-stage CNN, width 16, batch 128):")
        median, p10, p90 = summary(seconds)
        medians[name] = median
        print(f"  {name:<40} {median:9.4f} s  ({p10:.4f}-{p90:.4f})")
    per_sample = 3 * args.size * args.size
    print(f"bytes per sample in memory: {per_sample:,} as uint8, {4 * per_sample:,} as float32")
    speedup = medians["first load (decode + cache)"] / medians["cached load"]
    print(
        f"cached load: {speedup:.1f}x faster than the first decode; "
        f"{medians['ImageFolder + DataLoader(2), one epoch'] / medians['cached load']:.1f}x "
        "faster than one ImageFolder epoch"
    )
    print(
        "first decode: "
        f"{medians['ImageFolder + DataLoader(2), one epoch'] / medians['first load (decode + cache)']:.2f}x "
        "the speed of one ImageFolder epoch (train split only there)"
    )
    print(
        f"target: cached load >= {TARGET:g}x faster than a first decode: {'met' if speedup >= TARGET else 'NOT met'} "
        f"({speedup:.1f}x)"
    )
    stream = medians["uint8 streamed from the cache"] / medians["uint8 in memory"]
    compact = medians["uint8 in memory"] / medians["float32 in memory (before)"]
    loader = medians["ImageFolder + DataLoader(2)"] / medians["uint8 in memory"]
    print(
        f"epoch ratios: streamed / in-memory uint8 {stream:.2f}x; uint8 / float32 {compact:.2f}x; "
        f"DataLoader / in-memory uint8 {loader:.2f}x"
    )
    print(
        f"target: streamed epoch within {STREAM_TARGET:g}x of in-memory: "
        f"{'met' if stream <= STREAM_TARGET else 'NOT met'} ({stream:.2f}x)"
    )
    print(f"target: uint8 epoch no slower than float32: {'met' if compact <= 1.0 else 'NOT met'} ({compact:.2f}x)")
    if not args.workdir:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
