"""Decode an image folder once: in parallel, into a memory-mappable uint8 cache keyed by its files.

`torchvision.datasets.ImageFolder` decodes every image one by one on every load; a search, an
export and a fine-tune each paid that again. Here the files are listed as ImageFolder lists them
(same classes, same order), decoded by DataLoader worker processes (one per core; threads do not
help: most of a small image's decode time holds the GIL) exactly as ImageFolder's loader does
(RGB, then torchvision's PILToTensor and Resize), and
written as uint8 (N, 3, H, W) `.npy` arrays with the labels and class names. The cache key is
the folder's file list with each file's size, mtime, ctime and inode, `image_size`, the Resize
settings and the Pillow and torchvision versions: a changed, added or removed image, another size
or another decoder makes a new entry; later loads memory-map the arrays. The mtime alone would not
do: `cp -p`, rsync and unzip restore it on a rewritten file, and the study's data fingerprint
hashes what the cache serves; a file's ctime cannot be set back, and a rewrite by rename gets a
new inode.

A cache folder may be shared (`$BNNAS_CACHE` on a cluster's scratch disk), so an entry is served only
when the root, the entry and each file read from it are this user's own, writable by no one else, and
no symbolic link (each opened with O_NOFOLLOW and checked by fstat, relative to its checked parent, so
that nothing can be swapped between the check and the read), and when its meta.json holds the key
computed here. Anything else is said in one line and the images are decoded instead; new folders are
made 0700 and files 0600 whatever the umask.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas.data.preprocessing import RESIZE, resize_images
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
    """Where `dataset.cache` puts entries: auto -> $BNNAS_CACHE, $XDG_CACHE_HOME/bnnas or ~/.cache/bnnas;
    off -> None."""
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
    """sha256 of every file's path, size, mtime, ctime and inode (and the classes, the image size, the Resize
    settings, the decoders' versions and the format)."""
    import PIL
    import torchvision

    digest = hashlib.sha256(
        json.dumps(
            {
                "format": FORMAT,
                "image_size": image_size,
                "resize": RESIZE,
                "pillow": PIL.__version__,
                "torchvision": torchvision.__version__,
            }
        ).encode()
    )
    for split, (classes, files) in listings.items():
        digest.update(json.dumps([split, classes]).encode())
        for path, label in files:
            stat = os.stat(path)
            fields = (path, label, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
            digest.update(("\0".join(map(str, fields)) + "\n").encode())
    return digest.hexdigest()


def decode(path: str, image_size: int | None) -> np.ndarray:
    """One image as ImageFolder + PILToTensor (+ Resize) give it: uint8 (3, H, W); a bad file named in one line."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    try:
        with Image.open(path) as image:
            tensor = F.pil_to_tensor(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"dataset.root: {path}: cannot decode the image "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    if image_size:
        tensor = resize_images(tensor, [image_size, image_size])
    return tensor.numpy()


class _Decoded:
    """The files of a split as a map-style dataset: (position, image or None, error or None), so that a bad
    file comes back as its one-line message rather than as a worker's traceback."""

    def __init__(self, files: list[tuple[str, int]], image_size: int | None):
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, decode(self.files[i][0], self.image_size), None
        except DataError as exc:
            return i, None, str(exc)


IN_PROCESS = 256  # fewer files than this are decoded without starting worker processes


def decode_split(files: list[tuple[str, int]], image_size: int | None, folder: Path, workers: int) -> np.ndarray:
    """Every file of a split decoded by `workers` processes into one uint8 array; differing sizes refused
    naming a file."""
    from torch.utils.data import DataLoader

    if not files:
        return np.zeros((0, 3, image_size or 1, image_size or 1), np.uint8)
    first = decode(files[0][0], image_size)
    images = np.empty((len(files), *first.shape), np.uint8)
    workers = workers if len(files) >= IN_PROCESS else 0
    for batch in DataLoader(_Decoded(files, image_size), batch_size=64, num_workers=workers, collate_fn=list):
        for i, image, error in batch:
            if error is not None:
                raise DataError(error)
            if image.shape != first.shape:
                raise DataError(
                    f"dataset.root: images in {folder} differ in size ({files[i][0]} is "
                    f"{image.shape[2]}x{image.shape[1]}, {files[0][0]} {first.shape[2]}x{first.shape[1]}); set "
                    "dataset.image_size"
                )
            images[i] = image
    return images


def available_cores() -> int:
    """Cores this process may run on: a decoding worker each."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_image_folder(
    root: Path, image_size: int | None, cache: str, workers: int | None = None, log=None
) -> dict[str, Split]:
    """Both splits of `root/{train,test}/<class>/*`, from the cache when it holds them, else decoded (and cached)."""
    listings = {split: list_split(root / split) for split in SPLITS}
    base = cache_root(cache)
    key = cache_key(listings, image_size)
    entry = base / f"imagefolder-{key[:24]}" if base is not None else None
    cached = None
    if entry is not None:
        try:
            cached = read_entry(entry, key)
        except Refused as exc:
            _say(log, f"dataset.cache: {exc}: not used; decoding without the cache")
            entry = None
        except OSError as exc:  # the root could not be made
            _say(log, f"dataset.cache: cannot write to {base} ({exc.strerror or exc}); images not cached")
            entry = None
    if cached is not None:
        return cached
    workers = workers or available_cores()
    splits = {
        split: Split(
            decode_split(files, image_size, root / split, workers),
            np.array([label for _, label in files], np.int64),
            classes,
        )
        for split, (classes, files) in listings.items()
    }
    if entry is not None:
        write_entry(
            entry, splits, {"format": FORMAT, "root": str(root.absolute()), "image_size": image_size, "key": key}, log
        )
        for gone, size in prune(entry.parent, cache_cap(), keep=entry):
            _say(log, f"dataset.cache: removed {gone.name} ({size / 2**30:.2f} GiB, longest unused) to keep its cap")
    return splits


DEFAULT_CAP_GIB = 20.0  # $BNNAS_CACHE_MAX_GB changes it


def cache_cap() -> int | None:
    """The most bytes the cache's entries may hold ($BNNAS_CACHE_MAX_GB, GiB; default 20; "none": no cap)."""
    setting = os.environ.get("BNNAS_CACHE_MAX_GB", "").strip()
    if setting.lower() == "none":
        return None
    try:
        return int(float(setting or DEFAULT_CAP_GIB) * 2**30)
    except ValueError:
        raise DataError(f"BNNAS_CACHE_MAX_GB: expected a number of GiB or none, got {setting!r}") from None


def prune(base: Path, cap: int | None, keep: Path) -> list[tuple[Path, int]]:
    """Remove this user's longest-unused entries until the cache holds at most `cap` bytes; `keep` (the entry just
    written) stays. An entry's last use is its meta.json's mtime, touched on every read. Returns what went."""
    if cap is None:
        return []
    entries = []
    for entry in base.glob("imagefolder-*"):
        try:
            info = (entry / "meta.json").lstat()
            if entry.is_symlink() or info.st_uid != os.getuid():
                continue  # another user's entry, or not one of ours: never removed here
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file() and not f.is_symlink())
        except OSError:
            continue
        entries.append((info.st_mtime, entry, size))
    total, gone = sum(size for _, _, size in entries), []
    for _, entry, size in sorted(entries, key=lambda e: e[0]):
        if total <= cap:
            break
        if entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        gone.append((entry, size))
    return gone


