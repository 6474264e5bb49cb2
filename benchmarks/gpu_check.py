"""The GPU check: one command, at most 8 minutes on one H200, that measures what the GPU work
promises and writes it down.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu-check        (or: make gpu-check)

It needs torch, torchvision, numpy, pytest and the checkout, nothing else (no Ray, no HyperOpt,
no network, no install). In order, each part starting only while the time budget allows:

1. the CUDA tests (`pytest -m cuda tests/test_cuda.py` in a subprocess, results from its JUnit
   XML): thresholds, masked forward/backward and re-randomisation against the CPU, the device
   loader, no host synchronisation in a training step, bit-exact resume, checkpoints moving
   between CPU and GPU, memory caps, trials sharing the GPU;
2. training images/s (benchmarks/gpu_throughput.py, part a): Conv6x1.0 and ResNet18x1.0
   edge-popup, our pipeline with each runtime option against a reference-style one;
3. the masked (edge-popup) training step against the dense step of the same network (built
   from plain nn layers, as benchmarks/step_overhead.py does on CPU), batch 128;
4. packing: k trial processes at once at 1/k of the GPU each (k = 1, 4; Conv6x0.25; each
   process calls `claim_resources`, as a Ray Tune trial with a fractional GPU does: shared
   device, `torch.cuda.set_per_process_memory_fraction` cap), aggregate images/s in the window
   where all k train; with Ray importable, also as real Ray Tune trials (gpu_throughput part b);
5. a figure-2-like run: synthetic CIFAR-10, Conv6 and ResNet18 at x0.25 and x1.0, SGD,
   edge-popup and IteRand, 2 epochs of 150 iterations each (`debug_max_iters`, to fit the
   budget; a full epoch is 352), every trial a process at its default GPU share (`gpu_share`),
   packed so that the running shares never exceed one GPU; per trial the epoch times, the
   evaluation time, the time of one checkpoint (`Trainer.save`) and its share of an epoch,
   peak memory allocated and reserved against the trial's cap;
6. torch.compile's row of (2), last, since compiling takes a minute or two.

It writes DIR/report.json (every figure measured, the GPU, torch and CUDA versions) and
DIR/report.md (the same as tables, beside the targets), plus DIR/cuda-tests.xml and the test
log. `python benchmarks/gpu_hours.py DIR/report.json` turns the epoch times into GPU-hours per
figure.

Without a CUDA device it prints one line and exits 3; `--allow-cpu` runs a tiny version of every
part on CPU instead (seconds; the numbers say nothing about a GPU). With a CUDA device it never
falls back to the CPU: a trial process that finds no CUDA fails. Exit 0 when every part ran and
every CUDA test passed (targets missed are in the report, not in the exit code), 1 otherwise.

Usage: gpu_check.py [--out DIR] [--allow-cpu] [--budget-s 450] [--skip PART ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from typing import Any, Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (ROOT, HERE):  # the checkout and the sibling benchmarks, without an install
    if _path not in sys.path:
        sys.path.insert(0, _path)

PARTS = ("tests", "throughput", "overhead", "packing", "figure2", "ray", "compile")
NO_CUDA_EXIT = 3
FULL_EPOCH_ITERS = 352  # ceil(45,000 / 128): one epoch of (synthetic) CIFAR-10 at batch 128
CHECKPOINT_SHARE_LIMIT = 0.05

# What each mode runs. The GPU plan is sized for one H200 within the default budget.
PLANS: dict[str, dict[str, Any]] = {
    "cuda": dict(
        tests_timeout=240,
        models_a=["conv6x1.0", "resnet18x1.0"], batch=128, batch_eval=512, steps=100, warmup=20,
        max_train=None, overhead_models=["conv6x1.0", "resnet18x1.0"], overhead_repeats=20,
        overhead_block=5, overhead_warmup=5, packing_model="conv6x0.25", packing_ks=[1, 4], packing_epochs=3,
        packing_iters=None, figure2_models=["conv6x0.25", "conv6x1.0", "resnet18x0.25", "resnet18x1.0"],
        figure2_epochs=2, figure2_iters=150, trial_timeout=300,
        target_a="conv6x1.0", target_overhead={"resnet18x1.0": 1.3, "conv6x1.0": 1.2}),
    "cpu": dict(
        tests_timeout=240,
        models_a=["conv6x0.25"], batch=16, batch_eval=64, steps=2, warmup=2, max_train=64,
        overhead_models=["conv6x0.25"], overhead_repeats=3, overhead_block=1, overhead_warmup=1,
        packing_model="conv6x0.25", packing_ks=[1, 2], packing_epochs=2, packing_iters=2,
        figure2_models=["conv6x0.25", "resnet18x0.25"], figure2_epochs=2, figure2_iters=2,
        trial_timeout=300, target_a="conv6x0.25", target_overhead={"conv6x0.25": 1.2}),
}
# Seconds a part is expected to take on the GPU: it starts only with that much budget left.
NEEDS = {"tests": 60, "throughput": 60, "overhead": 15, "packing": 45, "figure2": 90, "ray": 90,
         "compile": 120}


def say(line: str) -> None:
    print(line, flush=True)


def _env() -> dict[str, str]:
    """The environment of every subprocess: the checkout importable, cuBLAS deterministic."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env.pop("RAY_ADDRESS", None)
    return env


