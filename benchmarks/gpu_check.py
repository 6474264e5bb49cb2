"""The GPU check (`make gpu-check`): the CUDA tests and the project's GPU figures, each measured in
child processes within one time budget, written to DIR/report.json and DIR/report.md after every
figure. What it measures and how to read it: docs/gpu.md.

Usage: gpu_check.py [--out DIR] [--allow-cpu] [--budget-s 480] [--skip PART ...] [--write-shares [PATH]]
"""
from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here: the check's own start-up is in it

import argparse  # noqa: E402 - after START, so that the budget holds the imports too
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from typing import Any, Callable, Iterator, Optional  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
THIS = os.path.abspath(__file__)
for _path in (ROOT, HERE):  # the checkout and the sibling benchmarks, without an install
    if _path not in sys.path:
        sys.path.insert(0, _path)

PARTS = ("tests", "compile", "throughput", "step", "packing", "figure2", "imagenet")
EXIT_FAILED, NO_CUDA_EXIT = 1, 3
DEFAULT_BUDGET_S = 480.0  # 8 minutes: a 600 s limit keeps 2 minutes of margin
FULL_EPOCH_ITERS = 352  # ceil(45,000 / 128): one epoch of (synthetic) CIFAR-10 at batch 128
CHECKPOINT_SHARE_LIMIT = 0.05
RUN_VAR, PARENT_VAR = "GPU_CHECK_RUN", "GPU_CHECK_PARENT"  # set in every child's environment
COMPUTE_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}

# What each mode runs. The GPU plan is sized for one H200 with 16 cores within the default budget.
PLANS: dict[str, dict[str, Any]] = {
    "cuda": dict(
        batch=128, batch_eval=512, max_train=None, tests_timeout=200,
        compile_models=["conv6x1.0", "resnet18x1.0"], compile_timeout=120, compile_reserve_s=220,
        throughput_models=["conv6x1.0", "resnet18x1.0"], steps=100, warmup=20,
        step_models=["conv6x1.0", "resnet18x1.0"], step_repeats=20, step_block=5, step_warmup=5,
        packing_models=["conv6x0.25", "resnet18x0.25"], packing_ks=[1, 2, 4, 8, 16],
        packing_epochs=3, packing_iters=50,
        figure2_models=["conv6x0.25", "conv6x1.0", "resnet18x0.25", "resnet18x1.0"],
        figure2_epochs=2, figure2_iters=100, trial_timeout=240,
        target_throughput=["conv6x1.0", 5.0], target_packing=["conv6x0.25", 4, 3.0],
        target_step={"conv6x1.0": 1.2, "resnet18x1.0": 1.3},
        # 1,000 classes as ImageNet: 2,000 training and 1,000 test JPEGs; figure 3's workers, batches.
        imagenet=dict(classes=1000, train_per_class=2, val_per_class=1, size=[350, 400],
                      models=["resnet50", "resnet101"], workers=None, steps=20, warmup=5, epoch_iters=14,
                      timeout=300)),
    "cpu": dict(
        batch=16, batch_eval=64, max_train=64, tests_timeout=240,
        compile_models=["conv6x0.25"], compile_timeout=300, compile_reserve_s=0,
        throughput_models=["conv6x0.25"], steps=2, warmup=2,
        step_models=["conv6x0.25"], step_repeats=3, step_block=1, step_warmup=1,
        packing_models=["conv6x0.25"], packing_ks=[1, 2], packing_epochs=2, packing_iters=2,
        figure2_models=["conv6x0.25", "resnet18x0.25"], figure2_epochs=2, figure2_iters=2,
        trial_timeout=300,
        target_throughput=["conv6x0.25", 5.0], target_packing=["conv6x0.25", 2, 1.5],
        target_step={"conv6x0.25": 1.2},
        imagenet=dict(classes=3, train_per_class=4, val_per_class=1, size=[48, 56], models=["resnet18x0.125"],
                      workers=0, steps=2, warmup=1, epoch_iters=2, batch=4, batch_eval=4, timeout=240)),
}
# Seconds an item of a part is expected to take on the GPU: it starts only with that much left.
NEEDS = {"tests": 60, "compile": 60, "throughput": 25, "step": 10, "packing": 20, "figure2": 45, "imagenet": 90}


def say(line: str) -> None:
    print(line, flush=True)


def _fmt(value: Optional[float], digits: int, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_atomically(path: str, text: str) -> None:
    """A kill at any moment leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- signals


class Interrupted(BaseException):
    """SIGTERM or SIGINT: the check stops, marks the part it was in and writes the report."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """The first SIGTERM or SIGINT raises Interrupted in the main thread, except inside `held`
    (starting a child, writing the report), where it waits for the block's end; once the check
    is cleaning up, signals are only recorded."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.depth, self.raised, self.closing = 0, False, False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if self.depth == 0 and not (self.raised or self.closing):
            self.raised = True
            raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.signum is not None and not (self.raised or self.closing):
                self.raised = True
                raise Interrupted(self.signum)


# ----------------------------------------------------------------------------- child processes


def process_tree(pid: int, proc: str = "/proc") -> list[int]:
    """`pid` and every process descending from it (from /proc; just `pid` without /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return [pid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "stat")) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`'s process group, the groups of its descendants (a child may start a session
    of its own) and every descendant; never the check's own group."""
    pids = process_tree(pid)
    own = os.getpgrp()
    groups = set()
    for p in pids:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(p))
    for group in groups - {own}:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def die_with_parent() -> None:
    """In a child: be killed when the check's process ends, however it ends (even by SIGKILL,
    which leaves it no time to stop its children)."""
    with contextlib.suppress(Exception):
        import ctypes  # Linux's prctl; elsewhere the check's own kills are all there is

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.environ.get(PARENT_VAR)
    if parent and os.getppid() != int(parent):  # the check ended before prctl took effect
        os._exit(1)


class Children:
    """The check's child processes, each the leader of a process group of its own: on a timeout,
    an interrupt or the check's end a child is killed together with whatever it started."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: list[int] = []

    def start(self, cmd: list[str], log_path: str, env: dict[str, str]) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[proc.pid] = proc
        self.started.append(proc.pid)
        return proc

    def exited(self, proc: subprocess.Popen) -> bool:
        """Whether `proc` has ended; if so, what it left behind in its group is killed (while
        its process id cannot have been reused) and it is reaped."""
        if proc.returncode is not None:
            return True
        try:
            state = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            state = True
        if state is None:
            return False
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.procs.pop(proc.pid, None)
        return True

    def kill(self, proc: subprocess.Popen) -> None:
        kill_tree(proc.pid)
        proc.wait()
        self.procs.pop(proc.pid, None)

    def kill_all(self) -> None:
        for proc in list(self.procs.values()):
            self.kill(proc)


def child_env(run_id: str, **extra: str) -> dict[str, str]:
    """The environment of every child: the checkout importable, cuBLAS deterministic, the run's
    mark (tests find leftovers by it) and the check's process id (die_with_parent)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env.pop("RAY_ADDRESS", None)
    env[RUN_VAR], env[PARENT_VAR] = run_id, str(os.getpid())
    env.update(extra)
    return env


def worker_command(spec_path: str) -> list[str]:
    return [sys.executable, THIS, "--worker", spec_path]


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line.strip()), "")[:300]