def _say(log, message: str) -> None:
    if log:
        log(message)


class Refused(Exception):
    """A cache folder or file that is not used: another user could have written it, or it is not this key's."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} {reason}")


def open_checked(path: Path, folder: bool, dir_fd: int | None = None) -> int:
    """A descriptor of `path` (its last name looked up in `dir_fd` when given), opened without following a
    symbolic link and refused unless it is a folder / regular file of this user that no one else can write."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path.name if dir_fd is not None else path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(path, "is a symbolic link") from None
        raise
    info, uid = os.fstat(fd), os.geteuid()
    mode = info.st_mode
    problem = (
        "is not a folder"
        if folder and not stat.S_ISDIR(mode)
        else "is not a regular file"
        if not folder and not stat.S_ISREG(mode)
        else f"is owned by uid {info.st_uid}, not by this user (uid {uid})"
        if info.st_uid != uid
        else f"is writable by group or others (mode {stat.S_IMODE(mode):o})"
        if mode & 0o022
        else None
    )
    if problem:
        os.close(fd)
        raise Refused(path, problem)
    return fd


def open_root(base: Path) -> int:
    """The cache root as a checked descriptor; made 0700 (its missing parents as the umask says) if absent."""
    base.parent.mkdir(parents=True, exist_ok=True)
    try:
        base.mkdir(mode=0o700)
    except FileExistsError:
        pass
    return open_checked(base, folder=True)