def _error(err: BaseException) -> str:
    """One line for a report: the exception and where it was raised."""
    tb = traceback.extract_tb(err.__traceback__)
    where = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}"


# ----------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "device": device.type, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "platform": platform.platform(), "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(), "gpu": None, "gpu_memory_gb": None,
        "gpu_capability": None, "gpu_count": 0, "driver": None,
    }
    try:
        import ray  # only to say whether the Ray Tune packing ran

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["gpu"] = f"none (CPU: {platform.processor() or platform.machine()})"
    return info


# ----------------------------------------------------------------------------- 1. CUDA tests


def parse_junit(path: str) -> list[dict[str, Any]]:
    """Every test case of a JUnit XML file: name, outcome (passed, failed, error, skipped),
    seconds and the first line of its message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        cases.append(dict(name=f"{case.get('classname', '')}::{case.get('name')}".lstrip(":"),
                          outcome=outcome, seconds=float(case.get("time") or 0.0), message=message[:300]))
    return cases


def run_cuda_tests(out: str, timeout: float) -> dict[str, Any]:
    """`pytest -m cuda tests/test_cuda.py` in a subprocess; its cases and counts."""
    xml = os.path.join(out, "cuda-tests.xml")
    log = os.path.join(out, "cuda-tests.log")
    if os.path.exists(xml):
        os.remove(xml)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "junit_family=xunit2", os.path.join("tests", "test_cuda.py")]
    start = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(cmd[2:]), "log": os.path.basename(log)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        text, result["returncode"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        result["returncode"] = None
        result["problem"] = f"the tests did not finish within {timeout:.0f} s"
    result["seconds"] = time.perf_counter() - start
    with open(log, "w") as f:
        f.write(text)
    cases = parse_junit(xml) if os.path.exists(xml) else []
    if not cases and "problem" not in result:
        result["problem"] = "no test results (see the log): " + (text.strip().splitlines() or [""])[-1][:200]
    result["cases"] = cases
    for outcome, key in (("passed", "passed"), ("failed", "failed"), ("error", "errors"), ("skipped", "skipped")):
        result[key] = sum(c["outcome"] == outcome for c in cases)
    return result


# ----------------------------------------------------------------------------- 2. throughput


def throughput(plan: dict[str, Any], device: torch.device, budget: Any, compile_rows: bool,
               ref_rates: dict[str, float]) -> list[dict[str, Any]]:
    """Rows of gpu_throughput's part (a): the reference and our pipeline with each option."""
    import gpu_throughput as gt

    rows: list[dict[str, Any]] = []
    variants = gt.COMPILE_VARIANTS if compile_rows else gt.VARIANTS
    models = [plan["target_a"]] if compile_rows else plan["models_a"]
    say(f"{gt.A_HEAD}\n{'-' * len(gt.A_HEAD)}")
    gt.part_a(models, variants, ref_rates, plan["batch"], plan["steps"], plan["warmup"], device,
              budget, plan["max_train"], rows=rows)
    gt.reset_memory(device)  # release what these pipelines cached before trials share the GPU
    return rows


# ----------------------------------------------------------------------------- 3. step overhead


