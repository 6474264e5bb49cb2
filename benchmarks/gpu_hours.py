"""GPU-hours per figure from the epoch times of a benchmarks/gpu_check.py report: a trial costs
epochs x full-epoch seconds x its GPU share / 3600; models the check did not time follow a power
law in forward MACs through those it did (docs/gpu.md, "Reading the report"). Figure 3's trials
(one GPU each) cost what the report's imagenet part measured for their network and pipeline.

Usage: python benchmarks/gpu_hours.py [gpu-check/report.json] [--detail]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (ROOT, HERE):  # the checkout and the sibling benchmarks, without an install
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_check import part_rows  # noqa: E402 - the report's reader, after the path is set

# (label, experiment file, trials the paper's grid has)
FIGURES = (("figure 1", "experiments/figure1.py", 36), ("figure 2", "experiments/figure2.py", 180),
           ("figure 3", "experiments/figure3.py", 8), ("examples", "experiments/examples.py", 3))
IMAGENET_FIGURE = "figure 3"  # costed from the imagenet part, not from the CIFAR-sized epoch times
FALLBACK_FAMILY = {"resnet34": "resnet18", "resnet50": "resnet18", "resnet101": "resnet18"}


def file_estimate(path: str) -> Optional[str]:
    """The 'about N GPU-hours' a file's header states, or None."""
    with open(path) as f:
        m = re.search(r"about ([0-9.,]+) GPU-hours", f.read(4000))
    return m.group(1) if m else None


def figure_trials(path: str) -> list[dict[str, Any]]:
    """Every trial of an experiment file, as TrialConfig dicts."""
    from iterand_tune.experiments import all_trials, load

    return all_trials(load(path))


class EpochTimes:
    """Full-epoch seconds per (model, method): measured where the report has them, else from a
    power law in forward MACs through the measured points of the same method and family."""

    def __init__(self, report: dict[str, Any]) -> None:
        from iterand_tune.vocabulary import parse_model

        self.parse = parse_model
        self.points: dict[tuple[str, float, str], float] = {}
        for t in part_rows(report, "figure2"):
            if "error" in t or not t.get("full_epoch_s_est"):
                continue
            family, width = parse_model(t["model"])
            self.points[(family, width, t["method"])] = float(t["full_epoch_s_est"])
        self._macs: dict[tuple[str, float], float] = {}

    def macs(self, family: str, width: float) -> float:
        key = (family, width)
        if key not in self._macs:
            from iterand_tune.models import estimate_macs

            self._macs[key] = float(estimate_macs(f"{family}x{width}" if family in ("conv6", "resnet18", "resnet34")
                                                  else family, 32, 10))
        return self._macs[key]

    def seconds(self, model: str, method: str) -> tuple[Optional[float], bool]:
        """(full-epoch seconds, measured?); (None, False) when nothing measured applies."""
        family, width = self.parse(model)
        if (family, width, method) in self.points:
            return self.points[(family, width, method)], True
        for fam in (family, FALLBACK_FAMILY.get(family)):
            pts = [(self.macs(f, w), s) for (f, w, m), s in self.points.items() if f == fam and m == method]
            if pts:
                return self._power_law(pts, self.macs(family, width)), False
        return None, False

    @staticmethod
    def _power_law(points: list[tuple[float, float]], macs: float) -> float:
        """seconds = a * macs^b by least squares in log-log (b = 1 through a single point)."""
        xs, ys = [math.log(m) for m, _ in points], [math.log(s) for _, s in points]
        if len(set(xs)) < 2:
            b = 1.0
        else:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = sum(y - b * x for x, y in zip(xs, ys)) / len(xs)
        return math.exp(a + b * math.log(macs))


