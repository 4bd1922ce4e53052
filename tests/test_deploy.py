"""The deployment contract: docs/deployment.md's raw-input snippet run as printed, nas-predict on real PNG /
npy files, ONNX parity in a fresh process, export file modes and refusals, and inference figures that say when they
cannot be trusted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_digits_run
from PIL import Image
from sklearn.datasets import load_digits

from nas.cli import bench_main, export_main, finetune_main, predict_main, search_main
from nas.data.datasets import load_dataset
from nas.deploy.bench import format_table, spread_warnings
from nas.deploy.export import FILES, ONNX_FILE, export_trial, load_exported, sha256
from nas.deploy.finetune import mode_notes
from nas.models.build import build
from nas.models.costs import candidate_costs, pinned_threads
from nas.options import SPREAD_LIMIT
from nas.search.config import DatasetConfig
from nas.search.space import default_spec

DEPLOYMENT_DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
SPACE = {
    "stages": 2,
    "width": 8,
    "block": {"norm": {"type": "batch", "position": "post_conv"}},
    "training": {"batch_size": 32, "lr": 0.05},
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    write_digits_run(
        root,
        SPACE,
        f"sqlite:///{root}/nas.db",
        {"name": "d", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 1},
    )
    assert search_main(["--config", str(root / "run.yaml"), "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def exported(study_dir):
    out = study_dir / "exported"
    assert (
        export_main(["--storage", f"sqlite:///{study_dir}/nas.db", "--study", "d", "--out", str(out), "--epochs", "6"])
        == 0
    )
    return out


def readme_snippets() -> list[str]:
    """The python blocks of docs/deployment.md's 'From a raw input to a prediction' section, as printed."""
    text = DEPLOYMENT_DOC.read_text()
    section = text.split("### From a raw input to a prediction", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def predict(capsys, *argv) -> tuple[int, str, str]:
    code = predict_main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- raw input to prediction


@pytest.mark.slow
def test_the_readme_snippet_runs_as_printed_and_agrees_with_nas_predict(exported, capsys):
    torch_only, with_onnx = readme_snippets()
    proc = run_python(torch_only, exported.parent)
    assert proc.returncode == 0, proc.stderr
    accuracy = float(re.search(r"accuracy (\S+)", proc.stdout).group(1))
    assert accuracy > 0.6  # trained for 6 epochs: far above chance (0.1), which raw inputs without the scale give

    proc = run_python(torch_only + with_onnx, exported.parent)
    assert proc.returncode == 0 and "onnxruntime agrees: True" in proc.stdout, proc.stderr

    np.save(exported.parent / "raw.npy", load_digits().images[:100])
    code, out, _ = predict(capsys, "--model", exported, exported.parent / "raw.npy")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 100 and lines[0].startswith(f"{exported.parent / 'raw.npy'}[0]: ")
    targets = load_digits().target[:100]
    predicted = [line.split(": ")[1].split(" ")[0] for line in lines]
    assert sum(p == str(t) for p, t in zip(predicted, targets)) / 100 == accuracy


def test_png_files_and_npy_arrays_of_the_same_pixels_get_the_same_prediction(exported, tmp_path, capsys):
    images = np.round(load_digits().images[:5] * 255 / 16).astype(np.uint8)  # digits drawn as 8-bit PNGs
    pngs = []
    for i, image in enumerate(images):
        pngs.append(tmp_path / f"d{i}.png")
        Image.fromarray(image).save(pngs[-1])
    np.save(tmp_path / "same.npy", images.astype(np.float64) * 16 / 255)  # the same pixels in digits' raw units

    code, out, _ = predict(capsys, "--model", exported, *pngs, tmp_path / "same.npy", "--json", "--top", "3")
    rows = json.loads(out)

    assert code == 0 and len(rows) == 10
    for png_row, npy_row in zip(rows[:5], rows[5:]):
        assert png_row["class"] == npy_row["class"] and png_row["probability"] == pytest.approx(
            npy_row["probability"], abs=1e-5
        )
        assert len(png_row["top"]) == 3 and png_row["top"][0]["probability"] >= png_row["top"][1]["probability"]
    assert rows[0]["input"] == str(pngs[0]) and rows[5]["input"] == f"{tmp_path / 'same.npy'}[0]"
    for runtime in ("pt2", "onnx"):  # every model file gives the same answer
        code, out, _ = predict(capsys, "--model", exported, *pngs, "--json", "--runtime", runtime)
        assert code == 0 and [r["class"] for r in json.loads(out)] == [r["class"] for r in rows[:5]]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p / "x.png"),
            r"x\.png: a colour image; the model takes grey images",
        ),
        (
            lambda p: Image.fromarray(np.zeros((9, 8), np.uint8)).save(p / "x.png"),
            r"x\.png: a 8x9 \(width x height\) image; the model takes 8x8",
        ),
        (
            lambda p: np.save(p / "x.npy", np.zeros((4, 3, 8, 8))),
            r"x\.npy: samples of shape \[4, 3, 8, 8\]; the model takes HW samples of shape \[8, 8\]",
        ),
        (
            lambda p: np.savez(p / "x.npz", a=np.zeros((8, 8)), b=np.zeros((8, 8))),
            r"x\.npz: holds the arrays a, b; name the samples 'x'",
        ),
        (lambda p: (p / "x.txt").write_text("1 2 3"), r"x\.txt: unknown input type '\.txt'"),
        (lambda p: (p / "x.png").write_bytes(b"not a png"), r"x\.png: cannot decode the image"),
    ],
)
def test_inputs_the_model_does_not_take_are_refused_in_one_line(exported, tmp_path, capsys, make, message):
    make(tmp_path)
    name = next(tmp_path.iterdir())
    code, out, err = predict(capsys, "--model", exported, name)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("name, runtime", [("weights.pt", []), ("model.ts", ["--runtime", "ts"])])
