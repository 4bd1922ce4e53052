"""Export a trial for deployment: retrain on the full training split, test, fold BN, save, verify.

The output folder holds
  model.ts     TorchScript of the folded eval model
  model.pt2    the same as a torch.export program (batch dimension dynamic)
  model.onnx   the same as ONNX (dynamic batch), when the onnx extra is installed
  weights.pt   the unfolded state_dict (load with weights_only=True; for fine-tuning)
  model.json   ArchSpec, the preprocessing from a raw sample to the model's input
               (`nas.preprocessing`), class names, test metrics, library versions, the ONNX
               opset and the sha256 of every file above.
Every file is written under a temporary name and renamed, so a reader never sees half a file,
with the umask's usual mode. A fresh Python process that imports only torch (and onnxruntime)
then loads every model file and must reproduce the eval model's test predictions, or the
export fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nas.errors import DataError, NasError, StudyError, VerificationError
from nas.storage import one_line

FORMAT = 1
FILES = ("model.ts", "model.pt2", "weights.pt")  # always written; model.onnx when the onnx extra is there
ONNX_FILE = "model.onnx"
ONNX_MISSING = "install the onnx extra (pip install 'bnnas[onnx]': onnx, onnxscript, onnxruntime)"
FOLD_TOLERANCE = 1e-4  # max abs logit difference between folded and unfolded eval models
VERIFY_SAMPLES = 4096  # test samples the folded and exported models are checked on (all of a smaller split)


@dataclass
class Exported:
    """An export folder read back: its metadata and the unfolded eval model."""

    folder: Path
    meta: dict
    model: nn.Module


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic(path: Path, write) -> None:
    """Write through `write(tmp_path)` to a temporary name in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep the files from whoever deploys them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> None:
    """Indented JSON, written atomically (a reader never sees half a file)."""
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def check_writable(folder: Path, force: bool = False) -> None:
    """Create `folder` and a scratch file in it, then remove what was made: an --out that cannot take
    the files is found before minutes of training, and input found bad later still leaves nothing.
    A folder that already holds an export is refused unless `force`: it would be overwritten."""
    existing = [name for name in ("model.json", *FILES, ONNX_FILE) if (folder / name).exists()]
    if existing and not force:
        raise NasError(f"--out: {folder} already holds an export ({', '.join(existing)}); choose another folder or pass --force to overwrite it")
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(scratch)
    except OSError as exc:
        raise NasError(f"--out: cannot write to {folder}: {exc.strerror or exc}") from None
    finally:
        for path in made:
            if path.is_dir():
                path.rmdir()


def pick_trial(study, number: int | None):
    """The trial to export: `number`, or the best (single objective; a multi-objective study needs --trial)."""
    from optuna.trial import TrialState

    from nas.storage import DUPLICATE_ATTR, counts_toward_budget, is_duplicate

    if number is None:
        if len(study.directions) > 1:
            front = ", ".join(str(t.number) for t in study.best_trials)
            raise StudyError(f"--trial: '{study.study_name}' has several objectives; pick one trial of its Pareto front ({front})")
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if counts_toward_budget(t)]
        if not complete:
            raise StudyError(f"--study: '{study.study_name}' has no completed trial to export")
        return min(complete, key=lambda t: (t.value, t.number))
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in by_number:
        raise StudyError(f"--trial: '{study.study_name}' has no trial {number}")
    trial = by_number[number]
    if is_duplicate(trial):  # it trained nothing: the trial it repeated is the one to rebuild
        trial = by_number[trial.user_attrs[DUPLICATE_ATTR]]
    if "arch" not in trial.user_attrs:
        raise StudyError(f"--trial: trial {number} has no stored ArchSpec (state {trial.state.name})")
    return trial