class ImageNetHours:
    """GPU-hours of a figure-3 trial per (model, pipeline), from the report's imagenet part: measured
    for the networks it stepped, else a power law in forward MACs at 224 x 224 through them."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.points = {(r["model"], r["pipeline"]): float(r["hours"]) for r in part_rows(report, "imagenet")
                       if r.get("what") == "hours" and r.get("hours")}
        self.default_pipeline = "device" if report.get("mode") == "cuda" else "pil"

    def hours(self, trial: dict[str, Any]) -> tuple[Optional[float], bool]:
        from iterand_tune.models import estimate_macs

        pipeline = trial.get("imagenet_decode") or self.default_pipeline
        if (trial["model"], pipeline) in self.points:
            return self.points[(trial["model"], pipeline)], True
        pts = [(float(estimate_macs(m, 224, 1000)), h) for (m, p), h in self.points.items() if p == pipeline]
        if not pts:
            return None, False
        return EpochTimes._power_law(pts, float(estimate_macs(trial["model"], 224, 1000))), False


def hours_table(report: dict[str, Any], detail: bool = False) -> str:
    """The GPU-hours of every figure from a gpu_check report, with the method stated."""
    from iterand_tune.resources import gpu_share
    from iterand_tune.vocabulary import method_of

    env = report.get("environment", {})
    where = env.get("gpu") or "?"
    plan = report.get("plan", {})
    if report.get("mode") == "cuda":
        head = f"GPU-hours per figure, measured on {where} (torch {env.get('torch')}, CUDA {env.get('cuda')}; " \
               f"report of {report.get('created', '?')})"
    else:
        head = f"GPU-hours per figure from a CPU run ({where}): NOT GPU figures, only the arithmetic"
    times, imagenet = EpochTimes(report), ImageNetHours(report)
    lines = [head, "", f"{'figure':<10}{'trials':>7}{'GPU-hours':>11}{'measured':>10}{'extrapolated':>14}"
             f"{'no estimate':>13}"]
    details = []
    for label, rel, _expected in FIGURES:
        total, measured, extrapolated, missing = 0.0, 0, 0, 0
        per_point: dict[tuple[str, str], list] = {}
        trials = figure_trials(os.path.join(ROOT, rel))
        for t in trials:
            method = method_of(t["train_mode"], t["rerand_mode"], t["rerand_lambda"])
            if label == IMAGENET_FIGURE:
                (hours, exact), share = imagenet.hours(t), 1.0
                seconds = None if hours is None else hours * 3600 / t["epochs"]  # a trial's epoch
            else:
                seconds, exact = times.seconds(t["model"], method)
                share = gpu_share(t["model"], t["dataset"])
                hours = None if seconds is None else t["epochs"] * seconds * share / 3600
            if hours is None:
                missing += 1
                continue
            total += hours
            measured += exact
            extrapolated += not exact
            point = per_point.setdefault((t["model"], method), [0, 0.0, seconds, share, exact])
            point[0] += 1
            point[1] += hours
        lines.append(f"{label:<10}{len(trials):>7}{total:>11.2f}{measured:>10}{extrapolated:>14}{missing:>13}")
        if detail:
            details.append(f"\n{label}: model, method, trials, full-epoch s, GPU share, GPU-hours")
            for (model, method), (n, h, s, share, exact) in sorted(per_point.items()):
                details.append(f"  {model:<15}{method:<11}{n:>4}{s:>9.1f} s{share:>7g}{h:>9.2f}"
                               f"{'' if exact else '  (extrapolated)'}")
    iters = plan.get("figure2_iters")
    lines += ["", "Method: a trial costs epochs x full-epoch seconds x its GPU share / 3600 (k trials share "
              "a GPU at 1/k). Full-epoch seconds: the check's figure-2-like run on synthetic CIFAR-10 "
              f"({plan.get('figure2_epochs', '?')} epochs of {iters or '?'} iterations, trials packed at "
              "their default shares): the last epoch without its evaluation, scaled to a full epoch's "
              "iterations, plus the evaluation. Models or methods not measured follow a power law of "
              "epoch time in forward MACs through the measured points of the same method (ResNet34 "
              "on ResNet18's); 'no estimate': nothing measured for that method. Figure 3 (one GPU a "
              "trial): the imagenet part's GPU-hours of a trial, each phase at the slower of its loader "
              "and its step on the trial's pipeline (device decoding on CUDA); networks it did not step "
              "follow a power law in forward MACs at 224 x 224 through those it did, whatever the method."]
    return "\n".join(lines + details)


def estimates_table() -> str:
    """Without a report: the estimates the experiment files state, labelled as such."""
    lines = ["GPU-hours per figure: ESTIMATES from the experiment files' headers (forward FLOPs at "
             "25 TFLOP/s sustained), not measured; run `make gpu-check` on a GPU machine and pass "
             "its report.json for measured figures.", "",
             f"{'figure':<10}{'trials':>7}{'GPU-hours (estimate)':>22}"]
    for label, rel, trials in FIGURES:
        value = file_estimate(os.path.join(ROOT, rel))
        lines.append(f"{label:<10}{trials:>7}{('about ' + value) if value else 'unknown':>22}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", nargs="?", help="report.json of benchmarks/gpu_check.py")
    ap.add_argument("--detail", action="store_true", help="also the GPU-hours of every model and method")
    args = ap.parse_args(argv)
    if not args.report:
        print(estimates_table())
        return 0
    try:
        with open(args.report) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        print(f"gpu_hours: cannot read {args.report}: {err}", file=sys.stderr)
        return 2
    if not any("full_epoch_s_est" in t for t in part_rows(report, "figure2")) and not ImageNetHours(report).points:
        print(f"gpu_hours: {args.report} has no figure-2 epoch times and no imagenet GPU-hours "
              "(were those parts skipped?)\n")
        print(estimates_table())
        return 0
    print(hours_table(report, args.detail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
