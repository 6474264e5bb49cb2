"""What `--resume` checks and tidies in a run's folder before Ray Tune reads it: the newest experiment
state that parses (an unreadable newer one, truncated by a crash or an interrupted copy, is set
aside with its session's files, never silently restarted from), trial folders that state does not
know (their trials start again: set aside, so every grid point keeps one folder), and, when no
state is left, a run rebuilt from its trial folders (finished trials are kept, not run again).
Everything set aside goes to the run's `.set-aside/` folder, nothing is deleted.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from .. import ray_assumptions as ray_files
from ..runs import GRID, RUN_FILE, read_run, state_files
from ..storage import RunError, join_path, open_storage

SET_ASIDE = ".set-aside"


@dataclass
class ResumePlan:
    """`restore`: Ray Tune restores the run from `state`; `rebuild`: a new Tuner in the same folder
    whose grid skips `done` (indices finished in the folders kept)."""

    how: str
    state: Optional[str] = None
    done: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # one line per thing set aside, for the user


def prepare(run_path: str, marker: Optional[dict[str, Any]]) -> ResumePlan:
    """Decide how the run resumes, then set aside what that leaves behind (nothing is moved
    when the answer is a RunError)."""
    fs, root = open_storage(run_path)
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = [e.base_name for e in entries]
    states = state_files(fs, root, names)
    good = next((s for s in states if s.trials is not None), None)
    moves: list[str] = []
    notes: list[str] = []
    if good is not None and ray_files.TUNER_FILE in names:
        for bad in states[:states.index(good)]:
            moves += [n for n in ray_files.session_files(bad.session) if n in names]
            notes.append(f"{bad.name} is unreadable ({bad.problem}): set aside in {SET_ASIDE}/")
        named = {s["logdir"] for s in good.trials if s["logdir"]}
        for e in entries:
            if e.type == pafs.FileType.Directory and _trial_folder(e.base_name) \
                    and e.base_name not in named:
                moves.append(e.base_name)
                notes.append(f"{e.base_name}: a trial the saved state does not hold (started "
                             f"after the state's last save); it starts again, its folder set aside")
        if notes:
            notes.append(f"resuming from {good.name}")
        plan = ResumePlan("restore", good.name, notes=notes)
    else:
        plan, moves = _rebuild(run_path, marker, states, names)
    aside = join_path(join_path(root, SET_ASIDE), time.strftime("%Y%m%d-%H%M%S"))
    for name in moves:
        _set_aside(fs, root, name, aside)
    return plan


def _rebuild(run_path: str, marker: Optional[dict[str, Any]], states: list,
             names: list[str]) -> tuple[ResumePlan, list[str]]:
    what = (f"{states[0].name} is unreadable" if states and states[0].trials is None else
            f"{ray_files.TUNER_FILE} is missing" if ray_files.TUNER_FILE not in names else
            "the run has no experiment state")
    if marker is None:
        raise RunError(f"--resume: {what} and {run_path} has no {RUN_FILE} (the run predates it), "
                       "so it cannot be rebuilt from its trial folders: restore the file from a "
                       "copy, or start the run again under a new --name")
    run = read_run(run_path, require=False)
    if marker.get("kind") != GRID and any(t.rows for t in run.started):
        raise RunError(f"--resume: {what}; a search cannot be rebuilt from its trial folders "
                       "(its samples depend on the order of results): restore the file from a "
                       "copy, or start the search again under a new --name")
    done = sorted(t.slot[1] for t in run.started
                  if t.slot and t.slot[0] == GRID and t.status in ("finished", "diverged"))
    kept = {os.path.basename(t.folder or "") for t in run.started if t.slot and t.slot[1] in done}
    moves = [n for n in names if n not in (RUN_FILE, SET_ASIDE) and n not in kept]
    note = (f"{what}: rebuilt from the trial folders; {len(done)} finished trial(s) kept, the "
            f"rest start again (their files set aside in {SET_ASIDE}/)" if done or marker.get("kind") == GRID
            else f"{what} and no trial has reported yet: it starts again from its run.json")
    return ResumePlan("rebuild", None, done, [note]), moves


def _trial_folder(name: str) -> bool:
    return not name.startswith(".") and "-seed" in name


def _set_aside(fs: pafs.FileSystem, root: str, name: str, aside: str) -> None:
    """Move ROOT/NAME into the set-aside folder: a rename where the filesystem has one, else a
    copy then a delete (object stores)."""
    src, dst = join_path(root, name), join_path(aside, name)
    fs.create_dir(aside, recursive=True)
    try:
        fs.move(src, dst)
        return
    except (pa.ArrowException, OSError, NotImplementedError):
        pass
    info = fs.get_file_info(src)
    if info.type == pafs.FileType.Directory:
        for f in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            if f.type == pafs.FileType.File:
                target = dst + f.path[len(src):]
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                fs.copy_file(f.path, target)
        fs.delete_dir(src)
    else:
        fs.copy_file(src, dst)
        fs.delete_file(src)
