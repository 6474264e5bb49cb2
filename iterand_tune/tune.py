"""Ray Tune: the function trainable (one TrialConfig, a checkpoint every epoch), the Tuner of a
run (every trial of the chosen experiments in one grid, per-trial GPU shares checked against the
cluster first, retries, resume), progress lines, and the end-of-run summary.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import ray
from ray import tune

from .config import FIELD_NAMES, TrialConfig
from .data import prepare_dataset
from .experiments import Experiment, all_trials
from .resources import (check_cluster, check_storage, claim_resources, connect,
                        live_node_ids, live_nodes, trial_request)
from .storage import (CHECKPOINT_FILE, RESULT_FILE, TRIAL_KEY, RunError, experiment_state, join_path,
                      open_storage)
from .terminal import points_table
from .tracking import Tracking
from .training import Trainer
from .vocabulary import DIVERGED, POINT_LABELS, TEST_METRIC, labels, point_fields, point_rows

__all__ = ["RunOptions", "RunSummary", "Interruption", "ProgressLines", "run", "train_trial",
           "param_space", "trial_name", "TRIAL_KEY", "RunError"]


@dataclass(frozen=True)
class RunOptions:
    storage_path: str                    # absolute path or URI (s3://, gs://, ...)
    name: str                            # the run's folder under storage_path
    address: Optional[str] = None        # existing Ray cluster; None: RAY_ADDRESS or start one here
    gpus_per_trial: Optional[float] = None  # overrides every experiment's and the size rule
    cpus_per_trial: Optional[float] = None
    max_concurrent: Optional[int] = None
    max_failures: int = 3                # retries of a failed trial, from its last checkpoint
    reuse_actors: bool = True            # run trials one after another in the same processes
    resume: bool = False
    verbose: int = 1                     # 0 silent, 1 a line per finished trial, 2 Ray Tune's tables
    tracking: Tracking = Tracking()      # MLflow, W&B (a resumed run keeps the tracking it began with)

    @property
    def path(self) -> str:
        return join_path(self.storage_path, self.name)


# ------------------------------------------------------------------ the trainable

def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one TrialConfig, resumed from `tune.get_checkpoint()`,
    reporting the metrics of every epoch with a checkpoint. An epoch whose training loss is not
    finite is reported (`diverged`) and is the trial's last: it ends, not fails."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint

    values = {k: v for k, v in config[TRIAL_KEY].items() if k != "experiment"}
    cfg = TrialConfig.from_dict(values)
    request = tune.get_context().get_trial_resources().required_resources
    device, num_gpus = claim_resources(request.get("CPU", 1.0), request.get("GPU", 0.0), cfg.use_cuda)
    trainer = Trainer(cfg, device=device, num_gpus=num_gpus)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load(os.path.join(folder, CHECKPOINT_FILE))
    node_id = ray.get_runtime_context().get_node_id()
    while not trainer.done:  # a trial restored after its last epoch has nothing left to do
        metrics = trainer.train_epoch()
        metrics["node_id"] = node_id  # which node ran this epoch (trials move when nodes fail)
        with tempfile.TemporaryDirectory() as folder:
            trainer.save(os.path.join(folder, CHECKPOINT_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def trial_name(trial: Any) -> str:
    t = trial.config[TRIAL_KEY]
    return f"{t['experiment']}-{t['model']}-seed{t['seed']}-{trial.trial_id}"


def param_space(experiments: Sequence[Experiment]) -> dict[str, Any]:
    """Every experiment's grid as nested `tune.grid_search` axes inside one top-level grid."""
    spaces = []
    for e in experiments:
        space: dict[str, Any] = {"experiment": e.name, **TrialConfig.from_dict(
            {**e.config, **{k: v[0] for k, v in e.grid.items()}}).to_dict()}
        for key, values in e.grid.items():
            space[key] = tune.grid_search([list(v) if isinstance(v, tuple) else v for v in values])
        spaces.append(space)
    return {TRIAL_KEY: tune.grid_search(spaces)}


class ReportsFirst(tune.Callback):
    """Copies a trial's result.json to storage when the trial reports a checkpoint, before Ray
    Tune records that checkpoint in the experiment state. Ray Tune 2.60 uploads the trials'
    files and the experiment state together, in the background, from the driver's staging
    folder: a driver killed between the two (S3 makes that window wide) resumes trials from
    checkpoints whose epochs' reports never reached storage, and those epochs would be missing
    from the results for good."""

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any,
                      **info: Any) -> None:
        local = os.path.join(trial.local_path, RESULT_FILE)
        try:
            with open(local, "rb") as f:
                data = f.read()
            # The trial's StorageContext: where Ray Tune itself syncs the trial's folder to.
            fs, folder = trial.storage.storage_filesystem, trial.storage.trial_fs_path
            target = folder + "/" + RESULT_FILE
            try:
                with fs.open_output_stream(target) as out:
                    out.write(data)
            except FileNotFoundError:  # a local folder Ray has not made yet
                fs.create_dir(folder, recursive=True)
                with fs.open_output_stream(target) as out:
                    out.write(data)
        except Exception as err:  # noqa: BLE001 - Ray's own upload follows; never stop a run
            logging.getLogger(__name__).warning("could not copy %s to storage: %s", local, err)


