"""dataset.transforms: shifted variants of a dataset, deterministic, validated with key paths."""

import numpy as np
import pytest
import torch
import yaml

from nas.data.datasets import load_dataset
from nas.data.transforms import apply_transforms
from nas.errors import ConfigError, DataError
from nas.search.config import DatasetConfig, load_run_config


def raw(cfg: DatasetConfig) -> tuple[np.ndarray, np.ndarray]:
    """The transformed splits back in the data's own units (undoing the per-channel normalization)."""
    data = load_dataset(cfg, normalization={"mean": [0.0], "std": [1.0]})
    return data.x_train.numpy(), data.x_test.numpy()


def test_each_transform_does_what_its_name_says():
    clean_train, clean_test = raw(DatasetConfig())
    train, _ = raw(DatasetConfig(transforms=[{"invert": True}]))
    assert np.allclose(train, 1.0 - clean_train)  # digits span [0, 1]
    train, _ = raw(DatasetConfig(transforms=[{"brightness": 0.25}]))
    assert np.allclose(train, clean_train + 0.25)
    train, _ = raw(DatasetConfig(transforms=[{"contrast": 0.5}]))
    assert np.allclose(train.std(axis=(1, 2, 3)), 0.5 * clean_train.std(axis=(1, 2, 3)), atol=1e-5)
    assert np.allclose(train.mean(axis=(1, 2, 3)), clean_train.mean(axis=(1, 2, 3)), atol=1e-5)
    train, test = raw(DatasetConfig(transforms=[{"noise": 0.2}]))
    assert abs((train - clean_train).std() - 0.2) < 0.01 and abs((test - clean_test).std() - 0.2) < 0.02
    train, _ = raw(DatasetConfig(transforms=[{"rotate": 90}]))
    assert np.allclose(train, np.rot90(clean_train, k=1, axes=(2, 3)), atol=1e-5)


def test_shifted_data_is_the_same_on_every_load_and_noise_differs_between_splits():
    cfg = DatasetConfig(transforms=[{"contrast": 0.5}, {"noise": 0.1}, {"rotate": 15}])
    first, again = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.x_test, again.x_test)
    other_seed = load_dataset(DatasetConfig(transforms=cfg.transforms, transform_seed=1))
    assert not torch.equal(first.x_train, other_seed.x_train)
    x = np.zeros((4, 1, 2, 2), dtype=np.float32)
    train, test = apply_transforms(x, x, [{"noise": 1.0}], seed=0)
    assert not np.allclose(train, test)


def test_rotate_needs_images():
    signals = np.zeros((4, 16), dtype=np.float32)
    with pytest.raises(DataError, match=r"dataset.transforms\[0\].rotate: rotate needs images"):
        apply_transforms(signals, signals, [{"rotate": 10}], seed=0)
    train, _ = apply_transforms(
        signals, signals, [{"noise": 0.1}, {"invert": True}], seed=0
    )  # the others take any shape
    assert train.shape == signals.shape


@pytest.mark.parametrize(
    ("transforms", "key_path", "words"),
    [
        ([{"contrast": 0.5}, {"brightness": 0.1}, {"noise": -1}], "dataset.transforms[2].noise", "must be >= 0.0"),
        ([{"blurr": 1}], "dataset.transforms[0].blurr", "unknown transform"),
        ([{"contrast": 0.5, "noise": 0.1}], "dataset.transforms[0]", "expected one mapping"),
        ([{"invert": "yes"}], "dataset.transforms[0].invert", "expected a boolean"),
        ({"contrast": 0.5}, "dataset.transforms", "expected a list"),
        ([{"contrast": 0}], "dataset.transforms[0].contrast", "must be > 0.0"),
    ],
)
def test_bad_transforms_name_the_key_path(tmp_path, transforms, key_path, words):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"stages": 1}))
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({"search_space": "space.yaml", "dataset": {"name": "digits", "transforms": transforms}})
    )
    with pytest.raises(ConfigError) as info:
        load_run_config(tmp_path / "run.yaml")
    assert info.value.key_path == key_path and words in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{tmp_path / 'run.yaml'}: {key_path}: ")
