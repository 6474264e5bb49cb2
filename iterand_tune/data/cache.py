"""The decoded-once cache of a dataset read from files, <root>/iterand_cache/<name>.npz: its uint8 NCHW
images and int64 labels, and the size and mtime of the files they were decoded from (paths relative to
root, so that a moved data folder keeps its cache). Written once under a lock, so that the trials of a
node decode once; a cache that is missing, damaged, stale or not what this code writes is decoded again.
"""

from __future__ import annotations

import os
import uuid
from contextlib import suppress
from typing import Any, Callable

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

CACHE_DIR = "iterand_cache"
KEYS = ("train_x", "train_y", "test_x", "test_y")  # the arrays of a cache file, as a reader returns them

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]


def valid(x: np.ndarray, y: np.ndarray, num_classes: int) -> bool:
    """Whether x holds uint8 [N, 3, 32, 32] images and y their N integer labels in 0..num_classes-1."""
    return (x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype.kind in "iu" and y.shape == (len(x),)
            and not (y.size and (y.min() < 0 or y.max() >= num_classes)))


def write_atomically(path: str, write: Callable[[Any], Any]) -> None:
    """write(file) into a temporary file renamed onto `path`: a reader sees the old file or the whole new one."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def _path(root: str, name: str) -> str:
    return os.path.join(root, CACHE_DIR, f"{name}.npz")


def _stamps(root: str, sources: Any) -> np.ndarray:
    return np.array([(s.st_size, s.st_mtime_ns) for s in (os.stat(os.path.join(root, p)) for p in sources)])


def cached(root: str, name: str, num_classes: int) -> Arrays | None:
    """The cached arrays of dataset `name` in `root`, or None unless the cache is whole, valid and fresh."""
    try:
        with np.load(_path(root, name), allow_pickle=False) as f:  # a zip: CRC-checked
            arrays = [f[k] for k in KEYS]
            fresh = np.array_equal(_stamps(root, f["sources"]), f["stamps"])
    except Exception:  # missing, truncated, damaged, a source gone, or pickled objects
        return None
    ok = fresh and valid(*arrays[:2], num_classes) and valid(*arrays[2:], num_classes)
    return tuple(map(torch.from_numpy, arrays)) if ok else None


def decoded_once(root: str, name: str, num_classes: int, sources: list[str], decode: Callable[[], list]) -> Arrays:
    """decode()'s arrays (KEYS, numpy) decoded from the files `sources`, written to the cache under a lock,
    so that concurrent trials decode once; a trial that waited for the lock reads what the first wrote."""
    path = _path(root, name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = FileLock(path + ".lock")
        lock.acquire()
    except OSError:  # a read-only data folder: every trial decodes
        return tuple(map(torch.from_numpy, decode()))
    try:
        if (arrays := cached(root, name, num_classes)) is not None:
            return arrays
        sources = [os.path.relpath(p, root) for p in sources]
        stamps = _stamps(root, sources)  # before decoding: a file changed meanwhile leaves a stale cache
        arrays = decode()
        with suppress(OSError):  # a full disk costs the next trial a decode, not this one its data
            write_atomically(path, lambda f: np.savez(f, **dict(zip(KEYS, arrays)), sources=sources, stamps=stamps))
        return tuple(map(torch.from_numpy, arrays))
    finally:
        lock.release()
