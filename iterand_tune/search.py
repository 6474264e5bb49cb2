"""Hyperparameter search, run: the searcher and scheduler that give every figure point (planned,
Ray-free, in `iterand_tune.search_plan`) its own HyperOpt TPE and ASHA while all points share the
cluster in one run (both rebuilt from the run's trials on resume), and the best configurations
(Parquet + JSON) that `--from-search` reproduces. Search spaces are written with the Ray-free
domains of `iterand_tune.search_space`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.hyperopt import HyperOptSearch

from .experiments import Experiment
from .ray_assumptions import ENDED, ERROR, trial_storage
from .runs import ORDER_KEY, POINT_KEY, SAMPLE_KEY, SEEN_KEY, Run, read_reports
from .search_plan import (DEFAULT_NUM_SAMPLES, DEFAULT_REDUCTION_FACTOR, Point,  # noqa: F401
                          best_rows, default_grace_period, points)
from .storage import TRIAL_KEY, join_path, open_storage
from .terminal import format_table
from .tune.runner import grid_marker
from .tune.searchers import OwnedSearcher
from .vocabulary import VALIDATION_METRIC

METRIC, MODE, TIME_ATTR = VALIDATION_METRIC, "max", "epoch"  # what TPE and ASHA optimise, ASHA's clock
BEST_CONFIGS = "best_configs"       # best_configs.parquet / best_configs.json in the run's folder


# ------------------------------------------------------------------ each point's TPE

def point_seed(base_seed: int, point: str) -> int:
    """TPE's random_state_seed for a point: fixed by the base seed and the point's name only,
    so that adding or reordering points does not change another point's proposals."""
    digest = hashlib.sha256(f"{base_seed}:{point}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def n_initial_points(num_samples: int) -> int:
    """Random trials before TPE models a point: hyperopt's 20 are most of a small budget, so a
    quarter of the budget (at least 2, at most 20)."""
    return max(2, min(20, num_samples // 4))


# ------------------------------------------------------------------ the searcher

class PointSearcher(OwnedSearcher):
    """One HyperOpt TPE per figure point. Samples are handed out round-robin over the points that
    have budget left; results and completions go to the owning point's TPE only. Each sample's
    config records its point, its number there, its place among all samples and the samples of
    its point whose results its TPE had seen (`seen`), so that the TPEs can be rebuilt from the
    trials alone: after a resume each point's TPE is made anew from its seed and replayed, sample
    by sample, with exactly the results it had seen, and proposes what it would have proposed.
    FINISHED once every point has its `num_samples` samples and all of them ended."""

    def __init__(self, pts: Sequence[Point], num_samples: int, seed: int = 0,
                 max_concurrent: Optional[int] = None) -> None:
        super().__init__(max_concurrent)
        self.points = {p.name: p for p in pts}
        self.num_samples, self.seed = num_samples, seed
        self._fresh()

    def _fresh(self) -> None:
        self.tpe = {n: self._new_tpe(p) for n, p in self.points.items()}
        self.issued: dict[str, dict[int, str]] = {n: {} for n in self.points}  # sample -> trial id
        self.owner: dict[str, tuple[str, int]] = {}    # trial id -> (point, sample)
        self.fed: set[str] = set()                     # trial ids whose result the TPE has
        self.order, self.cursor = 0, 0

    def _new_tpe(self, p: Point) -> HyperOptSearch:
        space = HyperOptSearch.convert_search_space({k: d.to_tune() for k, d in p.space.items()})
        return HyperOptSearch(space=space, metric=METRIC, mode=MODE,
                              random_state_seed=point_seed(self.seed, p.name),
                              n_initial_points=n_initial_points(self.num_samples))

    # --------------------------------------------------------------- rebuilt from the trials

    def rebuild(self, first: bool) -> None:
        mine = [t for t in self.trials if _sample_of(t.config) is not None]
        if not first and {t.trial_id for t in mine} == set(self.owner):
            return  # the usual step: the controller holds what was handed out
        self._replay(mine)

    def _replay(self, trials: Sequence[Any]) -> None:
        self._fresh()
        ended = {t.trial_id: t for t in trials if t.status in ENDED}
        by_point: dict[str, dict[int, Any]] = {}
        for t in trials:
            name, k = _sample_of(t.config)
            if name in self.points:
                by_point.setdefault(name, {})[k] = t
        changed = []
        for name, samples in by_point.items():
            for k in sorted(samples):
                t = samples[k]
                for j in t.config.get(SEEN_KEY) or ():
                    s = samples.get(j)
                    if s is not None and s.trial_id in ended:
                        self._feed(name, s.trial_id, ended[s.trial_id])
                sampled = self.tpe[name].suggest(t.trial_id)
                if sampled is not None and self.points[name].trial(sampled) != t.config.get(TRIAL_KEY):
                    changed.append(f"{name} sample {k}")
                self.issued[name][k], self.owner[t.trial_id] = t.trial_id, (name, k)
            for t in samples.values():
                if t.trial_id in ended:
                    self._feed(name, t.trial_id, t)
        if changed:  # e.g. another HyperOpt version: later proposals follow the recorded results
            logging.getLogger(__name__).warning(
                "the search's TPE, replayed, proposes other values than the run recorded for %s",
                ", ".join(changed[:3]))
        orders = [(t.config.get(ORDER_KEY), t) for t in trials if isinstance(t.config.get(ORDER_KEY), int)]
        if orders:
            last, t = max(orders, key=lambda o: o[0])
            names = list(self.points)
            self.order = last + 1
            point = _sample_of(t.config)[0]
            self.cursor = (names.index(point) + 1) % len(names) if point in names else 0

    def _feed(self, name: str, trial_id: str, trial: Any) -> None:
        if trial_id in self.fed:
            return
        result = dict(trial.last_result or {})
        self.tpe[name].on_trial_complete(trial_id, result or None,
                                         error=trial.status == ERROR or METRIC not in result)
        self.fed.add(trial_id)

    # --------------------------------------------------------------- Ray Tune's hooks

    def suggest(self, trial_id: str) -> Any:
        if not self.synced:
            return None
        if self._all_ended():
            return Searcher.FINISHED
        if self.full():
            return None
        names = list(self.points)
        for i in range(len(names)):
            name = names[(self.cursor + i) % len(names)]
            issued = self.issued[name]
            if len(issued) >= self.num_samples:
                continue
            sampled = self.tpe[name].suggest(trial_id)
            if sampled is None:  # defensive: HyperOptSearch always proposes
                continue
            k = next(j for j in range(len(issued) + 1) if j not in issued)
            seen = sorted(j for j, tid in issued.items() if tid in self.fed)
            config = {TRIAL_KEY: self.points[name].trial(sampled), POINT_KEY: name,
                      SAMPLE_KEY: k, ORDER_KEY: self.order, SEEN_KEY: seen}
            issued[k], self.owner[trial_id] = trial_id, (name, k)
            self.order, self.cursor = self.order + 1, (self.cursor + i + 1) % len(names)
            return self.hand(config)
        return None  # every sample handed out; some still run

    def _all_ended(self) -> bool:
        if self.handed or any(len(v) < self.num_samples for v in self.issued.values()):
            return False
        ended = {t.trial_id for t in self.trials if t.status in ENDED}
        return set(self.owner) <= ended

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        if trial_id not in self.owner or trial_id in self.fed:
            return
        if result is not None and METRIC not in result:
            error = True  # never reported an epoch: nothing for TPE to learn
        self.tpe[self.owner[trial_id][0]].on_trial_complete(trial_id, result, error=error)
        self.fed.add(trial_id)


def _sample_of(config: Any) -> Optional[tuple[str, int]]:
    if isinstance(config, dict) and isinstance(config.get(POINT_KEY), str) \
            and isinstance(config.get(SAMPLE_KEY), int):
        return config[POINT_KEY], config[SAMPLE_KEY]
    return None


# ------------------------------------------------------------------ the scheduler

def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's milestones: grace, grace*F, grace*F^2, ... up to max_t (as Ray Tune's ASHA)."""
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [int(grace_period * reduction_factor ** k) for k in range(max(n, 1))]


class PointScheduler(FIFOScheduler):
    """Asynchronous successive halving (ASHA) per figure point, so a trial is only ever ranked
    against trials of its own point: at each milestone epoch a trial's validation accuracy is
    recorded, and the trial stops when it is below the (1 - 1/F) quantile of what the point's
    other trials recorded there. The records are a function of the trials' reports: after a
    resume they are read back from the restored trials' reports in storage."""

    def __init__(self, pts: Sequence[Point], grace_period: Optional[int] = None,
                 reduction_factor: float = DEFAULT_REDUCTION_FACTOR) -> None:
        super().__init__()
        self.rf = reduction_factor
        self.max_t = {p.name: p.epochs for p in pts}
        self.milestones = {p.name: rungs(min(grace_period or default_grace_period(p.epochs), p.epochs),
                                         reduction_factor, p.epochs) for p in pts}
        self.recorded: dict[str, dict[int, dict[str, float]]] = {
            p.name: {m: {} for m in self.milestones[p.name]} for p in pts}
        self.stopped: dict[str, list] = {p.name: [] for p in pts}   # (trial id, epoch) cut short
        self.loaded = False

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec: Any) -> bool:
        return metric in (None, METRIC) and mode in (None, MODE)

    def sync(self, trials: Sequence[Any]) -> None:
        """Before the first step of a session: the records of trials that reported before it (a
        resumed run), from their reports in storage up to the epoch each was restored at."""
        if self.loaded:
            return
        self.loaded = True
        for t in trials:
            sample = _sample_of(t.config)
            epoch = int((t.last_result or {}).get(TIME_ATTR) or 0)
            if sample is None or sample[0] not in self.recorded or epoch < 1:
                continue
            fs, folder = trial_storage(t)
            reports, _ = read_reports(fs, folder)
            for row in reports:
                if row.get(TIME_ATTR) is not None and row[TIME_ATTR] <= epoch:
                    self.record(sample[0], t.trial_id, row)
            last = reports[-1] if reports else {}
            if t.status in ENDED and last.get(TIME_ATTR, 0) < self.max_t[sample[0]] \
                    and t.status != ERROR and not last.get("diverged"):
                self.stopped[sample[0]].append((t.trial_id, last.get(TIME_ATTR, 0)))

    def record(self, point: str, trial_id: str, result: Mapping[str, Any]) -> Optional[float]:
        """Record a report at a milestone; the cutoff it was held against (None: none)."""
        epoch, value = result.get(TIME_ATTR), result.get(METRIC)
        rung = self.recorded[point].get(epoch) if epoch is not None else None
        if rung is None or value is None or trial_id in rung:
            return None
        others = [v for k, v in rung.items() if k != trial_id]
        cutoff = float(np.nanpercentile(others, (1 - 1 / self.rf) * 100)) if others else None
        rung[trial_id] = float(value)
        return cutoff

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        point = (trial.config or {}).get(POINT_KEY)
        if point not in self.recorded:
            return TrialScheduler.CONTINUE
        cutoff = self.record(point, trial.trial_id, result)
        epoch = result.get(TIME_ATTR, 0)
        if cutoff is not None and result[METRIC] < cutoff and epoch < self.max_t[point]:
            self.stopped[point].append((trial.trial_id, epoch))
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return "per-point ASHA: " + ", ".join(f"{n}: {len(s)} stopped" for n, s in self.stopped.items())

    # Nothing to save: the records are rebuilt from the trials' reports.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"state": "rebuilt from the trials' reports"}, f)

    def restore(self, checkpoint_path: str) -> None:
        pass


# ------------------------------------------------------------------ one search run

class SearchRun:
    """What `tune.run` needs for a search: the points, the searcher, the scheduler, the total
    number of trials, and how to summarise the results."""

    def __init__(self, pts: Sequence[Point], num_samples: int = DEFAULT_NUM_SAMPLES,
                 grace_period: Optional[int] = None,
                 reduction_factor: float = DEFAULT_REDUCTION_FACTOR, seed: int = 0) -> None:
        self.points = list(pts)
        self.per_point = num_samples
        self.num_samples = num_samples * len(self.points)
        self.scheduler = PointScheduler(self.points, grace_period, reduction_factor)
        self.searcher = PointSearcher(self.points, num_samples, seed)

    @property
    def experiments(self) -> list[Experiment]:
        return [p.experiment for p in self.points]

    def marker(self) -> dict[str, Any]:
        """What run.json says of the search: its kind, its points' experiments (resources), the
        points, their searched options and epochs, the samples per point."""
        marker = grid_marker(self.experiments)
        del marker["trials"]
        return {**marker, "kind": "search", "points": [p.name for p in self.points],
                "num_samples": self.per_point,
                "searched": {p.name: list(p.space) for p in self.points},
                "max_epochs": {p.name: p.epochs for p in self.points}}

    def summarize(self, run: Run, seconds: float) -> "SearchSummary":
        rows, missing, errored = best_rows(run)
        return SearchSummary(run.path, rows, missing, errored, seconds, skipped=run.notes())


@dataclass
class SearchSummary:
    path: str
    rows: list[dict[str, Any]]
    missing: list[str]      # points without a trial to choose (none reported, or all diverged or errored)
    errored: int
    seconds: float
    interrupted: Any = None  # iterand_tune.tune.Interruption after Ctrl-C / SIGTERM
    skipped: list[str] = field(default_factory=list)  # folders not counted (runs.Run.notes)

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


