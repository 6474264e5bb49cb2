"""Each assumption iterand_tune.ray_assumptions makes about Ray Tune beyond its documented API,
checked against the installed Ray: a Ray that breaks one fails here, by name, rather than in a
user's week-long run. One tiny in-process run on the session's Ray (a trivial trainable, the
project's grid searcher) supplies the files and the order of hooks."""
from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

import iterand_tune.ray_assumptions as ra
from iterand_tune.runs import GRID_KEY, state_files
from iterand_tune.storage import TRIAL_KEY, list_dir, open_storage
from iterand_tune.tune.searchers import GridSearcher, TrialsView

pytestmark = pytest.mark.ray


def test_the_file_names_of_a_run_are_ray_tunes():
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import BasicVariantGenerator, SearchGenerator, Searcher

    templates = {t.CKPT_FILE_TMPL for t in (TuneController, SearchGenerator, Searcher,
                                            BasicVariantGenerator, CallbackList)}
    assert templates == set(ra.SESSION_FILES)
    assert ra.session_of(TuneController.CKPT_FILE_TMPL.format("2026-01-01_00-00-00")) == \
        "2026-01-01_00-00-00"
    from ray.tune.impl.tuner_internal import _TUNER_PKL
    assert _TUNER_PKL == ra.TUNER_FILE


def test_the_environment_switches_and_the_stop_signal():
    import inspect

    import ray.tune.tune as tune_py
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import SearchGenerator

    source = inspect.getsource(tune_py)
    for name in (ra.NO_SIGINT_HANDLER, ra.OLD_OUTPUT):
        assert name in source or name in inspect.getsource(__import__(
            "ray.tune.experimental.output", fromlist=["x"])), name
    generator = SearchGenerator(GridSearcher([]))
    assert _get_max_pending_trials(generator) == 1  # a searcher of our own: one trial ahead
    with ra.pending_trials(7):
        assert _get_max_pending_trials(generator) == 7
    assert ra.MAX_PENDING_TRIALS not in os.environ
    before = signal.getsignal(ra.STOP_SIGNAL)
    os.environ.pop(ra.NO_SIGINT_HANDLER, None)
    try:
        tune_py._setup_signal_catching()
        handler = signal.getsignal(ra.STOP_SIGNAL)
        assert callable(handler) and handler is not before  # Ray Tune stops a run on it
    finally:
        signal.signal(ra.STOP_SIGNAL, before)
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Recorder(TrialsView):
    """TrialsView that also notes the order of what it sees and what the searcher hands out."""

    def __init__(self, searcher, events):
        super().__init__(searcher)
        self.events = events

    def on_step_begin(self, iteration, trials, **info):
        self.events.append(("sync", len(trials)))
        for t in trials:
            self.events.append(("storage", ra.trial_storage(t)))
        super().on_step_begin(iteration, trials, **info)


class Recording(GridSearcher):
    events: list

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        self.events.append(("suggest", config[GRID_KEY] if isinstance(config, dict) else config))
        return config


def report_once(config):
    from ray import tune
    tune.report({"epoch": 1, "x": config[GRID_KEY]})


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    import sys

    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    folder = tmp_path_factory.mktemp("assumptions")
    events: list = []
    searcher = Recording([{"experiment": "e", "model": "m", "seed": s} for s in (1, 2)])
    searcher.events = events
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, ra.STOP_SIGNAL)}
    tuner = tune.Tuner(report_once, tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1),
                       run_config=tune.RunConfig(name="tiny", storage_path=str(folder), verbose=0,
                                                 callbacks=[Recorder(searcher, events)]))
    grid = tuner.fit()
    for sig, handler in handlers.items():  # Ray Tune leaves its own behind
        signal.signal(sig, handler)
    return SimpleNamespace(path=str(folder / "tiny"), events=events, grid=grid, folder=folder)


def test_the_controller_shows_its_trials_before_it_asks_for_new_ones(tiny_run):
    events = tiny_run.events
    assert events[0][0] == "sync"  # the first step: the trial list before any suggestion
    handed = [e[1] for e in events if e[0] == "suggest" and isinstance(e[1], int)]
    assert handed == [0, 1]
    # Every suggestion after the first follows a sync of a step that saw the trials before it.
    syncs = [i for i, e in enumerate(events) if e[0] == "sync"]
    second = events.index(("suggest", 1))
    assert any(events[i][1] >= 1 for i in syncs if i < second)
    assert ("suggest", "FINISHED") in events and len(tiny_run.grid) == 2


def test_the_experiment_state_is_json_we_can_read(tiny_run):
    fs, root = open_storage(tiny_run.path)
    (state,) = state_files(fs, root, list_dir(tiny_run.path, files=True))
    assert state.trials is not None and len(state.trials) == 2
    for t in state.trials:
        assert t["status"] == ra.TERMINATED and t["last_result"]["epoch"] == 1
        assert t["config"][GRID_KEY] in (0, 1) and t["config"][TRIAL_KEY]["experiment"] == "e"
        assert t["logdir"] in list_dir(tiny_run.path)  # the trial's folder name


def test_tuner_pkl_keeps_the_searcher_and_its_view_together(tiny_run):
    from ray import cloudpickle

    with open(os.path.join(tiny_run.path, ra.TUNER_FILE), "rb") as f:
        state = cloudpickle.load(f)
    searcher = state["_tune_config"].search_alg
    (view,) = [c for c in state["_run_config"].callbacks if isinstance(c, TrialsView)]
    assert view.searcher is searcher and not searcher.synced  # pristine, as when the run began


def test_a_restored_run_is_rebuilt_from_its_trials_and_ends(tiny_run):
    """The finished run restored: the searcher (from tuner.pkl, its saved state ignored) sees the
    two trials and hands out nothing; the restore ends by itself."""
    from ray import tune

    removed = ra.clear_staging("tiny", tiny_run.path)
    assert removed and all(p.endswith(os.path.join("tiny", "driver_artifacts")) for p in removed)
    tuner = tune.Tuner.restore(tiny_run.path, trainable=report_once, resume_unfinished=True,
                               resume_errored=True)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, ra.STOP_SIGNAL)}
    try:
        assert len(tuner.fit()) == 2
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert sorted(n for n in list_dir(tiny_run.path) if n.startswith("report_once")) == \
        sorted(t.path.rsplit("/", 1)[-1] for t in tiny_run.grid)  # no second folder


def test_a_trials_files_are_where_its_storage_says(tiny_run):
    """trial_storage (read by the scheduler after a resume) names the folder in storage that holds
    the trial's result.json; trial_error_text reads what a failed trial left."""
    places = {path: fs for kind, (fs, path) in (e for e in tiny_run.events if e[0] == "storage")}
    assert len(places) == 2
    for path, fs in places.items():
        assert fs.get_file_info(os.path.join(path, ra.RESULT_FILE)).size > 0
    fake = SimpleNamespace(error_file=None, get_error=lambda: "Traceback\nValueError: x")
    assert ra.trial_error_text(fake).endswith("ValueError: x")
