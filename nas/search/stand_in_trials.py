"""Stand-ins for an Optuna trial: `Space.sample` walked without a study.

Define-by-run spaces are conditional, so what a space can produce is found by sampling it with a
trial that answers `suggest_*` itself: the first option everywhere (the default ArchSpec), a
walk along given option indices (listing a finite space), or random draws (finding untried
candidates, and which keys a space ever asks for).
"""

from __future__ import annotations

import math
import random


class FirstChoiceTrial:
    """A stand-in trial that takes every choice's first value and every range's low end."""

    def suggest_categorical(self, name, choices):
        return choices[0]

    def suggest_int(self, name, low, high, step=1, log=False):
        return low

    def suggest_float(self, name, low, high, step=None, log=False):
        return low


class Infinite(Exception):
    """The space has a float range: its candidates cannot be listed."""


class ListingTrial:
    """A stand-in trial that follows `path` (option indices) and then the first options, counting each
    decision's options."""

    def __init__(self, path: list[int], limit: int):
        self.path, self.limit, self.counts, self.params = path, limit, [], {}

    def _take(self, name: str, options: list):
        index = self.path[len(self.counts)] if len(self.counts) < len(self.path) else 0
        self.counts.append(len(options))
        self.params[name] = options[index]
        return options[index]

    def suggest_categorical(self, name, choices):
        return self._take(name, list(choices))

    def suggest_int(self, name, low, high, step=1, log=False):
        if (high - low) // step + 1 > self.limit:
            raise Infinite(name)
        return self._take(name, list(range(low, high + 1, step)))

    def suggest_float(self, name, low, high, step=None, log=False):
        raise Infinite(name)


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


class MappingTrial:
    """A stand-in trial that answers from `given` parameters (an earlier study's) wherever the name is asked and the
    value fits the distribution, and with the first option elsewhere: which of them this space can take.

    `kept`: the given values it took; `asked`: every name the space asked for.
    """

    def __init__(self, given: dict):
        self.given, self.kept, self.asked = given, {}, []

    def _answer(self, name: str, fits, first):
        self.asked.append(name)
        if name in self.given and fits(self.given[name]):
            self.kept[name] = self.given[name]
            return self.given[name]
        return first

    def suggest_categorical(self, name, choices):
        return self._answer(name, lambda value: value in list(choices), choices[0])

    def suggest_int(self, name, low, high, step=1, log=False):
        fits = lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high and (v - low) % step == 0  # noqa: E731
        return self._answer(name, fits, low)

    def suggest_float(self, name, low, high, step=None, log=False):
        def fits(value) -> bool:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                return False
            return step is None or math.isclose((value - low) / step, round((value - low) / step), abs_tol=1e-9)

        return self._answer(name, fits, low)
