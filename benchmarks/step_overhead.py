"""What a supermask costs per training step: the edge-popup step against the dense step of the same
network, the mask selection (top-k per layer) alone, one IteRand re-randomisation. On CPU here;
benchmarks/gpu_check.py runs the same `step_costs` on a GPU.

Usage: python benchmarks/step_overhead.py [--repeats 30] [--threads N] [--models M ...]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from iterand_tune.config import TrialConfig
from iterand_tune.models import Layers, create_model
from iterand_tune.supermask import _threshold, mask_k, rerandomize_, sparse_layers


class PlainLayers(Layers):
    """Builds the same networks from torch's own dense layers."""

    def conv(self, cin, cout, kernel, stride=1, padding=0, bias=False):
        return nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias)

    def linear(self, fin, fout, last=False):
        return nn.Linear(fin, fout)


def make_step(model: nn.Module, params, x, y) -> Callable[[], None]:
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def timed(fn: Callable[[], Any], calls: int, warmup: int, device: torch.device) -> float:
    """Seconds for `calls` calls of `fn` after `warmup` calls; CUDA events on a GPU, where the
    host only queues the work."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def step_costs(model: str, device: torch.device, batch: int = 128, repeats: int = 30, block: int = 1,
               warmup: int = 3, sparsity: float = 0.5) -> dict[str, Any]:
    """Milliseconds of one training step, dense (plain nn layers, every weight trained) and
    masked (edge-popup: scores trained), of the mask selection alone (the k-th smallest score of
    every layer, what a masked step's forward computes) and of one re-randomisation (bernoulli,
    r 0.1). Blocks of `block` calls alternate, `repeats` times, so that drifts in clock speed hit
    all alike; medians. `select_share` and `rerand_share` are per masked step."""
    if device.type == "cuda":  # the trials' defaults
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cfg = TrialConfig(model=model, train_mode="score_only", conv_sparsity=sparsity, bn_affine=False)
    masked = create_model(model, cfg).to(device)
    for name, p in masked.named_parameters():
        p.requires_grad_(name.endswith("scores"))
    dense = create_model(model, layers=PlainLayers(bn_affine=False)).to(device)
    layers = [(layer.scores, mask_k(layer.scores.numel(), layer.sparsity)) for layer in sparse_layers(masked)]

    def select() -> None:
        for scores, k in layers:
            _threshold(scores, k)

    calls = {"dense": make_step(dense, list(dense.parameters()), x, y),
             "masked": make_step(masked, [p for p in masked.parameters() if p.requires_grad], x, y),
             "select": select, "rerand": lambda: rerandomize_(masked, "bernoulli", 0.1)}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats):
        for name in (list(calls) if i % 2 else list(calls)[::-1]):
            times[name].append(timed(calls[name], block, 0, device) * 1e3 / block)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return dict(model=model, batch=batch, sparsity=sparsity, layers=len(layers), dense_ms=ms["dense"],
                masked_ms=ms["masked"], ratio=ms["masked"] / ms["dense"],
                paired=statistics.median(a / b for a, b in zip(times["masked"], times["dense"])),
                select_ms=ms["select"], select_share=ms["select"] / ms["masked"],
                rerand_ms=ms["rerand"], rerand_share=ms["rerand"] / ms["masked"],
                repeats=repeats, block=block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=["conv6x0.5", "resnet18x0.25"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, CPU, "
          f"{args.repeats} alternating repeats (medians)")
    print(f"{'model':<15}{'dense ms':>10}{'masked ms':>11}{'ratio':>8}{'paired':>8}"
          f"{'rerand ms':>11}{'rerand/step':>13}")
    for name in args.models:
        c = step_costs(name, torch.device("cpu"), repeats=args.repeats)
        print(f"{name:<15}{c['dense_ms']:>10.1f}{c['masked_ms']:>11.1f}{c['ratio']:>8.3f}{c['paired']:>8.3f}"
              f"{c['rerand_ms']:>11.2f}{c['rerand_share']:>13.4f}")
    print("ratio = median masked step / median dense step; paired = median of per-pair ratios")


if __name__ == "__main__":
    main()
