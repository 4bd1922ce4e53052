"""Train the k fold models of one candidate at once, as one channel-stacked model (nas.models.stacking).

Each fold draws its batches and augmentation from its own generators, seeded as `nas.training.train.fit`
seeds them, so with equal step counts every fold sees exactly what it sees when trained alone;
the summed per-fold losses give each fold its own gradient, and one elementwise optimizer over
the stacked parameters is k optimizers. Folds of unequal size take the smallest fold's number
of steps per epoch (`batches` makes that one batch less at most for the larger ones).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nas.data.datasets import Dataset, augment_batch
from nas.data.samples import loaded, rows
from nas.errors import TrialError
from nas.models.stacking import NotStackable, stack
from nas.training.signals import SIGNALS
from nas.training.train import (
    EpochReport,
    FitResult,
    OnEpoch,
    OnTrained,
    autocast,
    batches,
    cosine_schedule,
    evaluate,
    l1_penalties,
    on_device_layout,
    optimizer_for,
    prepare_model,
    scoring_batch_size,
)


class NotBatchable(Exception):
    """The k folds cannot train as one model (the message says why); train them one by one."""


def fold_losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """(k,) mean cross-entropy of each fold from the stacked model's (k, B, classes) logits and (k, B) labels."""
    k = len(logits)
    return (
        F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none", label_smoothing=label_smoothing)
        .view(k, -1)
        .mean(1)
    )


def train_together(
    models: list[nn.Module],
    data: Dataset,
    folds: list[tuple[torch.Tensor, torch.Tensor]],
    hp: dict,
    epochs: int,
    device: torch.device,
    seeds: list[int],
    on_epoch: OnEpoch | None = None,
    on_trained: OnTrained | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[FitResult]:
    """`nas.training.train.fit` for every fold at once; the trained state is written back into `models`.

    `on_trained` after each epoch's training (the folds' mean training loss); `on_epoch` after each epoch's
    validation, with fold None, the means over the folds and each fold's loss. Raises
    NotBatchable when the models cannot be stacked or the stack does not fit in memory.
    """
    start = time.perf_counter()
    k = len(models)
    try:
        stacked = stack(models)
    except NotStackable as exc:
        raise NotBatchable(str(exc)) from None
    model = prepare_model(stacked.model, device)
    optimizer = optimizer_for(*stacked.parameters_by_decay(), hp)
    penalties, bs = l1_penalties(model, hp), hp["batch_size"]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    aug_generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    steps_per_epoch = min(max(1, len(train) // bs) for train, _ in folds)  # = fit's count when the folds agree
    schedule = cosine_schedule(optimizer, epochs * steps_per_epoch)
    validations = [(rows(data.x_train, val), data.y_train[val]) for _, val in folds]
    losses = accuracies = [float("nan")] * k
    for epoch in range(epochs):
        SIGNALS.check()  # a Ctrl-C whose raise Python dropped (see nas.training.signals)
        model.train()
        per_fold_batches = [batches(train, bs, g) for (train, _), g in zip(folds, generators)]
        size = min(len(b[0]) for b in per_fold_batches)  # differs only when a fold is smaller than one batch
        steps = (torch.stack([b[step][:size] for b in per_fold_batches]) for step in range(steps_per_epoch))
        for idx, xb in loaded(data.x_train, steps):
            if data.augment != "none":
                xb = torch.stack([augment_batch(x, data.augment, g) for x, g in zip(xb, aug_generators)])
            try:
                with autocast(device):
                    logits = model(on_device_layout(stacked.fold_input(xb), device)).float()
                    fold_loss = fold_losses(logits, data.y_train[idx], hp["label_smoothing"])
                    for weight, tensors in penalties:  # each stacked tensor holds the folds' blocks in order
                        fold_loss = fold_loss + weight * sum(t.abs().reshape(k, -1).sum(1) for t in tensors)
                optimizer.zero_grad(set_to_none=True)
                fold_loss.sum().backward()  # a sum, not a mean: each fold gets exactly its own gradient
            except torch.cuda.OutOfMemoryError as exc:
                del model, stacked, optimizer  # free the stack's memory for the one-by-one run
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise NotBatchable(f"CUDA out of memory with {k} folds together: {str(exc).splitlines()[0]}") from None
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step()
        last = fold_loss.detach().tolist()  # one sync an epoch, as fit has
        for fold, value in enumerate(last):
            if not math.isfinite(value):
                raise TrialError(f"fold {fold + 1}: training loss is {value} at epoch {epoch + 1}")
        if on_trained is not None:
            on_trained(epoch, None, statistics.fmean(last))
        if on_epoch is not None or epoch == epochs - 1:
            stacked.write_back()
            scores = [evaluate(m, x, y, device, scoring_batch_size(m, hp)) for m, (x, y) in zip(models, validations)]
            losses, accuracies = [s[0] for s in scores], [s[1] for s in scores]
            for fold, value in enumerate(losses):
                if not math.isfinite(value):
                    raise TrialError(f"fold {fold + 1}: validation loss is {value} at epoch {epoch + 1}")
            if on_epoch is not None:
                on_epoch(EpochReport(epoch, statistics.fmean(losses), statistics.fmean(accuracies), None, losses))
    share = (time.perf_counter() - start) / k  # each fold's share of the one batched run
    return [FitResult(loss, acc, share, epochs) for loss, acc in zip(losses, accuracies)]
