"""Hyperparameter search: figure points (an experiment times one combination of its grid axes
other than the seed), the Ray Tune searcher and scheduler that give every point its own HyperOpt
TPE and ASHA while all points share the cluster in one run, and the best-configuration table
(Parquet + JSON) that `--from-search` reproduces. Search spaces are written with the Ray-free
domains of `iterand_tune.search_space`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from ray import cloudpickle
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.hyperopt import HyperOptSearch

from .config import ExperimentError, TrialConfig
from .experiments import Experiment
from .search_space import Domain, cast
from .storage import TRIAL_KEY, join_path, open_storage
from .terminal import format_table
from .vocabulary import VALIDATION_METRIC

METRIC, MODE, TIME_ATTR = VALIDATION_METRIC, "max", "epoch"  # what TPE and ASHA optimise, ASHA's clock
POINT_KEY = "point"                 # top-level key of a search trial's config: its figure point
BEST_CONFIGS = "best_configs"       # best_configs.parquet / best_configs.json in the run's folder
REPRODUCE_SEEDS = (1, 2, 3)
DEFAULT_NUM_SAMPLES = 20            # trials per figure point
DEFAULT_REDUCTION_FACTOR = 3


# ------------------------------------------------------------------ figure points

@dataclass(frozen=True)
class Point:
    """One figure point of a search: `experiment` holds every fixed value (first seed, no test
    evaluation) and `space` the searched options."""
    name: str
    experiment: Experiment
    space: Mapping[str, Domain]

    @property
    def epochs(self) -> int:
        return int(self.experiment.config.get("epochs", TrialConfig.epochs))

    def trial(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The full trial dict (TrialConfig fields + experiment) for sampled values."""
        values = {k: self.space[k].clip(cast(k, v)) if k in self.space else v
                  for k, v in sampled.items()}
        cfg = TrialConfig.from_dict({**self.experiment.config, **values})
        return {"experiment": self.experiment.name, **cfg.to_dict()}


def points(experiments: Sequence[Experiment]) -> list[Point]:
    """The figure points of the experiments that have a search space, in file order."""
    out = []
    for e in experiments:
        if not e.search:
            continue
        axes = {k: v for k, v in e.grid.items() if k != "seed"}
        seed = e.grid["seed"][0] if "seed" in e.grid else e.config.get("seed", TrialConfig.seed)
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            label = ",".join(f"{k}={v}" for k, v in values.items())
            name = f"{e.name}[{label}]" if label else e.name
            fixed = e.replace(config={**e.config, **values, "seed": seed, "evaluate_test": False},
                              grid={}, search={})
            out.append(Point(name, fixed, dict(e.search)))
    return out


