"""Stop signals: SIGTERM or SIGINT during training finish the current step, checkpoint it and
raise :class:`TrainingInterrupted` (a second signal aborts at once). Under torchrun the ranks
agree once per step, so all stop after the same step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from weatherpeft import distributed

__all__ = ["STOP_SIGNALS", "StopRequests", "TrainingInterrupted"]

#: Signals that make :meth:`Trainer.fit` checkpoint and stop after the current step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(BaseException):
    """:meth:`Trainer.fit` stopped on a signal, after finishing a step and checkpointing it.

    ``signum``: the signal; ``step``: completed optimizer steps, all in ``checkpoint``;
    ``exit_code``: the shell's convention 128 + signal (143 for SIGTERM, 130 for SIGINT).
    A BaseException, like KeyboardInterrupt, so ``except Exception`` does not swallow a
    request to stop. Continue with ``fit(resume=True)``.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return (f"training stopped by {signal.Signals(self.signum).name} after step {self.step}; "
                f"checkpoint {self.checkpoint} (resume to continue)")


class StopRequests:
    """Stop signals recorded instead of acted on, while :meth:`caught` is entered."""

    def __init__(self) -> None:
        #: The stop signal received (0: none).
        self.signum = 0

    @contextmanager
    def caught(self) -> Iterator[None]:
        """Inside, SIGTERM and SIGINT only record a request to stop (a second one raises
        KeyboardInterrupt at once); the previous handlers are back on exit. Handlers can only
        be set in the main thread: elsewhere, signals keep their usual effect."""
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.signum:
                raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name})")
            self.signum = signum

        previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def agreed(self, world_size: int) -> int:
        """The signal that stops training after this step (0: none); distributed, any rank's
        (all ranks must call this: one all-reduce)."""
        if world_size > 1:
            return int(distributed.all_reduce([float(self.signum)], "max")[0])
        return self.signum
