"""How a trial reports its progress to the study's pruner, and what a pruned trial keeps.

A step is the resource a trial has spent, on a scale that depends on the fold mode:
  - folds trained together (`fold_mode: together`): all k folds advance epoch by epoch, so the
    median, successive-halving and Hyperband pruners get a report after every epoch e (1-based)
    at step e, the mean validation loss over the folds; the largest step is `epochs`;
  - folds one after another (`sequential`): every pruner is told only completed folds, whose
    values are the fold scores (recalibrated with `recalibrate_bn`). The median, successive-halving
    and Hyperband pruners get, after fold f (1-based), the mean score of folds 1..f at step f, so
    every rung falls on completed folds and compares like with like (a per-epoch step f x epochs + e
    put a rung on an epoch or two of a fresh fold, ignored the finished folds, and the median
    compared a trial's best over earlier folds with others' early epochs); the largest step is
    `folds`. The Wilcoxon pruner (made for k-fold scores) gets fold f's score at step f - 1.
No trial is judged at its last step: its CV is complete, so pruning it would save nothing and lose
a scored candidate. Failed trials are kept out of every pruner's view (`FoldPruner`): Optuna's
successive halving would otherwise rank a retried candidate against its own interrupted self.
A together trial that falls back to one fold after another (out of memory) stays on the study's
scale: it reports its CV mean at step `epochs` and is not judged.
A pruned trial keeps what it measured: `fold_losses` (the folds it finished), `partial_fold_losses`
(each fold's latest validation loss, None for a fold not begun) and `pruned_at_step`.
"""

from __future__ import annotations

import statistics
import warnings

import optuna
from optuna.trial import TrialState

from nas.search.pruners import EPOCH_PRUNERS, PRUNERS, max_resource
from nas.study.schema import CUT_ATTR, FOLD_LOSSES_ATTR, PARTIAL_FOLD_LOSSES_ATTR, PRUNED_AT_STEP_ATTR
from nas.training.train import EpochReport


class _WithoutFailed:
    """A storage seen without its FAIL trials; everything else is the storage itself."""

    def __init__(self, storage):
        self._storage = storage

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        trials = self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [t for t in trials if t.state != TrialState.FAIL]

    def __getattr__(self, name):
        return getattr(self._storage, name)


class FoldPruner(optuna.pruners.BasePruner):
    """Optuna's pruner `inner`, judging without FAIL trials, and the scale of the steps it is told.

    The view goes through the storage, since Hyperband's bracket studies read trials from it directly.
    """

    def __init__(self, inner: optuna.pruners.BasePruner, epochs: int, folds: int, fold_mode: str):
        self.inner, self.epochs, self.folds, self.fold_mode = inner, epochs, folds, fold_mode

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        view = optuna.study.Study(study.study_name, _WithoutFailed(study._storage), study.sampler, self.inner)
        return self.inner.prune(view, trial)


def make_pruner(name: str, epochs: int, folds: int = 3, fold_mode: str = "together") -> FoldPruner:
    """The pruner `evaluation.pruner` names; multi-fidelity ones span 1 .. `max_resource` steps."""
    top = max_resource(epochs, folds, fold_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # Wilcoxon
        inner = PRUNERS[name](top)
    return FoldPruner(inner, epochs, folds, fold_mode)


class Reporter:
    """One trial's reports to its pruner; on a prune it leaves the partial fold data on the trial.

    The fold mode is the one the study's pruner (`make_pruner`) was sized for, so a together trial
    that falls back to sequential still reports on the study's scale.
    """

    def __init__(self, trial: optuna.Trial, pruner: str, epochs: int, folds: int):
        scale = trial.study.pruner
        if not isinstance(scale, FoldPruner):
            raise TypeError(
                f"the study's pruner is {type(scale).__name__}, not one nas.study.pruning.make_pruner built"
            )
        self.trial, self.pruner, self.epochs, self.folds, self.fold_mode = trial, pruner, epochs, folds, scale.fold_mode
        self.fold_losses: list[float] = []  # finished folds
        self.latest: list[float | None] = [None] * folds  # each fold's latest validation loss
        self.reported: set[int] = set()

    def epoch(self, report: EpochReport) -> None:
        """After an epoch of one fold, or of all folds together (fold None)."""
        if report.fold is not None:  # one fold after another: judged per completed fold (see `fold`)
            self.latest[report.fold] = report.loss
            return
        self.latest = list(report.fold_losses) if report.fold_losses is not None else self.latest
        if self.pruner in EPOCH_PRUNERS:
            self._report(report.epoch + 1, report.loss, judge=report.epoch + 1 < self.epochs)

    def fold(self, fold: int, loss: float) -> None:
        """After `fold` is scored (`loss`: its score, recalibrated when re-estimating)."""
        self.fold_losses.append(loss)
        self.latest[fold] = loss
        done = len(self.fold_losses)
        if self.fold_mode == "together":  # scored after every fold trained: a fallback's CV mean on the study's scale
            if done == self.folds and self.pruner in EPOCH_PRUNERS and self.epochs not in self.reported:
                self._report(self.epochs, statistics.fmean(self.fold_losses), judge=False)
        elif self.pruner == "wilcoxon":
            self._report(fold, loss, judge=done < self.folds)
        elif self.pruner in EPOCH_PRUNERS:
            self._report(done, statistics.fmean(self.fold_losses), judge=done < self.folds)

    def _report(self, step: int, value: float, judge: bool) -> None:
        self.trial.report(value, step)
        self.reported.add(step)
        if judge and self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT_STEP_ATTR, step)
            self._keep_partial()
            raise optuna.TrialPruned(f"pruned at step {step}")

    def cut(self, why: str) -> None:
        """End the trial as pruned for a reason of the search's own (the time budget's deadline), keeping what it
        measured; `why` is stored as its `cut_by_budget`."""
        self.trial.set_user_attr(CUT_ATTR, why)
        self._keep_partial()
        raise optuna.TrialPruned(why)

    def _keep_partial(self) -> None:
        self.trial.set_user_attr(FOLD_LOSSES_ATTR, list(self.fold_losses))
        self.trial.set_user_attr(PARTIAL_FOLD_LOSSES_ATTR, list(self.latest))
