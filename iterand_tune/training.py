"""Trainer: one trial of SGD / edge-popup / IteRand (docs/method.md section 6), epoch by epoch,
on the trial's device, with a state_dict that resumes bit-exactly (model, optimizer, schedule
position, iteration counter, best-so-far and every RNG state), and the trial's runtime options
(channels_last, bf16 autocast, torch.compile, cuDNN autotuning; docs/gpu.md). A training step
never reads a tensor back to the host: loss and accuracy are summed on the device and read once
per epoch.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from typing import Any, ContextManager, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import TrialConfig
from .data import Loaders, epoch_seed, make_loaders
from .models import Layers, count_parameters, create_model
from .supermask import rerandomize_

Device = Union[str, torch.device, None]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}
# cuBLAS is deterministic only with a fixed workspace (PyTorch's reproducibility notes); the
# variable must be set before the process's first cuBLAS call.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def lr_at(cfg: TrialConfig, epoch: int) -> float:
    """Learning rate of 0-based `epoch`: set once, before the epoch runs (docs/method.md
    section 6)."""
    if cfg.lr_scheduler == "CustomCosineLR":
        w, f, e_total = cfg.warmup_epochs, cfg.finetuning_epochs, cfg.epochs
        if epoch < w:
            return cfg.lr * (epoch + 1) / w
        if epoch >= e_total - f:
            return cfg.finetuning_lr
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / (e_total - w - f))) * cfg.lr
    if cfg.lr_scheduler == "MultiStepLR":
        return cfg.lr * cfg.multisteplr_gamma ** bisect.bisect_right(cfg.lr_milestones, epoch)
    return cfg.lr


def resolve_device(cfg: TrialConfig, device: Device = None) -> torch.device:
    """The trial's device: the one given, else CUDA when allowed and present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if cfg.use_cuda and torch.cuda.is_available() else "cpu")


def cudnn_flags(cfg: TrialConfig) -> tuple[bool, bool]:
    """(cudnn.deterministic, cudnn.benchmark) for a CUDA trial. Autotuning times candidate
    algorithms and keeps the fastest, which can change from run to run, so it is on only when
    determinism is not asked for (TrialConfig refuses both at once)."""
    benchmark = not cfg.deterministic if cfg.cudnn_benchmark is None else cfg.cudnn_benchmark
    return cfg.deterministic, benchmark


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def use_deterministic_cuda(deterministic: bool) -> None:
    """Process-wide determinism switches of a CUDA trial (set for every trial, so that a reused
    actor does not keep the previous trial's): deterministic algorithms where PyTorch has them,
    and cuBLAS's fixed workspace when the environment does not choose one already.

    `warn_only=True`: an op without a deterministic CUDA kernel is reported as a warning naming
    it instead of failing the trial. A CIFAR trial runs none (ResNet's 1x1 global pooling is
    computed as a mean; cross-entropy on (N, C) logits is not the spatial NLL loss PyTorch flags);
    another network or torch version may, and then keeps running and says so.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def reset_compiler() -> None:
    """Forget every compiled graph of this process (`torch.compiler.reset`, Dynamo's documented
    reset). A reused Ray actor runs trial after trial in one process: without this, the graphs of
    earlier trials count against Dynamo's recompile limit, past which it silently runs the model
    eagerly."""
    torch.compiler.reset()


class AutocastForward(nn.Module):
    """Runs `module`'s forward under autocast to `dtype`.

    DataParallel's replica threads re-enter autocast with only `enabled` set, which in a new
    thread means CUDA's default dtype, float16 (without a GradScaler). Opening autocast with the
    dtype inside the forward that every replica runs keeps a bf16 trial in bf16.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type, self.dtype = device_type, dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(x)


def data_parallel(model: nn.Module, num_gpus: int, autocast_dtype: Optional[torch.dtype]) -> nn.DataParallel:
    """`model` split over the first `num_gpus` GPUs, with the trial's autocast dtype re-entered in
    each replica (AutocastForward)."""
    inner = model if autocast_dtype is None else AutocastForward(model, "cuda", autocast_dtype)
    return nn.DataParallel(inner, device_ids=list(range(num_gpus)))