def trial_processes(children: Children, specs: list[dict[str, Any]], folder: str, timeout: float,
                    env: dict[str, str], slots: float = 1.0, barrier: bool = False,
                    sampler: Optional["MemorySampler"] = None, left: Optional[Callable[[], float]] = None,
                    held: Callable[[], Any] = contextlib.nullcontext) -> Iterator[dict[str, Any]]:
    """Each spec's trial in a process of its own, started whenever its share fits in what the
    running ones leave of `slots` GPUs; with `barrier`, all at once, training from one signal
    given when all are ready. Yields each trial's result as it ends (its `index` in `specs`),
    with the process's peak GPU memory as NVML saw it (`gpu_peak_mb`). A trial that fails or
    runs past `timeout` gives {"error"}; one stopped because `left()` (the budget) ran out
    gives {"cut"}. `held` guards each start (Signals.held: an interrupt never loses a child)."""
    from gpu_throughput import read_rows  # torch: the check imports it once the mode is known

    os.makedirs(folder, exist_ok=True)
    go = os.path.join(folder, "go")
    pending = list(enumerate(specs))
    running: dict[int, dict[str, Any]] = {}
    while pending or running:
        used = sum(r["spec"]["share"] for r in running.values())
        for i, spec in list(pending):
            if not barrier and running and used + spec["share"] > slots + 1e-9:
                continue
            spec = dict(spec, index=i)
            if barrier:
                spec.update(ready=os.path.join(folder, f"ready-{i}"), go=go, go_timeout=timeout)
            result = os.path.join(folder, f"result-{i}.jsonl")
            path = os.path.join(folder, f"spec-{i}.json")
            with open(path, "w") as f:
                json.dump({"call": "trials", "args": {"specs": [spec]}, "result": result}, f)
            budget = left() if left else math.inf
            limit = min(timeout, max(budget, 1.0))
            with held():
                proc = children.start(worker_command(path), os.path.join(folder, f"trial-{i}.log"), env)
            running[i] = dict(spec=spec, proc=proc, deadline=time.monotonic() + limit, limit=limit,
                              cut=budget < timeout, result=result, log=os.path.join(folder, f"trial-{i}.log"))
            pending.remove((i, specs[i]))
            used += spec["share"]
        if barrier and not os.path.exists(go) and all(os.path.exists(r["spec"]["ready"])
                                                      for r in running.values()):
            with open(go, "w"):
                pass
        time.sleep(0.1)
        for i, r in list(running.items()):
            proc = r["proc"]
            if children.exited(proc):
                rows = read_rows(r["result"])
                row = rows[-1] if rows else {"error": f"exit {proc.returncode}: {_tail(r['log'])}"}
            elif time.monotonic() > r["deadline"]:
                children.kill(proc)
                row = ({"cut": f"stopped after {r['limit']:.0f} s: the budget ran out"} if r["cut"]
                       else {"error": f"ran past {r['limit']:.0f} s and was stopped"})
            else:
                continue
            del running[i]
            spec = r["spec"]
            row.update(index=i, pid=proc.pid)
            row.setdefault("model", spec["config"]["model"])
            row.setdefault("method", _method(spec["config"]))
            row.setdefault("share", spec["share"])
            if sampler is not None:
                row["gpu_peak_mb"] = sampler.peak_mb(proc.pid)
                if sampler.total_mb:
                    row["gpu_share_mb"] = spec["share"] * sampler.total_mb if spec["share"] else None
            yield row


def _method(config: dict[str, Any]) -> str:
    from iterand_tune.config import TrialConfig  # torch-free, but only trials need it

    return TrialConfig.from_dict(config).method


# ----------------------------------------------------------------------------- NVML


def open_nvml() -> tuple[Any, Any, str]:
    """(pynvml, handle of the GPU torch calls cuda:0, "") or (None, None, why not)."""
    try:
        import pynvml  # nvidia-ml-py: what a CUDA driver's NVML says, per process
    except ImportError:
        return None, None, "pynvml (nvidia-ml-py) is not importable"
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if visible.startswith(("GPU-", "MIG-")):
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
            except Exception:  # noqa: BLE001 - older bindings take bytes
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible.encode())
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
    except Exception as err:  # noqa: BLE001 - NVMLError and its many subclasses
        return None, None, f"NVML did not start: {err}"
    return pynvml, handle, ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_facts(nvml: Any, handle: Any) -> dict[str, Any]:
    """The GPU as NVML sees it: name, memory (MB), compute capability, driver, compute mode."""
    facts: dict[str, Any] = {}
    for key, read in (("gpu", lambda: _text(nvml.nvmlDeviceGetName(handle))),
                      ("gpu_memory_mb", lambda: round(nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20)),
                      ("gpu_capability", lambda: "%d.%d" % nvml.nvmlDeviceGetCudaComputeCapability(handle)),
                      ("driver", lambda: _text(nvml.nvmlSystemGetDriverVersion())),
                      ("compute_mode", lambda: COMPUTE_MODES.get(nvml.nvmlDeviceGetComputeMode(handle),
                                                                   "unknown"))):
        try:
            facts[key] = read()
        except Exception:  # noqa: BLE001 - a field this driver does not report stays out
            facts[key] = None
    return facts


def mps_state(proc: str = "/proc", pipe_dir: Optional[str] = None) -> tuple[bool, str]:
    """(MPS active?, how it was told): its control daemon or server among this machine's
    processes, or its control pipe (CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps), which a
    container sees when the daemon runs outside it."""
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(proc, entry, "comm")) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("nvidia-cuda-mps"):
            return True, f"{name} runs (pid {entry})"
    pipe_dir = pipe_dir or os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    if os.path.exists(os.path.join(pipe_dir, "control")):
        return True, f"its control pipe is in {pipe_dir}"
    return False, f"no nvidia-cuda-mps-control or -server process, no control pipe in {pipe_dir}"


def packing_blocked(compute_mode: Optional[str], mps: bool) -> Optional[str]:
    """Why trial processes cannot share this GPU (one line, with what to change), or None."""
    if compute_mode == "PROHIBITED":
        return ("the GPU's compute mode is PROHIBITED: no process may use it; `nvidia-smi -c DEFAULT` "
                "(as root) allows it")
    if compute_mode in ("EXCLUSIVE_PROCESS", "EXCLUSIVE_THREAD") and not mps:
        return (f"the GPU's compute mode is {compute_mode}: one process at a time, so trials cannot "
                "share it; `nvidia-smi -c DEFAULT` (as root) lets them, or start MPS "
                "(`nvidia-cuda-mps-control -d`), whose server is then the one process")
    return None


def nvidia_smi() -> dict[str, Any]:
    """Driver and compute mode from nvidia-smi, where NVML's Python binding is missing."""
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version,compute_mode", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=20)
        driver, mode = [x.strip() for x in out.stdout.splitlines()[0].split(",")]
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {}
    return {"driver": driver, "compute_mode": mode.upper().replace(" ", "_")}


