"""Helpers shared by several test modules: counting host reads during training, and reading
the trial statuses out of a Ray Tune run's experiment state."""
from __future__ import annotations

import glob
import json
import os

import torch

import iterand_tune.supermask as supermask
from iterand_tune.config import METHODS, TrialConfig
from iterand_tune.training import Trainer

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


def trial_states(run_dir) -> dict[str, tuple[str, int]]:
    """trial_id -> (Ray Tune status, last reported epoch), from the newest experiment state."""
    files = sorted(glob.glob(os.path.join(run_dir, "experiment_state-*.json")))
    if not files:
        return {}
    try:
        with open(files[-1]) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError):  # caught mid-write
        return {}
    out = {}
    for trial_json, meta in state["trial_data"]:
        t = json.loads(trial_json)
        last = (meta if isinstance(meta, dict) else json.loads(meta)).get("last_result") or {}
        out[t["trial_id"]] = (t["status"], last.get("epoch", 0))
    return out
