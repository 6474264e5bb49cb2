"""benchmarks/gpu_check.py and benchmarks/gpu_hours.py on CPU: the one-line refusal without CUDA,
the tiny CPU version of every part and its two reports, the targets and tables from a
hand-written report, GPU-hours from a hand-written report, and the memory cap `claim_resources`
sets for a fractional GPU (with CUDA stood in for)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from iterand_tune.trial_setup import claim_resources

from helpers import ROOT, load_benchmark



@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def gpu_hours():
    return load_benchmark("gpu_hours")


# ----------------------------------------------------------------------------- without CUDA


def test_without_cuda_one_line_and_exit_3(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = gpu_check.main(["--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == gpu_check.NO_CUDA_EXIT == 3
    assert len(out.splitlines()) == 1 and err == ""
    assert out.startswith("gpu_check: no CUDA device") and "--allow-cpu" in out
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


# ----------------------------------------------------------------------------- the memory cap


def test_claim_resources_leaves_room_for_the_cuda_context(monkeypatch):
    caps = []
    gib = 2**30
    total = {"memory": 80 * gib}
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=total["memory"]))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: caps.append((f, d)))
    try:
        assert claim_resources(1, 0.25) == ("cuda", 1)
        assert caps[-1] == (pytest.approx((0.25 * 80 - 1) / 80), 0)  # a quarter less 1 GiB
        claim_resources(1, 0.5, context_reserve_mb=512)
        assert caps[-1][0] == pytest.approx((40 - 0.5) / 80)
        total["memory"] = 8 * gib  # a small card, many trials: never below half the share
        claim_resources(1, 0.125)
        assert caps[-1][0] == pytest.approx(0.0625)
        n = len(caps)
        assert claim_resources(2, 1) == ("cuda", 1) and len(caps) == n  # a whole GPU: no cap
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- report from parts


def _report(mode: str = "cuda") -> dict:
    """A hand-written report as gpu_check writes it (figures invented)."""
    trial = dict(model="conv6x0.25", method="edgepopup", share=0.25, epoch_seconds=[2.0, 1.5],
                 eval_s=0.2, full_epoch_s_est=3.2, checkpoint_s=0.05, checkpoint_share=0.05 / 3.2,
                 peak_allocated_mb=900.0, peak_reserved_mb=1000.0, cap_mb=34000.0)
    return dict(
        mode=mode, created="2026-01-01T00:00:00+00:00", elapsed_s=400.0, budget_s=450.0,
        environment=dict(gpu="NVIDIA H200", torch="2.11.0", cuda="13.0", cpu_count=16),
        plan=dict(gpu_check_plan(), figure2_epochs=2, figure2_iters=150),
        cuda_tests=dict(command="pytest -m cuda", passed=17, failed=1, errors=0, skipped=0, seconds=90.0,
                        log="cuda-tests.log",
                        cases=[dict(name="tests.test_cuda::test_a", outcome="passed", seconds=1.0, message=""),
                               dict(name="tests.test_cuda::test_b", outcome="failed", seconds=2.0,
                                    message="AssertionError: x | y")]),
        throughput=[dict(model="conv6x1.0", pipeline="reference-style (PIL, .item)", options={},
                         images_per_s=4000.0, vs_reference=1.0, peak_allocated_mb=500.0, peak_reserved_mb=600.0),
                    dict(model="conv6x1.0", pipeline="ours fp32 (defaults)", options={},
                         images_per_s=26000.0, vs_reference=6.5, peak_allocated_mb=700.0, peak_reserved_mb=800.0),
                    dict(model="conv6x1.0", pipeline="ours compile", options={"compile": True},
                         images_per_s=None, vs_reference=None, peak_allocated_mb=700.0, peak_reserved_mb=800.0,
                         compiled=False, compile_note="1 graph break(s): partly eager")],
        overhead=[dict(model="conv6x1.0", batch=128, dense_ms=10.0, masked_ms=11.0, ratio=1.1, paired=1.1),
                  dict(model="resnet18x1.0", batch=128, dense_ms=20.0, masked_ms=28.0, ratio=1.4, paired=1.4)],
        packing=[dict(model="conv6x0.25", k=1, share=1.0, aggregate_images_per_s=10000.0,
                      per_trial_images_per_s=[10000.0], overlapped=True, vs_k1=1.0, trials=[trial]),
                 dict(model="conv6x0.25", k=4, share=0.25, aggregate_images_per_s=32000.0,
                      per_trial_images_per_s=[8000.0] * 4, overlapped=True, vs_k1=3.2, trials=[trial] * 4)],
        figure2=[trial], skipped=[dict(part="ray", why="Ray is not importable here")], errors=[])


def gpu_check_plan() -> dict:
    return dict(batch=128, steps=100, warmup=20, packing_ks=[1, 4], packing_model="conv6x0.25",
                target_a="conv6x1.0", target_overhead={"resnet18x1.0": 1.3, "conv6x1.0": 1.2})


def test_targets_and_markdown_from_a_report(gpu_check):
    report = _report()
    report["targets"] = gpu_check.targets(report, report["plan"])
    met = [(t["name"].split(",")[0], t["met"]) for t in report["targets"]]
    assert met == [("conv6x1.0 edge-popup training images/s", True), ("aggregate images/s", True),
                   ("masked (edge-popup) step vs dense step", False),  # ResNet18x1.0: 1.4 > 1.3
                   ("masked (edge-popup) step vs dense step", True),   # Conv6x1.0: 1.1 <= 1.2
                   ("peak GPU memory reserved of each trial within its cap", True),
                   ("checkpoint (Trainer.save) share of an epoch", True),
                   ("CUDA tests (pytest -m cuda)", False)]  # one failed
    md = gpu_check.markdown(report)
    assert "| conv6x1.0 edge-popup training images/s, ours vs reference-style | >= 5x | 6.50x | yes |" in md
    assert "| masked (edge-popup) step vs dense step, resnet18x1.0, batch 128 | <= 1.3x | 1.40x | **no** |" in md
    assert "| conv6x1.0 | ours compile | - | - | 700 | 800 | NOT compiled: 1 graph break(s): partly eager |" in md
    assert "| conv6x0.25 | 4 | 0.25 | 8000 / 8000 / 8000 / 8000 | 32000 | 3.20x | 1000 | 34000 |  |" in md
    assert "| test_b | failed | 2.0 | AssertionError: x / y |" in md  # a | would break the table
    assert "| conv6x0.25 | edgepopup | 0.25 | 2.00 / 1.50 | 0.20 | 3.2 | 0.050 | 1.6% | 900 | 1000 | 34000 |" in md
    assert "- ray: skipped, Ray is not importable here" in md
    cpu = _report("cpu")
    cpu["targets"] = gpu_check.targets(cpu, cpu["plan"])
    assert all(t["met"] is None for t in cpu["targets"])  # no GPU target is judged on a CPU
    assert "say nothing about GPU speed" in gpu_check.markdown(cpu)


def test_junit_results_are_read(gpu_check, tmp_path):
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
        ("tests.test_cuda::test_skip", "skipped", "needs a CUDA device"), ("tests.test_cuda::test_err", "error", "boom")]


# ----------------------------------------------------------------------------- GPU-hours


def _hours_report() -> dict:
    rows = []
    for model, seconds in (("conv6x0.25", 2.0), ("conv6x1.0", 4.0), ("resnet18x0.25", 3.0),
                           ("resnet18x1.0", 10.0)):
        for method in ("sgd", "edgepopup", "iterand"):
            rows.append(dict(model=model, method=method, full_epoch_s_est=seconds, share=0.25))
    return dict(mode="cuda", created="2026-01-01", environment=dict(gpu="NVIDIA H200", torch="2.11.0", cuda="13.0"),
                plan=dict(figure2_epochs=2, figure2_iters=150), figure2=rows)


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


# ----------------------------------------------------------------------------- the CPU version


@pytest.mark.slow
@pytest.mark.ray
def test_allow_cpu_runs_every_part_and_writes_both_reports(gpu_check, tmp_path, monkeypatch, capsys):
    """`gpu_check.py --allow-cpu --out DIR`, run in this process: its Ray Tune part starts a Ray
    instance with a logical GPU and stops it again, or joins the session's if this process has
    started that already (the tests run in one process)."""
    if torch.cuda.is_available():  # a GPU machine: the same command measures the GPU instead
        pytest.skip("CUDA is available: --allow-cpu does not apply")
    out = tmp_path / "check"
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")  # what the Ray Tune part sets, undone after
    monkeypatch.chdir(ROOT)
    rc = gpu_check.main(["--allow-cpu", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cpu" and report["errors"] == []
    env_keys = {"gpu", "torch", "cuda", "python", "cpu_count", "hostname"}
    assert env_keys <= set(report["environment"]) and report["environment"]["torch"] == torch.__version__
    tests = report["cuda_tests"]  # collected and skipped here, with the reason
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 10
    assert all("needs a CUDA device" in c["message"] for c in tests["cases"])
    assert (out / "cuda-tests.xml").exists() and (out / "cuda-tests.log").exists()
    rows = report["throughput"]
    assert [r["pipeline"] for r in rows] == ["reference-style (PIL, .item)", "ours fp32 (defaults)",
                                            "ours channels_last+bf16"]
    assert all(r["images_per_s"] > 0 and r["vs_reference"] > 0 for r in rows)
    (ov,) = report["overhead"]
    assert ov["dense_ms"] > 0 and ov["masked_ms"] > 0 and ov["ratio"] > 0
    packing = report["packing"]
    assert [p["k"] for p in packing] == [1, 2]
    for p in packing:
        assert p["aggregate_images_per_s"] > 0 and p["vs_k1"] > 0 and len(p["trials"]) == p["k"]
        for t in p["trials"]:
            assert t["device"] == "cpu" and len(t["epochs"]) == 2
            assert all("epoch_end_time" in m for m in t["epochs"])
    fig2 = report["figure2"]
    assert {(t["model"], t["method"]) for t in fig2} == {
        (m, x) for m in ("conv6x0.25", "resnet18x0.25") for x in ("sgd", "edgepopup", "iterand")}
    for t in fig2:
        assert len(t["epoch_seconds"]) == 2 and t["full_epoch_s_est"] > 0 and t["checkpoint_s"] > 0
        assert 0 < t["checkpoint_share"] and t["eval_s"] > 0 and t["iterations_per_epoch"] == 2
    ray = report["ray_packing"]
    if report["environment"]["ray"]:  # Ray Tune trials at 1/k of a logical GPU
        assert [r["k"] for r in ray["rows"]] == [1, 2]
        assert all(r["aggregate_images_per_s"] > 0 and r["vs_k1"] > 0 for r in ray["rows"])
    targets = report["targets"]
    assert len(targets) == 6 and all(t["met"] is None for t in targets)  # not judged on a CPU
    assert all(t["measured"] is not None for t in targets if "memory" not in t["name"])
    assert {s["part"] for s in report["skipped"]} == {"compile"}
    md = (out / "report.md").read_text()
    for heading in ("## Targets", "## CUDA tests", "## Training images/s", "## Masked step vs dense step",
                    "## Packing: k trial processes", "## Figure-2-like run"):
        assert heading in md
    assert "| what | target | measured | met |" in md
    assert "| conv6x0.25 | reference-style (PIL, .item) |" in md
    assert md.count("| conv6x0.25 | ") >= 5 and "| resnet18x0.25 | iterand |" in md
    assert not math.isnan(report["elapsed_s"]) and "report:" in stdout
