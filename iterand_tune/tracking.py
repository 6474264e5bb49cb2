"""What a run records besides training: experiment tracking through Ray Tune's own logger
callbacks, each an optional extra: MLflow (`MLflowLoggerCallback`: one run per trial, named
after it, its TrialConfig as params, the figure point as tags, every epoch's metrics once,
by default in MLflow's own default store, a SQLite database ./mlflow.db) and Weights & Biases
(`WandbLoggerCallback`: one run per trial, grouped by experiment, offline under ./wandb
without an API key); TensorBoard needs nothing: Ray Tune writes event files into every
trial's folder. A resumed run (`--resume`) logs on into the same MLflow and W&B runs.

No Ray import at module level (the command line imports this module for its checks), and
mlflow and wandb only when asked for (both take seconds to import): the two callback classes
subclass Ray's loggers, whose modules import them, so they are built on first use; module
attribute lookups (PEP 562) return them, so that Ray Tune pickles them by name into the run's
tuner.pkl and a resumed run restores them.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import netrc
import os
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

from .config import FIELD_NAMES
from .runs import read_run
from .storage import TRIAL_KEY, RunError, open_storage
from .vocabulary import METRICS, labels

__all__ = ["Tracking", "MLFLOW_DEFAULT", "check_installed", "mlflow_uri", "wandb_mode",
           "wandb_offline_runs", "wandb_run_id", "wandb_sync_command", "trial_params",
           "trial_tags"]

# --mlflow without a URI: MLflow's own default store (3.18 here; its file store, ./mlruns, is
# in maintenance mode), a SQLite database in the working folder, no server; made absolute.
MLFLOW_DEFAULT = "sqlite:///mlflow.db"
PACKAGES = {"--mlflow": ("mlflow", "mlflow"), "--wandb": ("wandb", "wandb")}  # flag: module, extra
# MLflow's database stores (sqlite:, postgresql:, mysql:, mssql:, with or without +DRIVER) need
# these; mlflow-skinny leaves them out, the full mlflow package has them.
SQL_STORE_MODULES = ("sqlalchemy", "alembic")
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Also logged every epoch besides the trial's own metrics (vocabulary.METRICS).
RAY_METRICS = ("time_total_s",)
# Logged at every step (Ray puts it in every result): its history in an MLflow run tells which
# steps that run already holds.
STEP_METRIC = "time_total_s"


def check_installed(flags: list[str], mlflow: Optional[str] = None) -> None:
    """One line (RunError, exit 2) for the first tracking flag whose package is missing, and
    for an MLflow database store (`mlflow`: --mlflow's value) without SQLAlchemy and Alembic."""
    for flag in flags:
        module, extra = PACKAGES[flag]
        if importlib.util.find_spec(module) is None:
            raise RunError(f"{flag} needs the {module} package: pip install 'iterand_tune[{extra}]'")
    if "--mlflow" in flags and mlflow is not None and mlflow_sql_store(mlflow_uri(mlflow)):
        missing = [m for m in SQL_STORE_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise RunError(f"--mlflow {mlflow_uri(mlflow)} (a database store) needs "
                           f"{' and '.join(missing)}: pip install 'iterand_tune[mlflow]'; or "
                           f"give --mlflow a folder (a file store) or a server's http:// URI")


def mlflow_sql_store(uri: str) -> bool:
    """Whether MLflow keeps `uri` in a database through SQLAlchemy (sqlite:///mlflow.db, ...)."""
    return uri.split(":", 1)[0].split("+", 1)[0].lower() in SQL_SCHEMES


def mlflow_uri(value: str) -> str:
    """An MLflow tracking URI, the same from any folder (a resumed run may start elsewhere): a
    folder becomes an absolute file:// URI (a local file store), a SQLite file an absolute
    sqlite:////PATH; anything else with a scheme (http://host:5000, databricks) stays as is."""
    sqlite = re.match(r"^sqlite:///(?!/)(.+)$", value)
    if sqlite and sqlite.group(1) != ":memory:":
        return "sqlite:///" + os.path.abspath(os.path.expanduser(sqlite.group(1)))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", value) or value == "databricks":
        return value
    return "file://" + os.path.abspath(os.path.expanduser(value))


def wandb_logged_in() -> bool:
    """An API key in WANDB_API_KEY, or a `wandb login` in the netrc file (NETRC, ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE if set; else online with an API key, offline (files only) without one."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def wandb_root() -> str:
    """W&B's root folder, as W&B itself chooses it: WANDB_DIR, else here (files go to ROOT/wandb)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("WANDB_DIR") or "."))


@dataclass(frozen=True)
class Tracking:
    """Where a run's trials are tracked besides its own folder (and TensorBoard's files there)."""

    mlflow: Optional[str] = None      # MLflow tracking URI (see mlflow_uri); None: no MLflow
    wandb: Optional[str] = None       # W&B project; None: no W&B
    wandb_dir: Optional[str] = None   # W&B's root folder (None: wandb_root() at the start)

    def callbacks(self, run_name: str) -> list[Any]:
        """Ray Tune callbacks for the run `run_name` (its MLflow experiment)."""
        out = []
        if self.mlflow:
            out.append(_callback("MLflowCallback")(self.mlflow, experiment_name=run_name))
        if self.wandb:
            out.append(_callback("WandbCallback")(self.wandb, self.wandb_dir or wandb_root()))
        return out


# ------------------------------------------------------------------ what a trial logs

def _trial_config(trial: Any) -> dict[str, Any]:
    config = (trial.config or {}).get(TRIAL_KEY)
    return dict(config) if isinstance(config, dict) else {}


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's TrialConfig fields under their own names (no experiment: that is a tag)."""
    return {k: config[k] for k in FIELD_NAMES if k in config}


def trial_tags(config: dict[str, Any]) -> dict[str, str]:
    """A trial's figure point (experiment, network, width, model, method, init) and seed."""
    tags = {k: v for k, v in labels(config).items() if v is not None}
    if config.get("seed") is not None:
        tags["seed"] = config["seed"]
    return {k: str(v) for k, v in tags.items()}


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one report worth tracking: the trial's metrics and Ray's total time."""
    return {k: float(v) for k, v in result.items()
            if (k in METRICS or k in RAY_METRICS) and isinstance(v, (int, float))}


# ------------------------------------------------------------------ the callbacks

def _started(callback: Any) -> dict:
    """The trials a Ray Tune logger callback has started (trial -> its run or queue). Ray 2.60
    keeps them in private attributes, `_trial_runs` (MLflowLoggerCallback) and `_trial_queues`
    (WandbLoggerCallback): the one place this project reads Ray's private state, so that a
    trial that never started is not ended twice; setup.cfg caps Ray at the version tested."""
    return getattr(callback, "_trial_runs" if hasattr(callback, "_trial_runs") else "_trial_queues")


def _mlflow_callback() -> type:
    from ray.tune.logger.mlflow import MLflowLoggerCallback  # imports mlflow: only with --mlflow

    class MLflowCallback(MLflowLoggerCallback):
        """Ray Tune's MLflow logger with one run per trial named after it (our trial_name), the
        TrialConfig fields as params under their own names (Ray's would log the nested config as
        `trial/lr`), the figure point as tags, our metrics every epoch with the epoch as step,
        and a resumed trial logging on into its earlier run (found by its `trial_id` tag in the
        run's MLflow experiment), each epoch once."""

        def setup(self, *args: Any, **kwargs: Any) -> None:
            if (self.tracking_uri or "").startswith("file:"):
                # MLflow 3 refuses its file store unless asked for it, and a folder given to
                # --mlflow asks for it; the default store is a database, which needs no flag.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            super().setup(*args, **kwargs)
            # trial -> the highest step its MLflow run holds. A trial that goes back to its last
            # checkpoint (a resumed run, a retry) reports the epochs after it again: MLflow
            # keeps every value it is sent, so they would show up twice.
            self._logged: dict[Any, int] = {}

        def log_trial_start(self, trial: Any) -> None:
            if trial in _started(self):
                return
            config = _trial_config(trial)
            run_id, logged = self._earlier_run(trial.trial_id)
            if run_id is None:
                tags = {**self.tags, **trial_tags(config), "trial_id": trial.trial_id,
                        "trial_name": str(trial)}
                run_id = self.mlflow_util.start_run(run_name=str(trial), tags=tags).info.run_id
                # Only a new run: MLflow refuses a param logged again with another value, and a
                # resume under a newer TrialConfig must not stop the run for that.
                self.mlflow_util.log_params(run_id=run_id, params_to_log=trial_params(config))
            _started(self)[trial] = run_id
            self._logged[trial] = logged

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            if trial not in _started(self):
                self.log_trial_start(trial)
            step = int(result.get("epoch") or result.get("training_iteration") or iteration)
            if step <= self._logged.get(trial, 0):
                return  # MLflow has this epoch from before the trial went back to a checkpoint
            self.mlflow_util.log_metrics(run_id=_started(self)[trial],
                                         metrics_to_log=epoch_metrics(result), step=step)
            self._logged[trial] = step

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            if trial in _started(self):  # Ray's raises KeyError for a trial that never started
                super().log_trial_end(trial, failed=failed)
                # Ended: not one for on_experiment_end to mark KILLED. (A retry after an error
                # ends nothing: Ray Tune starts the same trial again, which skips what it had.)
                del _started(self)[trial]
                self._logged.pop(trial, None)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            # The trials still started were stopped by Ctrl-C (or SIGTERM), which Ray Tune does
            # without ending them in its callbacks: KILLED, until a resumed run takes them up.
            for trial in list(_started(self)):
                self.mlflow_util.end_run(run_id=_started(self).pop(trial), status="KILLED")
            super().on_experiment_end(trials, **info)

        def _earlier_run(self, trial_id: str) -> tuple[Optional[str], int]:
            """The MLflow run this trial logged into before (this run, resumed; Ray's logger
            keeps no state across a resume) and the highest step it holds; (None, 0) for a
            trial new to MLflow. Once per trial start, through MLflow's public client."""
            from mlflow.tracking import MlflowClient  # already imported by Ray's logger
            client = MlflowClient(tracking_uri=self.tracking_uri)
            runs = client.search_runs([self.mlflow_util.experiment_id],
                                      filter_string=f"tags.trial_id = '{trial_id}'", max_results=1)
            if not runs:
                return None, 0
            run_id = runs[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            steps = [int(m.step) for m in client.get_metric_history(run_id, STEP_METRIC)]
            return run_id, max(steps, default=0)

    return MLflowCallback


def _wandb_callback() -> type:
    from ray.tune.logger.wandb import WandbLoggerCallback  # imports wandb: only with --wandb

    class WandbCallback(WandbLoggerCallback):
        """Ray Tune's W&B logger with one run per trial named after it and grouped by its
        experiment, the TrialConfig fields as the run's config, the figure point as tags, its
        id wandb_run_id (a resumed trial logs on into it), and offline (files under
        ROOT/wandb, uploaded later with `wandb sync`) without an API key."""

        def __init__(self, project: str, root: str) -> None:
            # Keywords Ray's logger does not know go to wandb.init (and override its own): one
            # run per logging actor (a process of its own); a resumed trial continues the W&B
            # run of its id (online; offline, `wandb sync` joins the folders of one id); W&B's
            # summary of every run left out of our output.
            super().__init__(project=project, dir=root, reinit="finish_previous", resume="allow",
                             settings={"quiet": True})

        def setup(self, *args: Any, **kwargs: Any) -> None:
            mode = wandb_mode()
            if mode in ("offline", "disabled"):
                os.environ["WANDB_MODE"] = mode  # Ray's logger asks for an API key otherwise
            self.kwargs["mode"] = mode           # the logging actors may not share our environment
            os.makedirs(self.kwargs["dir"], exist_ok=True)
            super().setup(*args, **kwargs)

        def log_trial_start(self, trial: Any) -> None:
            # Ray's logger passes its keywords to wandb.init after its own: per trial, ours win.
            config = _trial_config(trial)
            tags = trial_tags(config)
            base = self.kwargs
            self.kwargs = {**base, "id": wandb_run_id(trial.experiment_dir_name, trial.trial_id),
                           "group": config.get("experiment") or None,
                           "config": {**tags, **trial_params(config)},
                           "tags": [f"{k}:{tags[k]}"[:64] for k in ("model", "method", "init")
                                    if k in tags]}
            try:
                super().log_trial_start(trial)
            finally:
                self.kwargs = base

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            # Ray's raises KeyError for a trial that never started (no logging actor, no queue).
            if trial in _started(self):
                super().log_trial_end(trial, failed=failed)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            # Ctrl-C (or SIGTERM) stops the trials without ending them in Ray Tune's callbacks:
            # their logging actors would wait for an end that never comes, and Ray's logger for
            # them, up to its upload timeout (30 minutes), before the run could stop. A second
            # end, to an actor still finishing, is never read.
            for trial in list(_started(self)):
                self.log_trial_end(trial, failed=True)
            super().on_experiment_end(trials, **info)

    return WandbCallback


_BUILD = {"MLflowCallback": _mlflow_callback, "WandbCallback": _wandb_callback}


@functools.cache
def _callback(name: str) -> type:
    """The callback class `name`, built once: subclassing Ray's logger imports mlflow or wandb
    (seconds each), so it happens only for a run that asked for it."""
    cls = _BUILD[name]()
    cls.__module__, cls.__qualname__ = __name__, name
    return cls


def __getattr__(name: str) -> Any:
    """`tracking.MLflowCallback` and `.WandbCallback`, built on first use (PEP 562), also when
    pickle looks them up by name to restore a run's callbacks."""
    if name in _BUILD:
        return _callback(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ after the run

def wandb_run_id(run_name: str, trial_id: str) -> str:
    """W&B's run id for a trial: RUNKEY_TRIALID, RUNKEY 8 hex digits of the run's folder name.
    The same when the run is resumed (Ray Tune restores its trial ids), so a resumed trial logs
    on into its W&B run. The trial id alone is not unique in a W&B project: a grid run's ids are
    5 hex digits of the clock (they come round every 7 minutes) and a counter, and with
    resume="allow" a trial of another run with the same id would log into that run."""
    return hashlib.sha1(run_name.encode()).hexdigest()[:8] + "_" + trial_id


def wandb_offline_runs(run_path: str, root: Optional[str] = None) -> list[str]:
    """The offline W&B run folders (ROOT/wandb/offline-run-TIME-ID) of the run at `run_path`'s
    trials, ID wandb_run_id (or the trial id: runs started before it); a resumed trial has one
    folder per start, all with its id."""
    folder = os.path.join(root or wandb_root(), "wandb")
    if not os.path.isdir(folder):
        return []
    try:
        fs, where = open_storage(run_path)
        name = posixpath.basename(where.rstrip("/"))
        ids = {i for t in read_run(run_path, require=False).started
               for i in (t.trial_id, wandb_run_id(name, t.trial_id))}
    except Exception:  # noqa: BLE001 - a note after the run, never a reason to fail it
        return []
    return sorted(p for p in glob.glob(os.path.join(folder, "offline-run-*"))
                  if os.path.isdir(p) and p.rsplit("-", 1)[-1] in ids)


def wandb_sync_command(folders: list[str]) -> str:
    """`wandb sync FOLDER ...`, shortened to one glob per run when there are many."""
    if len(folders) <= 3:
        return "wandb sync " + " ".join(shlex.quote(f) for f in folders)
    # The ids of one run's trials share its key (wandb_run_id: RUNKEY_TRIALID; runs started
    # before it: a grid's PREFIX_00000, PREFIX_00001, ...); an id without one is listed as is.
    out = set()
    for f in folders:
        key, sep, _ = os.path.basename(f).rsplit("-", 1)[-1].partition("_")
        out.add(shlex.quote(os.path.dirname(f)) + f"/offline-run-*-{key}_*" if sep
                else shlex.quote(f))
    return "wandb sync " + " ".join(sorted(out))
