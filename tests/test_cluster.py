"""Multi-node behaviour on a simulated Ray cluster (ray.cluster_utils.Cluster: a head without
CPUs and two worker nodes with a logical GPU each, all on this machine), in one run read by
three tests: a worker node lost mid-run (trials spread over both workers, every result in one
folder), a trial process killed mid-epoch on the other worker, and a trial on a node without
its data."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from iterand_tune.experiments import load, prepare

from helpers import DIGITS, ITERAND, result_rows, trained_here, trial_dirs, wait_for, write_experiments

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


def once(rows: list[dict]) -> list[dict]:
    """A trial's reports, an epoch reported twice once, as `analysis` reads them: the last. A
    trial that fails after an epoch's report is recorded but before its checkpoint is, runs that
    epoch again from the checkpoint before (bit-exactly: the same metrics)."""
    return list({r["epoch"]: r for r in rows}.values())


def driver(exp, address, storage, name, *extra):
    return [sys.executable, "-m", "iterand_tune", str(exp), "--address", address,
            "--storage-path", str(storage), "--name", name, "--cpus-per-trial", "0.5", *extra]


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory):
    """One run on the cluster, read by three tests. Four `moved` trials at half a GPU each
    (two per worker) and `nodata`, which wants CIFAR-10 from a folder no node has (--data-dir;
    digits needs no folder) and waits for a free slot. Once every `moved` trial has reported an
    epoch, one worker whose two trials are both still running is removed (`doomed`), and the
    process of a still-running trial on the other worker is SIGKILLed (`victim`). The reports of
    the victim are compared with the same trial trained here without interruption
    (`reference`)."""
    c, workers = cluster
    folder = tmp_path_factory.mktemp("cluster")
    moved = {**DIGITS, **ITERAND, "epochs": 4, "max_train_dataset_size": 640}  # 10 iterations an epoch
    exp = write_experiments(folder / "multi.py", ("moved", moved, {"seed": [1, 2, 3, 4]}),
                            ("nodata", dict(moved, dataset="cifar10", dataset_download=False),
                             {"seed": [1]}))
    storage, absent = folder / "shared", folder / "absent"
    run_dir = storage / "cluster"

    def moment():
        """(doomed worker, its two trial folders, the victim's folder and reports) once every
        `moved` trial has reported an epoch, for a worker whose two trials are both still
        running and a trial on the other with at least two epochs to go."""
        dirs = trial_dirs(run_dir, "moved-")
        rows = {d: result_rows(d) for d in dirs}
        if len(dirs) < 4 or not all(rows.values()):
            return None
        for w in workers:
            mine = [d for d in dirs if rows[d][0]["node_id"] == w.node_id]
            others = [d for d in dirs if d not in mine and len(rows[d]) < 3]  # not near its end
            if len(mine) == 2 and all(len(rows[d]) < 4 for d in mine) and others:
                return w, mine, others[0], rows[others[0]]
        return None

    # Half a GPU each: two trials per worker node.
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        proc = subprocess.Popen(driver(exp, c.address, storage, "cluster", "--gpus-per-trial", "0.5",
                                       "--data-dir", str(absent), "--max-failures", "1"),
                                stdout=out, stderr=err)
    try:
        doomed, doomed_trials, victim, first = wait_for(
            moment, proc, "one epoch of every trial, a worker whose two trials are both still "
            "running and a running trial on the other")
        os.kill(first[-1]["pid"], signal.SIGKILL)
        c.remove_node(doomed)
        (trial,) = [t for t in prepare(load(exp))[0].trials()
                    if os.path.basename(victim).startswith(f"moved-conv6x0.25-seed{t['seed']}-")]
        reference = trained_here(trial)  # while the run recovers
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    return SimpleNamespace(run_dir=run_dir, storage=storage, absent=absent, rc=rc, victim=victim,
                           first=first, doomed=doomed, doomed_trials=doomed_trials,
                           survivor=next(w for w in workers if w is not doomed),
                           reference=reference, out=(folder / "out.txt").read_text(),
                           err=(folder / "err.txt").read_text())


def test_trial_killed_mid_epoch_resumes_with_the_same_metrics(cluster_run):
    first = cluster_run.first
    assert len(first) < 4  # it was killed while a later epoch was under way
    v_rows = once(result_rows(cluster_run.victim))
    assert [r["epoch"] for r in v_rows] == [1, 2, 3, 4]       # continued from the last checkpoint
    assert v_rows[len(first)]["pid"] != first[-1]["pid"]      # in a new process
    assert len(cluster_run.reference) == 4
    for a, b in zip(v_rows, cluster_run.reference):  # as if nothing had happened: the same trial
        assert {k: a.get(k) for k in METRICS} == {k: b.get(k) for k in METRICS}  # trained here


def test_node_without_data_fails_the_trial_with_a_clear_error(cluster_run):
    assert cluster_run.rc == 1  # the moved trials recovered; nodata could not
    assert f"CIFAR-10 not found in {cluster_run.absent}" in cluster_run.out  # the trial's error line
    err = cluster_run.err.strip().splitlines()[-1]
    assert err.startswith("error: 1 trial(s) did not finish") and "--resume" in err
    (d,) = trial_dirs(cluster_run.run_dir, "nodata-")
    with open(os.path.join(d, "error.txt")) as f:
        assert "DataError: CIFAR-10 not found" in f.read()


def test_worker_node_lost_mid_run(cluster_run):
    """Also the spread of a run: its trials on both workers (the head has no CPUs), every
    result and checkpoint in one storage folder, the storage visibility probe cleaned up."""
    survivor, doomed = cluster_run.survivor, cluster_run.doomed
    first_nodes = set()
    for d in trial_dirs(cluster_run.run_dir, "moved-"):
        r = result_rows(d)
        assert [x["epoch"] for x in once(r)] == [1, 2, 3, 4], (d, r)   # every epoch recorded
        assert "test_acc" in r[-1]
        assert glob.glob(os.path.join(d, "checkpoint_*", "trainer.pt"))
        first_nodes.add(r[0]["node_id"])
    assert first_nodes == {survivor.node_id, doomed.node_id}  # both workers, not the head
    assert not glob.glob(str(cluster_run.storage / ".iterand_tune_probe_*"))  # the probe is gone
    moved = 0
    for d in cluster_run.doomed_trials:  # continued on the surviving node, from the epoch after
        nodes = [x["node_id"] for x in result_rows(d)]  # its checkpoint
        k = nodes.index(survivor.node_id) if survivor.node_id in nodes else len(nodes)
        assert set(nodes[:k]) == {doomed.node_id} and set(nodes[k:]) <= {survivor.node_id}
        moved += k < len(nodes)
    assert moved >= 1  # at least one trial was cut off by the node loss and moved

