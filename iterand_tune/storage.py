"""Where runs live: folders and URIs (s3://, gs://) through pyarrow filesystems, and the small
file helpers the run reader (runs.py) and the command lines share. No Ray import.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs

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
