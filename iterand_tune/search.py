"""Hyperparameter search: search-space domains for experiment files, figure points (an experiment
times one combination of its grid axes other than the seed), the Ray Tune searcher and scheduler
that give every point its own HyperOpt TPE and ASHA while all points share the cluster in one
run, and the best-configuration table (Parquet + JSON) that `--from-search` reproduces.
Ray is imported only when a search is built, so experiment files can use the domains freely.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import pickle
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .config import FIELD_NAMES, ConfigError, TrialConfig, field_type
from .experiments import Experiment, ExperimentError
from .runner import join_path, open_storage

METRIC, MODE, TIME_ATTR = "val_acc", "max", "epoch"  # what TPE and ASHA optimise, and ASHA's clock
POINT_KEY = "point"                 # top-level key of a search trial's config: its figure point
BEST_CONFIGS = "best_configs"       # best_configs.parquet / best_configs.json in the run's folder
REPRODUCE_SEEDS = (1, 2, 3)
DEFAULT_NUM_SAMPLES = 20            # trials per figure point
DEFAULT_REDUCTION_FACTOR = 3


# ------------------------------------------------------------------ search-space domains

class Domain:
    """One dimension of a search space. `to_tune()` builds Ray Tune's domain (Ray is imported
    then, not when an experiment file is loaded); `examples()` are values that must all make a
    valid TrialConfig (checked when the experiment is defined)."""

    def to_tune(self) -> Any:
        raise NotImplementedError

    def examples(self) -> list:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def clip(self, value: Any) -> Any:
        return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _Range(Domain):
    """A float in [low, high]; subclasses say how it is drawn."""
    low: float
    high: float

    def examples(self) -> list:
        return [self.low, self.high]

    def clip(self, value: Any) -> Any:
        return min(max(value, self.low), self.high)


@dataclass(frozen=True)
class LogUniform(_Range):
    """A float drawn log-uniformly from [low, high] (learning rates, weight decay)."""

    def __post_init__(self) -> None:
        if not (_number(self.low) and _number(self.high) and 0 < self.low < self.high):
            raise ExperimentError(f"LogUniform({self.low!r}, {self.high!r}) needs 0 < low < high")

    def to_tune(self) -> Any:
        from ray import tune
        return tune.loguniform(self.low, self.high)

    def describe(self) -> str:
        return f"log-uniform({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class Uniform(_Range):
    """A float drawn uniformly from [low, high] (sparsity, re-randomisation rate)."""

    def __post_init__(self) -> None:
        if not (_number(self.low) and _number(self.high) and self.low < self.high):
            raise ExperimentError(f"Uniform({self.low!r}, {self.high!r}) needs low < high")

    def to_tune(self) -> Any:
        from ray import tune
        return tune.uniform(self.low, self.high)

    def describe(self) -> str:
        return f"uniform({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class QUniform(Domain):
    """An integer from low, low + q, ..., high, uniformly (K_per = rerand_freq)."""
    low: int
    high: int
    q: int = 1

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.q))
        if not (ints and self.q >= 1 and self.low < self.high and (self.high - self.low) % self.q == 0):
            raise ExperimentError(f"QUniform({self.low!r}, {self.high!r}, q={self.q!r}) needs "
                                  "integers low < high with high - low a multiple of q >= 1")

    def to_tune(self) -> Any:
        from ray import tune
        return tune.qrandint(self.low, self.high, self.q)

    def examples(self) -> list:
        return [self.low, self.high]

    def describe(self) -> str:
        return f"integers {self.low}..{self.high}" + (f" step {self.q}" if self.q > 1 else "")

    def clip(self, value: Any) -> Any:
        value = self.low + self.q * round((value - self.low) / self.q)
        return int(min(max(value, self.low), self.high))


@dataclass(frozen=True)
class Choice(Domain):
    """One of a few values (a discrete candidate set)."""
    values: tuple

    def __post_init__(self) -> None:
        values = tuple(self.values) if isinstance(self.values, (list, tuple)) else None
        if not values:
            raise ExperimentError(f"Choice({self.values!r}) needs a non-empty list of values")
        object.__setattr__(self, "values", values)

    def to_tune(self) -> Any:
        from ray import tune
        return tune.choice(list(self.values))

    def examples(self) -> list:
        return list(self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(f"{v:g}" if _number(v) else repr(v) for v in self.values)


def cast(key: str, value: Any) -> Any:
    """A sampled value in the TrialConfig field's type (HyperOpt hands out floats for integers)."""
    base, _ = field_type(key)
    if base is int and _number(value):
        return int(round(value))
    if base is float and _number(value):
        return float(value)
    return value


