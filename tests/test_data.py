"""nas.data.datasets: every loader on real small files written here, normalization, k-fold splits, batched augmentation.

No network: CIFAR and image folders are written in their real on-disk formats under tmp_path.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torchvision
from PIL import Image

from nas.cli import search_main
from nas.data.datasets import LOADERS, augment_batch, load_dataset, stratified_folds
from nas.errors import DataError, NasError
from nas.search.config import DatasetConfig

# --------------------------------------------------------------------------- helpers


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


CIFAR_LAYOUTS = {
    # name: (torchvision class, folder, train files, test files, meta file, meta key, label key)
    "cifar10": (
        torchvision.datasets.CIFAR10,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": (
        torchvision.datasets.CIFAR100,
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_label_names",
        "fine_labels",
    ),
}


def write_cifar(
    root: Path, name: str, monkeypatch, n_train_per_file: int = 4, n_test: int = 6, n_classes: int = 3, seed: int = 0
):
    """Write a tiny dataset in the real CIFAR pickle layout torchvision reads.

    torchvision verifies each file against a hard-coded md5 of the real CIFAR release, which no
    test-written file can match; so the checksum tables (and only those) are monkeypatched to the
    md5 of the files written here: torchvision still opens, verifies and unpickles them itself.
    """
    cls, folder, train_files, test_files, meta_file, meta_key, label_key = CIFAR_LAYOUTS[name]
    rng = np.random.default_rng(seed)
    base = root / folder
    base.mkdir(parents=True)
    written = {}
    for files, n in ((train_files, n_train_per_file * 5 // len(train_files)), (test_files, n_test)):
        for fname in files:
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, n_classes, size=n)]
            _write_pickle(base / fname, {"data": data, label_key: labels})
            written[fname] = (data, labels)
    class_names = [f"class_{i}" for i in range(n_classes)]
    _write_pickle(base / meta_file, {meta_key: class_names})
    monkeypatch.setattr(cls, "train_list", [[f, _md5(base / f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(base / f)] for f in test_files])
    monkeypatch.setattr(cls, "meta", {"filename": meta_file, "key": meta_key, "md5": _md5(base / meta_file)})
    train = [written[f] for f in train_files]
    test = [written[f] for f in test_files]
    return (
        np.concatenate([d for d, _ in train]),
        sum((labels for _, labels in train), []),
        np.concatenate([d for d, _ in test]),
        sum((labels for _, labels in test), []),
        class_names,
    )


MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # root/<folder>/raw/, as torchvision reads them


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes: magic 0 0 8 ndim, each size as a big-endian int32, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, name: str, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """The four unpacked MNIST idx files under root/MNIST/raw/ (FashionMNIST/raw/); returns the arrays written."""
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), np.arange(n) % 10
        write_idx(root / MNIST_FOLDERS[name] / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / MNIST_FOLDERS[name] / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        written[prefix] = (images, labels)
    return written


def sine_signals(n: int, length: int = 32, channels: int | None = None, seed: int = 0):
    """Two learnable classes: slow and fast sine waves with random phase and a little noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = np.arange(length) / length
    freq = np.where(y == 0, 2.0, 6.0)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    x = np.sin(2 * np.pi * freq * t + phase) + 0.1 * rng.standard_normal((n, length))
    if channels is not None:
        x = np.stack([x * (c + 1) for c in range(channels)], axis=1)
    return x.astype(np.float32), y


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(8, 8), seed: int = 0) -> dict:
    """root/{train,test}/<class>/<i>.png, RGB; returns the pixels written, per split and class."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                write_png(root / split / c / f"{i}.png", img)
                pixels[(split, c, i)] = img
    return pixels


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.ndim) if d != 1]
    return x.mean(dim=dims), x.std(dim=dims, unbiased=False)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_folder_loads_as_uint8_nchw_read_as_normalized_float32_with_labels_and_class_names(
    tmp_path, monkeypatch, name
):
    x_train_raw, y_train_raw, x_test_raw, y_test_raw, class_names = write_cifar(tmp_path, name, monkeypatch)

    data = load_dataset(DatasetConfig(name=name, root=str(tmp_path)))

    assert data.x_train.shape == (len(y_train_raw), 3, 32, 32)
    assert data.x_test.shape == (len(y_test_raw), 3, 32, 32)
    assert data.x_train.pixels.dtype == torch.uint8 and data.x_train[:2].dtype == torch.float32
    assert data.input_shape == (3, 32, 32)
    mean, std = channel_stats(data.x_train.float())
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(std, torch.ones(3), atol=1e-4)
    assert data.y_train.tolist() == y_train_raw
    assert data.y_test.tolist() == y_test_raw
    assert data.classes == class_names and data.num_classes == len(class_names)
    # The pixels themselves round-trip: CIFAR rows are channel-major 3x32x32.
    m, s = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    expected = torch.from_numpy(x_test_raw.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    assert torch.allclose(data.x_test.float() * s + m, expected, atol=1e-5)


def test_cifar10_auto_augment_resolves_to_crop_flip_and_explicit_choice_wins(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", monkeypatch)

    assert load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), augment="auto")).augment == "crop_flip"
    assert load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), augment="none")).augment == "none"


def data_error(name: str, root: Path) -> str:
    """The one-line DataError that loading `name` from `root` raises."""
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name=name, root=str(root)))
    message = str(info.value)
    assert "\n" not in message and message.startswith("dataset.root: ")
    return message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_cifar_file_that_fails_its_md5_is_named_with_the_check(tmp_path, monkeypatch, name):
    write_cifar(tmp_path, name, monkeypatch)
    _, folder, train_files, *_ = CIFAR_LAYOUTS[name]
    damaged = tmp_path / folder / train_files[-1]
    damaged.write_bytes(damaged.read_bytes()[:-10])  # a truncated download

    message = data_error(name, tmp_path)

    assert f"{damaged} fails the md5 check" in message
    assert "not found" not in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_one_level_below_dataset_root_names_the_root_to_set(tmp_path, monkeypatch, name):
    write_cifar(tmp_path / name, name, monkeypatch)  # root/cifar10/cifar-10-batches-py, root was set

    message = data_error(name, tmp_path)

    assert message.endswith(f"set dataset.root to {tmp_path / name}")
    assert load_dataset(DatasetConfig(name=name, root=str(tmp_path / name))).num_classes == 3  # the advice works


def test_a_missing_mnist_names_the_files_it_looked_for_once(tmp_path):
    message = data_error("mnist", tmp_path)

    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message
    assert "download: true" in message and "download=True" not in message  # not torchvision's sentence again


def test_dataset_root_pointing_into_the_cifar_folder_names_the_root_to_set(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", monkeypatch)

    message = data_error("cifar10", tmp_path / "cifar-10-batches-py")

    assert message.endswith(f"set dataset.root to {tmp_path}")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_idx_files_load_as_nchw_with_labels(tmp_path, name):
    written = write_mnist(tmp_path, name)

    data = load_dataset(DatasetConfig(name=name, root=str(tmp_path)))

    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert data.y_train.tolist() == written["train"][1].tolist() and data.y_test.tolist() == written["t10k"][1].tolist()
    assert data.num_classes == 10


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize(
    "damage", [lambda b: b[:-100], lambda b: b"\x00\x00\x0d" + b[3:]], ids=["truncated", "bad-magic"]
)
def test_a_damaged_mnist_idx_file_is_named_with_the_integrity_check(tmp_path, name, damage):
    write_mnist(tmp_path, name)
    damaged = tmp_path / MNIST_FOLDERS[name] / "raw" / "t10k-images-idx3-ubyte"
    damaged.write_bytes(damage(damaged.read_bytes()))

    message = data_error(name, tmp_path)

    assert f"{damaged} fails the idx integrity check" in message


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_one_level_off_names_the_root_to_set(tmp_path, name):
    write_mnist(tmp_path / "data", name)
    folder = tmp_path / "data" / MNIST_FOLDERS[name]

    too_high, too_deep = data_error(name, tmp_path), data_error(name, folder / "raw")

    assert too_high.endswith(f"set dataset.root to {tmp_path / 'data'}")
    assert too_deep.endswith(f"set dataset.root to {tmp_path / 'data'}")


def test_missing_cifar_without_download_names_the_root_and_the_download_flag(tmp_path):
    root = tmp_path / "no-cifar-here"

    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name="cifar10", root=str(root), download=False))

    message = str(info.value)
    assert str(root) in message
    assert "dataset.download" in message
    assert "\n" not in message


def test_torchvision_dataset_without_root_asks_for_dataset_root():
    with pytest.raises(DataError, match=r"dataset\.root"):
        load_dataset(DatasetConfig(name="cifar10", root=None))


SPACE_YAML = """\
stages: 1
blocks_per_stage: 1
width: 8
block:
  norm:
    type: {choice: [batch, none]}
