"""Every trained trial is a new candidate.

A sampler may propose exactly the parameters of a trial that already finished (TPE does on
small categorical spaces, once it is sure of the best). Training it again would spend a trial's
budget on a number the study already has. So such a proposal
  - is recorded without training: the trial copies the finished one's outcome (its value, or
    pruned) and gets the user attribute `duplicate_of: N`; it does not count toward the budget
    and is left out of every ranking (the sampler still sees it, as the repeat it is);
  - steers the search elsewhere: a candidate no trial has tried yet is queued as the next trial,
    drawn at random (seeded) from the untried ones when the space is finite and small enough to
    list (choices and integer ranges), else drawn at random from the space until an untried one
    comes up;
  - and when every candidate of a finite space has finished, the search stops and says so.
"""

from __future__ import annotations

import math
import random

import optuna
from optuna.trial import TrialState

from nas.space import Space
from nas.storage import DUPLICATE_ATTR, FINISHED, counts_toward_budget

LIST_LIMIT = 20_000  # a finite space with more candidates is treated like an infinite one
DRAWS = 200  # random draws per attempt to find an untried candidate in a space too large to list
STALL_LIMIT = 20  # duplicates in a row after which a large space is taken as used up


def params_key(params: dict) -> tuple:
    return tuple(sorted((name, repr(value)) for name, value in params.items()))


class Novelty:
    """Finds duplicates for one worker, queues untried candidates, and knows when to stop."""

    def __init__(self, space: dict, seed: int):
        self.space = Space(space)
        self.rng = random.Random(seed)
        self._listed: list[dict] | None | bool = False  # False: not listed yet; None: not listable
        self.in_a_row = 0
        self.stop_reason: str | None = None

    def original_of(self, study: optuna.Study, params: dict) -> optuna.trial.FrozenTrial | None:
        """The finished, trained trial with exactly these parameters, if any (then the search is steered)."""
        finished = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if counts_toward_budget(t)]
        key = params_key(params)
        original = next((t for t in finished if params_key(t.params) == key), None)
        if original is None:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self._steer(study, finished)
        return original

    def _steer(self, study: optuna.Study, finished: list) -> None:
        busy = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        tried = {params_key(t.params) for t in [*finished, *busy]}
        listed = self.listed()
        if listed is not None:
            untried = [p for p in listed if params_key(p) not in tried]
            if untried:
                study.enqueue_trial(self.rng.choice(untried))
            elif len({params_key(t.params) for t in finished}) >= len(listed):
                self.stop_reason = f"search space exhausted: all {len(listed)} candidates of the space have been trained"
            else:
                self.stop_reason = "search space exhausted: the candidates not yet trained are running in other workers"
            return
        for _ in range(DRAWS):
            walk = RandomTrial(self.rng)
            self.space.sample(walk)
            if params_key(walk.params) not in tried:
                study.enqueue_trial(walk.params)
                break
        if self.in_a_row >= STALL_LIMIT:
            self.stop_reason = (f"the sampler proposed {self.in_a_row} already trained candidates in a row, "
                                "so the space looks used up; widen it or use the random sampler")

    def listed(self) -> list[dict] | None:
        if self._listed is False:
            self._listed = list_candidates(self.space, LIST_LIMIT)
        return self._listed


def record_duplicate(trial: optuna.Trial, original: optuna.trial.FrozenTrial):
    """End `trial` as a copy of `original`'s outcome (no training): its values, or pruned."""
    trial.set_user_attr(DUPLICATE_ATTR, original.number)
    if original.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"duplicate of pruned trial {original.number}")
    return original.values[0] if len(original.values) == 1 else tuple(original.values)


# --- walking the space ------------------------------------------------------------------------


class Infinite(Exception):
    """The space has a float range: its candidates cannot be listed."""


class ListingTrial:
    """A stand-in trial that follows `path` (option indices) and then the first options, counting each decision's options."""

    def __init__(self, path: list[int]):
        self.path, self.counts, self.params = path, [], {}

    def _take(self, name: str, options: list):
        index = self.path[len(self.counts)] if len(self.counts) < len(self.path) else 0
        self.counts.append(len(options))
        self.params[name] = options[index]
        return options[index]

    def suggest_categorical(self, name, choices):
        return self._take(name, list(choices))

    def suggest_int(self, name, low, high, step=1, log=False):
        if (high - low) // step + 1 > LIST_LIMIT:
            raise Infinite(name)
        return self._take(name, list(range(low, high + 1, step)))

    def suggest_float(self, name, low, high, step=None, log=False):
        raise Infinite(name)


def list_candidates(space: Space, limit: int) -> list[dict] | None:
    """Every parameter set the space can produce, or None when it has float ranges or more than `limit`.

    Define-by-run spaces are conditional (no momentum when the norm is `none`), so the sets are
    found by walking the sampler's decisions like an odometer: rerun the walk with the last
    decision that has options left advanced by one, and the decisions after it reset.
    """
    found, path = [], []
    while True:
        walk = ListingTrial(path)
        try:
            space.sample(walk)
        except Infinite:
            return None
        found.append(walk.params)
        if len(found) > limit:
            return None
        indices = (path + [0] * len(walk.counts))[: len(walk.counts)]
        j = len(indices) - 1
        while j >= 0 and indices[j] + 1 >= walk.counts[j]:
            j -= 1
        if j < 0:
            return found
        path = indices[:j] + [indices[j] + 1]


class RandomTrial:
    """A stand-in trial that draws every value at random, as Optuna's distributions would (log, step)."""

    def __init__(self, rng: random.Random):
        self.rng, self.params = rng, {}

    def _keep(self, name: str, value):
        self.params[name] = value
        return value

    def suggest_categorical(self, name, choices):
        return self._keep(name, self.rng.choice(list(choices)))

    def suggest_int(self, name, low, high, step=1, log=False):
        if log:
            value = min(high, max(low, round(math.exp(self.rng.uniform(math.log(low), math.log(high))))))
        else:
            value = low + step * self.rng.randrange((high - low) // step + 1)
        return self._keep(name, value)

    def suggest_float(self, name, low, high, step=None, log=False):
        if step is not None:
            value = low + step * self.rng.randrange(int(round((high - low) / step)) + 1)
        elif log:
            value = math.exp(self.rng.uniform(math.log(low), math.log(high)))
        else:
            value = self.rng.uniform(low, high)
        return self._keep(name, value)