def test_a_changed_model_file_is_refused_before_it_is_loaded(exported, tmp_path, capsys, name, runtime):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / name, "ab") as f:
        f.write(b"\0")
    np.save(tmp_path / "one.npy", load_digits().images[0])

    code, _, err = predict(capsys, "--model", copy, tmp_path / "one.npy", *runtime)

    refusal = f"{copy / name}: sha256 differs from model.json (file changed or corrupted); refusing to load it\n"
    assert code == 2 and err.endswith(refusal) and err.count("\n") == 1 + bool(runtime)  # ts: after the trust note


# --------------------------------------------------------------------------- ONNX


PARITY = r"""
import sys; sys.modules["nas"] = None
import numpy as np, onnxruntime, torch
folder, check = sys.argv[1], sys.argv[2]
data = torch.load(check, weights_only=True)
session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
for n in (1, 37, len(data["x"])):  # the batch dimension is dynamic
    out = session.run(None, {session.get_inputs()[0].name: data["x"][:n].numpy()})[0]
    print(n, float(np.abs(out - data["expected"][:n].numpy()).max()))
"""


@pytest.mark.slow
def test_model_onnx_reproduces_the_eval_model_in_a_fresh_process_at_any_batch_size(exported, tmp_path):
    meta = json.loads((exported / "model.json").read_text())
    x = load_dataset(DatasetConfig()).x_test
    with torch.no_grad():
        expected = load_exported(exported).model(x)
    torch.save({"x": x, "expected": expected}, tmp_path / "check.pt")

    proc = subprocess.run(
        [sys.executable, "-c", PARITY, str(exported), str(tmp_path / "check.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 0, proc.stderr
    sizes = [int(line.split()[0]) for line in proc.stdout.splitlines()]
    assert sizes == [1, 37, len(x)] and all(float(line.split()[1]) < 1e-4 for line in proc.stdout.splitlines())
    assert (
        meta["onnx"]["written"]
        and meta["onnx"]["opset"] >= 17
        and meta["files"][ONNX_FILE] == sha256(exported / ONNX_FILE)
    )


@pytest.mark.slow
def test_without_the_onnx_extra_export_says_so_and_the_rest_is_complete(study_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    lines = []
    export_trial(f"sqlite:///{study_dir}/nas.db", "d", tmp_path / "out", epochs=1, log=lines.append)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())

    (said,) = [line for line in lines if line.startswith("model.onnx not written: ")]
    assert "install the onnx extra (pip install 'bnnas[onnx]'" in said
    assert not (tmp_path / "out" / ONNX_FILE).exists() and set(meta["files"]) == set(FILES)
    assert meta["onnx"] == {"written": False, "reason": said.split(": ", 1)[1]}
    np.save(tmp_path / "one.npy", load_digits().images[0])
    code, _, err = predict(capsys, "--model", tmp_path / "out", tmp_path / "one.npy", "--runtime", "onnx")
    assert code == 2 and "model.onnx: not part of this export (install the onnx extra" in err
    assert bench_main(["--model", str(tmp_path / "out"), "--batch-sizes", "1", "--repeats", "2", "--warmup", "0"]) == 0
    assert "onnxruntime not timed: install the onnx extra" in capsys.readouterr().out


# --------------------------------------------------------------------------- export files


@pytest.mark.slow
def test_export_files_get_the_umasks_mode_and_an_existing_export_is_refused_unless_forced(study_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--storage", f"sqlite:///{study_dir}/nas.db", "--study", "d", "--out", str(out), "--epochs", "1"]
    old = os.umask(0o027)
    try:
        assert export_main(argv) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert export_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"--out: {out} already holds an export (model.json, model.ts, model.pt2, weights.pt, model.onnx); "
        "choose another folder or pass --force to overwrite it\n"
    )
    assert "Training" not in captured.out and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert export_main([*argv, "--force"]) == 0
    assert all(p.stat().st_mtime_ns > before[p.name] for p in out.iterdir())


# --------------------------------------------------------------------------- fine-tuning messages


@pytest.mark.slow
def test_adabn_says_it_ignores_epochs_and_bn_only_says_it_trains_the_head_alone(study_dir, exported, tmp_path, capsys):
    config = {
        **yaml.safe_load((study_dir / "run.yaml").read_text()),
        "search_space": str(study_dir / "space.yaml"),
        "dataset": {"name": "digits", "transforms": [{"brightness": 0.3}]},
    }
    (tmp_path / "target.yaml").write_text(yaml.safe_dump(config))
    assert (
        finetune_main(
            [
                "--model",
                str(exported),
                "--config",
                str(tmp_path / "target.yaml"),
                "--bn-mode",
                "adabn",
                "--epochs",
                "5",
                "--out",
                str(tmp_path / "ft"),
            ]
        )
        == 0
    )
    assert "--epochs 5 is ignored: adabn without labels" in capsys.readouterr().err

    plain = build(default_spec({"stages": 1, "width": 4}), (1, 8, 8), 10)
    without_affine = build(default_spec({"stages": 1, "width": 4, "block": {"norm": {"affine": False}}}), (1, 8, 8), 10)
    assert any("trains the head alone" in note for note in mode_notes(without_affine, "bn-only", None, 3, False))
    assert mode_notes(plain, "bn-only", None, 3, False) == []
    assert mode_notes(plain, "adabn", 0, 3, False) == []  # --epochs not given: nothing to say
    assert mode_notes(plain, "adabn", 5, 3, True) == []  # with labels adabn trains the head for --epochs


# --------------------------------------------------------------------------- inference figures


def test_nas_bench_pins_its_threads_and_times_onnxruntime(exported, capsys):
    torch.set_num_threads(2)
    assert (
        bench_main(
            ["--model", str(exported), "--batch-sizes", "1", "--repeats", "3", "--warmup", "1", "--threads", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "cpu, torch" in out and "1 CPU thread(s) (--threads)" in out
    assert re.search(r"^onnxruntime folded\s+1\s", out, flags=re.M)
    assert torch.get_num_threads() == 2  # given back


def row(variant: str, p10: float, p90: float) -> dict:
    return {
        "variant": variant,
        "batch_size": 1,
        "median_ms": (p10 + p90) / 2,
        "p10_ms": p10,
        "p90_ms": p90,
        "spread": p90 / p10,
        "throughput": 1.0,
        "ratio_to_baseline": 1.0,
    }


def test_a_wide_spread_is_marked_and_warned_about_not_printed_as_a_figure():
    quiet, busy = row("eager", 0.125, 0.140), row("folded", 0.35, 89.6)
    table = format_table([quiet, busy])

    assert re.search(r"^folded .* 256\.00 !", table, flags=re.M) and not re.search(r"^eager .* !", table, flags=re.M)
    assert spread_warnings([quiet]) == []
    assert table.splitlines()[-1].startswith(
        f"warning: 1 of 2 rows (marked !) spread more than p90/p10 = {SPREAD_LIMIT} (worst 256.0, folded"
    )


def test_the_latency_objective_is_measured_with_the_pinned_threads(monkeypatch):
    seen = []
    monkeypatch.setattr(
        "nas.models.costs.measure_latency", lambda *a, **k: seen.append(torch.get_num_threads()) or {"median_ms": 1.0}
    )
    with pinned_threads(2):
        candidate_costs(
            default_spec({"stages": 1, "width": 4}), (1, 8, 8), 10, torch.device("cpu"), 4, ["latency_ms"], threads=1
        )
        assert seen == [1] and torch.get_num_threads() == 2


def test_a_latency_study_is_not_continued_with_other_threads(study_dir, capsys):
    argv = [
        "--config",
        str(study_dir / "run.yaml"),
        "--storage",
        f"sqlite:///{study_dir}/lat.db",
        "--study",
        "lat",
        "--set",
        "objectives=[cv_loss, latency_ms]",
        "--no-progress",
    ]
    assert search_main([*argv, "--trials", "1"]) == 0
    capsys.readouterr()

    assert search_main([*argv, "--trials", "2", "--set", "evaluation.latency_threads=2"]) == 2
    assert capsys.readouterr().err.startswith(
        "--set: evaluation.latency_threads: study 'lat' was run with 1; this run has 2"
    )
