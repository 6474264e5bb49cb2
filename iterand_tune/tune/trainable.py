"""The function trainable Ray Tune runs for every trial: one TrialConfig, resumed from the trial's
checkpoint, a report and a checkpoint every epoch. Each checkpoint also holds every report of the
trial so far (reports.json), so a trial's history in storage never depends on which copy of Ray's
result.json reached it last.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from typing import Any

import ray
import torch
from ray import tune

from ..config import TrialConfig
from ..runs import REPORTS_FILE
from ..storage import CHECKPOINT_FILE, TRIAL_KEY
from ..training import Trainer
from ..trial_setup import claimed


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one TrialConfig, resumed from `tune.get_checkpoint()`,
    reporting the metrics of every epoch with a checkpoint. An epoch whose training loss is not
    finite is reported (`diverged`) and is the trial's last: it ends, not fails."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint

    values = {k: v for k, v in config[TRIAL_KEY].items() if k != "experiment"}
    cfg = TrialConfig.from_dict(values)
    request = tune.get_context().get_trial_resources().required_resources
    # Ray reuses this process for the next trial: what the trial set (threads, the CUDA memory
    # cap, environment variables) is put back when it ends.
    share = request.get("GPU", 0.0)
    with claimed(request.get("CPU", 1.0), share, cfg.use_cuda) as (device, num_gpus):
        _train(cfg, device, num_gpus, share)


def _train(cfg: TrialConfig, device: str, num_gpus: int, share: float) -> None:
    trainer = Trainer(cfg, device=device, num_gpus=num_gpus)
    reports: list[dict[str, Any]] = []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load(os.path.join(folder, CHECKPOINT_FILE))
            reports = _read_reports(os.path.join(folder, REPORTS_FILE))
    node_id, device_name = ray.get_runtime_context().get_node_id(), _device_name(trainer.device)
    while not trainer.done:  # a trial restored after its last epoch has nothing left to do
        metrics = trainer.train_epoch()
        metrics["node_id"] = node_id  # which node ran this epoch (trials move when nodes fail)
        metrics["device_name"] = device_name  # and on what: the report's cost and machines
        metrics["gpu_share"] = share
        reports = [r for r in reports if r.get("epoch") != metrics["epoch"]] + [dict(metrics)]
        with tempfile.TemporaryDirectory() as folder:
            trainer.save(os.path.join(folder, CHECKPOINT_FILE))
            with open(os.path.join(folder, REPORTS_FILE), "w") as f:
                json.dump(reports, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _device_name(device: Any) -> str:
    """The GPU's name (e.g. NVIDIA H200), or the CPU's model for a trial on CPUs."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def _read_reports(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError):  # a checkpoint written before reports were kept in it
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def trial_name(trial: Any) -> str:
    """A trial's folder name: EXPERIMENT-MODEL-seedS-ID."""
    t = trial.config[TRIAL_KEY]
    return f"{t['experiment']}-{t['model']}-seed{t['seed']}-{trial.trial_id}"
