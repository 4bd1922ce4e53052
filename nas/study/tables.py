"""What nas-search prints about a study at its end: the top trials, or a multi-objective study's Pareto front."""

from __future__ import annotations

import optuna

from nas.output import text_table
from nas.search.archspec import describe_activations, describe_norms
from nas.search.finetune_space import describe_strategy
from nas.study.schema import (
    ARCH_ATTR,
    PARAMS_ATTR,
    counts_toward_budget,
    finite,
    is_feasible,
    outside,
    read_run_config,
    scored_trials,
    trial_attr,
)
from nas.study.stopping import finished_trials


def top_trials(study: optuna.Study, k: int = 5) -> list[optuna.trial.FrozenTrial]:
    """The `k` best scored trials, best first."""
    return scored_trials(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))[:k]


def best_value(study: optuna.Study) -> float | None:
    """The best CV loss of a single-objective study within its constraints (None: none scored and feasible, or
    several objectives)."""
    if len(study.directions) > 1:
        return None
    best = top_trials(study, 1)
    return best[0].value if best and is_feasible(best[0]) else None


def summary_table(study: optuna.Study, k: int = 5) -> str:
    """The top-k trials (or a multi-objective study's Pareto front) with their normalization choices."""
    objectives = (read_run_config(study._storage, study._study_id) or {}).get("objectives", ["cv_loss"])
    if len(study.directions) > 1:
        return pareto_table(study, objectives)
    # cv_loss_std is the population SD of the fold losses (nas.training.cross_validation), so the column says so
    trials = top_trials(study, k)
    tuning = any("finetune" in trial_attr(t, ARCH_ATTR, {}) for t in trials)
    limited = any(t.constraints for t in trials)  # the study has `constraints`: say which rows keep them
    rows = [
        (
            "trial",
            "cv loss ± SD over folds",
            "cv acc",
            *(FINETUNE_COLUMNS if tuning else CHAIN_COLUMNS),
            *(("limits",) if limited else ()),
        )
    ]
    for t in trials:
        arch, std = trial_attr(t, ARCH_ATTR, {}), trial_attr(t, "cv_loss_std")
        loss = f"{t.value:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        params = f"{trial_attr(t, PARAMS_ATTR, 0):,}"
        layout = _strategy(arch) if tuning else _layout(arch)
        rows.append((str(t.number), loss, _accuracy(t), params, *layout, *((outside(t),) if limited else ())))
    if len(rows) == 1:
        return f"Study '{study.study_name}': no completed trials yet."
    header = (
        f"Top {len(rows) - 1} of {finished_trials(study)} finished trials in '{study.study_name}' "
        "(lower cv loss is better):"
    )
    return "\n".join([header, *text_table(rows)])


CHAIN_COLUMNS = ("params", "norm (type @ position)", "activation")
FINETUNE_COLUMNS = ("trained params", "fine-tuning", "lr", "batch", "epochs")  # params: those the strategy trains


def _layout(arch: dict) -> tuple[str, str]:
    return describe_norms(arch), describe_activations(arch)


def _strategy(arch: dict) -> tuple[str, ...]:
    strategy, training = arch.get("finetune", {}), arch.get("training", {})
    epochs = strategy.get("epochs")
    return (
        describe_strategy(strategy) if strategy else "?",
        f"{training.get('lr', float('nan')):.3g}",
        str(training.get("batch_size", "?")),
        "config" if epochs is None else str(epochs),
    )


def pareto_table(study: optuna.Study, objectives: list[str]) -> str:
    """The Pareto front of a multi-objective study, sorted by its first objective."""
    front = sorted((t for t in study.best_trials if counts_toward_budget(t)), key=lambda t: t.values)
    if not front:
        return f"Study '{study.study_name}': no completed trials yet."
    rows = [("trial", *objectives, "cv acc", "norm (type @ position)")]
    for t in front:
        cells = [f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{int(v):,}" for v in t.values]
        rows.append((str(t.number), *cells, _accuracy(t), describe_norms(trial_attr(t, ARCH_ATTR, {}))))
    header = (
        f"Pareto front of '{study.study_name}' ({len(front)} of {finished_trials(study)} finished trials; "
        f"all objectives minimized; export one with nas-export --trial N):"
    )
    return "\n".join([header, *text_table(rows)])


def _accuracy(trial: optuna.trial.FrozenTrial) -> str:
    accuracy = trial_attr(trial, "cv_accuracy")
    return f"{accuracy:.4f}" if finite(accuracy) else "nan"
