"""Equal-budget factor comparisons (`nas-compare`): does this normalization choice matter here?

A single TPE study spends its trials unequally, so its ranking of a choice is not a comparison.
Here every combination of the factors' levels (a *cell*) gets its own study in the same storage,
searching the rest of the space with the config's sampler and exactly the same trial budget.
The best spec of each cell is then cross-validated again under fresh seeds (new folds, new
initial weights; seed i is the same for every cell, so cells are paired by seed), and every pair
of cells is tested, a cell worse when shown worse than some other (`nas.compare.stats`).

A factor is a key of the search space (its levels: the key's choices, or those `--levels` picks)
or a set of named variants: a YAML file mapping each name to a small override of the space
(`bn_only: {block.norm.type: batch, block.dropout: 0.0}`). A key that a cell never uses (the
position when the norm is `none`) makes no cells of its own: such a cell is listed once, the
factor's level shown as `n/a`. Every cell is a study named `BASE[level,level]`; the same command
resumes an interrupted comparison: finished trials and re-evaluations are kept in the studies.
Each cell reports what its study holds (candidates trained, pruned, failed, repeated), and a cell
whose search stopped short of its budget (space exhausted, failures in a row) is marked, not
dropped: the budgets are equal only where they are shown to be. A rerun with a smaller budget
than a cell already holds is refused (its search would keep every trial it has).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nas.errors import ConfigError, NasError, TrialError
from nas.output import status
from nas.search.config import RunConfig, set_key
from nas.search.leaves import validate_leaf
from nas.search.mlp_space import MLP
from nas.search.model_space import FOREIGN_NORM, GENERATED, NORM_SCHEMA, family_of, validate_norm
from nas.search.space import SCHEMA, Space, schema_of, validate_space
from nas.search.stand_in_trials import FirstChoiceTrial, RandomTrial
from nas.study.schema import (
    ARCH_ATTR,
    FAIL_REASON_ATTR,
    StoredAttrError,
    budget_count,
    counts_toward_budget,
    is_duplicate,
    is_failure,
    read_cell,
    read_reevaluation,
    read_run_config,
    trial_attr,
    write_compare_cell,
    write_reevaluation,
)
from nas.validation import did_you_mean, read_yaml

NOT_APPLICABLE = "n/a"
REEVAL_STREAM = 7  # keeps re-evaluation seeds apart from the seeds a study draws its folds and weights with
ACTIVITY_DRAWS = 64  # random draws that find which keys a cell's space ever uses


@dataclass(frozen=True)
class Factor:
    """What varies between cells: a name, its level labels, and each level's override of the space."""

    name: str
    levels: tuple[str, ...]
    overrides: dict  # level label -> {space key path: value}
    key: str | None = None  # the space key of a key factor; None for named variants


@dataclass
class Cell:
    levels: dict  # factor name -> level label (NOT_APPLICABLE where the cell never uses the factor's key)
    space: dict

    def label(self, factors: list[Factor]) -> str:
        return ",".join(self.levels[f.name] for f in factors)


def leaf_keys(schema: dict = SCHEMA, prefix: str = "") -> list[str]:
    """Every leaf key path of the search-space schema."""
    keys = []
    for name, node in schema.items():
        path = f"{prefix}.{name}" if prefix else name
        keys += leaf_keys(node, path) if isinstance(node, dict) else [path]
    return keys


def param_at(key: str, where: str, schema: dict = SCHEMA):
    """The schema's Param at `key` (`schema`: the space's, `nas.search.space.schema_of`); an unknown key or a
    section is a one-line error naming `where`."""
    if key.startswith(FOREIGN_NORM):  # a foreign model's norm: the catalogue's settings, no position
        name = key.removeprefix(FOREIGN_NORM)
        if name not in NORM_SCHEMA:
            raise ConfigError(where, key, f"not a key of a model's norm{did_you_mean(name, NORM_SCHEMA)}")
        return NORM_SCHEMA[name]
    node = schema
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(where, key, f"not a key of the search space{did_you_mean(key, leaf_keys(schema))}")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(where, key, f"is a section, not a key (its keys: {', '.join(node)})")
    return node