def step_overhead(model: str, batch: int, repeats: int, block: int, device: torch.device,
                  warmup: int = 5) -> dict[str, Any]:
    """The edge-popup training step against the dense step of the same network, as
    benchmarks/step_overhead.py measures it on CPU: the dense network is built from plain nn
    layers (`create_model(..., layers=PlainLayers)`) and trains every weight by SGD, the masked
    one trains only the scores (p of the paper's figure 2). Blocks of `block` steps of the two
    alternate, `repeats` times; medians."""
    import gpu_throughput as gt
    from step_overhead import PlainLayers, make_step

    from iterand_tune.config import TrialConfig
    from iterand_tune.models import create_model

    if device.type == "cuda":  # the trials' defaults
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cfg = TrialConfig(model=model, train_mode="score_only", conv_sparsity=gt.sparsity_of(model),
                      bn_affine=False)
    masked = create_model(model, cfg).to(device)
    for name, p in masked.named_parameters():
        p.requires_grad_(name.endswith("scores"))
    dense = create_model(model, layers=PlainLayers(bn_affine=False)).to(device)
    steps = {"masked": make_step(masked, [p for p in masked.parameters() if p.requires_grad], x, y),
             "dense": make_step(dense, list(dense.parameters()), x, y)}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {"masked": [], "dense": []}
    for i in range(repeats):  # alternate, so that drifts in clock speed hit both alike
        for name in (("masked", "dense") if i % 2 else ("dense", "masked")):
            times[name].append(gt.timed(steps[name], block, 0, device) * 1e3 / block)
    d, m = statistics.median(times["dense"]), statistics.median(times["masked"])
    return dict(model=model, batch=batch, dense_ms=d, masked_ms=m, ratio=m / d,
                paired=statistics.median(a / b for a, b in zip(times["masked"], times["dense"])),
                repeats=repeats, block=block)


# ----------------------------------------------------------------------------- trials


