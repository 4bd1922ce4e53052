"""The objective: sample an ArchSpec, cross-validate it, store the score on the trial.

A proposal that repeats a tried candidate is recorded as a FAIL repeat without training
(`nas.study.duplicates`); a trial that another worker's finish put over the budget fails at once.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from nas.errors import TrialError
from nas.search.config import RunConfig
from nas.search.finetune_space import epochs_of
from nas.search.pruners import reports_every_epoch
from nas.search.space import Space
from nas.study.duplicates import Novelty, record_repeat
from nas.study.pruning import Reporter
from nas.study.schema import (
    ARCH_ATTR,
    COST_ATTRS,
    DEVICE_ATTR,
    FAIL_REASON_ATTR,
    INTERRUPTED,
    NORM_SCALES_ATTR,
    OVER_BUDGET,
    SCORE_ATTRS,
    VERSION_ATTR,
    where_it_trains,
)
from nas.study.stopping import over_budget
from nas.study.time_budget import TimeBudget
from nas.study.workers import mark_trial, reclaim_dead_trials
from nas.training.signals import SIGNALS


def make_objective(
    cfg: RunConfig,
    data,
    folds,
    device,
    *,
    epoch_bar: Callable | None = None,
    novelty: Novelty | None = None,
    version: int = 0,
    trials: int | None = None,
    time_budget: TimeBudget | None = None,
) -> Callable[[optuna.Trial], float | tuple]:
    """The objective of `cfg`'s study on `data` split into `folds`; `epoch_bar(trial_number, epochs)` makes a
    progress bar. `trials`: the finished trials the study may reach (default `study.trials`); `time_budget`: the
    deadline that cuts a trial which cannot end in time."""
    from nas.models.costs import candidate_costs
    from nas.training.cross_validation import cross_validate  # late: keeps torch out of `import nas.study` readers
    from nas.training.diagnostics import kept_scales

    space = Space(cfg.space, data.input_shape, data.num_classes)
    epochs = cfg.evaluation.epochs
    cap = cfg.study.trials if trials is None else trials

    def objective(trial: optuna.Trial) -> float | tuple:
        mark_trial(trial)
        trial.set_user_attr(VERSION_ATTR, version)
        trial.set_user_attr(DEVICE_ATTR, where_it_trains(device))
        reclaim_dead_trials(trial.study, 2 * cfg.study.heartbeat_seconds, cfg.study.retries)
        if over_budget(trial.study, trial.number, cap):
            trial.set_user_attr(FAIL_REASON_ATTR, OVER_BUDGET)
            raise TrialError(OVER_BUDGET)
        spec = space.sample(trial)
        trial.set_user_attr(ARCH_ATTR, spec)
        original = novelty.original_of(trial.study, trial.params) if novelty is not None else None
        if original is not None:
            record_repeat(trial, original)  # raises: a FAIL trial, caught by `optimize`
        reporter = Reporter(trial, cfg.evaluation.pruner, epochs_of(spec, epochs), len(folds))
        bar = epoch_bar(trial.number, epochs_of(spec, epochs)) if epoch_bar else None

        def advance(fold: int | None, **shown: str) -> None:
            if bar is not None:
                bar.update(len(folds) if fold is None else 1)
                bar.set_postfix(fold="all" if fold is None else fold + 1, **shown)

        def on_epoch(report) -> None:
            advance(report.fold, val_loss=f"{report.loss:.4f}")
            reporter.epoch(report)

        # Only a pruner that judges every epoch pays for validating every epoch; the bar shows the training loss.
        every_epoch = reports_every_epoch(cfg.evaluation.pruner, cfg.evaluation.fold_mode)
        together = cfg.evaluation.fold_mode == "together"
        deadline = (
            time_budget.guard(reporter.cut, epochs_of(spec, epochs), len(folds), together) if time_budget else None
        )

        def on_trained(epoch: int, fold: int | None, train_loss: float) -> None:
            if not every_epoch:
                advance(fold, train_loss=f"{train_loss:.4f}")
            if deadline is not None:
                deadline.epoch(epoch, fold, train_loss)

        try:
            with SIGNALS.interruptible():
                score = cross_validate(
                    spec,
                    data,
                    folds,
                    epochs,
                    device,
                    study_seed=cfg.study.seed,
                    trial_number=trial.number,
                    on_epoch=on_epoch if every_epoch else None,
                    on_trained=on_trained if (bar is not None and not every_epoch) or deadline else None,
                    on_step=deadline.step if deadline else None,
                    on_fold=reporter.fold,
                    recalibrate_bn=cfg.evaluation.recalibrate_bn,
                    fold_mode=cfg.evaluation.fold_mode,
                )
        except TrialError as exc:
            trial.set_user_attr(FAIL_REASON_ATTR, str(exc))
            raise
        except KeyboardInterrupt:  # SIGINT, and SIGTERM (see cli): Optuna marks the trial FAIL
            trial.set_user_attr(FAIL_REASON_ATTR, INTERRUPTED)
            raise
        finally:
            if bar is not None:
                bar.close()
        for key in SCORE_ATTRS:
            if key in score:
                trial.set_user_attr(key, score[key])
        measured = [*cfg.objectives, *(name for name in cfg.constraints if name not in cfg.objectives)]
        if measured == ["cv_loss"]:
            return score["cv_loss"]
        costs = candidate_costs(
            spec,
            data.input_shape,
            data.num_classes,
            device,
            cfg.evaluation.latency_batch_size,
            measured,
            cfg.evaluation.latency_threads,
        )
        for objective_name, value in costs.items():
            trial.set_user_attr(COST_ATTRS[objective_name], value)
        values = {**score, **costs, "kept_scales": kept_scales(score.get(NORM_SCALES_ATTR))}
        for name, limit in cfg.constraints.items():  # feasible when <= 0: Optuna's samplers and best trial read them
            trial.set_constraint(name, values[name] - limit)
        return values["cv_loss"] if len(cfg.objectives) == 1 else tuple(values[name] for name in cfg.objectives)

    return objective
