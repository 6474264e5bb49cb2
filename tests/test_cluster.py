"""Multi-node behaviour on a simulated Ray cluster (ray.cluster_utils.Cluster: a head without
CPUs and two worker nodes with a logical GPU each, all on this machine): a trial process
killed mid-epoch and a trial on a node without its data (one run, read by two tests), and a
worker node lost mid-run (trials spread over both workers, every result in one folder)."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from iterand_tune.experiments import load, prepare

from helpers import ITERAND, result_rows, trained_here, trial_dirs, wait_for, write_digits

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.cluster]

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


def driver(exp, address, storage, name, *extra):
    return [sys.executable, "-m", "iterand_tune", str(exp), "--address", address,
            "--storage-path", str(storage), "--name", name, "--cpus-per-trial", "0.5", *extra]


@pytest.fixture(scope="module")
def kill_run(cluster, tmp_path_factory):
    """One run on the cluster read by two tests: the `victim` trial's process is SIGKILLed as
    soon as its first epoch is reported, and its reports are compared with the same trial
    trained here without interruption (`reference`); `nodata` wants CIFAR-10 from a folder no
    node has (--data-dir; digits needs no folder)."""
    c, _ = cluster
    folder = tmp_path_factory.mktemp("kill")
    exp = write_digits(str(folder), {"victim": ITERAND,
                                     "nodata": dict(ITERAND, dataset="cifar10", dataset_download=False)},
                       file="multi.py", epochs=4, max_train_dataset_size=640)  # 10 iterations an epoch
    run_dir, absent = folder / "shared" / "kill", folder / "absent"
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        proc = subprocess.Popen(driver(exp, c.address, folder / "shared", "kill", "--data-dir",
                                       str(absent), "--max-failures", "1"), stdout=out, stderr=err)
    victim = lambda: [d for d in trial_dirs(run_dir) if os.path.basename(d).startswith("victim-")]  # noqa: E731
    try:
        wait_for(lambda: victim() and len(result_rows(victim()[0])) >= 1, proc, "the victim's first epoch")
        first = result_rows(victim()[0])
        os.kill(first[-1]["pid"], signal.SIGKILL)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    (victim_trial,) = prepare(load(exp))[0].trials()
    return SimpleNamespace(run_dir=run_dir, absent=absent, first=first, rc=rc,
                           reference=trained_here(victim_trial),
                           out=(folder / "out.txt").read_text(), err=(folder / "err.txt").read_text())


def test_trial_killed_mid_epoch_resumes_with_the_same_metrics(kill_run):
    first = kill_run.first
    assert len(first) < 4  # it was killed while a later epoch was under way
    (v,) = trial_dirs(kill_run.run_dir, "victim-")
    v_rows = result_rows(v)
    assert [r["epoch"] for r in v_rows] == [1, 2, 3, 4]       # continued from the last checkpoint
    assert v_rows[len(first)]["pid"] != first[-1]["pid"]      # in a new process
    assert len(kill_run.reference) == 4
    for a, b in zip(v_rows, kill_run.reference):  # as if nothing had happened: the same trial
        assert {k: a.get(k) for k in METRICS} == {k: b.get(k) for k in METRICS}  # run here


def test_node_without_data_fails_the_trial_with_a_clear_error(kill_run):
    assert kill_run.rc == 1  # the victim recovered; nodata could not
    assert f"CIFAR-10 not found in {kill_run.absent}" in kill_run.out  # the trial's error line
    err = kill_run.err.strip().splitlines()[-1]
    assert err.startswith("error: 1 trial(s) did not finish") and "--resume" in err
    (d,) = trial_dirs(kill_run.run_dir, "nodata-")
    with open(os.path.join(d, "error.txt")) as f:
        assert "DataError: CIFAR-10 not found" in f.read()


def test_worker_node_lost_mid_run(cluster, tmp_path):
    """Also the spread of a run: its trials on both workers (the head has no CPUs), every
    result and checkpoint in one storage folder, the storage visibility probe cleaned up."""
    c, workers = cluster
    exp = write_digits(str(tmp_path), {"moved": ITERAND}, grid=dict(seed=[1, 2, 3, 4]),
                       file="multi.py", epochs=4, max_train_dataset_size=640)  # 10 iterations an epoch
    storage = tmp_path / "shared"
    # Half a GPU each: two trials per worker node.
    proc = subprocess.Popen(driver(exp, c.address, storage, "lost", "--gpus-per-trial", "0.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = storage / "lost"

    def a_node_to_lose():
        """(worker, its trial folders) once every trial has reported an epoch, for a worker
        whose two trials are both still running."""
        dirs = trial_dirs(run_dir)
        if len(dirs) < 4 or not all(result_rows(d) for d in dirs):
            return None
        for w in workers:
            mine = [d for d in dirs if result_rows(d)[0]["node_id"] == w.node_id]
            if len(mine) == 2 and all(len(result_rows(d)) < 4 for d in mine):
                return w, mine
        return None

    try:
        doomed, doomed_trials = wait_for(a_node_to_lose, proc, "one epoch of every trial, and a "
                                         "worker whose two trials are both still running")
        c.remove_node(doomed)
        assert proc.wait(timeout=900) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    survivor = next(w for w in workers if w is not doomed)  # (the last test of the cluster)
    first_nodes = set()
    for d in trial_dirs(run_dir):
        r = result_rows(d)
        assert [x["epoch"] for x in r] == [1, 2, 3, 4], (d, r)   # every epoch recorded once
        assert "test_acc" in r[-1]
        assert glob.glob(os.path.join(d, "checkpoint_*", "trainer.pt"))
        first_nodes.add(r[0]["node_id"])
    assert first_nodes == {survivor.node_id, doomed.node_id}  # both workers, not the head
    assert not glob.glob(str(storage / ".iterand_tune_probe_*"))  # the visibility probe is gone
    moved = 0
    for d in doomed_trials:  # continued on the surviving node, from the epoch after its checkpoint
        nodes = [x["node_id"] for x in result_rows(d)]
        k = nodes.index(survivor.node_id) if survivor.node_id in nodes else len(nodes)
        assert set(nodes[:k]) == {doomed.node_id} and set(nodes[k:]) <= {survivor.node_id}
        moved += k < len(nodes)
    assert moved >= 1  # at least one trial was cut off by the node loss and moved