def read_entry(entry: Path, key: str) -> dict[str, Split] | None:
    """The splits an entry holds, or None when there is none; refused unless the root, the entry and its files pass
    `open_checked` and its meta.json holds `key`. The images are memory-mapped from their checked descriptors."""
    root_fd, entry_fd = open_root(entry.parent), None
    try:
        entry_fd = open_checked(entry, folder=True, dir_fd=root_fd)
        with os.fdopen(open_checked(entry / "meta.json", folder=False, dir_fd=entry_fd)) as file:
            meta = json.load(file)
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise Refused(entry / "meta.json", "holds another key than this folder's")
        try:
            os.utime("meta.json", dir_fd=entry_fd)  # last used now: the cap removes the longest unused first
        except OSError:
            pass  # a shared cache this user may read but not touch
        return {
            split: Split(
                _load_array(entry / f"{split}_images.npy", entry_fd, mmap=True),
                _load_array(entry / f"{split}_labels.npy", entry_fd, mmap=False),
                meta["classes"][split],
            )
            for split in SPLITS
        }
    except FileNotFoundError:
        return None  # no entry yet (entries appear whole, by rename)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Refused(entry, f"cannot be read ({exc})") from None
    finally:
        os.close(root_fd)
        if entry_fd is not None:
            os.close(entry_fd)


NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _load_array(path: Path, entry_fd: int, mmap: bool) -> np.ndarray:
    """One `.npy` file of an entry through a checked descriptor (`np.load` memory-maps only what it opens by name)."""
    with os.fdopen(open_checked(path, folder=False, dir_fd=entry_fd), "rb") as file:
        if not mmap:
            return np.load(file)
        shape, fortran, dtype = NPY_HEADERS[np.lib.format.read_magic(file)](file)
        return np.memmap(file, dtype=dtype, mode="r", offset=file.tell(), shape=shape, order="F" if fortran else "C")


def _private(path: str, flags: int) -> int:
    """`open`'s opener for a new cache file: readable and writable by this user only, whatever the umask."""
    return os.open(path, flags, 0o600)


def write_entry(entry: Path, splits: dict[str, Split], meta: dict, log=None) -> None:
    """Write the arrays into a temporary folder beside `entry`, then rename it: a reader sees a whole entry or none.
    A cache that cannot be written is skipped (the data is loaded all the same)."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))  # 0700
    except OSError as exc:
        _say(log, f"dataset.cache: cannot write to {entry.parent} ({exc.strerror or exc}); images not cached")
        return
    try:
        for split, data in splits.items():
            for name, array in ((f"{split}_images.npy", data.images), (f"{split}_labels.npy", data.labels)):
                with open(tmp / name, "xb", opener=_private) as file:
                    np.save(file, array)
        with open(tmp / "meta.json", "x", opener=_private) as file:
            json.dump(
                {
                    **meta,
                    "classes": {s: d.classes for s, d in splits.items()},
                    "samples": {s: len(d.labels) for s, d in splits.items()},
                },
                file,
                indent=1,
            )
        os.replace(tmp, entry)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if entry.is_dir() and (entry / "meta.json").is_file():
            return  # another process cached the same folder first
        _say(log, f"dataset.cache: cannot write {entry} ({exc.strerror or exc}); images not cached")
