"""Ray Tune runner: one Tuner per run whose grid is every trial of the chosen experiments, a
function trainable that checkpoints every epoch, per-trial (fractional) GPU resources checked
against the cluster before anything starts, retries, resume, and the end-of-run summary.
"""
from __future__ import annotations

import functools
import math
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from .config import TrialConfig
from .experiments import Experiment, all_trials

TRIAL_KEY = "trial"          # param_space = {"trial": grid_search([experiment spaces])}
CHECKPOINT_FILE = "trainer.pt"


class RunError(Exception):
    """A run that cannot start as asked (cluster, storage, resume); one line, exit 2."""


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

    @property
    def path(self) -> str:
        return join_path(self.storage_path, self.name)


def join_path(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


def open_storage(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local folder or a URI such as s3://bucket/run."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


# ------------------------------------------------------------------ resources

# Forward GMACs per image -> GPU share. Conv6 up to x1.0 and ResNet18 up to x0.5 (<= 0.2 GMAC)
# leave most of a GPU idle at batch 128, so four share one; the widest CIFAR nets get a GPU.
GPU_SHARES = ((0.2, 0.25), (1.2, 0.5), (math.inf, 1.0))


@functools.lru_cache(maxsize=None)
def _gmacs(model: str, dataset: str) -> float:
    from .data import dataset_info
    from .models import estimate_macs

    info = dataset_info(dataset)
    return estimate_macs(model, info.image_size, info.num_classes) / 1e9


def gpu_share(model: str, dataset: str) -> float:
    """The GPU fraction 1/k a trial of `model` on `dataset` gets by default."""
    gmacs = _gmacs(model, dataset)
    return next(share for limit, share in GPU_SHARES if gmacs <= limit)


def trial_request(trial: dict[str, Any], experiment: Experiment, opts: RunOptions,
                  have_gpus: bool) -> tuple[float, float]:
    """(CPUs, GPUs) one trial asks for. Without GPUs in the cluster trials run on CPUs, unless
    --gpus-per-trial insists (then the resource check refuses the run)."""
    if opts.cpus_per_trial is not None:
        cpus = opts.cpus_per_trial
    elif experiment.cpus_per_trial is not None:
        cpus = experiment.cpus_per_trial
    else:  # device-resident data needs one core; ImageNet's DataLoader workers need their own
        cpus = 1 + trial["num_workers"] if trial["dataset"] == "imagenet" else 1
    if opts.gpus_per_trial is not None:
        gpus = opts.gpus_per_trial
    elif not have_gpus or not trial["use_cuda"]:
        gpus = 0.0
    elif experiment.gpus_per_trial is not None:
        gpus = experiment.gpus_per_trial
    else:
        gpus = gpu_share(trial["model"], trial["dataset"])
    return float(cpus), float(gpus)


def describe_request(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")


def check_cluster(requests: dict[str, tuple[float, float]], nodes: Sequence[dict[str, float]]) -> None:
    """Refuse requests no single node can ever satisfy (Ray would wait for them forever)."""
    if not nodes:
        raise RunError("the Ray cluster has no live nodes")
    for experiment, (cpus, gpus) in requests.items():
        if any(n.get("CPU", 0) >= cpus - 1e-9 and n.get("GPU", 0) >= gpus - 1e-9 for n in nodes):
            continue
        total_cpu = sum(n.get("CPU", 0) for n in nodes)
        total_gpu = sum(n.get("GPU", 0) for n in nodes)
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        raise RunError(
            f"{experiment} asks for {describe_request(cpus, gpus)} per trial, but no node has that "
            f"(cluster: {len(nodes)} node(s), {total_cpu:g} CPUs, {total_gpu:g} GPUs; largest node "
            f"{biggest.get('CPU', 0):g} CPUs, {biggest.get('GPU', 0):g} GPUs); "
            "lower --gpus-per-trial / --cpus-per-trial or add a bigger node")


# ------------------------------------------------------------------ the trainable

def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one TrialConfig, resumed from `tune.get_checkpoint()`,
    reporting DESIGN's metrics with a checkpoint after every epoch."""
    import logging

    import ray
    from ray import tune

    from .training import Trainer

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


def claim_resources(cpus: float, gpus: float, use_cuda: bool = True) -> tuple[str, int]:
    """Fit this process to the trial's resources: torch threads = its CPUs; with a GPU share its
    CUDA memory capped to that share. Returns (device, number of GPUs to use)."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    if gpus <= 0 or not use_cuda or not torch.cuda.is_available():
        return "cpu", 1  # a logical GPU without CUDA (tests) also lands here
    if gpus < 1:  # fractional GPUs are not isolated: hold this trial to its share
        torch.cuda.set_per_process_memory_fraction(gpus, 0)
    return "cuda", max(1, int(gpus))


def trial_name(trial: Any) -> str:
    t = trial.config[TRIAL_KEY]
    return f"{t['experiment']}-{t['model']}-seed{t['seed']}-{trial.trial_id}"


def param_space(experiments: Sequence[Experiment]) -> dict[str, Any]:
    """Every experiment's grid as nested `tune.grid_search` axes inside one top-level grid."""
    from ray import tune

    spaces = []
    for e in experiments:
        space: dict[str, Any] = {"experiment": e.name, **TrialConfig.from_dict(
            {**e.config, **{k: v[0] for k, v in e.grid.items()}}).to_dict()}
        for key, values in e.grid.items():
            space[key] = tune.grid_search([_plain(v) for v in values])
        spaces.append(space)
    return {TRIAL_KEY: tune.grid_search(spaces)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _progress_callback() -> type:
    from ray import tune

    class _ProgressLines(tune.Callback):
        """One line per finished or failed trial, and a status line at most every minute."""

        def __init__(self, echo: Callable[[str], None], every: float = 60.0) -> None:
            self.echo, self.every, self.last = echo, every, time.time()
            self.done = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            r, t = trial.last_result or {}, trial.config[TRIAL_KEY]
            test = (f"test {r['test_acc']:.2f}%" if "test_acc" in r else  # search: val only
                    f"val {r['val_acc']:.2f}%" if "val_acc" in r else "no test accuracy")
            self.echo(f"[{self.done}/{len(trials)}] {t['experiment']} {t['model']} seed {t['seed']}: "
                      f"{test} after {r.get('epoch', 0)} epochs, "
                      f"{r.get('time_total_s', 0):.0f} s")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            t = trial.config[TRIAL_KEY]
            self.echo(f"trial {t['experiment']} {t['model']} seed {t['seed']} failed: "
                      f"{_last_line(trial)} (details: {trial.path}/error.txt)")

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if time.time() - self.last < self.every:
                return
            self.last = time.time()
            counts: dict[str, int] = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            self.echo(f"{len(trials)} trials: " + ", ".join(
                f"{n} {status.lower()}" for status, n in sorted(counts.items())))

    return _ProgressLines


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


def ProgressLines(echo: Callable[[str], None]) -> Any:  # noqa: N802 - a class made on demand
    """The progress callback (built lazily so that importing this module does not import Ray)."""
    return _progress_callback()(echo)


# ------------------------------------------------------------------ connecting

def connect(address: Optional[str]) -> bool:
    """Start or join Ray; True when this process started it (and should shut it down)."""
    import ray

    address = check_address(address)
    if ray.is_initialized():  # e.g. a notebook or a test that started Ray itself
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False)
    except ConnectionError as err:
        raise RunError(f"cannot connect to a Ray cluster at {address!r}: "
                       f"{str(err).splitlines()[0]}; start one with `ray start --head` or "
                       "check --address") from None
    return True


def check_address(address: Optional[str]) -> Optional[str]:
    """The cluster address to join (--address, else RAY_ADDRESS, else None for a local Ray),
    checked to answer when it names a host."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    return address


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's long connection retries, when nothing listens there."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RunError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise RunError(f"cannot reach a Ray cluster at {address} ({err.strerror or err}); "
                       "is `ray start --head` running there, and is the port open?") from None


def check_storage(storage_path: str, node_ids: Sequence[str],
                  missing: Optional[Callable[[str, Sequence[str]], list[str]]] = None) -> None:
    """On a cluster of several nodes, refuse a local --storage-path that some node cannot see
    (its trials would write results where the driver never finds them)."""
    if "://" in storage_path or len(node_ids) < 2:
        return
    blind = (missing or nodes_missing_path)(storage_path, node_ids)
    if blind:
        raise RunError(
            f"--storage-path {storage_path} is not visible on {len(blind)} of the cluster's "
            f"{len(node_ids)} nodes ({', '.join(b[:8] for b in blind)}): use a shared filesystem "
            "mounted at the same path on every node, or a URI such as s3://bucket/folder")


def nodes_missing_path(storage_path: str, node_ids: Sequence[str], timeout: float = 60.0) -> list[str]:
    """Ids of the nodes that cannot see a probe file written here under `storage_path`'s nearest
    existing folder; the probe is removed again."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = os.path.abspath(storage_path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    probe = os.path.join(folder, f".iterand_tune_probe_{uuid.uuid4().hex}")
    try:
        with open(probe, "w"):
            pass
    except OSError as err:
        raise RunError(f"--storage-path {storage_path} is not writable here ({err.strerror})") from None
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                .remote(probe) for n in node_ids]
        try:
            answers = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"nodes of the cluster did not answer within {timeout:.0f} s whether "
                           f"they see --storage-path {storage_path}") from None
        return [n for n, ok in zip(node_ids, answers) if not ok]
    finally:
        os.remove(probe)


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def live_node_ids() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


# ------------------------------------------------------------------ running

def say(line: str) -> None:
    """Default progress output. A module-level function, because Ray pickles the Tuner's
    callbacks and `print` can be swapped out by Ray's log redirection on a cluster."""
    print(line, flush=True)


def run(experiments: Sequence[Experiment], opts: RunOptions,
        echo: Callable[[str], None] = say, search: Any = None) -> Any:
    """Run (or resume) every trial of `experiments` as one Ray Tune run; return its summary.
    With `search` (an iterand_tune.search.SearchRun) its searcher proposes the trials of its
    points and its scheduler stops weak ones, and the summary is the search's."""
    from ray import tune

    # A snapshot per second checkpoint is what keeps resume exact; do not warn about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if opts.verbose < 2:  # our own progress lines; the new output engine prints its box anyway
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if opts.address is None and not os.environ.get("RAY_ADDRESS"):
        # Every trial will run on this machine: fetch or check each dataset once, here,
        # before Ray starts, so missing data is one line rather than every trial failing.
        from .data import prepare_dataset

        needed = {(t["dataset"], t["dataset_dir"], t["dataset_download"])
                  for t in all_trials(experiments)}
        for name, root, download in sorted(needed):
            prepare_dataset(name, root, download=download)
    started = connect(opts.address)
    try:
        have_gpus = any(n.get("GPU", 0) > 0 for n in live_nodes())
        by_name = {e.name: e for e in experiments}
        requests: dict[str, tuple[float, float]] = {}
        for trial in all_trials(experiments):
            req = trial_request(trial, by_name[trial["experiment"]], opts, have_gpus)
            key = f"{trial['experiment']} ({trial['model']})"
            requests[key] = req
        check_cluster(requests, live_nodes())
        check_storage(opts.storage_path, live_node_ids())  # results reach one place from every node

        def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
            t = config[TRIAL_KEY]
            cpus, gpus = trial_request(t, by_name[t["experiment"]], opts, have_gpus)
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
                    callbacks=[ProgressLines(echo)] if opts.verbose == 1 else None,
                ),
            )
        start = time.time()
        grid = tuner.fit()
        if search is not None:
            return search.summarize(grid, opts.path, time.time() - start)
        return RunSummary.from_results(grid, opts.path, time.time() - start)
    finally:
        if started:
            import ray

            ray.shutdown()