def _level_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def key_factor(space: dict, space_file: str, key: str, levels: list | None = None) -> Factor:
    """A factor over one space key: the key's choices, or `levels` (each one the space allows)."""
    param = param_at(key, "--factor", schema_of(space))
    if key.startswith("model.") and family_of(space) == GENERATED:
        raise ConfigError(
            "--factor", key, f"{space_file} searches the generated chain (model: bnnas): use block.norm keys"
        )
    leaf = Space(space).leaf(key)
    given = levels is not None
    if not given:
        if not (isinstance(leaf, dict) and "choice" in leaf):
            what = (
                f"a {'int' if 'int' in leaf else 'float'} range" if isinstance(leaf, dict) else f"the constant {leaf!r}"
            )
            raise ConfigError(
                "--factor", key, f"is not a choice in {space_file} (it is {what}): pick levels with --levels {key}=A,B"
            )
        levels = list(leaf["choice"])
    for value in levels:
        _check_level(key, value, param, leaf, space_file, key in _flatten(space), space)
    if len({_level_text(v) for v in levels}) != len(levels):
        raise ConfigError("--levels", key, "levels repeat")
    labels = tuple(_level_text(v) for v in levels)
    return Factor(key, labels, {label: {key: value} for label, value in zip(labels, levels)}, key)


def _check_level(key: str, value: Any, param, leaf: Any, space_file: str, given: bool, space: dict) -> None:
    """A level must be a value the space allows: one of its choices, inside its range, its constant."""
    validate_override(key, value, "--levels", space)  # type and schema bounds (a level is a constant)
    if isinstance(leaf, dict) and "choice" in leaf:
        allowed = value in leaf["choice"]
    elif isinstance(leaf, dict):
        low, high = leaf["int" if "int" in leaf else "float"]
        allowed = low <= value <= high
    else:
        allowed = not given or value == leaf  # a key the space leaves out takes any valid value
    if not allowed:
        shown = leaf["choice"] if isinstance(leaf, dict) and "choice" in leaf else leaf
        raise ConfigError("--levels", key, f"{_level_text(value)} is not allowed by {space_file} ({key}: {shown})")


def validate_override(key: str, value: Any, where: str, space: dict) -> None:
    """One overriding key and value, checked as the space would check it (an MLP's keys as an MLP's)."""
    if key.startswith(FOREIGN_NORM):
        validate_norm({key.removeprefix(FOREIGN_NORM): value}, where)
    elif key.startswith("finetune."):  # checked alone: a finetune section needs its space's checkpoint
        validate_leaf(value, param_at(key, where), where, key)
    else:
        family = {"model": MLP} if family_of(space) == MLP else {}
        validate_space({**family, **_nested({key: value})}, where)


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        set_key(out, key, value)
    return out


