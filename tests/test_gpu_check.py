"""benchmarks/gpu_check.py and gpu_hours.py on CPU: the CPU version end to end and interrupted by
signals, children killed with theirs, the exit code, the budget, NVML, compute mode and MPS with a
stand-in NVML, compile's prerequisites, the GPU share table and rule, the report, GPU-hours."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from iterand_tune import gpu_shares

from helpers import ROOT, load_benchmark, wait_for

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def gpu_hours():
    return load_benchmark("gpu_hours")


def survivors(parent: int) -> list[str]:
    """Processes started by the check whose process id is `parent` (each child's environment
    names it) that are still alive: their command lines."""
    mark = f"GPU_CHECK_PARENT={parent}\0".encode()
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                alive.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return alive


def no_survivors(parent: int) -> list[str]:
    """survivors(parent), after giving the kernel a moment to finish killing them."""
    for _ in range(20):
        left = survivors(parent)
        if not left:
            return left
        time.sleep(0.1)
    return left


def read_report(folder) -> dict:
    with open(os.path.join(folder, "report.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- the CPU version


# A GPU box may have torch (with what it requires), pytest, pandas, pyarrow, scikit-learn, matplotlib
# and nvidia-ml-py and nothing else: the check and every process it starts see these packages as
# absent (a sitecustomize on their PYTHONPATH).
ABSENT_ON_A_GPU_BOX = ("ray", "hyperopt", "yaml", "mlflow", "wandb", "tensorboard", "moto", "boto3")
_ABSENT = """import sys

for name in {absent!r}:  # `import name` then fails, and importlib.util.find_spec(name) is None
    sys.modules[name] = None
