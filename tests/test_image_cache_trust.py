"""A shared cache folder (`$BNNAS_CACHE`, `dataset.cache`) must not let another local user plant images or labels.

Each test plants an entry as an attacker could (another owner, a folder or file others can write, a symbolic link to
the attacker's arrays, a meta.json of another key) and checks that the planted pixels and labels are not served: the
images are decoded again, as torchvision's ImageFolder gives them, and the refusal is said in one line. "Another
user" is `nobody` (uid 65534), which the tests can give a file to when they run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.data.datasets import load_dataset
from nas.data.image_cache import SPLITS, load_image_folder
from nas.search.config import DatasetConfig
from tests.test_data import write_imagefolder
from tests.test_image_cache import entries, reference

OTHER_UID = 65534
NOT_USED = "not used; decoding without the cache"


def cached_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An image folder, loaded once into a cache of this user's own: (folder, cache root, entry)."""
    folder, cache = tmp_path / "data", tmp_path / "cache"
    write_imagefolder(folder, per_class=2)
    load_image_folder(folder, None, str(cache))
    [name] = entries(cache)
    return folder, cache, cache / name


def plant(entry: Path) -> None:
    """What an attacker writes into an entry: white images and every label flipped, under the entry's meta.json."""
    for split in SPLITS:
        images, labels = np.load(entry / f"{split}_images.npy"), np.load(entry / f"{split}_labels.npy")
        np.save(entry / f"{split}_images.npy", np.full_like(images, 255))
        np.save(entry / f"{split}_labels.npy", 1 - labels)


def load(folder: Path, cache: Path):
    """The splits as nas-search loads them: cache messages on stderr (`nas.data.datasets` passes the same log)."""
    return load_image_folder(folder, None, str(cache), log=lambda message: print(message, file=sys.stderr))


def assert_decoded(splits, folder: Path) -> None:
    """The splits are the folder's own images and labels, not the planted ones."""
    for split in SPLITS:
        images, labels = reference(folder, split)
        assert torch.equal(torch.from_numpy(np.array(splits[split].images)), images)
        assert splits[split].labels.tolist() == labels


def mode_of(path: Path) -> str:
    return f"{stat.S_IMODE(os.lstat(path).st_mode):o}"


@pytest.mark.parametrize("attack", ["owner", "group_writable", "other_writable"])
@pytest.mark.parametrize("part", ["root", "entry", "file"])
def test_a_cache_part_another_user_owns_or_can_write_is_not_served(tmp_path, capsys, part, attack):
    folder, cache, entry = cached_folder(tmp_path)
    plant(entry)
    target = {"root": cache, "entry": entry, "file": entry / "train_images.npy"}[part]
    if attack == "owner":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(target, OTHER_UID, OTHER_UID)
        reason = f"is owned by uid {OTHER_UID}, not by this user (uid {os.geteuid()})"
    else:
        os.chmod(target, os.lstat(target).st_mode | (stat.S_IWGRP if attack == "group_writable" else stat.S_IWOTH))
        reason = f"is writable by group or others (mode {mode_of(target)})"
    capsys.readouterr()

    assert_decoded(load(folder, cache), folder)
    assert capsys.readouterr().err == f"dataset.cache: {target} {reason}: {NOT_USED}\n"
    assert entries(cache) == [entry.name]  # nothing written beside the refused entry


@pytest.mark.parametrize("part", ["root", "entry", "file"])
def test_a_symbolic_link_to_planted_arrays_is_not_followed(tmp_path, capsys, part):
    """The planted copy is owned by this user and writable by no one else: only the link is wrong."""
    folder, cache, entry = cached_folder(tmp_path)
    elsewhere = tmp_path / "attacker"
    if part == "root":
        shutil.copytree(cache, elsewhere)
        plant(elsewhere / entry.name)
        shutil.rmtree(cache)
        link = cache
    elif part == "entry":
        shutil.copytree(entry, elsewhere)
        plant(elsewhere)
        shutil.rmtree(entry)
        link = entry
    else:
        shutil.copytree(entry, elsewhere)
        plant(elsewhere)
        link = entry / "test_images.npy"
        link.unlink()
        elsewhere /= "test_images.npy"
    link.symlink_to(elsewhere)
    before = sorted(os.listdir(elsewhere)) if elsewhere.is_dir() else None
    capsys.readouterr()

    assert_decoded(load(folder, cache), folder)
    assert capsys.readouterr().err == f"dataset.cache: {link} is a symbolic link: {NOT_USED}\n"
    assert (sorted(os.listdir(elsewhere)) if elsewhere.is_dir() else None) == before  # nothing written through it


def test_an_entry_whose_meta_json_holds_another_key_is_not_served(tmp_path, capsys):
    folder, cache, entry = cached_folder(tmp_path)
    plant(entry)
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "key": "0" * 64}))
    capsys.readouterr()

    assert_decoded(load(folder, cache), folder)
    expected = f"dataset.cache: {entry / 'meta.json'} holds another key than this folder's: {NOT_USED}\n"
    assert capsys.readouterr().err == expected


def test_nothing_is_written_into_a_root_others_can_write(tmp_path, capsys):
    folder, cache = tmp_path / "data", tmp_path / "shared"
    write_imagefolder(folder, per_class=1)
    cache.mkdir()
    os.chmod(cache, 0o777)

    assert_decoded(load(folder, cache), folder)
    assert capsys.readouterr().err == f"dataset.cache: {cache} is writable by group or others (mode 777): {NOT_USED}\n"
    assert entries(cache) == []


def test_new_cache_folders_and_files_are_private_whatever_the_umask_and_are_served(tmp_path, capsys, monkeypatch):
    folder, cache = tmp_path / "data", tmp_path / "cache"
    write_imagefolder(folder, per_class=1)
    previous = os.umask(0)
    try:
        load(folder, cache)
    finally:
        os.umask(previous)
    [entry] = [cache / name for name in entries(cache)]

    assert (mode_of(cache), mode_of(entry)) == ("700", "700")
    assert {path.name: stat.S_IMODE(path.stat().st_mode) & 0o077 for path in entry.iterdir()} == dict.fromkeys(
        ["meta.json"] + [f"{s}_{kind}.npy" for s in SPLITS for kind in ("images", "labels")], 0
    )
    monkeypatch.setattr("nas.data.image_cache.decode", lambda *a: pytest.fail("decoded again"))
    assert_decoded(load(folder, cache), folder)
    assert capsys.readouterr().err == ""


def test_nas_data_says_the_refusal_on_stderr_and_loads_the_real_images(tmp_path, capsys):
    folder, cache, entry = cached_folder(tmp_path)
    plant(entry)
    os.chmod(entry, 0o777)
    capsys.readouterr()

    data = load_dataset(DatasetConfig(name="imagefolder", root=str(folder), cache=str(cache)))

    assert capsys.readouterr().err == f"dataset.cache: {entry} is writable by group or others (mode 777): {NOT_USED}\n"
    images, labels = reference(folder, "train")
    assert torch.equal(data.x_train.pixels.cpu(), images) and data.y_train.tolist() == labels