class MemorySampler:
    """Polls NVML's list of processes running on the GPU and keeps each one's peak memory, CUDA
    context included: what a trial really takes of the card, which no cap inside the process
    bounds. A thread polls every `interval` seconds; `sample()` polls once."""

    def __init__(self, nvml: Any, handle: Any, total_mb: Optional[float] = None,
                 interval: float = 0.2) -> None:
        self.nvml, self.handle, self.total_mb, self.interval = nvml, handle, total_mb, interval
        self.peaks: dict[int, float] = {}
        self.seen: dict[int, tuple[float, float]] = {}  # pid -> (first, last) monotonic time
        self.unreported: set[int] = set()  # NVML lists them without their memory (e.g. MIG)
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> None:
        try:
            procs = list(self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle))
        except Exception as err:  # noqa: BLE001 - NVMLError: said once in the report
            self.error = self.error or f"NVML's process list failed: {err}"
            return
        t = time.monotonic()
        for p in procs:
            pid, used = int(p.pid), getattr(p, "usedGpuMemory", None)
            first, _ = self.seen.get(pid, (t, t))
            self.seen[pid] = (first, t)
            if used is None:
                self.unreported.add(pid)
            else:
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), used / 2**20)

    def peak_mb(self, pid: int) -> Optional[float]:
        return self.peaks.get(pid)

    def others(self, known: set[int], since: float) -> dict[int, float]:
        """Peaks of processes seen since `since` that are none of `known` (another job, or
        process ids of another PID namespace: NVML reports the host's in a container)."""
        return {pid: mb for pid, mb in self.peaks.items() if pid not in known and self.seen[pid][1] >= since}

    def start(self) -> "MemorySampler":
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def judge_memory(trials: list[dict[str, Any]], others: dict[int, float]) -> None:
    """Mark each trial `within_share` (its NVML peak <= its share of the card's memory). Trials
    whose process NVML did not list under its id are judged by the processes it listed instead
    (`others`, seen while they ran), against the largest share among them."""
    for t in trials:
        if t.get("gpu_peak_mb") is not None and t.get("gpu_share_mb"):
            t["within_share"] = t["gpu_peak_mb"] <= t["gpu_share_mb"]
    unmatched = [t for t in trials if t.get("gpu_peak_mb") is None and t.get("gpu_share_mb")]
    if unmatched and others:
        limit = max(t["gpu_share_mb"] for t in unmatched)
        worst = max(others.values())
        for t in unmatched:
            t.update(gpu_peak_unmatched_mb=worst, within_share=worst <= limit)


# ----------------------------------------------------------------------------- torch.compile


def compile_prerequisites(device_type: str, find_spec: Callable[[str], Any] = importlib.util.find_spec,
                          which: Callable[[str], Optional[str]] = shutil.which,
                          include: Optional[str] = None) -> list[str]:
    """What torch.compile (Inductor) needs here and is missing, one reason each: Triton for GPU
    kernels, a C compiler for Triton's launchers (C++ for CPU kernels), Python's headers."""
    missing = []
    if device_type == "cuda" and find_spec("triton") is None:
        missing.append("Triton is not importable: Inductor writes its GPU kernels in Triton "
                       "(torch's CUDA wheels depend on the `triton` package)")
    cpu = device_type == "cpu"
    compilers = ("c++", "g++", "clang++") if cpu else ("cc", "gcc", "clang")
    chosen = os.environ.get("CXX" if cpu else "CC")
    if not (chosen and which(chosen)) and not any(which(c) for c in compilers):
        uses = "Inductor compiles its CPU kernels" if cpu else "Triton compiles a launcher for its kernels"
        missing.append(f"no {'C++' if cpu else 'C'} compiler ({', '.join(compilers)}) on PATH: {uses} "
                       "with it (install gcc)")
    include = include or sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        version = "%d.%d" % sys.version_info[:2]
        missing.append(f"no Python headers ({os.path.join(include, 'Python.h')}): the compiled launchers "
                       f"include them (install the python{version}-dev package)")
    return missing


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
                lines = (child.get("message") or child.text or "").strip().splitlines()
                message = lines[0] if lines else ""
                break
        cases.append(dict(name=f"{case.get('classname', '')}::{case.get('name')}".lstrip(":"),
                          outcome=outcome, seconds=float(case.get("time") or 0.0), message=message[:300]))
    return cases


_VERBOSE = re.compile(r"^(?P<file>\S+?\.py)::(?P<name>\S+) "
                      r"(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
                      r"(?: \((?P<message>.*?)\))?\s*(?:\[\s*\d+%\])?\s*$")


def parse_pytest_log(text: str) -> tuple[list[dict[str, Any]], Optional[str]]:
    """The cases `pytest -v` has reported so far, and the one it was running (None if none):
    what is known of a test run stopped before it wrote its JUnit XML."""
    cases, running = [], None
    for line in text.splitlines():
        m = _VERBOSE.match(line.strip())
        if m:
            outcome = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                       "XFAIL": "skipped", "XPASS": "passed"}[m.group("outcome")]
            module = m.group("file")[:-3].replace("/", ".")
            cases.append(dict(name=f"{module}::{m.group('name')}", outcome=outcome, seconds=None,
                              message=(m.group("message") or "")[:300]))
            running = None
        elif re.match(r"^\S+\.py::\S+\s*$", line.strip()):
            running = line.strip()
    return cases, running


# ----------------------------------------------------------------------------- the check


class Skip(Exception):
    """A part that cannot run here, with the one line saying why."""


