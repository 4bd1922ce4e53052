"""Export a trial for deployment: retrain on the full training split, test, fold BN, save, verify.

The output folder holds
  model.ts     TorchScript of the folded eval model
  model.pt2    the same as a torch.export program (batch dimension dynamic)
  model.onnx   the same as ONNX (dynamic batch), when the onnx extra is installed
  weights.pt   the unfolded state_dict (load with weights_only=True; for fine-tuning)
  model.json   ArchSpec, the preprocessing from a raw sample to the model's input
               (`nas.data.preprocessing`), class names, test metrics, library versions, the ONNX
               opset, the sha256 of every file above and which of them are code (`trust`)
  model.sig    HMAC-SHA256 of model.json under $BNNAS_EXPORT_KEY, when that is set
Every file is written under a temporary name and renamed, so a reader never sees half a file,
with the umask's usual mode. A fresh Python process that imports only torch (and onnxruntime)
then loads every model file and must reproduce the eval model's test predictions, or the
export fails.

Reading a folder back trusts none of it: model.ts (TorchScript) and model.pt2 (torch.export,
whose loader unpickles) are code, and the sha256 in model.json, written by whoever wrote the
folder, proves nothing about who that was. So the default way back is data only: bnnas builds
the model from `arch` and loads weights.pt with torch.load(weights_only=True) (`rebuild`);
the code files load only when asked for. Every file loaded is one that model.json lists under
a name nas-export writes and that matches its sha256; with $BNNAS_EXPORT_KEY set, model.json
must also carry that key's signature, checked before anything else is read.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import platform
import stat
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nas
from nas.errors import DataError, IntegrityError, NasError, StudyError, TrialError, VerificationError, one_line
from nas.output import atomic_write, atomic_write_text, status
from nas.study.artifacts import export_name, find, keep_folder, open_store, restore_folder
from nas.study.schema import (
    ARCH_ATTR,
    DUPLICATE_ATTR,
    config_of_trial,
    is_duplicate,
    is_feasible,
    outside,
    read_run_config,
    scored_trials,
    trial_attr,
)

FORMAT = 1
FILES = ("model.ts", "model.pt2", "weights.pt")  # always written; model.onnx when the onnx extra is there
ONNX_FILE = "model.onnx"
MODEL_FILES = (*FILES, ONNX_FILE)  # the only names model.json's `files` may hold
CODE_FILES = {"model.ts": "TorchScript", "model.pt2": "torch.export, whose loader unpickles"}  # loading runs their code
SIGNATURE_FILE = "model.sig"
KEY_ENV = "BNNAS_EXPORT_KEY"  # its value signs model.json on export and is required of every folder loaded
TRUST_NOTE = (
    "model.ts (TorchScript) and model.pt2 (torch.export, whose loader unpickles) are code: loading them runs "
    "whatever the folder's author put there, and these sha256 sums prove nothing about who that was. "
    "nas-predict, nas-bench and nas-finetune load weights.pt as data (torch.load weights_only=True into the "
    "model bnnas builds from arch) or model.onnx (onnxruntime) unless asked for the code files "
    f"(--runtime ts|pt2, --trust-code). Set {KEY_ENV} to sign exports and to refuse unsigned ones."
)
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


def write_json(path: Path, data: dict) -> None:
    """Indented JSON, written atomically (a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def check_writable(folder: Path, force: bool = False) -> None:
    """Create `folder` and a scratch file in it, then remove what was made: an --out that cannot take
    the files is found before minutes of training, and input found bad later still leaves nothing.
    A folder that already holds an export is refused unless `force`: it would be overwritten."""
    if folder.exists() and not folder.is_dir():
        raise NasError(f"--out: {folder} is a file, not a folder; choose a folder for the export")
    existing = [name for name in ("model.json", *MODEL_FILES) if (folder / name).exists()]
    if existing and not force:
        raise NasError(
            f"--out: {folder} already holds an export ({', '.join(existing)}); choose another folder or pass --force "
            "to overwrite it"
        )
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

    if number is None:
        if len(study.directions) > 1:
            front = ", ".join(str(t.number) for t in study.best_trials)
            raise StudyError(
                f"--trial: '{study.study_name}' has several objectives; pick one trial of its Pareto front ({front})"
            )
        ranked = scored_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if not ranked:
            raise StudyError(f"--study: '{study.study_name}' has no completed trial to export")
        if not is_feasible(ranked[0]):
            raise StudyError(
                f"--trial: no trial of '{study.study_name}' meets its constraints ({outside(ranked[0])} on the best, "
                f"trial {ranked[0].number}); export one anyway with --trial N"
            )
        return ranked[0]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in by_number:
        raise StudyError(f"--trial: '{study.study_name}' has no trial {number}")
    trial = by_number[number]
    if is_duplicate(trial):  # it trained nothing: the trial it repeated is the one to rebuild
        trial = by_number[trial.user_attrs[DUPLICATE_ATTR]]
    if ARCH_ATTR not in trial.user_attrs:
        raise StudyError(f"--trial: trial {number} has no stored ArchSpec (state {trial.state.name})")
    return trial


def export_trial(
    storage: str,
    study_name: str,
    out: str | Path,
    *,
    trial_number: int | None = None,
    epochs: int | None = None,
    device: str | None = None,
    log=status,
    force: bool = False,
    seed: int | None = None,
    bn_sparsity: float | None = None,
    artifacts: str | Path | None = None,
    retrain: bool = False,
) -> Path:
    """Retrain the trial's ArchSpec on the full training split, test it, fold, save and verify.

    `seed` (default: one no CV fold of the trial used) seeds the training; `bn_sparsity` replaces the spec's L1
    weight on the norm scales, to train the found model for network slimming (`nas-slim`). The export is kept in
    the study's artifact store (`artifacts`: its folder, "none" for none; default beside a local storage file), and
    an export kept there with the same settings is restored instead of trained again, unless `retrain`."""
    from nas.data.preprocessing import recipe
    from nas.search.config import blamed, load_run_config
    from nas.search.finetune_space import describe_strategy, epochs_of, load_search_data
    from nas.study.storage import load_existing_study
    from nas.training.bn_modes import all_trainable, start_strategy
    from nas.training.cross_validation import build_candidate, fold_seed
    from nas.training.train import batch_dependent, evaluate, fit, prepare_model, resolve_device, scoring_batch_size

    study = load_existing_study(storage, study_name)
    if read_run_config(study._storage, study._study_id) is None:
        raise StudyError(f"--study: '{study_name}' has no stored run config (not made by nas-search)")
    trial = pick_trial(study, trial_number)
    stored, fingerprint = config_of_trial(study, trial)  # the config the trial was scored under
    cfg = load_run_config(None, stored=stored)
    check_writable(Path(out), force)
    spec = trial_attr(trial, ARCH_ATTR)
    if bn_sparsity is not None:
        spec = {**spec, "training": {**spec["training"], "bn_sparsity": bn_sparsity}}
    dev = resolve_device(device or cfg.device)
    with blamed(cfg):
        data = load_search_data(cfg, dev)
    check_same_data(fingerprint, data.fingerprint, f"study '{study_name}' was searched on")
    epochs = epochs or epochs_of(spec, cfg.evaluation.epochs)
    if seed is None:
        seed = fold_seed(cfg.study.seed, trial.number, cfg.evaluation.folds)  # a seed no CV fold used
    store = None if str(artifacts) == "none" else open_store(storage, artifacts)
    kept_as = export_name(
        trial.number,
        {
            "spec": spec,
            "epochs": epochs,
            "seed": seed,
            "data": data.fingerprint,
            "on": dev.type,
            "bnnas": nas.__version__,  # and what writes the files: another torch or onnx writes others
            "torch": torch.__version__,
            "onnx": onnx_version(),
        },
    )
    earlier = None if store is None or retrain else find(study, kept_as)
    if earlier is not None:
        restore_folder(store, earlier, Path(out))
        load_exported(out)  # every file's sha256 against model.json, as any reader checks
        log(
            f"Restored trial {trial.number}'s export from the artifact store ({kept_as}): it was exported with these "
            f"settings before; --retrain trains it again. Wrote {out}/"
        )
        return Path(out)
    torch.manual_seed(seed)
    try:
        model = prepare_model(build_candidate(spec, data.input_shape, data.num_classes), dev)
    except TrialError as exc:
        raise NasError(str(exc)) from None
    strategy = spec.get("finetune")
    log(
        f"Training trial {trial.number} of '{study_name}' on all {len(data.y_train)} training samples for {epochs} "
        f"epochs on {dev.type}" + (f" (fine-tuning its checkpoint: {describe_strategy(strategy)})" if strategy else "")
    )
    hp = spec["training"]
    if hp.get("bn_sparsity"):
        from nas.training.train import norm_scales

        scales = sum(t.numel() for t in norm_scales(model))
        log(
            f"L1 weight {hp['bn_sparsity']:g} on {scales} norm scales (training.bn_sparsity)"
            if scales
            else "note: training.bn_sparsity has no norm scale to act on (no affine norm in this model)"
        )
    train_mode = None if strategy is None else start_strategy(model, strategy, data.x_train, hp["batch_size"], dev)
    everything = torch.arange(len(data.y_train), device=dev)
    fit(model, data, everything, None, hp, epochs, dev, seed=seed, train_mode=train_mode)
    if hp.get("bn_sparsity"):
        log(scales_line(model))
    all_trainable(model)
    scored_in = scoring_batch_size(model, hp)
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
        "dataset_config": dataset_record(cfg),
        "data": data.fingerprint,
        "epochs": epochs,
        "seed": seed,
        "test": {"loss": test_loss, "accuracy": test_acc, "samples": len(data.y_test), "batch_size": scored_in},
        **({"batch_dependent": dependence} if dependence is not None else {}),
    }
    folder = write_export(model, x_test, meta, Path(out), log)
    if store is not None:  # optuna-dashboard lists it on the study's page; the same export again restores it
        keep_folder(study, store, folder, kept_as)
        log(f"Kept as artifact {kept_as} of study '{study_name}'")
    return folder


