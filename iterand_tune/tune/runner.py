"""The Tuner of a run: the cluster and storage checked first, the run's marker (run.json) written
before its first trial, the project's own searcher (grid points, or a search's samples) and
scheduler, retries and resume, and the summary read back from the run's folder.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import ray
import torch
from ray import tune

from .. import ray_assumptions as ray_env
from ..data import prepare_dataset
from ..experiments import Experiment, all_trials
from ..resources import (check_cluster, check_storage, connect, live_node_ids, live_nodes,
                         trial_request)
from ..runs import GRID, RUN_FILE, read_run, write_marker
from ..storage import TRIAL_KEY, RunError, join_path
from ..tracking import Tracking
from . import resume as resuming
from .interrupts import Interrupts, QuietRay
from .progress import ProgressLines, say
from .searchers import GridSearcher, TrialsView
from .summary import Interruption, RunSummary
from .trainable import train_trial, trial_name


@dataclass(frozen=True)
class RunOptions:
    storage_path: str                    # absolute path or URI (s3://, gs://, ...)
    name: str                            # the run's folder under storage_path
    marker: dict = field(default_factory=dict)  # run.json: kind, planned trials, requests, flags
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

    @property
    def planned(self) -> list[dict[str, Any]]:
        return list(self.marker.get("trials") or [])


def grid_marker(experiments: Sequence[Experiment]) -> dict[str, Any]:
    """The part of run.json a grid run needs: its kind, planned trials (the file's order) and
    each experiment's resources and note."""
    return {"kind": GRID, "trials": all_trials(experiments),
            "experiments": {e.name: {"gpus_per_trial": e.gpus_per_trial,
                                     "cpus_per_trial": e.cpus_per_trial, "note": e.note}
                            for e in experiments}}


def run(opts: RunOptions, echo: Callable[[str], None] = say, search: Any = None) -> Any:
    """Run (or resume) the trials of `opts.marker` (a grid run) as one Ray Tune run; return its
    summary. With `search` (an iterand_tune.search.SearchRun) its searcher proposes the samples
    of its points and its scheduler stops weak ones, and the summary is the search's."""
    trials = opts.planned if search is None else [p.trial({}) for p in search.points]
    if opts.address is None and not os.environ.get("RAY_ADDRESS"):
        # Every trial will run on this machine: fetch or check each dataset once, here,
        # before Ray starts, so missing data is one line rather than every trial failing.
        needed = {(t["dataset"], t["dataset_dir"], t["dataset_download"]) for t in trials}
        for name, root, download in sorted(needed):
            prepare_dataset(name, root, download=download)
    # A snapshot per second checkpoint is what keeps resume exact: no warning about it. Without
    # --verbose 2 our own progress lines replace Ray's (its new output engine prints its box
    # anyway). Put back when the run ends, for a caller that goes on (a notebook, the tests).
    switches = {ray_env.SYNC_WARNING: "0", **({ray_env.OLD_OUTPUT: "0"} if opts.verbose < 2 else {})}
    before = {name: os.environ.get(name) for name in switches}
    for name, value in switches.items():
        os.environ.setdefault(name, value)
    try:
        with Interrupts() as interrupts, QuietRay(opts.verbose < 2):
            return _run(opts, echo, search, interrupts, trials)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _requests(opts: RunOptions, have_gpus: bool) -> Callable[[dict[str, Any]], tuple[float, float]]:
    """(CPUs, GPUs) of a trial: its experiment's choice (kept in run.json), the flags, the size."""
    by_name = opts.marker.get("experiments") or {}

    def request(trial: dict[str, Any]) -> tuple[float, float]:
        e = by_name.get(trial["experiment"], {})
        cpus = opts.cpus_per_trial if opts.cpus_per_trial is not None else e.get("cpus_per_trial")
        return trial_request(trial, have_gpus, gpus=e.get("gpus_per_trial"), cpus=cpus,
                             forced_gpus=opts.gpus_per_trial)

    return request


def _run(opts: RunOptions, echo: Callable[[str], None], search: Any, interrupts: Interrupts,
         trials: Sequence[dict[str, Any]]) -> Any:
    started = connect(opts.address, quiet=opts.verbose < 2)
    interrupts.install()  # again: ray.init() sets a SIGTERM handler of its own (sys.exit)
    try:
        request = _requests(opts, any(n.get("GPU", 0) > 0 for n in live_nodes()))
        check_cluster({f"{t['experiment']} ({t['model']})": request(t) for t in trials}, live_nodes())
        check_storage(opts.storage_path, live_node_ids())  # results reach one place from every node

        def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
            cpus, gpus = request(config[TRIAL_KEY])
            return tune.PlacementGroupFactory([{"CPU": cpus, **({"GPU": gpus} if gpus else {})}])

        trainable = tune.with_resources(train_trial, resources)
        plan = None
        if opts.resume:
            ray_env.clear_staging(opts.name, opts.path)
            plan = resuming.prepare(opts.path, opts.marker or None)
            for note in plan.notes:
                echo(note)
        if plan is not None and plan.how == "restore":
            echo(f"resuming {opts.path}")
            tuner = tune.Tuner.restore(opts.path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            if plan is None:  # before the first trial: what this run is
                write_marker(opts.path, {**opts.marker, "versions": {
                    **(opts.marker.get("versions") or {}), "cuda": torch.version.cuda}})
            tuner = _tuner(opts, trainable, echo, search, plan.done if plan else [])
        start = time.time()
        interrupts.fitting = True
        # Ray Tune creates only one trial ahead of a free slot for a searcher of its own; a grid
        # may have its points waiting for slots as its grid generator would (up to 200).
        ahead = 1 if search is not None else max(1, min(opts.max_concurrent or 200,
                                                         len(opts.planned), 200))
        try:
            with ray_env.pending_trials(ahead):
                tuner.fit()
        finally:
            interrupts.fitting = False
        folder = read_run(opts.path)
        if search is not None:
            summary = search.summarize(folder, time.time() - start)
        else:
            summary = RunSummary.from_run(folder, time.time() - start)
        started_trials = folder.started
        ended = [t for t in folder.trials if t.ended]
        if interrupts.interrupted or len(ended) < max(len(folder.trials), _total(opts, search)):
            summary.interrupted = Interruption(sum(t.status == "finished" for t in folder.trials)
                                               if search is None else len(ended),
                                               max(_total(opts, search), len(started_trials)))
        return summary
    finally:
        if started:
            ray.shutdown()


def _total(opts: RunOptions, search: Any) -> int:
    return search.num_samples if search is not None else len(opts.planned)


def _tuner(opts: RunOptions, trainable: Any, echo: Callable[[str], None], search: Any,
           done: Sequence[int]) -> Any:
    """A new Tuner: the project's searcher hands out every trial (no param_space, no
    ConcurrencyLimiter); FIFO for a grid, the search's per-point scheduler for a search."""
    if search is None:
        searcher = GridSearcher(opts.planned, opts.max_concurrent, done)
        scheduler = None
    else:
        searcher, scheduler = search.searcher, search.scheduler
        searcher.max_concurrent = opts.max_concurrent
    callbacks = [TrialsView(searcher, scheduler)]
    if opts.verbose == 1:
        callbacks.append(_progress(opts, echo, search))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=-1, **({"scheduler": scheduler} if scheduler else {}),
            # Reusing actors saves a process start and a torch import per trial; with early
            # stopping Ray Tune 2.60 cancels reused actors before they run ("The actor never
            # ran"), so a search starts a process per trial.
            reuse_actors=opts.reuse_actors and search is None,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=opts.name, storage_path=opts.storage_path,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            # Two checkpoints kept: the experiment state, saved every second trial checkpoint,
            # always points at one that still exists.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1 if opts.verbose >= 2 else 0,
            callbacks=[*callbacks, *opts.tracking.callbacks(opts.name)]))


def _progress(opts: RunOptions, echo: Callable[[str], None], search: Any) -> ProgressLines:
    """The progress callback of a run: every trial and epoch it plans (a search: every epoch its
    ASHA may run, an upper bound)."""
    if search is None:
        return ProgressLines(echo, total_trials=len(opts.planned),
                             total_epochs=sum(int(t["epochs"]) for t in opts.planned))
    per_point = search.num_samples // max(len(search.points), 1)
    return ProgressLines(echo, total_trials=search.num_samples, upper_bound=True,
                         total_epochs=per_point * sum(p.epochs for p in search.points))


__all__ = ["RunOptions", "run", "grid_marker", "RUN_FILE", "GRID", "RunError"]
