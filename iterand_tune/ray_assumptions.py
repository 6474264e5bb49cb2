"""What the project assumes about Ray Tune beyond its documented API, in one place: the files of a
run's folder and the JSON of its experiment state, the environment switches Ray Tune reads, its
stop signal, the hook order of its controller and where a trial's files live in storage. Each
assumption has a test in tests/test_ray_assumptions.py that fails loudly on a Ray that breaks it.
Ray is imported inside functions only: the run reader (runs.py) reads the file formats without it.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
from typing import Any, Iterator, Optional

from .storage import list_dir

# ------------------------------------------------------------------ files of a run's folder

# Ray Tune writes one set of these per driver session (the session string is a time stamp, so
# names sort by time); each save overwrites its own session's files.
EXPERIMENT_STATE = re.compile(r"experiment_state-(?P<session>.+)\.json")
SESSION_FILES = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl",
                 "basic-variant-state-{}.json", "callback-states-{}.pkl")
TUNER_FILE = "tuner.pkl"                  # the Tuner's arguments, pickled when the run starts
SEARCH_STATE_PREFIX = "searcher-state-"   # a Searcher's save(): older runs' search marker
# Files of one trial's folder, written by Ray Tune's driver (result.json: one JSON line per report).
PARAMS_FILE, RESULT_FILE, ERROR_FILE = "params.json", "result.json", "error.txt"
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")   # a trial's checkpoints, numbered in order

# Environment switches (read by Ray Tune when a run starts).
NO_SIGINT_HANDLER = "TUNE_DISABLE_SIGINT_HANDLER"    # Ray Tune leaves SIGINT alone
OLD_OUTPUT = "RAY_AIR_NEW_OUTPUT"                    # "0": no boxed progress tables
MAX_PENDING_TRIALS = "TUNE_MAX_PENDING_TRIALS_PG"    # trials created ahead of a free slot
SYNC_WARNING = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"
STOP_SIGNAL = signal.SIGUSR1    # Ray Tune's handler for it stops the trials and saves the state

# Ray Tune's trial statuses, as the experiment state and Trial.status spell them.
PENDING, RUNNING, PAUSED, TERMINATED, ERROR = "PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR"
ENDED = (TERMINATED, ERROR)


@contextlib.contextmanager
def pending_trials(n: int) -> Iterator[None]:
    """Ray Tune creates up to `n` trials ahead of free slots while this is in force (read when
    its controller starts); a value the user set in the environment wins."""
    before = os.environ.get(MAX_PENDING_TRIALS)
    if before is None:
        os.environ[MAX_PENDING_TRIALS] = str(n)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MAX_PENDING_TRIALS, None)


def session_of(name: str) -> Optional[str]:
    """The session string of an experiment state file's name (None for other files)."""
    m = EXPERIMENT_STATE.fullmatch(name)
    return m.group("session") if m else None


def session_files(session: str) -> list[str]:
    """The names of every file Ray Tune writes for one driver session."""
    return [t.format(session) for t in SESSION_FILES]


def state_trials(text: str) -> list[dict[str, Any]]:
    """The trials of an experiment state file's text: trial_id, status, config (Ray's whole
    config of the trial; {} where Ray stored it as cloudpickle, never unpickled here), logdir
    (the trial's folder name) and last_result. ValueError when the text is not a whole state
    (truncated, empty, not Ray's format)."""
    state = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(state, dict) or not isinstance(state.get("trial_data"), list):
        raise ValueError("no trial_data list")
    out = []
    for item in state["trial_data"]:
        trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
        meta = item[1] if len(item) > 1 else {}
        meta = json.loads(meta) if isinstance(meta, str) else meta
        if not isinstance(trial, dict) or "trial_id" not in trial:
            raise ValueError("a trial without trial_id")
        config, logdir = trial.get("config"), trial.get("relative_logdir")
        last = meta.get("last_result") if isinstance(meta, dict) else None
        out.append(dict(trial_id=trial["trial_id"], status=trial.get("status"),
                        config=config if isinstance(config, dict) else {},
                        logdir=logdir if isinstance(logdir, str) else None,
                        last_result=last if isinstance(last, dict) else {}))
    return out


# ------------------------------------------------------------------ a trial inside the driver

def trial_storage(trial: Any) -> tuple[Any, str]:
    """(pyarrow filesystem, folder path on it) where Ray Tune keeps a trial's files in storage:
    the worker uploads checkpoints there, the driver syncs result.json there."""
    return trial.storage.storage_filesystem, trial.storage.trial_fs_path


def trial_error_text(trial: Any) -> str:
    """The traceback of a failed trial: the driver's staged error file (there at once; the copy in
    storage may not be synced yet), else what the trial object holds; "" when neither is there."""
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                return f.read()
        return trial.get_error() or ""
    except Exception:  # noqa: BLE001 - storage may be gone with the node; the path still helps
        return ""


# ------------------------------------------------------------------ the driver's staging folder

def clear_staging(run_name: str, run_path: str) -> list[str]:
    """Remove this machine's staging copies of the run: Ray Tune's driver writes a run's files into
    SESSION_DIR/artifacts/STAMP/NAME/driver_artifacts and copies that folder to storage after every
    save. A copy left by a driver that was killed (its Ray still up) would bring back, at the
    resumed driver's first save, the folders resume set aside, and would make Ray Tune start a
    restored trial in a second folder (NAME_xxxx) beside its first. Storage holds everything
    resume needs (the trials' reports are in their checkpoints). Only staging folders whose
    experiment state files all belong to this run are removed."""
    from ray.train.constants import _get_ray_train_session_dir  # private: the staging root

    try:  # SESSION_DIR/artifacts of the Ray this process is connected to; its siblings too
        temp = os.path.dirname(os.path.dirname(_get_ray_train_session_dir()))
    except Exception:  # noqa: BLE001 - e.g. a Ray Client connection: no staging on this machine
        return []
    ours = {n for n in list_dir(run_path, files=True) if session_of(n)}
    removed = []
    pattern = os.path.join(temp, "session_*", "artifacts", "*", run_name, "driver_artifacts")
    for folder in sorted(set(map(os.path.realpath, glob.glob(pattern)))):  # session_latest: a link
        try:
            states = {n for n in os.listdir(folder) if session_of(n)}
        except OSError:
            continue
        if states and states <= ours:
            shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
            removed.append(folder)
    return removed