def variant_factor(path: str | Path, space: dict, name: str | None = None) -> Factor:
    """Named variants from a YAML file: each name maps to an override of `space` (dotted or nested keys)."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or len(raw) < 2:
        raise ConfigError(path, "", "expected a mapping of at least two variant names to overrides of the search space")
    overrides = {}
    for variant, override in raw.items():
        if override is None:
            override = {}
        if not isinstance(override, dict):
            raise ConfigError(path, str(variant), "expected a mapping of search-space keys to values or distributions")
        flat = _flatten(override)
        for key, value in flat.items():
            param_at(key, f"{path}: {variant}", schema_of(space))
            validate_override(key, value, f"{path}: {variant}", space)
        overrides[str(variant)] = flat
    return Factor(name or Path(path).stem, tuple(overrides), overrides)


def _flatten(node: dict, prefix: str = "") -> dict:
    """Dotted keys of a nested override; a distribution (`{choice: [...]}`) is a leaf."""
    flat = {}
    for name, value in node.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict) and not any(k in value for k in ("choice", "int", "float")):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def pick_levels(factor: Factor, wanted: list[str]) -> Factor:
    """Keep only the `--levels` named (for named variants: their names)."""
    unknown = [w for w in wanted if w not in factor.levels]
    if unknown:
        raise ConfigError(
            "--levels",
            factor.name,
            f"unknown level '{unknown[0]}' (known: "
            f"{', '.join(factor.levels)}){did_you_mean(unknown[0], factor.levels)}",
        )
    return dataclasses.replace(factor, levels=tuple(wanted), overrides={w: factor.overrides[w] for w in wanted})


def make_cells(space: dict, factors: list[Factor]) -> list[Cell]:
    """Every valid combination of levels, once: a factor key the cell never uses reads `n/a`."""
    names = [f.name for f in factors]
    if len(set(names)) != len(names):
        raise ConfigError("--factor", names[0], "a factor is given twice")
    cells, seen = [], set()
    for combination in itertools.product(*(f.levels for f in factors)):
        cell_space = copy.deepcopy(space)
        for factor, level in zip(factors, combination):
            for key, value in factor.overrides[level].items():
                set_key(cell_space, key, value)
        used = used_keys(cell_space)
        levels = {
            f.name: level if f.key is None or f.key in used else NOT_APPLICABLE
            for f, level in zip(factors, combination)
        }
        identity = tuple(levels.values())
        if identity not in seen:
            seen.add(identity)
            cells.append(Cell(levels, cell_space))
    if len(cells) < 2:
        raise ConfigError("--factor", ", ".join(names), f"makes {len(cells)} cell: a comparison needs at least two")
    return cells


class _KeyRecorder(Space):
    def __init__(self, space: dict):
        super().__init__(space)
        self.used: set = set()

    def suggest(self, trial, name: str, key_path: str) -> Any:
        self.used.add(key_path)
        return super().suggest(trial, name, key_path)


def used_keys(space: dict) -> set:
    """The space keys sampling ever consults (first choices and random draws)."""
    recorder = _KeyRecorder(space)
    for trial in [FirstChoiceTrial(), *(RandomTrial(random.Random(i)) for i in range(ACTIVITY_DRAWS))]:
        recorder.sample(trial)
    return recorder.used


def short_names(factors: list[Factor]) -> dict:
    """A factor's column name: the key's last part unless two factors share it."""
    last = [f.name.rsplit(".", 1)[-1] for f in factors]
    return {f.name: (short if last.count(short) == 1 else f.name) for f, short in zip(factors, last)}


def cell_study_name(base: str, cell: Cell, factors: list[Factor]) -> str:
    return f"{base}[{cell.label(factors)}]"


def reeval_seeds(study_seed: int, count: int) -> list[int]:
    """Fresh seeds, the same for every cell: seed i draws its folds and its initial weights."""
    return [int(np.random.SeedSequence([study_seed, REEVAL_STREAM, i]).generate_state(1)[0]) for i in range(count)]


def cost_line(cells: int, trials_per_cell: int, seeds: int, cfg: RunConfig, done: int) -> str:
    total = cells * (trials_per_cell + seeds)
    return (
        f"Comparison: {cells} cells x {trials_per_cell} trials + {cells} cells x {seeds} seeds = {total} trainings "
        f"(each {cfg.evaluation.folds} folds x {cfg.evaluation.epochs} epochs); {done} done already"
    )


def check_objectives(cfg: RunConfig) -> None:
    """Cells are searched and ranked by CV loss alone: refuse other objectives before anything trains."""
    if list(cfg.objectives) != ["cv_loss"]:
        raise ConfigError(
            cfg.where("objectives"),
            "objectives",
            f"nas-compare searches and ranks cells by cv_loss alone; this config "
            f"has {', '.join(cfg.objectives)} (use objectives: [cv_loss])",
        )


UNEQUAL = {  # a run config's keys that would give the cells unequal budgets or a shared start
    "study.budget": "a time budget",
    "study.stop_after": "a stop on stagnation",
    "study.warm_start.study": "a warm start",
}


def check_equal_budgets(cfg: RunConfig) -> None:
    """Every cell gets exactly --trials-per-cell trials from scratch: refuse what would make cells differ."""
    for key, what in UNEQUAL.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None:
            raise ConfigError(
                cfg.where(key),
                key,
                f"nas-compare gives every cell exactly --trials-per-cell trials from scratch; {what} would make "
                "the cells differ (leave it out)",
            )


def run_comparison(
    cfg: RunConfig,
    factors: list[Factor],
    trials_per_cell: int,
    seeds: int,
    progress: bool | None = None,
    out: Callable[[str], None] = status,
) -> dict:
    """Search every cell to its budget, re-evaluate each cell's best under `seeds` fresh seeds, rank the cells."""
    import optuna

    from nas.compare.stats import TEST
    from nas.errors import StudyError
    from nas.study.run import run_search
    from nas.study.storage import load_existing_study

    check_objectives(cfg)
    check_equal_budgets(cfg)
    cells = make_cells(cfg.space, factors)
    names = [cell_study_name(cfg.study.name, c, factors) for c in cells]
    seed_list = reeval_seeds(cfg.study.seed, seeds)
    out(cost_line(len(cells), trials_per_cell, seeds, cfg, _done(cfg.study.storage, names, trials_per_cell)))
    bars = sys.stderr.isatty() if progress is None else progress  # a trials bar per cell, else a line per trial
    rows = []
    for i, (cell, name) in enumerate(zip(cells, names)):
        label = cell.label(factors)
        cell_cfg = dataclasses.replace(
            cfg, space=cell.space, study=dataclasses.replace(cfg.study, name=name, trials=trials_per_cell, timeout=None)
        )
        out(f"cell {i + 1}/{len(cells)} [{label}]: searching (study '{name}')")
        lines = (
            None
            if bars
            else (
                lambda done, budget, best, i=i: out(
                    f"  cell {i + 1}/{len(cells)}: trial {done}/{budget}, best CV loss {_show(best)}"
                )
            )
        )
        stops: list[str] = []
        try:
            notable = _notable(out, stops)  # of a cell's own lines, only what changes its reading; not its table
            study = run_search(cell_cfg, progress=bars, out=notable, results=notable, on_trial=lines)
        except StudyError as exc:
            if not str(exc).startswith(FAILURE_STOP):
                raise
            out(f"  {exc}")  # this cell stopped short; the others still get their budget
            stops.append(str(exc))
            study = load_existing_study(cfg.study.storage, name)
        write_compare_cell(study._storage, study._study_id, [f.name for f in factors], cell.levels)
        trials = study.get_trials(deepcopy=False)
        counts = cell_counts(trials)
        row = _reevaluate(cell_cfg, study, seed_list, f"cell {i + 1}/{len(cells)}", out)
        rows.append(
            row
            | {
                "label": label,
                "study": name,
                "levels": cell.levels,
                "trials": len(trials),
                "counts": counts,
                "exhausted": _short_of_budget(counts, trials_per_cell, stops),
            }
        )
        out(f"cell {i + 1}/{len(cells)} [{label}]: {rows[-1]['summary']}")
        if rows[-1]["exhausted"]:
            out(f"cell {i + 1}/{len(cells)} [{label}]: short of its budget: {rows[-1]['exhausted']}")
    rank(rows)
    return {
        "factors": [
            {"name": f.name, "key": f.key, "levels": list(f.levels), "overrides": f.overrides} for f in factors
        ],
        "columns": short_names(factors),
        "trials_per_cell": trials_per_cell,
        "seeds": seed_list,
        "test": TEST,
        "dataset": cfg.dataset.name,
        "folds": cfg.evaluation.folds,
        "epochs": cfg.evaluation.epochs,
        "sampler": cfg.study.sampler,
        "storage": cfg.study.storage,
        "base_study": cfg.study.name,
        "optuna": optuna.__version__,
        "cells": rows,
    }


