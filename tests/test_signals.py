"""nas.training.signals with real signals sent to this process: a signal interrupts only where it may (data loading,
training), is kept until a safe point elsewhere, and the process's own handlers come back afterwards.

`signal.raise_signal` runs the Python handler before it returns, so each signal lands at a known line.
"""

import signal

import optuna
import pytest

from nas.errors import Terminated
from nas.study.storage import quiet_optuna
from nas.training.signals import Signals


@pytest.fixture
def handlers():
    """The SIGINT and SIGTERM handlers before the test, put back after it whatever it did (asserted by the tests)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield before
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.fixture
def signals(handlers) -> Signals:
    return Signals()


def test_installed_sets_its_handlers_and_gives_the_previous_ones_back(signals, handlers):
    def own(signum, frame):
        raise AssertionError("the test's own handler must not run while the search's are installed")

    signal.signal(signal.SIGINT, own)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a process started with SIGTERM ignored still stops on it
    with signals.installed():
        assert signal.getsignal(signal.SIGINT) == signals.handle
        assert signal.getsignal(signal.SIGTERM) == signals.handle
    assert signal.getsignal(signal.SIGINT) is own and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_the_handlers_come_back_when_the_search_ends_with_an_exception(signals, handlers):
    with pytest.raises(KeyboardInterrupt), signals.installed():
        signal.raise_signal(signal.SIGINT)
        signals.raise_pending()
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_outside_training_a_signal_is_kept_until_raise_pending_and_raised_once(signals):
    with signals.installed():
        signal.raise_signal(signal.SIGINT)  # e.g. while Optuna writes a trial: nothing is raised there
        assert signals.pending == signal.SIGINT
        signals.check()  # between epochs of no training: not a place to raise
        assert signals.pending == signal.SIGINT
        with pytest.raises(KeyboardInterrupt) as raised:
            signals.raise_pending()
        assert type(raised.value) is KeyboardInterrupt
        assert signals.pending is None
        signals.raise_pending()  # raised once: nothing left


def test_sigterm_is_raised_as_terminated_a_keyboard_interrupt(signals):
    with signals.installed():
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(Terminated):
            signals.raise_pending()
    assert issubclass(Terminated, KeyboardInterrupt)  # so a trial is failed and the study stays resumable as on Ctrl-C


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_while_interruptible_a_signal_raises_at_once(signals, signum, raised):
    reached = []
    with signals.installed():
        with pytest.raises(raised), signals.interruptible():
            assert signals.training
            signal.raise_signal(signum)
            reached.append("after the signal")
        assert reached == [] and not signals.training


def test_a_raise_that_was_lost_stays_pending_and_check_raises_it_between_epochs(signals):
    with signals.installed(), signals.interruptible():
        try:  # the handler's raise landed where it was swallowed (Python drops one inside a weakref callback)
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        assert signals.pending == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signals.check()
        assert signals.pending is None
        signals.check()


def test_a_signal_before_training_starts_is_raised_on_entering_it(signals):
    entered = []
    with signals.installed():
        signal.raise_signal(signal.SIGINT)  # while the study opened
        with pytest.raises(KeyboardInterrupt), signals.interruptible():
            entered.append(True)
        assert entered == [] and not signals.training


def test_installing_again_forgets_a_signal_left_by_an_earlier_search_in_this_process(signals):
    with signals.installed():
        signal.raise_signal(signal.SIGINT)
    assert signals.pending == signal.SIGINT
    with signals.installed():
        assert signals.pending is None
        signals.raise_pending()


def test_a_signal_during_a_trial_outside_training_ends_the_study_at_the_trial_boundary(signals):
    with quiet_optuna():
        study = optuna.create_study()

    def objective(trial):
        if trial.number == 1:
            signal.raise_signal(signal.SIGINT)  # outside `interruptible`: the trial finishes
        return float(trial.number)

    with signals.installed(), quiet_optuna():
        study.optimize(objective, n_trials=10, callbacks=[signals.stop_at_boundary])
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
        with pytest.raises(KeyboardInterrupt):  # where the search then stops with the signal's exit code
            signals.raise_pending()
        study.optimize(objective, n_trials=2, callbacks=[signals.stop_at_boundary])
    assert len(study.trials) == 4  # nothing pending: no early stop
