"""SIGINT / SIGTERM during a search: stop it, but interrupt only data loading and training, never a storage write.

An exception raised at an arbitrary point could land inside SQLAlchemy or Optuna's own
bookkeeping; so a signal while data loads or a trial trains raises at once (Optuna then marks the
trial FAIL), and one elsewhere is kept until the next safe point (before the first trial, between
epochs, or a trial boundary), where the search stops.

A raise from a signal handler can be lost: when the signal lands while Python runs a weakref or
garbage-collector callback (SQLAlchemy registers some), Python prints "Exception ignored" and
drops it. So a signal stays pending until this module's own code raises it, between epochs
(`check`) or at the trial boundary.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from nas.errors import Terminated


class Signals:
    def __init__(self):
        self.pending: int | None = None
        self.training = False

    def handle(self, signum, frame) -> None:
        self.pending = signum
        if self.training:
            raise self.exception(signum)  # may be dropped (see the module docstring): pending stays set

    @staticmethod
    def exception(signum: int) -> KeyboardInterrupt:
        return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def raise_pending(self) -> None:
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise self.exception(signum)

    def check(self) -> None:
        """Between epochs: raise a signal whose raise in the handler was dropped."""
        if self.training:
            self.raise_pending()

    @contextmanager
    def interruptible(self):
        self.raise_pending()
        self.training = True
        try:
            yield
        finally:
            self.training = False

    @contextmanager
    def installed(self):
        """Our handlers, whatever the process inherited: started with SIGINT ignored (a background job of a
        non-interactive shell), Python installs none, and a Ctrl-C while data loads would be dropped."""
        self.pending = None  # one left by an earlier search in this process is not for this one
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop_at_boundary(self, study, trial) -> None:
        """Optuna callback: stop after the trial that just ended."""
        if self.pending is not None:
            study.stop()


SIGNALS = Signals()
