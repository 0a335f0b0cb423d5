"""The Trainer callbacks of a fine-tune: stopping on SIGINT / SIGTERM without losing work, and keeping status.json
current.

During training the first signal lets the Trainer finish its current step, write a checkpoint and stop (the loop
stays transformers' own: `GracefulStop` sets `control.should_save` and `control.should_training_stop`); a second
signal stops at once. Outside training (evaluation, the report) a signal stops at once.

    with GracefulStop() as stop:                 # owns the SIGINT and SIGTERM handlers; the previous ones come back
        Trainer(..., callbacks=[stop, StatusCallback(run)]).train()
    if stop.signum is not None: ...              # stopped early on a signal, with a checkpoint of the last step
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..parallel import max_over_ranks

if TYPE_CHECKING:
    from .runfolder import RunFolder

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalStop(KeyboardInterrupt):
    """Raised by `GracefulStop`'s handler to stop at once (a second signal, or one outside training)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum: int) -> str:
    """SIGINT, SIGTERM, ..."""
    return signal.Signals(signum).name


class GracefulStop(TrainerCallback):
    """A Trainer callback that turns the first SIGINT/SIGTERM during training into "save a checkpoint of this step,
    then stop", and any further one (or one outside training) into `SignalStop` at once.

    Use it as a context manager around the training (and whatever follows that should stop at once on a signal):
    the handlers are installed on entry and the previous ones restored on exit. Outside the main thread, where
    Python cannot install signal handlers, it does nothing.

    Attributes:
        signum: The first signal received during training, or None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._training = False
        self._saved_step: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            logger.debug("not in the main thread: SIGINT/SIGTERM keep their handlers")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None and self._training:
            self.signum = signum
            logger.warning(
                "%s: finishing the current step and writing a checkpoint, then stopping (send it again to stop at "
                "once)",
                signal_name(signum),
            )
            return
        raise SignalStop(signum)

    # --- TrainerCallback ---------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # under torch.distributed the ranks agree (one collective per step), so all of them save this step's
        # checkpoint and stop together even when only some received the signal
        agreed = max_over_ranks(self.signum or 0)
        if agreed:
            self.signum = self.signum or agreed
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._saved_step = state.global_step

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.signum is not None and self._saved_step == state.global_step:
            control.should_save = False  # "epoch" / "auto" would write this step's checkpoint a second time
        return control


class EpochEndSave(TrainerCallback):
    """--save-strategy auto: the Trainer saves every `save_steps` steps (its "steps" strategy, which also saves the
    last step); this adds a checkpoint at the end of every epoch that does not end on a saved step. So a run killed
    outright (SIGKILL, power loss) loses at most min(save_steps, one epoch) steps, for short and long epochs alike."""

    def __init__(self) -> None:
        self._saved_step = -1

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._saved_step = state.global_step

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._saved_step != state.global_step:
            control.should_save = True
        return control


class StatusCallback(TrainerCallback):
    """Keeps status.json's step and last checkpoint current: at the start of training and after every checkpoint."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.run.update_status(step=state.global_step, max_steps=state.max_steps)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = self.run.checkpoints / f"checkpoint-{state.global_step}"
        self.run.update_status(step=state.global_step, last_checkpoint=self.run.relative(checkpoint))
