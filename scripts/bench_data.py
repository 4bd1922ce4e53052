"""Benchmark: loading an image folder with bnnas's decode-once cache against torchvision's ImageFolder way.

Writes an image folder of random-content PNGs (`--images`, default 20,000 at 64x64, RGB, 10
classes; 10 % in test/), then times, round-robin over `--repeats`:

  first load     `nas.image_cache.load_image_folder` into an empty cache: list, decode in
                 parallel (threads), write the uint8 cache
  cached load    the same call once the cache holds the folder: memory-map the arrays and
                 read every byte once (np.ascontiguousarray), as training would
  ImageFolder    `torchvision.datasets.ImageFolder` + PILToTensor through a
                 `DataLoader(num_workers=2, batch_size=256)`: one epoch of the training split read

and prints medians, the p10-p90 spread and the ratios, with the bytes per sample in memory as
uint8 and as float32. Target on the 2-core CPU: cached load >= 10x faster than a first decode.

    .venv/bin/python scripts/bench_data.py
    .venv/bin/python scripts/bench_data.py --images 2000 --size 32 --repeats 2   # a quick run
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

from nas.image_cache import load_image_folder

TARGET = 10.0  # cached load at least this many times faster than the first decode


def write_folder(root: Path, images: int, size: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(images):
        split = "test" if i % 10 == 0 else "train"
        folder = root / split / f"c{i % classes}"
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


def summary(seconds: list[float]) -> tuple[float, float, float]:
    p10, p90 = np.percentile(seconds, [10, 90])
    return statistics.median(seconds), float(p10), float(p90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where the folder and caches go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    root, cache = scratch / "folder", scratch / "cache"
    start = time.perf_counter()
    write_folder(root, args.images, args.size)
    print(f"image folder: {args.images} PNGs, {args.size}x{args.size} RGB, written in {time.perf_counter() - start:.1f} s ({root})")
    load_image_folder(root, None, str(cache))  # the entry the cached loads read
    times = {"first load (decode + cache)": [], "cached load": [], "ImageFolder + DataLoader(2), one epoch": []}
    for _ in range(args.repeats):  # round-robin: drift spreads over every variant alike
        times["first load (decode + cache)"].append(first_load(root, scratch))
        times["cached load"].append(cached_load(root, cache))
        times["ImageFolder + DataLoader(2), one epoch"].append(image_folder_epoch(root))
    print(f"{args.repeats} repeats, medians (p10-p90), {torch.get_num_threads()} torch threads")
    medians = {}
    for name, seconds in times.items():
        median, p10, p90 = summary(seconds)
        medians[name] = median
        print(f"  {name:<40} {median:8.3f} s  ({p10:.3f}-{p90:.3f})")
    per_sample = 3 * args.size * args.size
    print(f"bytes per sample in memory: {per_sample:,} as uint8, {4 * per_sample:,} as float32")
    speedup = medians["first load (decode + cache)"] / medians["cached load"]
    print(f"cached load: {speedup:.1f}x faster than the first decode; "
          f"{medians['ImageFolder + DataLoader(2), one epoch'] / medians['cached load']:.1f}x faster than one ImageFolder epoch")
    print(f"first decode: {medians['ImageFolder + DataLoader(2), one epoch'] / medians['first load (decode + cache)']:.2f}x "
          "the speed of one ImageFolder epoch (train split only there)")
    print(f"target: cached load >= {TARGET:g}x faster than a first decode: {'met' if speedup >= TARGET else 'NOT met'} ({speedup:.1f}x)")
    if not args.workdir:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