def scales_line(model: nn.Module) -> str:
    """What the sparsity penalty did: the trained norm scales' percentiles and the share below 0.01."""
    from nas.training.diagnostics import SMALL_SCALE, SMALL_SHARE, scale_summary
    from nas.training.train import norm_scales

    summary = scale_summary(norm_scales(model, trainable=False))
    if summary is None:
        return "no norm scales"
    share = summary[SMALL_SHARE]
    return (
        f"Norm scales |gamma| after training: p10 {summary['p10']:.3g}, p50 {summary['p50']:.3g}, p90 "
        f"{summary['p90']:.3g}; {share:.1%} below {SMALL_SCALE:g}"
        + (" (every one: the penalty collapsed the model; use a smaller --bn-sparsity)" if share == 1.0 else "")
    )


def dataset_record(cfg) -> dict:
    """The run config's dataset section, as model.json keeps it: what nas-slim reloads to fine-tune on."""
    from dataclasses import asdict

    return asdict(cfg.dataset)


BATCH_ONE_SAMPLES = 1000  # test samples classified one at a time to show what batch 1 does


def batch_dependence(model: nn.Module, data, device: torch.device, scored_in: int, accuracy: float) -> dict:
    """What a batch-dependent model (BatchNorm without running statistics) does at batch 1, measured.

    Such a model normalizes with the statistics of the inputs it is given together: one input
    alone is normalized over its own positions only, which can change its predictions or fail
    (a 1-pixel map has a single value per channel).
    """
    from nas.training.train import evaluate

    x, y = data.x_test[:BATCH_ONE_SAMPLES], data.y_test[:BATCH_ONE_SAMPLES]
    try:
        alone = evaluate(model, x, y, device, batch_size=1)[1]
        at_one = f"at batch 1 its accuracy is {alone:.4f} (first {len(y)} test samples)"
    except (ValueError, RuntimeError) as exc:
        alone, at_one = None, f"at batch 1 it fails ({one_line(exc)})"
    message = (
        "Note: this model normalizes with each batch's own statistics (BatchNorm with track_running_stats: false), "
        f"so a prediction depends on the inputs batched with it: test accuracy {accuracy:.4f} in batches of "
        f"{scored_in} (as it was trained and scored); {at_one}. Deploy it with batches of about {scored_in} inputs."
    )
    return {
        "scored_batch_size": scored_in,
        "accuracy_at_batch_1": alone,
        "samples_at_batch_1": len(y),
        "message": message,
    }


