"""Tests for iterand_tune.trial_setup: `claim_resources` fitting a trial's process to its share,
`claimed` putting the process back as it was after a trial (threads, the CUDA memory cap, the
environment), and a quiet worker saying nothing of its own stopping."""
from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from iterand_tune.trial_setup import claim_resources, claimed, quiet_worker


@pytest.fixture
def cuda_stood_in(monkeypatch):
    """A 16 GiB card whose memory cap is a plain number, the caps set listed in order."""
    state = SimpleNamespace(cap=1.0, caps=[], card=SimpleNamespace(total_memory=16 * 2**30))

    def set_cap(fraction, device=None):
        state.cap = fraction
        state.caps.append((fraction, device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: state.card)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_cap)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: state.cap,
                        raising=False)
    return state


# ------------------------------------------------------------------ claim_resources

def test_claim_resources_caps_memory_to_the_gpu_share(monkeypatch):
    caps = []
    threads = torch.get_num_threads()
    card = SimpleNamespace(total_memory=16 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: card)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: caps.append((f, d)))
    try:
        # a quarter of a 16 GiB card, less 1 GiB for the process's CUDA context
        assert claim_resources(1, 0.25) == ("cuda", 1) and caps == [(pytest.approx(3 / 16), 0)]
        assert torch.get_num_threads() == 1
        assert claim_resources(2, 2) == ("cuda", 2) and len(caps) == 1  # whole GPUs: no cap
        assert torch.get_num_threads() == 2
        assert claim_resources(1, 0.5, use_cuda=False) == ("cpu", 1) and len(caps) == 1
        assert claim_resources(0.5, 0) == ("cpu", 1)
        assert torch.get_num_threads() == 1  # half a CPU still gets one thread
        card.total_memory = 2 * 2**30  # a small card: never below half the share
        assert claim_resources(1, 0.25) == ("cuda", 1) and caps[-1] == (pytest.approx(0.125), 0)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ claimed: one trial, then as before

def _process() -> dict:
    """What a trial may change of its process, as one comparable value."""
    return {"environ": dict(os.environ), "threads": torch.get_num_threads()}


def test_claimed_leaves_the_process_as_it_found_it(cuda_stood_in, monkeypatch):
    monkeypatch.setenv("ITERAND_TUNE_KEPT", "before")
    monkeypatch.setenv("ITERAND_TUNE_GONE", "before")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda_stood_in.cap = 0.9  # a cap the process had before the trial
    before = _process()
    with claimed(before["threads"] + 1, 0.25) as (device, n):
        assert (device, n) == ("cuda", 1)
        assert torch.get_num_threads() == before["threads"] + 1
        assert cuda_stood_in.cap == pytest.approx(3 / 16)
        # what a trial's own code does to the environment (training sets cuBLAS's workspace)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["ITERAND_TUNE_KEPT"] = "changed"
        del os.environ["ITERAND_TUNE_GONE"]
    assert _process() == before
    assert cuda_stood_in.cap == 0.9


def test_claimed_puts_the_process_back_after_a_failed_trial(cuda_stood_in):
    before = _process()
    with pytest.raises(RuntimeError, match="the trial failed"):
        with claimed(before["threads"] + 1, 0.5):
            os.environ["ITERAND_TUNE_ADDED"] = "1"
            raise RuntimeError("the trial failed")
    assert _process() == before
    assert cuda_stood_in.cap == 1.0


def test_trials_one_after_another_in_one_process_each_start_from_its_settings(cuda_stood_in):
    """As in a reused Ray actor: a whole-GPU trial after a quarter-GPU one is not held to the
    quarter's cap, and neither sees the other's environment."""
    before = _process()
    with claimed(1, 0.25):
        os.environ["ITERAND_TUNE_FIRST"] = "1"
    with claimed(2, 1) as (device, n):
        assert (device, n) == ("cuda", 1)
        assert cuda_stood_in.cap == 1.0 and "ITERAND_TUNE_FIRST" not in os.environ
        assert torch.get_num_threads() == 2
    assert _process() == before


def test_claimed_on_cpu_touches_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda *a, **k: pytest.fail("a CPU trial capped CUDA memory"))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction",
                        lambda *a, **k: pytest.fail("a CPU trial read CUDA's memory cap"), raising=False)
    before = _process()
    with claimed(1, 0.25, use_cuda=False) as (device, n):
        assert (device, n) == ("cpu", 1) and torch.get_num_threads() == 1
    assert _process() == before


# ------------------------------------------------------------------ a worker process

def test_quiet_workers_say_nothing_of_an_exit_raised_in_a_finalizer(monkeypatch):
    """Ray's SIGTERM handler raises SystemExit in the worker; inside a finalizer Python reports it
    through sys.unraisablehook ("Exception ignored in ..." and a traceback, forwarded to the
    driver's terminal). A quiet worker drops that one; other unraisable errors still show."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train")]
    levels = [logger.level for logger in loggers]
    try:
        quiet_worker()
        assert [logger.level for logger in loggers] == [logging.WARNING] * 2
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

    class Finalized:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    Finalized(SystemExit(1))
    Finalized(ValueError("shown"))
    assert seen == [ValueError]