# ------------------------------------------------------------------ progress

class ProgressLines(tune.Callback):
    """A line per finished, diverged or failed trial, and the run's progress with an ETA: on a
    terminal a bar redrawn in place, otherwise a line after each finished trial and at least
    every `every` seconds. The ETA is the epochs left times the mean measured epoch time, over
    the number of trials seen running at once. A search counts every epoch its ASHA may still
    run, so its ETA is an upper bound ("ETA at most"). Ray pickles callbacks (and a resumed run
    gets this object back from the run's folder): it holds plain values only."""

    ENDED = ("TERMINATED", "ERROR")
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
            running = sum(t.status == "RUNNING" for t in trials)
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
                running += t.status == "RUNNING"
                pending += t.status != "RUNNING"
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
    text = ""
    try:  # the driver's staged copy exists at once; the one in storage may not be synced yet
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                text = f.read()
        text = text or trial.get_error() or ""
    except Exception:  # noqa: BLE001 - storage may be gone with the node; the path still helps
        pass
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "see its error file"


def say(line: str) -> None:
    """Default progress output. A module-level function, because Ray pickles the Tuner's
    callbacks and `print` can be swapped out by Ray's log redirection on a cluster."""
    print(line, flush=True)


# ------------------------------------------------------------------ running

def run(experiments: Sequence[Experiment], opts: RunOptions,
        echo: Callable[[str], None] = say, search: Any = None) -> Any:
    """Run (or resume) every trial of `experiments` as one Ray Tune run; return its summary.
    With `search` (an iterand_tune.search.SearchRun) its searcher proposes the trials of its
    points and its scheduler stops weak ones, and the summary is the search's."""
    # A snapshot per second checkpoint is what keeps resume exact; do not warn about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if opts.verbose < 2:  # our own progress lines; the new output engine prints its box anyway
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if opts.address is None and not os.environ.get("RAY_ADDRESS"):
        # Every trial will run on this machine: fetch or check each dataset once, here,
        # before Ray starts, so missing data is one line rather than every trial failing.
        needed = {(t["dataset"], t["dataset_dir"], t["dataset_download"])
                  for t in all_trials(experiments)}
        for name, root, download in sorted(needed):
            prepare_dataset(name, root, download=download)
    with _Interrupts() as interrupts, _quiet_ray(opts.verbose < 2):
        return _run(experiments, opts, echo, search, interrupts)