training:
  batch_size: 16
"""


def write_run_config(tmp_path: Path, dataset: str, trials: int = 2) -> Path:
    (tmp_path / "space.yaml").write_text(SPACE_YAML)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"dataset: {dataset}\n"
        "search_space: space.yaml\n"
        f'study: {{name: data-test, storage: "sqlite:///{tmp_path}/nas.db", sampler: tpe, trials: {trials}, seed: 0}}\n'
        "evaluation: {folds: 2, epochs: 1}\n"
        "device: cpu\n"
    )
    return config


@pytest.fixture(scope="module")
def missing_cifar_cli_run(tmp_path_factory):
    """One real `nas-search` process (what a user runs) on a config whose CIFAR folder is empty."""
    tmp_path = tmp_path_factory.mktemp("missing_cifar")
    root = tmp_path / "no-cifar-here"
    config = write_run_config(tmp_path, f"{{name: cifar10, root: {root}, download: false}}")
    proc = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    return proc, root


@pytest.mark.slow
def test_missing_cifar_through_the_cli_exits_2_without_traceback(missing_cifar_cli_run):
    proc, root = missing_cifar_cli_run

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert str(root) in last and "dataset.download" in last


def test_missing_cifar_through_the_cli_prints_exactly_one_line_on_stderr(missing_cifar_cli_run):
    proc, _ = missing_cifar_cli_run

    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------- npz


def test_npz_images_load_as_nchw_with_per_channel_normalization(tmp_path):
    rng = np.random.default_rng(0)
    x_train = (
        rng.uniform(0, 5, size=(12, 2, 6, 6)).astype(np.float32)
        * np.array([1.0, 10.0], dtype=np.float32)[:, None, None]
    )
    x_test = rng.uniform(0, 5, size=(4, 2, 6, 6)).astype(np.float32)
    path = write_npz(
        tmp_path / "img.npz", x_train=x_train, y_train=np.arange(12) % 3, x_test=x_test, y_test=np.arange(4) % 3
    )

    data = load_dataset(DatasetConfig(name="npz", root=str(path)))

    assert data.input_shape == (2, 6, 6) and data.x_test.shape == (4, 2, 6, 6)
    assert data.augment == "none"  # an npz says nothing about what augmentation suits it
    mean, std = channel_stats(data.x_train)
    assert torch.allclose(mean, torch.zeros(2), atol=1e-5)
    assert torch.allclose(std, torch.ones(2), atol=1e-4)
    assert data.classes == ["0", "1", "2"]


@pytest.mark.parametrize("channels", [None, 3], ids=["N,L", "N,C,L"])
def test_npz_signals_keep_their_shape(tmp_path, channels):
    x_train, y_train = sine_signals(20, length=32, channels=channels)
    x_test, y_test = sine_signals(6, length=32, channels=channels, seed=1)
    path = write_npz(tmp_path / "sig.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

    data = load_dataset(DatasetConfig(name="npz", root=str(path)))

    expected = (32,) if channels is None else (channels, 32)
    assert data.input_shape == expected
    assert data.x_train.shape == (20, *expected) and data.x_test.shape == (6, *expected)
    assert data.x_train.dtype == torch.float32
    assert data.y_train.tolist() == y_train.tolist()


def test_npz_signals_without_channel_axis_are_normalized_as_one_channel(tmp_path):
    x_train, y_train = sine_signals(20, length=32)
    x_train = x_train + np.linspace(0, 3, 32, dtype=np.float32)  # a shared trend must survive normalization
    path = write_npz(tmp_path / "sig.npz", x_train=x_train, y_train=y_train, x_test=x_train[:4], y_test=y_train[:4])

    data = load_dataset(DatasetConfig(name="npz", root=str(path)))

    assert len(data.mean) == 1 and len(data.std) == 1
    assert data.x_train.mean().abs() < 1e-5 and (data.x_train.std(unbiased=False) - 1).abs() < 1e-4


def test_npz_string_labels_are_encoded_consistently_across_splits(tmp_path):
    y_train = np.array(["dog", "cat", "eel", "cat", "dog", "eel"])
    y_test = np.array(["eel", "dog", "cat"])
    path = write_npz(
        tmp_path / "s.npz",
        x_train=np.zeros((6, 8), np.float32),
        y_train=y_train,
        x_test=np.ones((3, 8), np.float32),
        y_test=y_test,
    )

    data = load_dataset(DatasetConfig(name="npz", root=str(path)))

    assert data.classes == ["cat", "dog", "eel"]
    assert data.y_train.dtype == torch.long
    assert [data.classes[i] for i in data.y_train] == y_train.tolist()
    assert [data.classes[i] for i in data.y_test] == y_test.tolist()


def test_npz_non_contiguous_int_labels_become_0_to_k_minus_1(tmp_path):
    y_train = np.array([42, 3, 7, 3, 42, 7])
    y_test = np.array([7, 42])
    path = write_npz(
        tmp_path / "s.npz",
        x_train=np.zeros((6, 8), np.float32),
        y_train=y_train,
        x_test=np.zeros((2, 8), np.float32),
        y_test=y_test,
    )

    data = load_dataset(DatasetConfig(name="npz", root=str(path)))

    assert data.classes == ["3", "7", "42"]
    assert sorted(set(data.y_train.tolist())) == [0, 1, 2]
    assert [data.classes[i] for i in data.y_train] == [str(v) for v in y_train]
    assert [data.classes[i] for i in data.y_test] == [str(v) for v in y_test]


def _npz_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name="npz", root=str(path)))
    message = str(info.value)
    assert message.startswith("dataset.root")
    return message


def test_npz_missing_arrays_are_named(tmp_path):
    path = write_npz(tmp_path / "m.npz", x_train=np.zeros((4, 8)), y_train=np.zeros(4))

    message = _npz_error(path)

    assert "x_test" in message and "y_test" in message and str(path) in message


@pytest.mark.parametrize(
    "arrays",
    [
        dict(x_train=np.zeros((4, 8)), y_train=np.zeros(4), x_test=np.zeros((2, 9)), y_test=np.zeros(2)),
        dict(x_train=np.zeros(4), y_train=np.zeros(4), x_test=np.zeros(2), y_test=np.zeros(2)),
        dict(
            x_train=np.zeros((4, 1, 2, 3, 4)), y_train=np.zeros(4), x_test=np.zeros((2, 1, 2, 3, 4)), y_test=np.zeros(2)
        ),
        dict(x_train=np.zeros((4, 8)), y_train=np.zeros(5), x_test=np.zeros((2, 8)), y_test=np.zeros(2)),
        dict(x_train=np.zeros((4, 8)), y_train=np.zeros(4), x_test=np.zeros((2, 8)), y_test=np.zeros(3)),
    ],
    ids=["sample-shapes-differ", "1-d-x", "5-d-x", "train-lengths-differ", "test-lengths-differ"],
)
def test_npz_wrong_shapes_are_a_data_error_naming_dataset_root(tmp_path, arrays):
    path = write_npz(tmp_path / "bad.npz", **arrays)

    assert str(path) in _npz_error(path)


def test_npz_missing_or_unreadable_file_is_a_data_error(tmp_path):
    assert "not found" in _npz_error(tmp_path / "absent.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip archive")
    assert str(garbage) in _npz_error(garbage)


def test_a_single_npy_array_as_npz_root_is_named_not_a_type_error(tmp_path):
    single = tmp_path / "x.npy"
    np.save(single, np.zeros((3, 3)))

    message = _npz_error(single)

    assert str(single) in message and "one array" in message and "x_train" in message


def test_npz_without_root_asks_for_dataset_root():
    with pytest.raises(DataError, match=r"dataset\.root"):
        load_dataset(DatasetConfig(name="npz", root=None))


def test_crop_augmentation_on_signals_is_a_data_error_naming_dataset_augment(tmp_path):
    x, y = sine_signals(8)
    path = write_npz(tmp_path / "sig.npz", x_train=x, y_train=y, x_test=x, y_test=y)

    with pytest.raises(DataError, match=r"dataset\.augment"):
        load_dataset(DatasetConfig(name="npz", root=str(path), augment="crop"))


def test_npz_signals_search_end_to_end_through_the_cli(tmp_path):
    x_train, y_train = sine_signals(64, length=32)
    x_test, y_test = sine_signals(16, length=32, seed=1)
    npz = write_npz(tmp_path / "sines.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    config = write_run_config(tmp_path, f"{{name: npz, root: {npz}}}", trials=2)

    code = search_main(["--config", str(config), "--no-progress"])

    assert code == 0
    study = optuna.load_study(study_name="data-test", storage=f"sqlite:///{tmp_path}/nas.db")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2
    for trial in complete:
        attrs = trial.user_attrs
        assert {"arch", "fold_losses", "fold_accuracies", "cv_accuracy", "params", "train_seconds"} <= set(attrs)
        assert len(attrs["fold_losses"]) == 2 and len(attrs["fold_accuracies"]) == 2
        assert all(math.isfinite(v) for v in attrs["fold_losses"])
        assert 0.0 <= attrs["cv_accuracy"] <= 1.0
        assert attrs["params"] > 0 and attrs["train_seconds"] >= 0
        assert attrs["arch"]["stages"][0]["width"] == 8
        assert trial.value == pytest.approx(sum(attrs["fold_losses"]) / 2)


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_loads_pngs_with_class_names_and_pixels(tmp_path):
    pixels = write_imagefolder(tmp_path, per_class=3, size=(8, 8))

    data = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))

    assert data.x_train.shape == (6, 3, 8, 8) and data.x_test.shape == (6, 3, 8, 8)
    assert data.classes == ["cat", "dog"]
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    m, s = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    first_dog = torch.from_numpy(pixels[("test", "dog", 0)].transpose(2, 0, 1).astype(np.float32) / 255.0)
    assert torch.allclose(data.x_test[3] * s + m, first_dog, atol=1e-5)


def test_imagefolder_images_of_different_sizes_need_image_size(tmp_path):
    write_imagefolder(tmp_path, size=(8, 8))
    write_png(tmp_path / "train" / "cat" / "big.png", np.zeros((12, 10, 3), np.uint8))

    with pytest.raises(DataError, match=r"image_size"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_with_image_size_resizes_every_image(tmp_path):
    write_imagefolder(tmp_path, size=(8, 8))
    write_png(tmp_path / "train" / "cat" / "big.png", np.zeros((12, 10, 3), np.uint8))

    data = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=6))

    assert data.x_train.shape == (7, 3, 6, 6) and data.x_test.shape == (6, 3, 6, 6)


def test_imagefolder_without_test_split_is_a_data_error(tmp_path):
    write_png(tmp_path / "train" / "cat" / "0.png", np.zeros((8, 8, 3), np.uint8))

    with pytest.raises(DataError, match=r"dataset\.root"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_test_class_that_train_lacks_is_refused_naming_it(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog"))
    write_png(tmp_path / "test" / "eel" / "0.png", np.zeros((8, 8, 3), np.uint8))

    message = data_error("imagefolder", tmp_path)

    assert message == (
        f"dataset.root: {tmp_path}: the test split has class(es) eel that the training split lacks; "
        "a model cannot learn them"
    )


def test_imagefolder_test_split_without_some_class_keeps_the_training_labels(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog", "eel"), per_class=2)
    shutil.rmtree(tmp_path / "test" / "dog")  # ImageFolder alone would number eel 1 in test/, 2 in train/

    data = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))

    assert data.classes == ["cat", "dog", "eel"]
    assert data.y_train.tolist() == [0, 0, 1, 1, 2, 2]
    assert [data.classes[i] for i in data.y_test] == ["cat", "cat", "eel", "eel"]


def test_npz_test_label_absent_from_training_is_refused_naming_it(tmp_path):
    path = write_npz(
        tmp_path / "s.npz",
        x_train=np.zeros((4, 8), np.float32),
        y_train=np.array([3, 7, 3, 7]),
        x_test=np.zeros((3, 8), np.float32),
        y_test=np.array([3, 9, 42]),
    )

    message = _npz_error(path)

    assert message == (
        f"dataset.root: {path}: the test split has class(es) 9, 42 that the training split lacks; "
        "a model cannot learn them"
    )


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetConfig(name="digits"))


def test_digits_split_is_fixed_stratified_and_about_a_fifth_test(digits):
    again = load_dataset(DatasetConfig(name="digits"))

    assert torch.equal(digits.x_train, again.x_train) and torch.equal(digits.y_test, again.y_test)
    n_train, n_test = len(digits.y_train), len(digits.y_test)
    assert n_train + n_test == 1797
    assert abs(n_test / (n_train + n_test) - 0.2) < 0.01
    assert digits.classes == [str(i) for i in range(10)]
    train_counts, test_counts = (
        torch.bincount(digits.y_train, minlength=10),
        torch.bincount(digits.y_test, minlength=10),
    )
    assert (train_counts > 0).all() and (test_counts > 0).all()
    # stratified: each class's share of the test split matches its share of the whole
    share = test_counts.float() / (train_counts + test_counts).float()
    assert ((share - 0.2).abs() < 0.03).all()
    assert digits.input_shape == (1, 8, 8) and digits.augment == "none"


def test_digits_normalization_comes_from_the_training_split_only(digits):
    raw = LOADERS["digits"](DatasetConfig(name="digits"))
    train_mean, train_std = float(raw.x_train.mean()), float(raw.x_train.std())
    all_mean = float(np.concatenate([raw.x_train, raw.x_test]).mean())
    assert abs(train_mean - all_mean) > 1e-5  # else this test could not tell the two apart

    assert digits.mean == pytest.approx([train_mean], abs=1e-6)
    assert digits.std == pytest.approx([train_std], abs=1e-6)
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert abs(float(digits.x_test.mean())) > 1e-4  # the test split is not renormalized by itself
    restored = digits.x_test * digits.std[0] + digits.mean[0]
    assert torch.allclose(restored, torch.from_numpy(raw.x_test), atol=1e-5)


# --------------------------------------------------------------------------- stratified_folds


@pytest.mark.parametrize("counts,k", [([10, 7, 5, 13], 3), ([4, 4], 4), ([30, 3, 11], 2), ([6, 9, 12, 15, 5], 5)])
def test_stratified_folds_are_disjoint_cover_everything_once_and_stratified(counts, k):
    labels = torch.tensor(np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts)))

    folds = stratified_folds(labels, k, seed=0)

    assert len(folds) == k
    validation = torch.cat([va for _, va in folds])
    assert sorted(validation.tolist()) == list(range(len(labels)))  # each index validates exactly once
    for train, va in folds:
        assert set(train.tolist()).isdisjoint(va.tolist())
        assert sorted(torch.cat([train, va]).tolist()) == list(range(len(labels)))
        per_class = torch.bincount(labels[va], minlength=len(counts))
        for c, n in enumerate(counts):
            assert abs(per_class[c].item() - n / k) <= 1, (c, per_class.tolist())


def test_stratified_folds_depend_on_the_seed_only():
    labels = torch.arange(60) % 3

    a, b, c = (stratified_folds(labels, 3, seed) for seed in (1, 1, 2))

    assert all(torch.equal(va1, va2) for (_, va1), (_, va2) in zip(a, b))
    assert not all(torch.equal(va1, va3) for (_, va1), (_, va3) in zip(a, c))


def test_too_few_samples_of_a_class_for_the_folds_is_a_data_error():
    labels = torch.tensor([0, 0, 0, 0, 1, 1])

    with pytest.raises(DataError, match=r"evaluation\.folds") as info:
        stratified_folds(labels, 3, seed=0)
    assert isinstance(info.value, NasError)


def test_stratified_folds_accept_labels_with_gaps():
    labels = torch.tensor([0, 0, 0, 2, 2, 2])

    folds = stratified_folds(labels, 3, seed=0)

    assert sorted(torch.cat([va for _, va in folds]).tolist()) == list(range(6))


# --------------------------------------------------------------------------- augment_batch


def _windows(x: torch.Tensor, pad: int):
    """Every (dy, dx) crop of the zero-padded image x (C,H,W), computed by direct slicing."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    return {(dy, dx): padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}