# ------------------------------------------------------------------ summary

@dataclass
class PointSummary:
    experiment: str
    model: str
    method: str
    label: str               # other grid values that define the point, e.g. "rerand_lambda=0.01"
    trials: int
    done: int
    test_accs: list[float]
    params_after_pruning: Optional[int]

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.test_accs) if self.test_accs else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.test_accs) if len(self.test_accs) > 1 else None


@dataclass
class RunSummary:
    path: str
    points: list[PointSummary]
    errored: list[str]      # trial names whose last attempt failed
    unfinished: list[str]
    seconds: float

    @classmethod
    def from_results(cls, grid: Any, path: str, seconds: float) -> "RunSummary":
        rows = []
        errored, unfinished = [], []
        for result in grid:
            trial = (result.config or {}).get(TRIAL_KEY)
            if trial is None:  # a trial Ray cancelled before it ever ran has no config
                errored.append(os.path.basename(str(result.path or "")) or "a trial that never started")
                continue
            metrics = result.metrics or {}
            name = f"{trial['experiment']}-{trial['model']}-seed{trial['seed']}"
            if result.error is not None:
                errored.append(name)
            elif "test_acc" not in metrics:
                unfinished.append(name)
            rows.append((trial, metrics, result.error is None and "test_acc" in metrics))
        return cls(path, summarize(rows), errored, unfinished, seconds)

    @property
    def ok(self) -> bool:
        return not self.errored and not self.unfinished

    def table(self) -> str:
        head = ("experiment", "model", "method", "point", "seeds", "test acc %", "std",
                "params after pruning")
        body = []
        for p in self.points:
            body.append((p.experiment, p.model, p.method, p.label or "-", f"{p.done}/{p.trials}",
                         f"{p.mean:.2f}" if p.mean is not None else "-",
                         f"{p.std:.2f}" if p.std is not None else "-",
                         f"{p.params_after_pruning:,}" if p.params_after_pruning else "-"))
        return format_table(head, body)


