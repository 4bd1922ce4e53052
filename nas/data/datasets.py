"""Datasets as tensors on the device, batched augmentation on the device, stratified k-fold.

A dataset lives whole on the device (or in host memory, streamed, when it exceeds
`dataset.device_memory`), 8-bit images as uint8 normalized per batch (`nas.data.samples`), the rest as
normalized float32; a batch is an index slice and augmentation (random crop with padding, horizontal flip)
is one tensor operation over the batch. No per-sample Dataset or DataLoader on the hot path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas.data.tabular import FEATURES, TABLES
from nas.errors import DataError
from nas.options import DATASET_NAMES


@dataclass
class Dataset:
    """Train and test splits, normalized per channel with the training split's statistics."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    augment: str = "none"  # none | crop | crop_flip
    mean: list[float] | None = None
    std: list[float] | None = None
    fingerprint: dict | None = None  # of the loaded source data (see `fingerprint`)
    raw: RawInput | None = None  # what a raw sample is, for deployment (see `RawInput`)
    budget: int | None = None  # bytes the samples were allowed on the device (dataset.device_memory)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> Dataset:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    def memory(self) -> str:
        """How the samples are held, in a few words: their bytes, their type and where (printed at search start)."""
        from nas.data.samples import CompactImages, StreamedImages

        x = self.x_train
        if isinstance(x, StreamedImages):
            return (
                f"streamed from host memory: {_size(x.nbytes + self.x_test.nbytes)} uint8, over the "
                f"{_size(self.budget)} dataset.device_memory budget of {x.device.type}"
            )
        held = x.nbytes + self.x_test.nbytes
        if isinstance(x, CompactImages):
            return f"{_size(held)} uint8 on {x.device.type} (float32 would be {_size(4 * held)})"
        return f"{_size(held)} float32 on {x.device.type}"


