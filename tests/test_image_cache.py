"""An image folder is decoded once, in parallel, into a cache keyed by its files; later loads read the cache,
a changed folder is decoded again, and a bad image is named in one line. Real PNG / JPEG files, real loaders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from nas.data.datasets import load_dataset
from nas.data.image_cache import load_image_folder
from nas.errors import DataError
from nas.search.config import DatasetConfig
from tests.test_data import write_imagefolder, write_png


def reference(root: Path, split: str, image_size: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """What torchvision's ImageFolder + PILToTensor (+ Resize) give, image by image: the way it was done before."""
    steps = [v2.PILToTensor()] + ([v2.Resize((image_size, image_size), antialias=True)] if image_size else [])
    folder = torchvision.datasets.ImageFolder(str(root / split), transform=v2.Compose(steps))
    return torch.stack([image for image, _ in folder]), list(folder.targets)


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("image_size, worker_processes", [(None, False), (6, False), (None, True)])
def test_the_first_load_decodes_as_image_folder_did_and_the_next_reads_the_cache(
    tmp_path, monkeypatch, image_size, worker_processes
):
    if worker_processes:
        monkeypatch.setattr(
            "nas.data.image_cache.IN_PROCESS", 1
        )  # decode in DataLoader worker processes even a small folder
    write_imagefolder(tmp_path / "data", per_class=3, size=(8, 8))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        tmp_path / "data" / "train" / "cat" / "j.jpg"
    )
    cache = tmp_path / "cache"

    first = load_image_folder(tmp_path / "data", image_size, str(cache))
    for split in ("train", "test"):
        images, labels = reference(tmp_path / "data", split, image_size)
        assert (
            torch.equal(torch.from_numpy(np.asarray(first[split].images)), images)
            and first[split].labels.tolist() == labels
        )
    assert len(entries(cache)) == 1

    monkeypatch.setattr("nas.data.image_cache.decode", lambda *a: pytest.fail("decoded again"))
    again = load_image_folder(tmp_path / "data", image_size, str(cache))
    assert isinstance(again["train"].images, np.memmap)
    assert np.array_equal(again["train"].images, first["train"].images) and again["test"].classes == ["cat", "dog"]


def test_a_changed_image_an_added_one_or_another_size_makes_a_new_entry(tmp_path):
    write_imagefolder(tmp_path / "data", per_class=2)
    cache = tmp_path / "cache"
    before = load_image_folder(tmp_path / "data", None, str(cache))["train"].images.copy()

    changed = tmp_path / "data" / "train" / "cat" / "0.png"
    write_png(changed, np.full((8, 8, 3), 7, np.uint8))
    os.utime(changed, ns=(1, 1))  # even with an old mtime, its size differs
    after = load_image_folder(tmp_path / "data", None, str(cache))["train"].images
    assert (after[0] == 7).all() and np.array_equal(after[1:], before[1:])

    write_png(tmp_path / "data" / "train" / "dog" / "9.png", np.zeros((8, 8, 3), np.uint8))
    assert len(load_image_folder(tmp_path / "data", None, str(cache))["train"].labels) == 5
    load_image_folder(tmp_path / "data", 4, str(cache))
    assert len(entries(cache)) == 4


def test_cache_off_writes_nothing_and_auto_writes_under_bnnas_cache(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "data", per_class=1)
    monkeypatch.setenv("BNNAS_CACHE", str(tmp_path / "auto"))

    load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path / "data"), cache="off"))
    assert entries(tmp_path / "auto") == []
    load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path / "data")))
    assert len(entries(tmp_path / "auto")) == 1


def test_an_unwritable_cache_is_said_and_the_data_still_loads(tmp_path, capsys):
    write_imagefolder(tmp_path / "data", per_class=1)
    (tmp_path / "file").write_text("not a folder")

    data = load_dataset(
        DatasetConfig(name="imagefolder", root=str(tmp_path / "data"), cache=str(tmp_path / "file" / "cache"))
    )

    assert data.x_train.shape == (2, 3, 8, 8)
    assert f"dataset.cache: cannot write to {tmp_path / 'file' / 'cache'}" in capsys.readouterr().err


@pytest.mark.parametrize("worker_processes", [False, True])
def test_a_corrupt_image_is_named_in_one_line(tmp_path, monkeypatch, worker_processes):
    if worker_processes:
        monkeypatch.setattr("nas.data.image_cache.IN_PROCESS", 1)
    write_imagefolder(tmp_path / "data", per_class=2)
    bad = tmp_path / "data" / "test" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated

    with pytest.raises(DataError) as err:
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path / "data")))
    assert str(err.value).startswith(f"dataset.root: {bad}: cannot decode the image (") and "\n" not in str(err.value)


