"""Fine-tune an exported model, or a pretrained checkpoint (`nas.deploy.checkpoint`), on new data with a
BatchNorm strategy.

When the input distribution shifts, a norm layer's running statistics are what breaks first.
The modes differ in what may adapt ("norm layers" = every norm of the model: BatchNorm, batch
renorm, GroupNorm, LayerNorm2d, EvoNorm, FRN, timm's BatchNormAct2d):

  freeze   norm layers kept in eval mode while training (running statistics do not move), their
           affine parameters frozen; every other parameter, the head included, is trained.
  adabn    running statistics reset and re-estimated on all target training inputs (no labels,
           no gradient step); with labels (K > 0) the head alone is then trained, the rest of
           the model in eval mode so the re-estimated statistics stay.
  bn-only  only the norm layers' affine parameters and the head are trained; norm layers train
           as usual, so their running statistics follow the target batches.
  full     every parameter trained, running statistics follow the target batches.
  linear-probe  the head alone trained, the rest of the model in eval mode (statistics as they came).

`unfreeze_stages` K narrows freeze, bn-only and full to the last K stages (as `nas.models.norm_swap` finds
them: timm's feature_info, or the top-level modules) and the head: earlier stages keep their parameters and,
in eval mode, their running statistics.

Norms without running statistics (group, layer, instance, BN with track_running_stats off)
have nothing for adabn to re-estimate: adabn leaves them as they are. Batch renorm keeps
running statistics and is treated like BatchNorm; adabn keeps its step counter (its r/d warm-up).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from nas.errors import DataError, NasError
from nas.models.families import head_name
from nas.models.norms import norm_layers, running_stats_layers

MODES = ("freeze", "adabn", "bn-only", "full", "linear-probe")
HEAD_ONLY = ("adabn", "linear-probe")  # train the head alone, the rest in eval mode
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
    if per_class is None:
        return torch.arange(len(y), device=y.device)
    generator = torch.Generator().manual_seed(seed)
    y_cpu = y.cpu()
    picked = []
    for label in torch.unique(y_cpu).tolist():
        members = (y_cpu == label).nonzero().flatten()
        if len(members) < per_class:
            raise DataError(
                f"--labels-per-class: {per_class} asked, but class {label} has only {len(members)} training samples "
                "(use a smaller K or 'all')"
            )
        picked.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picked).sort().values.to(y.device)


def _set_trainable(
    model: nn.Module, mode: str, unfreeze_stages: int | None = None
) -> Callable[[nn.Module], None] | None:
    """requires_grad per mode; returns the hook `fit` runs after model.train() each epoch."""
    norm_params = {id(p) for m in norm_layers(model) for p in m.parameters(recurse=False)}
    head_params = {id(p) for p in model.get_submodule(head_name(model)).parameters()}
    frozen_modules = frozen_stages(model, unfreeze_stages)
    frozen = {id(p) for m in frozen_modules for p in m.parameters()}
    for p in model.parameters():
        if id(p) in frozen and id(p) not in head_params:
            p.requires_grad_(False)
        elif mode == "full":
            p.requires_grad_(True)
        elif mode == "freeze":
            p.requires_grad_(id(p) not in norm_params)
        elif mode == "bn-only":
            p.requires_grad_(id(p) in norm_params or id(p) in head_params)
        else:  # adabn, linear-probe: the head alone
            p.requires_grad_(id(p) in head_params)
    if mode in HEAD_ONLY:
        return nn.Module.eval  # a fixed feature extractor: statistics and dropout as at inference
    if mode == "freeze" or frozen_modules:
        keep = norm_layers(model) if mode == "freeze" else frozen_modules

        def hook(m: nn.Module) -> None:
            for layer in keep:
                layer.eval()

        return hook
    return None


def frozen_stages(model: nn.Module, unfreeze: int | None) -> list[nn.Module]:
    """The modules of every stage but the last `unfreeze` (None: none frozen); the head is never one of them."""
    from nas.models.norm_swap import HEAD, stages_of

    if unfreeze is None:
        return []
    stages = stages_of(model)
    order = [stage for stage in dict.fromkeys(stages.values()) if stage != HEAD]
    if not 0 <= unfreeze <= len(order):
        raise NasError(
            f"--unfreeze-stages: {unfreeze}; {type(model).__name__} has {len(order)} stages ({', '.join(order)})"
        )
    kept = set(order[len(order) - unfreeze :])
    return [model.get_submodule(name) for name, stage in stages.items() if stage != HEAD and stage not in kept]


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
        hook = _set_trainable(model, mode, unfreeze_stages)
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        samples = len(train_idx)
        try:
            fit(model, data, train_idx, None, hp, epochs, device, seed=seed, train_mode=hook, max_steps=max_steps)
        finally:
            for p in model.parameters():
                p.requires_grad_(True)
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
    checkpoint: dict | None = None  # how a checkpoint loaded (nas.deploy.checkpoint.Loaded), for model.json


def from_export(model_dir: Path, cfg, dev) -> Start:
    """An export folder: its model, and the target normalized with its source's statistics."""
    from nas.data.datasets import load_dataset
    from nas.deploy.export import load_exported
    from nas.search.config import blamed

    source = load_exported(model_dir)
    with blamed(cfg):
        data = load_dataset(cfg.dataset, dev, normalization=source.meta["normalization"])
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
    from nas.deploy.checkpoint import check_reference, load_checkpoint, read_state_dict
    from nas.deploy.export import FORMAT
    from nas.models.build import build
    from nas.models.families import ModelError
    from nas.search.config import blamed

    check_reference(reference)
    state = read_state_dict(weights)  # a bad file is refused before the data loads
    size = cfg.dataset.image_size or expected.input_size
    dataset = dataclasses.replace(cfg.dataset, image_size=size)
    with blamed(cfg):
        data = load_dataset(dataset, dev, normalization=expected.normalization)
    log(
        f"Checkpoint input: {expected.source} (mean {_values(data.mean)}, std {_values(data.std)}), "
        f"{'x'.join(map(str, data.input_shape))}"
    )
    arch = {"model": {**reference, "kwargs": {}}, "training": hp}
    try:
        model = build(arch, data.input_shape, data.num_classes)
    except ModelError as exc:
        raise NasError(f"--model: {exc}") from None
    loaded = load_checkpoint(model, weights, state, strict)
    if loaded.mismatch():
        log(f"--strict false: loaded {loaded.loaded} tensors; {loaded.mismatch()}")
    meta = {"format": FORMAT, "arch": arch, "input_shape": list(data.input_shape)}
    described = f"{reference['family']}:{reference['name']} with {weights} ({loaded.loaded} tensors)"
    return Start(model, data, meta, described, loaded.head_replaced, dataclasses.asdict(loaded))


def _values(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


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
    log=print,
    force: bool = False,
) -> Path:
    """Adapt an export folder, or `timm:NAME` / `torchvision:NAME` / `factory:pkg.mod:fn` with its `weights`, to the
    run config's dataset; write an export plus metrics.json."""
    from nas.data.preprocessing import recipe
    from nas.deploy.checkpoint import expected_input, model_reference
    from nas.deploy.export import VERIFY_SAMPLES, check_writable, write_export, write_json
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