def _match(out: torch.Tensor, x: torch.Tensor, pad: int, flips: bool) -> list[tuple]:
    found = []
    for offset, window in _windows(x, pad).items():
        if torch.equal(out, window):
            found.append((*offset, False))
        if flips and torch.equal(out, window.flip(-1)):
            found.append((*offset, True))
    return found


def test_augment_none_returns_the_input_unchanged():
    x = torch.randn(5, 3, 8, 8)

    out = augment_batch(x, "none", torch.Generator().manual_seed(0))

    assert torch.equal(out, x)


@pytest.mark.parametrize("mode", ["crop", "crop_flip"])
@pytest.mark.parametrize("shape", [(6, 3, 16, 16), (5, 1, 8, 12)])
def test_augment_keeps_the_batch_shape(mode, shape):
    x = torch.randn(shape)

    assert augment_batch(x, mode, torch.Generator().manual_seed(0)).shape == x.shape


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.randn(64, 2, 16, 16)  # continuous values: a window matches only where it truly is
    pad = 16 // 8

    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))

    offsets = []
    for i in range(len(x)):
        found = _match(out[i], x[i], pad, flips=False)
        assert len(found) == 1, f"sample {i}: {found}"
        offsets.append(found[0][:2])
    assert len(set(offsets)) > 5  # the shift varies across the batch


