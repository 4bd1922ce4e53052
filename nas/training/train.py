"""Train one model on one split and evaluate it: a short loop over index slices of tensors.

This module knows nothing of YAML or Optuna: it takes a model, the data, indices and the
spec's `training` hyperparameters, and calls `on_epoch(EpochReport)` when given (the caller
prunes there by raising). Every training loop (one fold, the folds together) reports one shape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nas.data.datasets import Dataset, augment_batch
from nas.data.samples import loaded, rows
from nas.errors import NasError, TrialError
from nas.models.norms import batch_dependent_in_eval, norm_layers
from nas.training.signals import SIGNALS


@dataclass(frozen=True)
class EpochReport:
    """One epoch's validation. `fold` is None when the folds train together: then `loss` and `accuracy`
    are their means and `fold_losses` each fold's."""

    epoch: int  # 0-based
    loss: float
    accuracy: float
    fold: int | None = None
    fold_losses: list[float] | None = None


OnEpoch = Callable[[EpochReport], None]
# After each epoch's training, before any validation: (epoch, fold or None when the folds train together, the
# last batch's training loss, their mean when together). A progress bar needs no validation.
OnTrained = Callable[[int, "int | None", float], None]


@dataclass
class FitResult:
    val_loss: float
    val_accuracy: float
    seconds: float
    epochs: int


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise NasError("device: cuda was asked for, but torch sees no CUDA device (use --device auto or cpu)")
    return torch.device(name)


def uses_channels_last(device: torch.device) -> bool:
    """channels_last for 2-D models on CUDA only: on the CPU it speeds up max pooling but slows most other
    layers, and a search over the digits space is slower with it (docs/performance.md)."""
    return device.type == "cuda"


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to the device; on CUDA use channels_last for 2-D convs and let cuDNN pick kernels."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if uses_channels_last(device) and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on the CPU, where bf16 convs are slower."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def make_optimizer(model: nn.Module, hp: dict) -> torch.optim.Optimizer:
    """SGD with Nesterov or AdamW; norm scales/shifts and biases get no weight decay (as in timm)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return optimizer_for([p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1], hp)


def optimizer_for(decay: list[torch.Tensor], no_decay: list[torch.Tensor], hp: dict) -> torch.optim.Optimizer:
    """The optimizer `hp` names, weight decay on `decay` only."""
    groups = [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=hp["lr"], momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=hp["lr"])


def cosine_schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to zero over `total` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    """The conv kernels the L1 penalty acts on."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


def norm_scales(model: nn.Module, trainable: bool = True) -> list[torch.Tensor]:
    """The scales (gamma) of the model's norms (`trainable`: only those that train): what `training.bn_sparsity`
    pushes toward zero (Liu et al. 2017, network slimming), so that channels whose gamma ends small can be removed."""
    return [
        m.weight
        for m in norm_layers(model)
        if isinstance(getattr(m, "weight", None), nn.Parameter) and (m.weight.requires_grad or not trainable)
    ]


def l1_penalties(model: nn.Module, hp: dict) -> list[tuple[float, list[torch.Tensor]]]:
    """(weight, tensors) of each L1 penalty `hp` asks for: `l1` on conv kernels, `bn_sparsity` on norm scales."""
    terms = [(hp.get("l1", 0.0), conv_weights(model)), (hp.get("bn_sparsity", 0.0), norm_scales(model))]
    return [(weight, tensors) for weight, tensors in terms if weight > 0 and tensors]


def batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index slices; a last partial batch is dropped (BatchNorm needs > 1 sample) unless it is the only one."""
    order = indices[torch.randperm(len(indices), generator=generator, device="cpu").to(indices.device)]
    full = len(order) // batch_size
    if full == 0:
        return [order]
    return list(order[: full * batch_size].split(batch_size))


EVAL_BATCH = 1024  # evaluation batch of models whose eval outputs do not depend on the batch


def batch_dependent(model: nn.Module) -> bool:
    """True when some BatchNorm keeps no running statistics: in eval mode it normalizes with each
    batch's own statistics, so a sample's output depends on the samples batched with it."""
    return any(map(batch_dependent_in_eval, model.modules()))


def scoring_batch_size(model: nn.Module, hp: dict) -> int:
    """The batch to evaluate in: the training batch size for a batch-dependent model (it is what
    the model was trained with, and scoring it on 1,024 samples at once would be transductive)."""
    return hp["batch_size"] if batch_dependent(model) else EVAL_BATCH


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    batch_size: int = EVAL_BATCH,
    keep_mode: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy; the model in eval mode unless `keep_mode`."""
    if not keep_mode:
        model.eval()
    loss_sum = correct = torch.zeros((), device=y.device)  # summed on the device: one sync at the end
    parts = math.ceil(len(y) / batch_size)  # near-equal batches: none of one sample, which batch statistics cannot take
    for xb, yb in zip(x.tensor_split(parts), y.tensor_split(parts)):
        with autocast(device):
            logits = model(on_device_layout(xb, device)).float()
        loss_sum = loss_sum + F.cross_entropy(logits, yb, reduction="sum")
        correct = correct + (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)


def on_device_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last for images on CUDA, matching the model's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if uses_channels_last(device) and x.dim() == 4 else x


def fit(
    model: nn.Module,
    data: Dataset,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor | None,
    hp: dict,
    epochs: int,
    device: torch.device,
    *,
    seed: int = 0,
    fold: int | None = None,
    on_epoch: OnEpoch | None = None,
    on_trained: OnTrained | None = None,
    on_step: Callable[[], None] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    max_steps: int | None = None,
) -> FitResult:
    """Train `model` on `train_idx` for `epochs` with a cosine learning rate, validate on `val_idx`
    (None: no validation).

    `fold` labels the epoch reports; `on_epoch` validates every epoch, `on_trained` only reports the training
    loss; `on_step()` after every optimizer step may end training by raising (a deadline). Only parameters with
    requires_grad are trained; `train_mode(model)`,
    when given, runs after `model.train()` every epoch (fine-tuning keeps some norm layers in eval mode there).
    `max_steps` ends training after that many optimizer steps (the schedule then spans them), so
    runs on labelled sets of different sizes can get exactly the same number of steps.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    aug_generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = make_optimizer(model, hp)
    penalties = l1_penalties(model, hp)
    steps_per_epoch = max(1, len(train_idx) // hp["batch_size"])
    total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
    schedule = cosine_schedule(optimizer, total)
    done = 0
    if val_idx is not None:
        x_val, y_val = rows(data.x_train, val_idx), data.y_train[val_idx]
    val_loss = val_acc = float("nan")
    for epoch in range(epochs):
        model.train()
        SIGNALS.check()  # a Ctrl-C whose raise Python dropped (see nas.training.signals)
        if train_mode is not None:
            train_mode(model)
        for idx, xb in loaded(data.x_train, batches(train_idx, hp["batch_size"], generator)[: total - done]):
            done += 1
            xb = augment_batch(xb, data.augment, aug_generator)
            with autocast(device):
                loss = F.cross_entropy(
                    model(on_device_layout(xb, device)).float(),
                    data.y_train[idx],
                    label_smoothing=hp["label_smoothing"],
                )
                for weight, tensors in penalties:
                    loss = loss + weight * sum(t.abs().sum() for t in tensors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step()
        last = loss.item()
        if not math.isfinite(last):
            raise TrialError(f"training loss is {last} at epoch {epoch + 1}")
        if on_trained is not None:
            on_trained(epoch, fold, last)
        if val_idx is not None and (on_epoch is not None or epoch == epochs - 1):
            val_loss, val_acc = evaluate(model, x_val, y_val, device, scoring_batch_size(model, hp))
            if not math.isfinite(val_loss):
                raise TrialError(f"validation loss is {val_loss} at epoch {epoch + 1}")
            if on_epoch is not None:
                on_epoch(EpochReport(epoch, val_loss, val_acc, fold))
    return FitResult(val_loss, val_acc, time.perf_counter() - start, epochs)
