"""A search as planned, before Ray: its figure points (an experiment times one combination of its
grid axes but the seed, with the experiment's search space) and the budget defaults. No Ray or
HyperOpt here, so `--search --dry-run` needs neither; `iterand_tune.search` runs the plan.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .config import TrialConfig
from .experiments import Experiment
from .search_space import Domain, cast

DEFAULT_NUM_SAMPLES = 20            # trials per figure point
DEFAULT_REDUCTION_FACTOR = 3        # ASHA keeps the best third at each rung


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
