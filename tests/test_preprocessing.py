"""model.json's preprocessing recipe: raw samples of every loader, followed by the recipe, give exactly the
model inputs the loader gave training (real files written here, read by the real loaders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from nas.data.datasets import load_dataset
from nas.data.preprocessing import image_to_model_input, recipe, to_model_input
from nas.deploy.predict import decode_image
from nas.errors import DataError, NasError
from nas.search.config import DatasetConfig
from tests.test_data import sine_signals, write_cifar, write_imagefolder, write_mnist, write_npz, write_png


def test_raw_digits_follow_the_recipe_to_the_loaded_test_split():
    data = load_dataset(DatasetConfig(name="digits"))
    pre = recipe(data)
    digits = load_digits()
    _, raw_test = train_test_split(digits.images, test_size=0.2, stratify=digits.target, random_state=0)

    assert pre["scale"] == 16 and pre["raw_layout"] == "HW" and pre["raw_shape"] == [8, 8]
    assert torch.allclose(to_model_input(raw_test, pre), data.x_test, atol=1e-6)
    without_scale = dict(pre, scale=1.0)  # what a user who skips the division feeds the model
    assert not torch.allclose(to_model_input(raw_test, without_scale), data.x_test, atol=0.1)


def test_raw_cifar_arrays_channels_last_follow_the_recipe(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", monkeypatch)
    data = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), augment="none"))
    pre = recipe(data)
    raw = torchvision.datasets.CIFAR10(str(tmp_path), train=False).data  # (N, 32, 32, 3) uint8

    assert pre["raw_layout"] == "HWC" and pre["raw_shape"] == [32, 32, 3] and pre["scale"] == 255
    assert pre["image_files"]["color"] == "rgb" and not pre["image_files"]["converted"]
    assert torch.allclose(to_model_input(raw, pre), data.x_test.float(), atol=1e-6)
    assert torch.allclose(to_model_input(raw[2], pre), data.x_test[2:3], atol=1e-6)  # one sample alone


@pytest.mark.parametrize("image_size", [None, 32])  # 32: the arrays resized as they load, the png as they were
def test_raw_mnist_and_a_png_of_one_digit_follow_the_recipe(tmp_path, image_size):
    written = write_mnist(tmp_path, "mnist")
    data = load_dataset(DatasetConfig(name="mnist", root=str(tmp_path), image_size=image_size))
    pre = recipe(data)
    images = written["t10k"][0]
    write_png(tmp_path / "one.png", images[4])

    assert torch.allclose(to_model_input(images, pre), data.x_test.float(), atol=1e-6)
    image = decode_image(tmp_path / "one.png", pre)
    assert torch.allclose(image_to_model_input(image, pre, "one.png"), data.x_test[4:5], atol=1e-6)


@pytest.mark.parametrize("channels", [None, 2])
def test_npz_signals_are_taken_as_stored(tmp_path, channels):
    x, y = sine_signals(40, channels=channels)
    path = write_npz(tmp_path / "s.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    data = load_dataset(DatasetConfig(name="npz", root=str(path)))
    pre = recipe(data)

    assert pre["scale"] == 1 and pre["image_files"] is None and pre["raw_shape"] == list(x.shape[1:])
    assert torch.allclose(to_model_input(x[30:], pre), data.x_test, atol=1e-5)


@pytest.mark.parametrize("image_size", [None, 6])
def test_image_files_of_an_image_folder_follow_the_recipe_resized_as_in_training(tmp_path, image_size):
    write_imagefolder(tmp_path, per_class=2, size=(8, 8))
    data = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=image_size))
    pre = recipe(data)
    files = sorted((tmp_path / "test").glob("*/*.png"))  # ImageFolder's order: classes, then names

    inputs = torch.cat([image_to_model_input(decode_image(f, pre), pre, str(f)) for f in files])

    assert pre["image_files"]["converted"] and pre["image_files"]["resize"] == (image_size is not None)
    assert torch.allclose(inputs, data.x_test.float(), atol=1e-6)


def test_digits_resized_by_image_size_follow_the_recipe_from_their_raw_8x8():
    data = load_dataset(DatasetConfig(name="digits", image_size=20))
    pre = recipe(data)
    digits = load_digits()
    _, raw_test = train_test_split(digits.images, test_size=0.2, stratify=digits.target, random_state=0)

    assert data.input_shape == (1, 20, 20) and pre["raw_shape"] == [8, 8] and pre["resize"] == [20, 20]
    assert torch.equal(to_model_input(raw_test, pre), data.x_test)  # the one resize, in the same order


def test_cifar_arrays_resized_by_image_size_stay_uint8_and_follow_the_recipe(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", monkeypatch)
    data = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), augment="none", image_size=48))
    pre = recipe(data)
    raw = torchvision.datasets.CIFAR10(str(tmp_path), train=False).data  # (N, 32, 32, 3) uint8

    assert data.x_train.pixels.dtype == torch.uint8 and data.input_shape == (3, 48, 48)  # compact: normalized per batch
    assert pre["raw_shape"] == [32, 32, 3] and pre["image_files"]["resize"]
    assert torch.allclose(to_model_input(raw, pre), data.x_test.float(), atol=1e-6)
    assert torch.allclose(to_model_input(raw.astype(np.float32), pre), data.x_test.float(), atol=1e-6)


def test_image_size_on_signals_is_refused_naming_the_key(tmp_path):
    x, y = sine_signals(40)
    path = write_npz(tmp_path / "s.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    with pytest.raises(DataError, match=r"^dataset.image_size: resizes images \(N,C,H,W\); npz has samples of shape"):
        load_dataset(DatasetConfig(name="npz", root=str(path), image_size=16))


def test_a_sample_of_another_shape_is_refused_naming_the_input():
    pre = recipe(load_dataset(DatasetConfig(name="digits")))

    with pytest.raises(
        NasError, match=r"^batch.npy: samples of shape \[3, 7, 8\]; the model takes HW samples of shape \[8, 8\]"
    ):
        to_model_input(np.zeros((3, 7, 8)), pre, "batch.npy")


def test_uint8_npz_images_resized_as_floats_follow_the_recipe(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 1, 8, 8), dtype=np.uint8)  # stored uint8, loaded as float32
    y = np.arange(40) % 2
    path = write_npz(tmp_path / "u8.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    data = load_dataset(DatasetConfig(name="npz", root=str(path), image_size=16))
    pre = recipe(data)

    assert pre["raw_dtype"] == "uint8" and pre["resized_as"] == "float32"
    assert torch.allclose(to_model_input(x[30:], pre), data.x_test, atol=1e-5)
