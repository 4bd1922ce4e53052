"""Warm starts: the best candidates of an earlier study queued as a new study's first trials.

The common case is the same space on new data; where the spaces differ, each earlier candidate is
mapped onto this one (`MappingTrial`): values this space asks for and can take are kept, the rest
is named, and what this space asks for beyond them is left to its sampler. Queued trials are
ordinary trials of the new study - trained and scored under its own contract - marked
`warm_start_of` with where they came from, so a resumed or second worker queues none twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna

from nas.errors import ConfigError, StudyError
from nas.search.config import RunConfig
from nas.search.space import Space
from nas.search.stand_in_trials import MappingTrial
from nas.study.schema import WARM_START_ATTR, is_feasible, scored_trials
from nas.study.storage import load_existing_study


@dataclass
class WarmStart:
    """What `queue_warm_start` did: the earlier trials queued, and the keys that did not carry over."""

    source: str
    queued: list[int] = field(default_factory=list)
    present: int = 0  # queued by an earlier run of this study
    dropped: dict[str, int] = field(default_factory=dict)  # earlier key -> candidates whose value it could not take
    fresh: set[str] = field(default_factory=set)  # keys this space asks for that the earlier study did not give

    def __str__(self) -> str:
        head = f"Warm start from {self.source}: "
        if not self.queued:
            return head + (
                f"its best {self.present} candidate(s) are already queued in this study"
                if self.present
                else "it has no scored trial within its constraints to queue"
            )
        said = head + f"queued its trial(s) {', '.join(map(str, self.queued))} as this study's first trials"
        if self.dropped:
            said += "; not mapped onto this space: " + ", ".join(
                f"{key} ({n} of {len(self.queued)})" for key, n in sorted(self.dropped.items())
            )
        if self.fresh:
            said += "; sampled afresh: " + ", ".join(sorted(self.fresh))
        return said


def map_params(space: Space, params: dict) -> tuple[dict, list[str], list[str]]:
    """(the values of `params` this space takes, the names it cannot, the names it asks for beyond them)."""
    probe = MappingTrial(params)
    space.sample(probe)
    dropped = [name for name in params if name not in probe.kept]
    return probe.kept, dropped, [name for name in probe.asked if name not in params]


def warm_start_source(cfg: RunConfig) -> tuple[optuna.Study, str] | None:
    """The earlier study `study.warm_start` names, and how to say where it is; checked before anything is written
    (None: no warm start asked)."""
    warm = cfg.study.warm_start
    if warm.study is None:
        return None
    where = cfg.where("study.warm_start.study")
    storage = warm.storage or cfg.study.storage
    if warm.study == cfg.study.name and storage == cfg.study.storage:
        raise ConfigError(where, "study.warm_start.study", "names this study itself")
    try:
        source = load_existing_study(storage, warm.study)
    except StudyError as exc:  # it names --study, which is this study's flag
        problem = str(exc).removeprefix("--study: ").removeprefix("--storage: ")
        raise ConfigError(where, "study.warm_start.study", problem) from None
    if len(source.directions) != len(cfg.objectives):
        raise ConfigError(
            where,
            "study.warm_start.study",
            f"'{warm.study}' has {len(source.directions)} objective(s), this study {len(cfg.objectives)}",
        )
    return source, f"'{warm.study}'" + ("" if storage == cfg.study.storage else f" in {storage}")


def queue_warm_start(
    study: optuna.Study, cfg: RunConfig, source: tuple[optuna.Study, str], input_shape, num_classes: int
) -> WarmStart:
    """Queue the best `study.warm_start.top` feasible candidates of the earlier study (`warm_start_source`)."""
    earlier, label = source
    best = [t for t in scored_trials(earlier.get_trials(deepcopy=False)) if is_feasible(t)][: cfg.study.warm_start.top]
    done = WarmStart(label)
    marked = {
        (mark.get("study"), mark.get("trial"))
        for t in study.get_trials(deepcopy=False)
        if isinstance(mark := t.user_attrs.get(WARM_START_ATTR), dict)
    }
    space = Space(cfg.space, input_shape, num_classes)
    for trial in best:
        if (earlier.study_name, trial.number) in marked:
            done.present += 1
            continue
        kept, dropped, fresh = map_params(space, trial.params)
        mark = {"study": earlier.study_name, "trial": trial.number, "cv_loss": trial.values[0]}  # no URL: a password
        study.enqueue_trial(kept, user_attrs={WARM_START_ATTR: mark})
        done.queued.append(trial.number)
        for name in dropped:
            done.dropped[name] = done.dropped.get(name, 0) + 1
        done.fresh.update(fresh)
    return done
