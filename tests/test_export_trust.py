"""An export folder is untrusted data: attacks on it performed for real.

A crafted model.pt2 whose loader unpickles a payload, garbage or payloads in model.ts and weights.pt,
model.json naming files outside the folder, a loaded file left out of model.json, and the HMAC signature
($BNNAS_EXPORT_KEY) that lets a user refuse a folder that is not theirs. Only the public commands and
nas.deploy.export's long-standing functions are used, so the same file runs against older code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from nas.cli import bench_main, predict_main
from nas.data.datasets import load_dataset
from nas.data.preprocessing import recipe
from nas.deploy.export import load_exported, write_export
from nas.errors import IntegrityError, NasError
from nas.models.build import build
from nas.search.config import DatasetConfig
from nas.search.space import default_spec

KEY = "BNNAS_EXPORT_KEY"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny digits model written by the real export code (fold, files, model.json, fresh-process check), signed."""
    folder = tmp_path_factory.mktemp("trust") / "exported"
    data = load_dataset(DatasetConfig())
    spec = default_spec({"stages": 1, "width": 4})
    torch.manual_seed(0)
    model = build(spec, data.input_shape, data.num_classes).eval()
    meta = {
        "format": 1,
        "arch": spec,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "classes": data.classes,
        "normalization": {"mean": data.mean, "std": data.std},
        "preprocessing": recipe(data),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY, "the key of whoever exported it")
        write_export(model, data.x_test[:64].cpu(), meta, folder, log=lambda line: None)
    np.save(folder.parent / "raw.npy", load_digits().images[:20])
    return folder


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(KEY, raising=False)


def copy_of(exported: Path, tmp_path: Path) -> Path:
    """A copy of the folder, with the raw inputs beside it as beside the original."""
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    shutil.copy(exported.parent / "raw.npy", tmp_path)
    return copy


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "model.json").read_text())
    change(meta)
    (folder / "model.json").write_text(json.dumps(meta, indent=2))


def rehash(folder: Path) -> None:
    """model.json's sha256 of every listed file made to match what is there now: the attacker writes both."""
    edit_meta(
        folder,
        lambda meta: meta["files"].update(
            {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in meta["files"]}
        ),
    )


class Payload:
    """Unpickling it runs Python: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def craft_pt2(path: Path, marker: Path) -> None:
    """model.pt2 as torch.export saved it, but its first weight marked pickled (`use_pickle`: torch.export.load
    then calls torch.load(weights_only=False) on it) and holding the payload."""
    with zipfile.ZipFile(path) as archive:
        members = {info: archive.read(info.filename) for info in archive.infolist()}
    config_entry = next(info for info in members if info.filename.endswith("model_weights_config.json"))
    config = json.loads(members[config_entry])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    members[config_entry] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as out:
        for info, data in members.items():
            crafted = info.filename.endswith(f"/weights/{first['path_name']}")
            out.writestr(info, pickle.dumps(Payload(marker)) if crafted else data)


def predict(capsys, folder: Path, *argv) -> tuple[int, list[str], list[str]]:
    code = predict_main(["--model", str(folder), str(folder.parent / "raw.npy"), *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


@pytest.fixture()
def clean(exported, capsys) -> list[str]:
    """nas-predict's lines for the untouched export, by default."""
    code, out, _ = predict(capsys, exported)
    assert code == 0 and len(out) == 20
    return out


# --------------------------------------------------------------------------- code files are loaded only when asked


@pytest.mark.slow
def test_a_crafted_model_pt2_runs_nothing_by_default_and_runs_when_asked_for(exported, clean, tmp_path, capsys):
    copy = copy_of(exported, tmp_path)
    marker = tmp_path / "ran"
    craft_pt2(copy / "model.pt2", marker)
    rehash(copy)

    code, out, err = predict(capsys, copy)
    assert code == 0 and out == [line.replace(str(exported.parent), str(copy.parent)) for line in clean]
    assert not marker.exists() and err == []

    code, out, err = predict(capsys, copy, "--runtime", "pt2")  # the attack is real: asked for, the payload runs
    assert marker.exists() and code == 2 and out == []
    assert err[0] == (
        f"note: model.pt2 (torch.export, whose loader unpickles) is code: loading runs what its author "
        f"wrote, so {copy} is trusted like a script"
    )
    assert err[-1].startswith(f"{copy / 'model.pt2'}: cannot load it: ")


def test_the_default_never_opens_model_ts(exported, clean, tmp_path, capsys):
    copy = copy_of(exported, tmp_path)
    (copy / "model.ts").write_bytes(b"whatever a stranger put here")  # not even rehashed: the default never reads it

    code, out, _ = predict(capsys, copy)

    assert code == 0 and len(out) == len(clean)
    code, _, err = predict(capsys, copy, "--runtime", "ts")
    assert code == 2 and err[-1].startswith(f"{copy / 'model.ts'}: sha256 differs from model.json")


def test_nas_bench_times_code_files_only_with_trust_code(exported, tmp_path, capsys):
    copy = copy_of(exported, tmp_path)
    marker = tmp_path / "ran"
    craft_pt2(copy / "model.pt2", marker)
    rehash(copy)
    argv = ["--model", str(copy), "--batch-sizes", "1", "--repeats", "2", "--warmup", "0"]

    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert not marker.exists()
    assert "TorchScript and torch.export not timed: model.ts and model.pt2 are code; --trust-code" in out
    assert "eager folded" in out and "onnxruntime folded" in out and "TorchScript folded" not in out
    assert load_exported(copy).model is not None and not marker.exists()  # nas-finetune's reading: data only

    assert bench_main([*argv, "--trust-code"]) == 2
    assert marker.exists() and "model.pt2: cannot load it" in capsys.readouterr().err


