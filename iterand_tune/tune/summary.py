"""What a run ended with, read from its folder through the one run reader (runs.py): one record per
trial in the run's order, and the figure points built from them exactly as `python -m analysis
table` builds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import FIELD_NAMES
from ..runs import Run
from ..terminal import points_table
from ..vocabulary import DIVERGED, POINT_LABELS, point_fields, point_rows


@dataclass(frozen=True)
class Interruption:
    """A run stopped by Ctrl-C or SIGTERM: `finished` of its `total` trials had ended."""

    finished: int
    total: int


@dataclass
class RunSummary:
    """One record per trial (config, labels, status, last metrics) in the run's order, planned
    grid points that have no trial yet as `pending`; `skipped` names folders not counted."""

    path: str
    trials: list[dict[str, Any]]
    errored: list[str]      # trials whose last attempt failed
    unfinished: list[str]   # stopped before their last epoch, or not run yet
    seconds: float
    diverged: list[str] = field(default_factory=list)  # stopped: training loss not finite
    interrupted: Optional[Interruption] = None           # set after Ctrl-C / SIGTERM
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_run(cls, run: Run, seconds: float) -> "RunSummary":
        records = [t.record() for t in run.trials]

        def named(*statuses: str) -> list[str]:
            return [f"{t['experiment']}-{t['model']}-seed{t['seed']}" for t in records
                    if t["status"] in statuses]

        return cls(run.path, records, named("errored"),
                   named("stopped", "pending", "running", "paused"), seconds, named(DIVERGED),
                   skipped=run.notes())

    @property
    def points(self) -> list[dict[str, Any]]:
        keys = [*POINT_LABELS, *point_fields(self.trials, FIELD_NAMES)]
        return point_rows(self.trials, keys)

    @property
    def ended(self) -> int:
        return sum(t["status"] in ("finished", "errored", DIVERGED) for t in self.trials)

    @property
    def ok(self) -> bool:
        return not (self.errored or self.unfinished or self.diverged or self.interrupted)

    def table(self) -> str:
        return points_table(self.points)
