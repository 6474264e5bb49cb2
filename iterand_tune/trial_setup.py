"""What runs inside a trial's process, not in the driver: `claim_resources` fits the process to the
trial's CPUs and GPU share, `claimed` does so for one trial and puts the process back as it was
after it (Ray reuses a worker process for trial after trial), `quiet_worker` quiets a worker.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Any, Callable, Iterator, Optional

import torch


def claim_resources(cpus: float, gpus: float, use_cuda: bool = True,
                    context_reserve_mb: float = 1024.0) -> tuple[str, int]:
    """Fit this process to the trial's resources: torch threads = its CPUs; with a GPU share its
    CUDA memory capped to that share. Returns (device, number of GPUs to use). The process keeps
    these settings; `claimed` makes the same claim and undoes it when the trial ends.

    Fractional GPUs are not isolated, so a trial at 1/k is held to its share by capping PyTorch's
    caching allocator. Each process's CUDA context (driver state, cuBLAS/cuDNN handles, loaded
    kernels: 0.5-1 GB on current GPUs) lives outside that allocator, so k caps of exactly 1/k
    would promise the whole card plus k contexts. The cap is therefore
    (share * total - context_reserve_mb) / total, but never below half the share (small cards,
    many trials). `torch.cuda.get_per_process_memory_fraction(0)` reads it back.
    """
    torch.set_num_threads(max(1, int(cpus)))
    # torch.compile's Inductor starts a worker per core: k packed trials would each take them all.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, int(cpus)))
    if not _on_cuda(gpus, use_cuda):
        return "cpu", 1  # a logical GPU without CUDA (tests) also lands here
    cap = _memory_cap(gpus, context_reserve_mb)
    if cap is not None:
        torch.cuda.set_per_process_memory_fraction(cap, 0)
    return "cuda", max(1, int(gpus))


@contextlib.contextmanager
def claimed(cpus: float, gpus: float, use_cuda: bool = True,
            context_reserve_mb: float = 1024.0) -> Iterator[tuple[str, int]]:
    """`claim_resources` for the trial run inside the block, which gets (device, number of GPUs).
    Leaving the block puts back torch's thread count, the CUDA memory cap and every environment
    variable (the trial's own code may set some, e.g. CUBLAS_WORKSPACE_CONFIG), so that the next
    trial in a reused process starts from the process's settings, not from this trial's."""
    environ, threads = dict(os.environ), torch.get_num_threads()
    capped = _on_cuda(gpus, use_cuda) and _memory_cap(gpus, context_reserve_mb) is not None
    cap_before = _memory_fraction() if capped else None
    try:
        yield claim_resources(cpus, gpus, use_cuda, context_reserve_mb)
    finally:
        torch.set_num_threads(threads)
        if cap_before is not None:
            torch.cuda.set_per_process_memory_fraction(cap_before, 0)
        _restore_environ(environ)


def _on_cuda(gpus: float, use_cuda: bool) -> bool:
    return gpus > 0 and use_cuda and torch.cuda.is_available()


def _memory_cap(gpus: float, context_reserve_mb: float) -> Optional[float]:
    """The fraction of device 0 a share of `gpus` may allocate; None for whole GPUs."""
    if gpus >= 1:  # only fractional GPUs share a card, and Ray does not isolate them
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    return max(0.5 * gpus, (gpus * total - context_reserve_mb * 2**20) / total)


def _memory_fraction() -> float:
    """Device 0's CUDA memory cap now (1.0, none, on a torch that cannot read it back)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(get(0)) if get else 1.0


def _restore_environ(before: dict[str, str]) -> None:
    for name in set(os.environ) - set(before):
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


# ------------------------------------------------------------------ a worker process

def quiet_worker() -> None:
    """Set up every worker process of a quiet run (`resources.connect` names it to Ray): Ray
    Tune's and Ray Train's INFO lines go to the worker's log file only (Ray forwards what reaches
    the console to the driver's terminal), and so does nothing of a worker being stopped: Ray's
    SIGTERM handler raises SystemExit, and when that lands in a finalizer or weakref callback
    Python prints "Exception ignored in ..." with a traceback (a worker stopped at the end of a
    run while it was busy). Ray runs it once, as the worker starts: it is the process's setup for its
    whole life, not a trial's, so nothing undoes it."""
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.unraisablehook = functools.partial(_unraisable_unless_exit, sys.unraisablehook)


def _unraisable_unless_exit(default: Callable[[Any], None], unraisable: Any) -> None:
    if not isinstance(unraisable.exc_value, SystemExit):
        default(unraisable)