def _run(experiments: Sequence[Experiment], opts: RunOptions, echo: Callable[[str], None],
         search: Any, interrupts: "_Interrupts") -> Any:
    started = connect(opts.address, quiet=opts.verbose < 2)
    interrupts.install()  # again: ray.init() sets a SIGTERM handler of its own (sys.exit)
    try:
        have_gpus = any(n.get("GPU", 0) > 0 for n in live_nodes())
        by_name = {e.name: e for e in experiments}

        def request(trial: dict[str, Any]) -> tuple[float, float]:
            e = by_name[trial["experiment"]]
            return trial_request(trial, have_gpus, gpus=e.gpus_per_trial,
                                 cpus=opts.cpus_per_trial if opts.cpus_per_trial is not None
                                 else e.cpus_per_trial, forced_gpus=opts.gpus_per_trial)

        check_cluster({f"{t['experiment']} ({t['model']})": request(t) for t in all_trials(experiments)},
                      live_nodes())
        check_storage(opts.storage_path, live_node_ids())  # results reach one place from every node

        def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
            cpus, gpus = request(config[TRIAL_KEY])
            return tune.PlacementGroupFactory([{"CPU": cpus, **({"GPU": gpus} if gpus else {})}])

        trainable = tune.with_resources(train_trial, resources)
        space = param_space(experiments) if search is None else None
        if opts.resume:
            if not tune.Tuner.can_restore(opts.path):
                raise RunError(f"--resume: there is no run to resume at {opts.path}")
            echo(f"resuming {opts.path}")
            tuner = tune.Tuner.restore(opts.path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, param_space=space)
        else:
            # FIFO: every grid point is a point of the figure; run it all. A search instead
            # routes each trial to its figure point's own TPE (searcher) and ASHA (scheduler).
            tuning = dict(num_samples=1) if search is None else dict(
                num_samples=search.num_samples, search_alg=search.searcher,
                scheduler=search.scheduler)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    **tuning,
                    max_concurrent_trials=opts.max_concurrent,
                    # Reusing actors saves a process start and a torch import per trial; with
                    # ASHA stopping trials early Ray Tune 2.60 cancels reused actors before they
                    # run ("The actor never ran"), so a search starts a process per trial.
                    reuse_actors=opts.reuse_actors and search is None,
                    trial_name_creator=trial_name,
                    trial_dirname_creator=trial_name,
                ),
                run_config=tune.RunConfig(
                    name=opts.name,
                    storage_path=opts.storage_path,
                    failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                    # Keeping two checkpoints means the experiment state, saved every second
                    # trial checkpoint, always points at one that still exists.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    verbose=1 if opts.verbose >= 2 else 0,
                    callbacks=[*([_progress(experiments, echo, search)] if opts.verbose == 1 else []),
                               ReportsFirst(), *opts.tracking.callbacks(opts.name)],
                ),
            )
        start = time.time()
        interrupts.fitting = True
        try:
            grid = tuner.fit()
        finally:
            interrupts.fitting = False
        if search is not None:
            summary = search.summarize(grid, opts.path, time.time() - start)
        else:
            summary = RunSummary.from_results(grid, opts.path, time.time() - start, experiments)
        # The state Ray Tune saved last, before it stopped the trials still running (after
        # that, in memory, they all read TERMINATED): trials neither finished nor failed there
        # mean that it stopped on a signal (ours, or its own SIGUSR1).
        statuses = _saved_statuses(opts.path) or [
            "TERMINATED" if r.error is None else "ERROR" for r in grid]
        ended = [s for s in statuses if s in ("TERMINATED", "ERROR")]
        if interrupts.interrupted or len(ended) < len(statuses):
            total = search.num_samples if search is not None else len(all_trials(experiments))
            summary.interrupted = Interruption(statuses.count("TERMINATED"),
                                               max(total, len(statuses)))
        return summary
    finally:
        if started:
            ray.shutdown()


def _saved_statuses(path: str) -> list[str]:
    """Ray Tune's status of every trial in the run's newest saved experiment state ([] if none)."""
    try:
        fs, root = open_storage(path)
        return [s["status"] for s in experiment_state(fs, root).values()]
    except Exception:  # noqa: BLE001 - unreadable storage: the caller falls back on the results
        return []


def _progress(experiments: Sequence[Experiment], echo: Callable[[str], None],
              search: Any) -> ProgressLines:
    """The progress callback of a run: every trial and epoch it plans (a search: every epoch
    its ASHA may run, an upper bound)."""
    if search is None:
        trials = all_trials(experiments)
        return ProgressLines(echo, total_trials=len(trials),
                             total_epochs=sum(int(t["epochs"]) for t in trials))
    per_point = search.num_samples // max(len(search.points), 1)
    return ProgressLines(echo, total_trials=search.num_samples, upper_bound=True,
                         total_epochs=per_point * sum(p.epochs for p in search.points))


# ------------------------------------------------------------------ interrupts

NO_RAY_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM during a run. The first, while Ray Tune runs the trials,
    asks it to stop them and save its state - through the handler Ray Tune installs for SIGUSR1,
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

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is not threading.main_thread():
            return self
        self.active = True
        self.env = os.environ.get(NO_RAY_SIGINT)
        os.environ[NO_RAY_SIGINT] = "1"
        for sig in (*self.SIGNALS, signal.SIGUSR1):
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
        for sig, handler in self.saved.items():  # Ray Tune leaves its SIGUSR1 handler behind
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
        ray_handler = signal.getsignal(signal.SIGUSR1)
        if self.fitting and callable(ray_handler) and ray_handler is not self.saved.get(signal.SIGUSR1):
            self.interrupted = True
            _say_now("\nstopping: the trials stop and the run's state is saved "
                     "(press Ctrl-C again to quit at once)\n")
            ray_handler(signal.SIGUSR1, frame)  # Ray Tune: stop the trials, save, return
            return
        raise KeyboardInterrupt