class Check:
    """One run of the check: its plan, budget, children and report."""

    def __init__(self, args: argparse.Namespace, mode: str, signals: Signals) -> None:
        self.args, self.mode, self.signals = args, mode, signals
        self.plan = PLANS[mode]
        self.out = args.out
        self.budget_s = args.budget_s
        self.run_id = uuid.uuid4().hex
        self.children = Children()
        self.sampler: Optional[MemorySampler] = None
        self.scratch = tempfile.mkdtemp(prefix="gpu_check_")
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.part: Optional[str] = None
        self.report: dict[str, Any] = dict(
            schema=2, state="running", mode=mode, created=now_iso(), updated=None, elapsed_s=0.0,
            budget_s=self.budget_s, command=" ".join([os.path.relpath(THIS, ROOT), *sys.argv[1:]]),
            environment={}, plan=self.plan, failures=[], targets=[],
            parts={name: {"state": "pending", "rows": []} for name in PARTS},
            shares={"proposed": [], "written": None})

    # --------------------------------------------------------------- time and children

    def elapsed(self) -> float:
        return time.monotonic() - START

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(self.run_id, **extra)

    def follow(self, cmd: list[str], log: str, label: str, timeout: float,
               read: Callable[[], list[dict[str, Any]]], env: Optional[dict[str, str]] = None,
               for_time: bool = False) -> Iterator[dict[str, Any]]:
        """Start `cmd` as a child and yield each row `read()` gives beyond those yielded before,
        with the child's NVML peak so far, until it ends; past `timeout` it is killed and a last
        row says so: an error, or a cut when the budget (or `for_time`: a timeout shortened to
        keep the budget) set the limit. Returns (the child, whether it was stopped)."""
        limit = min(timeout, max(self.left(), 1.0))
        cut = for_time or self.left() < timeout
        with self.signals.held():
            proc = self.children.start(cmd, log, env or self.env())
        deadline, seen = time.monotonic() + limit, 0
        while True:
            ended = self.children.exited(proc)
            rows = read()
            for row in rows[seen:]:
                if self.sampler is not None:
                    row["gpu_peak_mb"] = self.sampler.peak_mb(proc.pid)
                yield row
            seen = len(rows)
            if ended:
                return proc, False
            if time.monotonic() > deadline:
                self.children.kill(proc)
                yield ({"cut": f"{label}: stopped after {limit:.0f} s, the budget ran out"} if cut
                       else {"error": f"{label}: ran past {limit:.0f} s and was stopped"})
                return proc, True
            time.sleep(0.2)

    def worker(self, call: str, args: dict[str, Any], label: str, timeout: float,
               env: Optional[dict[str, str]] = None, for_time: bool = False) -> Iterator[dict[str, Any]]:
        """One child running gpu_throughput.CALLS[call], its rows as it emits them."""
        from gpu_throughput import read_rows  # torch: imported once the mode is known

        result, spec = (os.path.join(self.scratch, f"{label}.{ext}") for ext in ("jsonl", "json"))
        with open(spec, "w") as f:
            json.dump({"call": call, "args": args, "result": result}, f)
        log = os.path.join(self.logs, f"{label}.log")
        proc, stopped = yield from self.follow(worker_command(spec), log, label, timeout,
                                               lambda: read_rows(result), env, for_time)
        if not stopped and proc.returncode != 0 and not any("error" in r for r in read_rows(result)):
            yield {"error": f"{label}: exit {proc.returncode}: {_tail(log)}"}

    def note(self, text: str) -> None:
        self.report["parts"][self.part].setdefault("notes", []).append(text)
        say(f"  {text}")

    # --------------------------------------------------------------- the report

    def write(self) -> None:
        """report.json and report.md as they stand (atomically: a kill leaves the last whole one)."""
        r = self.report
        r.update(updated=now_iso(), elapsed_s=round(self.elapsed(), 1))
        r["targets"] = targets(r)
        if self.sampler is not None and self.sampler.error:
            r["environment"]["nvml_error"] = self.sampler.error
        with self.signals.held():
            _write_atomically(os.path.join(self.out, "report.json"), json.dumps(r, indent=1, default=str))
            _write_atomically(os.path.join(self.out, "report.md"), markdown(r))

    def fail(self, what: str, error: str) -> None:
        self.report["failures"].append(dict(part=self.part, what=what, error=error))

    # --------------------------------------------------------------- running

    def run(self) -> int:
        code = 0
        try:
            self.write()  # from the first second on, a report: every part pending
            self.report["environment"] = environment(self)
            env = self.report["environment"]
            say(f"gpu_check: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, "
                f"{env['cpu_count']} CPU cores"
                + ("" if self.mode == "cuda" else " (tiny CPU version: the numbers say nothing about a GPU)"))
            self.write()
            for name in PARTS:
                self.run_part(name)
            self.report["state"] = "finished"
        except Interrupted as stop:
            self.report.update(state="interrupted", interrupted_by=str(stop))
            code = 128 + stop.signum
        finally:
            self.signals.closing = True  # cleaning up: a second signal must not cut it short
            self.children.kill_all()
            if self.sampler is not None:
                self.sampler.stop()
            if self.part is not None:
                part = self.report["parts"][self.part]
                part.update(state="interrupted", why=self.report.get("interrupted_by") or "stopped")
            self.write()
            shutil.rmtree(self.scratch, ignore_errors=True)
        failed = bool(self.report["failures"])
        say(f"\nreport: {os.path.join(self.out, 'report.md')} and report.json "
            f"({self.report['state']}, {self.elapsed():.0f} s)")
        for t in self.report["targets"]:
            missed = "  NOT MET" if t["met"] is False else ""
            say(f"  {t['name']}: {t['shown']} (target {t['target']}){missed}")
        for f in self.report["failures"]:
            say(f"  FAILED {f['part']}: {f['what']}: {f['error']}")
        return code or (EXIT_FAILED if failed else 0)

    def run_part(self, name: str) -> None:
        part = self.report["parts"][name]
        if name in self.args.skip:
            part.update(state="skipped", why="--skip")
            self.write()
            return
        if self.left() < NEEDS[name]:
            part.update(state="skipped", why=f"time: it needs about {NEEDS[name]} s, "
                                              f"{max(self.left(), 0):.0f} s of the budget were left")
            say(f"{name}: skipped for time")
            self.write()
            return
        from gpu_throughput import error_row  # torch: imported once the mode is known

        self.part = name
        part.update(state="running", started_s=round(self.elapsed(), 1))
        say(f"\n== {name} ({self.elapsed():.0f} s in)")
        self.write()
        t0 = time.monotonic()
        try:
            for row in PART_FUNCTIONS[name](self):
                part["rows"].append(row)
                if "error" in row or row.get("outcome") in ("failed", "error"):
                    error = row.get("error") or row.get("message") or row["outcome"]
                    self.fail(_row_label(row), error)
                    say(f"  failed: {_row_label(row)}: {error}")
                if "cut" in row:
                    part["cut"] = True
                    say(f"  {row['cut']}")
                self.write()
            state = "cut" if part.get("cut") else "done"
            if any("error" in r for r in part["rows"]) or any(r.get("outcome") in ("failed", "error")
                                                                for r in part["rows"]):
                state = "failed"
            part["state"] = state
        except Skip as why:
            part.update(state="skipped", why=str(why))
            say(f"{name}: skipped: {why}")
        except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
            got = error_row(err)
            part.update(state="failed", error=got["error"], traceback=got["traceback"])
            self.fail(name, got["error"])
            say(f"{name}: failed: {got['error']}")
        finally:
            part["seconds"] = round(time.monotonic() - t0, 1)
        self.part = None
        self.write()


def _row_label(row: dict[str, Any]) -> str:
    if "name" in row:
        return row["name"]
    bits = [str(row[k]) for k in ("model", "method", "pipeline") if row.get(k)]
    if row.get("k"):
        bits.append(f"k={row['k']}")
    return " ".join(bits) or "a child process"


# ----------------------------------------------------------------------------- environment


def environment(check: Check) -> dict[str, Any]:
    """What the figures were measured on; starts NVML's memory sampler on a GPU."""
    import torch

    info: dict[str, Any] = {
        "device": check.mode, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "platform": platform.platform(), "hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
        "gpu": None, "gpu_memory_mb": None, "gpu_capability": None, "gpu_count": 0, "driver": None,
        "compute_mode": None, "mps": None, "nvml": None,
        "compile_missing": compile_prerequisites(check.mode)}
    if check.mode == "cuda":
        # This process opens no CUDA context (NVML, and without it device properties, need
        # none): it would show among the trials' processes and hold an exclusive-mode GPU.
        info["gpu_count"] = torch.cuda.device_count()
        nvml, handle, why = open_nvml()
        if nvml is None:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_mb=round(props.total_memory / 2**20),
                        gpu_capability=f"{props.major}.{props.minor}")
            info["nvml"] = why + ": no per-process GPU memory; compute mode from nvidia-smi"
            info.update(nvidia_smi())
        else:
            info["nvml"] = "per-process GPU memory sampled every 0.2 s"
            info.update({k: v for k, v in gpu_facts(nvml, handle).items() if v is not None})
            check.sampler = MemorySampler(nvml, handle, info["gpu_memory_mb"]).start()
        active, how = mps_state()
        info["mps"], info["mps_how"] = active, how
        info["packing_blocked"] = packing_blocked(info["compute_mode"], active)
    else:
        info["gpu"] = f"none (CPU: {platform.processor() or platform.machine()})"
    return info


# ----------------------------------------------------------------------------- the parts
# Each part is a generator of rows: the check appends each to the report as it comes and rewrites
# the report, so that a kill at any moment keeps every row already measured.


def part_tests(check: Check) -> Iterator[dict[str, Any]]:
    """`pytest -m cuda tests/test_cuda.py` in a child; one row per test case, as they end."""
    xml = os.path.join(check.out, "cuda-tests.xml")
    log = os.path.join(check.out, "cuda-tests.log")
    for path in (xml, log):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    cmd = [sys.executable, THIS, "--exec", sys.executable, "-m", "pytest", "-m", "cuda", "-v",
           "-p", "no:cacheprovider", f"--junitxml={xml}", "-o", "junit_family=xunit2",
           os.path.join("tests", "test_cuda.py")]
    part = check.report["parts"]["tests"]
    part["command"] = " ".join(cmd[5:])

    def cases() -> list[dict[str, Any]]:
        with open(log, errors="replace") as f:
            found, part["running"] = parse_pytest_log(f.read())
        return found

    proc, stopped = yield from check.follow(cmd, log, "the tests", check.plan["tests_timeout"], cases)
    if stopped:
        return
    if os.path.exists(xml):  # with each case's time and message, the XML replaces the log's rows
        by_name = {c["name"]: c for c in parse_junit(xml)}
        for row in part["rows"]:
            row.update(by_name.pop(row["name"], {}))
        yield from by_name.values()
    elif proc.returncode not in (0, 5) or not part["rows"]:  # 5: pytest collected nothing
        yield {"error": f"pytest exit {proc.returncode}, no results: {_tail(log)}"}


