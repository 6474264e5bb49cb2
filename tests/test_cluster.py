"""Multi-node behaviour on a simulated Ray cluster (ray.cluster_utils.Cluster: a head without
CPUs and two worker nodes with a logical GPU each, all on this machine): trials spread over the
workers with every result in one storage folder, a worker node lost mid-run, a trial process
killed mid-epoch, a node without its data, and storage that some node cannot see."""
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

pytestmark = pytest.mark.slow

METRICS = ("epoch", "train_acc", "train_loss", "val_acc", "val_loss", "best_val_acc", "best_epoch",
           "lr", "iterations", "params_before_pruning", "params_after_pruning", "test_acc",
           "test_loss")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False,
                head_node_args=dict(num_cpus=0, include_dashboard=False))
    workers = [c.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    try:
        yield c, workers
    finally:
        c.shutdown()


def write_experiments(folder, names=("spread",), seeds=(1,), epochs=3, **extra):
    path = folder / "multi.py"
    path.write_text(textwrap.dedent(f"""
        from iterand_tune.experiments import Experiment
        BASE = {{**dict(dataset="digits", model="conv6x0.25", epochs={epochs}, batch_size=64,
                       train_augmentation=False, train_mode="score_only", bn_affine=False,
                       conv_sparsity=0.5, lr=0.3, rerand_mode="bernoulli", rerand_freq=5,
                       rerand_lambda=0.1), **{extra!r}}}
        EXPERIMENTS = [Experiment(name, BASE, dict(seed={list(seeds)!r})) for name in {list(names)!r}]
    """))
    return path


def driver(exp, address, storage, name, *extra):
    return [sys.executable, "-m", "iterand_tune", str(exp), "--address", address,
            "--storage-path", str(storage), "--name", name, "--cpus-per-trial", "0.5", *extra]


def trial_dirs(run_dir):
    return sorted(d for d in glob.glob(os.path.join(run_dir, "*-seed*")) if os.path.isdir(d))


def rows(trial_dir):
    path = os.path.join(trial_dir, "result.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def wait_for(predicate, proc, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_quarter_gpu_trials_spread_over_workers_into_one_folder(cluster, tmp_path):
    c, workers = cluster
    exp = write_experiments(tmp_path, seeds=range(1, 9), epochs=2)
    storage = tmp_path / "shared"
    proc = subprocess.run(driver(exp, c.address, storage, "spread", "--gpus-per-trial", "0.25"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = trial_dirs(storage / "spread")
    assert len(dirs) == 8
    nodes = set()
    for d in dirs:
        r = rows(d)
        assert [x["epoch"] for x in r] == [1, 2] and "test_acc" in r[-1]
        assert glob.glob(os.path.join(d, "checkpoint_*", "trainer.pt"))
        nodes |= {x["node_id"] for x in r}
    # Both workers ran trials; the head (no CPUs) ran none.
    assert nodes == {w.node_id for w in workers}
    assert not glob.glob(str(storage / ".iterand_tune_probe_*"))  # the visibility probe is gone


def test_trial_killed_mid_epoch_resumes_with_the_same_metrics(cluster, tmp_path):
    c, _ = cluster
    exp = write_experiments(tmp_path, names=("victim", "reference"), epochs=4)
    storage = tmp_path / "shared"
    proc = subprocess.Popen(driver(exp, c.address, storage, "kill"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = storage / "kill"
    victim = lambda: [d for d in trial_dirs(run_dir) if os.path.basename(d).startswith("victim-")]  # noqa: E731
    try:
        wait_for(lambda: victim() and len(rows(victim()[0])) >= 1, proc, "the victim's first epoch")
        first = rows(victim()[0])
        assert len(first) < 4  # a report just arrived and the next epoch is under way: kill now
        os.kill(first[-1]["pid"], signal.SIGKILL)
        assert proc.wait(timeout=900) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    (v,) = victim()
    (ref,) = [d for d in trial_dirs(run_dir) if os.path.basename(d).startswith("reference-")]
    v_rows, ref_rows = rows(v), rows(ref)
    assert [r["epoch"] for r in v_rows] == [1, 2, 3, 4]       # continued from the last checkpoint
    assert v_rows[len(first)]["pid"] != first[-1]["pid"]      # in a new process
    for a, b in zip(v_rows, ref_rows):                        # as if nothing had happened
        assert {k: a.get(k) for k in METRICS} == {k: b.get(k) for k in METRICS}


def test_worker_node_lost_mid_run(cluster, tmp_path):
    c, workers = cluster
    exp = write_experiments(tmp_path, names=("moved",), seeds=(1, 2, 3, 4), epochs=4)
    storage = tmp_path / "shared"
    # Half a GPU each: two trials per worker node.
    proc = subprocess.Popen(driver(exp, c.address, storage, "lost", "--gpus-per-trial", "0.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = storage / "lost"
    doomed = workers[1]
    on_doomed = lambda: [d for d in trial_dirs(run_dir)  # noqa: E731
                         if any(r["node_id"] == doomed.node_id for r in rows(d))]
    try:
        wait_for(lambda: len(trial_dirs(run_dir)) == 4 and all(rows(d) for d in trial_dirs(run_dir))
                 and len(on_doomed()) == 2 and all(len(rows(d)) < 4 for d in on_doomed()),
                 proc, "one epoch of every trial, two of them on the doomed node")
        doomed_trials = on_doomed()
        c.remove_node(doomed)
        assert proc.wait(timeout=900) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        workers[1] = c.add_node(num_cpus=2, num_gpus=1)  # give later tests their second worker
    for d in trial_dirs(run_dir):
        r = rows(d)
        assert [x["epoch"] for x in r] == [1, 2, 3, 4], (d, r)   # every epoch recorded once
        assert "test_acc" in r[-1]
    moved = 0
    for d in doomed_trials:  # continued on the surviving node, from the epoch after its checkpoint
        nodes = [x["node_id"] for x in rows(d)]
        k = nodes.index(workers[0].node_id) if workers[0].node_id in nodes else len(nodes)
        assert set(nodes[:k]) == {doomed.node_id} and set(nodes[k:]) <= {workers[0].node_id}
        moved += k < len(nodes)
    assert moved >= 1  # at least one trial was cut off by the node loss and moved


def test_node_without_data_fails_the_trial_with_a_clear_error(cluster, tmp_path):
    c, _ = cluster
    exp = write_experiments(tmp_path, names=("nodata",), epochs=1, dataset="cifar10",
                            dataset_download=False)
    proc = subprocess.run(driver(exp, c.address, tmp_path / "shared", "nodata", "--data-dir",
                                 str(tmp_path / "absent"), "--max-failures", "0"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert f"CIFAR-10 not found in {tmp_path / 'absent'}" in proc.stdout  # the trial's error line
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: 1 trial(s) did not finish") and "--resume" in err
    (d,) = trial_dirs(tmp_path / "shared" / "nodata")
    with open(os.path.join(d, "error.txt")) as f:
        assert "DataError: CIFAR-10 not found" in f.read()


def test_storage_some_node_cannot_see_is_refused(tmp_path):
    from iterand_tune.runner import RunError, check_storage

    asked = []

    def half_blind(path, nodes):
        asked.append((path, list(nodes)))
        return nodes[1:]

    with pytest.raises(RunError) as err:
        check_storage(str(tmp_path / "r"), ["a" * 32, "b" * 32], missing=half_blind)
    msg = str(err.value)
    assert "not visible on 1 of the cluster's 2 nodes (bbbbbbbb)" in msg
    assert "shared filesystem" in msg and "s3://" in msg
    # URIs and single-node clusters are not probed at all.
    check_storage("s3://bucket/x", ["a", "b"], missing=half_blind)
    check_storage(str(tmp_path), ["a"], missing=half_blind)
    assert len(asked) == 1


@pytest.mark.parametrize("how", ["flag", "client", "env"])
def test_unreachable_cluster_is_one_line_before_anything_is_written(tmp_path, how):
    exp = write_experiments(tmp_path)
    cmd = [sys.executable, "-m", "iterand_tune", str(exp), "--storage-path", str(tmp_path / "r")]
    env = dict(os.environ)
    if how == "flag":
        cmd += ["--address", "127.0.0.1:1"]
    elif how == "client":
        cmd += ["--address", "ray://127.0.0.1:1"]
    else:  # RAY_ADDRESS is honoured like --address
        env["RAY_ADDRESS"] = "127.0.0.1:1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot reach a Ray cluster at ")
    assert "127.0.0.1:1" in lines[0] and "ray start --head" in lines[0]
    assert not (tmp_path / "r").exists()