def test_crop_flip_flips_about_half_of_the_batch():
    x = torch.randn(200, 1, 8, 8)
    pad = max(1, 8 // 8)

    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))

    flipped = 0
    for i in range(len(x)):
        found = _match(out[i], x[i], pad, flips=True)
        assert len(found) == 1, f"sample {i}: {found}"
        flipped += found[0][2]
    assert 70 <= flipped <= 130  # Binomial(200, 0.5): far outside ±4 sigma otherwise


def test_seeded_generator_makes_augmentation_reproducible():
    x = torch.randn(32, 3, 16, 16)

    a = augment_batch(x, "crop_flip", torch.Generator().manual_seed(7))
    b = augment_batch(x, "crop_flip", torch.Generator().manual_seed(7))
    c = augment_batch(x, "crop_flip", torch.Generator().manual_seed(8))

    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------- fingerprint


def test_the_fingerprint_hashes_8_bit_images_as_their_stored_uint8_bytes(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test, _ = write_cifar(tmp_path, "cifar10", monkeypatch)

    found = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path))).fingerprint

    labels = [np.asarray(y, np.int64).tobytes() for y in (y_train, y_test)]
    stored = b"".join([x_train.tobytes(), labels[0], x_test.tobytes(), labels[1]])
    assert found["version"] == 2 and found["sha256"] == hashlib.sha256(stored).hexdigest()
    version1 = b"".join(
        [
            (x_train.astype(np.float32) / 255.0).tobytes(),
            labels[0],
            (x_test.astype(np.float32) / 255.0).tobytes(),
            labels[1],
        ]
    )
    old = found.as_version(1)
    assert old["sha256"] == hashlib.sha256(version1).hexdigest() != found["sha256"] and "version" not in old
    assert {k: v for k, v in old.items() if k != "sha256"} == {
        k: v for k, v in found.items() if k not in ("sha256", "version")
    }
    assert pickle.loads(pickle.dumps(found)).as_version(1) == old  # a worker process can be handed it


def test_float_data_hashes_the_same_bytes_in_both_fingerprint_versions(digits):
    arrays = LOADERS["digits"](DatasetConfig(name="digits"))
    stored = b"".join(
        np.ascontiguousarray(a, dtype).tobytes()
        for a, dtype in (
            (arrays.x_train, np.float32),
            (arrays.y_train, np.int64),
            (arrays.x_test, np.float32),
            (arrays.y_test, np.int64),
        )
    )
    found = digits.fingerprint
    assert found["sha256"] == hashlib.sha256(stored).hexdigest() == found.as_version(1)["sha256"]