def part_compile(check: Check) -> Iterator[dict[str, Any]]:
    """torch.compile's rows, early in the check: compilation time apart from the steady rate,
    Inductor's compile workers set to the child's CPUs."""
    missing = check.report["environment"]["compile_missing"]
    if missing:
        raise Skip("torch.compile cannot run here: " + "; ".join(missing))
    if check.mode != "cuda":
        raise Skip("on CPU, Inductor's C++ compilation takes minutes; compile is measured on a GPU")
    cpus = max(1, (os.cpu_count() or 1) // 4)  # what a trial at 1/4 of this machine would get
    plan = check.plan
    for model in plan["compile_models"]:
        # A compilation can take minutes: it may not eat the time the later parts need.
        if check.left() - plan["compile_reserve_s"] < NEEDS["compile"]:
            check.note(f"{model}: skipped for time ({check.left():.0f} s left, "
                       f"{plan['compile_reserve_s']} s of them kept for the later parts)")
            continue
        args = dict(model=model, device=check.mode, cpus=cpus, batch=plan["batch"], steps=plan["steps"],
                    warmup=plan["warmup"], max_train=plan["max_train"])
        timeout = min(plan["compile_timeout"], check.left() - plan["compile_reserve_s"])
        yield from check.worker("compile", args, f"compile-{model}", timeout,
                                check.env(TORCHINDUCTOR_COMPILE_THREADS=str(cpus)),
                                for_time=timeout < plan["compile_timeout"])


def part_throughput(check: Check) -> Iterator[dict[str, Any]]:
    """Training images/s: the reference-style pipeline, ours with each runtime option."""
    plan = check.plan
    for model in plan["throughput_models"]:
        if check.left() < NEEDS["throughput"]:
            check.note(f"{model}: skipped for time ({check.left():.0f} s left)")
            continue
        args = dict(model=model, device=check.mode, cpus=os.cpu_count() or 1, batch=plan["batch"],
                    steps=plan["steps"], warmup=plan["warmup"], max_train=plan["max_train"])
        yield from check.worker("throughput", args, f"throughput-{model}", 180)


def part_step(check: Check) -> Iterator[dict[str, Any]]:
    """Where a step's time goes: masked against dense, the mask selection alone, a re-draw."""
    plan = check.plan
    args = dict(models=plan["step_models"], device=check.mode, cpus=os.cpu_count() or 1,
                batch=128 if check.mode == "cuda" else plan["batch"], repeats=plan["step_repeats"],
                block=plan["step_block"], warmup=plan["step_warmup"])
    yield from check.worker("step", args, "step", 120)


def part_packing(check: Check) -> Iterator[dict[str, Any]]:
    """The packing curve: aggregate images/s of k trial processes at 1/k of the GPU each, for
    every k the memory allows; from it, each model's share (gpu_shares.choose_share)."""
    from gpu_throughput import aggregate_rate, trial_config

    from iterand_tune import gpu_shares

    blocked = check.report["environment"].get("packing_blocked")
    if blocked:
        raise Skip(blocked)
    plan, gpu = check.plan, check.mode == "cuda"
    for model in plan["packing_models"]:
        curve: dict[int, Optional[float]] = {}
        need_mb, base, last_s = None, None, None
        for k in plan["packing_ks"]:
            total_mb = check.report["environment"].get("gpu_memory_mb")
            if gpu and need_mb and total_mb and k * need_mb > 0.95 * total_mb:
                check.note(f"{model} k={k}: not run, {k} trials of {need_mb:.0f} MB do not fit in "
                           f"{total_mb:.0f} MB")
                break
            # Doubling k at most doubles how long each trial takes (no gain from sharing).
            if check.left() < max(NEEDS["packing"], 2 * (last_s or 0)):
                check.note(f"{model} k={k}: skipped for time ({check.left():.0f} s left)")
                break
            if k > (os.cpu_count() or 1):
                check.note(f"{model} k={k}: more trials than the machine's {os.cpu_count()} cores")
            share = 1.0 / k
            config = trial_config(model, "edgepopup", plan, plan["packing_epochs"], plan["packing_iters"],
                                  check.mode, eval_iters=1)
            specs = [dict(config=dict(config, seed=s), share=share if gpu else 0.0, device=check.mode)
                     for s in range(1, k + 1)]
            t0, since = time.monotonic(), time.monotonic()
            trials = list(trial_processes(
                check.children, specs, os.path.join(check.scratch, f"packing-{model}-k{k}"),
                plan["trial_timeout"], check.env(TORCHINDUCTOR_COMPILE_THREADS="1"), barrier=True,
                sampler=check.sampler, left=check.left, held=check.signals.held))
            last_s = time.monotonic() - t0
            trials.sort(key=lambda t: t["index"])
            if check.sampler is not None:
                judge_memory(trials, check.sampler.others({os.getpid(), *check.children.started}, since))
            row: dict[str, Any] = dict(model=model, k=k, share=share, seconds=round(last_s, 1), trials=trials)
            bad = [t for t in trials if "error" in t or "cut" in t]
            if bad:
                key = "error" if "error" in bad[0] else "cut"
                row[key] = bad[0][key]
                curve[k] = None
                yield row
                break
            total, rates, overlapped = aggregate_rate([t["epochs"] for t in trials])
            base = total if k == 1 else base
            curve[k] = total
            row.update(aggregate_images_per_s=total, per_trial_images_per_s=rates, overlapped=overlapped,
                       vs_k1=total / base if base else None)
            peaks = [t.get("gpu_peak_mb") or t.get("peak_reserved_mb") for t in trials]
            need_mb = max([p for p in peaks if p] or [0]) or None
            say(f"  {model} k={k}: aggregate {total:.0f} img/s ({_fmt(row['vs_k1'], 2)}x k=1)"
                + ("" if overlapped else " (trials did not overlap)"))
            yield row
        if curve.get(1) and sum(r is not None for r in curve.values()) >= 2:
            proposal = dict(model=model, input=32, share=gpu_shares.choose_share(curve),
                            images_per_s={str(k): r for k, r in curve.items()})
            check.report["shares"]["proposed"].append(proposal)
            write_shares(check, proposal)


def write_shares(check: Check, proposal: dict[str, Any]) -> None:
    """With --write-shares, the measured share goes into the table at once (a later kill keeps
    it); a CPU run writes only to a path given with it, never to the package's table."""
    from iterand_tune import gpu_shares

    path = check.args.write_shares
    if not path:
        return
    if check.mode != "cuda" and os.path.abspath(path) == os.path.abspath(gpu_shares.TABLE):
        check.report["shares"]["why_not_written"] = "a CPU run says nothing about a GPU's shares"
        return
    env = check.report["environment"]
    table = gpu_shares.with_measured(gpu_shares.read_table(path), proposal["model"], proposal["input"],
                                     {int(k): r for k, r in proposal["images_per_s"].items()},
                                     env.get("gpu") or "?", datetime.date.today().isoformat(),
                                     mps=env.get("mps"))
    gpu_shares.write_table(table, path)
    check.report["shares"]["written"] = path
    check.note(f"{proposal['model']}: share {proposal['share']:g} written to {path}")


def part_figure2(check: Check) -> Iterator[dict[str, Any]]:
    """A figure-2-like run: every model x method of the plan at its default GPU share, packed so
    that the running shares never exceed one GPU; one row per trial as it ends."""
    from gpu_throughput import trial_config

    from iterand_tune.resources import gpu_share

    gpu = check.mode == "cuda"
    blocked = check.report["environment"].get("packing_blocked")
    if blocked:
        raise Skip(blocked)
    plan = check.plan
    specs = []
    for model in plan["figure2_models"]:
        share = gpu_share(model, "synthetic_cifar10") if gpu else 0.0
        for method in ("sgd", "edgepopup", "iterand"):
            config = trial_config(model, method, plan, plan["figure2_epochs"], plan["figure2_iters"],
                                  check.mode, eval_iters=None if gpu else 1)
            specs.append(dict(config=config, share=share, device=check.mode))
    if not gpu:  # seconds of training: one child for all, not a process start-up per trial
        yield from check.worker("trials", {"specs": specs}, "figure2", plan["trial_timeout"])
        return
    since, trials = time.monotonic(), []
    for row in trial_processes(check.children, specs, os.path.join(check.scratch, "figure2"),
                               plan["trial_timeout"], check.env(TORCHINDUCTOR_COMPILE_THREADS="1"),
                               sampler=check.sampler, left=check.left, held=check.signals.held):
        trials.append(row)
        if check.sampler is not None:
            judge_memory(trials, check.sampler.others({os.getpid(), *check.children.started}, since))
        if "epoch_seconds" in row:
            say(f"  {row['model']:<14}{row['method']:<10} share {row['share']:g}: epochs "
                f"{', '.join(f'{s:.2f}' for s in row['epoch_seconds'])} s, full epoch about "
                f"{row['full_epoch_s_est']:.1f} s")
        yield row


def part_imagenet(check: Check) -> Iterator[dict[str, Any]]:
    """Figure 3's input pipeline and step (benchmarks/imagenet_pipeline.py) in one child: synthetic
    JPEGs written into the scratch folder, each pipeline's loader alone, each model's step, the
    GPU-hours of a figure-3 trial from the slower of the two, and both together."""
    if importlib.util.find_spec("torchvision") is None:
        raise Skip("torchvision is not importable: ImageNet's folders and JPEG decoding need it "
                   "(install the torchvision build that matches this torch)")
    plan = dict(check.plan["imagenet"])
    timeout = plan.pop("timeout")
    for row in check.worker("imagenet", dict(device=check.mode, folder=check.scratch, **plan), "imagenet",
                            timeout):
        if row.get("what") == "hours":
            say(f"  {row['model']:<10} {row['pipeline']:<7} {row['hours']:.0f} GPU-hours a trial "
                f"(training {row['train_images_per_s']:.0f} images/s, bound by its {row['train_bound']})")
        yield row


PART_FUNCTIONS: dict[str, Callable[[Check], Iterator[dict[str, Any]]]] = {
    "tests": part_tests, "compile": part_compile, "throughput": part_throughput, "step": part_step,
    "packing": part_packing, "figure2": part_figure2, "imagenet": part_imagenet}
# Children's calls that benchmarks/gpu_throughput.py does not hold, and the module that does.
CALL_MODULES = {"imagenet": "imagenet_pipeline"}


# ----------------------------------------------------------------------------- targets


def part_rows(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return (report.get("parts") or {}).get(name, {}).get("rows") or []


def trials_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial the packing and figure-2 parts ran."""
    packed = [t for row in part_rows(report, "packing") for t in row.get("trials", [])]
    return packed + [t for t in part_rows(report, "figure2") if "epochs" in t or "gpu_peak_mb" in t]


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it was met (None: not measured, or
    measured on CPU, where the GPU targets say nothing)."""
    gpu, plan = report["mode"] == "cuda", report["plan"]
    out = []

    def add(name: str, target: str, measured: Optional[float], ok: Optional[bool], shown: str) -> None:
        out.append(dict(name=name, target=target, measured=measured, shown=shown,
                        met=(ok if gpu and measured is not None else None)))

    model, least = plan["target_throughput"]
    row = next((r for r in part_rows(report, "throughput") if r.get("model") == model
                and r.get("pipeline") == "ours fp32 (defaults)"), None)
    ratio = row.get("vs_reference") if row else None
    add(f"{model} edge-popup training images/s, ours vs reference-style", f">= {least:g}x", ratio,
        None if ratio is None else ratio >= least, _fmt(ratio, 2, "x"))
    model, k, least = plan["target_packing"]
    row = next((r for r in part_rows(report, "packing") if r.get("model") == model and r.get("k") == k
                and r.get("vs_k1") is not None), None)
    ratio = row["vs_k1"] if row else None
    add(f"aggregate images/s, {k} trials at 1/{k} GPU vs 1 trial, {model}", f">= {least:g}x", ratio,
        None if ratio is None else ratio >= least, _fmt(ratio, 2, "x"))
    for model, limit in plan["target_step"].items():
        row = next((r for r in part_rows(report, "step") if r.get("model") == model and "ratio" in r), None)
        ratio = row["ratio"] if row else None
        add(f"masked (edge-popup) step vs dense step, {model}, batch {row['batch'] if row else 128}",
            f"<= {limit}x", ratio, None if ratio is None else ratio <= limit, _fmt(ratio, 2, "x"))
    judged = [t for t in trials_of(report) if t.get("within_share") is not None]
    worst = max(((t.get("gpu_peak_mb") or t.get("gpu_peak_unmatched_mb")) / t["gpu_share_mb"]
                 for t in judged), default=None)
    add("GPU memory of each trial (NVML, CUDA context included) within its share of the card",
        "<= 100% of the share", worst, None if worst is None else all(t["within_share"] for t in judged),
        _fmt(None if worst is None else 100 * worst, 0, "%"))
    shares = [t["checkpoint_share"] for t in part_rows(report, "figure2") if t.get("checkpoint_share")]
    worst = max(shares, default=None)
    add("checkpoint (Trainer.save) share of an epoch, worst trial", f"<= {CHECKPOINT_SHARE_LIMIT:.0%}",
        worst, None if worst is None else worst <= CHECKPOINT_SHARE_LIMIT,
        _fmt(None if worst is None else 100 * worst, 1, "%"))
    cases = [r for r in part_rows(report, "tests") if "outcome" in r]
    if cases or report["parts"]["tests"]["state"] not in ("pending", "skipped"):
        bad = sum(c["outcome"] in ("failed", "error") for c in cases)
        state = report["parts"]["tests"]["state"]
        count = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "skipped")}
        shown = (f"{count['passed']} passed, {bad} failed, {count['skipped']} skipped"
                 + ("" if state == "done" else f" ({state})"))
        out.append(dict(name="CUDA tests (pytest -m cuda)", target="all pass", measured=bad, shown=shown,
                        met=(bad == 0 and bool(cases) and state == "done") if gpu else None))
    return out


