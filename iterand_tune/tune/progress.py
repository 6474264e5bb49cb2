"""Progress of a run on the terminal: a line per finished, diverged or failed trial, and the run's
progress with an ETA (a bar redrawn in place on a terminal, otherwise a line now and then).
"""
from __future__ import annotations

import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

from ray import tune

from ..ray_assumptions import ENDED, RUNNING, trial_error_text
from ..storage import TRIAL_KEY
from ..vocabulary import DIVERGED


class ProgressLines(tune.Callback):
    """A line per finished, diverged or failed trial, and the run's progress with an ETA: on a
    terminal a bar redrawn in place, otherwise a line after each finished trial and at least
    every `every` seconds. The ETA is the epochs left times the mean measured epoch time, over
    the number of trials seen running at once. A search counts every epoch its ASHA may still
    run, so its ETA is an upper bound ("ETA at most"). Ray pickles callbacks (and a resumed run
    gets this object back from the run's folder): it holds plain values only."""

    ENDED = ENDED
    # Defaults for a callback unpickled from a run started by an older version.
    total_trials, total_epochs, upper_bound, tty, redraw = 0, 0, False, None, 1.0

    def __init__(self, echo: Callable[[str], None], every: float = 60.0, total_trials: int = 0,
                 total_epochs: int = 0, upper_bound: bool = False, tty: Optional[bool] = None,
                 redraw: float = 1.0) -> None:
        self.echo, self.every, self.redraw = echo, every, redraw
        self.total_trials, self.total_epochs = total_trials, total_epochs  # 0: not known
        self.upper_bound = upper_bound
        self.tty = tty  # None: whether stdout is a terminal when the run starts
        self._reset()

    def _reset(self) -> None:
        self.start = self.last = time.time()   # this session's start; the last progress line
        self.drawn = 0.0                        # when the bar was last drawn (0: not on screen)
        self.seconds = self.epochs = 0.0        # measured epoch time, and epochs measured
        self.busy = self.span = 0.0             # running-trial seconds over wall seconds
        self.tick: Optional[float] = None
        self.done = 0

    def setup(self, **info: Any) -> None:
        self._reset()  # a resumed run counts its own time
        if self.tty is None:
            self.tty = _isatty()

    # --------------------------------------------------------------- Ray Tune's hooks

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        seconds = result.get("time_this_iter_s", result.get("epoch_seconds"))
        if isinstance(seconds, (int, float)) and seconds >= 0:
            self.seconds += seconds
            self.epochs += 1

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Ray calls this before the trial's status says it ended.
        self.done = sum(t.status in self.ENDED for t in trials if t is not trial) + 1
        r, t = trial.last_result or {}, trial.config[TRIAL_KEY]
        if r.get(DIVERGED):
            what = (f"diverged at epoch {r.get('epoch', 0)} (training loss "
                    f"{r.get('train_loss')}); lower its lr")
        else:
            test = (f"test {r['test_acc']:.2f}%" if "test_acc" in r else  # search: val only
                    f"val {r['val_acc']:.2f}%" if "val_acc" in r else "no test accuracy")
            what = f"{test} after {r.get('epoch', 0)} epochs, {r.get('time_total_s', 0):.0f} s"
        self._say(f"[{self.done}/{max(self.total_trials, len(trials))}] {t['experiment']} "
                  f"{t['model']} seed {t['seed']}: {what}", trials, trial)
        if not self.tty:
            self._say(self.status(trials, ended=trial), trials, trial)
            self.last = time.time()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = trial.config[TRIAL_KEY]
        self._say(f"trial {t['experiment']} {t['model']} seed {t['seed']} failed: "
                  f"{_last_line(trial)} (details: {trial.path}/error.txt)", trials, trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if self.tick is not None:
            running = sum(t.status == RUNNING for t in trials)
            if running:
                self.busy += running * (now - self.tick)
                self.span += now - self.tick
        self.tick = now
        if self.tty:
            if now - self.drawn >= self.redraw:
                self._draw(trials)
        elif now - self.last >= self.every:
            self.last = now
            self.echo(self.status(trials))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.tty and self.drawn:
            self._draw(trials)
            _write("\n")
            self.drawn = 0.0

    # --------------------------------------------------------------- the numbers

    def tally(self, trials: Sequence[Any], ended: Any = None) -> dict[str, Any]:
        """Epochs done and left (over every trial of the run, started or not), trials running,
        pending and ended, and the ETA in seconds (None before an epoch was measured)."""
        done = left = planned = running = pending = finished = 0
        for t in trials:
            e = int((t.last_result or {}).get("epoch") or 0)
            epochs = int((t.config or {}).get(TRIAL_KEY, {}).get("epochs") or e)
            done, planned = done + e, planned + epochs
            if t is ended or t.status in self.ENDED:
                finished += 1
            else:
                left += max(epochs - e, 0)
                running += t.status == RUNNING
                pending += t.status != RUNNING
        total = max(self.total_trials, len(trials))
        if total > len(trials):  # trials Ray has not created yet
            pending += total - len(trials)
            left += max(self.total_epochs - planned, 0)
        eta = None
        if self.epochs:
            concurrency = self.busy / self.span if self.span else 1.0
            concurrency = max(1.0, min(concurrency, running + pending))
            eta = left * (self.seconds / self.epochs) / concurrency
        return dict(done=done, left=left, running=running, pending=pending, finished=finished,
                    total=total, eta=eta, elapsed=time.time() - self.start)

    def status(self, trials: Sequence[Any], ended: Any = None) -> str:
        """One progress line, e.g. 'progress: 12/40 epochs, ETA 3m10s, elapsed 1m02s;
        trials: 2 running, 3 pending, 1/6 finished'."""
        n = self.tally(trials, ended)
        return (f"progress: {self._epochs(n)}, {self._eta(n)}, elapsed {_duration(n['elapsed'])}; "
                f"trials: {n['running']} running, {n['pending']} pending, "
                f"{n['finished']}/{n['total']} finished")

    def bar(self, trials: Sequence[Any], width: int = 80, ended: Any = None) -> str:
        """The terminal's progress bar, shorter than `width` (a line that wraps could not be
        redrawn in place): the bar itself narrows first, then the line is cut."""
        n = self.tally(trials, ended)
        whole = n["done"] + n["left"]
        text = (f"{self._epochs(n)}  {self._eta(n)}  {_duration(n['elapsed'])} elapsed  "
                f"{n['running']} running, {n['pending']} pending, "
                f"{n['finished']}/{n['total']} done")
        cells = max(8, min(30, width - 4 - len(text)))
        full = round(cells * n["done"] / whole) if whole else 0
        return f"[{'#' * full}{'.' * (cells - full)}] {text}"[:max(width - 1, 10)]

    def _epochs(self, n: dict[str, Any]) -> str:
        whole = n["done"] + n["left"]
        return f"{n['done']}/{'at most ' if self.upper_bound else ''}{whole} epochs"

    def _eta(self, n: dict[str, Any]) -> str:
        if n["eta"] is None:
            return "ETA --"  # known once an epoch was measured
        return f"ETA {'at most ' if self.upper_bound else ''}{_duration(n['eta'])}"

    # --------------------------------------------------------------- output

    def _say(self, line: str, trials: Sequence[Any], trial: Any = None) -> None:
        if self.tty and self.drawn:
            _write("\r\x1b[K")  # the line replaces the bar; the bar comes back under it
            self.echo(line)
            self._draw(trials, trial)
        else:
            self.echo(line)

    def _draw(self, trials: Sequence[Any], ended: Any = None) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        _write("\r" + self.bar(trials, width, ended) + "\x1b[K")
        self.drawn = time.time()


def _isatty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    """3 s, 4m05s, 2h03m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _last_line(trial: Any) -> str:
    """The exception line of a trial's error (e.g. 'DataError: CIFAR-10 not found in ...')."""
    text = trial_error_text(trial)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "see its error file"


def say(line: str) -> None:
    """Default progress output. A module-level function, because Ray pickles the Tuner's
    callbacks and `print` can be swapped out by Ray's log redirection on a cluster."""
    print(line, flush=True)