def test_images_of_another_size_name_the_file(tmp_path):
    write_imagefolder(tmp_path / "data", per_class=2)
    odd = tmp_path / "data" / "train" / "dog" / "5.png"
    write_png(odd, np.zeros((12, 10, 3), np.uint8))

    with pytest.raises(DataError, match=rf"{odd} is 10x12, .* 8x8\); set dataset.image_size"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path / "data")))


def test_nas_search_on_a_folder_with_a_corrupt_image_exits_2_naming_it(tmp_path, capsys):
    from nas.cli import search_main

    write_imagefolder(tmp_path / "data", per_class=2)
    bad = tmp_path / "data" / "train" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    argv = [
        "--set",
        "dataset.name=imagefolder",
        "--set",
        f"dataset.root={tmp_path / 'data'}",
        "--device",
        "cpu",
        "--storage",
        f"sqlite:///{tmp_path}/nas.db",
        "--trials",
        "1",
        "--no-progress",
        "-q",  # the refusal alone on stderr
    ]

    assert search_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and f"{bad}: cannot decode the image" in err
    assert not (tmp_path / "nas.db").exists() or "imagefolder" not in (tmp_path / "nas.db").read_bytes().decode(
        "latin-1"
    )


def test_an_image_rewritten_with_its_size_and_mtime_restored_is_decoded_again(tmp_path):
    """`cp -p`, rsync and unzip restore a rewritten file's mtime; BMP keeps its size: only ctime and inode tell."""
    folder = tmp_path / "data"
    write_imagefolder(folder, per_class=2)
    image = folder / "train" / "cat" / "0.bmp"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    cache = tmp_path / "cache"
    first = load_image_folder(folder, None, str(cache))["train"].images
    assert (first[0] == 0).all() and len(entries(cache)) == 1
    before = os.stat(image)

    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(image)  # other pixels, same size
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(image)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    served = load_image_folder(folder, None, str(cache))["train"].images
    assert (served[0] == 9).all() and np.array_equal(served[1:], first[1:])
    assert len(entries(cache)) == 2


def test_another_decoder_version_makes_a_new_entry(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "data", per_class=1)
    cache = tmp_path / "cache"
    load_image_folder(tmp_path / "data", None, str(cache))
    monkeypatch.setattr("PIL.__version__", "0.0.1")
    load_image_folder(tmp_path / "data", None, str(cache))
    monkeypatch.setattr("torchvision.__version__", "0.0.1")
    load_image_folder(tmp_path / "data", None, str(cache))
    assert len(entries(cache)) == 3


def test_the_cache_keeps_under_its_cap_by_removing_the_longest_unused_entries(tmp_path, monkeypatch):
    cache, said = tmp_path / "cache", []
    for name in ("a", "b", "c"):
        write_imagefolder(tmp_path / name, per_class=2)
    load_image_folder(tmp_path / "a", None, str(cache))
    load_image_folder(tmp_path / "b", None, str(cache))
    (first, size), (second, _) = sorted(
        ((e, sum(f.stat().st_size for f in (cache / e).iterdir())) for e in entries(cache)),
        key=lambda e: (cache / e[0] / "meta.json").stat().st_mtime,
    )
    os.utime(cache / first / "meta.json", (1, 1))
    os.utime(cache / second / "meta.json", (2, 2))
    load_image_folder(tmp_path / "a", None, str(cache))  # a read: `a`'s entry is the most recently used now
    monkeypatch.setenv("BNNAS_CACHE_MAX_GB", str(2.5 * size / 2**30))  # room for two entries, not three

    load_image_folder(tmp_path / "c", None, str(cache), log=said.append)

    assert len(entries(cache)) == 2 and second not in entries(cache)  # `b`'s, the longest unused, went
    assert said == [f"dataset.cache: removed {second} (0.00 GiB, longest unused) to keep its cap"]
    monkeypatch.setenv("BNNAS_CACHE_MAX_GB", "none")
    load_image_folder(tmp_path / "b", None, str(cache))
    assert len(entries(cache)) == 3


def test_a_cache_cap_that_is_no_number_is_one_line(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "data", per_class=1)
    monkeypatch.setenv("BNNAS_CACHE_MAX_GB", "lots")
    with pytest.raises(DataError, match="BNNAS_CACHE_MAX_GB: expected a number of GiB or none, got 'lots'"):
        load_image_folder(tmp_path / "data", None, str(tmp_path / "cache"))
