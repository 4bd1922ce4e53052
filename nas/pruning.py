"""How a trial reports its progress to the study's pruner, and what a pruned trial keeps.

Steps are resources spent, in epochs of one fold:
  - folds trained together (`fold_mode: together`): all k folds advance epoch by epoch, so the
    report after epoch e (1-based) is at step e, with the mean validation loss over the folds;
    the largest step is `epochs`;
  - folds one after another (`sequential`): the report after epoch e of fold f (0-based f) is at
    step f x epochs + e, with that fold's validation loss, so trials compare at equal steps on the
    same fold and epoch; the largest step is `folds x epochs`.
The median, successive-halving and Hyperband pruners read these per-epoch reports; the Wilcoxon
pruner (made for k-fold scores) reads one report per fold, at step f, with the fold's score.
A pruned trial keeps what it measured: `fold_losses` (the folds it finished), `partial_fold_losses`
(each fold's latest validation loss, None for a fold not begun) and `pruned_at_step`.
"""

from __future__ import annotations

import warnings

import optuna

EPOCH_PRUNERS = ("median", "hyperband", "successive_halving")
REDUCTION_FACTOR = 3  # successive halving keeps the best third at every rung (Optuna's default)


def max_resource(epochs: int, folds: int, fold_mode: str) -> int:
    """The largest step a trial reports (see the module docstring)."""
    return epochs if fold_mode == "together" else folds * epochs


def make_pruner(name: str, epochs: int, folds: int = 3, fold_mode: str = "together") -> optuna.pruners.BasePruner:
    """The pruner `evaluation.pruner` names; multi-fidelity ones span 1 .. `max_resource` epochs."""
    top = max_resource(epochs, folds, fold_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, top // 3))
        if name == "wilcoxon":
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=REDUCTION_FACTOR)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=top, reduction_factor=REDUCTION_FACTOR)
    return optuna.pruners.NopPruner()


def reports_every_epoch(name: str) -> bool:
    return name in EPOCH_PRUNERS


class Reporter:
    """One trial's reports to its pruner; on a prune it leaves the partial fold data on the trial."""

    def __init__(self, trial: optuna.Trial, pruner: str, epochs: int, folds: int):
        self.trial, self.pruner, self.epochs = trial, pruner, epochs
        self.fold_losses: list[float] = []  # finished folds
        self.latest: list[float | None] = [None] * folds  # each fold's latest validation loss

    def epoch(self, fold: int | None, epoch: int, loss: float, per_fold: list[float] | None = None) -> None:
        """After 0-based `epoch` of `fold` (None: all folds together, `loss` their mean, `per_fold` each)."""
        if fold is None:
            self.latest = list(per_fold) if per_fold is not None else self.latest
            step = epoch + 1
        else:
            self.latest[fold] = loss
            step = fold * self.epochs + epoch + 1
        if reports_every_epoch(self.pruner):
            self._report(step, loss)

    def fold(self, fold: int, loss: float) -> None:
        """After `fold` is scored (`loss`: its score, recalibrated when re-estimating)."""
        self.fold_losses.append(loss)
        self.latest[fold] = loss
        if self.pruner == "wilcoxon":
            self._report(fold, loss)

    def _report(self, step: int, value: float) -> None:
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.trial.set_user_attr("fold_losses", list(self.fold_losses))
            self.trial.set_user_attr("partial_fold_losses", list(self.latest))
            self.trial.set_user_attr("pruned_at_step", step)
            raise optuna.TrialPruned(f"pruned at step {step}")