def trial_config(model: str, method: str, plan: dict[str, Any], epochs: int, iters: Optional[int],
                 device: torch.device, eval_iters: Optional[int]) -> dict[str, Any]:
    """TrialConfig values of a synthetic CIFAR-10 trial of `method` (the paper's figure 2 values:
    p 0.5 for Conv6, 0.6 for ResNet18; K_per 300, r 0.1)."""
    from iterand_tune.config import METHODS

    import gpu_throughput as gt

    values = dict(METHODS[method], model=model, dataset="synthetic_cifar10", epochs=epochs,
                  batch_size=plan["batch"], batch_size_eval=plan["batch_eval"],
                  max_train_dataset_size=plan["max_train"], debug_max_iters=iters,
                  debug_max_eval_iters=eval_iters, evaluate_test=False,
                  use_cuda=device.type == "cuda", lr=0.1, weight_decay=5e-4)
    if method != "sgd":
        values["conv_sparsity"] = gt.sparsity_of(model)
    return values


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One trial as a Ray Tune trial runs it (claim_resources at its share, the Trainer, a
    checkpoint after every epoch), measured: the epochs' metrics, a timed checkpoint per epoch,
    a timed evaluation alone, memory against the cap."""
    from iterand_tune.config import TrialConfig
    from iterand_tune.trial_setup import claim_resources
    from iterand_tune.training import Trainer

    started = time.time()
    share = float(spec["share"])
    device, _ = claim_resources(1, share if spec["device"] == "cuda" else 0.0)
    if spec["device"] == "cuda" and device != "cuda":
        raise RuntimeError("this trial was to run on the GPU, but CUDA is not available here")
    cap_mb = total_mb = None
    if device == "cuda":
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if share >= 1:
            fraction = 1.0
        elif get_fraction is not None:
            fraction = get_fraction(0)
        else:  # an older torch: claim_resources' own rule with its default 1 GiB reserve
            fraction = max(0.5 * share, (share * total_mb - 1024) / total_mb)
        cap_mb = total_mb * fraction
    cfg = TrialConfig.from_dict(spec["config"])
    trainer = Trainer(cfg, device=device)
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
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    trainer.evaluate("val")  # evaluation alone: splits an epoch into training and evaluation
    sync()
    eval_s = time.perf_counter() - t0
    last = epochs[-1]
    iters = last["iterations"] - (epochs[-2]["iterations"] if len(epochs) > 1 else 0)
    full_iters = len(trainer.loaders.train)  # an epoch without debug_max_iters (352 on CIFAR-10)
    train_s = max(last["epoch_seconds"] - eval_s, 0.0)
    full_epoch_s = train_s * full_iters / max(iters, 1) + eval_s
    peak = max((m.get("peak_gpu_memory_mb") or 0.0) for m in epochs) if device == "cuda" else None
    held = max((m.get("peak_gpu_reserved_mb") or 0.0) for m in epochs) if device == "cuda" else None
    return dict(
        model=cfg.model, method=cfg.method, share=share, device=device, started=started,
        startup_s=ready - started, epochs=epochs, epoch_seconds=[m["epoch_seconds"] for m in epochs],
        iterations_per_epoch=iters, full_epoch_iterations=full_iters, eval_s=eval_s,
        full_epoch_s_est=full_epoch_s, checkpoint_s=statistics.median(checkpoints),
        checkpoint_share=statistics.median(checkpoints) / full_epoch_s if full_epoch_s else None,
        peak_allocated_mb=peak, peak_reserved_mb=held, cap_mb=cap_mb, total_mb=total_mb,
        within_cap=None if cap_mb is None or held is None else held <= cap_mb + 1e-6)


def worker_main(spec_path: str) -> int:
    """`gpu_check.py --worker FILE.json`: run one trial and write its result to spec["result"]."""
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = run_trial(spec)
        rc = 0
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        result, rc = {"error": _error(err), "traceback": traceback.format_exc()[-3000:]}, 1
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    return rc


def run_processes(specs: list[dict[str, Any]], folder: str, timeout: float,
                  slots: float = 1.0, max_running: Optional[int] = None) -> list[dict[str, Any]]:
    """Run every spec as a `--worker` process, starting one whenever its share fits in what the
    running ones leave of `slots` GPUs (first fit, in order; shares of 0 limited by
    `max_running`). Results in spec order; a process that failed or ran past `timeout` gives
    {"error": ...}."""
    pending = list(enumerate(specs))
    running: list[tuple[int, dict[str, Any], subprocess.Popen, float]] = []
    results: dict[int, dict[str, Any]] = {}
    while pending or running:
        used = sum(s["share"] for _, s, _, _ in running)
        for item in list(pending):
            i, spec = item
            if max_running is not None and len(running) >= max_running:
                break
            if used + spec["share"] > slots + 1e-9 and running:
                continue
            spec = dict(spec, result=os.path.join(folder, f"result-{i}.json"))
            path = os.path.join(folder, f"spec-{i}.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            log = open(os.path.join(folder, f"trial-{i}.log"), "w")
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", path],
                                    cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
            log.close()
            running.append((i, spec, proc, time.perf_counter()))
            pending.remove(item)
            used += spec["share"]
        time.sleep(0.2)
        for entry in list(running):
            i, spec, proc, t0 = entry
            if proc.poll() is None and time.perf_counter() - t0 < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                results[i] = {"error": f"ran past {timeout:.0f} s and was stopped"}
            else:
                try:
                    with open(spec["result"]) as f:
                        results[i] = json.load(f)
                except (OSError, json.JSONDecodeError):
                    with open(os.path.join(folder, f"trial-{i}.log")) as f:
                        tail = f.read().strip().splitlines()[-1:] or [""]
                    results[i] = {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
            running.remove(entry)
    return [results[i] for i in range(len(specs))]


# ----------------------------------------------------------------------------- 4. packing


def packing(plan: dict[str, Any], device: torch.device, folder: str) -> list[dict[str, Any]]:
    """k edge-popup trial processes at once at 1/k of the GPU each, for every k of the plan."""
    import gpu_throughput as gt

    rows = []
    for k in plan["packing_ks"]:
        share = 1.0 / k
        config = trial_config(plan["packing_model"], "edgepopup", plan, plan["packing_epochs"],
                              plan["packing_iters"], device, eval_iters=1)
        specs = [dict(config=dict(config, seed=seed), share=share if device.type == "cuda" else 0.0,
                      device=device.type) for seed in range(1, k + 1)]
        sub = os.path.join(folder, f"packing-k{k}")
        os.makedirs(sub, exist_ok=True)
        results = run_processes(specs, sub, plan["trial_timeout"], max_running=k)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            rows.append(dict(k=k, share=share, error=errors[0], trials=results))
            say(f"packing k={k}: failed: {errors[0]}")
            continue
        total, rates, overlapped = gt.aggregate_rate([r["epochs"] for r in results])
        rows.append(dict(model=plan["packing_model"], k=k, share=share, aggregate_images_per_s=total,
                         per_trial_images_per_s=rates, overlapped=overlapped, trials=results))
    base = next((r["aggregate_images_per_s"] for r in rows if r.get("k") == plan["packing_ks"][0]
                 and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            r["vs_k1"] = r["aggregate_images_per_s"] / base if base else None
            say(f"packing {r['model']} k={r['k']}: aggregate {r['aggregate_images_per_s']:.0f} img/s"
                f" ({_fmt(r['vs_k1'], 2)}x k=1){'' if r['overlapped'] else ' (trials did not overlap)'}")
    return rows


def ray_packing(plan: dict[str, Any], device: torch.device, budget: Any) -> dict[str, Any]:
    """gpu_throughput's part (b): the same packing as real Ray Tune trials."""
    import gpu_throughput as gt

    rows: list[dict[str, Any]] = []
    gt.part_b([plan["packing_model"]], plan["packing_ks"], plan["packing_epochs"],
              plan["packing_iters"] or 0, plan["batch"], device.type == "cuda", budget,
              plan["max_train"], plan["batch_eval"], rows=rows)
    return {"rows": rows}