FAILURE_STOP = "stopped after"  # how nas.study.run.run_search's StudyError begins when failures in a row ended a search


def cell_counts(trials) -> dict:
    """What a cell's study holds: candidates trained (complete), pruned, failed, and proposals that repeated one."""
    from optuna.trial import TrialState

    from nas.study.schema import OVER_BUDGET

    own = [t for t in trials if counts_toward_budget(t)]
    return {
        "trained": sum(t.state == TrialState.COMPLETE for t in own),
        "pruned": sum(t.state == TrialState.PRUNED for t in own),
        "failed": sum(is_failure(t) and t.user_attrs.get(FAIL_REASON_ATTR) != OVER_BUDGET for t in trials),
        "repeated": sum(map(is_duplicate, trials)),
    }


def _short_of_budget(counts: dict, trials_per_cell: int, stops: list[str]) -> str | None:
    """Why a cell finished fewer candidates than its budget (None when it has them all)."""
    finished = counts["trained"] + counts["pruned"]
    if finished >= trials_per_cell:
        return None
    return stops[-1] if stops else f"its search ended with {finished}/{trials_per_cell} candidates finished"


def _notable(out: Callable[[str], None], stops: list[str]) -> Callable[[str], None]:
    """Of a cell search's own output, only what changes its reading: stops (kept in `stops`), reclaims,
    forced changes."""

    def line(text: str) -> None:
        if text.startswith("Stopped"):
            stops.append(text)
        if text.startswith(("Stopped", "Reclaimed", "Continuing")):
            out(f"  {text}")

    return line


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _done(storage: str, names: list[str], trials_per_cell: int) -> int:
    """Trainings already done by an interrupted run of the same comparison: cell trials and re-evaluations.

    A cell that holds more finished candidates than `trials_per_cell` is refused: its search would
    keep them all, and the budgets would no longer be equal."""
    import optuna

    from nas.study.storage import quiet_optuna, storage_file, storage_of

    path = storage_file(storage)
    if path is not None and not path.exists():
        return 0
    with quiet_optuna():
        store = storage_of(storage)  # a URL, or the grpc:// proxy every other command opens
        known = set(optuna.get_all_study_names(store))
        done = 0
        for name in [n for n in names if n in known]:
            study = optuna.load_study(study_name=name, storage=store)
            held = budget_count(study.get_trials(deepcopy=False))
            if held > trials_per_cell:
                raise NasError(
                    f"--trials-per-cell {trials_per_cell}: cell study '{name}' already holds {held} finished "
                    f"candidates; give --trials-per-cell {held} or more to compare equal budgets, or another --study"
                )
            done += held
            done += len(
                read_reevaluation(study._storage.get_study_system_attrs(study._study_id), name).get("seeds", {})
            )
    return done