"""


def without(folder, packages) -> dict[str, str]:
    """An environment whose Python processes cannot import `packages`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(_ABSENT.format(absent=tuple(packages)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_the_absent_packages_cannot_be_imported(tmp_path):
    env = without(tmp_path, ABSENT_ON_A_GPU_BOX)
    code = "import importlib, importlib.util, sys\nfor name in sys.argv[1:]:\n    try:\n" \
           "        importlib.import_module(name)\n        print(name, importlib.util.find_spec(name) is None)\n" \
           "    except ModuleNotFoundError:\n        print('absent', importlib.util.find_spec(name) is None)\n" \
           "import torch, pyarrow, pandas"
    out = subprocess.run([sys.executable, "-c", code, *ABSENT_ON_A_GPU_BOX, "json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["absent True"] * len(ABSENT_ON_A_GPU_BOX) + ["json False"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """`gpu_check.py --allow-cpu --write-shares COPY` to its end, in a child process (as `make
    gpu-check` runs it) that, with its children, cannot import Ray, HyperOpt or the trackers:
    (return code, stdout, report, folder, the table copy, its process id)."""
    if torch.cuda.is_available():  # a GPU machine: the same command measures the GPU instead
        pytest.skip("CUDA is available: --allow-cpu does not apply")
    folder = tmp_path_factory.mktemp("gpu_check")
    table = folder / "shares.json"
    table.write_text(open(gpu_shares.TABLE).read())
    proc = subprocess.Popen([sys.executable, SCRIPT, "--allow-cpu", "--out", str(folder / "check"),
                             "--write-shares", str(table)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=without(folder / "box", ABSENT_ON_A_GPU_BOX))
    out, _ = proc.communicate(timeout=600)
    report = read_report(folder / "check")
    return SimpleNamespace(rc=proc.returncode, out=out, report=report, folder=folder / "check",
                           table=table, pid=proc.pid)


@pytest.mark.slow
def test_allow_cpu_runs_every_part_and_writes_both_reports(cpu_run):
    report, rows = cpu_run.report, lambda part: cpu_run.report["parts"][part]["rows"]
    assert cpu_run.rc == 0, cpu_run.out[-3000:]
    assert report["state"] == "finished" and report["mode"] == "cpu" and report["failures"] == []
    assert {k: p["state"] for k, p in report["parts"].items()} == {
        "tests": "done", "compile": "skipped", "throughput": "done", "step": "done", "packing": "done",
        "figure2": "done", "imagenet": "done"}
    assert "compile is measured on a GPU" in report["parts"]["compile"]["why"]
    env = report["environment"]
    assert {"gpu", "torch", "cuda", "python", "cpu_count", "hostname", "compile_missing"} <= set(env)
    assert env["torch"] == torch.__version__
    tests = rows("tests")  # collected and skipped here, with the reason, as CUDA tests are
    assert len(tests) >= 10 and {t["outcome"] for t in tests} == {"skipped"}
    assert all("needs a CUDA device" in t["message"] for t in tests)
    assert (cpu_run.folder / "cuda-tests.xml").exists() and (cpu_run.folder / "cuda-tests.log").exists()
    assert [r["pipeline"] for r in rows("throughput")] == [
        "reference-style (PIL, .item)", "ours fp32 (defaults)", "ours channels_last+bf16"]
    assert all(r["images_per_s"] > 0 and r["vs_reference"] > 0 for r in rows("throughput"))
    (step,) = rows("step")
    assert step["model"] == "conv6x0.25" and step["layers"] == 9
    assert 0 < step["select_ms"] < step["masked_ms"] and step["select_share"] == pytest.approx(
        step["select_ms"] / step["masked_ms"]) and step["dense_ms"] > 0 and step["rerand_ms"] > 0
    packing = rows("packing")
    assert [p["k"] for p in packing] == [1, 2]
    for p in packing:
        assert p["aggregate_images_per_s"] > 0 and p["vs_k1"] > 0 and len(p["trials"]) == p["k"]
        for t in p["trials"]:
            assert t["device"] == "cpu" and len(t["epochs"]) == 2 and "epoch_end_time" in t["epochs"][-1]
        assert len({t["pid"] for t in p["trials"]}) == p["k"]  # a process per trial
    fig2 = rows("figure2")
    assert {(t["model"], t["method"]) for t in fig2} == {
        (m, x) for m in ("conv6x0.25", "resnet18x0.25") for x in ("sgd", "edgepopup", "iterand")}
    for t in fig2:
        assert len(t["epoch_seconds"]) == 2 and t["full_epoch_s_est"] > 0 and t["checkpoint_s"] > 0
        assert 0 < t["checkpoint_share"] and t["eval_s"] > 0 and t["iterations_per_epoch"] == 2
    targets = report["targets"]
    assert len(targets) == 6 and all(t["met"] is None for t in targets)  # not judged on a CPU
    assert all(t["measured"] is not None for t in targets if "NVML" not in t["name"])
    md = (cpu_run.folder / "report.md").read_text()
    for heading in ("## Parts", "## Targets", "## CUDA tests", "## Training images/s",
                    "## Where a step's time goes", "## Packing curve", "## GPU shares from the curve",
                    "## Figure-2-like run"):
        assert heading in md
    assert "| conv6x0.25 | reference-style (PIL, .item) |" in md and "| resnet18x0.25 | iterand |" in md
    assert "report:" in cpu_run.out and not no_survivors(cpu_run.pid)


@pytest.mark.slow
def test_allow_cpu_measures_figure3s_input_pipeline_and_step(cpu_run):
    rows = cpu_run.report["parts"]["imagenet"]["rows"]
    by = lambda what: [r for r in rows if r.get("what") == what]  # noqa: E731
    (images,) = by("images")
    assert (images["train_images"], images["test_images"], images["classes"]) == (12, 3, 3)
    (decode,) = by("decode")  # libjpeg-turbo on both sides here
    assert decode["images"] == 12 and decode["max_level_diff"] <= 1 and decode["device"] == "cpu"
    loaders = {(r["pipeline"], r["split"]): r for r in by("loader")}
    assert set(loaders) == {(p, s) for p in ("pil", "device") for s in ("train", "eval")}
    assert loaders[("pil", "train")]["images"] == 11 and loaders[("device", "eval")]["images"] == 3
    assert all(r["images_per_s"] > 0 for r in loaders.values())
    (step,) = by("step")  # figure 3's ResNet-50 trial, a tiny network in its place
    assert (step["model"], step["method"], step["bn_splits"], step["batch"]) == ("resnet18x0.125", "iterand", 2, 4)
    assert step["train_images_per_s"] > 0 and step["eval_images_per_s"] > 0
    hours = {r["pipeline"]: r for r in by("hours")}
    assert set(hours) == {"pil", "device"} and all(h["hours"] > 0 and h["epochs"] == 105 for h in hours.values())
    assert {r["pipeline"] for r in by("epoch")} == {"pil", "device"}
    assert all(r["iterations"] == 2 and r["images_per_s"] > 0 for r in by("epoch"))
    md = (cpu_run.folder / "report.md").read_text()
    assert "## ImageNet pipeline (figure 3)" in md and "| resnet18x0.125 | device | 2 |" in md


def test_figure3_gpu_hours_follow_the_slower_of_loader_and_step(gpu_check):
    pipeline = load_benchmark("imagenet_pipeline")
    # The step is slower in training, the loader in evaluation.
    got = pipeline.trial_hours(loader_train=1500.0, loader_eval=1000.0, step_train=1200.0, step_eval=3000.0,
                               epochs=105, train_images=1_268_356, val_images=12_811, test_images=50_000)
    seconds = 105 * (1_268_356 / 1200 + 12_811 / 1000) + 50_000 / 1000
    assert got == dict(hours=pytest.approx(seconds / 3600), train_images_per_s=1200.0, eval_images_per_s=1000.0,
                       train_bound="step", eval_bound="loader")
    assert pipeline.trial_hours(900.0, 1000.0, 1200.0, 3000.0, 105, 1, 1, 1)["train_bound"] == "loader"
    assert pipeline.IMAGENET_TRAIN - 12_811 == 1_268_356  # imagenet_val_size holds 12,811 out
    report = _report()
    report["parts"]["imagenet"] = dict(state="done", seconds=40.0, rows=[
        dict(what="images", images=3000, train_images=2000, test_images=1000, classes=1000, size=[350, 400],
             quality=90, distinct=64, mean_kb=80.2),
        dict(what="decode", device="cuda", images=64, max_level_diff=3, mean_level_diff=0.412),
        dict(what="loader", pipeline="pil", split="train", batch=128, workers=8, images_per_s=1400.0),
        dict(what="loader", pipeline="device", split="train", batch=128, workers=8, images_per_s=6000.0,
             decoded_by_pil={"a CMYK JPEG": 2}),
        dict(what="step", model="resnet50", method="iterand", batch=128, bn_splits=2, channels_last=False,
             autocast=None, train_images_per_s=1200.0, eval_batch=512, eval_images_per_s=3000.0,
             peak_allocated_mb=20000.0),
        dict(what="hours", model="resnet50", pipeline="device", epochs=105, train_images=1_268_356,
             val_images=12_811, test_images=50_000, **got),
        dict(what="epoch", model="resnet50", pipeline="device", iterations=14, images_per_s=1150.0)])
    report["targets"] = gpu_check.targets(report)
    md = gpu_check.markdown(report)
    assert "2,000 training and 1,000 test JPEGs in 1000 class folders" in md
    assert "decode_jpeg on cuda against PIL, 64 of the files: at most 3 levels of 255 apart, 0.412" in md
    assert "| device | train | 128 | 8 | 6000 | 2 a CMYK JPEG |" in md
    assert "| resnet50 | 128 | 2 | False | fp32 | 1200 | 512 | 3000 | 20000 |" in md
    assert f"| resnet50 | device | 1200 | step | 1000 | loader | {seconds / 3600:.1f} |" in md
    assert "| resnet50 | device | 14 | 1150 |" in md


@pytest.mark.slow
def test_allow_cpu_writes_the_measured_share_to_the_given_table_only(cpu_run):
    (proposal,) = cpu_run.report["shares"]["proposed"]
    assert cpu_run.report["shares"]["written"] == str(cpu_run.table)
    table = gpu_shares.read_table(str(cpu_run.table))
    (entry,) = [e for e in table["shares"] if e["model"] == "conv6x0.25" and e["input"] == 32]
    assert entry["source"] == "measured" and entry["share"] == proposal["share"] in (1.0, 0.5)
    assert set(entry["images_per_s"]) == {"1", "2"} and entry["gpu"].startswith("none (CPU")
    package = gpu_shares.read_table()
    assert len(table["shares"]) == len(package["shares"])
    assert all(e["source"] == gpu_shares.ESTIMATED for e in package["shares"])  # untouched


@pytest.mark.slow
@pytest.mark.parametrize("moment, sig", [("start", signal.SIGINT), ("throughput", signal.SIGTERM)],
                         ids=["SIGINT-at-start", "SIGTERM-mid-part"])
def test_a_signal_leaves_a_report_and_no_process(moment, sig, tmp_path):
    """SIGINT as soon as the first report is there; SIGTERM while the throughput part's child
    measures (the CUDA tests done): a report naming what finished and what was interrupted, the
    exit status of the signal, and not one of the check's processes left."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: --allow-cpu does not apply")
    out = tmp_path / "check"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--allow-cpu", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready():
        try:
            report = read_report(out)
        except (OSError, json.JSONDecodeError):
            return None
        if moment == "start":
            return report
        return report if report["parts"][moment]["state"] == "running" and survivors(proc.pid) else None

    try:
        wait_for(ready, proc, f"the {moment} moment", timeout=240)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    report = read_report(out)
    states = {name: part["state"] for name, part in report["parts"].items()}
    assert rc == 128 + sig and report["state"] == "interrupted" and report["interrupted_by"] == sig.name
    if moment == "start":
        assert set(states.values()) <= {"pending", "interrupted"}
    else:
        assert states["tests"] == "done" and states["throughput"] == "interrupted"
        assert states["step"] == states["packing"] == states["figure2"] == "pending"
        assert report["parts"]["tests"]["rows"]  # what finished is kept
    assert "Interrupted" in (out / "report.md").read_text()
    assert not no_survivors(proc.pid), "processes of the check outlived it"


def test_without_cuda_one_line_and_exit_3(gpu_check, monkeypatch, capsys, tmp_path):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = gpu_check.main(["--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == gpu_check.NO_CUDA_EXIT == 3
    assert len(out.splitlines()) == 1 and err == ""
    assert out.startswith("gpu_check: no CUDA device") and "--allow-cpu" in out
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


# ----------------------------------------------------------------------------- children and exit code


def test_a_killed_child_takes_its_children_along(gpu_check, tmp_path):
    # A child with a grandchild in its group and one in a session of its own (as the trial
    # processes a CUDA test starts): killing the child kills all three.
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen(['sleep', '60'])\n"
            "subprocess.Popen(['sleep', '61'], start_new_session=True)\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    children = gpu_check.Children()
    log = tmp_path / "child.log"
    proc = children.start([sys.executable, "-c", code], str(log), gpu_check.child_env("test"))
    deadline = time.monotonic() + 30
    while "started" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = gpu_check.process_tree(proc.pid)
    assert len(tree) == 3 and os.getpgid(proc.pid) == proc.pid != os.getpgrp()
    children.kill_all()
    assert proc.returncode == -signal.SIGKILL and not children.procs
    assert not no_survivors(os.getpid())  # the grandchildren too, whichever session they are in




def _check(gpu_check, tmp_path, budget_s=480.0, parts=None):
    """A Check on CPU whose parts are the given generator functions (the rest skipped)."""
    args = SimpleNamespace(out=str(tmp_path / "check"), budget_s=budget_s, skip=[], write_shares=None,
                           allow_cpu=True)
    os.makedirs(args.out, exist_ok=True)
    check = gpu_check.Check(args, "cpu", gpu_check.Signals())
    check.args.skip = [p for p in gpu_check.PARTS if p not in (parts or {})]
    return check


def test_exit_code_is_1_when_a_part_a_trial_or_a_test_failed(gpu_check, tmp_path, monkeypatch):
    def tests(check):
        yield dict(name="tests.test_cuda::test_ok", outcome="passed", seconds=1.0, message="")
        yield dict(name="tests.test_cuda::test_bad", outcome="failed", seconds=1.0, message="assert 0")

    def figure2(check):
        yield dict(model="conv6x0.25", method="sgd", epoch_seconds=[1.0, 1.0])
        yield dict(model="conv6x1.0", method="iterand", error="RuntimeError: CUDA out of memory")

    def packing(check):
        yield dict(model="conv6x0.25", k=8, share=0.125, trials=[], cut="stopped after 30 s: the budget ran out")

    def step(check):
        raise ValueError("broken")
        yield  # a generator

    fakes = dict(tests=tests, figure2=figure2, packing=packing, step=step)
    monkeypatch.setattr(gpu_check, "PART_FUNCTIONS", {**gpu_check.PART_FUNCTIONS, **fakes})
    check = _check(gpu_check, tmp_path, parts=fakes)
    assert check.run() == gpu_check.EXIT_FAILED
    report = read_report(check.out)
    states = {name: part["state"] for name, part in report["parts"].items()}
    assert states == dict(tests="failed", compile="skipped", throughput="skipped", step="failed",
                          packing="cut", figure2="failed", imagenet="skipped")
    assert [(f["part"], f["what"]) for f in report["failures"]] == [
        ("tests", "tests.test_cuda::test_bad"), ("step", "step"), ("figure2", "conv6x1.0 iterand")]
    assert report["parts"]["step"]["error"].startswith("ValueError: broken")
    (tests_target,) = [t for t in report["targets"] if t["name"].startswith("CUDA tests")]
    assert tests_target["shown"] == "1 passed, 1 failed, 0 skipped (failed)"
    # A part cut by the budget is no failure: only what failed sets the exit code.
    monkeypatch.setattr(gpu_check, "PART_FUNCTIONS", {**gpu_check.PART_FUNCTIONS, "packing": packing})
    assert _check(gpu_check, tmp_path / "2", parts={"packing": packing}).run() == 0


def test_a_part_stops_when_the_budget_runs_out_and_says_so(gpu_check, tmp_path, monkeypatch):
    # The CUDA tests' child is given what is left of the budget, then killed with its group.
    monkeypatch.setitem(gpu_check.NEEDS, "tests", 0)
    check = _check(gpu_check, tmp_path, parts={"tests"})
    check.budget_s = check.elapsed() + 1.5
    assert check.run() == 0
    report = read_report(check.out)
    part = report["parts"]["tests"]
    assert part["state"] == "cut" and "the budget ran out" in part["rows"][-1]["cut"]
    assert part["seconds"] < 30 and not no_survivors(os.getpid())
    later = _check(gpu_check, tmp_path / "2", parts={"figure2"})
    later.budget_s = later.elapsed() + 5  # figure2 needs 45 s of budget to start
    later.run()
    part = read_report(later.out)["parts"]["figure2"]
    assert part["state"] == "skipped" and part["why"].startswith("time: it needs about 45 s")


# ----------------------------------------------------------------------------- NVML, compute mode, MPS


class FakeNVML:
    """pynvml's functions the check calls, over a scripted list of process snapshots."""

    def __init__(self, snapshots, mode=0):
        self.snapshots, self.mode = list(snapshots), mode

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=mb if mb is None else mb * 2**20)
                for pid, mb in (self.snapshots.pop(0) if self.snapshots else {}).items()]

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=143771 * 2**20)

    def nvmlSystemGetDriverVersion(self):
        return "580.65"

    def nvmlDeviceGetComputeMode(self, handle):
        return self.mode

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return (9, 0)


def test_nvml_sampler_keeps_each_process_peak_and_the_share_verdict_can_fail(gpu_check):
    nvml = FakeNVML([{101: 900, 102: 1200}, {101: 35000, 102: 1500, 999: 300}, {101: 2000, 102: None}])
    sampler = gpu_check.MemorySampler(nvml, "gpu0", total_mb=143771)
    since = time.monotonic()
    for _ in range(3):
        sampler.sample()
    assert sampler.peak_mb(101) == 35000 and sampler.peak_mb(102) == 1500 and sampler.peak_mb(5) is None
    assert sampler.unreported == {102} and sampler.others({101, 102}, since) == {999: 300}
    quarter = 143771 / 4
    trials = [dict(pid=101, share=0.25, gpu_peak_mb=35000, gpu_share_mb=quarter),   # 97% of its share
              dict(pid=102, share=0.25, gpu_peak_mb=1500, gpu_share_mb=quarter)]
    gpu_check.judge_memory(trials, {})
    assert [t["within_share"] for t in trials] == [True, True]
    trials.append(dict(pid=103, share=0.25, gpu_peak_mb=36500, gpu_share_mb=quarter))  # context + cap
    gpu_check.judge_memory(trials, {})
    assert trials[-1]["within_share"] is False
    # NVML listing the host's process ids (a container): the processes it did list are judged.
    unmatched = [dict(pid=7, share=0.5, gpu_peak_mb=None, gpu_share_mb=143771 / 2)]
    gpu_check.judge_memory(unmatched, {4242: 80000.0, 4243: 1000.0})
    assert unmatched[0]["within_share"] is False and unmatched[0]["gpu_peak_unmatched_mb"] == 80000
    report = _memory_report(trials)
    (memory,) = [t for t in gpu_check.targets(report) if "NVML" in t["name"]]
    assert memory["met"] is False and memory["shown"] == f"{100 * 36500 / quarter:.0f}%"


def test_nvml_failures_are_said_once_and_sampling_stops_cleanly(gpu_check):
    class Broken(FakeNVML):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    sampler = gpu_check.MemorySampler(Broken([]), "gpu0", interval=0.01).start()
    time.sleep(0.05)
    sampler.stop()
    assert sampler.error == "NVML's process list failed: NVML_ERROR_NOT_SUPPORTED" and not sampler.peaks


def test_compute_mode_and_mps_are_read_and_exclusive_mode_stops_packing(gpu_check, tmp_path):
    facts = gpu_check.gpu_facts(FakeNVML([], mode=3), "gpu0")
    assert facts == dict(gpu="NVIDIA H200", gpu_memory_mb=143771, gpu_capability="9.0", driver="580.65",
                         compute_mode="EXCLUSIVE_PROCESS")
    proc, pipes = tmp_path / "proc", tmp_path / "mps"
    (proc / "12").mkdir(parents=True)
    (proc / "12" / "comm").write_text("python3\n")
    pipes.mkdir()
    assert gpu_check.mps_state(str(proc), str(pipes))[0] is False
    (pipes / "control").write_text("")  # the daemon runs outside this container
    assert gpu_check.mps_state(str(proc), str(pipes)) == (True, f"its control pipe is in {pipes}")
    (proc / "13").mkdir()
    (proc / "13" / "comm").write_text("nvidia-cuda-mps-control\n")
    found = gpu_check.mps_state(str(proc), str(tmp_path / "none"))
    assert found == (True, "nvidia-cuda-mps-control runs (pid 13)")
    why = gpu_check.packing_blocked("EXCLUSIVE_PROCESS", mps=False)
    assert "one process at a time" in why and "nvidia-smi -c DEFAULT" in why and "MPS" in why
    assert "\n" not in why
    assert gpu_check.packing_blocked("EXCLUSIVE_PROCESS", mps=True) is None  # MPS's server shares it
    assert gpu_check.packing_blocked("DEFAULT", mps=False) is None
    assert "PROHIBITED" in gpu_check.packing_blocked("PROHIBITED", mps=True)


def test_a_gpus_environment_comes_from_nvml_and_starts_the_sampler(gpu_check, tmp_path, monkeypatch):
    nvml = FakeNVML([{4242: 700}] * 100, mode=3)
    monkeypatch.setattr(gpu_check, "open_nvml", lambda: (nvml, "gpu0", ""))
    monkeypatch.setattr(gpu_check, "mps_state", lambda: (False, "no daemon"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: pytest.fail("no CUDA call"))
    check = _check(gpu_check, tmp_path)
    check.mode = "cuda"
    env = gpu_check.environment(check)
    try:
        assert (env["gpu"], env["gpu_memory_mb"], env["gpu_capability"], env["compute_mode"], env["mps"]) == (
            "NVIDIA H200", 143771, "9.0", "EXCLUSIVE_PROCESS", False)
        assert env["packing_blocked"].startswith("the GPU's compute mode is EXCLUSIVE_PROCESS")
        deadline = time.monotonic() + 5
        while check.sampler.peak_mb(4242) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check.sampler.peak_mb(4242) == 700 and check.sampler.total_mb == 143771
    finally:
        check.sampler.stop()


def test_packing_parts_stop_with_one_line_under_exclusive_process(gpu_check, tmp_path):
    check = _check(gpu_check, tmp_path, parts={"packing", "figure2"})
    check.mode = "cuda"  # as on a GPU, whose environment says what NVML read
    monkey_env = dict(gpu="NVIDIA H200", compute_mode="EXCLUSIVE_PROCESS", mps=False, compile_missing=[],
                      packing_blocked=gpu_check.packing_blocked("EXCLUSIVE_PROCESS", False))
    check.report["environment"] = monkey_env
    for name in ("packing", "figure2"):
        with pytest.raises(gpu_check.Skip, match="EXCLUSIVE_PROCESS: one process at a time"):
            next(gpu_check.PART_FUNCTIONS[name](check))


def test_without_torchvision_the_imagenet_part_says_so(gpu_check, tmp_path, monkeypatch):
    check = _check(gpu_check, tmp_path, parts={"imagenet"})
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchvision" else real(name, *a))
    with pytest.raises(gpu_check.Skip, match="^torchvision is not importable: ImageNet's folders and JPEG"):
        next(gpu_check.part_imagenet(check))


# ----------------------------------------------------------------------------- torch.compile prerequisites


def test_missing_compile_prerequisites_are_named_up_front(gpu_check, tmp_path):
    headers = tmp_path / "include"
    headers.mkdir()
    (headers / "Python.h").write_text("")
    have = dict(find_spec=lambda name: object(), which=lambda cmd: f"/usr/bin/{cmd}", include=str(headers))
    assert gpu_check.compile_prerequisites("cuda", **have) == []
    bare = dict(find_spec=lambda name: None, which=lambda cmd: None, include=str(tmp_path))
    missing = gpu_check.compile_prerequisites("cuda", **bare)
    assert [m.split(":")[0] for m in missing] == [
        "Triton is not importable", "no C compiler (cc, gcc, clang) on PATH",
        f"no Python headers ({tmp_path}/Python.h)"]
    cpu = gpu_check.compile_prerequisites("cpu", **bare)
    assert cpu[0].startswith("no C++ compiler") and len(cpu) == 2  # CPU kernels need no Triton
    check = _check(gpu_check, tmp_path / "c", parts={"compile"})
    check.report["environment"] = dict(compile_missing=missing)
    with pytest.raises(gpu_check.Skip, match="torch.compile cannot run here: Triton is not importable"):
        next(gpu_check.part_compile(check))


# ----------------------------------------------------------------------------- GPU shares


def test_a_share_is_the_smallest_keeping_90_percent_of_the_best_rate():
    choose = gpu_shares.choose_share
    assert choose({1: 100, 2: 180, 4: 300, 8: 310, 16: 290}) == 1 / 16  # 290 >= 0.9 x 310
    assert choose({1: 100, 2: 180, 4: 300, 8: 310, 16: 270}) == 1 / 8   # 270 < 279
    assert choose({1: 100, 2: 95, 4: 80}) == 0.5  # 95 >= 90: two share a GPU
    assert choose({1: 100, 2: 85, 4: 80}) == 1.0  # sharing loses: a whole GPU
    assert choose({1: 100, 2: 190, 4: None, 8: 200}) == 1 / 8  # a failed k is left out
    assert choose({"1": 100, "2": 200}, keep=1.0) == 0.5
    with pytest.raises(ValueError):
        choose({1: None})


def test_the_share_table_reproduces_the_size_rule_until_measured():
    from iterand_tune.experiments import all_trials, load
    from iterand_tune.resources import GPU_SHARES, _gmacs

    table = gpu_shares.read_table()
    assert all(e["source"] == gpu_shares.ESTIMATED for e in table["shares"])
    seen = set()
    for name in ("figure1", "figure2", "figure3", "examples", "quickstart"):
        for t in all_trials(load(os.path.join(ROOT, "experiments", f"{name}.py"))):
            key = (t["model"], t["dataset"])
            if key in seen:
                continue
            seen.add(key)
            by_size = next(share for limit, share in GPU_SHARES if _gmacs(*key) <= limit)
            assert gpu_shares.lookup(*key) == by_size, key
    assert len(seen) >= 19
    assert gpu_shares.lookup("resnet18", "cifar100") == gpu_shares.lookup("resnet18x1.0", "cifar10") == 0.5
    assert gpu_shares.lookup("conv6x0.75", "cifar10") is None  # no entry: resources' size rule then
    assert gpu_shares.lookup("conv6x1.0", "nope") is None


def test_a_measured_curve_rewrites_one_entry_of_the_table(tmp_path):
    path = str(tmp_path / "shares.json")
    table = gpu_shares.read_table()
    gpu_shares.write_table(table, path)
    assert gpu_shares.read_table(path) == table  # written as read
    new = gpu_shares.with_measured(table, "resnet18x0.25", 32, {1: 1000.0, 2: 1900.0, 4: 2000.0, 8: 1700.0},
                                   "NVIDIA H200", "2026-01-01", mps=False)
    gpu_shares.write_table(new, path)
    assert gpu_shares.lookup("resnet18x0.25", "cifar10", path) == 0.25
    entries = gpu_shares.read_table(path)["shares"]
    assert [e["model"] for e in entries] == [e["model"] for e in table["shares"]]  # order kept
    (entry,) = [e for e in entries if e["model"] == "resnet18x0.25"]
    assert entry == dict(model="resnet18x0.25", input=32, share=0.25, source="measured", gpu="NVIDIA H200",
                         date="2026-01-01", mps=False,
                         images_per_s={"1": 1000.0, "2": 1900.0, "4": 2000.0, "8": 1700.0})
    with pytest.raises(ValueError, match="1/k"):
        gpu_shares.write_table({**table, "shares": [dict(entry, share=0.3)]}, path)


# ----------------------------------------------------------------------------- reports


def test_pytest_logs_of_finished_and_stopped_runs_are_read(gpu_check, tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda" name="test_ok" time="1.5"/>'
        '<testcase classname="tests.test_cuda" name="test_bad" time="2">'
        '<failure message="assert 1 == 2">long text</failure></testcase>'
        '<testcase classname="tests.test_cuda" name="test_skip" time="0">'
        '<skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_err" time="0"><error message="boom"/></testcase>'
        '</testsuite></testsuites>')
    cases = gpu_check.parse_junit(str(path))
    assert [(c["name"], c["outcome"], c["message"]) for c in cases] == [
        ("tests.test_cuda::test_ok", "passed", ""), ("tests.test_cuda::test_bad", "failed", "assert 1 == 2"),
        ("tests.test_cuda::test_skip", "skipped", "needs a CUDA device"),
        ("tests.test_cuda::test_err", "error", "boom")]
    log = ("============ test session starts ============\n"
           "tests/test_cuda.py::test_ok PASSED                                  [ 25%]\n"
           "tests/test_cuda.py::test_x[bf16] SKIPPED (needs a CUDA device (run: make gpu-check)) [ 50%]\n"
           "tests/test_cuda.py::test_bad FAILED                                 [ 75%]\n"
           "tests/test_cuda.py::test_slow ")
    cases, running = gpu_check.parse_pytest_log(log)
    assert [(c["name"], c["outcome"], c["message"]) for c in cases] == [
        ("tests.test_cuda::test_ok", "passed", ""),
        ("tests.test_cuda::test_x[bf16]", "skipped", "needs a CUDA device (run: make gpu-check)"),
        ("tests.test_cuda::test_bad", "failed", "")]
    assert running == "tests/test_cuda.py::test_slow"


def _memory_report(trials) -> dict:
    return dict(mode="cuda", plan=dict(PLAN), parts={
        "tests": {"state": "pending", "rows": []},
        "packing": {"state": "done", "rows": [dict(model="conv6x0.25", k=4, share=0.25, trials=trials)]}})


PLAN = dict(batch=128, steps=100, warmup=20, packing_epochs=3, packing_iters=50, figure2_epochs=2,
            figure2_iters=100, target_throughput=["conv6x1.0", 5.0], target_packing=["conv6x0.25", 4, 3.0],
            target_step={"conv6x1.0": 1.2, "resnet18x1.0": 1.3})


def _report(mode: str = "cuda") -> dict:
    """A hand-written report as gpu_check writes it (figures invented)."""
    trial = dict(model="conv6x0.25", method="edgepopup", share=0.25, epoch_seconds=[2.0, 1.5], epochs=[{}, {}],
                 eval_s=0.2, full_epoch_s_est=3.2, checkpoint_s=0.05, checkpoint_share=0.05 / 3.2,
                 peak_allocated_mb=900.0, peak_reserved_mb=1000.0, cap_mb=34000.0, gpu_peak_mb=1600.0,
                 gpu_share_mb=35000.0, within_share=True)
    parts = {
        "tests": [dict(name="tests.test_cuda::test_a", outcome="passed", seconds=1.0, message=""),
                  dict(name="tests.test_cuda::test_b", outcome="failed", seconds=2.0, message="AssertionError: x | y")],
        "compile": [dict(model="conv6x1.0", pipeline="ours compile", cpus=4, compile_threads=4, compile_s=41.5,
                         images_per_s=39000.0, compiled=True, compile_note="2 graph(s), no recompile while timing")],
        "throughput": [dict(model="conv6x1.0", pipeline="reference-style (PIL, .item)", images_per_s=4000.0,
                            vs_reference=1.0, peak_allocated_mb=500.0, peak_reserved_mb=600.0, gpu_peak_mb=1100.0),
                       dict(model="conv6x1.0", pipeline="ours fp32 (defaults)", images_per_s=26000.0,
                            vs_reference=6.5, peak_allocated_mb=700.0, peak_reserved_mb=800.0, gpu_peak_mb=1400.0)],
        "step": [dict(model="conv6x1.0", batch=128, dense_ms=10.0, masked_ms=11.0, ratio=1.1, select_ms=0.55,
                      select_share=0.05, rerand_ms=0.3),
                 dict(model="resnet18x1.0", batch=128, dense_ms=20.0, masked_ms=28.0, ratio=1.4, select_ms=4.2,
                      select_share=0.15, rerand_ms=0.9)],
        "packing": [dict(model="conv6x0.25", k=1, share=1.0, aggregate_images_per_s=10000.0,
                         per_trial_images_per_s=[10000.0], overlapped=True, vs_k1=1.0, trials=[trial]),
                    dict(model="conv6x0.25", k=4, share=0.25, aggregate_images_per_s=32000.0,
                         per_trial_images_per_s=[8000.0] * 4, overlapped=True, vs_k1=3.2, trials=[trial] * 4)],
        "figure2": [trial]}
    states = dict(tests="failed", compile="done", throughput="done", step="done", packing="done", figure2="done")
    return dict(
        schema=2, state="finished", mode=mode, created="2026-01-01T00:00:00+00:00",
        updated="2026-01-01T00:08:00+00:00", elapsed_s=400.0, budget_s=480.0,
        command="benchmarks/gpu_check.py --out gpu-check",
        environment=dict(gpu="NVIDIA H200", torch="2.11.0", cuda="13.0", cpu_count=16, compute_mode="DEFAULT",
                         mps=False),
        plan=dict(PLAN), failures=[dict(part="tests", what="tests.test_cuda::test_b", error="failed")],
        parts={name: dict(state=states[name], seconds=10.0, rows=rows) for name, rows in parts.items()},
        shares=dict(proposed=[dict(model="conv6x0.25", input=32, share=0.25, images_per_s={"1": 1e4, "4": 3.2e4})],
                    written=None))


def test_targets_and_markdown_from_a_report(gpu_check):
    report = _report()
    report["targets"] = gpu_check.targets(report)
    met = [(t["name"].split(",")[0], t["met"]) for t in report["targets"]]
    assert met == [("conv6x1.0 edge-popup training images/s", True), ("aggregate images/s", True),
                   ("masked (edge-popup) step vs dense step", True),   # Conv6x1.0: 1.1 <= 1.2
                   ("masked (edge-popup) step vs dense step", False),  # ResNet18x1.0: 1.4 > 1.3
                   ("GPU memory of each trial (NVML", True),
                   ("checkpoint (Trainer.save) share of an epoch", True),
                   ("CUDA tests (pytest -m cuda)", False)]  # one failed
    md = gpu_check.markdown(report)
    assert "| conv6x1.0 edge-popup training images/s, ours vs reference-style | >= 5x | 6.50x | yes |" in md
    assert "| masked (edge-popup) step vs dense step, resnet18x1.0, batch 128 | <= 1.3x | 1.40x | **no** |" in md
    assert "| conv6x1.0 | 4 | 4 | 41.5 | 39000 | 1.50x | compiled: 2 graph(s), no recompile while timing |" in md
    assert "| resnet18x1.0 | 128 | 20.00 | 28.00 | 1.400 | 4.200 | 15.0% | 0.900 |" in md
    assert "| conv6x0.25 | 4 | 32000 | 3.20x | 8000 / 8000 / 8000 / 8000 | 1600 | 35000 | 34000 |  |" in md
    assert "| test_b | failed | 2.0 | AssertionError: x / y |" in md  # a | would break the table
    assert "| conv6x0.25 | edgepopup | 0.250 | 2.00 / 1.50 | 0.20 | 3.2 | 0.050 | 1.6% | 1600 | 35000 | 34000 |" in md
    assert "- tests: tests.test_cuda::test_b: failed" in md and "| tests | failed, 10 s |  |" in md
    cpu = _report("cpu")
    cpu["targets"] = gpu_check.targets(cpu)
    assert all(t["met"] is None for t in cpu["targets"])  # no GPU target is judged on a CPU
    assert "say nothing about GPU speed" in gpu_check.markdown(cpu)


# ----------------------------------------------------------------------------- GPU-hours


def _hours_report() -> dict:
    rows = []
    for model, seconds in (("conv6x0.25", 2.0), ("conv6x1.0", 4.0), ("resnet18x0.25", 3.0),
                           ("resnet18x1.0", 10.0)):
        for method in ("sgd", "edgepopup", "iterand"):
            rows.append(dict(model=model, method=method, full_epoch_s_est=seconds, share=0.25))
    return dict(mode="cuda", created="2026-01-01", plan=dict(figure2_epochs=2, figure2_iters=150),
                environment=dict(gpu="NVIDIA H200", torch="2.11.0", cuda="13.0"),
                parts={"figure2": {"state": "done", "rows": rows}})


def test_gpu_hours_from_a_report(gpu_hours, tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_hours_report()))
    assert gpu_hours.main([str(path), "--detail"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GPU-hours per figure, measured on NVIDIA H200")
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line.startswith(("figure 1 ", "figure 2 ", "examples "))}
    # examples: three ResNet18x1.0 trials (measured, 10 s an epoch) at half a GPU, 100 epochs.
    assert rows["examples 3"] == [f"{3 * 100 * 10.0 * 0.5 / 3600:.2f}", "3", "0", "0"]
    # figure 1: Conv6x1.0 and ResNet18x1.0 measured (24 trials), ResNet34x1.0 extrapolated (12).
    assert rows["figure 1"][0] == "36" and rows["figure 1"][2:] == ["24", "12", "0"]
    # figure 2: widths x0.25 and x1.0 of Conv6 and ResNet18 measured: 2 x 2 x 5 methods x 3 seeds.
    assert rows["figure 2"][0] == "180" and rows["figure 2"][2:] == ["60", "120", "0"]
    conv6_measured = 12 * 100 * 4.0 * 0.25 / 3600  # figure 1's Conv6x1.0: 12 trials at a quarter
    assert float(rows["figure 1"][1]) > conv6_measured + 12 * 100 * 10.0 * 0.5 / 3600
    assert "Method:" in out and "power law" in out and "(extrapolated)" in out


def test_figure3_costs_what_the_imagenet_part_measured(gpu_hours, tmp_path, capsys):
    report = _hours_report()
    hours = {("resnet50", "device"): 20.0, ("resnet101", "device"): 35.0, ("resnet50", "pil"): 90.0,
             ("resnet101", "pil"): 95.0}
    report["parts"]["imagenet"] = dict(state="done", rows=[
        dict(what="hours", model=m, pipeline=p, hours=h, epochs=105) for (m, p), h in hours.items()])
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert gpu_hours.main([str(path), "--detail"]) == 0
    out = capsys.readouterr().out
    row = next(line.split()[2:] for line in out.splitlines() if line.startswith("figure 3 "))
    # Edge-popup and IteRand on ResNet50 and ResNet101 measured (device decoding on CUDA); ResNet34's
    # three trials and ResNet18's SGD trial follow the power law through them, below ResNet50's 20.
    assert row[0] == "8" and row[2:] == ["4", "4", "0"]
    assert 2 * (20.0 + 35.0) < float(row[1]) < 2 * (20.0 + 35.0) + 4 * 20.0
    times = gpu_hours.ImageNetHours(report)
    assert times.hours(dict(model="resnet50")) == (20.0, True)
    assert times.hours(dict(model="resnet50", imagenet_decode="pil")) == (90.0, True)
    r34, exact = times.hours(dict(model="resnet34"))
    assert not exact and 0 < r34 < 20.0


def test_gpu_hours_power_law_goes_through_the_measured_points(gpu_hours):
    times = gpu_hours.EpochTimes(_hours_report())
    assert times.seconds("resnet18x1.0", "iterand") == (10.0, True)
    s05, exact = times.seconds("resnet18x0.5", "iterand")
    assert not exact and 3.0 < s05 < 10.0  # between its neighbours
    law = gpu_hours.EpochTimes._power_law([(1.0, 2.0), (4.0, 8.0)], 2.0)
    assert law == pytest.approx(4.0)  # linear in MACs when the points are
    assert times.seconds("conv6x1.0", "nonexistent") == (None, False)


def test_gpu_hours_without_a_report_are_labelled_estimates(gpu_hours, capsys):
    assert gpu_hours.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GPU-hours per figure: ESTIMATES") and "not measured" in out
    assert "figure 2      180" in out and "about" in out