# ----------------------------------------------------------------------------- report.md


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines + [""]


def _part_line(part: dict[str, Any]) -> str:
    state = part["state"]
    bits = [state] + ([f"{part['seconds']:.0f} s"] if part.get("seconds") is not None else [])
    if part.get("why"):
        bits.append(part["why"])
    if part.get("error"):
        bits.append(part["error"])
    return ", ".join(bits)


def _most(values: Iterator[Optional[float]], pick: Callable = max) -> Optional[float]:
    found = [v for v in values if v]
    return pick(found) if found else None


def markdown(report: dict[str, Any]) -> str:
    """report.md: the report's figures as tables, beside the targets."""
    env, plan = report.get("environment") or {}, report["plan"]
    lines = [f"# GPU check: {env.get('gpu') or '?'}", ""]
    if report["mode"] != "cuda":
        lines += ["**CPU run (--allow-cpu): a tiny version of every part, to check the machinery. "
                  "Its numbers say nothing about GPU speed; no target is judged.**", ""]
    by = f" by {report['interrupted_by']}" if report.get("interrupted_by") else ""
    lines += [f"{report['state'].capitalize()}{by}: {report['elapsed_s']:.0f} s of a "
              f"{report['budget_s']:.0f} s budget (started {report['created']}, written "
              f"{report['updated']}). `{report['command']}`", ""]
    lines += _table(["", ""], [[k, env[k]] for k in (
        "gpu", "gpu_memory_mb", "gpu_capability", "driver", "compute_mode", "mps", "mps_how", "nvml",
        "torch", "cuda", "cudnn", "python", "cpu_count", "hostname") if env.get(k) is not None])
    if env.get("packing_blocked"):
        lines += [f"**Packing not measured: {env['packing_blocked']}.**", ""]
    lines += ["## Parts", ""] + _table(["part", "state", "notes"], [
        [name, _part_line(part), "; ".join(part.get("notes", []))] for name, part in report["parts"].items()])
    if report["failures"]:
        lines += ["## Failures", ""]
        lines += [f"- {f['part']}: {f['what']}: {f['error']}" for f in report["failures"]] + [""]
    lines += ["## Targets", ""] + _table(["what", "target", "measured", "met"], [
        [t["name"], t["target"], t["shown"], {True: "yes", False: "**no**", None: "-"}[t["met"]]]
        for t in report["targets"]])
    part = report["parts"]["tests"]
    cases = [r for r in part["rows"] if "outcome" in r]
    if cases:
        stopped = f"; running when stopped: {part['running']}" if part.get("running") else ""
        lines += ["## CUDA tests", "", f"`{part.get('command')}` (log: cuda-tests.log){stopped}", ""]
        lines += _table(["test", "outcome", "s", "message"], [
            [c["name"].split("::")[-1], c["outcome"], _fmt(c.get("seconds"), 1), c["message"]]
            for c in cases])
    rows = [r for r in part_rows(report, "compile") if "pipeline" in r]
    if rows:
        eager = {r["model"]: r.get("images_per_s") for r in part_rows(report, "throughput")
                 if r.get("pipeline") == "ours fp32 (defaults)"}
        lines += ["## torch.compile", "", f"Batch {plan['batch']}: compilation (the first step less a "
                  f"steady one), then {plan['steps']} steps timed after {plan['warmup']} warm-up steps; "
                  "TORCHINDUCTOR_COMPILE_THREADS set to the child's CPUs.", ""]
        head = ["model", "CPUs", "compile threads", "compile s", "images/s", "vs eager fp32", "verdict"]
        lines += _table(head, [
            [r["model"], r.get("cpus", "-"), r.get("compile_threads", "-"), _fmt(r.get("compile_s"), 1),
             _fmt(r.get("images_per_s"), 0),
             _fmt(r["images_per_s"] / eager[r["model"]] if r.get("images_per_s") and eager.get(r["model"])
                  else None, 2, "x"),
             ("compiled: " if r.get("compiled") else "NOT compiled: ") + r.get("compile_note", "")]
            for r in rows])
    rows = [r for r in part_rows(report, "throughput") if "pipeline" in r]
    if rows:
        lines += ["## Training images/s (edge-popup, synthetic CIFAR-10)", "", f"Batch {plan['batch']}, "
                  f"{plan['steps']} steps timed after {plan['warmup']} warm-up steps.", ""]
        head = ["model", "pipeline", "images/s", "vs reference", "peak allocated MB", "peak reserved MB",
                "process GPU MB (NVML)", "note"]
        lines += _table(head, [
            [r["model"], r["pipeline"], _fmt(r.get("images_per_s"), 0), _fmt(r.get("vs_reference"), 2, "x")]
            + [_fmt(r.get(k), 0) for k in ("peak_allocated_mb", "peak_reserved_mb", "gpu_peak_mb")]
            + [r.get("note", "")] for r in rows])
    rows = [r for r in part_rows(report, "step") if "ratio" in r]
    if rows:
        lines += ["## Where a step's time goes", "", "Medians of alternating blocks; the mask selection is "
                  "the k-th smallest score of every layer, as a masked step's forward computes it.", ""]
        head = ["model", "batch", "dense ms", "masked ms", "masked/dense", "selection ms", "selection share",
                "re-draw ms"]
        lines += _table(head, [
            [r["model"], r["batch"], _fmt(r["dense_ms"], 2), _fmt(r["masked_ms"], 2), _fmt(r["ratio"], 3),
             _fmt(r["select_ms"], 3), _fmt(100 * r["select_share"], 1, "%"), _fmt(r["rerand_ms"], 3)]
            for r in rows])
    rows = part_rows(report, "packing")
    if rows:
        lines += ["## Packing curve: k trial processes at 1/k of the GPU", "",
                  f"Edge-popup, batch {plan['batch']}, {plan['packing_epochs']} epochs of "
                  f"{plan['packing_iters']} iterations after a common start; images/s counted while all k "
                  "train.", ""]
        head = ["model", "k", "aggregate images/s", "vs k=1", "per trial", "GPU MB per trial (NVML, max)",
                "share MB", "allocator cap MB", "note"]
        lines += _table(head, [
            [r["model"], r["k"], _fmt(r.get("aggregate_images_per_s"), 0), _fmt(r.get("vs_k1"), 2, "x"),
             " / ".join(f"{v:.0f}" for v in r.get("per_trial_images_per_s", [])),
             _fmt(_most(t.get("gpu_peak_mb") or t.get("gpu_peak_unmatched_mb") for t in r["trials"]), 0),
             _fmt(_most((t.get("gpu_share_mb") for t in r["trials"]), min), 0),
             _fmt(_most((t.get("cap_mb") for t in r["trials"]), min), 0),
             r.get("error") or r.get("cut") or ("" if r.get("overlapped", True) else "no overlap")]
            for r in rows])
    shares = report.get("shares") or {}
    if shares.get("proposed"):
        where = (f": written to {shares['written']}" if shares.get("written") else
                 f" ({shares['why_not_written']})" if shares.get("why_not_written") else "")
        lines += ["## GPU shares from the curve", "", "The smallest 1/k keeping at least 90% of the best "
                  "aggregate (iterand_tune/gpu_shares.py); `--write-shares` writes them to the "
                  f"table{where}.", ""]
        lines += _table(["model", "input", "share"], [[p["model"], p["input"], f"{p['share']:g}"]
                                                       for p in shares["proposed"]])
    rows = part_rows(report, "figure2")
    if rows:
        lines += ["## Figure-2-like run: epoch times per model and method", "",
                  f"Synthetic CIFAR-10, {plan['figure2_epochs']} epochs of {plan['figure2_iters']} "
                  f"iterations (a full epoch is {FULL_EPOCH_ITERS}), batch {plan['batch']}, each trial a "
                  "process at its default GPU share. A full epoch is estimated from the last epoch: (its "
                  "time - the evaluation's) x full / measured iterations + the evaluation's.", ""]
        head = ["model", "method", "share", "epoch s", "eval s", "full epoch s (est.)", "checkpoint s",
                "checkpoint share", "GPU MB (NVML)", "share MB", "allocator cap MB"]
        lines += _table(head, [
            [r.get("model", "-"), r.get("method", "-"), _fmt(r.get("share"), 3),
             " / ".join(f"{s:.2f}" for s in r.get("epoch_seconds", [])) or r.get("error") or r.get("cut", ""),
             _fmt(r.get("eval_s"), 2), _fmt(r.get("full_epoch_s_est"), 1), _fmt(r.get("checkpoint_s"), 3),
             _fmt(None if r.get("checkpoint_share") is None else 100 * r["checkpoint_share"], 1, "%"),
             _fmt(r.get("gpu_peak_mb") or r.get("gpu_peak_unmatched_mb"), 0), _fmt(r.get("gpu_share_mb"), 0),
             _fmt(r.get("cap_mb"), 0)] for r in rows])
    lines += _imagenet_markdown(report)
    return "\n".join(lines)


