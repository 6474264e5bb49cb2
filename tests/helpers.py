"""Helpers shared by several test modules: counting host reads during training, the CLI's
--dry-run trials, small experiment files on digits, reading a run's files (trial folders,
reports, statuses from the experiment state) and drivers killed and resumed."""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import pyarrow.fs as pafs
import pytest
import torch

import iterand_tune.supermask as supermask
from iterand_tune.config import METHODS, TrialConfig
from iterand_tune.runs import read_run, state_files
from iterand_tune.storage import open_storage
from iterand_tune.training import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tensor methods that read a value back to the host (a device sync on a GPU).
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def use_topk_threshold(monkeypatch) -> None:
    """The CPU threshold uses numpy (free on CPU); count the device-agnostic path instead."""
    monkeypatch.setattr(supermask, "_threshold",
                        lambda s, k, scratch=None: supermask._kth_smallest_topk(s.detach().reshape(-1), k))


def count_host_reads(monkeypatch, iters: int, **options) -> dict[str, int]:
    """Host reads of tensors during one IteRand epoch of `iters` training iterations on digits."""
    use_topk_threshold(monkeypatch)
    trainer = Trainer(TrialConfig(**{**METHODS["iterand"], **dict(
        dataset="digits", model="conv6x0.25", batch_size=32, weight_decay=1e-4, use_cuda=False,
        epochs=2, debug_max_iters=iters, rerand_freq=2, train_augmentation=True), **options}))
    counts = dict.fromkeys(SYNCING, 0)
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counting(name):
        def wrapper(self, *a, **kw):
            counts[name] += 1
            return originals[name](self, *a, **kw)
        return wrapper

    with monkeypatch.context() as m:
        for name in SYNCING:
            m.setattr(torch.Tensor, name, counting(name))
        trainer.train_epoch()
    return counts


# ------------------------------------------------------------------ experiment files on digits

# A small supermask trial on digits (1,257 training images, 20 iterations an epoch at batch 64).
DIGITS = dict(dataset="digits", model="conv6x0.25", epochs=3, batch_size=64,
              train_augmentation=False, train_mode="score_only", bn_affine=False,
              conv_sparsity=0.5, lr=0.3)
EDGEPOPUP: dict = {}
ITERAND = dict(rerand_mode="bernoulli", rerand_freq=5, rerand_lambda=0.1)


def write_experiments(path, *experiments: tuple) -> str:
    """An experiment file at `path` defining `experiments`: (name, config, grid[, search])
    tuples of plain values, search values being source text of iterand_tune.search_space
    domains, e.g. {"lr": "LogUniform(0.05, 0.5)"}."""
    lines = ["from iterand_tune.experiments import Experiment",
             "from iterand_tune.search_space import Choice, LogUniform, QUniform, Uniform",
             "", "EXPERIMENTS = ["]
    for name, config, grid, *search in experiments:
        space = ", ".join(f"{k}={v}" for k, v in (search[0] if search else {}).items())
        lines.append(f"    Experiment({name!r}, {dict(config)!r}, {dict(grid)!r}, search=dict({space})),")
    lines.append("]")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def write_digits(folder, experiments: Mapping[str, Mapping[str, Any]],
                 grid: Optional[Mapping[str, Sequence]] = None,
                 search: Optional[Mapping[str, Mapping[str, str]]] = None,
                 file: str = "tiny.py", **values: Any) -> str:
    """`folder/file` with one digits experiment per name of `experiments` (name -> its own
    values, e.g. ITERAND): DIGITS, then its values, then `values`; every experiment with the
    same `grid` (default: seed 1) and its `search` space (name -> domains) if any."""
    grid = dict(grid or {"seed": [1]})
    search = search or {}
    return write_experiments(os.path.join(folder, file), *(
        (name, {**DIGITS, **own, **values}, grid, search.get(name, {}))
        for name, own in experiments.items()))


# ------------------------------------------------------------------ reading a run's files

def trial_dirs(run_dir, prefix: str = "") -> list[str]:
    """The trial folders of a run (named EXPERIMENT-MODEL-seedS-ID), sorted by name."""
    return sorted(d for d in glob.glob(os.path.join(str(run_dir), f"{prefix}*-seed*"))
                  if os.path.isdir(d))


def result_rows(trial_dir) -> list[dict]:
    """The reports of a trial's result.json ([] before the first); a line cut off mid-write
    (the trial is still running) is skipped."""
    path = os.path.join(str(trial_dir), "result.json")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_rows(run_dir) -> dict[str, list[dict]]:
    """trial_id -> reports (one per epoch), for every trial of the run that reported at least
    once, read as the package reads a run (runs.read_run)."""
    return {t.trial_id: t.rows for t in read_run(str(run_dir)).started if t.rows}


def trial_states(run_dir) -> dict[str, tuple[str, int]]:
    """trial_id -> (Ray Tune status, last reported epoch), from the newest readable experiment
    state ({} before the first)."""
    fs, root = open_storage(str(run_dir))
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
    good = next((s for s in state_files(fs, root, names) if s.trials is not None), None)
    return {t["trial_id"]: (t["status"], t["last_result"].get("epoch", 0))
            for t in (good.trials if good else [])}


def trained_here(trial: Mapping[str, Any]) -> list[dict]:
    """The reports of `trial` (an Experiment.trials() dict) trained to its end in this process,
    uninterrupted and without Ray, on one thread as a trial on half a CPU trains there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(TrialConfig.from_dict({k: v for k, v in trial.items() if k != "experiment"}))
        reports = []
        while not trainer.done:
            reports.append(trainer.train_epoch())
        return reports
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ drivers killed and resumed

def wait_for(predicate: Callable[[], Any], proc: subprocess.Popen, what: str,
             timeout: float = 300, show: Optional[Callable[[], Any]] = None, every: float = 0.1) -> Any:
    """Poll `predicate` every `every` seconds until it returns something true (returned) while
    the driver `proc` runs; fails the test when the driver ends first or after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}" + (f": {show()}" if show else ""))


def kill_driver_when(argv: Sequence[str], ready: Callable[[], Any], what: str,
                     timeout: float = 300) -> Any:
    """Start `python -m iterand_tune ARGV` as a driver process, SIGKILL it as soon as `ready()`
    returns something true, and return that."""
    proc = subprocess.Popen([sys.executable, "-m", "iterand_tune", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wait_for(ready, proc, what, timeout)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def resume(argv: Sequence[str]) -> str:
    """`python -m iterand_tune ARGV --resume`, run to the end in this process (it joins the
    session's Ray, which the killed driver used too); it must succeed and say that it resumed.
    Returns what it printed."""
    from iterand_tune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--resume"])
    assert rc == 0, (out.getvalue()[-3000:], err.getvalue()[-3000:])
    assert "resuming " in out.getvalue(), out.getvalue()[-3000:]
    return out.getvalue()


# ------------------------------------------------------------------ the CLI without Ray

def dry_run(capsys, *argv: str) -> list[dict]:
    """Trials of `python -m iterand_tune ... --dry-run --json`, run in-process."""
    from iterand_tune.cli import main

    rc = main([*argv, "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return [json.loads(line) for line in out.splitlines()]
