"""Where runs live: folders and URIs (s3://, gs://) through pyarrow filesystems, the names Ray
Tune gives the files of a run's folder, and the one reader of Ray's experiment state that the
command line, the analysis package and the tests share. No Ray import: the files are read as data.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

# Files of a run's folder STORAGE/NAME, as Ray Tune 2.x writes them.
EXPERIMENT_STATE = re.compile(r"experiment_state-.*\.json")   # one per save; names sort by time
SEARCH_STATE_PREFIX = "search_gen_state-"                      # a searcher's saved state
# Files of one trial's folder.
PARAMS_FILE, RESULT_FILE, ERROR_FILE = "params.json", "result.json", "error.txt"
CHECKPOINT_FILE = "trainer.pt"   # our Trainer's state inside each checkpoint_* folder
TRIAL_KEY = "trial"              # a trial's TrialConfig dict sits under this key of Ray's config


class RunError(Exception):
    """A run that cannot start or be read as asked (cluster, storage, resume); one line, exit 2."""


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A folder made absolute (trials run in their own folders, maybe on other nodes); a URI as is."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join_path(base: str, name: str) -> str:
    """`base/name` for a folder or a URI. A URI's query string (s3://b/runs?endpoint_override=...)
    stays at the end, where pyarrow reads it."""
    if not is_uri(base):
        return os.path.join(base, name)
    head, sep, query = base.partition("?")
    return head.rstrip("/") + "/" + name + sep + query


def open_storage(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local folder or a URI such as s3://bucket/run."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def list_dir(path: str, files: bool = False) -> list[str]:
    """Names of the folders (or, with `files`, the files) directly under `path`; [] if absent."""
    fs, where = open_storage(path)
    infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
    kind = pafs.FileType.File if files else pafs.FileType.Directory
    return [i.base_name for i in infos if i.type == kind]


def exists(path: str) -> bool:
    fs, where = open_storage(path)
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def read_text(fs: pafs.FileSystem, path: str) -> Optional[str]:
    """A file's text, or None when it is absent or unreadable."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, pa.ArrowException, OSError):
        return None


def read_json(fs: pafs.FileSystem, path: str) -> Optional[Any]:
    text = read_text(fs, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # caught mid-write
        return None


def newest_run(storage: str, prefix: str) -> Optional[str]:
    """The newest run folder under `storage` named `prefix` + a time stamp, or None."""
    runs = sorted(n for n in list_dir(storage) if n.startswith(prefix) and n[len(prefix):][:1].isdigit())
    return runs[-1] if runs else None


def is_search_run(run_path: str) -> bool:
    """A run whose searcher saved its state (a --search run)."""
    return any(n.startswith(SEARCH_STATE_PREFIX) for n in list_dir(run_path, files=True))


def experiment_state(fs: pafs.FileSystem, root: str,
                     names: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, config (our TrialConfig dict, {} if not plain JSON), logdir, last_result}
    from the newest readable `experiment_state-*.json` of the run folder `root` ({} if none).
    Configs that are not plain JSON are stored by Ray as cloudpickle: never unpickled here."""
    if names is None:
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
    for name in sorted((n for n in names if EXPERIMENT_STATE.fullmatch(n)), reverse=True):
        state = read_json(fs, join_path(root, name))
        if not isinstance(state, dict) or not isinstance(state.get("trial_data"), list):
            continue
        out = {}
        for item in state["trial_data"]:
            try:
                trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
                meta = item[1] if len(item) > 1 else {}
                meta = json.loads(meta) if isinstance(meta, str) else meta
            except (json.JSONDecodeError, IndexError, TypeError):
                continue
            if not isinstance(trial, dict) or "trial_id" not in trial:
                continue
            config = trial.get("config")
            trial_cfg = config.get(TRIAL_KEY) if isinstance(config, dict) else None
            logdir = trial.get("relative_logdir")
            last = meta.get("last_result") if isinstance(meta, dict) else None
            out[trial["trial_id"]] = dict(
                status=trial.get("status"),
                config=trial_cfg if isinstance(trial_cfg, dict) else {},
                logdir=logdir if isinstance(logdir, str) else None,
                last_result=last if isinstance(last, dict) else {})
        return out
    return {}