def _say_now(text: str) -> None:
    """Write to stderr from a signal handler (no buffered stream: it may be mid-write)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class _quiet_ray:
    """With `quiet`, Ray Tune's and Ray Train's own log lines (their progress, warnings about
    trials that never reported, tracebacks of failed trials, the interrupt messages) are held
    back: the run prints its own lines instead. `--verbose 2` shows them."""

    LOGGERS = ("ray.tune", "ray.train")

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.levels = quiet, {}

    def __enter__(self) -> "_quiet_ray":
        if self.quiet:
            for name in self.LOGGERS:
                self.levels[name] = logging.getLogger(name).level
                logging.getLogger(name).setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------ summary

@dataclass(frozen=True)
class Interruption:
    """A run stopped by Ctrl-C or SIGTERM: `finished` of its `total` trials had ended."""

    finished: int
    total: int


@dataclass
class RunSummary:
    """What a run ended with: one record per trial (its config, labels, status and last metrics)
    and the figure points built from them exactly as `python -m analysis table` builds them.
    Records are in experiment-file order (experiment, then grid order), however Ray Tune
    returned them (after a resume: in the order trials completed)."""

    path: str
    trials: list[dict[str, Any]]
    errored: list[str]      # trial names whose last attempt failed
    unfinished: list[str]
    seconds: float
    diverged: list[str] = field(default_factory=list)  # stopped: training loss not finite
    interrupted: Optional[Interruption] = None           # set by `run` after Ctrl-C / SIGTERM

    @classmethod
    def from_results(cls, grid: Any, path: str, seconds: float,
                     experiments: Optional[Sequence[Experiment]] = None) -> "RunSummary":
        """The summary of Ray Tune's results; with the run's `experiments`, records follow the
        file's order and trials Ray Tune never created (an interrupted run) count as pending."""
        records, cancelled = [], []
        for result in grid:
            trial = (result.config or {}).get(TRIAL_KEY)
            if trial is None:  # a trial Ray cancelled before it ever ran has no config
                cancelled.append(os.path.basename(str(result.path or "")) or "a trial that never started")
                continue
            metrics = result.metrics or {}
            if result.error is not None:
                status = "errored"
            elif metrics.get(DIVERGED):
                status = DIVERGED
            elif TEST_METRIC not in metrics:
                status = "stopped"
            else:
                status = "finished"
            records.append({**trial, **labels(trial), "status": status,
                            **{k: metrics.get(k) for k in (TEST_METRIC, "params_after_pruning",
                                                           "params_before_pruning")}})
        if experiments is not None:
            # Trials Ray cancelled have no config to match: then none is called pending.
            records = _in_file_order(records, experiments, add_pending=not cancelled)

        def named(*statuses: str) -> list[str]:
            return [f"{t['experiment']}-{t['model']}-seed{t['seed']}" for t in records
                    if t["status"] in statuses]

        return cls(path, records, named("errored") + cancelled, named("stopped", "pending"),
                   seconds, named(DIVERGED))

    @property
    def points(self) -> list[dict[str, Any]]:
        keys = [*POINT_LABELS, *point_fields(self.trials, FIELD_NAMES)]
        return point_rows(self.trials, keys)

    @property
    def ok(self) -> bool:
        return not (self.errored or self.unfinished or self.diverged or self.interrupted)

    def table(self) -> str:
        return points_table(self.points)


def _in_file_order(records: list[dict[str, Any]], experiments: Sequence[Experiment],
                   add_pending: bool = True) -> list[dict[str, Any]]:
    """`records` sorted by their trial's place in `all_trials(experiments)` (experiment, then
    grid order); with `add_pending`, planned trials without a record (Ray had not created them
    when the run was interrupted) added as `pending`; records that match no planned trial (a
    resumed run whose file changed) last, in the order given."""
    axes = {e.name: list(e.grid) for e in experiments}
    place = {}
    planned = all_trials(experiments)
    for i, t in enumerate(planned):
        place.setdefault(_grid_key(t, axes), i)
    found: dict[int, dict[str, Any]] = {}
    rest = []
    for r in records:
        i = place.get(_grid_key(r, axes))
        if i is None or i in found:
            rest.append(r)
        else:
            found[i] = r
    for i, t in enumerate(planned if add_pending else ()):
        if i not in found and place.get(_grid_key(t, axes)) == i:
            found[i] = {**t, **labels(t), "status": "pending", TEST_METRIC: None,
                        "params_after_pruning": None, "params_before_pruning": None}
    return [found[i] for i in sorted(found)] + rest


def _grid_key(trial: dict[str, Any], axes: dict[str, list[str]]) -> tuple:
    """(experiment, its grid values) of a trial, the values as TrialConfig normalises them (Ray's
    copy of a grid value such as `1` is the file's; the planned trial's is TrialConfig's `1.0`)."""
    name = trial.get("experiment")
    values = {k: v for k, v in trial.items() if k in FIELD_NAMES}  # not the labels of a record
    try:
        values = TrialConfig.from_dict(values).to_dict()
    except Exception:  # noqa: BLE001 - a stored value today's validation refuses: compare as is
        pass
    return (name, *(json.dumps(values.get(k), sort_keys=True, default=str)
                    for k in axes.get(name, ())))