def _imagenet_markdown(report: dict[str, Any]) -> list[str]:
    rows = part_rows(report, "imagenet")
    if not rows:
        return []
    of = lambda what: [r for r in rows if r.get("what") == what]  # noqa: E731
    lines = ["## ImageNet pipeline (figure 3)", ""]
    for r in of("images"):
        lines += [f"{r['train_images']:,} training and {r['test_images']:,} test JPEGs in {r['classes']} class "
                  f"folders, about {r['size'][0]} x {r['size'][1]} pixels, quality {r['quality']}, "
                  f"{r['mean_kb']:.0f} KB on average, read from the page cache. `pil`: PIL decodes and "
                  "crops in DataLoader workers; `device`: the workers read the files, the trial's device "
                  "decodes (decode_jpeg) and crops.", ""]
    for r in of("decode"):
        lines += [f"decode_jpeg on {r['device']} against PIL, {r['images']} of the files: at most "
                  f"{r['max_level_diff']} levels of 255 apart, {r['mean_level_diff']:.3f} on average.", ""]
    if of("loader"):
        lines += _table(["pipeline", "loader", "batch", "workers", "images/s", "decoded by PIL"], [
            [r["pipeline"], r["split"], r["batch"], r["workers"], _fmt(r["images_per_s"], 0),
             ", ".join(f"{n} {why}" for why, n in (r.get("decoded_by_pil") or {}).items()) or "-"]
            for r in of("loader")])
    if of("step"):
        lines += ["Figure 3's IteRand trial of each network, its step on a batch already on the device "
                  "(loader left out):", ""]
        lines += _table(["model", "batch", "bn_splits", "channels_last", "autocast", "training images/s",
                         "evaluation batch", "evaluation images/s", "peak allocated MB"], [
            [r["model"], r["batch"], r["bn_splits"], r["channels_last"], r["autocast"] or "fp32",
             _fmt(r["train_images_per_s"], 0), r["eval_batch"], _fmt(r["eval_images_per_s"], 0),
             _fmt(r.get("peak_allocated_mb"), 0)] for r in of("step")])
    if of("hours"):
        first = of("hours")[0]
        lines += [f"GPU-hours of one trial: {first['epochs']} epochs of {first['train_images']:,} training "
                  f"and {first['val_images']:,} validation images, then {first['test_images']:,} test images, "
                  "each phase at the slower of its loader and its step:", ""]
        lines += _table(["model", "pipeline", "training images/s", "bound by", "evaluation images/s",
                         "bound by", "GPU-hours"], [
            [r["model"], r["pipeline"], _fmt(r["train_images_per_s"], 0), r["train_bound"],
             _fmt(r["eval_images_per_s"], 0), r["eval_bound"], _fmt(r["hours"], 1)] for r in of("hours")])
    if of("epoch"):
        lines += ["Loader and step together, as a trial's training epoch runs them (the first iteration "
                  "left out):", ""]
        lines += _table(["model", "pipeline", "iterations", "images/s"], [
            [r["model"], r["pipeline"], r["iterations"], _fmt(r.get("images_per_s"), 0)] for r in of("epoch")])
    errors = [r for r in rows if "error" in r or "cut" in r]
    lines += [f"- {r.get('error') or r.get('cut')}" for r in errors] + ([""] if errors else [])
    return lines


