"""Fine-tune an exported model, or a pretrained checkpoint (`nas.models.checkpoint`), on new data with a
BatchNorm strategy.

When the input distribution shifts, a norm layer's running statistics are what breaks first. The modes
(`--bn-mode`: freeze, adabn, bn-only, full, linear-probe; `--unfreeze-stages`) are `nas.training.bn_modes`; here
adabn may also run without labels (`--labels-per-class 0`): the statistics re-estimated and nothing trained.

Norms without running statistics (group, layer, instance, BN with track_running_stats off)
have nothing for adabn to re-estimate: adabn leaves them as they are. Batch renorm keeps
running statistics and is treated like BatchNorm; adabn keeps its step counter (its r/d warm-up).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from nas.errors import DataError, NasError
from nas.models.families import head_name
from nas.models.norms import norm_layers, running_stats_layers
from nas.output import status
from nas.search.finetune_space import MODES, show_values
from nas.study.artifacts import keep_folder, open_store
from nas.study.storage import load_existing_study
from nas.training.bn_modes import all_trainable, set_trainable

TRAINS_WITHOUT_LABELS = ("adabn",)  # the modes that may run with --labels-per-class 0


def replace_head(model: nn.Module, num_classes: int) -> bool:
    """A new, freshly initialized linear head when the class count differs; True if replaced."""
    name = head_name(model)
    head = model.get_submodule(name)
    if head.out_features == num_classes:
        return False
    model.set_submodule(name, nn.Linear(head.in_features, num_classes).to(head.weight.device))
    return True


def labelled_subset(y: torch.Tensor, per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of `per_class` training samples of every class (None: all), stratified and seeded."""
    from nas.data.datasets import stratified_subset

    if per_class is None:
        return torch.arange(len(y), device=y.device)
    picked = stratified_subset(y.cpu().numpy(), per_class, seed, "--labels-per-class", "use a smaller K or 'all'")
    return torch.as_tensor(picked, device=y.device)


