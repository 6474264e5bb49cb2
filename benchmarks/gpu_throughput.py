"""What benchmarks/gpu_check.py measures inside its child processes: training images/s of our
pipeline (eager and compiled) against a reference-style one, one trial as a Ray Tune trial runs it,
a masked step's costs; and the arithmetic that places packed trials' epochs on one clock.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from iterand_tune.config import METHODS, TrialConfig
from iterand_tune.data import IMAGENET_MEAN, IMAGENET_STD, load_synthetic
from iterand_tune.models import Layers, create_model
from iterand_tune.supermask import SparseConv2d, SparseLinear, mask_k
from iterand_tune.training import Trainer
from iterand_tune.trial_setup import claim_resources

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # its sibling, when loaded as a file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import step_costs, timed  # noqa: E402

SPARSITY = {"conv6": 0.5, "resnet18": 0.6}  # the paper's p for Figure 2 (docs/method.md section 7)
REF_WORKERS = 4
Emit = Callable[[dict[str, Any]], None]


def sparsity_of(model: str) -> float:
    return SPARSITY[model.split("x")[0]]


def edgepopup(model: str, **kw: Any) -> dict[str, Any]:
    """TrialConfig values of an edge-popup trial on synthetic CIFAR-10."""
    return dict(model=model, dataset="synthetic_cifar10", train_mode="score_only", bn_affine=False,
                conv_sparsity=sparsity_of(model), lr=0.1, weight_decay=5e-4, **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    """Free what the last pipeline cached, so that each row's peaks are its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device: torch.device) -> dict[str, Optional[float]]:
    """Peak MB the allocator handed out and held since the last reset (None off CUDA)."""
    if device.type != "cuda":
        return dict(peak_allocated_mb=None, peak_reserved_mb=None)
    return dict(peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20)


# ----------------------------------------------------------------------------- torch.compile


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


# ----------------------------------------------------------------------------- images/s: ours


