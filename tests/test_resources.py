"""Tests for iterand_tune.resources: GPU shares 1/k and the size rule, what one trial asks for,
refusals of requests no node can satisfy, of storage some node cannot see and of a cluster
address nothing answers at, and the worker setup a quiet run names to Ray."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest

from iterand_tune.cli import main
from iterand_tune.experiments import Experiment
from iterand_tune.resources import (GPU_SHARES, QUIET_WORKER, check_address, check_cluster,
                                    check_gpus, check_storage, describe_request, gpu_share,
                                    trial_request)
from iterand_tune.storage import RunError
from iterand_tune.trial_setup import quiet_worker

from helpers import write_digits


# ------------------------------------------------------------------ GPU shares

@pytest.mark.parametrize("gpus", [0.25, 0.5, 1, 2, 1 / 3, 0.125, 0, None])
def test_check_gpus_accepts_whole_gpus_and_shares_1_over_k(gpus):
    assert check_gpus(gpus, "x") == (None if gpus is None else pytest.approx(gpus))


@pytest.mark.parametrize("gpus, says", [
    (0.3, "must be 1/k"), (0.33, "must be 1/k"), (1.5, "whole number"), (-1, "needs a number >= 0"),
    (True, "needs a number"), (float("nan"), "needs a number"), ("1", "needs a number"),
])
def test_check_gpus_refuses_other_values_naming_what(gpus, says):
    with pytest.raises(ValueError) as info:
        check_gpus(gpus, "--gpus-per-trial")
    assert str(info.value).startswith("--gpus-per-trial = ") and says in str(info.value)


@pytest.mark.parametrize("model, share", [
    ("conv6x0.25", 0.25), ("conv6x0.5", 0.25), ("conv6x1.0", 0.25), ("resnet18x0.25", 0.25),
    ("resnet18x0.5", 0.25), ("resnet18x1.0", 0.5), ("conv6x2.0", 0.5), ("resnet18x2.0", 1.0),
    ("resnet34x2.0", 1.0),
])
def test_gpu_share(model, share):
    assert gpu_share(model, "cifar10") == share


def test_gpu_shares_pack_a_gpu_exactly():
    limits = [limit for limit, _ in GPU_SHARES]
    assert limits == sorted(limits) and limits[-1] == math.inf
    assert all(check_gpus(share, "share") == share for _, share in GPU_SHARES)


# ------------------------------------------------------------------ one trial's request

def _trial(**values) -> dict:
    return Experiment("e", values).trials()[0]


def test_trial_request_gpus():
    trial = _trial(model="conv6x1.0")
    assert trial_request(trial, have_gpus=False) == (1.0, 0.0)
    assert trial_request(trial, have_gpus=True) == (1.0, 0.25)          # by the model's size
    assert trial_request(trial, have_gpus=True, gpus=2) == (1.0, 2.0)   # the experiment's choice
    assert trial_request(trial, have_gpus=False, gpus=2) == (1.0, 0.0)  # no GPUs: CPUs
    # --gpus-per-trial wins, even without GPUs (the cluster check then refuses the run)
    assert trial_request(trial, have_gpus=True, gpus=2, forced_gpus=0.5) == (1.0, 0.5)
    assert trial_request(trial, have_gpus=False, forced_gpus=0.5) == (1.0, 0.5)
    assert trial_request(_trial(model="conv6x1.0", use_cuda=False), have_gpus=True) == (1.0, 0.0)


def test_trial_request_cpus():
    trial = _trial(model="resnet50", dataset="imagenet", num_workers=8)
    assert trial_request(trial, have_gpus=True) == (9.0, 1.0)  # 1 + the DataLoader's workers
    assert trial_request(trial, have_gpus=True, cpus=3) == (3.0, 1.0)
    assert trial_request(_trial(model="conv6x1.0"), have_gpus=True, cpus=0.5) == (0.5, 0.25)


def test_figure3_trials_ask_for_one_gpu_and_their_loader_workers():
    # ResNet50/101 too: one GPU with BatchNorm over two halves (bn_splits=2) stands for the paper's
    # two GPUs with half of the batch each.
    from iterand_tune.experiments import all_trials, load

    experiments = load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "figure3.py"))
    gpus = {e.name: e.gpus_per_trial for e in experiments}
    requests = {t["experiment"]: trial_request(t, have_gpus=True, gpus=gpus[t["experiment"]])
                for t in all_trials(experiments)}
    assert len(requests) == 8 and set(requests.values()) == {(9.0, 1.0)}  # 1 + 8 DataLoader workers
    forced = [trial_request(t, have_gpus=True, forced_gpus=2) for t in all_trials(experiments)]
    assert set(forced) == {(9.0, 2.0)}  # --gpus-per-trial 2 still splits a trial over two GPUs


def test_describe_request():
    assert describe_request(1, 0) == "1 CPU"
    assert describe_request(0.5, 0.25) == "0.5 CPU + 0.25 GPU"


# ------------------------------------------------------------------ the cluster

def test_check_cluster_refuses_impossible_request():
    nodes = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}]
    with pytest.raises(RunError) as info:
        check_cluster({"figure3_resnet50_sc_iterand (resnet50)": (9.0, 2.0)}, nodes)
    message = str(info.value)
    assert "figure3_resnet50_sc_iterand" in message and "asks for 9 CPU + 2 GPU" in message
    assert "2 node(s)" in message and "32 CPUs" in message and "2 GPUs" in message
    assert "\n" not in message
    with pytest.raises(RunError, match="no live nodes"):
        check_cluster({"e": (1.0, 0.0)}, [])


def test_check_cluster_accepts_satisfiable_requests():
    check_cluster({"a": (9.0, 2.0), "b": (1.0, 0.0)}, [{"CPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}])
    check_cluster({"a": (1.0, 0.25), "b": (1.0, 0.5), "c": (1.0, 1.0)}, [{"CPU": 4.0, "GPU": 1.0}])


def test_storage_some_node_cannot_see_is_refused(tmp_path):
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


def test_check_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert check_address(None) is None and check_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert check_address(None) == "local"
    with pytest.raises(RunError, match="is not HOST:PORT"):
        check_address("nowhere")
    with pytest.raises(RunError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        check_address("127.0.0.1:1")


@pytest.mark.parametrize("how", ["client", "env"])
def test_unreachable_cluster_is_one_line_before_anything_is_written(tmp_path, monkeypatch,
                                                                    capsys, how):
    exp = write_digits(str(tmp_path), {"tiny": {}})
    argv = [exp, "--storage-path", str(tmp_path / "r")]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if how == "client":
        argv += ["--address", "ray://127.0.0.1:1"]
    else:  # RAY_ADDRESS is honoured like --address
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: cannot reach a Ray cluster at ")
    assert "127.0.0.1:1" in err and "ray start --head" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a subprocess: the whole command line, as a user meets it
def test_unreachable_address_as_a_command_is_one_line(tmp_path):
    exp = write_digits(str(tmp_path), {"tiny": {}})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "iterand_tune", exp, "--address", "127.0.0.1:1",
                           "--storage-path", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot reach a Ray cluster at 127.0.0.1:1")
    assert "ray start --head" in lines[0]
    assert not (tmp_path / "r").exists()


def test_a_quiet_run_names_the_worker_setup_that_exists():
    module, _, name = QUIET_WORKER.rpartition(".")
    assert getattr(importlib.import_module(module), name) is quiet_worker
