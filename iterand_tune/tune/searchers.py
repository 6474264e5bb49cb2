"""Which trials a run has is decided here, not by Ray Tune's restore of its own generators: the
run's Searcher hands out its grid points (or, for a search, samples) and rebuilds what it knows
from the trials the controller holds at the start of every step, so a resumed run can neither
repeat a grid point nor lose one, and it ends when every point has a trial that ended.
`--max-concurrent` is the searcher's own limit. Nothing it saves is needed to restore it.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from ray import tune
from ray.tune.search import Searcher

from ..ray_assumptions import ENDED
from ..runs import GRID_KEY
from ..storage import TRIAL_KEY


class OwnedSearcher(Searcher):
    """A Searcher whose state is the controller's trial list (`sync`, called by `TrialsView` at
    the start of every step, before Ray Tune asks for new trials) plus what it handed out since.
    Before its first sync it hands out nothing: after a resume it must first see the trials."""

    def __init__(self, max_concurrent: Optional[int] = None) -> None:
        super().__init__()
        self.max_concurrent = max_concurrent
        self.trials: list[Any] = []          # the controller's trials at the last step
        self.handed: list[dict[str, Any]] = []   # configs handed out since then
        self.synced = False

    def sync(self, trials: Sequence[Any]) -> None:
        self.trials, self.handed = list(trials), []
        first, self.synced = not self.synced, True
        self.rebuild(first)

    def rebuild(self, first: bool) -> None:
        """Recompute what the searcher knows from `self.trials`."""

    def live(self) -> int:
        """Trials not ended: the controller's, and those handed out since it was seen."""
        return sum(t.status not in ENDED for t in self.trials) + len(self.handed)

    def full(self) -> bool:
        return bool(self.max_concurrent) and self.live() >= self.max_concurrent

    def hand(self, config: dict[str, Any]) -> dict[str, Any]:
        self.handed.append(config)
        return config

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict,
                              **spec: Any) -> bool:
        return not config  # the trials come from here, not from a param_space

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        pass  # the next step's trial list says that it ended

    # Ray Tune saves a searcher with every experiment state and restores it on resume; this one
    # is rebuilt from the restored trials instead, so its file only says so.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"state": "rebuilt from the run's trials at every step"}, f)

    def restore(self, checkpoint_path: str) -> None:
        pass


class TrialsView(tune.Callback):
    """Shows the controller's trials to the run's searcher (and scheduler) at the start of every
    step. Ray Tune pickles callbacks and the searcher together into the run's tuner.pkl, so a
    resumed run gets both back, still linked."""

    def __init__(self, searcher: OwnedSearcher, scheduler: Any = None) -> None:
        self.searcher, self.scheduler = searcher, scheduler

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.scheduler is not None and hasattr(self.scheduler, "sync"):
            self.scheduler.sync(trials)
        self.searcher.sync(trials)


class GridSearcher(OwnedSearcher):
    """The planned trials of a grid run, handed out in order, each with its grid index in the
    trial's config (GRID_KEY). A grid point is taken once it has a trial, whatever its status;
    `done` are points finished in folders of an earlier session that the controller does not
    hold (a run rebuilt from its trial folders). FINISHED once every point has a trial that
    ended (or is done)."""

    def __init__(self, planned: Sequence[dict[str, Any]], max_concurrent: Optional[int] = None,
                 done: Sequence[int] = ()) -> None:
        super().__init__(max_concurrent)
        self.planned = [dict(t) for t in planned]
        self.done = set(done)
        self.taken: dict[int, bool] = {}     # grid index -> one of its trials ended

    def rebuild(self, first: bool) -> None:
        taken: dict[int, bool] = {}
        for t in self.trials:
            i = (t.config or {}).get(GRID_KEY)
            if isinstance(i, int):
                taken[i] = taken.get(i, False) or t.status in ENDED
        self.taken = taken

    def suggest(self, trial_id: str) -> Any:
        if not self.synced:
            return None
        if all(self.taken.get(i) or i in self.done for i in range(len(self.planned))):
            return Searcher.FINISHED
        if self.full():
            return None
        handed = {c[GRID_KEY] for c in self.handed}
        for i, trial in enumerate(self.planned):
            if i not in self.taken and i not in self.done and i not in handed:
                return self.hand({TRIAL_KEY: dict(trial), GRID_KEY: i})
        return None  # every point has a trial; some are still running
