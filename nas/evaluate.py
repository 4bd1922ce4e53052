"""k-fold cross-validation of one ArchSpec: a fresh model per fold, scored by mean validation loss."""

from __future__ import annotations

import statistics
from typing import Callable

import numpy as np
import torch

from nas.build import build, count_parameters
from nas.data import Dataset
from nas.errors import TrialError
from nas.diagnostics import recalibrate, train_mode_loss
from nas.train import evaluate, fit, prepare_model


def fold_seed(study_seed: int, trial_number: int, fold: int) -> int:
    """A seed derived from (study seed, trial number, fold), independent across the three."""
    return int(np.random.SeedSequence([study_seed, trial_number, fold]).generate_state(1)[0])


def cross_validate(
    spec: dict,
    data: Dataset,
    folds: list[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    device: torch.device,
    study_seed: int = 0,
    trial_number: int = 0,
    on_epoch: Callable[[int, int, float, float], None] | None = None,
    on_fold: Callable[[int, float], None] | None = None,
    recalibrate_bn: bool = False,
) -> dict:
    """Train and validate `spec` on every fold; returns the Score as plain data.

    `on_epoch(fold, epoch, val_loss, val_acc)` and `on_fold(fold, val_loss)` let the caller
    report to a pruner (and stop by raising). Each fold also records the BN diagnostics: the
    validation loss with batch statistics, and with `recalibrate_bn` the loss after the running
    statistics are re-estimated on the training fold (which then is the fold's score).
    """
    losses, accuracies, seconds, params = [], [], 0.0, 0
    eval_mode, train_mode = [], []
    for k, (train_idx, val_idx) in enumerate(folds):
        seed = fold_seed(study_seed, trial_number, k)
        torch.manual_seed(seed)
        try:
            model = build(spec, data.input_shape, data.num_classes)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise TrialError(f"cannot build the model for input {data.input_shape}: {exc}") from exc
        params = count_parameters(model)
        model = prepare_model(model, device)
        per_epoch = None if on_epoch is None else (lambda e, loss, acc, k=k: on_epoch(k, e, loss, acc))
        hp = spec["training"]
        try:
            result = fit(model, data, train_idx, val_idx, hp, epochs, device, seed, per_epoch)
        except torch.cuda.OutOfMemoryError as exc:
            del model  # release this candidate's memory before the next trial
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise TrialError(f"CUDA out of memory (batch size {hp['batch_size']}, {params:,} parameters): {str(exc).splitlines()[0]}") from None
        loss, accuracy = result.val_loss, result.val_accuracy
        x_val, y_val = data.x_train[val_idx], data.y_train[val_idx]
        eval_mode.append(loss)
        batch_stats_loss = train_mode_loss(model, x_val, y_val, hp["batch_size"], device)
        train_mode.append(loss if batch_stats_loss is None else batch_stats_loss)
        if recalibrate_bn:
            recalibrate(model, data.x_train[train_idx], hp["batch_size"], device)
            loss, accuracy = evaluate(model, x_val, y_val, device)
        losses.append(loss)
        accuracies.append(accuracy)
        seconds += result.seconds
        if on_fold is not None:
            on_fold(k, result.val_loss)
    return {
        "cv_loss": statistics.fmean(losses),
        "cv_loss_std": statistics.pstdev(losses),
        "fold_losses": losses,
        "fold_accuracies": accuracies,
        "cv_accuracy": statistics.fmean(accuracies),
        "params": params,
        "train_seconds": seconds,
        "eval_mode_loss": statistics.fmean(eval_mode),
        "train_mode_loss": statistics.fmean(train_mode),
        **({"recalibrated_loss": statistics.fmean(losses)} if recalibrate_bn else {}),
    }