def export_trial(storage: str, study_name: str, out: str | Path, trial_number: int | None = None,
                 epochs: int | None = None, device: str | None = None, log=print, force: bool = False) -> Path:
    """Retrain the trial's ArchSpec on the full training split, test it, fold, save and verify."""
    from nas.build import build
    from nas.config import load_run_config
    from nas.data import load_dataset
    from nas.evaluate import fold_seed
    from nas.preprocessing import recipe
    from nas.storage import config_of_trial, load_existing_study, read_run_config
    from nas.train import batch_dependent, evaluate, fit, prepare_model, resolve_device, scoring_batch_size

    study = load_existing_study(storage, study_name)
    if read_run_config(study._storage, study._study_id) is None:
        raise StudyError(f"--study: '{study_name}' has no stored run config (not made by nas-search)")
    trial = pick_trial(study, trial_number)
    stored, fingerprint = config_of_trial(study, trial)  # the config the trial was scored under
    cfg = load_run_config(None, stored=stored)
    check_writable(Path(out), force)
    spec = trial.user_attrs["arch"]
    dev = resolve_device(device or cfg.device)
    data = load_dataset(cfg.dataset, dev)
    check_same_data(fingerprint, data.fingerprint, f"study '{study_name}' was searched on")
    epochs = epochs or cfg.evaluation.epochs
    seed = fold_seed(cfg.study.seed, trial.number, cfg.evaluation.folds)  # a seed no CV fold used
    torch.manual_seed(seed)
    model = prepare_model(build(spec, data.input_shape, data.num_classes), dev)
    log(f"Training trial {trial.number} of '{study_name}' on all {len(data.y_train)} training samples for {epochs} epochs on {dev.type}")
    fit(model, data, torch.arange(len(data.y_train), device=dev), None, spec["training"], epochs, dev, seed)
    scored_in = scoring_batch_size(model, spec["training"])
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, dev, scored_in)
    log(f"Test split: loss {test_loss:.4f}, accuracy {test_acc:.4f} ({len(data.y_test)} samples)")
    dependence = batch_dependence(model, data, dev, scored_in, test_acc) if batch_dependent(model) else None
    if dependence is not None:
        log(dependence["message"])
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    x_test = data.x_test[:VERIFY_SAMPLES].cpu()
    meta = {
        "format": FORMAT,
        "study": study_name,
        "trial": trial.number,
        "arch": spec,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "classes": data.classes,
        "normalization": {"mean": data.mean, "std": data.std},
        "preprocessing": recipe(data),
        "dataset": cfg.dataset.name,
        "data": data.fingerprint,
        "epochs": epochs,
        "test": {"loss": test_loss, "accuracy": test_acc, "samples": len(data.y_test), "batch_size": scored_in},
        **({"batch_dependent": dependence} if dependence is not None else {}),
    }
    folder = write_export(model, x_test, meta, Path(out), log)
    return folder


BATCH_ONE_SAMPLES = 1000  # test samples classified one at a time to show what batch 1 does


def batch_dependence(model: nn.Module, data, device: torch.device, scored_in: int, accuracy: float) -> dict:
    """What a batch-dependent model (BatchNorm without running statistics) does at batch 1, measured.

    Such a model normalizes with the statistics of the inputs it is given together: one input
    alone is normalized over its own positions only, which can change its predictions or fail
    (a 1-pixel map has a single value per channel).
    """
    from nas.train import evaluate

    x, y = data.x_test[:BATCH_ONE_SAMPLES], data.y_test[:BATCH_ONE_SAMPLES]
    try:
        alone = evaluate(model, x, y, device, batch_size=1)[1]
        at_one = f"at batch 1 its accuracy is {alone:.4f} (first {len(y)} test samples)"
    except (ValueError, RuntimeError) as exc:
        alone, at_one = None, f"at batch 1 it fails ({one_line(exc)})"
    message = (f"Note: this model normalizes with each batch's own statistics (BatchNorm with track_running_stats: false), "
               f"so a prediction depends on the inputs batched with it: test accuracy {accuracy:.4f} in batches of {scored_in} "
               f"(as it was trained and scored); {at_one}. Deploy it with batches of about {scored_in} inputs.")
    return {"scored_batch_size": scored_in, "accuracy_at_batch_1": alone, "samples_at_batch_1": len(y), "message": message}


def check_same_data(expected: dict | None, found: dict | None, what: str) -> None:
    """Refuse, in one line, to rebuild on data that differs from `expected` (a fingerprint; None: not recorded)."""
    from nas.contract import differences, show

    if expected is None or found is None:
        return
    changes = differences(expected, found)
    if changes:
        key, old, new = changes[0]
        raise DataError(f"dataset: the data loaded now differs from what {what}: {key} {show(old)} there, {show(new)} here "
                        "(point dataset.root at the original data)")


