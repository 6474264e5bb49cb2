"""Training throughput on one GPU: our pipeline against a reference-style one, and k trials
sharing the GPU as real Ray Tune trials. Synthetic CIFAR-shaped data (`synthetic_cifar10`:
fixed-seed random uint8 32x32 images, CIFAR-10's split sizes), since the GPU machine cannot
fetch a dataset. Edge-popup trials (score_only; p 0.5 for Conv6, 0.6 for ResNet18), batch 128.

a) Training images/s of Conv6x1.0 and ResNet18x1.0, side by side in one process:
   - reference-style: torchvision PIL transforms (pad 4, RandomResizedCrop 32, flip, ToTensor,
     Normalize) in a DataLoader with 4 worker processes and pinned memory, batches copied to
     the GPU, and a masked layer that reads its threshold to the host (`.item()`) in every layer
     at every step, plus the per-step `loss.item()` of a loss meter;
   - ours: the Trainer's own `train_step` on batches of the device-resident uint8 dataset
     augmented on the GPU (DeviceLoader), thresholds on the device, nothing read per step;
     with the default options (faithful fp32, deterministic cuDNN) and each runtime option:
     channels_last, bf16 autocast, both, cuDNN autotuning, torch.compile.
   Each pipeline is timed with CUDA events over --steps steps after --warmup warm-up steps;
   cuDNN is deterministic, without autotuning, for every row except `cudnn.benchmark`.
b) Aggregate training images/s of k trials at once on one GPU at 1/k each (k = 1, 2, 4, 8), for
   Conv6x0.25 and ResNet18x0.25, run as real Ray Tune trials (`iterand_tune.tune.run` with
   `gpus_per_trial=1/k`, one CPU each; 6 full epochs per trial). Every trial reports
   `epoch_seconds`, `epoch_end_time` (its wall clock at the epoch's end) and `iterations` per
   epoch; from those each epoch is placed on the wall clock, and the aggregate is the training
   images of all trials inside the window
   where all k were training (from the latest start of a second epoch, so CUDA start-up is left
   out, to the earliest end of a last epoch) over the window's length. Pauses between epochs
   (report, checkpoint) count as time without images, as in a real run; `epoch_seconds` also
   holds one 512-image validation batch, so rates are slightly low.
c) Peak GPU memory: per pipeline in (a) (`torch.cuda.max_memory_allocated`, the 184 MB
   device-resident dataset included for ours, and `max_memory_reserved`, what the caching
   allocator held), per trial in (b) (its `peak_gpu_memory_mb` and `peak_gpu_reserved_mb`).
   The memory (a) cached is released before (b) starts.

The torch.compile rows check Dynamo's counters: a row counts as compiled only when Dynamo built
a graph during the warm-up, without graph breaks or failed frames, and nothing was compiled
again while timing (which runs under `torch.compiler.set_stance("fail_on_recompile")`). An
eager fallback (e.g. past the recompile limit) is reported as such, never as compiled.

Hardware: written for one NVIDIA H200 (141 GB) with 16 CPU cores. It starts no measurement
expected to end after --budget-s seconds (default 420), so that a whole run stays under 8
minutes; the torch.compile rows of (a) run last for that reason. No figures have been measured
with it yet. `benchmarks/gpu_check.py` calls these functions and writes their results into its
report.

Usage: python benchmarks/gpu_throughput.py [--steps 100] [--warmup 20] [--ks 1 2 4 8]
           [--epochs 6] [--iters 0] [--no-compile] [--cpu] [--skip-a] [--skip-b] [--budget-s 420]
Without a GPU (or with --cpu) it says so, runs the same code on a tiny size on CPUs (Conv6x0.25 and
ResNet18x0.25 at batch 16 in (a); Conv6x0.25 trials with k = 1, 2 in (b), at 1/k of a logical
GPU, training on CPUs) and exits 0.
Every ratio is also printed on a line of its own: `ratio <what>: <value>`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from iterand_tune.config import TrialConfig
from iterand_tune.data import IMAGENET_MEAN, IMAGENET_STD, load_synthetic
from iterand_tune.models import Layers, create_model
from iterand_tune.supermask import SparseConv2d, SparseLinear, mask_k
from iterand_tune.training import Trainer

SPARSITY = {"conv6": 0.5, "resnet18": 0.6}  # the paper's p for Figure 2 (docs/method.md section 7)
REF_WORKERS = 4


def sparsity_of(model: str) -> float:
    return SPARSITY[model.split("x")[0]]


def edgepopup(model: str, **kw: Any) -> dict[str, Any]:
    """TrialConfig values of an edge-popup trial on synthetic CIFAR-10."""
    return dict(model=model, dataset="synthetic_cifar10", train_mode="score_only", bn_affine=False,
                conv_sparsity=sparsity_of(model), lr=0.1, weight_decay=5e-4, **kw)


class Budget:
    """Wall-clock budget: measurements that would start after it are skipped, and said so."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self, what: str, need: float = 0.0) -> bool:
        """True (and says so) when a measurement expected to take `need` seconds would end
        past the budget."""
        if self.elapsed() + need <= self.seconds:
            return False
        print(f"  skipped {what}: it would end past the {self.seconds:.0f} s budget", flush=True)
        return True