def _reevaluate(cfg: RunConfig, study, seeds: list[int], where: str, out) -> dict:
    """Cross-validate the cell's best spec under each seed; each result is stored at once (resumable)."""
    from nas.data.datasets import stratified_folds
    from nas.search.finetune_space import load_search_data
    from nas.training.cross_validation import cross_validate
    from nas.training.train import resolve_device

    best, results = _stored_reevaluation(study)
    if best is None:
        return _scores(None, {}, [])
    missing = [s for s in seeds if str(s) not in results]
    if missing:
        device = resolve_device(cfg.device)
        data = load_search_data(cfg, device)
    spec = trial_attr(best, ARCH_ATTR)
    for k, seed in enumerate(missing):
        out(f"  {where}: re-evaluating trial {best.number} with seed {len(seeds) - len(missing) + k + 1}/{len(seeds)}")
        folds = stratified_folds(data.y_train, cfg.evaluation.folds, seed)
        try:
            score = cross_validate(
                spec,
                data,
                folds,
                cfg.evaluation.epochs,
                device,
                study_seed=seed,
                recalibrate_bn=cfg.evaluation.recalibrate_bn,
                fold_mode=cfg.evaluation.fold_mode,
            )
            results[str(seed)] = {"cv_loss": score["cv_loss"], "cv_accuracy": score["cv_accuracy"]}
        except TrialError as exc:
            results[str(seed)] = {"failed": str(exc)}
        write_reevaluation(study._storage, study._study_id, best.number, results)
    return _scores(best, results, [str(s) for s in seeds])


def _stored_reevaluation(study) -> tuple[Any, dict]:
    """The cell's best trial (None: no complete one) and the re-evaluations stored for it ({seed: result})."""
    from nas.study.tables import top_trials

    ranked = top_trials(study, 1)
    if not ranked:
        return None, {}
    stored = read_reevaluation(study._storage.get_study_system_attrs(study._study_id), study.study_name)
    return ranked[0], (dict(stored.get("seeds", {})) if stored.get("trial") == ranked[0].number else {})


def _scores(best, results: dict, chosen: list[str]) -> dict:
    """A cell's row from its best trial and the re-evaluations of the `chosen` seeds."""
    if best is None:
        return {
            "best_trial": None,
            "losses": {},
            "accuracies": {},
            "failures": {},
            "summary": "no complete trial to re-evaluate",
        }
    losses = {s: results[s]["cv_loss"] for s in chosen if "cv_loss" in results[s]}
    failures = {s: results[s]["failed"] for s in chosen if "failed" in results[s]}
    summary = (
        f"best trial {best.number} (CV loss {best.value:.4f} in the search), re-evaluated with "
        f"{len(losses)}/{len(chosen)} seeds"
    )
    if failures:
        summary += f"; {len(failures)} failed: {next(iter(failures.values()))}"
    return {
        "best_trial": best.number,
        "search_cv_loss": best.value,
        "spec": trial_attr(best, ARCH_ATTR),
        "losses": losses,
        "failures": failures,
        "accuracies": {s: results[s]["cv_accuracy"] for s in losses},
        "summary": summary,
    }


def rank(rows: list[dict]) -> None:
    """Each cell row's `stats`, from ranking all of them: what nas-compare and the dashboard's comparison page show."""
    from nas.compare.stats import rank_cells

    ranking = rank_cells({r["label"]: r["losses"] for r in rows}, {r["label"]: r["accuracies"] for r in rows})
    for row in rows:
        row["stats"] = ranking.get(row["label"])


