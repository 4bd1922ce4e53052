"""Samplers by name (`study.sampler`), and the seed each search process gives its sampler.

One registry, name -> factory(seed); the YAML names are its keys. Optuna is imported only when
a sampler is made, so loading a run config stays light.
"""

from __future__ import annotations

import os
import socket
import time
import warnings

import numpy as np


def _samplers():
    import optuna.samplers

    return optuna.samplers


SAMPLERS = {
    "random": lambda seed, startup: _samplers().RandomSampler(seed=seed),
    # TPE models the conditional space jointly (multivariate + group); constant_liar keeps parallel workers apart
    "tpe": lambda seed, startup: _samplers().TPESampler(
        seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=startup
    ),
    "gp": lambda seed, startup: _samplers().GPSampler(
        seed=seed, warn_independent_sampling=False, n_startup_trials=startup
    ),
    "nsga2": lambda seed, startup: _samplers().NSGAIISampler(seed=seed, population_size=20),
}
SAMPLER_NAMES = tuple(SAMPLERS)
STARTUP_TRIALS = 10  # random draws before TPE and GP model (Optuna's default for both); `study.startup_trials`
MODELLED = ("tpe", "gp")  # the samplers that take a start-up count


def make_sampler(name: str, seed: int, startup: int | None = None):
    """The seeded sampler `study.sampler` names (the config loader has checked the name); `startup`: its random
    draws before it models (TPE and GP; default STARTUP_TRIALS)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # multivariate, group, constant_liar, GP
        return SAMPLERS[name](seed, STARTUP_TRIALS if startup is None else startup)


def process_seed(study_seed: int, trials_in_study: int, others: list) -> int:
    """This process's sampler seed: the study seed itself for a fresh study searched by one process, so
    that run reproduces exactly; otherwise derived from the seed, the trials the study already holds,
    and, while other workers are live, this process's identity, so that no process replays another's draws.
    """
    if trials_in_study == 0 and not others:
        return study_seed
    entropy = [study_seed, trials_in_study]
    if others:
        entropy += [os.getpid(), int(time.time() * 1e6) % 2**32, *socket.gethostname().encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