def test_a_pickle_payload_as_weights_pt_is_refused_without_running(exported, tmp_path, capsys):
    copy = copy_of(exported, tmp_path)
    marker = tmp_path / "ran"
    (copy / "weights.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    rehash(copy)

    code, out, err = predict(capsys, copy)

    assert code == 2 and out == [] and len(err) == 1 and not marker.exists()
    assert err[0].startswith(f"{copy / 'weights.pt'}: not weights of model.json's arch: ")


def test_model_json_says_which_files_are_code(exported):
    trust = json.loads((exported / "model.json").read_text())["trust"]
    assert trust["code"] == ["model.ts", "model.pt2"] and trust["data"] == ["weights.pt", "model.onnx"]
    assert "--runtime ts|pt2" in trust["note"] and KEY in trust["note"]


# --------------------------------------------------------------------------- files only of the folder, each one checked


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../../../../../../etc/hostname", "notes.txt"])
def test_model_json_naming_a_file_outside_the_fixed_names_is_refused_unread(exported, tmp_path, capsys, name):
    copy = copy_of(exported, tmp_path)
    outside = hashlib.sha256(Path("/etc/hostname").read_bytes()).hexdigest()
    edit_meta(copy, lambda meta: meta["files"].update({name: outside}))

    with pytest.raises(NasError) as refused:  # a sha256 match would tell the folder's author what the file holds
        load_exported(copy)
    code, out, err = predict(capsys, copy)

    assert code == 2 and out == [] and err == [str(refused.value)]
    assert err[0].startswith(f"{copy / 'model.json'}: files[{json.dumps(name)}]: ")


@pytest.mark.slow
def test_a_listed_device_or_a_link_out_of_the_folder_returns_at_once(exported, tmp_path):
    copy = copy_of(exported, tmp_path)
    edit_meta(copy, lambda meta: meta["files"].update({"/dev/zero": "0" * 64}))
    linked = copy_of(exported, tmp_path / "linked")
    (linked / "model.ts").unlink()
    (linked / "model.ts").symlink_to("/dev/zero")
    script = (
        "import sys\nfrom nas.deploy.export import load_exported\nfrom nas.errors import NasError, VerificationError\n"
        "try:\n    load_exported(sys.argv[1])\nexcept (NasError, VerificationError) as exc:\n    print(exc)\n"
    )

    for folder, why in ((copy, 'files["/dev/zero"]: a path'), (linked, "not a regular file inside")):
        try:  # reading /dev/zero never ends: a bound, so that code which reads it fails instead of hanging
            proc = subprocess.run(
                [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=120
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{folder}: still reading after 120 s")
        assert proc.returncode == 0 and why in proc.stdout, proc.stdout + proc.stderr


def test_a_file_linked_out_of_the_folder_is_refused_unread(exported, tmp_path, capsys):
    copy = copy_of(exported, tmp_path)
    (copy / "model.ts").unlink()
    (copy / "model.ts").symlink_to("/etc/hostname")
    rehash(copy)  # a match would tell the folder's author what the file holds

    with pytest.raises(IntegrityError, match="model.ts: not a regular file inside"):
        load_exported(copy)


def test_a_loaded_file_left_out_of_model_json_is_refused(exported, tmp_path, capsys):
    copy = copy_of(exported, tmp_path)
    weights = torch.load(copy / "weights.pt", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, copy / "weights.pt")  # nothing vouches for these
    edit_meta(copy, lambda meta: meta["files"].pop("weights.pt"))

    with pytest.raises(IntegrityError, match="weights.pt: not listed in"):
        load_exported(copy)
    code, out, err = predict(capsys, copy)
    assert code == 2 and out == [] and len(err) == 1 and "not listed in" in err[0]


# --------------------------------------------------------------------------- the signature: $BNNAS_EXPORT_KEY


def test_with_the_key_only_a_folder_signed_with_it_loads(exported, clean, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(KEY, "the key of whoever exported it")
    code, out, _ = predict(capsys, exported)
    assert code == 0 and out == clean

    copy = copy_of(exported, tmp_path)
    weights = torch.load(copy / "weights.pt", weights_only=True)
    torch.save({k: v + 1 for k, v in weights.items()}, copy / "weights.pt")
    rehash(copy)  # consistent sums, but not the exporter's model.json
    marker = tmp_path / "ran"
    craft_pt2(copy / "model.pt2", marker)
    for argv in ([], ["--runtime", "pt2"]):
        code, out, err = predict(capsys, copy, *argv)
        assert code == 2 and out == [] and not marker.exists()
        assert err[-1] == (
            f"{copy / 'model.sig'}: not model.json's signature under {KEY} (signed with another key, or "
            "model.json changed); refusing to load the folder"
        )
    assert bench_main(["--model", str(copy), "--repeats", "1"]) == 2
    assert "not model.json's signature" in capsys.readouterr().err
    with pytest.raises(IntegrityError, match="model.sig"):
        load_exported(copy)  # nas-finetune's source

    (copy / "model.sig").unlink()
    code, _, err = predict(capsys, copy)
    assert code == 2
    assert err == [f"{copy / 'model.sig'}: missing: {KEY} is set, so only an export signed with it is loaded"]

    monkeypatch.setenv(KEY, "another key")
    code, _, err = predict(capsys, exported)
    assert code == 2 and "not model.json's signature" in err[-1]


def test_export_without_the_key_leaves_no_signature(exported, tmp_path):
    from nas.deploy.export import sign

    copy = copy_of(exported, tmp_path)
    sign(copy)  # what every export ends with; the key is not set here
    assert (exported / "model.sig").is_file() and not (copy / "model.sig").exists()