def check_space(name: str, config: Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
                space: Mapping[str, Any]) -> None:
    """An experiment's search space: keys are TrialConfig options that are not grid axes, values
    are Domains whose every example makes a valid trial. Raises ExperimentError."""
    base = {**config, **{k: v[0] for k, v in grid.items()}}
    for key, domain in space.items():
        if key not in FIELD_NAMES:
            raise ExperimentError(f"{name}: search space names unknown TrialConfig option '{key}'")
        if key in grid:
            raise ExperimentError(f"{name}: '{key}' is a grid axis; it cannot also be searched "
                                  "(grid axes define the figure points)")
        if key == "seed":
            raise ExperimentError(f"{name}: the seed is not searched (a search uses the first seed)")
        if not isinstance(domain, Domain):
            raise ExperimentError(f"{name}: search['{key}'] = {domain!r} must be a domain of "
                                  "iterand_tune.search (LogUniform, Uniform, QUniform, Choice)")
        for value in domain.examples():
            try:
                TrialConfig.from_dict({**base, key: cast(key, value)})
            except ConfigError as err:
                raise ExperimentError(f"{name}: search['{key}'] allows {value!r}, but {err}") from None


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


# ------------------------------------------------------------------ the searcher

def _searcher_base() -> type:
    from ray.tune.search import Searcher
    return Searcher


def _scheduler_base() -> type:
    from ray.tune.schedulers import FIFOScheduler
    return FIFOScheduler


def _hyperopt_state(search: Any) -> dict[str, Any]:
    state = search.__dict__.copy()   # what HyperOptSearch.save writes, kept in memory
    state["__rstate"] = search.rstate.get_state()
    return state


def _set_hyperopt_state(search: Any, state: Mapping[str, Any]) -> None:
    state = dict(state)
    rstate = state.pop("__rstate")
    search.__dict__.update(state)
    search.rstate.set_state(rstate)


def make_searcher(pts: Sequence[Point], num_samples: int, seed: int = 0,
                  scheduler: Any = None) -> Any:
    """A PointSearcher (the class is built on first use so that this module does not import Ray)."""
    return _point_searcher_class()(pts, num_samples, seed, scheduler)


_CLASSES: dict[str, type] = {}


def _point_searcher_class() -> type:
    if "searcher" in _CLASSES:
        return _CLASSES["searcher"]
    from ray.tune.search.hyperopt import HyperOptSearch

    Searcher = _searcher_base()

    class PointSearcher(Searcher):
        """One HyperOptSearch (TPE) per figure point. Trials are handed out round-robin over the
        points that have budget left; results and completions go to the owning point's TPE
        only. FINISHED once every point has issued its `num_samples` trials."""

        def __init__(self, pts: Sequence[Point], num_samples: int, seed: int = 0,
                     scheduler: Any = None) -> None:
            super().__init__(metric=METRIC, mode=MODE)
            self.points = {p.name: p for p in pts}
            self.budget = {p.name: num_samples for p in pts}
            self.issued = {p.name: 0 for p in pts}
            self.owner: dict[str, str] = {}     # trial id -> point
            self.cursor = 0
            # The scheduler's state is saved with ours: Ray Tune saves a searcher's state with
            # every experiment checkpoint but never a scheduler's.
            self.point_scheduler = scheduler
            self.tpe = {}
            for p in pts:
                space = HyperOptSearch.convert_search_space({k: d.to_tune() for k, d in p.space.items()})
                self.tpe[p.name] = HyperOptSearch(
                    space=space, metric=METRIC, mode=MODE,
                    random_state_seed=point_seed(seed, p.name),
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
                from .runner import TRIAL_KEY
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
                    "tpe": {n: _hyperopt_state(s) for n, s in self.tpe.items()},
                    "scheduler": (self.point_scheduler.get_state()
                                  if self.point_scheduler is not None else None)}

        def set_state(self, state: Mapping[str, Any]) -> None:
            self.budget, self.issued = dict(state["budget"]), dict(state["issued"])
            self.owner, self.cursor = dict(state["owner"]), state["cursor"]
            for n, s in state["tpe"].items():
                _set_hyperopt_state(self.tpe[n], s)
            if self.point_scheduler is not None and state.get("scheduler") is not None:
                self.point_scheduler.set_state(state["scheduler"])

        def save(self, checkpoint_path: str) -> None:
            from ray import cloudpickle
            with open(checkpoint_path, "wb") as f:
                cloudpickle.dump(self.get_state(), f)

        def restore(self, checkpoint_path: str) -> None:
            from ray import cloudpickle
            with open(checkpoint_path, "rb") as f:
                self.set_state(cloudpickle.load(f))

    PointSearcher.__module__, PointSearcher.__qualname__ = __name__, "PointSearcher"
    _CLASSES["searcher"] = PointSearcher
    globals()["PointSearcher"] = PointSearcher  # picklable by reference
    return PointSearcher


# ------------------------------------------------------------------ the scheduler

def make_scheduler(pts: Sequence[Point], grace_period: Optional[int] = None,
                   reduction_factor: float = DEFAULT_REDUCTION_FACTOR) -> Any:
    return _point_scheduler_class()(pts, grace_period, reduction_factor)


