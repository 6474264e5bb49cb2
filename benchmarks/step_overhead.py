"""What a supermask costs per training step, on CPU, batch 128, 32x32 inputs.

For Conv6x0.5 and ResNet18x0.25 it prints the ratio
    (edge-popup training step time) / (dense training step time)
where the dense network is the same architecture built from plain nn.Conv2d / nn.Linear
trained by SGD, and the edge-popup one masks every layer (p = 0.5) and trains only the
scores. Steps of the two are timed alternately in one process after a warm-up, and the
median of each is used. It also prints the cost of one `rerandomize_` call (IteRand,
bernoulli, r = 0.1) relative to one edge-popup step.

Usage: python benchmarks/step_overhead.py [--repeats 30] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from iterand_tune.config import TrialConfig
from iterand_tune.models import Layers, create_model
from iterand_tune.supermask import rerandomize_


class PlainLayers(Layers):
    """Builds the same networks from torch's own dense layers."""

    def conv(self, cin, cout, kernel, stride=1, padding=0, bias=False):
        return nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias)

    def linear(self, fin, fout, last=False):
        return nn.Linear(fin, fout)


def make_step(model: nn.Module, params, x, y):
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, repeats: int, warmup: int = 3) -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    cfg = TrialConfig(model=name, train_mode="score_only", conv_sparsity=0.5, bn_affine=False)
    masked = create_model(name, cfg)
    for pname, p in masked.named_parameters():
        p.requires_grad_(pname.endswith("scores"))
    scores = [p for p in masked.parameters() if p.requires_grad]
    dense = create_model(name, layers=PlainLayers(bn_affine=False))
    dense_step = make_step(dense, list(dense.parameters()), x, y)
    masked_step = make_step(masked, scores, x, y)
    rerand = lambda: rerandomize_(masked, "bernoulli", 0.1)  # noqa: E731
    for _ in range(warmup):
        dense_step(), masked_step(), rerand()
    td, tm, tr = [], [], []
    for i in range(repeats):  # alternate so drifts in machine speed hit both equally
        order = [(tm, masked_step), (td, dense_step)]
        for times, step in order if i % 2 else order[::-1]:
            times.append(timed(step))
        tr.append(timed(rerand))
    d, m, r = statistics.median(td), statistics.median(tm), statistics.median(tr)
    return d, m, r, statistics.quantiles([a / b for a, b in zip(tm, td)], n=4)[1]


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
        d, m, r, paired = measure(name, args.repeats)
        print(f"{name:<15}{d*1e3:>10.1f}{m*1e3:>11.1f}{m/d:>8.3f}{paired:>8.3f}{r*1e3:>11.2f}{r/m:>13.4f}")
    print("ratio = median masked step / median dense step; paired = median of per-pair ratios")


if __name__ == "__main__":
    main()
