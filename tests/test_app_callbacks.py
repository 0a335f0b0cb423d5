"""gora.app.run.callbacks: the first SIGINT/SIGTERM during training asks the Trainer to save and stop after the step,
a second one (or one outside training) stops at once, and the previous handlers come back afterwards."""

from __future__ import annotations

import signal

import pytest
from transformers import TrainerControl

from gora.app.run.callbacks import GracefulStop, SignalStop


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_saves_and_stops_after_the_step_second_stops_at_once(signum):
    """Protects the two-stage stop: the first signal in training raises nothing and turns the next step end into
    save + stop; the second raises SignalStop carrying the signal; the previous handlers are restored on exit."""

    def previous(*args):
        raise AssertionError("the previous handler must not run inside GracefulStop")

    old = {s: signal.signal(s, previous) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with GracefulStop() as stop:
            stop.on_train_begin(None, None, TrainerControl())
            signal.raise_signal(signum)
            assert stop.signum == signum
            control = stop.on_step_end(None, type("State", (), {"global_step": 7})(), TrainerControl())
            assert control.should_save and control.should_training_stop
            with pytest.raises(SignalStop) as err:
                signal.raise_signal(signum)
            assert err.value.signum == signum and isinstance(err.value, KeyboardInterrupt)
        assert signal.getsignal(signal.SIGINT) is previous and signal.getsignal(signal.SIGTERM) is previous
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_signal_outside_training_stops_at_once():
    """Protects evaluation and the report: there is no step to finish, so a signal stops at once."""
    with GracefulStop() as stop, pytest.raises(SignalStop):
        signal.raise_signal(signal.SIGINT)
    assert stop.signum is None


def test_no_second_checkpoint_of_the_same_step_at_epoch_end():
    """Protects against a double save: when the stop's checkpoint falls at an epoch's end, save_strategy='epoch'
    does not write the same step again."""
    stop = GracefulStop()
    stop.signum = signal.SIGINT
    state = type("State", (), {"global_step": 11})()
    stop.on_save(None, state, TrainerControl())
    control = TrainerControl(should_save=True)
    assert not stop.on_epoch_end(None, state, control).should_save