# ----------------------------------------------------------------------------- 5. figure 2


def figure2(plan: dict[str, Any], device: torch.device, folder: str) -> list[dict[str, Any]]:
    """The figure-2-like run: every model x method of the plan, each at its default GPU share,
    packed on the GPU (processes); on CPU one after another in this process."""
    from iterand_tune.resources import gpu_share

    specs = []
    for model in plan["figure2_models"]:
        share = gpu_share(model, "synthetic_cifar10") if device.type == "cuda" else 0.0
        for method in ("sgd", "edgepopup", "iterand"):
            config = trial_config(model, method, plan, plan["figure2_epochs"], plan["figure2_iters"],
                                  device, eval_iters=None if device.type == "cuda" else 1)
            specs.append(dict(config=config, share=share, device=device.type))
    if device.type == "cuda":
        results = run_processes(specs, folder, plan["trial_timeout"])
    else:  # seconds, not the start-up of a process per trial
        results = []
        for spec in specs:
            try:
                results.append(run_trial(spec))
            except Exception as err:  # noqa: BLE001 - reported per trial
                results.append({"error": _error(err)})
    for spec, r in zip(specs, results):
        r.setdefault("model", spec["config"]["model"])
        r.setdefault("share", spec["share"])
        if "error" not in r:
            say(f"figure 2 {r['model']:<14}{r['method']:<10} share {r['share']:g}: epochs "
                f"{', '.join(f'{s:.2f}' for s in r['epoch_seconds'])} s, full epoch about "
                f"{r['full_epoch_s_est']:.1f} s, checkpoint {r['checkpoint_s']:.3f} s")
        else:
            say(f"figure 2 {r['model']}: failed: {r['error']}")
    return results


# ----------------------------------------------------------------------------- targets


