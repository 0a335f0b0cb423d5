"""Hold training at one step until signals arrive, so that a test's SIGINT/SIGTERM lands in the middle of training
however loaded the machine is (no race against a fixed sleep, nor against a run that finishes first).

As a script it runs the real `gora finetune` (`gora.app.commands.cli.main`) in its own process:

    python tests/_interrupt_child.py <marker> <step> <signals> finetune [options]

In-process, `hold_training_at(marker, step, signals)` patches the Trainer the same way (a context manager).

When the Trainer starts the step after global step <step>, the marker file says "paused" and the step waits until
GracefulStop has received the first signal; the marker then says "signalled". With <signals> = 1 the step goes on
(the run then writes a checkpoint of it and stops); with 2 it keeps waiting, so the test's second signal arrives
mid-training and stops the run at once. After 120 s without a signal it goes on, and the test fails on the outcome.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import transformers

from gora.app.run.callbacks import GracefulStop


def _say(marker: Path, text: str) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, marker)  # the test never reads half a word


@contextlib.contextmanager
def hold_training_at(marker: Path, pause_at: int, signals: int) -> Iterator[None]:
    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == pause_at and not marker.exists():
            stop = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, GracefulStop))
            _say(marker, "paused")
            deadline = time.monotonic() + 600
            while stop.signum is None and time.monotonic() < deadline:
                time.sleep(0.01)
            _say(marker, "signalled")
            while signals > 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # the second signal raises SignalStop in here
        return original(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
    try:
        yield
    finally:
        transformers.Trainer.training_step = original


if __name__ == "__main__":
    from gora.app.commands.cli import main

    with hold_training_at(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])):
        status = main(sys.argv[4:])
    sys.exit(status)
