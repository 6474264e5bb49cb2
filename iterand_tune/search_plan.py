"""A search as planned and as it chose, without Ray: its figure points (an experiment times one
combination of its grid axes but the seed, with its search space), the budget defaults, and each
point's best configuration in a run read by runs.read_run. `--search --dry-run` and the report
need neither Ray nor HyperOpt; `iterand_tune.search` runs the plan.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .config import ExperimentError, TrialConfig
from .experiments import Experiment
from .runs import ReadError, Run, read_run
from .search_space import Domain, cast

DEFAULT_NUM_SAMPLES = 20            # trials per figure point
DEFAULT_REDUCTION_FACTOR = 3        # ASHA keeps the best third at each rung
REPRODUCE_SEEDS = (1, 2, 3)         # --from-search trains each best configuration with these seeds


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


def default_grace_period(epochs: int) -> int:
    """ASHA's first rung without --grace-period: a tenth of the training (at least one epoch)."""
    return max(1, epochs // 10)


# ------------------------------------------------------------------ what a search chose

def best_rows(run: Run) -> tuple[list[dict[str, Any]], list[str], int]:
    """The best row of every point of a search run (read by runs.read_run), the points without
    one, and how many trials failed."""
    marker = run.marker or {}
    names = list(marker.get("points") or [])
    trials: dict[str, list] = {n: [] for n in names}
    errored = 0
    for t in run.started:
        if t.slot is None or t.slot[0] != "search":
            continue
        errored += t.status == "errored"
        trials.setdefault(t.slot[1], []).append(({"experiment": t.config.get("experiment"),
                                                   **t.config}, t.last, t.status))
    rows = []
    for name in trials:
        row = best_row(name, (marker.get("searched") or {}).get(name, []),
                       int((marker.get("max_epochs") or {}).get(name, 0)), trials[name])
        if row is not None:
            rows.append(row)
    missing = [n for n in trials if not any(r["point"] == n for r in rows)]
    return rows, missing, errored


def best_row(point: str, searched: Sequence[str], max_epochs: int,
             trials: Sequence[tuple[dict, dict, str]]) -> Optional[dict[str, Any]]:
    """The point's best trial of (config, last report, status) triples: highest `best_val_acc`
    (its best validation accuracy over the epochs it ran, stopped early or not); ties go to the
    trial that trained longer. A trial that diverged (training loss not finite) or ended in an
    error is never the best: its configuration is unstable, or its reports stop short."""
    scored = [(m["best_val_acc"], m.get("epoch", 0), -i, t, m) for i, (t, m, status) in enumerate(trials)
              if m.get("best_val_acc") is not None and not m.get("diverged") and status != "errored"]
    if not scored:
        return None
    acc, epochs, _, trial, metrics = max(scored, key=lambda s: s[:3])
    config = {k: v for k, v in trial.items() if k != "experiment"}
    config["evaluate_test"] = True  # the reproduction reports test accuracy
    cfg = TrialConfig.from_dict(config)
    return {
        "point": point,
        "experiment": trial["experiment"],
        "model": cfg.model,
        "method": cfg.method,
        "searched": {k: config[k] for k in searched if k in config},
        "best_val_acc": float(acc),
        "best_epoch": int(metrics.get("best_epoch") or 0),
        "epochs_trained": int(epochs),
        "max_epochs": max_epochs,
        "trial_id": metrics.get("trial_id"),
        "trials": len(trials),
        "epochs_spent": int(sum(m.get("epoch", 0) or 0 for _, m, _ in trials)),
        "config": cfg.to_dict(),
    }


def searched_best(run_path: str) -> list[dict[str, Any]]:
    """The best configuration of every point of a finished search run, read from its folder
    through the run reader (as the search's own summary chose them); ExperimentError when the
    folder holds no finished search."""
    try:
        run = read_run(run_path)
    except ReadError as err:
        raise ExperimentError(f"--from-search: {err}") from None
    marker = run.marker or {}
    if run.kind != "search":
        raise ExperimentError(f"--from-search: {run_path} is not a --search run "
                              f"({'its run.json says ' + repr(run.kind) if run.marker else 'no run.json'})")
    total = int(marker.get("num_samples") or 0) * len(marker.get("points") or [])
    ended = sum(t.ended for t in run.started)
    if ended < total:
        raise ExperimentError(f"--from-search: the search at {run_path} has ended {ended} of its "
                              f"{total} trials: resume it first (its `continue with:` line)")
    rows, _, _ = best_rows(run)
    if not rows:
        raise ExperimentError(f"--from-search: no trial of {run_path} reported a validation accuracy")
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