def _size(nbytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


@dataclass(frozen=True)
class RawInput:
    """One raw sample as the dataset's source gives it, and the loader's step from there to [0, 1].

    A deployed model is fed raw samples, not loaded datasets: its user must divide by `scale`
    (16 for digits, 255 for 8-bit images) before the normalization, or every prediction is quietly
    wrong. `image_files` says whether 8-bit image files can stand for a raw sample ("grey" or "rgb",
    divided by 255), `converted` whether training converted every image file to that colour, and
    `resize` to which square size training resized them; `resized_from`, for arrays resized after loading,
    the size of the raw samples.
    """

    description: str
    layout: str  # axes of one raw sample: HW, HWC (channels last), CHW, L or CL
    dtype: str
    scale: float
    image_files: str | None = None  # grey | rgb | None (not images)
    converted: bool = False
    resize: int | None = None
    resized_from: tuple[int, int] | None = None  # (H, W) of a raw sample that `dataset.image_size` resized
    resized_as: str | None = None  # the dtype the loader's arrays had when resized: uint8, or float32 (scaled)
    columns: tuple[str, ...] | None = None  # a feature vector's column names (tabular data), for CSV rows
    target: str | None = None  # the CSV column the classes were read from (optional in rows to predict on)


@dataclass
class Arrays:
    """What a loader returns: arrays (images N,C,H,W or signals N,L / N,C,L) and class names.

    8-bit images stay uint8 (`raw.scale` divides them into [0, 1]); everything else is float32 in [0, 1]
    or as stored."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    raw: RawInput | None = None


def _digits(cfg) -> Arrays:
    """scikit-learn's bundled 8x8 digits: offline, with a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    raw = RawInput("scikit-learn's load_digits().images: 8x8 grey, values 0..16", "HW", "float64", 16.0, "grey")
    return Arrays(x_train, y_train, x_test, y_test, [str(c) for c in digits.target_names], raw=raw)


def _torchvision(cls_name: str):
    def load(cfg) -> Arrays:
        import torchvision

        if not cfg.root:
            raise DataError(
                f"dataset.root: {cls_name} needs a folder; set dataset.root (e.g. --set dataset.root=~/data)"
            )
        root = Path(cfg.root).expanduser()
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train, test = (cls(str(root), train=flag, download=cfg.download) for flag in (True, False))
        except OSError as exc:  # a download without network, an unreadable folder
            raise DataError(
                f"dataset.root: cannot load {cls_name} into {root} (dataset.download={cfg.download}): {exc}"
            ) from None
        except (RuntimeError, AssertionError, ValueError, TypeError, KeyError) as exc:
            # torchvision's "not found or corrupted", or its idx reader failing on a damaged MNIST file
            raise DataError(_not_loaded(cls, root, cfg.download, exc)) from None

        def images(split) -> np.ndarray:  # uint8 N,C,H,W; divided by raw.scale when normalized
            data = np.asarray(split.data, dtype=np.uint8)
            return data[:, None] if data.ndim == 3 else np.ascontiguousarray(data.transpose(0, 3, 1, 2))

        grey = np.asarray(train.data).ndim == 3
        size = "x".join(map(str, np.asarray(train.data).shape[1:3]))
        raw = RawInput(
            f"torchvision {cls_name}'s .data: {size} {'grey' if grey else 'RGB, height x width x channel'}, "
            "uint8 0..255",
            "HW" if grey else "HWC",
            "uint8",
            255.0,
            "grey" if grey else "rgb",
        )
        return Arrays(
            images(train),
            np.asarray(train.targets),
            images(test),
            np.asarray(test.targets),
            list(train.classes),
            raw=raw,
        )

    return load


def _torchvision_layout(cls) -> tuple[Path, dict[str, str | None]]:
    """The folder below dataset.root torchvision reads `cls` from, and its files with their md5 (None: not checked)."""
    if hasattr(cls, "base_folder"):  # CIFAR10, CIFAR100: torchvision checks every file's md5 on load
        files = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
        return Path(cls.base_folder), {name: md5 for name, md5 in files}
    # MNIST, FashionMNIST: the unpacked idx files (torchvision's md5s are those of the .gz downloads)
    return Path(cls.__name__, "raw"), {Path(name).stem: None for name, _ in cls.resources}


def _not_loaded(cls, root: Path, download: bool, exc: Exception) -> str:
    """Why torchvision could not load `cls`: a damaged file, a dataset.root one level off, or no data at all."""
    folder, files = _torchvision_layout(cls)
    here = root / folder
    if any((here / name).is_file() for name in files):
        for name, md5 in files.items():
            problem = _file_problem(here / name, md5)
            if problem:
                return f"dataset.root: {here / name} {problem}"
    else:
        for near in _near(root, len(folder.parts)):
            if any((near / folder / name).is_file() for name in files):
                return f"dataset.root: {root} does not hold {folder}/, {near} does: set dataset.root to {near}"
    if download:
        return f"dataset.root: {cls.__name__} not found in {root} after the download: {exc}"
    return (
        f"dataset.root: {cls.__name__} not found: {here} has none of {', '.join(files)} "
        "(set dataset.download: true to fetch it)"
    )


def _near(root: Path, depth: int) -> list[Path]:
    """Where a dataset.root set one level off meant: the folders above it (it pointed into the dataset's own
    folders, up to their `depth`) and the folders in it (the dataset sits one level deeper)."""
    root = root.absolute()
    try:
        below = sorted(path for path in root.iterdir() if path.is_dir())
    except OSError:  # absent or unreadable
        below = []
    return list(root.parents)[:depth] + below


def _file_problem(path: Path, md5: str | None) -> str | None:
    """What is wrong with one file of a torchvision dataset, in words; None if nothing is."""
    from torchvision.datasets.utils import check_integrity

    if not path.is_file():
        return "is missing (the dataset's other files are there): restore it, or set dataset.download: true"
    if md5 is not None:
        failed = None if check_integrity(str(path), md5) else f"the md5 check (torchvision expects {md5})"
    else:
        problem = _idx_problem(path.read_bytes())
        failed = problem and f"the idx integrity check ({problem})"
    return (
        f"fails {failed}: corrupt or incomplete; replace it (or delete it and set dataset.download: true)"
        if failed
        else None
    )


def _idx_problem(data: bytes) -> str | None:
    """An idx file (MNIST's format: magic 0 0 8 ndim, big-endian sizes, bytes) must be as long as its header says."""
    if len(data) < 4 or data[:3] != b"\0\0\x08" or not 1 <= data[3] <= 3:
        return "no idx header of unsigned bytes"
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    expected = 4 + 4 * len(dims) + int(np.prod(dims))
    if len(data) != expected:
        return f"its header says {'x'.join(map(str, dims))}, {expected} bytes, the file has {len(data)}"
    return None


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz(cfg) -> Arrays:
    """A .npz file with x_train, y_train, x_test, y_test: images (N,C,H,W) or signals (N,L / N,C,L).

    A 3-D array is read as signals with channels; store grey images as (N,1,H,W). 2-D arrays with a
    `feature_names` array (one name per column) are feature vectors (N, F), standardized per feature as tables
    are, for the MLP family; without it, one signal channel.
    """
    if not cfg.root:
        raise DataError("dataset.root: the npz dataset needs dataset.root set to a .npz file")
    path = Path(cfg.root).expanduser()
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array, not an archive of named arrays
            raise DataError(
                f"dataset.root: {path} holds one array, not a .npz archive with the arrays {', '.join(NPZ_KEYS)} "
                "(np.savez)"
            )
        with loaded as npz:
            arrays = {key: npz[key] for key in (*NPZ_KEYS, "feature_names") if key in npz}
    except FileNotFoundError:
        raise DataError(f"dataset.root: file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"dataset.root: {path} is not a readable .npz file: {exc}") from None
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(f"dataset.root: {path} lacks the arrays {', '.join(missing)}")
    x_train, x_test = (arrays[k].astype(np.float32) for k in ("x_train", "x_test"))
    if x_train.ndim not in (2, 3, 4) or x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"dataset.root: {path}: x_train {x_train.shape} and x_test {x_test.shape} must share a sample shape (L), "
            "(C,L) or (C,H,W)"
        )
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    classes, encoded = np.unique(labels, return_inverse=True)
    n = len(arrays["y_train"])
    if len(x_train) != n or len(x_test) != len(arrays["y_test"]):
        raise DataError(f"dataset.root: {path}: x and y arrays differ in length")
    names = arrays.get("feature_names")
    if names is not None and (x_train.ndim != 2 or names.shape != (x_train.shape[1],)):
        raise DataError(
            f"dataset.root: {path}: feature_names has shape {names.shape}; it names the columns of 2-D x arrays "
            f"(here {x_train.shape}): one name each"
        )
    layout = FEATURES if names is not None else {2: "L", 3: "CL", 4: "CHW"}[x_train.ndim]
    raw = RawInput(
        f"one sample of x_train in {path.name}, as stored ({layout}, no scaling)",
        layout,
        str(arrays["x_train"].dtype),
        1.0,
        columns=None if names is None else tuple(str(n) for n in names),
    )
    return Arrays(x_train, encoded[:n], x_test, encoded[n:], [str(c) for c in classes], raw=raw)


def _imagefolder(cfg) -> Arrays:
    """`root/train/<class>/*.png` and `root/test/<class>/*.png`, read as torchvision's ImageFolder reads them,
    decoded once in parallel and cached (`nas.data.image_cache`, `dataset.cache`).

    ImageFolder numbers each split's own class folders, so both splits are renumbered onto the
    classes of either: a test split without some class still lines up with training.
    """
    from nas.data.image_cache import load_image_folder

    if not cfg.root:
        raise DataError("dataset.root: the imagefolder dataset needs dataset.root (a folder with train/ and test/)")
    root = Path(cfg.root).expanduser()
    splits = load_image_folder(root, cfg.image_size, cfg.cache, log=lambda message: print(message, file=sys.stderr))
    classes = sorted({name for split in splits.values() for name in split.classes})
    (x_train, y_train), (x_test, y_test) = (  # uint8, memory-mapped from the cache when it holds them
        (split.images, np.array([classes.index(n) for n in split.classes], dtype=np.int64)[split.labels])
        for split in (splits["train"], splits["test"])
    )
    size = f"resized to {cfg.image_size}x{cfg.image_size}" if cfg.image_size else "as stored"
    raw = RawInput(
        f"an image file decoded as RGB, {size}: height x width x channel, uint8 0..255",
        "HWC",
        "uint8",
        255.0,
        "rgb",
        converted=True,
        resize=cfg.image_size,
    )
    return Arrays(x_train, y_train, x_test, y_test, classes, raw=raw)


def _tabular(load):
    """A loader of `nas.data.tabular`'s tables as Arrays of feature vectors (raw layout F, standardized per feature)."""

    def loader(cfg) -> Arrays:
        table = load(cfg)
        raw = RawInput(table.description, FEATURES, "float64", 1.0, columns=table.columns, target=table.target)
        x_train, x_test = (x.astype(np.float32) for x in (table.x_train, table.x_test))
        return Arrays(x_train, table.y_train, x_test, table.y_test, table.classes, raw=raw)

    return loader


LOADERS = {
    "digits": _digits,
    "mnist": _torchvision("MNIST"),
    "fashion_mnist": _torchvision("FashionMNIST"),
    "cifar10": _torchvision("CIFAR10"),
    "cifar100": _torchvision("CIFAR100"),
    "npz": _npz,
    "imagefolder": _imagefolder,
    **{name: _tabular(load) for name, load in TABLES.items()},  # feature vectors (N, F): csv, breast_cancer, ...
}
assert tuple(LOADERS) == DATASET_NAMES, "nas.options.DATASET_NAMES lists the loaders, for a --help without torch"
AUTO_AUGMENT = {"cifar10": "crop_flip", "cifar100": "crop_flip"}  # what `dataset.augment: auto` is; "none" elsewhere


def resolve_augment(name: str | None, augment: str | None) -> str | None:
    """What `dataset.augment` means on dataset `name` (`auto` resolved): what trains, and what a study compares."""
    return AUTO_AUGMENT.get(name, "none") if augment == "auto" else augment


CHUNK = 4096  # samples converted at a time, so a large uint8 split is never whole as floats


def as_float(x: np.ndarray, arrays: Arrays) -> np.ndarray:
    """float32, 8-bit images divided into [0, 1] (bit for bit what their loaders gave before they kept uint8)."""
    return x.astype(np.float32) / arrays.raw.scale if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


FINGERPRINT_VERSION = 2


class Fingerprint(dict):
    """A data fingerprint (stored as the study's `nas:data`) that can state itself in an older version's terms.

    Version 1 hashed 8-bit images as float32 in [0, 1] (four times the bytes); version 2 hashes what
    is stored. A study fingerprinted in version 1 still compares with the same data: `as_version(1)`
    computes the old hash then, and only then (`legacy`: a zero-argument function giving it).
    """

    def __init__(self, fields: dict, legacy=None):
        super().__init__(fields)
        self.legacy = legacy  # None: version 1 hashed the same bytes (float data)

    @functools.cached_property
    def _version1_sha256(self) -> str:
        return self.legacy() if self.legacy is not None else self["sha256"]

    def as_version(self, version: int) -> dict:
        """This fingerprint as version `version` wrote it (version 1 had no "version" key and another hash)."""
        if version != 1:
            return self
        return {**{key: value for key, value in self.items() if key != "version"}, "sha256": self._version1_sha256}


def content_sha256(arrays: Arrays, version: int = FINGERPRINT_VERSION) -> str:
    """sha256 of x_train, y_train, x_test, y_test in that order: each x's bytes as stored (uint8 for 8-bit
    images, else float32; C order), each y as int64. Version 1 hashed 8-bit images divided into float32."""
    digest = hashlib.sha256()
    for x, y in ((arrays.x_train, arrays.y_train), (arrays.x_test, arrays.y_test)):
        for chunk in range(0, len(x), CHUNK):  # a memory-mapped split is read, never copied whole
            part = x[chunk : chunk + CHUNK]
            digest.update(np.ascontiguousarray(as_float(part, arrays) if version == 1 else part).data)
        digest.update(np.ascontiguousarray(y, dtype=np.int64).data)
    return digest.hexdigest()


def _legacy_sha256(cfg) -> str:
    """The version-1 hash of the data `cfg` names, loaded again (only a study fingerprinted in version 1 asks)."""
    return content_sha256(LOADERS[cfg.name](cfg), version=1)


def fingerprint(arrays: Arrays, cfg) -> Fingerprint:
    """What identifies the loaded data: sample shape, class names, split sizes and a hash of the content.

    The hash covers the raw arrays as the loader gives them (before `dataset.transforms`, which
    the study compares as config keys), so a replaced or edited file is seen even when its shape
    and classes stay. Float data hashes the same bytes in both versions; only 8-bit images need
    the version-1 hash recomputed (from `cfg`).
    """
    fields = {
        "version": FINGERPRINT_VERSION,
        "sample_shape": list(arrays.x_train.shape[1:]),
        "classes": [str(c) for c in arrays.classes],
        "train": int(len(arrays.y_train)),
        "test": int(len(arrays.y_test)),
        "sha256": content_sha256(arrays),
    }
    return Fingerprint(fields, functools.partial(_legacy_sha256, cfg) if arrays.x_train.dtype == np.uint8 else None)


def load_dataset(cfg, device: torch.device | str = "cpu", normalization=None) -> Dataset:
    """Load the dataset a `DatasetConfig` names, apply its transforms, normalize it and put it on `device`.

    `normalization` ({"mean": [...], "std": [...]}, per channel, or a function of the channel count giving one or
    None) replaces the training split's statistics: a fine-tuned model must see inputs normalized as its source
    data was, or the input normalization would quietly undo a brightness or contrast shift. 8-bit images without
    transforms stay uint8 and are normalized per batch (`nas.data.samples`), streamed from host memory
    when they exceed `dataset.device_memory`.
    """
    from nas.data.transforms import apply_transforms

    arrays = LOADERS[cfg.name](cfg)
    _refuse_untrained_classes(arrays, cfg)
    augment = resolve_augment(cfg.name, cfg.augment)
    source = fingerprint(arrays, cfg)  # of the source: `dataset.image_size` and the label budget are keys compared
    arrays = labelled(arrays, cfg)
    common = dict(
        name=cfg.name,
        y_train=torch.as_tensor(arrays.y_train, dtype=torch.long),
        y_test=torch.as_tensor(arrays.y_test, dtype=torch.long),
        classes=arrays.classes,
        augment=augment,
        fingerprint=source,
    )
    arrays = resized(arrays, cfg)
    common["raw"] = arrays.raw
    if arrays.x_train.dtype == np.uint8 and not cfg.transforms:
        mean, std = _override(cfg, *pixel_statistics(arrays.x_train, arrays.raw.scale), normalization)
        return _compact(arrays, mean, std, device, memory_budget(cfg, device), common)
    x_train, x_test = apply_transforms(
        as_float(arrays.x_train, arrays), as_float(arrays.x_test, arrays), cfg.transforms, cfg.transform_seed
    )
    # All but the channel axis; (N, L) is one channel; a feature vector (N, F) is standardized per feature.
    axes = (0,) if arrays.raw.layout == FEATURES else (0, 1) if x_train.ndim == 2 else (0, *range(2, x_train.ndim))
    spread = x_train.std(axis=axes, keepdims=True)
    if arrays.raw.layout == FEATURES:  # a feature constant in training (a digit's corner pixel) keeps its scale, as
        spread = np.where(spread > 0, spread, 1.0).astype(np.float32)  # scikit-learn's StandardScaler keeps it
    mean, std = _override(cfg, x_train.mean(axis=axes, keepdims=True), spread + 1e-8, normalization)
    if augment != "none" and x_train.ndim != 4:
        raise DataError(
            f"dataset.augment: '{augment}' needs images (N,C,H,W); {cfg.name} has samples of shape {x_train.shape[1:]}"
        )
    return Dataset(
        x_train=torch.from_numpy((x_train - mean) / std),
        x_test=torch.from_numpy((x_test - mean) / std),
        mean=mean.reshape(-1).tolist(),
        std=std.reshape(-1).tolist(),
        **common,
    ).to(device)


def _override(cfg, mean: np.ndarray, std: np.ndarray, normalization) -> tuple[np.ndarray, np.ndarray]:
    """The training split's statistics, or the given `normalization` in their shape (a channel count that
    differs refused)."""
    if callable(normalization):  # given the channel count (a checkpoint's RGB statistics for grey data)
        normalization = normalization(int(mean.size))
    if normalization is None:
        return mean, std
    shape = mean.shape
    mean, std = (np.asarray(normalization[k], dtype=np.float32) for k in ("mean", "std"))
    if mean.size != int(np.prod(shape)):
        raise DataError(
            f"dataset: {cfg.name} has {int(np.prod(shape))} input channel(s); the model was trained on {mean.size}"
        )
    return mean.reshape(shape), std.reshape(shape)


def pixel_statistics(pixels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (+1e-8) of uint8 images (N, C, H, W) divided by `scale`, shaped (1, C, 1, 1).

    Counted exactly from each channel's histogram, chunk by chunk: a memory-mapped split is read
    once and never held as floats."""
    channels = pixels.shape[1]
    counts = np.zeros((channels, 256), np.int64)
    for start in range(0, len(pixels), CHUNK):
        chunk = np.asarray(pixels[start : start + CHUNK])
        for c in range(channels):
            counts[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / scale
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / n
    shape = (1, channels, 1, 1)
    return mean.astype(np.float32).reshape(shape), (np.sqrt(var) + 1e-8).astype(np.float32).reshape(shape)


DEVICE_MEMORY_SHARE = 0.5  # dataset.device_memory's default: this share of the device's free memory


def memory_budget(cfg, device: torch.device | str) -> int:
    """Bytes the samples may take on `device`: dataset.device_memory (GB), or half its free memory now."""
    if cfg.device_memory is not None:
        return int(cfg.device_memory * 1e9)
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(DEVICE_MEMORY_SHARE * free)


def _compact(arrays: Arrays, mean: np.ndarray, std: np.ndarray, device, budget: int, common: dict) -> Dataset:
    """uint8 samples normalized per batch: on the device when both splits fit `budget`, else streamed."""
    from nas.data.samples import CompactImages, StreamedImages

    scale, stats = arrays.raw.scale, (torch.from_numpy(mean.reshape(-1)), torch.from_numpy(std.reshape(-1)))
    if arrays.x_train.nbytes + arrays.x_test.nbytes > budget:
        x_train, x_test = (StreamedImages(x, scale, *stats, device) for x in (arrays.x_train, arrays.x_test))
    else:
        x_train, x_test = (
            CompactImages(torch.from_numpy(np.array(x)), scale, *stats).to(device)  # read into memory
            for x in (arrays.x_train, arrays.x_test)
        )
    return Dataset(
        x_train=x_train,
        x_test=x_test,
        mean=mean.reshape(-1).tolist(),
        std=std.reshape(-1).tolist(),
        budget=budget,
        **common,
    )


def resized(arrays: Arrays, cfg) -> Arrays:
    """Images resized to `dataset.image_size` (square), as loaded: uint8 stays uint8. Image folders are resized
    as each file is decoded (`nas.data.image_cache`); other sources here, a chunk at a time."""
    from nas.data.preprocessing import resize_images

    if not cfg.image_size or cfg.name == "imagefolder":
        return arrays
    if arrays.x_train.ndim != 4:
        raise DataError(
            f"dataset.image_size: resizes images (N,C,H,W); {cfg.name} has samples of shape "
            f"{tuple(arrays.x_train.shape[1:])}"
        )
    size = [cfg.image_size, cfg.image_size]

    def resize(x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), x.shape[1], *size), x.dtype)
        for start in range(0, len(x), CHUNK):
            out[start : start + CHUNK] = resize_images(torch.from_numpy(np.array(x[start : start + CHUNK])), size)
        return out

    raw = dataclasses.replace(
        arrays.raw,
        resize=cfg.image_size,
        resized_from=tuple(arrays.x_train.shape[2:]),
        resized_as="uint8" if arrays.x_train.dtype == np.uint8 else "float32",
    )
    return dataclasses.replace(arrays, x_train=resize(arrays.x_train), x_test=resize(arrays.x_test), raw=raw)


def stratified_subset(y: np.ndarray, per_class: int, seed: int, where: str, instead: str) -> np.ndarray:
    """Sorted indices of `per_class` samples of every class, drawn by `seed`; too few of a class is a DataError
    naming `where` and what to do `instead`."""
    generator = np.random.default_rng(seed)
    picked = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        if len(members) < per_class:
            raise DataError(
                f"{where}: {per_class} asked, but class {label} has only {len(members)} training samples ({instead})"
            )
        picked.append(generator.permutation(members)[:per_class])
    return np.sort(np.concatenate(picked))


def labelled(arrays: Arrays, cfg) -> Arrays:
    """The training split cut to `dataset.labels_per_class` samples per class (a small labelled target, as a
    practitioner fine-tuning on a few hundred images has); the test split is kept whole."""
    if cfg.labels_per_class is None:
        return arrays
    keep = stratified_subset(
        arrays.y_train,
        cfg.labels_per_class,
        cfg.labels_seed,
        "dataset.labels_per_class",
        "use a smaller K, or leave the key out for every image",
    )
    return dataclasses.replace(arrays, x_train=arrays.x_train[keep], y_train=arrays.y_train[keep])


def _refuse_untrained_classes(arrays: Arrays, cfg) -> None:
    """A class in the test split but not in training would get an output that never trains."""
    untrained = np.setdiff1d(np.unique(arrays.y_test), np.unique(arrays.y_train))
    if untrained.size:
        where = f"dataset.root: {cfg.root}" if cfg.root else f"dataset.name: {cfg.name}"
        names = ", ".join(arrays.classes[i] for i in untrained)
        raise DataError(
            f"{where}: the test split has class(es) {names} that the training split lacks; a model cannot learn them"
        )


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding (size // 8) and, for `crop_flip`, horizontal flips, batched.

    Zero padding of normalized data pads with the channel mean, as Normalize-then-pad would.
    """
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    if mode == "crop_flip":
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train, validation) index tensors per fold, on the labels' device; scikit-learn's StratifiedKFold."""
    from sklearn.model_selection import StratifiedKFold

    y = labels.cpu().numpy()
    smallest = np.unique(y, return_counts=True)[1].min() if len(y) else 0
    if smallest < folds:
        raise DataError(
            f"evaluation.folds: {folds} folds need at least {folds} samples of every class; the smallest class has "
            f"{smallest}"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [
        (torch.as_tensor(tr, device=labels.device), torch.as_tensor(va, device=labels.device))
        for tr, va in splitter.split(np.zeros(len(y)), y)
    ]