def targets(report: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with what was measured and whether it was met (None: not measured,
    or measured on CPU, where the GPU targets say nothing)."""
    gpu = report["mode"] == "cuda"
    out = []

    def add(name: str, target: str, measured: Optional[float], ok: Optional[bool], shown: str) -> None:
        out.append(dict(name=name, target=target, measured=measured, shown=shown,
                        met=(ok if gpu and measured is not None else None)))

    model = plan["target_a"]
    row = next((r for r in report.get("throughput") or [] if r["model"] == model
                and r["pipeline"] == "ours fp32 (defaults)"), None)
    ratio = row["vs_reference"] if row else None
    add(f"{model} edge-popup training images/s, ours vs reference-style", ">= 5x", ratio,
        None if ratio is None else ratio >= 5, _fmt(ratio, 2, "x"))
    k_last = plan["packing_ks"][-1]
    pk = next((r for r in report.get("packing") or [] if r.get("k") == k_last and "error" not in r), None)
    ratio = pk["vs_k1"] if pk else None
    add(f"aggregate images/s, {k_last} trials at 1/{k_last} GPU vs 1 trial, {plan['packing_model']}",
        ">= 3x" if k_last == 4 else f">= {0.75 * k_last:g}x", ratio,
        None if ratio is None else ratio >= (3.0 if k_last == 4 else 0.75 * k_last), _fmt(ratio, 2, "x"))
    for model, limit in plan["target_overhead"].items():
        ov = next((r for r in report.get("overhead") or [] if r["model"] == model), None)
        ratio = ov["ratio"] if ov else None
        add(f"masked (edge-popup) step vs dense step, {model}, batch {plan['batch']}", f"<= {limit}x",
            ratio, None if ratio is None else ratio <= limit, _fmt(ratio, 2, "x"))
    trials = [t for r in report.get("packing") or [] for t in r.get("trials", [])]
    trials += list(report.get("figure2") or [])
    capped = [t for t in trials if t.get("cap_mb") and t.get("peak_reserved_mb") is not None]
    worst = max((t["peak_reserved_mb"] / t["cap_mb"] for t in capped), default=None)
    add("peak GPU memory reserved of each trial within its cap", "<= 100% of the cap", worst,
        None if worst is None else worst <= 1.0, _fmt(None if worst is None else 100 * worst, 0, "%"))
    shares = [t["checkpoint_share"] for t in report.get("figure2") or [] if t.get("checkpoint_share")]
    worst = max(shares, default=None)
    add("checkpoint (Trainer.save) share of an epoch, worst trial", f"<= {CHECKPOINT_SHARE_LIMIT:.0%}",
        worst, None if worst is None else worst <= CHECKPOINT_SHARE_LIMIT,
        _fmt(None if worst is None else 100 * worst, 1, "%"))
    tests = report.get("cuda_tests") or {}
    if tests.get("cases") is not None:
        bad = tests.get("failed", 0) + tests.get("errors", 0)
        ran = len(tests.get("cases", []))
        shown = f"{tests.get('passed', 0)} passed, {bad} failed, {tests.get('skipped', 0)} skipped"
        if "problem" in tests:
            shown += f" ({tests['problem']})"
        out.append(dict(name="CUDA tests (pytest -m cuda)", target="all pass", measured=bad, shown=shown,
                        met=(bad == 0 and ran > 0 and "problem" not in tests) if gpu else None))
    return out


def _fmt(value: Optional[float], digits: int, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


# ----------------------------------------------------------------------------- the report


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    """report.md: the report's figures as tables, beside the targets."""
    env = report["environment"]
    gpu = report["mode"] == "cuda"
    lines = [f"# GPU check: {env['gpu']}", ""]
    if not gpu:
        lines += ["**CPU run (--allow-cpu): a tiny version of every part, to check the machinery. "
                  "Its numbers say nothing about GPU speed; no target is judged.**", ""]
    lines += [f"{report['created']}, {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    lines += _table(["", ""], [[k, env.get(k)] for k in (
        "gpu", "gpu_memory_gb", "gpu_capability", "gpu_count", "driver", "torch", "cuda", "cudnn",
        "python", "cpu_count", "ray", "hostname")])
    lines += ["## Targets", ""]
    lines += _table(["what", "target", "measured", "met"], [
        [t["name"], t["target"], t["shown"], {True: "yes", False: "**no**", None: "-"}[t["met"]]]
        for t in report["targets"]])
    tests = report.get("cuda_tests")
    if tests:
        lines += ["## CUDA tests", "", f"`{tests.get('command')}`: {tests.get('passed', 0)} passed, "
                  f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, "
                  f"{tests.get('skipped', 0)} skipped in {tests.get('seconds', 0):.0f} s"
                  + (f"; {tests['problem']}" if "problem" in tests else "")
                  + f" (log: {tests.get('log')}).", ""]
        lines += _table(["test", "outcome", "s", "message"], [
            [c["name"].split("::")[-1], c["outcome"], f"{c['seconds']:.1f}", c["message"].replace("|", "/")]
            for c in tests.get("cases", [])])
    rows = report.get("throughput")
    if rows:
        lines += ["## Training images/s (edge-popup, synthetic CIFAR-10)", "",
                  f"Batch {report['plan']['batch']}, {report['plan']['steps']} steps timed after "
                  f"{report['plan']['warmup']} warm-up steps.", ""]
        lines += _table(["model", "pipeline", "images/s", "vs reference", "peak allocated MB",
                         "peak reserved MB", "note"], [
            [r["model"], r["pipeline"], _fmt(r["images_per_s"], 0), _fmt(r["vs_reference"], 2, "x"),
             _fmt(r["peak_allocated_mb"], 0), _fmt(r["peak_reserved_mb"], 0),
             ("compiled: " if r.get("compiled") else "NOT compiled: ") + r["compile_note"]
             if "compile_note" in r else ""] for r in rows])
    rows = report.get("overhead")
    if rows:
        lines += ["## Masked step vs dense step", ""]
        lines += _table(["model", "batch", "dense ms", "masked ms", "ratio", "paired ratio"], [
            [r["model"], r["batch"], _fmt(r["dense_ms"], 2), _fmt(r["masked_ms"], 2), _fmt(r["ratio"], 3),
             _fmt(r["paired"], 3)] for r in rows])
    rows = report.get("packing")
    if rows:
        lines += ["## Packing: k trial processes at 1/k of the GPU", ""]
        lines += _table(["model", "k", "share", "images/s per trial", "aggregate images/s", "vs k=1",
                         "peak reserved MB (max)", "cap MB", "note"], [
            [r.get("model", "-"), r["k"], f"{r['share']:g}",
             " / ".join(f"{v:.0f}" for v in r.get("per_trial_images_per_s", [])),
             _fmt(r.get("aggregate_images_per_s"), 0), _fmt(r.get("vs_k1"), 2, "x"),
             _fmt(max((t["peak_reserved_mb"] for t in r.get("trials", [])
                       if t.get("peak_reserved_mb") is not None), default=None), 0),
             _fmt(min((t.get("cap_mb") or math.inf for t in r.get("trials", [])), default=None)
                  if any(t.get("cap_mb") for t in r.get("trials", [])) else None, 0),
             r.get("error") or ("" if r.get("overlapped", True) else "trials did not overlap")]
            for r in rows])
    ray = report.get("ray_packing")
    if ray and ray.get("rows"):
        lines += ["## Packing as Ray Tune trials", ""]
        lines += _table(["model", "k", "aggregate images/s", "vs k=1", "peak allocated MB", "peak reserved MB"], [
            [r["model"], r["k"], _fmt(r["aggregate_images_per_s"], 0), _fmt(r["vs_k1"], 2, "x"),
             _fmt(r["peak_allocated_mb"], 0), _fmt(r["peak_reserved_mb"], 0)] for r in ray["rows"]])
    rows = report.get("figure2")
    if rows:
        plan = report["plan"]
        lines += ["## Figure-2-like run: epoch times per model and method", "",
                  f"Synthetic CIFAR-10, {plan['figure2_epochs']} epochs of {plan['figure2_iters']} "
                  f"iterations (debug_max_iters; a full epoch is {FULL_EPOCH_ITERS}), batch "
                  f"{plan['batch']}, each trial a process at its default GPU share. A full epoch is "
                  "estimated from the last epoch: (its time - the evaluation's) x full / measured "
                  "iterations + the evaluation's.", ""]
        lines += _table(["model", "method", "share", "epoch s", "eval s", "full epoch s (est.)",
                         "checkpoint s", "checkpoint share", "peak allocated MB", "peak reserved MB",
                         "cap MB"], [
            [r["model"], r.get("method", "-"), f"{r['share']:g}",
             " / ".join(f"{s:.2f}" for s in r.get("epoch_seconds", [])) or r.get("error", ""),
             _fmt(r.get("eval_s"), 2), _fmt(r.get("full_epoch_s_est"), 1), _fmt(r.get("checkpoint_s"), 3),
             _fmt(None if r.get("checkpoint_share") is None else 100 * r["checkpoint_share"], 1, "%"),
             _fmt(r.get("peak_allocated_mb"), 0), _fmt(r.get("peak_reserved_mb"), 0), _fmt(r.get("cap_mb"), 0)]
            for r in rows])
    if report.get("skipped") or report.get("errors"):
        lines += ["## Not measured", ""]
        lines += [f"- {s['part']}: skipped, {s['why']}" for s in report.get("skipped", [])]
        lines += [f"- {e['part']}: failed, {e['error']}" for e in report.get("errors", [])]
        lines.append("")
    return "\n".join(lines)