def _point_scheduler_class() -> type:
    if "scheduler" in _CLASSES:
        return _CLASSES["scheduler"]
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    FIFOScheduler = _scheduler_base()

    class PointScheduler(FIFOScheduler):
        """One ASHAScheduler per figure point (time_attr epoch, metric val_acc, max_t = the
        point's epochs): every hook goes to the owning point's ASHA, so a trial is only ever
        ranked against trials of its own point. Pending trials start FIFO."""

        def __init__(self, pts: Sequence[Point], grace_period: Optional[int] = None,
                     reduction_factor: float = DEFAULT_REDUCTION_FACTOR) -> None:
            super().__init__()
            self._metric, self._mode = METRIC, MODE
            self.asha = {}
            for p in pts:
                grace = min(grace_period or default_grace_period(p.epochs), p.epochs)
                self.asha[p.name] = ASHAScheduler(
                    time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=p.epochs,
                    grace_period=grace, reduction_factor=reduction_factor)
            self.stopped: dict[str, list] = {p.name: [] for p in pts}  # (trial id, epoch) cut short

        def _of(self, trial: Any) -> Any:
            return self.asha[trial.config[POINT_KEY]]

        def set_search_properties(self, metric: Optional[str], mode: Optional[str],
                                  **spec: Any) -> bool:
            return metric in (None, METRIC) and mode in (None, MODE)

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
            self._of(trial).on_trial_error(tune_controller, trial)

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            asha = self._of(trial)
            if trial.trial_id not in asha._trial_info:  # e.g. restored without saved state
                asha.on_trial_add(tune_controller, trial)
            decision = asha.on_trial_result(tune_controller, trial, result)
            epoch = result.get(TIME_ATTR, 0)
            if decision == TrialScheduler.STOP and epoch < asha._max_t:
                self.stopped[trial.config[POINT_KEY]].append((trial.trial_id, epoch))
            return decision

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            asha = self._of(trial)
            if trial.trial_id in asha._trial_info:
                asha.on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
            asha = self._of(trial)
            if trial.trial_id in asha._trial_info:
                asha.on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return "per-point ASHA: " + ", ".join(
                f"{n}: {len(s)} stopped" for n, s in self.stopped.items())

        def get_state(self) -> dict[str, Any]:
            # One pickle for every ASHA keeps each one's trial -> bracket references intact.
            return {"asha": pickle.dumps({n: a.__dict__ for n, a in self.asha.items()}),
                    "stopped": {n: list(s) for n, s in self.stopped.items()}}

        def set_state(self, state: Mapping[str, Any]) -> None:
            for n, d in pickle.loads(state["asha"]).items():
                self.asha[n].__dict__.update(d)
            self.stopped = {n: list(s) for n, s in state["stopped"].items()}

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:
                pickle.dump(self.get_state(), f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                self.set_state(pickle.load(f))

    PointScheduler.__module__, PointScheduler.__qualname__ = __name__, "PointScheduler"
    _CLASSES["scheduler"] = PointScheduler
    globals()["PointScheduler"] = PointScheduler
    return PointScheduler


def __getattr__(name: str) -> Any:  # `from iterand_tune.search import PointSearcher` imports Ray
    if name == "PointSearcher":
        return _point_searcher_class()
    if name == "PointScheduler":
        return _point_scheduler_class()
    raise AttributeError(name)


# ------------------------------------------------------------------ one search run

class SearchRun:
    """What `runner.run` needs for a search: the points as experiments, the searcher, the
    scheduler, the total number of trials, and how to summarise the results."""

    def __init__(self, pts: Sequence[Point], num_samples: int = DEFAULT_NUM_SAMPLES,
                 grace_period: Optional[int] = None,
                 reduction_factor: float = DEFAULT_REDUCTION_FACTOR, seed: int = 0,
                 build: bool = True) -> None:
        self.points = list(pts)
        self.num_samples = num_samples * len(self.points)
        self.scheduler = self.searcher = None
        if build:  # a resumed run uses the searcher and scheduler Ray Tune saved
            self.scheduler = make_scheduler(self.points, grace_period, reduction_factor)
            self.searcher = make_searcher(self.points, num_samples, seed, self.scheduler)

    @property
    def experiments(self) -> list[Experiment]:
        return [p.experiment for p in self.points]

    def summarize(self, grid: Any, path: str, seconds: float) -> "SearchSummary":
        from .runner import TRIAL_KEY

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
    epochs it ran, stopped early or not); ties go to the trial that trained longer."""
    scored = [(m["best_val_acc"], m.get("epoch", 0), -i, t, m) for i, (t, m, _) in enumerate(trials)
              if m.get("best_val_acc") is not None]
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

    @property
    def ok(self) -> bool:
        return not self.missing

    def table(self) -> str:
        from .runner import format_table

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
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    import pyarrow as pa

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