# ----------------------------------------------------------------------------- main


def worker_main(spec_path: str) -> int:
    """`gpu_check.py --worker SPEC.json`: one of gpu_throughput.CALLS, its rows appended to the
    spec's result file as JSON lines."""
    die_with_parent()
    with open(spec_path) as f:
        spec = json.load(f)
    import gpu_throughput as gt

    def emit(row: dict[str, Any]) -> None:
        with open(spec["result"], "a") as out:
            out.write(json.dumps(row, default=str) + "\n")

    try:
        calls = importlib.import_module(CALL_MODULES[spec["call"]]).CALLS if spec["call"] in CALL_MODULES \
            else gt.CALLS
        calls[spec["call"]](emit, **spec["args"])
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        emit(gt.error_row(err))
        return 1
    return 0


def exec_main(argv: list[str]) -> int:
    """`gpu_check.py --exec CMD ...`: CMD in this process, killed when the check ends."""
    die_with_parent()
    os.execvp(argv[0], argv)
    return 127  # not reached


def _interrupted_at_start(out: str, signum: int) -> None:
    """A signal before the check knew its mode: still a report that says so."""
    os.makedirs(out, exist_ok=True)
    report = dict(schema=2, state="interrupted", interrupted_by=signal.Signals(signum).name,
                  created=now_iso(), elapsed_s=round(time.monotonic() - START, 1),
                  parts={name: {"state": "pending", "rows": []} for name in PARTS})
    _write_atomically(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    _write_atomically(os.path.join(out, "report.md"),
                      f"# GPU check\n\nInterrupted by {report['interrupted_by']} while starting: "
                      "nothing measured.\n")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--exec"]:
        return exec_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-check",
                    help="folder of report.json and report.md (default gpu-check)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="without a CUDA device, run a tiny version of everything on CPU")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds the whole check may take, start-up included "
                         f"(default {DEFAULT_BUDGET_S:.0f})")
    ap.add_argument("--skip", nargs="+", default=[], choices=PARTS, metavar="PART",
                    help=f"parts to leave out: {', '.join(PARTS)}")
    ap.add_argument("--write-shares", nargs="?", const="", default=None, metavar="PATH",
                    help="write the shares the packing curve gives into the GPU share table "
                         "(default: the package's iterand_tune/gpu_shares.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.write_shares == "":
        from iterand_tune.gpu_shares import TABLE  # torch-free

        args.write_shares = TABLE
    signals = Signals()
    signals.install()  # before torch's import, the slowest part of starting
    try:
        try:
            import torch

            if not torch.cuda.is_available() and not args.allow_cpu:
                say(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
                    f"{torch.version.cuda or 'none'}); run it on a GPU machine, or pass --allow-cpu for "
                    "a tiny CPU version")
                return NO_CUDA_EXIT
            mode = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU is always used when present
            if args.allow_cpu and mode == "cuda":
                say("(--allow-cpu ignored: there is a GPU, and it is used)")
            os.makedirs(args.out, exist_ok=True)
            check = Check(args, mode, signals)
        except Interrupted as stop:
            _interrupted_at_start(args.out, stop.signum)
            return 128 + stop.signum
        return check.run()
    finally:
        signals.restore()


if __name__ == "__main__":
    sys.exit(main())
