"""Ctrl-C and SIGTERM during a run (stop the trials, save, print how to resume), and Ray Tune's own
log lines held back unless asked for.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

from ..ray_assumptions import NO_SIGINT_HANDLER, STOP_SIGNAL

NO_RAY_SIGINT = NO_SIGINT_HANDLER


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM during a run. The first, while Ray Tune runs the trials,
    asks it to stop them and save its state - through the handler Ray Tune installs for its stop signal (SIGUSR1),
    the same it would install for SIGINT (turned off here, so that SIGTERM takes the same path) -
    and the run returns its partial summary with `interrupted` set; before the trials start it is
    a KeyboardInterrupt. A second one ends the process at once (exit code 130). Only in the main
    thread; elsewhere signals are left alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.interrupted = False   # Ray Tune was asked to stop
        self.fitting = False       # Tuner.fit() is running
        self.saved: dict[int, Any] = {}
        self.env: Optional[str] = None
        self.active = False

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is not threading.main_thread():
            return self
        self.active = True
        self.env = os.environ.get(NO_RAY_SIGINT)
        os.environ[NO_RAY_SIGINT] = "1"
        for sig in (*self.SIGNALS, STOP_SIGNAL):
            self.saved[sig] = signal.getsignal(sig)
        self.install()
        return self

    def install(self) -> None:
        if self.active:
            for sig in self.SIGNALS:
                signal.signal(sig, self.handle)

    def __exit__(self, *exc: Any) -> None:
        if not self.active:
            return
        for sig, handler in self.saved.items():  # Ray Tune leaves its stop handler behind
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if self.env is None:
            os.environ.pop(NO_RAY_SIGINT, None)
        else:
            os.environ[NO_RAY_SIGINT] = self.env
        self.active = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            _say_now("\ninterrupted again: stopping at once (--resume continues from the "
                     "run's last saved state)\n")
            os._exit(130)
            return
        ray_handler = signal.getsignal(STOP_SIGNAL)
        if self.fitting and callable(ray_handler) and ray_handler is not self.saved.get(STOP_SIGNAL):
            self.interrupted = True
            _say_now("\nstopping: the trials stop and the run's state is saved "
                     "(press Ctrl-C again to quit at once)\n")
            ray_handler(STOP_SIGNAL, frame)  # Ray Tune: stop the trials, save, return
            return
        raise KeyboardInterrupt


def _say_now(text: str) -> None:
    """Write to stderr from a signal handler (no buffered stream: it may be mid-write)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class QuietRay:
    """With `quiet`, Ray Tune's and Ray Train's own log lines (their progress, warnings about
    trials that never reported, tracebacks of failed trials, the interrupt messages) are held
    back: the run prints its own lines instead. `--verbose 2` shows them."""

    LOGGERS = ("ray.tune", "ray.train")

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.levels = quiet, {}

    def __enter__(self) -> "QuietRay":
        if self.quiet:
            for name in self.LOGGERS:
                self.levels[name] = logging.getLogger(name).level
                logging.getLogger(name).setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