@dataclass
class Adaptation:
    """What one fine-tuning run did and how the target test split scored before and after."""

    mode: str
    labels_per_class: int | None  # None: every training label
    train_samples: int
    epochs: int
    seed: int
    head_replaced: bool
    before: dict | None  # None when the head was replaced: the source head cannot score new classes
    after: dict
    trained_parameters: list[str]
    changed_tensors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Plain JSON, `labels_per_class` spelt as on the command line (a count or "all")."""
        return {**asdict(self), "labels_per_class": "all" if self.labels_per_class is None else self.labels_per_class}


def adapt(
    model: nn.Module,
    data,
    mode: str,
    labels_per_class: int | None,
    epochs: int,
    seed: int,
    device: torch.device,
    hp: dict,
    max_steps: int | None = None,
    *,
    new_head: bool = False,
    unfreeze_stages: int | None = None,
) -> Adaptation:
    """Adapt `model` (already on `device`) to `data` in place; `hp` is the spec's `training` section.

    `max_steps` caps the optimizer steps (see `nas.training.train.fit`); `new_head`: the head was made for the
    target already (a checkpoint's classifier left out), so the model cannot score the target before.
    """
    from nas.training.diagnostics import recalibrate
    from nas.training.train import evaluate, fit, scoring_batch_size

    if mode not in MODES:
        raise NasError(f"--bn-mode: unknown mode '{mode}' (known: {', '.join(MODES)})")
    if labels_per_class is not None and labels_per_class < 0:
        raise NasError(f"--labels-per-class: must be >= 0 or 'all', got {labels_per_class}")
    if labels_per_class == 0 and mode not in TRAINS_WITHOUT_LABELS:
        raise NasError(f"--labels-per-class: 0 leaves {mode} nothing to train on; only adabn adapts without labels")
    if labels_per_class == 0 and not running_stats_layers(model):
        raise NasError(
            f"--bn-mode {mode}: no norm layer of {type(model).__name__} keeps running statistics, and without labels "
            "nothing is trained: the model would not change; give --labels-per-class K to train its head"
        )
    start = time.perf_counter()
    torch.manual_seed(seed)  # the new head's initialization
    head_replaced = replace_head(model, data.num_classes) or new_head
    if head_replaced and labels_per_class == 0:
        raise NasError(
            f"--labels-per-class: the target has {data.num_classes} classes, unlike the model's head; a new head "
            "needs labels (K > 0)"
        )
    before = (
        None
        if head_replaced
        else _scores(evaluate(model, data.x_test, data.y_test, device, scoring_batch_size(model, hp)))
    )
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if mode == "adabn":
        recalibrate(model, data.x_train, hp["batch_size"], device)
    trained, samples = [], 0
    if labels_per_class != 0:
        train_idx = labelled_subset(data.y_train, labels_per_class, seed)
        hook = set_trainable(model, mode, unfreeze_stages)
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        samples = len(train_idx)
        try:
            fit(model, data, train_idx, None, hp, epochs, device, seed=seed, train_mode=hook, max_steps=max_steps)
        finally:
            all_trainable(model)
    after = _scores(evaluate(model, data.x_test, data.y_test, device, scoring_batch_size(model, hp)))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]
    return Adaptation(
        mode,
        labels_per_class,
        samples,
        epochs if samples else 0,
        seed,
        head_replaced,
        before,
        after,
        trained,
        changed,
        time.perf_counter() - start,
    )


def _scores(loss_acc: tuple[float, float]) -> dict:
    return {"loss": loss_acc[0], "accuracy": loss_acc[1]}


@dataclass
class Start:
    """What a fine-tuning run starts from: the model, the target data prepared as it expects, and its provenance."""

    model: nn.Module
    data: object  # nas.data.datasets.Dataset
    meta: dict  # model.json entries carried into the result (an export's, or a checkpoint's arch)
    described: str  # for the first log line
    new_head: bool = False
    checkpoint: dict | None = None  # how a checkpoint loaded (nas.models.checkpoint.Loaded), for model.json


def from_export(model_dir: Path, cfg, dev) -> Start:
    """An export folder: its model, and the target normalized with its source's statistics."""
    from nas.data.datasets import load_dataset
    from nas.deploy.export import load_exported
    from nas.search.config import blamed

    source = load_exported(model_dir)
    resize = (source.meta.get("preprocessing") or {}).get("resize")
    dataset = cfg.dataset
    if dataset.image_size is None and resize and resize[0] == resize[1]:  # resized as the source was trained
        dataset = dataclasses.replace(dataset, image_size=resize[0])
    with blamed(cfg):
        data = load_dataset(dataset, dev, normalization=source.meta["normalization"])
    wanted = list(source.meta["input_shape"])
    if list(data.input_shape) != wanted:
        resize = (
            f": set dataset.image_size: {wanted[-1]}"
            if len(wanted) == 3 == len(data.input_shape) and wanted[0] == data.input_shape[0] and wanted[1] == wanted[2]
            else ""
        )
        raise DataError(
            f"{cfg.source}: dataset: samples of shape {list(data.input_shape)}; the model in {model_dir} takes "
            f"{wanted}{resize}"
        )
    keep = {k: v for k, v in source.meta.items() if k not in ("files", "fold_max_abs_diff", "versions")}
    return Start(source.model, data, keep, f"{model_dir} ({source.meta.get('dataset')})")


def from_checkpoint(reference: dict, weights: str | Path, cfg, dev, *, strict: bool, expected, hp: dict, log) -> Start:
    """A timm / torchvision / factory model built for the target (its channels, its classes), its checkpoint
    loaded into it; the target resized and normalized as the checkpoint expects."""
    from nas.data.datasets import load_dataset
    from nas.deploy.export import FORMAT
    from nas.models.build import build
    from nas.models.checkpoint import check_reference, load_checkpoint, read_checkpoint
    from nas.models.families import ModelError
    from nas.search.config import blamed

    check_reference(reference)
    state, sha256 = read_checkpoint(weights)  # a bad file is refused before the data loads
    size = cfg.dataset.image_size or expected.input_size
    dataset = dataclasses.replace(cfg.dataset, image_size=size)
    with blamed(cfg):
        data = load_dataset(dataset, dev, normalization=expected.normalization)
    log(
        f"Checkpoint input: {expected.source} (mean {show_values(data.mean)}, std {show_values(data.std)}), "
        f"{'x'.join(map(str, data.input_shape))}"
    )
    arch = {"model": {**reference, "kwargs": {}}, "training": hp}
    try:
        model = build(arch, data.input_shape, data.num_classes)
    except ModelError as exc:
        raise NasError(f"--model: {exc}") from None
    loaded = load_checkpoint(model, weights, state, strict, sha256=sha256)
    if loaded.mismatch():
        log(f"--strict false: loaded {loaded.loaded} tensors; {loaded.mismatch()}")
    meta = {"format": FORMAT, "arch": arch, "input_shape": list(data.input_shape)}
    described = f"{reference['family']}:{reference['name']} with {weights} ({loaded.loaded} tensors)"
    return Start(model, data, meta, described, loaded.head_replaced, dataclasses.asdict(loaded))


def finetune(
    model_dir: str | Path,
    cfg,
    *,
    mode: str,
    out: str | Path,
    labels_per_class: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int | None = None,
    unfreeze_stages: int | None = None,
    weights: str | Path | None = None,
    strict: bool = True,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    input_size: int | None = None,
    device: str | None = None,
    log=status,
    force: bool = False,
    storage: str | None = None,
) -> Path:
    """Adapt an export folder, or `timm:NAME` / `torchvision:NAME` / `factory:pkg.mod:fn` with its `weights`, to the
    run config's dataset; write an export plus metrics.json. With `storage`, the study the export came from keeps
    the result as an artifact (`finetune-trial-N-MODE-UTC_TIME.zip`), beside its exports and reports."""
    from nas.data.preprocessing import recipe
    from nas.deploy.export import VERIFY_SAMPLES, check_writable, dataset_record, write_export, write_json
    from nas.models.checkpoint import expected_input, model_reference
    from nas.search.space import training_defaults
    from nas.training.train import prepare_model, resolve_device

    reference = model_reference(str(model_dir))
    model_dir, out = Path(model_dir), Path(out)
    if reference is None and weights is not None:
        raise NasError(
            f"--weights: for a checkpoint of --model timm:NAME, torchvision:NAME or factory:pkg.mod:fn; {model_dir} "
            "is an export folder, which carries its own weights"
        )
    if reference is not None and weights is None:
        raise NasError(f"--model {model_dir}: give its checkpoint with --weights FILE (nothing is downloaded)")
    if reference is None and out.resolve() == model_dir.resolve():
        raise NasError(f"--out: {out} is the source model's folder; write the fine-tuned model elsewhere")
    if reference is None and (mean is not None or std is not None or input_size is not None):
        raise NasError("--mean/--std/--input-size: for a checkpoint; an export folder carries its preprocessing")
    expected = expected_input(reference, mean, std, input_size) if reference is not None else None
    check_writable(out, force)
    dev = resolve_device(device or cfg.device)
    if reference is None:
        start = from_export(model_dir, cfg, dev)
        hp = dict(start.meta["arch"]["training"])
    else:
        hp = training_defaults()
        start = from_checkpoint(reference, weights, cfg, dev, strict=strict, expected=expected, hp=hp, log=log)
    source_study = None
    if storage is not None:  # checked before training: the study the export names must be there
        if not start.meta.get("study"):
            raise NasError(f"--storage: {model_dir} names no study (made by nas-export from a study, it would)")
        source_study = load_existing_study(storage, start.meta["study"])
    hp.update({k: v for k, v in (("lr", lr), ("batch_size", batch_size)) if v is not None})
    start.meta["arch"] = {**start.meta["arch"], "training": hp}
    data = start.data
    epochs_given = epochs is not None
    epochs = epochs or cfg.evaluation.epochs
    model = prepare_model(start.model, dev)
    shift = ", ".join(f"{name} {value}" for item in cfg.dataset.transforms for name, value in item.items())
    log(
        f"Fine-tuning {start.described} on {cfg.dataset.name}{f' ({shift})' if shift else ''} with --bn-mode {mode} "
        f"on {dev.type}"
    )
    for note in mode_notes(model, mode, labels_per_class, epochs, epochs_given, unfreeze_stages):
        log(note)
    result = adapt(
        model,
        data,
        mode,
        labels_per_class,
        epochs,
        seed,
        dev,
        hp,
        new_head=start.new_head,
        unfreeze_stages=unfreeze_stages,
    )
    before = (
        "n/a (new head)"
        if result.before is None
        else f"loss {result.before['loss']:.4f}, accuracy {result.before['accuracy']:.4f}"
    )
    log(
        f"Target test split before: {before}; after: loss {result.after['loss']:.4f}, accuracy "
        f"{result.after['accuracy']:.4f} ({result.train_samples} labelled samples, {result.epochs} epochs)"
    )
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    metrics = {
        "source": str(model_dir),
        "target_config": cfg.source,
        "target_dataset": cfg.dataset.name,
        "target_data": data.fingerprint,
        "transforms": cfg.dataset.transforms,
        "lr": hp["lr"],
        "batch_size": hp["batch_size"],
        "unfreeze_stages": unfreeze_stages,
        **({"checkpoint": start.checkpoint} if start.checkpoint else {}),
        **result.to_dict(),
    }
    meta = {
        **start.meta,
        "num_classes": data.num_classes,
        "classes": data.classes,
        "normalization": {"mean": data.mean, "std": data.std},
        "dataset": cfg.dataset.name,
        "dataset_config": dataset_record(cfg),
        "data": data.fingerprint,
        "preprocessing": recipe(data),
        "epochs": result.epochs,
        "test": {**result.after, "samples": len(data.y_test)},
        "finetune": {
            **{
                k: metrics[k]
                for k in (
                    "source",
                    "target_config",
                    "transforms",
                    "mode",
                    "labels_per_class",
                    "seed",
                    "head_replaced",
                    "unfreeze_stages",
                )
            },
            "source_data": start.meta.get("data"),
            **({"checkpoint": start.checkpoint} if start.checkpoint else {}),
        },
    }
    write_export(model, data.x_test[:VERIFY_SAMPLES].cpu(), meta, out, log)
    write_json(out / "metrics.json", metrics)
    log(f"Wrote {out / 'metrics.json'}")
    if source_study is not None:
        store = open_store(storage)
        name = f"finetune-trial-{meta.get('trial')}-{mode}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.zip"
        if store is None:
            log(f"--storage: {storage} has no artifact store beside it; the result is not kept with the study")
        else:
            keep_folder(source_study, store, out, name)
            log(f"Kept as artifact {name} of study '{source_study.study_name}'")
    return out


def mode_notes(
    model: nn.Module,
    mode: str,
    labels_per_class: int | None,
    epochs: int,
    epochs_given: bool,
    unfreeze_stages: int | None = None,
) -> list[str]:
    """What a mode will not do with this model and these flags, said before it runs rather than left to be found."""

    notes = []
    if mode == "adabn" and not running_stats_layers(model):
        notes.append("No norm layer of this model keeps running statistics: adabn has nothing to re-estimate")
    if mode == "adabn" and labels_per_class == 0 and epochs_given:
        notes.append(
            f"--epochs {epochs} is ignored: adabn without labels (--labels-per-class 0, its default) only "
            "re-estimates the norm statistics, with no training epoch; give --labels-per-class K to also train the "
            "head for --epochs"
        )
    if mode == "bn-only" and not any(p.numel() for m in norm_layers(model) for p in m.parameters(recurse=False)):
        notes.append(
            "This model's norm layers have no affine parameters (affine: false, or no norm): bn-only trains the "
            "head alone (their running statistics still follow the target batches)"
        )
    return notes
