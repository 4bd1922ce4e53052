"""8-bit images held as uint8 and normalized per batch, in memory or streamed from the decode cache: a trial
gives the same fold losses as with the whole split normalized up front as float32 (real CIFAR-format files and
image folders, the real loaders and trainers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nas.cli import search_main
from nas.data.datasets import Dataset, load_dataset, stratified_folds
from nas.data.samples import CompactImages, StreamedImages, loaded
from nas.search.config import DatasetConfig
from nas.search.space import default_spec
from nas.training.cross_validation import cross_validate
from tests.test_data import write_cifar, write_imagefolder

SPEC = default_spec(
    {"stages": 1, "width": 4, "block": {"norm": {"type": "batch"}}, "training": {"batch_size": 8, "lr": 0.05}}
)


def as_float32_up_front(data: Dataset, cfg: DatasetConfig) -> Dataset:
    """The dataset as it was held before uint8 storage: whole splits divided, then normalized with numpy's
    float32 statistics of the training split."""
    from nas.data.datasets import LOADERS

    arrays = LOADERS[cfg.name](cfg)
    x_train, x_test = (np.asarray(x, dtype=np.float32) / 255.0 for x in (arrays.x_train, arrays.x_test))
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return Dataset(
        data.name,
        torch.from_numpy((x_train - mean) / std),
        data.y_train,
        torch.from_numpy((x_test - mean) / std),
        data.y_test,
        data.classes,
        data.augment,
        mean.reshape(-1).tolist(),
        std.reshape(-1).tolist(),
    )


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", monkeypatch, n_train_per_file=12, n_test=8)
    return DatasetConfig(name="cifar10", root=str(tmp_path))


@pytest.mark.parametrize("fold_mode", ["together", "sequential"])
def test_uint8_storage_gives_the_fold_losses_of_float32_storage(cifar, fold_mode):
    compact = load_dataset(cifar)
    plain = as_float32_up_front(compact, cifar)
    folds = stratified_folds(compact.y_train, 2, 0)

    assert isinstance(compact.x_train, CompactImages) and compact.x_train.pixels.dtype == torch.uint8
    assert compact.augment == "crop_flip"  # CIFAR's auto: the per-batch normalization feeds the augmentation
    ours = cross_validate(SPEC, compact, folds, 2, torch.device("cpu"), fold_mode=fold_mode)
    before = cross_validate(SPEC, plain, folds, 2, torch.device("cpu"), fold_mode=fold_mode)
    assert ours["fold_losses"] == pytest.approx(before["fold_losses"], abs=1e-5)
    assert ours["fold_losses"] != pytest.approx(
        [ours["fold_losses"][0]] * 2, abs=1e-9
    )  # folds differ: the check compares something


@pytest.mark.parametrize("fold_mode", ["together", "sequential"])
def test_streaming_from_the_cache_gives_the_fold_losses_of_holding_the_split(tmp_path, fold_mode):
    write_imagefolder(tmp_path / "data", per_class=12, size=(8, 8))
    cfg = DatasetConfig(name="imagefolder", root=str(tmp_path / "data"), augment="crop_flip")
    held = load_dataset(cfg)
    streamed = load_dataset(DatasetConfig(**{**cfg.__dict__, "device_memory": 0.0}))
    folds = stratified_folds(held.y_train, 2, 0)

    assert isinstance(streamed.x_train, StreamedImages) and isinstance(
        streamed.x_train.host, np.memmap
    )  # read from the cache
    assert "streamed from host memory" in streamed.memory() and "uint8 on cpu" in held.memory()
    for recalibrate in (False, True):
        a = cross_validate(SPEC, held, folds, 2, torch.device("cpu"), recalibrate_bn=recalibrate, fold_mode=fold_mode)
        b = cross_validate(
            SPEC, streamed, folds, 2, torch.device("cpu"), recalibrate_bn=recalibrate, fold_mode=fold_mode
        )
        assert a["fold_losses"] == pytest.approx(b["fold_losses"], abs=1e-5)
        assert a["train_mode_loss"] == pytest.approx(b["train_mode_loss"], abs=1e-5)
    assert torch.equal(streamed.x_test.cpu(), held.x_test.cpu())


def test_a_search_prints_how_the_dataset_is_held(tmp_path, monkeypatch, capsys):
    write_imagefolder(tmp_path / "data", per_class=6, size=(8, 8))
    space = {"stages": 1, "width": 4, "training": {"batch_size": 4}}
    (tmp_path / "space.yaml").write_text(__import__("yaml").safe_dump(space))
    monkeypatch.chdir(tmp_path)
    argv = [
        "--set",
        f"search_space={tmp_path / 'space.yaml'}",
        "--set",
        "dataset.name=imagefolder",
        "--set",
        "dataset.root=data",
        "--device",
        "cpu",
        "--trials",
        "1",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--storage",
        f"sqlite:///{tmp_path}/nas.db",
        "--no-progress",
    ]
    assert search_main([*argv, "--study", "held"]) == 0
    held = 2 * 12 * 3 * 8 * 8  # both splits, uint8
    assert (
        f"Dataset in memory: {held / 1e3:.1f} kB uint8 on cpu (float32 would be {4 * held / 1e3:.1f} kB)"
        in capsys.readouterr().err
    )
    assert search_main([*argv, "--study", "streamed", "--set", "dataset.device_memory=0"]) == 0
    assert (
        f"Dataset in memory: streamed from host memory: {held / 1e3:.1f} kB uint8, "
        "over the 0 bytes dataset.device_memory budget of cpu"
    ) in capsys.readouterr().err


def test_prefetching_hands_on_a_read_error_and_stops_when_the_consumer_does():
    images = StreamedImages(np.zeros((10, 1, 2, 2), np.uint8), 255.0, torch.zeros(1), torch.ones(1), "cpu")
    batches = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([99])]

    stream = loaded(images, batches)
    assert [i.tolist() for i, _ in (next(stream), next(stream))] == [[0, 1], [2, 3]]
    with pytest.raises(IndexError):
        next(stream)
    early = loaded(images, iter([torch.tensor([i]) for i in range(10)]))
    next(early)
    early.close()  # the reader thread ends: close() returns


def test_stored_images_index_like_the_tensor_they_stand_for(cifar):
    compact = load_dataset(cifar)
    whole = compact.x_train.float()
    for index in (3, slice(2, 5), torch.tensor([4, 0]), torch.tensor([[1, 2], [3, 0]])):
        assert (
            torch.allclose(compact.x_train[index], whole[index], atol=1e-6)
            and compact.x_train[index].shape == whole[index].shape
        )


def float32_path(cfg: DatasetConfig, like: Dataset) -> Dataset:
    """The same data through load_dataset's float32 path (an identity transform sends it there), normalized with
    `like`'s statistics."""
    return load_dataset(
        DatasetConfig(**{**cfg.__dict__, "transforms": [{"invert": False}]}),
        normalization={"mean": like.mean, "std": like.std},
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_a_uint8_batch_equals_the_float32_path_bit_for_bit(cifar, streamed):
    compact = load_dataset(DatasetConfig(**{**cifar.__dict__, "device_memory": 0.0 if streamed else None}))
    plain = float32_path(cifar, compact)

    assert isinstance(compact.x_train, StreamedImages if streamed else CompactImages)
    assert plain.x_train.dtype == torch.float32
    index = torch.randperm(len(compact.y_train), generator=torch.Generator().manual_seed(0))[:16]
    assert torch.equal(compact.x_train[index], plain.x_train[index])
    assert torch.equal(compact.x_test.cpu(), plain.x_test)
    one_ulp_up = plain.x_test.nextafter(torch.tensor(float("inf")))
    assert not torch.equal(compact.x_test.cpu(), one_ulp_up)  # the check tells one ulp apart


@pytest.mark.cuda
def test_a_uint8_batch_on_cuda_equals_the_float32_path_on_the_cpu_bit_for_bit(cifar):
    from conftest import CUDA_TEST_DEVICE

    compact = load_dataset(cifar, CUDA_TEST_DEVICE)
    plain = float32_path(cifar, compact)
    every = torch.arange(len(compact.y_train), device=compact.x_train.device)
    assert compact.x_train.device.type == torch.device(CUDA_TEST_DEVICE).type
    assert torch.equal(compact.x_train[every].cpu(), plain.x_train)