def point_seed(base_seed: int, point: str) -> int:
    """TPE's random_state_seed for a point: fixed by the base seed and the point's name only,
    so that adding or reordering points does not change another point's proposals."""
    digest = hashlib.sha256(f"{base_seed}:{point}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def default_grace_period(epochs: int) -> int:
    """ASHA's first rung without --grace-period: a tenth of the training (at least one epoch)."""
    return max(1, epochs // 10)


def n_initial_points(num_samples: int) -> int:
    """Random trials before TPE models a point: hyperopt's 20 are most of a small budget, so a
    quarter of the budget (at least 2, at most 20)."""
    return max(2, min(20, num_samples // 4))


# ------------------------------------------------------------------ saved state

def _saved(obj: Any) -> bytes:
    """`obj`'s state as bytes, through its public `save(path)` (Ray's searchers and schedulers
    save to a file; Ray Tune stores ours, bytes included, with every experiment checkpoint)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "state")
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()


def _restore(obj: Any, data: bytes) -> None:
    """The inverse of `_saved`, through `obj`'s public `restore(path)`."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "state")
        with open(path, "wb") as f:
            f.write(data)
        obj.restore(path)


# ------------------------------------------------------------------ the searcher

class PointSearcher(Searcher):
    """One HyperOptSearch (TPE) per figure point. Trials are handed out round-robin over the
    points that have budget left; results and completions go to the owning point's TPE only.
    FINISHED once every point has issued its `num_samples` trials. The PointScheduler's state
    is saved with ours: Ray Tune saves a searcher's state with every experiment checkpoint but
    never a scheduler's."""

    def __init__(self, pts: Sequence[Point], num_samples: int, seed: int = 0,
                 scheduler: Optional["PointScheduler"] = None) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.points = {p.name: p for p in pts}
        self.budget = {p.name: num_samples for p in pts}
        self.issued = {p.name: 0 for p in pts}
        self.owner: dict[str, str] = {}     # trial id -> point
        self.cursor = 0
        self.point_scheduler = scheduler
        self.tpe = {}
        for p in pts:
            space = HyperOptSearch.convert_search_space({k: d.to_tune() for k, d in p.space.items()})
            self.tpe[p.name] = HyperOptSearch(
                space=space, metric=METRIC, mode=MODE, random_state_seed=point_seed(seed, p.name),
                n_initial_points=n_initial_points(num_samples))

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict,
                              **spec: Any) -> bool:
        return metric in (None, METRIC) and mode in (None, MODE) and not config

    def suggest(self, trial_id: str) -> Any:
        names = list(self.points)
        for i in range(len(names)):
            name = names[(self.cursor + i) % len(names)]
            if self.issued[name] >= self.budget[name]:
                continue
            sampled = self.tpe[name].suggest(trial_id)
            if sampled is None:  # defensive: HyperOptSearch always proposes
                continue
            self.cursor = (self.cursor + i + 1) % len(names)
            self.issued[name] += 1
            self.owner[trial_id] = name
            return {TRIAL_KEY: self.points[name].trial(sampled), POINT_KEY: name}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.tpe[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        if trial_id not in self.owner:
            return
        if result is not None and METRIC not in result:
            error = True  # never reported an epoch: nothing for TPE to learn
        self.tpe[self.owner[trial_id]].on_trial_complete(trial_id, result, error=error)

    def get_state(self) -> dict[str, Any]:
        return {"budget": dict(self.budget), "issued": dict(self.issued),
                "owner": dict(self.owner), "cursor": self.cursor,
                "tpe": {n: _saved(s) for n, s in self.tpe.items()},
                "scheduler": (self.point_scheduler.get_state()
                              if self.point_scheduler is not None else None)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.budget, self.issued = dict(state["budget"]), dict(state["issued"])
        self.owner, self.cursor = dict(state["owner"]), state["cursor"]
        for n, data in state["tpe"].items():
            _restore(self.tpe[n], data)
        if self.point_scheduler is not None and state.get("scheduler") is not None:
            self.point_scheduler.set_state(state["scheduler"])

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.get_state(), f)  # Ray's own format for a searcher's state

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(cloudpickle.load(f))


# ------------------------------------------------------------------ the scheduler

class PointScheduler(FIFOScheduler):
    """One ASHAScheduler per figure point (time_attr epoch, metric val_acc, max_t = the point's
    epochs): every hook goes to the owning point's ASHA, so a trial is only ever ranked against
    trials of its own point. Pending trials start FIFO."""

    def __init__(self, pts: Sequence[Point], grace_period: Optional[int] = None,
                 reduction_factor: float = DEFAULT_REDUCTION_FACTOR) -> None:
        super().__init__()
        self.asha: dict[str, ASHAScheduler] = {}
        self.max_t = {p.name: p.epochs for p in pts}
        for p in pts:
            grace = min(grace_period or default_grace_period(p.epochs), p.epochs)
            self.asha[p.name] = ASHAScheduler(
                time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=p.epochs,
                grace_period=grace, reduction_factor=reduction_factor)
        self.members: dict[str, set] = {p.name: set() for p in pts}  # trial ids each ASHA knows
        self.stopped: dict[str, list] = {p.name: [] for p in pts}   # (trial id, epoch) cut short

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec: Any) -> bool:
        return metric in (None, METRIC) and mode in (None, MODE)

    def _add(self, tune_controller: Any, trial: Any) -> ASHAScheduler:
        point = trial.config[POINT_KEY]
        if trial.trial_id not in self.members[point]:  # also a trial restored without saved state
            self.asha[point].on_trial_add(tune_controller, trial)
            self.members[point].add(trial.trial_id)
        return self.asha[point]

    def _leave(self, trial: Any) -> Optional[ASHAScheduler]:
        """The trial's ASHA if it knows the trial, which it then forgets."""
        point = trial.config[POINT_KEY]
        if trial.trial_id not in self.members[point]:
            return None
        self.members[point].discard(trial.trial_id)
        return self.asha[point]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        asha = self._leave(trial)
        if asha is not None:
            asha.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = self._add(tune_controller, trial).on_trial_result(tune_controller, trial, result)
        point, epoch = trial.config[POINT_KEY], result.get(TIME_ATTR, 0)
        if decision == TrialScheduler.STOP and epoch < self.max_t[point]:
            self.stopped[point].append((trial.trial_id, epoch))
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        asha = self._leave(trial)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        asha = self._leave(trial)
        if asha is not None:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "per-point ASHA: " + ", ".join(f"{n}: {len(s)} stopped" for n, s in self.stopped.items())

    def get_state(self) -> dict[str, Any]:
        return {"asha": {n: _saved(a) for n, a in self.asha.items()},
                "members": {n: sorted(m) for n, m in self.members.items()},
                "stopped": {n: list(s) for n, s in self.stopped.items()}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for n, data in state["asha"].items():
            _restore(self.asha[n], data)
        self.members = {n: set(m) for n, m in state["members"].items()}
        self.stopped = {n: list(s) for n, s in state["stopped"].items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)  # the format of Ray's own schedulers' save()

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


# ------------------------------------------------------------------ one search run

class SearchRun:
    """What `tune.run` needs for a search: the points as experiments, the searcher, the
    scheduler, the total number of trials, and how to summarise the results."""

    def __init__(self, pts: Sequence[Point], num_samples: int = DEFAULT_NUM_SAMPLES,
                 grace_period: Optional[int] = None,
                 reduction_factor: float = DEFAULT_REDUCTION_FACTOR, seed: int = 0,
                 build: bool = True) -> None:
        self.points = list(pts)
        self.num_samples = num_samples * len(self.points)
        self.scheduler = self.searcher = None
        if build:  # a resumed run uses the searcher and scheduler Ray Tune saved
            self.scheduler = PointScheduler(self.points, grace_period, reduction_factor)
            self.searcher = PointSearcher(self.points, num_samples, seed, self.scheduler)

    @property
    def experiments(self) -> list[Experiment]:
        return [p.experiment for p in self.points]

    def summarize(self, grid: Any, path: str, seconds: float) -> "SearchSummary":
        trials: dict[str, list] = {p.name: [] for p in self.points}
        errored = 0
        for result in grid:
            config = result.config or {}
            if POINT_KEY not in config:
                errored += 1
                continue
            if result.error is not None:
                errored += 1
            trials.setdefault(config[POINT_KEY], []).append(
                (config[TRIAL_KEY], result.metrics or {}, str(getattr(result, "path", "") or "")))
        rows = [row for p in self.points if (row := best_row(p, trials[p.name])) is not None]
        missing = [p.name for p in self.points if not any(r["point"] == p.name for r in rows)]
        return SearchSummary(path, rows, missing, errored, seconds)


def best_row(point: Point, trials: Sequence[tuple[dict, dict, str]]) -> Optional[dict[str, Any]]:
    """The point's best trial: highest `best_val_acc` (its best validation accuracy over the
    epochs it ran, stopped early or not); ties go to the trial that trained longer. A trial
    that diverged (training loss not finite) is never the best: its configuration is unstable."""
    scored = [(m["best_val_acc"], m.get("epoch", 0), -i, t, m) for i, (t, m, _) in enumerate(trials)
              if m.get("best_val_acc") is not None and not m.get("diverged")]
    if not scored:
        return None
    acc, epochs, _, trial, metrics = max(scored, key=lambda s: s[:3])
    config = {k: v for k, v in trial.items() if k != "experiment"}
    config["evaluate_test"] = True  # the reproduction reports test accuracy
    cfg = TrialConfig.from_dict(config)
    return {
        "point": point.name,
        "experiment": trial["experiment"],
        "model": cfg.model,
        "method": cfg.method,
        "searched": {k: config[k] for k in point.space},
        "best_val_acc": float(acc),
        "best_epoch": int(metrics.get("best_epoch") or 0),
        "epochs_trained": int(epochs),
        "max_epochs": point.epochs,
        "trial_id": metrics.get("trial_id"),
        "trials": len(trials),
        "epochs_spent": int(sum(m.get("epoch", 0) or 0 for _, m, _ in trials)),
        "config": cfg.to_dict(),
    }


@dataclass
class SearchSummary:
    path: str
    rows: list[dict[str, Any]]
    missing: list[str]      # points without a single reported epoch
    errored: int
    seconds: float
    interrupted: Any = None  # iterand_tune.tune.Interruption after Ctrl-C / SIGTERM

    @property
    def ok(self) -> bool:
        return not self.missing and not self.interrupted

    def table(self) -> str:
        head = ("point", "method", "trials", "epochs", "best val %", "at epoch", "configuration")
        body = [(r["point"], r["method"], str(r["trials"]), str(r["epochs_spent"]),
                 f"{r['best_val_acc']:.2f}", f"{r['best_epoch']}/{r['max_epochs']}",
                 ", ".join(f"{k}={_fmt(v)}" for k, v in r["searched"].items()))
                for r in self.rows]
        return format_table(head, body)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------ the table on storage

def write_best_configs(rows: Sequence[Mapping[str, Any]], run_path: str) -> list[str]:
    """best_configs.json (a list of rows, `config` a mapping) and best_configs.parquet (one
    column per searched option, `searched` and `config` as JSON text) in the run's folder."""
    fs, folder = open_storage(run_path)
    fs.create_dir(folder, recursive=True)
    json_path, parquet_path = join_path(folder, BEST_CONFIGS + ".json"), join_path(folder, BEST_CONFIGS + ".parquet")
    with fs.open_output_stream(json_path) as f:
        f.write(json.dumps(list(rows), indent=1).encode())
    keys = list(dict.fromkeys(k for r in rows for k in r["searched"]))
    records = []
    for r in rows:
        rec = {k: v for k, v in r.items() if k not in ("searched", "config")}
        rec.update({k: r["searched"].get(k) for k in keys})
        rec["searched"], rec["config"] = json.dumps(r["searched"]), json.dumps(r["config"])
        records.append(rec)
    pq.write_table(pa.Table.from_pandas(pd.DataFrame.from_records(records), preserve_index=False),
                   parquet_path, filesystem=fs)
    return [join_path(run_path, BEST_CONFIGS + ".parquet"), join_path(run_path, BEST_CONFIGS + ".json")]


def read_best_configs(run_path: str) -> list[dict[str, Any]]:
    """The rows written by `write_best_configs`; ExperimentError when there are none."""
    where = join_path(run_path, BEST_CONFIGS + ".json")
    try:
        fs, path = open_storage(where)
        with fs.open_input_stream(path) as f:
            rows = json.loads(f.read().decode())
    except (FileNotFoundError, OSError, pa.ArrowException, ValueError):
        raise ExperimentError(f"{run_path} holds no readable {BEST_CONFIGS}.json: give the folder "
                              "of a finished --search run (its `results:` line)") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "config" in r for r in rows):
        raise ExperimentError(f"{where} is not a table of best configurations")
    return rows


def reproduction(rows: Sequence[Mapping[str, Any]],
                 seeds: Sequence[int] = REPRODUCE_SEEDS) -> list[Experiment]:
    """One experiment per best configuration, its seeds as the grid (FIFO, test accuracy)."""
    out = []
    for r in rows:
        config = {k: v for k, v in r["config"].items() if k != "seed"}
        if isinstance(config.get("lr_milestones"), list):
            config["lr_milestones"] = tuple(config["lr_milestones"])
        config["evaluate_test"] = True
        out.append(Experiment(name=r["experiment"], config=config, grid={"seed": list(seeds)}))
    return out
