"""Every trained trial is a new candidate.

A sampler may propose exactly the parameters of a candidate the study has already tried (TPE
does on small categorical spaces, once it is sure of the best; random start-up draws do by
chance). Training it again would spend a trial's budget on a number the study already has. A
candidate is tried, for the current config version (`config_version`), once a trial of it
finished (complete or pruned), or once it failed on its first try and every retry
(1 + `study.retries` failures; an interrupted trial is no fault of its candidate). Such a proposal
  - is recorded without training as a repeat: a FAIL trial with the user attribute
    `duplicate_of: N` and the fail reason "repeat of trial N (not trained)". FAIL, because that is
    the one finished state every Optuna sampler and pruner leaves out: TPE's and GP's start-up
    counts and models read COMPLETE (and PRUNED, and RUNNING for the constant liar) trials,
    NSGA-II's generations COMPLETE ones, the median pruner's start-up and percentiles COMPLETE ones,
    random sampling none. So start-up lasts its configured number of trained candidates, and no
    model or pruner weighs a point twice; a wrapper that hid COMPLETE repeats from each sampler
    would have to follow each one's internals (NSGA-II indexes trials by number; Hyperband builds
    its own study view) and would still show them to plots and importances. A repeat does not count
    toward the budget, the rankings, the failure streak (`StopAfterFailures`) or the failed trials
    (`nas.study.storage.is_failure`);
  - steers the search elsewhere: a candidate not yet tried is queued as the next trial, drawn at
    random (seeded) from the untried ones when the space is finite and small enough to list
    (choices and integer ranges), else drawn at random from the space until an untried one comes up;
  - and when every candidate of a finite space has been tried, the search stops and says so.
A trial of an older config version (before a `--force` change) scored its candidate under another
contract: its candidate is untried under the current version, and a proposal of it is trained.
"""

from __future__ import annotations

import random
from collections import Counter

import optuna
from optuna.trial import TrialState

from nas.errors import TrialError
from nas.search.space import Space
from nas.search.stand_in_trials import Infinite, ListingTrial, RandomTrial
from nas.study.schema import (
    DUPLICATE_ATTR,
    FAIL_REASON_ATTR,
    INTERRUPTED,
    VERSION_ATTR,
    counts_toward_budget,
    is_failure,
)

LIST_LIMIT = 20_000  # a finite space with more candidates is treated like an infinite one
DRAWS = 200  # random draws per attempt to find an untried candidate in a space too large to list
STALL_LIMIT = 20  # repeats in a row after which a large space is taken as used up


def params_key(params: dict) -> tuple:
    return tuple(sorted((name, repr(value)) for name, value in params.items()))


def proposed_params(trial: optuna.trial.FrozenTrial) -> dict:
    """A trial's parameters; a queued (WAITING) trial has them only as the fixed params it will take."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


class Repeat(TrialError):
    """The proposal repeats a tried candidate: recorded as a FAIL trial with `duplicate_of`, not trained."""


class Novelty:
    """Finds repeats for one worker, queues untried candidates, and knows when to stop."""

    def __init__(
        self,
        space: dict,
        seed: int,
        version: int = 0,
        retries: int = 1,
        input_shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 10,
    ):
        self.space = Space(space, input_shape, num_classes)
        self.rng = random.Random(seed)
        self.version, self.retries = version, retries
        self._listed: list[dict] | None | bool = False  # False: not listed yet; None: not listable
        self.in_a_row = 0
        self.stop_reason: str | None = None

    def tried(self, trials: list) -> tuple[dict, dict]:
        """This config version's tried candidates, by params key: (trained, failed on every try), each
        mapped to the trial a repeat of it names (the first trained trial; the last failure)."""
        current = [t for t in trials if t.user_attrs.get(VERSION_ATTR, 0) == self.version]
        trained, failures, last_failure = {}, Counter(), {}
        for t in current:
            key = params_key(t.params)
            if counts_toward_budget(t):
                trained.setdefault(key, t)
            elif is_failure(t) and t.params and t.user_attrs.get(FAIL_REASON_ATTR) != INTERRUPTED:
                failures[key] += 1
                last_failure[key] = t
        given_up = {key: t for key, t in last_failure.items() if failures[key] > self.retries and key not in trained}
        return trained, given_up

    def original_of(self, study: optuna.Study, params: dict) -> optuna.trial.FrozenTrial | None:
        """The trial of this config version whose candidate `params` repeats, if any (then the search is steered)."""
        trials = study.get_trials(deepcopy=False)
        trained, given_up = self.tried(trials)
        key = params_key(params)
        original = trained.get(key) or given_up.get(key)
        if original is None:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self._steer(study, trials, trained, given_up)
        return original

    def _steer(self, study: optuna.Study, trials: list, trained: dict, given_up: dict) -> None:
        busy = {params_key(proposed_params(t)) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        tried = trained.keys() | given_up.keys()
        listed = self.listed()
        if listed is not None:
            untried = [p for p in listed if params_key(p) not in tried | busy]
            if untried:
                study.enqueue_trial(self.rng.choice(untried))
            elif tried >= {params_key(p) for p in listed}:
                self.stop_reason = self._exhausted(len(listed), len(trained), len(given_up))
            else:
                self.stop_reason = "search space exhausted: the candidates not yet tried are running in other workers"
            return
        for _ in range(DRAWS):
            walk = RandomTrial(self.rng)
            self.space.sample(walk)
            if params_key(walk.params) not in tried | busy:
                study.enqueue_trial(walk.params)
                break
        if self.in_a_row >= STALL_LIMIT:
            self.stop_reason = (
                f"the sampler proposed {self.in_a_row} already tried candidates in a row, "
                "so the space looks used up; widen it or use the random sampler"
            )

    def _exhausted(self, candidates: int, trained: int, failed: int) -> str:
        version = f" under config version {self.version}" if self.version else ""
        if not failed:
            return f"search space exhausted: all {candidates} candidates of the space have been trained{version}"
        return (
            f"search space exhausted: all {candidates} candidates of the space have been tried{version}: "
            f"{trained} trained, {failed} failed on each of their {1 + self.retries} tries (1 + study.retries)"
        )

    def listed(self) -> list[dict] | None:
        if self._listed is False:
            self._listed = list_candidates(self.space, LIST_LIMIT)
        return self._listed


def record_repeat(trial: optuna.Trial, original: optuna.trial.FrozenTrial):
    """End `trial` as a repeat of `original` without training: FAIL, so that no sampler or pruner counts it."""
    reason = f"repeat of trial {original.number} (not trained)"
    trial.set_user_attr(DUPLICATE_ATTR, original.number)
    trial.set_user_attr(FAIL_REASON_ATTR, reason)
    raise Repeat(reason)


# --- walking the space ------------------------------------------------------------------------


def list_candidates(space: Space, limit: int) -> list[dict] | None:
    """Every parameter set the space can produce, or None when it has float ranges or more than `limit`.

    Define-by-run spaces are conditional (no momentum when the norm is `none`), so the sets are
    found by walking the sampler's decisions like an odometer: rerun the walk with the last
    decision that has options left advanced by one, and the decisions after it reset.
    """
    found, path = [], []
    while True:
        walk = ListingTrial(path, limit)
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
