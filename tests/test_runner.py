"""Tests for iterand_tune.runner through the CLI: real Ray Tune runs on digits with a logical GPU
(four quarter-GPU trials at once), checkpoints, the summary, a driver killed with SIGKILL and
resumed, and refusals that start nothing."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from iterand_tune.cli import main

from helpers import trial_states

pytestmark = pytest.mark.slow


def write_experiments(folder, epochs=3, seeds=(1, 2), debug_max_iters=None, methods=("edgepopup", "iterand")):
    """A small experiment file on digits: one experiment per method, a seed axis."""
    path = folder / "tiny.py"
    path.write_text(textwrap.dedent(f"""
        from iterand_tune.experiments import Experiment
        BASE = dict(dataset="digits", model="conv6x0.25", epochs={epochs}, batch_size=64,
                    train_augmentation=False, train_mode="score_only", bn_affine=False,
                    conv_sparsity=0.5, lr=0.3, debug_max_iters={debug_max_iters!r})
        METHODS = dict(edgepopup=dict(), iterand=dict(rerand_mode="bernoulli", rerand_freq=5,
                                                      rerand_lambda=0.1))
        EXPERIMENTS = [Experiment(f"tiny_{{m}}", dict(**BASE, **METHODS[m]),
                                  dict(seed={list(seeds)!r})) for m in {list(methods)!r}]
    """))
    return path


def trial_dirs(run_dir):
    return sorted(d for d in glob.glob(os.path.join(run_dir, "tiny_*")) if os.path.isdir(d))


def results(trial_dir):
    with open(os.path.join(trial_dir, "result.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def interval(rows):
    """(start, end) wall times of a trial from its reports."""
    return rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]


def test_four_quarter_gpu_trials_run_at_once(ray_cluster, tmp_path, monkeypatch, capsys):
    exp = write_experiments(tmp_path, epochs=4)
    monkeypatch.chdir(tmp_path)  # the relative --storage-path is made absolute against this
    rc = main([str(exp), "--storage-path", "results", "--name", "packing", "--cpus-per-trial", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    run_dir = tmp_path / "results" / "packing"
    dirs = trial_dirs(run_dir)
    assert len(dirs) == 4

    spans = []
    for d in dirs:
        rows = results(d)
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # every epoch reported once
        assert "test_acc" in rows[-1] and all("test_acc" not in r for r in rows[:-1])
        trial = rows[-1]["config"]["trial"]
        assert os.path.isabs(trial["dataset_dir"])
        # Only the newest checkpoints are kept, and they load without pickles.
        ckpts = sorted(glob.glob(os.path.join(d, "checkpoint_*")))
        assert 1 <= len(ckpts) <= 2
        state = torch.load(os.path.join(ckpts[-1], "trainer.pt"), weights_only=True)
        assert state["epoch"] == 4 and state["config"]["seed"] == trial["seed"]
        spans.append(interval(rows))
    # One logical GPU and two CPUs: only 0.25 GPU + 0.5 CPU per trial lets all four overlap.
    assert max(s for s, _ in spans) < min(e for _, e in spans)

    # The summary: one row per figure point, both seeds done, the mean of the trials' test_acc.
    accs = {}
    for d in dirs:
        rows = results(d)
        accs.setdefault(rows[-1]["config"]["trial"]["experiment"], []).append(rows[-1]["test_acc"])
    for name, values in accs.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert "2/2" in line and f"{sum(values) / 2:.2f}" in line
    assert f"results: {run_dir}" in out


def test_resume_after_driver_is_killed(ray_cluster, tmp_path):
    exp = write_experiments(tmp_path, epochs=4, seeds=(1, 2), debug_max_iters=8)
    storage = tmp_path / "results"
    base = [sys.executable, "-m", "iterand_tune", str(exp), "--address", ray_cluster,
            "--storage-path", str(storage), "--name", "killed", "--cpus-per-trial", "0.5",
            "--max-concurrent", "2"]
    run_dir = storage / "killed"
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    states = {}
    try:
        while time.time() < deadline:  # wait for one finished trial and one half-way through
            states = trial_states(run_dir)
            statuses = [s for s, _ in states.values()]
            if "TERMINATED" in statuses and any(s != "TERMINATED" and 1 <= e < 4
                                                for s, e in states.values()):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail(f"no mid-run moment seen: {states}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {d: open(os.path.join(d, "result.json")).read() for d in trial_dirs(run_dir)
                if any(d.endswith(tid) for tid, (s, _) in states.items() if s == "TERMINATED")}
    assert finished

    done = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming killed" in done.stdout
    dirs = trial_dirs(run_dir)
    assert len(dirs) == 4
    for d in dirs:
        epochs = [r["epoch"] for r in results(d)]
        assert set(epochs) == {1, 2, 3, 4}, (d, epochs)  # no epoch missing
        assert "test_acc" in results(d)[-1]
    for d, text in finished.items():  # finished trials were not run again
        assert open(os.path.join(d, "result.json")).read() == text


def test_resume_without_a_run_is_one_line(ray_cluster, tmp_path, capsys):
    exp = write_experiments(tmp_path)
    rc = main([str(exp), "--storage-path", str(tmp_path / "none"), "--name", "nothing", "--resume"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: --resume: there is no run to resume at ")
    assert not (tmp_path / "none" / "nothing").exists()


def test_resume_newest_run_of_a_file_without_name(ray_cluster, tmp_path, capsys):
    exp = write_experiments(tmp_path)
    rc = main([str(exp), "--storage-path", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "no earlier run of tiny under" in err


def test_impossible_request_is_refused_before_anything_runs(ray_cluster, tmp_path, capsys):
    exp = write_experiments(tmp_path)
    rc = main([str(exp), "--storage-path", str(tmp_path / "r"), "--gpus-per-trial", "2"])
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    assert rc == 2 and len(err) == 1, cap.err
    assert "asks for 1 CPU + 2 GPU per trial" in err[0]
    assert "cluster: 1 node(s), 2 CPUs, 1 GPUs" in err[0]
    assert not glob.glob(str(tmp_path / "r" / "*" / "tiny_*"))  # no trial was created


def test_existing_run_name_is_not_overwritten(ray_cluster, tmp_path, capsys):
    exp = write_experiments(tmp_path)
    (tmp_path / "r" / "taken").mkdir(parents=True)
    (tmp_path / "r" / "taken" / "keep.txt").write_text("x")
    rc = main([str(exp), "--storage-path", str(tmp_path / "r"), "--name", "taken"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a run" in err and "--resume" in err
    assert os.listdir(tmp_path / "r" / "taken") == ["keep.txt"]


def test_unreachable_address_is_one_line_and_starts_nothing(tmp_path):
    exp = write_experiments(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "iterand_tune", str(exp), "--address",
                           "127.0.0.1:1", "--storage-path", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot reach a Ray cluster at 127.0.0.1:1")
    assert not (tmp_path / "r").exists()


def test_claim_resources_caps_memory_to_the_gpu_share(monkeypatch):
    from iterand_tune.runner import claim_resources

    caps = []
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: caps.append((f, d)))
    try:
        assert claim_resources(1, 0.25) == ("cuda", 1) and caps == [(0.25, 0)]
        assert torch.get_num_threads() == 1
        assert claim_resources(2, 2) == ("cuda", 2) and len(caps) == 1  # whole GPUs: no cap
        assert torch.get_num_threads() == 2
        assert claim_resources(1, 0.5, use_cuda=False) == ("cpu", 1) and len(caps) == 1
        assert claim_resources(0.5, 0) == ("cpu", 1)
        assert torch.get_num_threads() == 1  # half a CPU still gets one thread
    finally:
        torch.set_num_threads(threads)


def test_missing_data_is_one_line_before_ray_starts(tmp_path, monkeypatch, capsys):
    import iterand_tune.runner as runner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner, "connect", lambda *a: pytest.fail("Ray was started"))
    figure2 = os.path.join(os.path.dirname(__file__), "..", "experiments", "figure2.py")
    rc = main([figure2, "--only", "figure2_conv6_ku_sgd", "--data-dir", str(tmp_path / "empty"),
               "--set", "dataset_download=false", "--storage-path", str(tmp_path / "r")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: CIFAR-10 not found in {tmp_path / 'empty'}")
    assert "--download" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, reuse", [([], True), (["--no-reuse-actors"], False)])
def test_actor_reuse_flag_reaches_the_tuner(tmp_path, monkeypatch, capsys, flag, reuse):
    import ray.tune as tune

    import iterand_tune.runner as runner

    seen = []

    class StopHere(Exception):
        pass

    def fake_tuner(trainable, param_space, tune_config, run_config):
        seen.append((tune_config.reuse_actors, run_config.failure_config.max_failures))
        raise StopHere

    monkeypatch.setattr(tune, "Tuner", fake_tuner)
    monkeypatch.setattr(runner, "connect", lambda address: False)
    monkeypatch.setattr(runner, "live_nodes", lambda: [{"CPU": 2.0}])
    monkeypatch.setattr(runner, "live_node_ids", lambda: ["n1"])
    exp = write_experiments(tmp_path)
    with pytest.raises(StopHere):
        main([str(exp), "--storage-path", str(tmp_path / "r"), "--max-failures", "5", *flag])
    assert seen == [(reuse, 5)]