def timed(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step` after `warmup` calls: CUDA events on a GPU."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - t0
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> Optional[float]:
    """Peak memory allocated since the last reset, MB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def peak_reserved_mb(device: torch.device) -> Optional[float]:
    """Peak memory the caching allocator held since the last reset, MB (None off CUDA): what
    a per-process memory cap limits."""
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None


def dynamo_counts() -> dict[str, int]:
    """Dynamo's counters that tell compiled from eager: graphs built, frames it tried to compile
    and those it compiled, graph breaks."""
    from torch._dynamo.utils import counters  # only compile rows need Dynamo

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "frames": int(counters["frames"]["total"]), "frames_ok": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def compile_verdict(before: dict[str, int], warm: dict[str, int], after: dict[str, int]) -> tuple[bool, str]:
    """(compiled?, why) from Dynamo's counters before the warm-up, after it and after timing."""
    delta = {k: warm[k] - before[k] for k in warm}
    if delta["graphs"] < 1:
        return False, "Dynamo built no graph during the warm-up: the steps ran eagerly"
    if delta["frames_ok"] < delta["frames"]:
        return False, f"{delta['frames'] - delta['frames_ok']} frame(s) failed to compile (eager)"
    if delta["graph_breaks"]:
        return False, f"{delta['graph_breaks']} graph break(s): partly eager"
    if after["frames"] != warm["frames"]:
        return False, "Dynamo compiled again while timing (a recompile, or an eager fallback)"
    return True, f"{delta['graphs']} graph(s), no recompile while timing"


def _timing_stance(compiled: bool) -> Any:
    """While timing a compiled step, a recompile is an error rather than a silent slowdown."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if not compiled or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("fail_on_recompile")


# ----------------------------------------------------------------------------- (a) ours


def full_batches(loader: Any, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of `loader` forever, leaving out an epoch's last partial batch (one shape)."""
    while True:
        for x, y in loader:
            if len(y) == batch:
                yield x, y


def ours(model: str, options: dict[str, Any], batch: int, steps: int, warmup: int,
         device: torch.device, max_train: Optional[int]) -> dict[str, Any]:
    """The Trainer's own step on device-resident augmented batches: images_per_s,
    peak_allocated_mb, peak_reserved_mb, and for a compile row `compiled` (bool) and
    `compile_note` from Dynamo's counters; a row whose steps fell back to eager has
    images_per_s None (it measured something else)."""
    reset_memory(device)
    cfg = TrialConfig(**edgepopup(model, batch_size=batch, epochs=1, max_train_dataset_size=max_train,
                                  **options))
    trainer = Trainer(cfg, device=device)
    trainer.model.train()
    batches = full_batches(trainer.loaders.train, batch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)

    def step() -> None:  # what train_epoch does per iteration
        nonlocal loss_sum, correct
        x, y = next(batches)
        batch_loss, batch_correct = trainer.train_step(x, y)
        loss_sum += batch_loss
        correct += batch_correct

    row: dict[str, Any] = {}
    if cfg.compile:
        before = dynamo_counts()
        for _ in range(warmup):
            step()
        warm = dynamo_counts()
        try:
            with _timing_stance(True):
                seconds = timed(step, steps, 0, device)
        except Exception as err:  # noqa: BLE001 - fail_on_recompile: reported in the row
            seconds = None
            row.update(compiled=False, compile_note=f"recompiled while timing: {str(err).splitlines()[0]}")
        else:
            ok, note = compile_verdict(before, warm, dynamo_counts())
            row.update(compiled=ok, compile_note=note)
            if not ok or not trainer.compiled:
                seconds = None  # never report an eager (or partly eager) run as compiled
    else:
        seconds = timed(step, steps, warmup, device)
    if not torch.isfinite(loss_sum).item():  # read once, after the timing
        raise RuntimeError(f"{model} {options}: the training loss is not finite")
    row.update(images_per_s=steps * batch / seconds if seconds else None,
               peak_allocated_mb=peak_mb(device), peak_reserved_mb=peak_reserved_mb(device))
    return row


# ----------------------------------------------------------------------------- (a) reference


class _HostThresholdMask(torch.autograd.Function):
    """The edge-popup mask with its threshold read to the host, as reference code does."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        t = scores.detach().flatten().sort().values[k - 1].item()  # one host sync per layer
        return (scores >= t).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None  # straight-through


class _HostMaskMixin:
    def effective_weight(self) -> torch.Tensor:
        return self.weight * _HostThresholdMask.apply(self.scores, mask_k(self.scores.numel(), self.sparsity))


class RefConv2d(_HostMaskMixin, SparseConv2d):
    pass


class RefLinear(_HostMaskMixin, SparseLinear):
    pass


class RefLayers(Layers):
    """Our layers with the reference-style mask: same parameters, same initialisation."""

    def conv(self, *args: Any, **kwargs: Any) -> SparseConv2d:
        layer = super().conv(*args, **kwargs)
        layer.__class__ = RefConv2d
        return layer

    def linear(self, *args: Any, **kwargs: Any) -> SparseLinear:
        layer = super().linear(*args, **kwargs)
        layer.__class__ = RefLinear
        return layer


class PILImages(torch.utils.data.Dataset):
    """HWC uint8 images turned into PIL images one at a time, as torchvision's CIFAR10 does."""

    def __init__(self, images_hwc: Any, labels: list[int], transform: Callable) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference(model: str, batch: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """A reference-style pipeline: PIL transforms in DataLoader workers, host-read thresholds, a
    loss meter reading the loss every step. Returns images_per_s, peak_allocated_mb,
    peak_reserved_mb."""
    from torchvision import transforms as T

    reset_memory(device)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    splits = load_synthetic(batch * (warmup + steps + 4))
    transform = T.Compose([T.Pad(4), T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = PILImages(splits.train_x.permute(0, 2, 3, 1).numpy(), splits.train_y.tolist(), transform)
    with warnings.catch_warnings():  # 4 workers is the point, even where there are fewer cores
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                             num_workers=REF_WORKERS, pin_memory=device.type == "cuda")
        batches = full_batches(loader, batch)
        next(batches)  # starts the workers
    cfg = TrialConfig(**edgepopup(model, batch_size=batch))
    net = create_model(model, cfg, layers=RefLayers.from_config(cfg)).to(device)
    for name, p in net.named_parameters():
        p.requires_grad_(name.endswith("scores"))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                          momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    net.train()
    losses: list[float] = []

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    seconds = timed(step, steps, warmup, device)
    row = dict(images_per_s=steps * batch / seconds, peak_allocated_mb=peak_mb(device),
               peak_reserved_mb=peak_reserved_mb(device))
    batches.close()  # drops the loader's iterator, which stops its workers
    return row


# Rows of (a) for our pipeline. On a CPU only the first and the combined one run (a smoke
# check); torch.compile rows run after (b), so that a slow compilation cannot crowd it out.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("ours fp32 (defaults)", {}),
    ("ours channels_last", dict(channels_last=True)),
    ("ours bf16", dict(autocast="bf16")),
    ("ours channels_last+bf16", dict(channels_last=True, autocast="bf16")),
    ("ours cudnn.benchmark", dict(deterministic=False)),
]
COMPILE_VARIANTS: list[tuple[str, dict[str, Any]]] = [("ours compile", dict(compile=True))]
COMPILE_SECONDS = 120  # what one compilation (forward and backward) may take: a row starts only with this left
CPU_VARIANTS = ("ours fp32 (defaults)", "ours channels_last+bf16")
A_HEAD = f"{'model':<15}{'pipeline':<33}{'img/s':>10}{'vs ref':>9}{'peak MB':>10}{'reserved':>10}"
REFERENCE_LABEL = "reference-style (PIL, .item)"


def part_a(models: list[str], variants: list[tuple[str, dict[str, Any]]], ref_rates: dict[str, float],
           batch: int, steps: int, warmup: int, device: torch.device, budget: Budget,
           max_train: Optional[int], rows: Optional[list[dict[str, Any]]] = None) -> list[tuple[str, float]]:
    """Rows of (a), printed and appended to `rows` (dicts: model, pipeline, options,
    images_per_s, vs_reference, peak_allocated_mb, peak_reserved_mb[, compiled, compile_note]);
    measures the reference of a model first unless `ref_rates` has it. Returns the ratios of
    the default rows to the reference."""
    rows = [] if rows is None else rows
    ratios = []
    for model in models:
        if model not in ref_rates:
            if budget.spent(f"(a) {model}"):
                continue
            ref = reference(model, batch, steps, warmup, device)
            ref_rates[model] = ref["images_per_s"]
            rows.append(dict(model=model, pipeline=REFERENCE_LABEL, options={}, vs_reference=1.0, **ref))
            _print_a(rows[-1])
        for label, options in variants:
            if device.type == "cpu" and label not in CPU_VARIANTS:
                continue
            if budget.spent(f"(a) {model} {label}", COMPILE_SECONDS if options.get("compile") else 0):
                continue
            got = ours(model, options, batch, steps, warmup, device, max_train)
            rate = got["images_per_s"]
            ratio = rate / ref_rates[model] if rate else None
            rows.append(dict(model=model, pipeline=label, options=dict(options), vs_reference=ratio, **got))
            _print_a(rows[-1])
            if not options and ratio is not None:
                ratios.append((f"a) {model} ours/reference images/s", ratio))
    return ratios


def _print_a(row: dict[str, Any]) -> None:
    rate, ratio = row["images_per_s"], row["vs_reference"]
    line = (f"{row['model']:<15}{row['pipeline']:<33}{_num(rate, 0):>10}{_num(ratio, 2):>9}"
            f"{_mb(row['peak_allocated_mb']):>10}{_mb(row['peak_reserved_mb']):>10}")
    if "compiled" in row:
        line += f"  ({'compiled' if row['compiled'] else 'NOT compiled'}: {row['compile_note']})"
    print(line, flush=True)


def _num(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


# ----------------------------------------------------------------------------- (b)


def read_trials(run_path: str) -> list[list[dict[str, Any]]]:
    """Every trial's reported rows (result.json), one list per trial."""
    trials = []
    for path in sorted(glob.glob(os.path.join(run_path, "*", "result.json"))):
        with open(path) as f:
            trials.append([json.loads(line) for line in f if line.strip()])
    return trials


def _batch_size(row: dict[str, Any]) -> int:
    """The batch size of a reported row: its own, or its Ray Tune trial config's."""
    return int(row["batch_size"]) if "batch_size" in row else int(row["config"]["trial"]["batch_size"])


def epoch_spans(rows: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """(start, end, training images) on the wall clock of every epoch after the first (which
    holds CUDA's start-up). The end is the trial's own `epoch_end_time` (time.time() at the
    epoch's end); rows without it (older results) fall back on Ray's clock, whose `timestamp` is
    whole seconds: the trial's clock offset is then the largest `timestamp - time_total_s`."""
    offset = None
    if not all("epoch_end_time" in r for r in rows):
        offset = max(r["timestamp"] - r["time_total_s"] for r in rows)
    spans = []
    for prev, row in zip(rows, rows[1:]):
        end = row["epoch_end_time"] if offset is None else offset + row["time_total_s"]
        images = (row["iterations"] - prev["iterations"]) * _batch_size(row)
        spans.append((end - row["epoch_seconds"], end, images))
    return spans


def aggregate_rate(trials: list[list[dict[str, Any]]]) -> tuple[float, list[float], bool]:
    """(aggregate images/s, per-trial images/s, measured while all trials ran?).

    The window runs from the latest start of a trial's second epoch to the earliest end of a
    trial's last epoch, so that every trial was training throughout; each epoch contributes its
    images in proportion to its time inside the window, and the pauses between epochs (report,
    checkpoint) count as time without images, as they do in a real run. Without such a window
    (trials that did not overlap) every trial's rate over its own epochs is used instead.
    """
    spans = [epoch_spans(rows) for rows in trials]
    lo, hi = max(s[0][0] for s in spans), min(s[-1][1] for s in spans)
    if hi <= lo:
        rates = [sum(n for _, _, n in s) / sum(b - a for a, b, _ in s) for s in spans]
        return sum(rates), rates, False
    rates = []
    for s in spans:
        images = sum(n * max(0.0, min(b, hi) - max(a, lo)) / (b - a) for a, b, n in s)
        rates.append(images / (hi - lo))
    return sum(rates), rates, True


def part_b(models: list[str], ks: list[int], epochs: int, iters: int, batch: int, gpu: bool,
           budget: Budget, max_train: Optional[int], batch_eval: int,
           rows: Optional[list[dict[str, Any]]] = None) -> list[tuple[str, float]]:
    """Rows of (b) as real Ray Tune trials, printed and appended to `rows` (dicts: model, k,
    share, per_trial_images_per_s, aggregate_images_per_s, vs_k1, overlapped,
    peak_allocated_mb, peak_reserved_mb); returns the ratios to the first k."""
    import ray  # only (b) needs Ray: a GPU machine without it runs (a) and gpu_check's packing

    from iterand_tune.experiments import Experiment
    from iterand_tune.tune import RunOptions, grid_marker, run

    rows = [] if rows is None else rows

    # Without CUDA a logical GPU still exercises the 1/k requests; Ray refuses one where
    # CUDA_VISIBLE_DEVICES is set to nothing, and then the trials ask for CPUs only.
    gpus = 1 if gpu or os.environ.get("CUDA_VISIBLE_DEVICES") != "" else 0
    where = "a GPU" if gpu else "a logical GPU (the trials train on CPUs)" if gpus else "no GPU"
    length = f"{iters} iterations" if iters else "a full epoch"
    print(f"\nb) k Ray Tune trials at once, each with 1/k of {where} and 1 CPU, edge-popup, "
          f"batch {batch}, {epochs} epochs of {length} each", flush=True)
    head = (f"{'model':<15}{'k':>3}{'img/s per trial':>17}{'aggregate img/s':>17}{'vs k=1':>8}"
            f"{'peak MB/trial':>15}")
    print(head + "\n" + "-" * len(head), flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose 0: no tables between rows
    storage = tempfile.mkdtemp(prefix="gpu_throughput_")
    cpus = os.cpu_count() or 1
    started = not ray.is_initialized()  # a Ray this process already uses (a test's) is kept
    if started:
        ray.init(address="local", num_cpus=max(cpus, max(ks)), num_gpus=gpus,
                 include_dashboard=False, log_to_driver=False,
                 object_store_memory=None if gpu else 200 * 2**20)
    ratios, finished = [], False
    try:
        for model in models:
            base, last = None, 0.0
            for i, k in enumerate(ks):
                # Doubling k at most doubles how long each trial takes (no gain from sharing).
                if budget.spent(f"(b) {model} k={k}", last * k / ks[i - 1] if i else 0.0):
                    break
                t0 = time.perf_counter()
                config = edgepopup(model, epochs=epochs, batch_size=batch, batch_size_eval=batch_eval,
                                   debug_max_iters=iters or None, debug_max_eval_iters=1,
                                   max_train_dataset_size=max_train, use_cuda=gpu)
                name = f"tput_{model.replace('.', '_')}_k{k}"
                exp = Experiment(name, config, {"seed": list(range(1, k + 1))})
                opts = RunOptions(storage_path=storage, name=name, marker=grid_marker([exp]),
                                  gpus_per_trial=gpus / k, cpus_per_trial=1, max_concurrent=k,
                                  max_failures=0, verbose=0)
                summary = run(opts, echo=lambda _line: None)
                if not summary.ok:
                    raise SystemExit(f"(b) {model} k={k}: trials failed or did not finish "
                                     f"({summary.errored or summary.unfinished}); see {opts.path}")
                last = time.perf_counter() - t0
                trials = read_trials(opts.path)
                total, rates, overlapped = aggregate_rate(trials)
                base = total if k == ks[0] else base
                mems = [r["peak_gpu_memory_mb"] for rs in trials for r in rs if "peak_gpu_memory_mb" in r]
                held = [r["peak_gpu_reserved_mb"] for rs in trials for r in rs if "peak_gpu_reserved_mb" in r]
                note = "" if overlapped else "  (the trials did not overlap: each one's own rate)"
                print(f"{model:<15}{k:>3}{statistics.fmean(rates):>17.0f}{total:>17.0f}{total / base:>8.2f}"
                      f"{_mb(max(mems) if mems else None):>15}{note}", flush=True)
                rows.append(dict(model=model, k=k, share=1 / k, per_trial_images_per_s=rates,
                                 aggregate_images_per_s=total, vs_k1=total / base, overlapped=overlapped,
                                 peak_allocated_mb=max(mems) if mems else None,
                                 peak_reserved_mb=max(held) if held else None))
                if k != ks[0]:
                    ratios.append((f"b) {model} aggregate k={k}/k={ks[0]}", total / base))
        finished = True
    finally:
        if started:
            ray.shutdown()
        if finished:
            shutil.rmtree(storage, ignore_errors=True)
        else:
            print(f"(b) stopped early: its Ray Tune results are kept in {storage}", flush=True)
    return ratios


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, help="(a) timed steps (GPU 100, CPU 2)")
    ap.add_argument("--warmup", type=int, help="(a) warm-up steps, compilation included (GPU 20, CPU 3)")
    ap.add_argument("--ks", type=int, nargs="+", help="(b) trials per GPU (GPU 1 2 4 8, CPU 1 2)")
    ap.add_argument("--epochs", type=int, help="(b) epochs per trial (GPU 6, CPU 3)")
    ap.add_argument("--iters", type=int, help="(b) iterations per epoch, 0 for a full epoch "
                                              "(GPU 0 = 351 iterations, CPU 3)")
    ap.add_argument("--no-compile", action="store_true", help="(a) leave out the torch.compile rows")
    ap.add_argument("--cpu", action="store_true", help="the tiny CPU path even where there is a GPU")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no measurement expected to end after this many seconds (default 420)")
    args = ap.parse_args(argv)
    if args.epochs is not None and args.epochs < 2:
        ap.error("--epochs must be at least 2: the first epoch (start-up) is not counted")

    gpu = torch.cuda.is_available() and not args.cpu
    budget = Budget(args.budget_s)
    if gpu:
        device = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPU cores", flush=True)
        models_a, models_b = ["conv6x1.0", "resnet18x1.0"], ["conv6x0.25", "resnet18x0.25"]
        batch, batch_eval, max_train = 128, 512, None
        steps, warmup = args.steps or 100, args.warmup or 20
        ks, epochs = args.ks or [1, 2, 4, 8], args.epochs or 6
        iters = 0 if args.iters is None else args.iters
        compile_rows = [] if args.no_compile else COMPILE_VARIANTS
    else:
        device = torch.device("cpu")
        found = "--cpu given" if args.cpu else "no GPU found"
        print(f"{found} (torch {torch.__version__}, {os.cpu_count()} CPU cores): running the "
              "CPU path on a tiny size; its numbers say nothing about GPU speed", flush=True)
        models_a, models_b = ["conv6x0.25", "resnet18x0.25"], ["conv6x0.25"]
        batch, batch_eval = 16, 64
        steps, warmup = args.steps or 2, args.warmup or 3
        ks, epochs = args.ks or [1, 2], args.epochs or 3
        iters = 3 if args.iters is None else args.iters
        max_train = batch * max(iters, warmup + steps)
        compile_rows = []  # minutes of C++ compilation on a CPU
        print("(torch.compile rows left out on CPU)", flush=True)
    ratios: list[tuple[str, float]] = []
    ref_rates: dict[str, float] = {}
    clock = "CUDA events" if gpu else "wall clock"
    if not args.skip_a:
        print(f"\na) training images/s, edge-popup, batch {batch}, {steps} steps timed after "
              f"{warmup} warm-up steps ({clock})\n{A_HEAD}\n{'-' * len(A_HEAD)}", flush=True)
        ratios += part_a(models_a, VARIANTS, ref_rates, batch, steps, warmup, device, budget, max_train)
        reset_memory(device)  # (a)'s cached blocks would otherwise count against (b)'s trials
    if not args.skip_b:
        ratios += part_b(models_b, ks, epochs, iters, batch, gpu, budget, max_train, batch_eval)
    if not args.skip_a and compile_rows:
        print(f"\na, continued) torch.compile, compilation in the warm-up\n{A_HEAD}\n"
              f"{'-' * len(A_HEAD)}", flush=True)
        part_a(models_a, compile_rows, ref_rates, batch, steps, warmup, device, budget, max_train)
    print()
    for what, value in ratios:
        print(f"ratio {what}: {value:.2f}")
    print(f"total {budget.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