def stored_comparisons(storage, problems: list | None = None) -> list[dict]:
    """The comparisons a storage holds: each its `base` name, `factors` and `cells` (id, name, COMPARE_CELL_ATTR),
    in study-id order.

    Cells belong together when they share the base name (`BASE` of `BASE[levels]`) and the factors. A study
    whose cell attribute has another shape is left out, its StoredAttrError appended to `problems`."""

    groups: dict[tuple, list] = {}
    for study in sorted(storage.get_all_studies(), key=lambda s: s._study_id):
        try:
            cell = read_cell(study.system_attrs, study.study_name)
        except StoredAttrError as exc:
            if problems is not None:
                problems.append(exc)
            continue
        if cell is None:
            continue
        label = ",".join(str(cell["levels"].get(f, NOT_APPLICABLE)) for f in cell["factors"])
        base = study.study_name[: -len(label) - 2] if study.study_name.endswith(f"[{label}]") else study.study_name
        groups.setdefault((base, tuple(cell["factors"])), []).append((study._study_id, study.study_name, cell))
    return [{"base": base, "factors": list(factors), "cells": cells} for (base, factors), cells in groups.items()]


def stored_result(storage, comparison: dict, running: set[int] = frozenset()) -> dict:
    """A comparison as nas-compare's result reads, from what its cell studies hold (nothing is trained).

    `running`: ids of cells whose search is still going (not marked as stopped short)."""
    import optuna

    from nas.compare.stats import TEST

    factors = [Factor(name, (), {}) for name in comparison["factors"]]
    rows, seeds, config = [], [], {}
    cells = comparison["cells"]
    for study_id, name, cell in cells:
        study = optuna.load_study(study_name=name, storage=storage)
        best, results = _stored_reevaluation(study)
        seeds += [s for s in results if s not in seeds]
        trials = study.get_trials(deepcopy=False)
        counts = cell_counts(trials)
        config = read_run_config(storage, study_id) or config
        budget = (read_run_config(storage, study_id) or {}).get("study", {}).get("trials", 0)
        exhausted = None if study_id in running else _short_of_budget(counts, budget, [])
        label = ",".join(str(cell["levels"].get(f.name, NOT_APPLICABLE)) for f in factors)
        rows.append(
            _scores(best, results, list(results))
            | {
                "label": label,
                "study": name,
                "study_id": study_id,
                "levels": cell["levels"],
                "trials": len(trials),
                "counts": counts,
                "exhausted": exhausted,
                "budget": budget,
            }
        )
    rank(rows)
    study_cfg, evaluation = config.get("study", {}), config.get("evaluation", {})
    base = comparison["base"]
    return {
        "factors": [{"name": f.name} for f in factors],
        "columns": short_names(factors),
        "trials_per_cell": max(r["budget"] for r in rows),
        "seeds": [int(s) for s in seeds],
        "test": TEST,
        "dataset": config.get("dataset", {}).get("name"),
        "folds": evaluation.get("folds"),
        "epochs": evaluation.get("epochs"),
        "sampler": study_cfg.get("sampler"),
        "storage": study_cfg.get("storage"),
        "base_study": base,
        "optuna": optuna.__version__,
        "cells": rows,
    }


def _scalar(text: str) -> Any:
    """A level as YAML reads it, and `1e-5` as the float it means (YAML 1.1 wants `1.0e-5`)."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_factors(cfg: RunConfig, factor_args: list[str], level_args: list[str]) -> list[Factor]:
    """`--factor KEY | FILE.yaml | NAME=FILE.yaml` and `--levels NAME=A,B` into Factors; bad ones are
    one-line errors."""
    levels: dict[str, list] = {}
    for text in level_args:
        name, sep, values = text.partition("=")
        if not sep or not values.strip():
            raise ConfigError("--levels", text, "expected FACTOR=A,B,...")
        levels[name.strip()] = [v.strip() for v in values.split(",")]
    factors = []
    for text in factor_args:
        name, sep, path = text.partition("=")
        if not sep and text.endswith((".yaml", ".yml")):
            name, path = None, text
        if path:
            factor = variant_factor(path, cfg.space, name or None)
            if factor.name in levels:
                factor = pick_levels(factor, levels.pop(factor.name))
        else:
            wanted = levels.pop(text, None)
            factor = key_factor(
                cfg.space, cfg.search_space, text, None if wanted is None else [_scalar(v) for v in wanted]
            )
        factors.append(factor)
    if levels:
        raise ConfigError(
            "--levels", next(iter(levels)), f"names no --factor (factors: {', '.join(f.name for f in factors)})"
        )
    if not factors:
        raise NasError("nas-compare: give at least one --factor")
    return factors
