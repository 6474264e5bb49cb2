"""The one reader of a run's folder, free of Ray: the run's marker (run.json: what was run), every
trial's config, status and reports, in the run's own order (the experiment file's grid order; a
search: point by point, sample by sample). The end-of-run summary, `python -m analysis`, the
figures and `--from-search` all read runs through `read_run`, so they count the same trials.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from . import ray_assumptions as ray_files
from .storage import TRIAL_KEY, join_path, open_storage, read_json, read_text
from .vocabulary import DIVERGED, TEST_METRIC, labels

RUN_FILE = "run.json"            # the run's marker, written before its first trial
REPORTS_FILE = "reports.json"    # inside each checkpoint: every report of the trial up to it
# Keys of a trial's Ray config beside TRIAL_KEY (its TrialConfig dict and experiment name):
GRID_KEY = "index"               # a grid run: the trial's place in the run's planned trials
POINT_KEY, SAMPLE_KEY = "point", "sample"   # a search: its figure point, its sample number there
ORDER_KEY, SEEN_KEY = "order", "seen"       # a search: its place among all samples; what TPE saw
GRID, SEARCH = "grid", "search"  # run kinds (run.json "kind")

# Ray Tune's status -> ours. A trial that ended without finishing its epochs was stopped (a search's
# ASHA); one whose last report says `diverged` (training loss not finite) is `diverged`.
STATUSES = {ray_files.TERMINATED: "finished", ray_files.RUNNING: "running",
            ray_files.PENDING: "pending", ray_files.PAUSED: "paused", ray_files.ERROR: "errored"}
ENDED = ("finished", "stopped", "errored", DIVERGED)
_RANK = {"finished": 0, DIVERGED: 0, "stopped": 1, "errored": 2, "paused": 3, "running": 3,
         "pending": 4}


class ReadError(Exception):
    """A path that holds no readable run; one line for the user."""


# ------------------------------------------------------------------ the marker

def write_marker(run_path: str, marker: dict[str, Any]) -> None:
    """run.json in the run's folder (made if absent), written whole or not at all."""
    fs, root = open_storage(run_path)
    fs.create_dir(root, recursive=True)
    data = json.dumps(marker, indent=1, default=str).encode()
    tmp = join_path(root, f".{RUN_FILE}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, join_path(root, RUN_FILE))


def read_marker(run_path: str) -> Optional[dict[str, Any]]:
    """The run's run.json, None when it has none (a run started before run.json existed)."""
    fs, root = open_storage(run_path)
    marker = read_json(fs, join_path(root, RUN_FILE))
    return marker if isinstance(marker, dict) else None


# ------------------------------------------------------------------ the experiment state

@dataclass
class StateFile:
    name: str
    session: str
    trials: Optional[list[dict[str, Any]]]   # None: unreadable (truncated, empty, not Ray's)
    problem: str = ""


def state_files(fs: pafs.FileSystem, root: str, names: Sequence[str]) -> list[StateFile]:
    """Every experiment state file of the run's folder, the newest first, each parsed."""
    out = []
    for name in sorted((n for n in names if ray_files.session_of(n)), reverse=True):
        text = read_text(fs, join_path(root, name))
        try:
            if text is None:
                raise ValueError("cannot be read")
            out.append(StateFile(name, ray_files.session_of(name), ray_files.state_trials(text)))
        except (ValueError, TypeError, IndexError, AttributeError) as err:
            out.append(StateFile(name, ray_files.session_of(name), None,
                                 str(err).splitlines()[0] if str(err) else type(err).__name__))
    return out


# ------------------------------------------------------------------ trials

@dataclass
class TrialRecord:
    """One trial of a run: its TrialConfig dict (with `experiment`), where it stands in the run
    (`slot`: ("grid", index) or ("search", point, sample); None in runs before run.json), its
    reports (one per epoch, in order) and status. A planned grid point Ray had not created yet has
    no trial id and no folder."""

    trial_id: Optional[str]
    folder: Optional[str]                  # the folder on its filesystem (None: no folder yet)
    display: Optional[str]                 # the folder as the user wrote the run's path
    config: dict[str, Any] = field(default_factory=dict)
    slot: Optional[tuple] = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    ray_status: Optional[str] = None       # in the newest readable experiment state
    error: Optional[str] = None            # the exception line of error.txt
    has_error_file: bool = False
    order: Optional[int] = None            # a search: the sample's place among all samples
    seen: tuple = ()                       # a search: the samples of its point TPE had seen

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    @property
    def complete(self) -> bool:
        """Trained to its last epoch (with test accuracy where it evaluates the test set)."""
        last = self.last
        if last.get(TEST_METRIC) is not None:
            return True
        epochs = self.config.get("epochs")
        return (self.config.get("evaluate_test") is False and epochs is not None
                and last.get("epoch") is not None and int(last["epoch"]) >= int(epochs))

    @property
    def status(self) -> str:
        """finished, stopped, diverged, errored, running, paused or pending."""
        if self.last.get(DIVERGED) is True:
            return DIVERGED
        if self.complete:
            return "finished"  # the files are newer than any saved state
        if self.ray_status is not None:
            status = STATUSES.get(self.ray_status, self.ray_status.lower())
            return "stopped" if status == "finished" else status
        if self.has_error_file:
            return "errored"
        return "running" if self.rows else "pending"

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def record(self) -> dict[str, Any]:
        """The trial as one flat row: config, labels, status, last report's metrics."""
        return {**self.config, **(labels(self.config) if self.config else {}),
                "trial_id": self.trial_id, "status": self.status, **{
                    k: self.last.get(k) for k in (TEST_METRIC, "params_after_pruning",
                                                  "params_before_pruning")}}


@dataclass
class Run:
    """A run's folder as read: its marker, its trials in the run's order (planned grid points
    without a trial as `pending`), and the folders it did not count (`skipped`: (folder, why))."""

    path: str
    marker: Optional[dict[str, Any]]
    trials: list[TrialRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    state: Optional[str] = None            # the experiment state file read (None: none readable)

    @property
    def kind(self) -> Optional[str]:
        return (self.marker or {}).get("kind")

    @property
    def started(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.trial_id is not None]

    def notes(self) -> list[str]:
        """One line per folder that was not counted, for the user."""
        return [f"skipped {folder}: {why}" for folder, why in self.skipped]


def _slot(config: dict[str, Any]) -> Optional[tuple]:
    if not isinstance(config, dict):
        return None
    if isinstance(config.get(GRID_KEY), int):
        return (GRID, config[GRID_KEY])
    if isinstance(config.get(POINT_KEY), str) and isinstance(config.get(SAMPLE_KEY), int):
        return (SEARCH, config[POINT_KEY], config[SAMPLE_KEY])
    return None


def merge_reports(*sources: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report per epoch, in epoch order, from result.json and the newest checkpoint's
    reports.json (a report kept in the checkpoint survives a result.json copied to storage before
    it got that line). An epoch reported twice (re-run after a resume) keeps its later report;
    result.json's, which holds Ray's own keys too, wins over the checkpoint's copy."""
    last: dict[Any, dict[str, Any]] = {}
    for rows in reversed(sources):
        for row in rows:
            if isinstance(row, dict) and row.get("epoch") is not None:
                last.pop(row["epoch"], None)
                last[row["epoch"]] = row
    return sorted(last.values(), key=lambda r: r["epoch"])


def result_rows(text: Optional[str]) -> list[dict[str, Any]]:
    """result.json's reports in file order; a line cut off mid-write is skipped."""
    rows = []
    for line in (text or "").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _checkpoint_reports(fs: pafs.FileSystem, base: str, entries: list) -> list[dict[str, Any]]:
    numbered = [(int(m.group(1)), e.base_name) for e in entries
                if e.type == pafs.FileType.Directory and (m := ray_files.CHECKPOINT_DIR.fullmatch(e.base_name))]
    for _, name in sorted(numbered, reverse=True):
        rows = read_json(fs, join_path(join_path(base, name), REPORTS_FILE))
        if isinstance(rows, list):
            return rows
    return []


def read_reports(fs: pafs.FileSystem, base: str, entries: Optional[list] = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every report of the trial whose folder is `base`, result.json's own rows)."""
    if entries is None:
        try:
            entries = fs.get_file_info(pafs.FileSelector(base))
        except (pa.ArrowException, OSError):
            return [], []
    names = {e.base_name for e in entries}
    text = read_text(fs, join_path(base, ray_files.RESULT_FILE)) if ray_files.RESULT_FILE in names else None
    ray_rows = result_rows(text)
    return merge_reports(ray_rows, _checkpoint_reports(fs, base, entries)), ray_rows


def _read_folder(fs: pafs.FileSystem, root: str, shown: str, folder: str,
                 in_state: bool) -> Optional[TrialRecord]:
    base = join_path(root, folder)
    try:
        entries = fs.get_file_info(pafs.FileSelector(base))
    except (pa.ArrowException, OSError):
        return None
    names = {e.base_name for e in entries}
    trial_files = (ray_files.PARAMS_FILE, ray_files.RESULT_FILE, ray_files.ERROR_FILE)
    if not (any(n in names for n in trial_files) or in_state
            or any(ray_files.CHECKPOINT_DIR.fullmatch(n) for n in names)):
        return None  # not a trial's folder
    params = read_json(fs, join_path(base, ray_files.PARAMS_FILE)) if ray_files.PARAMS_FILE in names else None
    error = read_text(fs, join_path(base, ray_files.ERROR_FILE)) if ray_files.ERROR_FILE in names else None
    rows, ray_rows = read_reports(fs, base, entries)
    whole = params if isinstance(params, dict) else (ray_rows[-1].get("config") if ray_rows else None)
    whole = whole if isinstance(whole, dict) else {}
    trial_id = (ray_rows[-1].get("trial_id") if ray_rows else None) or folder.rsplit("-", 1)[-1]
    display = shown.rstrip("/") + "/" + folder if "://" in shown else base
    record = TrialRecord(trial_id, base, display, dict(whole.get(TRIAL_KEY) or {}), _slot(whole),
                         rows, has_error_file=error is not None,
                         error=_last_line(error) if error is not None else None)
    _search_fields(record, whole)
    return record


def _search_fields(record: TrialRecord, whole: dict[str, Any]) -> None:
    if isinstance(whole.get(ORDER_KEY), int):
        record.order = whole[ORDER_KEY]
    if isinstance(whole.get(SEEN_KEY), list):
        record.seen = tuple(whole[SEEN_KEY])


def _last_line(text: str) -> str:
    """The exception line of a traceback (its last non-empty line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _list(fs: pafs.FileSystem, root: str, shown: str) -> list[pafs.FileInfo]:
    try:
        info = fs.get_file_info(root)
    except (pa.ArrowException, OSError) as err:
        raise ReadError(f"cannot read {shown}: {_first_line(err)}") from None
    if info.type == pafs.FileType.NotFound:
        raise ReadError(f"no results at {shown}: no such folder")
    if info.type != pafs.FileType.Directory:
        raise ReadError(f"{shown} is a file, not a run's folder (STORAGE/NAME, which holds "
                        "run.json and one folder per trial)")
    try:
        return fs.get_file_info(pafs.FileSelector(root))
    except (pa.ArrowException, OSError) as err:
        raise ReadError(f"cannot list {shown}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_run(path: str, require: bool = True) -> Run:
    """Every trial of the run at `path` (a folder or a URI such as s3://bucket/run). A grid point
    or search sample with two folders (a run resumed by an older version could leave one) counts
    once: the folder the saved state names, else the one that got furthest; the other is listed in
    `skipped`. With `require`, a folder that holds no run is a ReadError."""
    shown = str(path)
    try:
        fs, root = open_storage(shown)
    except (pa.ArrowException, ValueError, OSError) as err:
        raise ReadError(f"cannot open {shown}: {_first_line(err)}") from None
    entries = _list(fs, root, shown)
    names = [e.base_name for e in entries]
    marker = read_json(fs, join_path(root, RUN_FILE)) if RUN_FILE in names else None
    marker = marker if isinstance(marker, dict) else None
    state = next((s for s in state_files(fs, root, names) if s.trials is not None), None)
    by_logdir = {s["logdir"]: s for s in (state.trials if state else []) if s["logdir"]}
    folders = [e.base_name for e in entries
               if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")]

    def read(folder: str) -> Optional[TrialRecord]:
        return _read_folder(fs, root, shown, folder, folder in by_logdir)

    # Object stores answer slowly but in parallel: read the trials' folders concurrently.
    with ThreadPoolExecutor(max_workers=16) as pool:
        found = [t for t in pool.map(read, folders) if t is not None]
    in_state = {}
    for t in found:
        s = by_logdir.get(os.path.basename(t.folder or ""))
        if s is not None:
            t.trial_id, t.ray_status = s["trial_id"], s["status"]
            whole = s["config"]
            if not t.config and isinstance(whole.get(TRIAL_KEY), dict):
                t.config = dict(whole[TRIAL_KEY])
            t.slot = t.slot or _slot(whole)
            _search_fields(t, whole)
            in_state[id(t)] = True
    # Trials Ray created but had not started have no folder, only an entry in the state.
    known = {t.trial_id for t in found}
    for s in (state.trials if state else []):
        if s["trial_id"] not in known and (not s["logdir"] or s["logdir"] not in folders):
            t = TrialRecord(s["trial_id"], None, None, dict(s["config"].get(TRIAL_KEY) or {}),
                            _slot(s["config"]), ray_status=s["status"])
            _search_fields(t, s["config"])
            found.append(t)
            in_state[id(t)] = True
    trials, skipped = _one_per_slot(found, in_state)
    trials = _in_order(trials, marker)
    if require and not trials and marker is None:
        runs = [n for n in folders if _looks_like_run(fs, join_path(root, n))]
        hint = (f"; it holds runs: {', '.join(sorted(runs)[:5])}{', ...' if len(runs) > 5 else ''}"
                " - pass one of them" if runs else "")
        raise ReadError(f"no Ray Tune results at {shown} (no run.json, no experiment_state-*.json, "
                        f"no trial folders with params.json){hint}")
    return Run(shown, marker, trials, skipped, state.name if state else None)


def _one_per_slot(trials: list[TrialRecord], in_state: dict[int, bool]
                  ) -> tuple[list[TrialRecord], list[tuple[str, str]]]:
    """One record per grid point / search sample (per trial id in runs without slots)."""
    groups: dict[Any, list[TrialRecord]] = {}
    for t in trials:
        groups.setdefault(t.slot if t.slot is not None else ("id", t.trial_id), []).append(t)
    kept, skipped = [], []
    for key, group in groups.items():
        group.sort(key=lambda t: (not in_state.get(id(t), False), _RANK.get(t.status, 5),
                                  -len(t.rows), -float(t.last.get("timestamp") or 0),
                                  t.display or ""))
        kept.append(group[0])
        what = (f"grid point {key[1]}" if key[0] == GRID else
                f"sample {key[2]} of {key[1]}" if key[0] == SEARCH else f"trial {key[1]}")
        for other in group[1:]:
            skipped.append((other.display or str(other.trial_id),
                            f"a second folder of {what}; counted: {group[0].display or group[0].trial_id}"))
    return kept, skipped


def _in_order(trials: list[TrialRecord], marker: Optional[dict[str, Any]]) -> list[TrialRecord]:
    """The run's order: a grid run by grid index, with its planned points that have no trial yet
    added as pending; a search point by point (run.json's order), then by sample; runs without
    run.json by trial id (Ray numbered those in grid order)."""
    planned = (marker or {}).get("trials") if (marker or {}).get("kind") == GRID else None
    if isinstance(planned, list):
        have = {t.slot[1] for t in trials if t.slot and t.slot[0] == GRID}
        for i, config in enumerate(planned):
            if i not in have and isinstance(config, dict):
                trials.append(TrialRecord(None, None, None, dict(config), (GRID, i)))
    points = {p: i for i, p in enumerate((marker or {}).get("points") or [])
              if isinstance(p, str)}

    def key(t: TrialRecord) -> tuple:
        if t.slot and t.slot[0] == GRID:
            return (0, t.slot[1], "", 0, "")
        if t.slot and t.slot[0] == SEARCH:
            return (1, points.get(t.slot[1], len(points)), t.slot[1], t.slot[2], "")
        return (2, 0, "", 0, str(t.trial_id))

    return sorted(trials, key=key)


def _looks_like_run(fs: pafs.FileSystem, folder: str) -> bool:
    try:
        return any(ray_files.session_of(e.base_name) or e.base_name == RUN_FILE
                   for e in fs.get_file_info(pafs.FileSelector(folder)))
    except (pa.ArrowException, OSError):
        return False