def check_same_data(expected: dict | None, found: dict | None, what: str) -> None:
    """Refuse, in one line, to rebuild on data that differs from `expected` (a fingerprint; None: not recorded)."""
    from nas.study.contract import differences, show

    if expected is None or found is None:
        return
    changes = differences(expected, found)
    if changes:
        key, old, new = changes[0]
        raise DataError(
            f"dataset: the data loaded now differs from what {what}: {key} {show(old)} there, {show(new)} here "
            "(point dataset.root at the original data)"
        )


def write_export(model: nn.Module, x_check: torch.Tensor, meta: dict, folder: Path, log=status) -> Path:
    """Fold, check folding exactness, write the files atomically, verify in a fresh process."""
    from nas.models.bn_fold import fold_norms

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
        # timm's layers annotate instance attributes TorchScript ignores; harmless, and not the user's to fix
        warnings.filterwarnings("ignore", "The TorchScript type system doesn't support instance-level annotations")
        scripted = torch.jit.script(folded)
    example = x_check[:2]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # by position: forward's argument may have any name (nn.Sequential's is `input`)
    program = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        atomic_write(folder / "model.ts", lambda tmp: torch.jit.save(scripted, tmp))
    atomic_write(folder / "model.pt2", lambda tmp: torch.export.save(program, tmp))
    atomic_write(folder / "weights.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    onnx = write_onnx(program, example, folder)
    files = FILES + ((ONNX_FILE,) if onnx["written"] else ())
    meta = {
        **meta,
        "fold_max_abs_diff": gap,
        "onnx": onnx,
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "bnnas": nas.__version__,
            **({"onnx": onnx["version"]} if onnx["written"] else {}),
        },
        "files": {name: sha256(folder / name) for name in files},
        "trust": {
            "code": [name for name in files if name in CODE_FILES],
            "data": [name for name in files if name not in CODE_FILES],
            "note": TRUST_NOTE,
        },
    }
    write_json(folder / "model.json", meta)
    sign(folder)
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
    if onnx_version() is None:
        return {"written": False, "reason": ONNX_MISSING}
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(program, (example,), dynamo=True, verbose=False)
    atomic_write(path, lambda tmp: exported.save(tmp))
    opset = next(
        entry.version
        for entry in onnx.load(str(path), load_external_data=False).opset_import
        if entry.domain in ("", "ai.onnx")
    )
    return {"written": True, "opset": int(opset), "version": onnx.__version__, "dynamic_batch": True}