def summarize(rows: Sequence[tuple[dict[str, Any], dict[str, Any], bool]]) -> list[PointSummary]:
    """Group trials into figure points: everything but the seed is the same."""
    by_experiment: dict[str, list[dict[str, Any]]] = {}
    for trial, _, _ in rows:
        by_experiment.setdefault(trial["experiment"], []).append(trial)
    # The experiment already names method and init; label a point by what varies inside it.
    label_keys = {name: sorted(k for k in trials[0] if k not in ("experiment", "model", "seed",
                                                                 "dataset_dir")
                               and len({repr(t[k]) for t in trials}) > 1)
                  for name, trials in by_experiment.items()}
    points: dict[tuple, PointSummary] = {}
    for trial, metrics, finished in rows:
        label = ", ".join(f"{k}={trial[k]}" for k in label_keys[trial["experiment"]])
        key = (trial["experiment"], trial["model"], label)
        p = points.get(key)
        if p is None:
            method = TrialConfig.from_dict({k: v for k, v in trial.items() if k != "experiment"}).method
            p = points[key] = PointSummary(trial["experiment"], trial["model"], method, label,
                                           0, 0, [], None)
        p.trials += 1
        if finished:
            p.done += 1
            p.test_accs.append(float(metrics["test_acc"]))
        if metrics.get("params_after_pruning") is not None:
            p.params_after_pruning = int(metrics["params_after_pruning"])
    return list(points.values())


def format_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
