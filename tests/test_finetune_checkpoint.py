"""nas-finetune from a pretrained checkpoint (`--model timm:NAME --weights FILE`): the weights loaded as timm loads
pretrained ones (first conv adapted to grey digits, a new head), the modes on a foreign model's norms, the result
an export like any other, and every bad checkpoint refused in one line with nothing written."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from nas.cli import finetune_main, predict_main

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402 - timm brings safetensors


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[str]:
    """A run config that names only its target (nas-finetune needs no search space), and a short run."""
    path = tmp_path_factory.mktemp("target") / "target.yaml"
    path.write_text("dataset: {name: digits}\ndevice: cpu\n")
    return ["--config", str(path), *QUICK]


QUICK = ["--input-size", "16", "--epochs", "1", "--labels-per-class", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """A timm test_resnet as an ImageNet checkpoint would hold it: RGB stem, 1000 classes, BN statistics moved."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=1000)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))  # running statistics unlike a fresh model's
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "test_resnet.safetensors"
    save_file(state, str(path))
    return path, state


def weights_of(folder: Path) -> dict:
    return torch.load(folder / "weights.pt", weights_only=True)


def test_a_timm_checkpoint_loads_with_its_stem_adapted_and_a_new_head_and_predicts_raw_digits(
    imagenet_checkpoint, tmp_path, quick
):
    path, state = imagenet_checkpoint
    out = tmp_path / "probe"
    assert (
        finetune_main(
            [
                "--model",
                "timm:test_resnet",
                "--weights",
                str(path),
                "--bn-mode",
                "linear-probe",
                *quick,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tuned = weights_of(out)
    assert torch.equal(tuned["conv1.0.weight"], state["conv1.0.weight"].sum(1, keepdim=True))  # timm: summed to grey
    untouched = [k for k in state if not k.startswith(("fc.", "conv1.0."))]
    assert untouched and all(torch.equal(tuned[k], state[k]) for k in untouched)  # linear-probe: statistics too
    assert tuned["fc.weight"].shape == (10, state["fc.weight"].shape[1])  # the target's classes

    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"]["model"] == {"family": "timm", "name": "test_resnet", "kwargs": {}}
    assert meta["preprocessing"]["mean"] == [0.5] and meta["preprocessing"]["resize"] == [16, 16]  # timm's cfg
    checkpoint = meta["finetune"]["checkpoint"]
    assert checkpoint["adapted"] == "conv1.0" and checkpoint["head_replaced"] and not checkpoint["missing"]
    assert checkpoint["loaded"] == len(state) - 2
    np.save(tmp_path / "raw.npy", load_digits().images[:4])
    assert predict_main(["--model", str(out), str(tmp_path / "raw.npy")]) == 0


def test_a_training_checkpoint_with_its_wrapper_and_module_prefix_loads_the_same_tensors(
    imagenet_checkpoint, tmp_path, quick
):
    path, state = imagenet_checkpoint
    wrapped = tmp_path / "last.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    out = tmp_path / "out"
    args = ["--model", "timm:test_resnet", "--weights", str(wrapped), "--bn-mode", "linear-probe", *quick]
    assert finetune_main([*args, "--out", str(out)]) == 0
    assert torch.equal(weights_of(out)["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_full_with_the_last_stage_unfrozen_keeps_every_earlier_stage_and_its_statistics(
    imagenet_checkpoint, tmp_path, quick
):
    path, state = imagenet_checkpoint
    out = tmp_path / "out"
    args = ["--model", "timm:test_resnet", "--weights", str(path), "--bn-mode", "full", "--unfreeze-stages", "1"]
    assert finetune_main([*args, *quick, "--out", str(out)]) == 0
    tuned = weights_of(out)
    changed = {k for k in state if k in tuned and not torch.equal(tuned[k], state[k])} - {"conv1.0.weight"}
    assert changed and all(k.startswith(("layer4.", "fc.")) for k in changed)
    assert "layer4.0.bn1.running_mean" in changed and "layer1.0.conv1.weight" not in changed
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(name.startswith(("layer4.", "fc.")) for name in metrics["trained_parameters"])


def test_bn_only_trains_the_norms_of_a_timm_model_and_its_head(imagenet_checkpoint, tmp_path, quick):
    path, _ = imagenet_checkpoint
    out = tmp_path / "out"
    args = ["--model", "timm:test_resnet", "--weights", str(path), "--bn-mode", "bn-only", *quick, "--out", str(out)]
    assert finetune_main(args) == 0
    trained = json.loads((out / "metrics.json").read_text())["trained_parameters"]
    model = timm.create_model("test_resnet")
    owners = {model.get_submodule(name.rsplit(".", 1)[0]) for name in trained if not name.startswith("fc.")}
    assert "layer1.0.bn1.weight" in trained and "fc.weight" in trained
    assert owners and all(isinstance(m, torch.nn.BatchNorm2d) for m in owners)  # timm's BatchNormAct2d included


# ------------------------------------------------------------------- bad input: one line, exit 2, nothing written


class Payload:
    """A pickled object: torch.load(weights_only=True) must refuse to build it."""

    def __reduce__(self):
        return (print, ("code ran",))


def bad_file(kind: str, folder: Path, state: dict) -> Path:
    path = folder / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "code":
        torch.save({"conv1.0.weight": Payload()}, path)
    elif kind == "safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif kind == "not tensors":
        torch.save({"lr": 0.1, "epochs": [1, 2]}, path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("random", "not a PyTorch checkpoint"),
        ("truncated", "not a PyTorch checkpoint, or truncated"),
        ("code", "holds pickled objects other than tensors"),
        ("safetensors", "not a readable .safetensors file"),
        ("not tensors", "not a state dict"),
    ],
)
def test_a_weights_file_that_is_not_a_checkpoint_is_refused_in_one_line(
    imagenet_checkpoint, tmp_path, capsys, kind, message, quick
):
    path = bad_file(kind, tmp_path, imagenet_checkpoint[1])
    out = tmp_path / "out"
    code = finetune_main(
        ["--model", "timm:test_resnet", "--weights", str(path), "--bn-mode", "full", *quick, "--out", str(out)]
    )
    out_text, err = capsys.readouterr()
    assert code == 2 and err.startswith(f"--weights: {path}: {message}") and err.count("\n") == 1, err
    assert "code ran" not in out_text and not out.exists()
    assert "Checkpoint input" not in out_text  # refused before the data was loaded


def test_a_checkpoint_of_another_architecture_lists_its_keys_and_loads_what_matches_only_when_told(
    imagenet_checkpoint, tmp_path, capsys, quick
):
    path, _ = imagenet_checkpoint
    args = ["--model", "timm:test_efficientnet", "--weights", str(path), "--bn-mode", "full", *quick]
    assert finetune_main([*args, "--out", str(tmp_path / "a"), "-q"]) == 2  # -q: the refusal alone
    err = capsys.readouterr().err
    assert err.startswith(f"--weights: {path} does not fit EfficientNet: ") and err.count("\n") == 1
    assert " missing (" in err and " unexpected (" in err and err.rstrip().endswith("--strict false loads what matches")
    assert not (tmp_path / "a").exists()

    assert finetune_main([*args, "--strict", "false", "--out", str(tmp_path / "b")]) == 0
    assert "--strict false: loaded " in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "model.json").read_text())["finetune"]["checkpoint"]["unexpected"]


@pytest.mark.parametrize(
    "model, extra, message",
    [
        (
            "timm:test_resnett",
            ["--weights", "w.pt"],
            "--model: unknown timm model 'test_resnett'; did you mean 'test_resnet'?",
        ),
        ("timm:test_resnet", [], "--model timm:test_resnet: give its checkpoint with --weights FILE"),
        ("torchvision:resnet18", ["--weights", "w.pt"], "--model: torchvision resnet18 takes 3-channel images"),
        ("factory:no_such_module:make", ["--weights", "w.pt"], "--model: no_such_module:make: cannot import"),
    ],
)
def test_a_model_that_cannot_take_the_checkpoint_or_the_data_is_refused_in_one_line(
    imagenet_checkpoint, tmp_path, capsys, model, extra, message, quick
):
    torch.save(imagenet_checkpoint[1], tmp_path / "w.pt")  # a readable checkpoint: the model is what is wrong
    out = tmp_path / "out"
    code = finetune_main(
        [
            "--model",
            model,
            *[str(tmp_path / e) if e == "w.pt" else e for e in extra],
            "--bn-mode",
            "full",
            *quick,
            "--out",
            str(out),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_a_torchvision_checkpoint_on_rgb_images_uses_its_weights_normalization(tmp_path, monkeypatch, quick):
    import torchvision

    from tests.test_data import write_cifar

    write_cifar(tmp_path / "data", "cifar10", monkeypatch)
    torch.manual_seed(0)
    state = torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict()  # 1000 classes
    torch.save(state, tmp_path / "mobilenet_v3_small.pth")
    out = tmp_path / "out"
    args = ["--model", "torchvision:mobilenet_v3_small", "--weights", str(tmp_path / "mobilenet_v3_small.pth")]
    target = [
        "--set",
        "dataset.name=cifar10",
        "--set",
        f"dataset.root={tmp_path / 'data'}",
        "--set",
        "dataset.augment=none",
    ]
    assert (
        finetune_main(
            [*args, "--bn-mode", "linear-probe", *quick, "--labels-per-class", "1", *target, "--out", str(out)]
        )
        == 0
    )

    meta = json.loads((out / "model.json").read_text())
    assert meta["preprocessing"]["mean"] == pytest.approx(
        [0.485, 0.456, 0.406]
    )  # ImageNet's, from the weights' transforms
    assert meta["input_shape"] == [3, 16, 16] and meta["finetune"]["checkpoint"]["adapted"] is None
    tuned = weights_of(out)
    assert all(torch.equal(tuned[k], v) for k, v in state.items() if not k.startswith("classifier.3."))


def test_adabn_without_labels_on_a_model_without_running_statistics_is_refused(tmp_path, capsys, quick):
    from user_nets import group_norm_cnn

    save_file(group_norm_cnn(10, 1, (1, 16, 16)).state_dict(), str(tmp_path / "gn.safetensors"))
    out = tmp_path / "out"
    args = ["--model", "factory:user_nets:group_norm_cnn", "--weights", str(tmp_path / "gn.safetensors")]
    assert finetune_main([*args, "--bn-mode", "adabn", *quick, "--labels-per-class", "0", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("--bn-mode adabn: no norm layer of Sequential keeps running statistics") and err.count("\n") == 1
    )
    assert not out.exists()
