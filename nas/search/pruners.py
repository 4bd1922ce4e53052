"""Pruners by name (`evaluation.pruner`), the largest step a trial reports, and when a pruner can save nothing.

One registry, name -> factory(max_resource); the YAML names are its keys. What a step is, and
how a trial reports, is `nas.study.pruning`. Optuna is imported only when a pruner is made.
"""

from __future__ import annotations

EPOCH_PRUNERS = ("median", "hyperband", "successive_halving")  # judge the mean so far, on the study's scale
REDUCTION_FACTOR = 3  # successive halving keeps the best third at every rung (Optuna's default)
P_THRESHOLD = 0.1  # Wilcoxon's (Optuna's default)


def _pruners():
    import optuna.pruners

    return optuna.pruners


PRUNERS = {
    "none": lambda top: _pruners().NopPruner(),
    "median": lambda top: _pruners().MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, top // 3)),
    "wilcoxon": lambda top: _pruners().WilcoxonPruner(p_threshold=P_THRESHOLD),
    "successive_halving": lambda top: _pruners().SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=REDUCTION_FACTOR
    ),
    "hyperband": lambda top: _pruners().HyperbandPruner(
        min_resource=1, max_resource=top, reduction_factor=REDUCTION_FACTOR
    ),
}
PRUNER_NAMES = tuple(PRUNERS)


def max_resource(epochs: int, folds: int, fold_mode: str) -> int:
    """The largest step a trial reports (see the module docstring)."""
    return epochs if fold_mode == "together" else folds


def smallest_wilcoxon_p(pairs: int) -> float:
    """The smallest one-sided p the Wilcoxon signed-rank test gives on `pairs` paired values (1/2^pairs)."""
    import scipy.stats

    return float(scipy.stats.wilcoxon(range(1, pairs + 1), alternative="greater").pvalue)


def pruner_problem(name: str, folds: int, fold_mode: str, recalibrate_bn: bool) -> str | None:
    """Why `evaluation.pruner` cannot save compute with these settings (None: it can)."""
    if name == "none":
        return None
    if fold_mode == "together" and name == "wilcoxon":
        return (
            "wilcoxon needs fold_mode: sequential (with the folds trained together, fold scores arrive "
            "after every fold trained: there is nothing left to save)"
        )
    if fold_mode == "together" and recalibrate_bn:
        return (
            f"{name} with recalibrate_bn needs fold_mode: sequential (the scored, recalibrated loss exists "
            "once a fold has trained; with the folds together that is after all of them: nothing left to save)"
        )
    if name == "wilcoxon" and smallest_wilcoxon_p(folds - 1) >= P_THRESHOLD:
        need = next(k for k in range(folds + 1, 64) if smallest_wilcoxon_p(k - 1) < P_THRESHOLD)
        return (
            f"wilcoxon cannot prune with {folds} folds at p_threshold {P_THRESHOLD}: it judges after every fold "
            f"but the last, and the smallest one-sided p after n folds is 1/2^n; use >= {need} folds"
        )
    return None


def reports_every_epoch(name: str, fold_mode: str = "together") -> bool:
    """Whether the pruner reads per-epoch validation losses (sequential trials report per fold only)."""
    return name in EPOCH_PRUNERS and fold_mode == "together"