def onnx_version() -> str | None:
    """onnx's version when all of the onnx extra imports (onnx, onnxscript the exporter, onnxruntime the check);
    None when model.onnx cannot be written here."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return None
    return onnx.__version__


def onnx_session(path: Path, model: bytes, threads: int | None = None):
    """An onnxruntime CPU session for the (verified) bytes of model.onnx at `path`; `threads`: intra-op threads
    (None: its default).

    An export keeps no external data, so a model naming external data files is given an empty folder to read
    them from: it fails rather than read a file nothing checked."""
    try:
        import onnxruntime
    except ImportError:
        raise NasError(f"{path}: running it needs onnxruntime; {ONNX_MISSING}") from None
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as empty:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for a model it cannot load
            raise IntegrityError(f"{path}: onnxruntime cannot load it: {one_line(exc)}") from None


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
models = {
    "model.ts": torch.jit.load(f"{folder}/model.ts"),
    "model.pt2": torch.export.load(f"{folder}/model.pt2").module(),
}
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
        proc = subprocess.run(
            [sys.executable, "-c", VERIFY_SCRIPT, str(folder), str(check), str(FOLD_TOLERANCE)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        detail = proc.stdout.strip() or proc.stderr.strip().splitlines()[-1:] or ["no output"]
        detail = detail if isinstance(detail, str) else detail[0]
        raise VerificationError(f"verification failed in a fresh process for {folder}: {detail}")


def signature(text: bytes, key: str) -> str:
    return hmac.new(key.encode(), text, hashlib.sha256).hexdigest()


def sign(folder: Path) -> None:
    """model.sig: model.json's HMAC under $BNNAS_EXPORT_KEY (it lists every file's sha256, so it covers them);
    without the key an older model.sig is removed rather than left to vouch for a model.json it did not sign."""
    key = os.environ.get(KEY_ENV)
    path = folder / SIGNATURE_FILE
    if not key:
        path.unlink(missing_ok=True)
        return
    text = signature((folder / "model.json").read_bytes(), key)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def check_signature(folder: Path, text: bytes) -> None:
    """With $BNNAS_EXPORT_KEY set, `text` (model.json as read) must carry its signature in model.sig."""
    key = os.environ.get(KEY_ENV)
    if not key:
        return
    path = folder / SIGNATURE_FILE
    if not path.exists():
        raise IntegrityError(f"{path}: missing: {KEY_ENV} is set, so only an export signed with it is loaded")
    found = _read_regular(folder, SIGNATURE_FILE).decode(errors="replace").strip()
    if not hmac.compare_digest(found, signature(text, key)):
        raise IntegrityError(
            f"{path}: not model.json's signature under {KEY_ENV} (signed with another key, or "
            "model.json changed); refusing to load the folder"
        )


def load_meta(folder: Path) -> dict:
    """An export folder's model.json: signed when $BNNAS_EXPORT_KEY is set, listing only files nas-export writes."""
    meta_path = folder / "model.json"
    if not meta_path.exists():
        raise NasError(f"{meta_path}: not found (is {folder} an export folder made by nas-export?)")
    text = _read_regular(folder, "model.json")
    check_signature(folder, text)  # on the bytes parsed below, so nothing is swapped in between
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NasError(f"{meta_path}: unreadable: {exc}") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise NasError(f"{meta_path}: files: expected a mapping of file name to sha256")
    for name in files:
        if name not in MODEL_FILES:
            path_like = "/" in name or "\\" in name or ".." in name
            what = "a path, not a file of the folder" if path_like else "not a file nas-export writes"
            raise NasError(
                f"{meta_path}: files[{json.dumps(name)}]: {what} (known: {', '.join(MODEL_FILES)}); refusing the folder"
            )
    return meta