def replica_bn_splits(bn_splits: int, replicas: int) -> int:
    """The parts of its own batch each of `replicas` DataParallel replicas normalises separately,
    so that BatchNorm sees bn_splits parts of the whole batch. With bn_splits 1 each replica
    still normalises its own part: DataParallel cannot do otherwise (no synchronised BatchNorm)."""
    if replicas <= 1:
        return bn_splits
    if bn_splits == 1:
        return 1
    if bn_splits % replicas:
        raise ValueError(f"bn_splits = {bn_splits} cannot be spread over {replicas} GPUs: use a "
                         f"multiple of {replicas}, or one GPU")
    return bn_splits // replicas


def _num_samples(loader: Any) -> Optional[int]:
    """Images in one pass of a training loader, when it says (DeviceLoader, or a loader wrapping
    a torch DataLoader over a sized dataset)."""
    n = getattr(loader, "num_samples", None)
    if n is None:
        dataset = getattr(getattr(loader, "loader", None), "dataset", None)
        n = len(dataset) if hasattr(dataset, "__len__") else None
    return n


class Trainer:
    """Trains one TrialConfig. `train_epoch()` runs one epoch and returns its metrics
    (docs/experiments.md, "Metrics"); after the last epoch they include `test_acc` and
    `test_loss`. Accuracies are percentages.

    Resuming from `state_dict()` is bit-exact on CPU. On CUDA with `deterministic=True` it is
    bit-exact only on the same GPU model with the same driver, CUDA, cuDNN and PyTorch versions
    (kernels and their reduction orders differ between GPUs and versions). A checkpoint can move
    between CPU and GPU: the data-order generator's state is device-specific, so the trial then
    continues from a stream seeded by (seed, epoch), deterministic but not the batches an
    uninterrupted run would have drawn (a warning says so).
    """

    def __init__(self, config: TrialConfig, device: Device = None, num_gpus: int = 1) -> None:
        self.config = cfg = config
        self.device = resolve_device(cfg, device)
        seed_everything(cfg.seed)
        if self.device.type == "cuda":  # CPU trials leave the process-wide switches alone
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags(cfg)
            use_deterministic_cuda(cfg.deterministic)
        # Data order and augmentation draw from their own generator, so that they do not
        # depend on how many numbers model init or re-randomisation consumed.
        self.data_generator = torch.Generator(device=self.device)
        self.data_generator.manual_seed(cfg.seed)
        self.loaders: Loaders = make_loaders(cfg, self.device, self.data_generator)
        info = self.loaders.info
        replicas = 1
        if self.device.type == "cuda" and num_gpus > 1 and torch.cuda.device_count() > 1:
            replicas = min(num_gpus, torch.cuda.device_count())
        # Each DataParallel replica already normalises its own part of the batch.
        layers = dataclasses.replace(Layers.from_config(cfg),
                                     bn_splits=replica_bn_splits(cfg.bn_splits, replicas))
        self.model = create_model(cfg.model, cfg, info.num_classes, info.image_size,
                                  layers=layers).to(self.device)
        if cfg.channels_last:  # 4-d weights and scores NHWC; values (and checkpoints) unchanged
            self.model.to(memory_format=torch.channels_last)
        self.autocast_dtype: Optional[torch.dtype] = AUTOCAST_DTYPES.get(cfg.autocast or "")
        # A trial given several GPUs splits each batch over them; re-randomisation and
        # checkpoints act on `self.model`, which the replicas share.
        self.net: torch.nn.Module = self.model
        if replicas > 1:
            self.net = data_parallel(self.model, replicas, self.autocast_dtype)
        self.compiled = False
        if cfg.compile:
            if isinstance(self.net, torch.nn.DataParallel):
                warnings.warn("compile=True is ignored for a trial split over several GPUs "
                              "(DataParallel replicates the module at every step)", stacklevel=2)
            else:
                reset_compiler()
                # The compiled module shares the model's parameters and buffers, so in-place
                # re-randomisation and checkpoints of `self.model` see and change the same tensors.
                # dynamic=False with one training and one evaluation batch shape (see
                # iters_per_epoch and evaluate): two graphs a trial, never a shape recompile.
                self.net = torch.compile(self.model, dynamic=False)
                self.compiled = True
        score_only = cfg.train_mode == "score_only"
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.endswith("scores") if score_only else True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "SGD":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.param_counts = count_parameters(self.model)
        self.epoch = 0          # epochs completed (= position of the LR schedule)
        self.iteration = 0      # training iterations completed, over all epochs
        self.best_val_acc = -1.0
        self.best_epoch = 0
        self.diverged = False   # an epoch's training loss was not finite: the trial stops

    # ------------------------------------------------------------------ schedule

    @property
    def done(self) -> bool:
        return self.diverged or self.epoch >= self.config.epochs

    @property
    def iters_per_epoch(self) -> int:
        """Training iterations of one epoch. A compiled trial leaves out the epoch's last partial
        batch (unless the dataset is smaller than one batch): a second batch shape would cost a
        recompilation, and compile's point is speed, not the last few images of an epoch."""
        n = len(self.loaders.train)
        if self.compiled:
            samples = _num_samples(self.loaders.train)
            if samples is not None and samples >= self.config.batch_size:
                n = samples // self.config.batch_size
        return min(n, self.config.debug_max_iters) if self.config.debug_max_iters else n

    @functools.cached_property  # fixed for the trial; read at every step
    def rerand_interval(self) -> Optional[int]:
        """Iterations between re-randomisations, or None when IteRand is off."""
        cfg = self.config
        if cfg.method != "iterand":  # bernoulli with r = 0 is edge-popup: skip the no-op draws
            return None
        if cfg.rerand_freq_unit == "epoch":  # rerand_freq times an epoch
            return max(1, self.iters_per_epoch // cfg.rerand_freq)
        return cfg.rerand_freq

    # ------------------------------------------------------------------ loops

    def train_epoch(self) -> dict[str, Any]:
        """Run the next epoch; return its metrics (and test metrics after the last epoch)."""
        if self.done:
            raise RuntimeError("all epochs are done")
        cfg, model, opt = self.config, self.model, self.optimizer
        start = time.perf_counter()
        lr = lr_at(cfg, self.epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        set_epoch = getattr(self.loaders.train, "set_epoch", None)
        if set_epoch is not None:  # ImageNet's sampler re-seeds from (seed, epoch)
            set_epoch(self.epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # allocator counters: no sync
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for i, (x, y) in enumerate(self.loaders.train):
            if i >= self.iters_per_epoch:
                break
            batch_loss, batch_correct = self.train_step(x, y)
            # Accumulate on the device; read back once per epoch.
            loss_sum += batch_loss
            correct += batch_correct
            seen += y.shape[0]
        val_loss, val_acc = self.evaluate("val")
        self.epoch += 1
        if val_acc > self.best_val_acc:
            self.best_val_acc, self.best_epoch = val_acc, self.epoch
        # The epoch's one read of its summed loss also tells whether training diverged.
        train_loss = loss_sum.item() / max(seen, 1)
        self.diverged = not math.isfinite(train_loss)
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "train_acc": 100.0 * correct.item() / max(seen, 1),
            "train_loss": train_loss,
            "diverged": self.diverged,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "lr": lr,
            "iterations": self.iteration,
            **self.param_counts,
        }
        if self.done and cfg.evaluate_test and not self.diverged:
            test_loss, test_acc = self.evaluate("test")
            metrics.update(test_acc=test_acc, test_loss=test_loss)
        if self.device.type == "cuda":  # this epoch's peak, training and evaluation
            metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            # What the caching allocator held, which is what a memory cap limits.
            metrics["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
        metrics["epoch_seconds"] = time.perf_counter() - start
        # The wall clock (time.time()) at the epoch's end: places this epoch against other
        # trials' to well under a second (Ray's `timestamp` is whole seconds).
        metrics["epoch_end_time"] = time.time()
        return metrics

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One training iteration on the batch (x, y): IteRand's re-randomisation when it is due
        (docs/method.md section 3), forward, backward, optimizer step. Returns the batch's summed
        loss and its number of correct predictions as device tensors: nothing here waits for the
        device."""
        cfg = self.config
        interval = self.rerand_interval
        if interval is not None and (self.iteration + 1) % interval == 0:
            rerandomize_(self.model, cfg.rerand_mode, cfg.rerand_lambda, cfg.rerand_mu, cfg.rerand_rate)
        with self.autocast():
            out = self.net(self.to_input(x))
            loss = F.cross_entropy(out, y)  # autocast computes it in fp32
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return loss.detach() * y.shape[0], (out.detach().argmax(1) == y).sum()

    def autocast(self) -> ContextManager:
        """The mixed-precision context of forward passes (a no-op for fp32 trials)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_input(self, x: Tensor) -> Tensor:
        """A batch in the network's memory format (NHWC with channels_last)."""
        if self.config.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def fit(self) -> Iterator[dict[str, Any]]:
        """Yield the metrics of every remaining epoch."""
        while not self.done:
            yield self.train_epoch()

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> tuple[float, float]:
        """(mean loss, accuracy %) of the current model on `val` or `test`."""
        loader = self.loaders.val if split == "val" else self.loaders.test
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        # A compiled trial pads the last partial batch to the evaluation batch size (one shape,
        # no recompile); with BatchNorm's running statistics every image's output is independent
        # of the others in eval mode, so the padding rows are simply dropped. BatchNorm without
        # running statistics normalises by the batch: no padding then (a recompile instead).
        pad_to = self.config.batch_size_eval if (
            self.compiled and self.config.bn_track_running_stats) else 0
        for i, (x, y) in enumerate(loader):
            if self.config.debug_max_eval_iters and i >= self.config.debug_max_eval_iters:
                break
            n = y.shape[0]
            if n < pad_to:
                x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
            with self.autocast():
                out = self.net(self.to_input(x))[:n]
                batch_loss = F.cross_entropy(out, y, reduction="sum")
            loss_sum += batch_loss
            correct += (out.argmax(1) == y).sum()
            seen += y.shape[0]
        return loss_sum.item() / max(seen, 1), 100.0 * correct.item() / max(seen, 1)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly; loadable with torch.load(weights_only=True)."""
        np_state = np.random.get_state(legacy=False)
        rng = {
            "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]),
                      "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),  # always the CPU generator's
            # A generator's state is device-specific (16 bytes on CUDA, 5,056 on CPU): the tag
            # tells load_state_dict whether it can be restored where the trial resumes.
            "data": self.data_generator.get_state(),
            "data_device": self.data_generator.device.type,
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()  # one per visible GPU
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "diverged": self.diverged,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = TrialConfig.from_dict(state["config"])
        for key in ("model", "dataset", "train_mode", "seed"):
            if getattr(saved, key) != getattr(self.config, key):
                raise ValueError(f"checkpoint is for {key}={getattr(saved, key)!r}, "
                                 f"this trainer has {getattr(self.config, key)!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])
        self.best_val_acc, self.best_epoch = float(state["best_val_acc"]), int(state["best_epoch"])
        self.diverged = bool(state.get("diverged", False))
        rng = state["rng"]
        random.setstate(rng["python"])
        npr = rng["numpy"]
        np.random.set_state({"bit_generator": "MT19937",
                             "state": {"key": npr["key"].numpy().astype(np.uint32), "pos": npr["pos"]},
                             "has_gauss": npr["has_gauss"], "gauss": npr["gauss"]})
        torch.set_rng_state(rng["torch"])
        reseeded = []
        if not self._restore_data_rng(rng["data"], rng.get("data_device")):
            self.data_generator.manual_seed(self._resume_seed(0))
            reseeded.append("data order and augmentation")
        if torch.cuda.is_available():
            # A checkpoint may hold more CUDA states than this machine has GPUs (or none, from a
            # machine without CUDA): restore what fits; GPUs without a saved state (all of them,
            # from a CPU checkpoint) are seeded from (seed, epoch).
            saved = list(rng.get("cuda") or [])
            count = torch.cuda.device_count()
            for index, state_bytes in enumerate(saved[:count]):
                torch.cuda.set_rng_state(state_bytes, index)
            if not saved:
                for index in range(count):
                    torch.cuda.default_generators[index].manual_seed(self._resume_seed(1))
                if self.device.type == "cuda":
                    reseeded.append("CUDA draws (IteRand's re-randomisation)")
        if reseeded:
            warnings.warn(
                f"the checkpoint was written on another kind of device ({rng.get('data_device', 'unknown')}"
                f", resuming on {self.device.type}): {' and '.join(reseeded)} continue from streams "
                f"seeded by (seed {self.config.seed}, epoch {self.epoch}): deterministic, but not "
                "the draws an uninterrupted run would have made", stacklevel=2)

    def _resume_seed(self, stream: int) -> int:
        """The seed of RNG stream `stream` for a trial resumed at this epoch on another kind of
        device: a function of (seed, epoch) only, so every such resume draws the same."""
        return epoch_seed(self.config.seed * 2 + stream, self.epoch)

    def _restore_data_rng(self, state_bytes: Tensor, device_type: Optional[str]) -> bool:
        """Restore the data generator's saved state; False when it was saved on another kind of
        device. Checkpoints from before the device tag are tried as they are."""
        if device_type is not None and device_type != self.data_generator.device.type:
            return False
        try:
            self.data_generator.set_state(state_bytes)
        except RuntimeError:  # untagged, and the size of another device's state
            return False
        return True

    def save(self, path: str) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