def write_export(model: nn.Module, x_check: torch.Tensor, meta: dict, folder: Path, log=print) -> Path:
    """Fold, check folding exactness, write the files atomically, verify in a fresh process."""
    from nas.fold import fold_norms

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NasError(f"--out: cannot create {folder}: {exc.strerror or exc}") from None
    model = model.eval()
    folded = fold_norms(model)
    with torch.no_grad():
        expected = model(x_check)
        gap = (folded(x_check) - expected).abs().max().item()
    if gap > FOLD_TOLERANCE:
        raise VerificationError(f"folding changed the logits by {gap:.2e} (> {FOLD_TOLERANCE}); nothing written")
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; users still deploy it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(folded)
    example = x_check[:2]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(folded, (example,), dynamic_shapes={"x": {0: batch}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _atomic(folder / "model.ts", lambda tmp: torch.jit.save(scripted, tmp))
    _atomic(folder / "model.pt2", lambda tmp: torch.export.save(program, tmp))
    _atomic(folder / "weights.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    onnx = write_onnx(program, example, folder)
    files = FILES + ((ONNX_FILE,) if onnx["written"] else ())
    meta = {
        **meta,
        "fold_max_abs_diff": gap,
        "onnx": onnx,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "bnnas": _version(),
                     **({"onnx": onnx["version"]} if onnx["written"] else {})},
        "files": {name: sha256(folder / name) for name in files},
    }
    write_json(folder / "model.json", meta)
    verify_in_fresh_process(folder, x_check, expected)
    log(f"Wrote {folder}/ ({', '.join(files)}, model.json); verified in a fresh process")
    if not onnx["written"]:
        log(f"model.onnx not written: {onnx['reason']}")
    return folder


def write_onnx(program, example: torch.Tensor, folder: Path) -> dict:
    """model.onnx from the torch.export program (its dynamic batch carries over), or why not.

    ONNX is optional: without onnx / onnxscript (the exporter) and onnxruntime (the check) the
    other files are still a complete export, and model.json says why model.onnx is missing.
    """
    path = folder / ONNX_FILE
    if path.exists():
        path.unlink()  # an export --force over an older one must not keep a stale model.onnx
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the fresh-process check needs it)
        import onnxscript  # noqa: F401
    except ImportError:
        return {"written": False, "reason": ONNX_MISSING}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(program, (example,), dynamo=True, verbose=False)
    _atomic(path, lambda tmp: exported.save(tmp))
    opset = next(entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import if entry.domain in ("", "ai.onnx"))
    return {"written": True, "opset": int(opset), "version": onnx.__version__, "dynamic_batch": True}


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session for model.onnx (`threads`: intra-op threads; None: its default)."""
    try:
        import onnxruntime
    except ImportError:
        raise NasError(f"{path}: running it needs onnxruntime; {ONNX_MISSING}") from None
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bnnas")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


# Runs in a fresh interpreter that imports only torch (and onnxruntime for model.onnx): `nas` is
# blocked, so a file that needed it would fail here rather than on the user's machine.
VERIFY_SCRIPT = r"""
import os, sys, warnings
sys.modules["nas"] = None
warnings.simplefilter("ignore", FutureWarning)
import torch
folder, check = sys.argv[1], sys.argv[2]
data = torch.load(check, weights_only=True)
x, expected = data["x"], data["expected"]
models = {"model.ts": torch.jit.load(f"{folder}/model.ts"), "model.pt2": torch.export.load(f"{folder}/model.pt2").module()}
if os.path.exists(f"{folder}/model.onnx"):
    import onnxruntime
    session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    models["model.onnx"] = lambda x: torch.from_numpy(session.run(None, {feed: x.numpy()})[0])
with torch.no_grad():
    for name, model in models.items():
        out = model(x)
        gap = (out - expected).abs().max().item()
        agree = (out.argmax(1) == expected.argmax(1)).float().mean().item()
        if gap > float(sys.argv[3]) or agree < 1.0:
            print(f"{name}: max abs diff {gap:.2e}, predictions agree on {agree:.2%}")
            sys.exit(1)
print("ok")
"""


def verify_in_fresh_process(folder: Path, x: torch.Tensor, expected: torch.Tensor) -> None:
    """Load every model file in a new interpreter (torch, onnxruntime) and compare with `expected`."""
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "check.pt"
        torch.save({"x": x.contiguous(), "expected": expected.contiguous()}, check)
        proc = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(folder), str(check), str(FOLD_TOLERANCE)],
                              capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        detail = (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1:] or ["no output"])
        detail = detail if isinstance(detail, str) else detail[0]
        raise VerificationError(f"verification failed in a fresh process for {folder}: {detail}")


def load_meta(folder: Path) -> dict:
    """An export folder's model.json."""
    meta_path = folder / "model.json"
    try:
        return json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise NasError(f"{meta_path}: not found (is {folder} an export folder made by nas-export?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise NasError(f"{meta_path}: unreadable: {exc}") from None


def verified_file(folder: Path, meta: dict, name: str) -> Path:
    """`folder/name`, once its sha256 matches model.json; refused in one line otherwise."""
    path = folder / name
    digest = meta.get("files", {}).get(name)
    if digest is None:
        why = f" ({meta['onnx']['reason']})" if name == ONNX_FILE and "onnx" in meta else ""
        raise NasError(f"{path}: not part of this export{why}")
    if not path.is_file():
        raise NasError(f"{path}: missing (listed in model.json)")
    if sha256(path) != digest:
        raise VerificationError(f"{path}: sha256 differs from model.json (file changed or corrupted); refusing to load it")
    return path


def load_exported(folder: str | Path) -> Exported:
    """Read an export folder back; every file's sha256 must match model.json."""
    from nas.build import build

    folder = Path(folder)
    meta = load_meta(folder)
    for name in meta.get("files", {}):
        verified_file(folder, meta, name)
    model = build(meta["arch"], meta["input_shape"], meta["num_classes"])
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return Exported(folder, meta, model.eval())
