"""k-fold cross-validation of one ArchSpec: a fresh model per fold, scored by mean validation loss."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np
import torch

from nas.data.datasets import Dataset
from nas.data.samples import rows
from nas.errors import NasError, TrialError
from nas.models.build import build, count_parameters
from nas.models.checkpoint import load_pinned
from nas.search.finetune_space import epochs_of
from nas.training.bn_modes import start_strategy
from nas.training.diagnostics import recalibrate, scale_summary, train_mode_loss
from nas.training.folds_together import NotBatchable, train_together
from nas.training.train import OnEpoch, OnTrained, evaluate, fit, norm_scales, prepare_model, scoring_batch_size


def fold_seed(study_seed: int, trial_number: int, fold: int) -> int:
    """A seed derived from (study seed, trial number, fold), independent across the three."""
    return int(np.random.SeedSequence([study_seed, trial_number, fold]).generate_state(1)[0])


def cross_validate(
    spec: dict,
    data: Dataset,
    folds: list[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    device: torch.device,
    *,
    study_seed: int = 0,
    trial_number: int = 0,
    on_epoch: OnEpoch | None = None,
    on_trained: OnTrained | None = None,
    on_step: Callable[[], None] | None = None,
    on_fold: Callable[[int, float], None] | None = None,
    recalibrate_bn: bool = False,
    fold_mode: str = "together",
) -> dict:
    """Train and validate `spec` on every fold; returns the Score as plain data.

    `on_epoch(EpochReport)` and `on_fold(fold, val_loss)` let the caller report to a pruner (and
    stop by raising); `on_epoch` validates every epoch, which `on_trained(epoch, fold, train_loss)` (a progress
    bar's) does not; `on_step()` after every optimizer step may end the trial by raising (a deadline). With
    `fold_mode` `together` the folds train as one batched computation
    (nas.training.folds_together) and report with fold None; a spec that cannot train batched
    trains one fold after another, and the Score says why in `fold_mode_fallback`. Each fold also
    records the BN diagnostics: the validation loss with batch statistics, and with `recalibrate_bn`
    the loss after the running statistics are re-estimated on the training fold (which then is the
    fold's score). A spec that fine-tunes a checkpoint (`finetune`, `model.weights`) starts every fold from the
    checkpoint, with its strategy (`nas.training.bn_modes`) and its `finetune.epochs` when it sets them.
    """
    hp = spec["training"]
    strategy = spec.get("finetune")
    epochs = epochs_of(spec, epochs)
    seeds = [fold_seed(study_seed, trial_number, k) for k in range(len(folds))]
    together, fallback = None, None
    if fold_mode == "together" and "model" in spec:
        fallback = no_stacked_form(spec)
    elif fold_mode == "together":
        models = [_model(spec, data, device, seed) for seed in seeds]
        try:
            together = list(
                zip(
                    models,
                    train_together(models, data, folds, hp, epochs, device, seeds, on_epoch, on_trained, on_step),
                )
            )
        except NotBatchable as exc:
            fallback = str(exc)
        del models
    losses, accuracies, seconds, params = [], [], 0.0, 0
    eval_mode, train_mode, scales = [], [], []
    for k, (train_idx, val_idx) in enumerate(folds):
        if together is not None:
            model, result = together[k]
        else:
            model = _model(spec, data, device, seeds[k])
            norms_hook = None
            if strategy is not None:
                norms_hook = start_strategy(model, strategy, rows(data.x_train, train_idx), hp["batch_size"], device)
            try:
                result = fit(
                    model,
                    data,
                    train_idx,
                    val_idx,
                    hp,
                    epochs,
                    device,
                    seed=seeds[k],
                    fold=k,
                    on_epoch=on_epoch,
                    on_trained=on_trained,
                    on_step=on_step,
                    train_mode=norms_hook,
                )
            except torch.cuda.OutOfMemoryError as exc:
                params = count_parameters(model)
                del model  # release this candidate's memory before the next trial
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise TrialError(
                    f"CUDA out of memory (batch size {hp['batch_size']}, {params:,} parameters): "
                    f"{str(exc).splitlines()[0]}"
                ) from None
        params = count_parameters(model)
        scales += [scale.detach().cpu() for scale in norm_scales(model, trainable=False)]
        loss, accuracy = result.val_loss, result.val_accuracy
        x_val, y_val = rows(data.x_train, val_idx), data.y_train[val_idx]
        eval_mode.append(loss)
        batch_stats_loss = train_mode_loss(model, x_val, y_val, hp["batch_size"], device)
        train_mode.append(loss if batch_stats_loss is None else batch_stats_loss)
        if recalibrate_bn:
            recalibrate(model, rows(data.x_train, train_idx), hp["batch_size"], device)
            loss, accuracy = evaluate(model, x_val, y_val, device, scoring_batch_size(model, hp))
        losses.append(loss)
        accuracies.append(accuracy)
        seconds += result.seconds
        if on_fold is not None:
            on_fold(k, loss)  # the fold's score: the recalibrated loss when re-estimating
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
        "fold_mode": "together" if together is not None else "sequential",
        **({"fold_mode_fallback": fallback} if fallback is not None else {}),
        **({"norm_scales": summary} if (summary := scale_summary(scales)) is not None else {}),
    }


def no_stacked_form(spec: dict) -> str:
    """Why a foreign model's folds train one by one (stacking knows only the generated chain's layers)."""
    return f"a {spec['model']['family']} model has no stacked form: its folds train one by one"


def _model(spec: dict, data: Dataset, device: torch.device, seed: int) -> torch.nn.Module:
    """The fold's fresh model, its initialization seeded by the fold's seed (a checkpoint's: loaded into it)."""
    torch.manual_seed(seed)
    try:
        model = build_candidate(spec, data.input_shape, data.num_classes)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise TrialError(f"cannot build the model for input {data.input_shape}: {exc}") from exc
    return prepare_model(model, device)


def build_candidate(spec: dict, input_shape, num_classes: int) -> torch.nn.Module:
    """`build(spec)`, with the checkpoint the spec fine-tunes (`model.weights`) loaded into it."""
    model = build(spec, input_shape, num_classes)
    weights = spec["model"].get("weights") if isinstance(spec.get("model"), dict) else None
    if weights is not None:
        try:
            load_pinned(model, weights)
        except NasError as exc:
            raise TrialError(str(exc)) from None
    return model