def full_batches(loader: Any, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of `loader` forever, leaving out an epoch's last partial batch (one shape)."""
    while True:
        for x, y in loader:
            if len(y) == batch:
                yield x, y


def ours(model: str, options: dict[str, Any], batch: int, steps: int, warmup: int,
         device: torch.device, max_train: Optional[int]) -> dict[str, Any]:
    """The Trainer's own step on device-resident augmented batches: images_per_s and peak
    memory; a compile row also has `compile_s` (its first step, compilation included, less one
    steady step), `compiled` and `compile_note` from Dynamo's counters, and images_per_s None
    when its steps fell back to eager (that measured something else)."""
    reset_memory(device)
    cfg = TrialConfig(**edgepopup(model, batch_size=batch, epochs=1, max_train_dataset_size=max_train,
                                  **options))
    trainer = Trainer(cfg, device=device)
    trainer.model.train()
    batches = full_batches(trainer.loaders.train, batch)
    loss_sum = torch.zeros((), device=device)

    def step() -> None:  # what train_epoch does per iteration
        nonlocal loss_sum
        loss_sum += trainer.train_step(*next(batches))[0]

    row: dict[str, Any] = {}
    if not cfg.compile:
        seconds: Optional[float] = timed(step, steps, warmup, device)
    else:
        before = dynamo_counts()
        t0 = time.perf_counter()
        step()  # Dynamo traces, Inductor compiles forward and backward
        _sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
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
        row.update(first_step_s=first_s, compile_s=first_s - (seconds / steps if seconds else 0.0),
                   compile_threads=_compile_threads())
    if not torch.isfinite(loss_sum).item():  # read once, after the timing
        raise RuntimeError(f"{model} {options}: the training loss is not finite")
    row.update(images_per_s=steps * batch / seconds if seconds else None, **_peaks(device))
    return row


def _compile_threads() -> Optional[int]:
    """Inductor's compile workers in this process (TORCHINDUCTOR_COMPILE_THREADS, read when
    Inductor's config is first imported)."""
    try:
        from torch._inductor import config  # only compile rows need Inductor

        return int(config.compile_threads) if config.compile_threads is not None else None
    except Exception:  # noqa: BLE001 - a torch without Inductor: the row says None
        return None


# ----------------------------------------------------------------------------- images/s: reference


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
        from PIL import Image  # what torchvision's datasets use; only the reference needs it

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference(model: str, batch: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """A reference-style pipeline: PIL transforms in DataLoader workers, host-read thresholds, a
    loss meter reading the loss every step. images_per_s and peak memory."""
    from torchvision import transforms as T  # a slow import, only for the reference

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
    row = dict(images_per_s=steps * batch / seconds, **_peaks(device))
    batches.close()  # drops the loader's iterator, which stops its workers
    return row


# Our pipeline's rows: the defaults and each runtime option. On a CPU only the first and the
# combined one run (a check of the machinery).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("ours fp32 (defaults)", {}),
    ("ours channels_last", dict(channels_last=True)),
    ("ours bf16", dict(autocast="bf16")),
    ("ours channels_last+bf16", dict(channels_last=True, autocast="bf16")),
    ("ours cudnn.benchmark", dict(deterministic=False)),
]
CPU_VARIANTS = ("ours fp32 (defaults)", "ours channels_last+bf16")
REFERENCE_LABEL = "reference-style (PIL, .item)"
COMPILE_LABEL = "ours compile"


# ----------------------------------------------------------------------------- one trial


def trial_config(model: str, method: str, plan: dict[str, Any], epochs: int, iters: Optional[int],
                 device: str, eval_iters: Optional[int]) -> dict[str, Any]:
    """TrialConfig values of a synthetic CIFAR-10 trial of `method` (the paper's figure 2 values:
    p 0.5 for Conv6, 0.6 for ResNet18; K_per 300, r 0.1)."""
    values = dict(METHODS[method], model=model, dataset="synthetic_cifar10", epochs=epochs,
                  batch_size=plan["batch"], batch_size_eval=plan["batch_eval"],
                  max_train_dataset_size=plan["max_train"], debug_max_iters=iters,
                  debug_max_eval_iters=eval_iters, evaluate_test=False,
                  use_cuda=device == "cuda", lr=0.1, weight_decay=5e-4)
    if method != "sgd":
        values["conv_sparsity"] = sparsity_of(model)
    return values


def _await_go(trainer: Trainer, spec: dict[str, Any]) -> None:
    """Packed trials start training together: one step (CUDA, cuDNN and cuBLAS start-up), then
    `ready`, then wait for the parent's `go`, written once all k are ready."""
    trainer.model.train()
    trainer.train_step(*next(iter(trainer.loaders.train)))
    _sync(trainer.device)
    with open(spec["ready"], "w"):
        pass
    deadline = time.monotonic() + float(spec.get("go_timeout", 600))
    while not os.path.exists(spec["go"]):
        if time.monotonic() > deadline:
            raise RuntimeError("the other packed trials never became ready")
        time.sleep(0.01)


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One trial as a Ray Tune trial runs it (claim_resources at its share, the Trainer, a
    checkpoint after every epoch), measured: the epochs' metrics, a timed checkpoint per epoch,
    a timed evaluation alone, the allocator's peaks against its cap."""
    started = time.time()
    share = float(spec["share"])
    device, _ = claim_resources(spec.get("cpus", 1), share if spec["device"] == "cuda" else 0.0)
    if spec["device"] == "cuda" and device != "cuda":
        raise RuntimeError("this trial was to run on the GPU, but CUDA is not available here")
    cap_mb = total_mb = None
    if device == "cuda":
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        cap_mb = total_mb * (1.0 if share >= 1 or get_fraction is None else get_fraction(0))
    cfg = TrialConfig.from_dict(spec["config"])
    trainer = Trainer(cfg, device=device)
    if spec.get("go"):
        _await_go(trainer, spec)
    ready = time.time()
    epochs, checkpoints = [], []
    with tempfile.TemporaryDirectory() as folder:
        while not trainer.done:
            metrics = trainer.train_epoch()
            metrics["batch_size"] = cfg.batch_size
            t0 = time.perf_counter()
            trainer.save(os.path.join(folder, "trainer.pt"))  # what the trainable does every epoch
            checkpoints.append(time.perf_counter() - t0)
            epochs.append(metrics)
    _sync(trainer.device)
    t0 = time.perf_counter()
    trainer.evaluate("val")  # evaluation alone: splits an epoch into training and evaluation
    _sync(trainer.device)
    eval_s = time.perf_counter() - t0
    last = epochs[-1]
    iters = last["iterations"] - (epochs[-2]["iterations"] if len(epochs) > 1 else 0)
    full_iters = len(trainer.loaders.train)  # an epoch without debug_max_iters (352 on CIFAR-10)
    train_s = max(last["epoch_seconds"] - eval_s, 0.0)
    full_epoch_s = train_s * full_iters / max(iters, 1) + eval_s
    on_gpu = device == "cuda"
    return dict(
        model=cfg.model, method=cfg.method, share=share, device=device, pid=os.getpid(),
        started=started, startup_s=ready - started, epochs=epochs,
        epoch_seconds=[m["epoch_seconds"] for m in epochs], iterations_per_epoch=iters,
        full_epoch_iterations=full_iters, eval_s=eval_s, full_epoch_s_est=full_epoch_s,
        checkpoint_s=statistics.median(checkpoints),
        checkpoint_share=statistics.median(checkpoints) / full_epoch_s if full_epoch_s else None,
        peak_allocated_mb=max(m.get("peak_gpu_memory_mb") or 0.0 for m in epochs) if on_gpu else None,
        peak_reserved_mb=max(m.get("peak_gpu_reserved_mb") or 0.0 for m in epochs) if on_gpu else None,
        cap_mb=cap_mb, total_mb=total_mb)


# ----------------------------------------------------------------------------- child entry points
# `gpu_check.py --worker SPEC` calls one of these with the spec's arguments and `emit`, which
# appends a row to the child's result file: a row is kept even if the child is stopped later.


def throughput_rows(emit: Emit, model: str, device: str, cpus: int, batch: int, steps: int, warmup: int,
                    max_train: Optional[int]) -> None:
    """The reference-style pipeline (where torchvision and Pillow are there to build it), then
    ours with the defaults and each runtime option."""
    dev = torch.device(device)
    claim_resources(cpus, 1.0 if device == "cuda" else 0.0)
    missing = [m for m in ("torchvision", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        ref = dict(images_per_s=None, note=f"not measured: {' and '.join(missing)} not importable here")
    else:
        ref = reference(model, batch, steps, warmup, dev)
    emit(dict(model=model, pipeline=REFERENCE_LABEL, options={}, vs_reference=1.0 if not missing else None,
              **ref))
    for label, options in VARIANTS:
        if device == "cpu" and label not in CPU_VARIANTS:
            continue
        got = ours(model, options, batch, steps, warmup, dev, max_train)
        rate = got["images_per_s"]
        emit(dict(model=model, pipeline=label, options=dict(options),
                  vs_reference=rate / ref["images_per_s"] if rate and ref["images_per_s"] else None, **got))


def compile_row(emit: Emit, model: str, device: str, cpus: int, batch: int, steps: int, warmup: int,
                max_train: Optional[int]) -> None:
    """Our pipeline compiled: compilation time apart from the steady-state rate."""
    claim_resources(cpus, 1.0 if device == "cuda" else 0.0)
    got = ours(model, dict(compile=True), batch, steps, warmup, torch.device(device), max_train)
    emit(dict(model=model, pipeline=COMPILE_LABEL, options={"compile": True}, cpus=cpus, **got))


def step_rows(emit: Emit, models: list[str], device: str, cpus: int, batch: int, repeats: int,
              block: int, warmup: int) -> None:
    """step_costs of each model at its figure-2 sparsity."""
    claim_resources(cpus, 1.0 if device == "cuda" else 0.0)
    for model in models:
        emit(step_costs(model, torch.device(device), batch, repeats, block, warmup, sparsity_of(model)))


def trial_rows(emit: Emit, specs: list[dict[str, Any]]) -> None:
    """Each spec's trial in turn (gpu_check gives a GPU trial a process of its own); a trial that
    fails gives its error row, and the next one runs."""
    for spec in specs:
        try:
            emit(run_trial(spec))
        except Exception as err:  # noqa: BLE001 - reported per trial
            cfg = TrialConfig.from_dict(spec["config"])
            emit(dict(error_row(err), model=cfg.model, method=cfg.method, share=spec["share"]))


def error_row(err: BaseException) -> dict[str, Any]:
    """{"error": one line, the exception and where it was raised; "traceback": its end}."""
    tb = traceback.extract_tb(err.__traceback__)
    where = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    first = str(err).splitlines()[0] if str(err) else ""
    return {"error": f"{type(err).__name__}: {first}{where}",
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]}


CALLS: dict[str, Callable[..., None]] = {
    "throughput": throughput_rows, "compile": compile_row, "step": step_rows, "trials": trial_rows}


# ----------------------------------------------------------------------------- packed trials' clock


def epoch_spans(rows: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """(start, end, training images) on the wall clock of every epoch after the first (which
    holds start-up); the end is the trial's own `epoch_end_time` (time.time() at the epoch's
    end), to well under a second where Ray's `timestamp` is whole seconds."""
    return [(row["epoch_end_time"] - row["epoch_seconds"], row["epoch_end_time"],
             (row["iterations"] - prev["iterations"]) * int(row["batch_size"]))
            for prev, row in zip(rows, rows[1:])]


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


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows a child emitted so far (a last line cut short by a kill is left out)."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        pass
    return rows
