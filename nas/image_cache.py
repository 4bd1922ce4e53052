"""Decode an image folder once: in parallel, into a memory-mappable uint8 cache keyed by its files.

`torchvision.datasets.ImageFolder` decodes every image one by one on every load; a search, an
export and a fine-tune each paid that again. Here the files are listed as ImageFolder lists them
(same classes, same order), decoded by a thread pool (PIL releases the GIL while it decodes)
exactly as ImageFolder's loader does (RGB, then torchvision's PILToTensor and Resize), and
written as uint8 (N, 3, H, W) `.npy` arrays with the labels and class names. The cache key is
the folder's file list with each file's size and mtime, and `image_size`: a changed, added or
removed image, or another size, makes a new entry; later loads memory-map the arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas.errors import DataError

FORMAT = 1
SPLITS = ("train", "test")


@dataclass
class Split:
    """One split's images (uint8, N x 3 x H x W), labels (indices into `classes`) and class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


def cache_root(setting: str) -> Path | None:
    """Where `dataset.cache` puts entries: auto -> $BNNAS_CACHE, $XDG_CACHE_HOME/bnnas or ~/.cache/bnnas; off -> None."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get("BNNAS_CACHE"):
        return Path(os.environ["BNNAS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnnas"


def list_split(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names and (file, class index) pairs ImageFolder would read from `folder`."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(folder))
        return classes, make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"dataset.root: {folder}: {exc}") from None


def cache_key(listings: dict[str, tuple[list[str], list[tuple[str, int]]]], image_size: int | None) -> str:
    """sha256 of every file's path, size and mtime (and the classes, the image size and the format)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "image_size": image_size}).encode())
    for split, (classes, files) in listings.items():
        digest.update(json.dumps([split, classes]).encode())
        for path, label in files:
            stat = os.stat(path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decode(path: str, image_size: int | None) -> np.ndarray:
    """One image as ImageFolder + PILToTensor (+ Resize) give it: uint8 (3, H, W); a bad file named in one line."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    try:
        with Image.open(path) as image:
            tensor = F.pil_to_tensor(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"dataset.root: {path}: cannot decode the image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if image_size:
        tensor = F.resize(tensor, [image_size, image_size], antialias=True)
    return tensor.numpy()


def decode_split(files: list[tuple[str, int]], image_size: int | None, folder: Path, threads: int) -> np.ndarray:
    """Every file of a split decoded in parallel into one uint8 array; differing sizes refused naming a file."""
    if not files:
        return np.zeros((0, 3, image_size or 1, image_size or 1), np.uint8)
    first = decode(files[0][0], image_size)
    images = np.empty((len(files), *first.shape), np.uint8)
    images[0] = first

    def place(i: int) -> None:
        image = decode(files[i][0], image_size)
        if image.shape != first.shape:
            raise DataError(f"dataset.root: images in {folder} differ in size ({files[i][0]} is {image.shape[2]}x{image.shape[1]}, "
                            f"{files[0][0]} {first.shape[2]}x{first.shape[1]}); set dataset.image_size")
        images[i] = image

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(place, range(1, len(files))))  # list(): the first error is raised here
    return images


def available_cores() -> int:
    """Cores this process may run on: more decoding threads than that only contend for them (measured)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_image_folder(root: Path, image_size: int | None, cache: str, threads: int | None = None, log=None) -> dict[str, Split]:
    """Both splits of `root/{train,test}/<class>/*`, from the cache when it holds them, else decoded (and cached)."""
    listings = {split: list_split(root / split) for split in SPLITS}
    base = cache_root(cache)
    key = cache_key(listings, image_size)
    entry = base / f"imagefolder-{key[:24]}" if base is not None else None
    if entry is not None and (entry / "meta.json").is_file():
        return read_entry(entry)
    threads = threads or available_cores()
    splits = {split: Split(decode_split(files, image_size, root / split, threads), np.array([label for _, label in files], np.int64), classes)
              for split, (classes, files) in listings.items()}
    if entry is not None:
        write_entry(entry, splits, {"format": FORMAT, "root": str(root.absolute()), "image_size": image_size, "key": key}, log)
    return splits


def read_entry(entry: Path) -> dict[str, Split]:
    meta = json.loads((entry / "meta.json").read_text())
    return {split: Split(np.load(entry / f"{split}_images.npy", mmap_mode="r"), np.load(entry / f"{split}_labels.npy"), meta["classes"][split])
            for split in SPLITS}


def write_entry(entry: Path, splits: dict[str, Split], meta: dict, log=None) -> None:
    """Write the arrays into a temporary folder beside `entry`, then rename it: a reader sees a whole entry or none.
    A cache that cannot be written is skipped (the data is loaded all the same)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as exc:
        if log:
            log(f"dataset.cache: cannot write to {entry.parent} ({exc.strerror or exc}); images not cached")
        return
    try:
        for split, data in splits.items():
            np.save(tmp / f"{split}_images.npy", data.images)
            np.save(tmp / f"{split}_labels.npy", data.labels)
        (tmp / "meta.json").write_text(json.dumps({**meta, "classes": {s: d.classes for s, d in splits.items()},
                                                   "samples": {s: len(d.labels) for s, d in splits.items()}}, indent=1))
        os.replace(tmp, entry)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if entry.is_dir() and (entry / "meta.json").is_file():
            return  # another process cached the same folder first
        if log:
            log(f"dataset.cache: cannot write {entry} ({exc.strerror or exc}); images not cached")