def write_reports(report: dict[str, Any], out: str) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-check", help="folder of report.json and report.md (default gpu-check)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="without a CUDA device, run a tiny version of everything on CPU")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="start no part expected to end after this many seconds (default 450)")
    ap.add_argument("--skip", nargs="+", default=[], choices=PARTS, metavar="PART",
                    help=f"parts to leave out: {', '.join(PARTS)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); run it on a GPU machine, or pass --allow-cpu for "
              "a tiny CPU version", flush=True)
        return NO_CUDA_EXIT
    import gpu_throughput as gt

    mode = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU is always used when present
    device = torch.device(mode)
    plan = PLANS[mode]
    os.makedirs(args.out, exist_ok=True)
    budget = gt.Budget(args.budget_s)
    report: dict[str, Any] = dict(
        schema=1, mode=mode, created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        budget_s=args.budget_s, environment=environment(device), plan=plan, skipped=[], errors=[])
    env = report["environment"]
    say(f"gpu_check: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, {env['cpu_count']} CPU cores"
        + ("" if mode == "cuda" else " (tiny CPU version: the numbers say nothing about a GPU)"))
    if args.allow_cpu and mode == "cuda":
        say("(--allow-cpu ignored: there is a GPU, and it is used)")
    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    ref_rates: dict[str, float] = {}

    def part(name: str, fn: Callable[[], Any], need: Optional[float] = None) -> None:
        if name in args.skip:
            report["skipped"].append(dict(part=name, why="--skip"))
            return
        need = NEEDS[name] if need is None else need
        if mode == "cuda" and budget.elapsed() + need > budget.seconds:
            report["skipped"].append(dict(part=name, why=f"it would end past the {budget.seconds:.0f} s budget"))
            say(f"{name}: skipped (budget)")
            return
        say(f"\n== {name} ({budget.elapsed():.0f} s in)")
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
            report["errors"].append(dict(part=name, error=_error(err)))
            say(f"{name}: failed: {_error(err)}")
        report.setdefault("part_seconds", {})[name] = time.perf_counter() - t0

    def tests() -> None:
        left = max(30.0, budget.seconds - budget.elapsed() - 60) if mode == "cuda" else plan["tests_timeout"]
        report["cuda_tests"] = run_cuda_tests(args.out, min(plan["tests_timeout"], left))
        t = report["cuda_tests"]
        say(f"CUDA tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
            f"{t['skipped']} skipped" + (f" ({t['problem']})" if "problem" in t else ""))

    def a() -> None:
        report["throughput"] = throughput(plan, device, budget, False, ref_rates)

    def overhead() -> None:
        report["overhead"] = []
        for model in plan["overhead_models"]:
            row = step_overhead(model, plan["batch"], plan["overhead_repeats"], plan["overhead_block"],
                                device, plan["overhead_warmup"])
            report["overhead"].append(row)
            say(f"{model}: dense {row['dense_ms']:.2f} ms, masked {row['masked_ms']:.2f} ms, "
                f"ratio {row['ratio']:.3f}")

    def pack() -> None:
        report["packing"] = packing(plan, device, os.path.join(scratch, "packing"))

    def fig2() -> None:
        folder = os.path.join(scratch, "figure2")
        os.makedirs(folder, exist_ok=True)
        report["figure2"] = figure2(plan, device, folder)

    def ray() -> None:
        try:
            import ray as _ray  # noqa: F401 - only whether it is there
        except ImportError:
            report["ray_packing"] = {"skipped": "Ray is not importable here"}
            report["skipped"].append(dict(part="ray", why="Ray is not importable here"))
            return
        report["ray_packing"] = ray_packing(plan, device, budget)

    def compile_row() -> None:
        if mode != "cuda":
            report["skipped"].append(dict(part="compile", why="on CPU torch.compile takes minutes of C++ compilation"))
            return
        report["throughput"] = (report.get("throughput") or []) + throughput(plan, device, budget, True, ref_rates)

    try:
        part("tests", tests)
        part("throughput", a)
        part("overhead", overhead)
        part("packing", pack)
        part("figure2", fig2)
        part("ray", ray)
        part("compile", compile_row)
    finally:
        report["elapsed_s"] = budget.elapsed()
        report["targets"] = targets(report, plan)
        write_reports(report, args.out)
        shutil.rmtree(scratch, ignore_errors=True)
    say(f"\nreport: {os.path.join(args.out, 'report.md')} and report.json ({budget.elapsed():.0f} s)")
    for t in report["targets"]:
        say(f"  {t['name']}: {t['shown']} (target {t['target']})"
            + {True: "", False: "  NOT MET", None: ""}[t["met"]])
    tests_ok = "cuda_tests" not in report or (
        report["cuda_tests"].get("failed", 0) + report["cuda_tests"].get("errors", 0) == 0
        and "problem" not in report["cuda_tests"])
    return 0 if tests_ok and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