def _read_regular(folder: Path, name: str) -> bytes:
    """The bytes of `folder/name`, a regular file inside `folder` (a link out of it, a device or a pipe is refused)."""
    path = folder / name
    try:
        inside = path.resolve().parent == folder.resolve()
        if not inside or not stat.S_ISREG(path.stat().st_mode):
            raise IntegrityError(f"{path}: not a regular file inside {folder}; refusing to read it")
        return path.read_bytes()
    except FileNotFoundError:
        raise NasError(f"{path}: missing" + (" (listed in model.json)" if name != "model.json" else "")) from None
    except OSError as exc:
        raise NasError(f"{path}: unreadable: {exc.strerror or exc}") from None


def verified_bytes(folder: Path, meta: dict, name: str) -> bytes:
    """The bytes of `folder/name` (meta from `load_meta`), once their sha256 matches model.json; refused in one
    line otherwise. A file model.json does not list is refused too: nothing could vouch for it. The bytes checked
    are the bytes loaded, so the file cannot change in between."""
    path = folder / name
    digest = meta["files"].get(name)
    if digest is None:
        onnx = meta.get("onnx")
        if name == ONNX_FILE and isinstance(onnx, dict) and onnx.get("written") is False:
            raise NasError(f"{path}: not part of this export ({onnx.get('reason')})")
        raise IntegrityError(
            f"{path}: not listed in {folder / 'model.json'}'s files, so nothing checks it; refusing to load it"
        )
    data = _read_regular(folder, name)
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{path}: sha256 differs from model.json (file changed or corrupted); refusing to load it")
    return data


def rebuild(folder: Path, meta: dict) -> nn.Module:
    """The unfolded eval model from data alone: bnnas builds `arch`, weights.pt fills it (torch.load weights_only=True,
    which refuses anything but tensors and containers), after the channels nas-slim removed are removed from it
    again (`removed_channels`). No code from the folder runs."""
    from nas.models.build import build
    from nas.models.slimming import remove_channels

    weights = verified_bytes(folder, meta, "weights.pt")
    model = build(meta["arch"], meta["input_shape"], meta["num_classes"])
    try:
        for removed in meta.get("removed_channels", []):  # nas-slim's cuts, replayed in order
            remove_channels(model, meta["input_shape"], removed)
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # an UnpicklingError of a payload, a wrong key set: the folder is not what it says
        raise IntegrityError(f"{folder / 'weights.pt'}: not weights of model.json's arch: {one_line(exc)}") from None
    return model.eval()


def load_code_file(folder: Path, meta: dict, name: str, map_location: str | torch.device = "cpu"):
    """model.ts or model.pt2, verified, as a module. Loading runs the file's code: callers load one only when asked
    for it by name, after `code_note`."""
    data = io.BytesIO(verified_bytes(folder, meta, name))
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; users still deploy it
            warnings.simplefilter("ignore", FutureWarning)
            if name == "model.ts":
                return torch.jit.load(data, map_location=map_location).eval()
            return torch.export.load(data).module().to(map_location)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, ... for a file it cannot read
        raise IntegrityError(f"{folder / name}: cannot load it: {one_line(exc)}") from None


def code_note(folder: str | Path, names: list[str]) -> str:
    """The one line said before a code file of an export folder is loaded."""
    files = " and ".join(f"{name} ({CODE_FILES[name]})" for name in names)
    verb = "are" if len(names) > 1 else "is"
    return f"note: {files} {verb} code: loading runs what its author wrote, so {folder} is trusted like a script"


def load_exported(folder: str | Path) -> Exported:
    """Read an export folder back as data (`rebuild`); every listed file's sha256 must match model.json."""
    folder = Path(folder)
    meta = load_meta(folder)
    for name in meta["files"]:
        verified_bytes(folder, meta, name)
    return Exported(folder, meta, rebuild(folder, meta))
