"""Experiment tracking: --mlflow and --wandb through Ray Tune's logger callbacks, and the
TensorBoard files Ray Tune writes anyway. One small Ray run (two trials on digits) feeds the
MLflow, W&B and TensorBoard checks; a resume is played on the callbacks' hooks with stand-in
trials (into real local MLflow stores and offline W&B runs); the one-line refusals and the
helpers need no Ray."""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import struct
from types import SimpleNamespace

import pytest

import iterand_tune.tracking as tracking
from iterand_tune.cli import main
from iterand_tune.storage import TRIAL_KEY, RunError
from iterand_tune.tracking import (MLFLOW_DEFAULT, Tracking, check_installed, mlflow_uri,
                                   trial_params, trial_tags, wandb_mode, wandb_offline_runs,
                                   wandb_run_id, wandb_sync_command)

from helpers import EDGEPOPUP, ITERAND, trial_dirs, trial_states, write_digits

EPOCHS = 2
RUN = "tracked"
PROJECT = "iterand-test"


# ------------------------------------------------------------------ without Ray

@pytest.mark.parametrize("flag, module", [("--mlflow", "mlflow"), ("--wandb", "wandb")])
def test_a_missing_package_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys,
                                                               flag, module):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    monkeypatch.setattr("iterand_tune.cli._tune", lambda: pytest.fail("Ray Tune was started"))
    exp = write_digits(str(tmp_path), {"tiny": EDGEPOPUP})
    argv = [exp, "--storage-path", str(tmp_path / "r"), flag, *([PROJECT] if flag == "--wandb" else [])]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {flag} needs the {module} package: pip install 'iterand_tune[{module}]'\n"
    assert out == "" and not (tmp_path / "r").exists()


def test_resume_keeps_the_tracking_a_run_began_with(tmp_path, capsys):
    exp = write_digits(str(tmp_path), {"tiny": EDGEPOPUP})
    (tmp_path / "r" / "x").mkdir(parents=True)
    (tmp_path / "r" / "x" / "run.json").write_text('{"kind": "grid", "flags": {"mlflow": null}}')
    argv = [exp, "--storage-path", str(tmp_path / "r"), "--resume", "--name", "x"]
    assert main([*argv, "--mlflow", "--wandb", PROJECT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: --mlflow sqlite:///mlflow.db contradicts a run started "
                          "without --mlflow (its run.json)")


def test_mlflow_uri_makes_folders_file_stores_and_sqlite_files_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mlflow_uri(MLFLOW_DEFAULT) == f"sqlite:///{tmp_path}/mlflow.db"  # sqlite:////tmp/...
    assert mlflow_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path}/runs/x.db"
    assert mlflow_uri("mlruns") == f"file://{tmp_path}/mlruns"
    for uri in ("http://127.0.0.1:5000", "sqlite:////x/mlflow.db", "sqlite:///:memory:",
                "databricks", "file:///x/mlruns", "postgresql://u@db/mlflow"):
        assert mlflow_uri(uri) == uri
    assert Tracking().callbacks("run") == []  # nothing asked: no callback, no import


def test_a_database_store_without_sqlalchemy_is_one_line(tmp_path, monkeypatch):
    """mlflow-skinny leaves out SQLAlchemy and Alembic, which MLflow's database stores (the
    default sqlite:///mlflow.db among them) need; a file store or a server does not."""
    monkeypatch.chdir(tmp_path)
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: (
        None if name in ("sqlalchemy", "alembic") else real(name, *a)))
    for value in (MLFLOW_DEFAULT, "sqlite:///runs.db", "postgresql+psycopg2://u@db/mlflow"):
        with pytest.raises(RunError) as err:
            check_installed(["--mlflow"], mlflow=value)
        assert str(err.value) == (f"--mlflow {mlflow_uri(value)} (a database store) needs "
                                  f"sqlalchemy and alembic: pip install 'iterand_tune[mlflow]'; "
                                  f"or give --mlflow a folder (a file store) or a server's "
                                  f"http:// URI")
    for value in ("mlruns", "http://127.0.0.1:5000", "databricks"):
        check_installed(["--mlflow", "--wandb"], mlflow=value)
    check_installed(["--wandb"], mlflow=None)


def test_wandb_is_offline_without_an_api_key(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() == "offline"  # no netrc file
    netrc.write_text("machine example.com login user password secret\n")
    assert wandb_mode() == "offline"
    netrc.write_text("machine api.wandb.ai login user password k3y\n")  # `wandb login`
    assert wandb_mode() == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the user's choice wins
    assert wandb_mode() == "offline"


def test_what_a_trial_logs():
    config = dict(experiment="figure2_conv6_ku_iterand", model="conv6x0.5", seed=2, lr=0.1,
                  train_mode="score_only", rerand_mode="bernoulli", rerand_lambda=0.1,
                  init_mode="kaiming_uniform", lr_milestones=[50, 75])
    params = trial_params(config)
    assert "experiment" not in params and params["lr"] == 0.1 and params["lr_milestones"] == [50, 75]
    assert trial_tags(config) == dict(experiment="figure2_conv6_ku_iterand", network="conv6",
                                      width="0.5", model="conv6x0.5", method="iterand",
                                      init="ku", seed="2")


def test_wandb_sync_command_globs_many_runs():
    key = wandb_run_id("run-20260101-000000", "")  # the run's key and "_"
    folders = [f"/w/wandb/offline-run-20260101_000000-{key}abcde_{i:05d}" for i in range(5)]
    assert wandb_sync_command(folders[:2]) == "wandb sync " + " ".join(folders[:2])
    assert wandb_sync_command(folders) == f"wandb sync /w/wandb/offline-run-*-{key}*"
    # Runs started before the key: a grid's trial ids share a prefix; a search's do not.
    older = [f"/w/wandb/offline-run-20260101_000000-abcde_{i:05d}" for i in range(3)]
    assert wandb_sync_command([*older, "/w/wandb/offline-run-20260101_000000-1a2b3c4d"]) == (
        "wandb sync /w/wandb/offline-run-*-abcde_* /w/wandb/offline-run-20260101_000000-1a2b3c4d")


def test_wandb_run_ids_differ_between_runs_and_stay_over_a_resume():
    # Ray Tune's grid trial ids of two runs can be equal (5 hex digits of the clock).
    assert wandb_run_id("a-20260101-000000", "abcde_00000") != wandb_run_id("a-20260101-000712",
                                                                            "abcde_00000")
    assert wandb_run_id("a", "abcde_00000") == wandb_run_id("a", "abcde_00000")
    assert wandb_run_id("a", "abcde_00000").endswith("_abcde_00000")


# ------------------------------------------------------------------ a resume, on the hooks

class StandInTrial:
    """What Ray's logger callbacks read of a Ray Tune Trial. A resumed run's trials are new
    objects with the ids they had: Ray Tune restores them from the run's experiment state."""

    def __init__(self, trial_id: str, run_dir, experiment: str = "tiny_iterand") -> None:
        self.trial_id, self.experiment_dir_name = trial_id, os.path.basename(run_dir)
        self.config = {TRIAL_KEY: dict(ITERAND, experiment=experiment, model="conv6x0.25",
                                       init_mode="kaiming_uniform", seed=1, lr=0.1)}
        self.name = f"{experiment}-conv6x0.25-seed1-{trial_id}"
        self.local_path = os.path.join(run_dir, self.name)
        os.makedirs(self.local_path, exist_ok=True)

    def __str__(self) -> str:
        return self.name


def _report(callback, trial, epochs, value: float) -> None:
    """Ray Tune's result for each epoch: val_acc `value` + the epoch."""
    for epoch in epochs:
        result = dict(epoch=epoch, val_acc=value + epoch, train_loss=1.0 / epoch,
                      training_iteration=epoch, time_total_s=float(epoch), done=False)
        callback.on_trial_result(iteration=epoch, trials=[trial], trial=trial, result=result)


def _resumable(callback):
    """What Ray Tune does with the run's callbacks: pickles them into tuner.pkl before the run
    starts; a resumed run unpickles them afresh."""
    import ray.cloudpickle

    data = ray.cloudpickle.dumps(callback)
    return lambda: ray.cloudpickle.loads(data)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "folder"])
def test_a_resumed_trial_logs_each_epoch_once_into_its_mlflow_run(tmp_path, monkeypatch, store):
    """A run's trial A reports epochs 1-3 and trial B finishes, then Ctrl-C stops the run;
    the resumed run restarts A from its checkpoint after epoch 1 (epochs 2-4) and starts C.
    One MLflow run per trial, epochs 1-4 in A's once each (the values logged first), B's run
    untouched."""
    pytest.importorskip("mlflow")
    if store == "sqlite":
        _database_store_or_skip()
    from mlflow.tracking import MlflowClient

    for key in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards, as is what setup sets
    uri = mlflow_uri(f"sqlite:///{tmp_path}/mlflow.db" if store == "sqlite" else
                     str(tmp_path / "mlruns"))
    run_dir = tmp_path / "results" / RUN
    restore = _resumable(Tracking(mlflow=uri).callbacks(RUN)[0])
    a, b = StandInTrial("abcde_00000", run_dir), StandInTrial("abcde_00001", run_dir)

    first = restore()
    first.setup()
    # MLflow 3's file store wants MLFLOW_ALLOW_FILE_STORE: set for a folder, not for a database.
    assert os.environ.get("MLFLOW_ALLOW_FILE_STORE") == ("true" if store == "folder" else None)
    for trial in (a, b):
        first.on_trial_start(iteration=0, trials=[a, b], trial=trial)
    _report(first, a, [1, 2, 3], 10.0)
    _report(first, b, [1, 2], 10.0)
    first.on_trial_complete(iteration=3, trials=[a, b], trial=b)
    first.on_experiment_end(trials=[a, b])  # Ctrl-C: Ray Tune stops A without ending it
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(RUN)
    assert sorted(r.info.status for r in client.search_runs([experiment.experiment_id])) == [
        "FINISHED", "KILLED"]

    histories = []
    real = MlflowClient.get_metric_history
    monkeypatch.setattr(MlflowClient, "get_metric_history",
                        lambda self, run_id, key: histories.append(key) or real(self, run_id, key))
    a, b, c = (StandInTrial(f"abcde_{i:05d}", run_dir) for i in range(3))
    resumed = restore()
    resumed.setup()
    for trial in (a, c):  # B finished: Ray Tune does not start it again
        resumed.on_trial_start(iteration=0, trials=[a, b, c], trial=trial)
    _report(resumed, a, [2, 3, 4], 20.0)
    _report(resumed, c, [1], 20.0)
    # A retry in this driver (--max-failures): Ray Tune ends nothing, starts A again from its
    # last checkpoint, here after epoch 3.
    resumed.on_trial_recover(iteration=4, trials=[a, b, c], trial=a)
    resumed.on_trial_start(iteration=4, trials=[a, b, c], trial=a)
    _report(resumed, a, [4], 30.0)
    for trial in (a, c):
        resumed.on_trial_complete(iteration=4, trials=[a, b, c], trial=trial)
    assert len(histories) == 1  # one look at A's run, when it started again; none per epoch

    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 3 and set(runs) == {a.trial_id, b.trial_id, c.trial_id}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    history = {key: sorted((m.step, m.value) for m in
                           client.get_metric_history(runs[a.trial_id].info.run_id, key))
               for key in ("val_acc", "epoch", "train_loss", "time_total_s")}
    assert history["val_acc"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0)]
    for key, points in history.items():
        assert [step for step, _ in points] == [1, 2, 3, 4], key
    assert runs[a.trial_id].data.params["rerand_mode"] == "bernoulli"
    assert [m.step for m in client.get_metric_history(runs[b.trial_id].info.run_id,
                                                      "val_acc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(runs[c.trial_id].info.run_id,
                                                      "val_acc")] == [1]


@pytest.mark.slow
def test_a_resumed_trial_logs_into_its_wandb_run_offline(ray_cluster, tmp_path, monkeypatch):
    """Offline: trial A (epochs 1-3) and B in the first driver, stopped by Ctrl-C; A (epochs
    2-4) and C in the resumed one. Every W&B run is finished, none left waiting; A's two
    offline folders carry one W&B run id (W&B writes a folder per start; `wandb sync` uploads
    the folders of one id into that run), and the note after the run lists all four."""
    import ray

    pytest.importorskip("wandb")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no API key: offline
    for key in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{key}_DIR", str(tmp_path / f"wandb-{key.lower()}"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # what setup sets goes afterwards
    run_dir = tmp_path / "results" / RUN
    restore = _resumable(Tracking(wandb=PROJECT, wandb_dir=str(tmp_path)).callbacks(RUN)[0])
    a, b, c = (StandInTrial(f"abcde_{i:05d}", run_dir) for i in range(3))
    # The run's experiment state, where the note after the run finds its trial ids.
    with open(run_dir / "experiment_state-2026-01-01_00-00-00.json", "w") as f:
        json.dump({"trial_data": [[json.dumps({"trial_id": t.trial_id}), "{}"]
                                  for t in (a, b, c)]}, f)

    first = restore()
    first.setup()
    for trial in (a, b):
        first.on_trial_start(iteration=0, trials=[a, b], trial=trial)
    _report(first, a, [1, 2, 3], 10.0)
    _report(first, b, [1], 10.0)
    first.on_trial_complete(iteration=3, trials=[a, b], trial=b)
    # Ctrl-C: Ray Tune stops A without ending it. Ray's logger would wait for A's logging
    # actor for its upload timeout (30 minutes) and then kill it; now it finishes A's W&B run.
    running = first._trial_logging_futures[a]  # Ray's: A's logging actor's run()
    first.on_experiment_end(trials=[a, b])
    assert ray.get(running) is None  # it returned after wandb.finish; killed, it would raise

    a, b, c = (StandInTrial(t.trial_id, run_dir) for t in (a, b, c))
    resumed = restore()
    resumed.setup()
    for trial in (a, c):
        resumed.on_trial_start(iteration=0, trials=[a, b, c], trial=trial)
    _report(resumed, a, [2, 3, 4], 20.0)
    _report(resumed, c, [1], 20.0)
    for trial in (a, c):
        resumed.on_trial_complete(iteration=4, trials=[a, b, c], trial=trial)
    resumed.on_experiment_end(trials=[a, b, c])

    folders = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    ids = [f.rsplit("-", 1)[1] for f in folders]
    assert sorted(ids) == sorted(wandb_run_id(RUN, t.trial_id) for t in (a, a, b, c)), ids
    for folder in folders:
        assert glob.glob(os.path.join(folder, "run-*.wandb")), os.listdir(folder)
    assert wandb_offline_runs(str(run_dir), str(tmp_path)) == folders
    command = wandb_sync_command(folders)  # four folders: a glob for the run's key
    assert command == f"wandb sync {tmp_path}/wandb/offline-run-*-{wandb_run_id(RUN, '')}*"
    assert sorted(glob.glob(command.split(" ", 2)[2])) == folders


# ------------------------------------------------------------------ one tracked Ray run

@pytest.fixture(scope="module")
def tracked_run(ray_cluster, tmp_path_factory):
    """Two trials (edge-popup and IteRand, 2 epochs each, one after the other in one trial
    process) run through the CLI in this process with --mlflow (its default store) and --wandb
    PROJECT, without a W&B API key: its folder (`run_dir`), the MLflow store (`mlflow_uri`),
    the working folder and W&B root (`root`), stdout, and MLFLOW_ALLOW_FILE_STORE as the run
    left it (`allow_file_store`). The environment and the working folder are restored."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    _database_store_or_skip()
    root = tmp_path_factory.mktemp("tracking")
    exp = write_digits(str(root), {"tiny_edgepopup": EDGEPOPUP, "tiny_iterand": ITERAND},
                       epochs=EPOCHS, batch_size=32, max_train_dataset_size=64)
    argv = [exp, "--address", ray_cluster, "--storage-path", "results", "--name", RUN,
            "--mlflow", "--wandb", PROJECT, "--max-concurrent", "1"]
    saved, out, here = dict(os.environ), io.StringIO(), os.getcwd()
    try:
        for key in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_"))]:
            del os.environ[key]
        os.environ.update(NETRC=str(root / "no-netrc"),  # no `wandb login` either: offline
                          WANDB_CONFIG_DIR=str(root / "wandb-config"),
                          WANDB_CACHE_DIR=str(root / "wandb-cache"),
                          WANDB_DATA_DIR=str(root / "wandb-data"), WANDB_SILENT="true")
        os.chdir(root)  # the relative --storage-path and ./mlflow.db are made absolute here
        with contextlib.redirect_stdout(out):
            rc = main(argv)
        allow_file_store = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    finally:
        os.chdir(here)
        os.environ.clear()  # whatever the run or the tracking libraries set goes too
        os.environ.update(saved)
    assert rc == 0, out.getvalue()[-3000:]
    return SimpleNamespace(run_dir=root / "results" / RUN, mlflow_uri=f"sqlite:///{root}/mlflow.db",
                           root=root, stdout=out.getvalue(), allow_file_store=allow_file_store)


def _database_store_or_skip() -> None:
    """MLflow's SQLite store needs SQLAlchemy and Alembic (setup.cfg's mlflow and test extras)."""
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_gets_a_run_per_trial_with_params_metrics_and_tags(tracked_run):
    run_dir = tracked_run.run_dir
    from mlflow.tracking import MlflowClient

    # --mlflow alone: a SQLite database in the working folder, no file store asked for, and no
    # ./mlruns (MLflow's artifact root for it) while nothing logs an artifact.
    assert os.path.isfile(tracked_run.root / "mlflow.db")
    assert tracked_run.allow_file_store is None and not (tracked_run.root / "mlruns").exists()
    client = MlflowClient(tracking_uri=tracked_run.mlflow_uri)
    experiment = client.get_experiment_by_name(RUN)  # the Ray Tune run is the MLflow experiment
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    dirs = {os.path.basename(d): d for d in trial_dirs(run_dir)}
    assert sorted(runs) == sorted(dirs) and len(runs) == 2  # named after the trials
    for name, r in runs.items():
        with open(os.path.join(dirs[name], "params.json")) as f:
            trial = json.load(f)["trial"]
        assert r.info.status == "FINISHED"
        params = r.data.params
        assert "experiment" not in params and not any("/" in k for k in params)  # plain names
        for key in ("lr", "model", "seed", "epochs", "conv_sparsity", "rerand_mode"):
            assert params[key] == str(trial[key]), key
        tags = r.data.tags
        assert tags["experiment"] == trial["experiment"]
        assert (tags["model"], tags["init"], tags["seed"]) == ("conv6x0.25", "ku", str(trial["seed"]))
        assert tags["method"] == trial["experiment"].split("_")[1]  # tiny_edgepopup, tiny_iterand
        assert tags["trial_id"] == name.rsplit("-", 1)[1]
        history = client.get_metric_history(r.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # every epoch
        assert [m.step for m in client.get_metric_history(r.info.run_id, "test_acc")] == [EPOCHS]
        assert "node_id" not in r.data.metrics and "config/trial/lr" not in r.data.metrics


@pytest.mark.ray
@pytest.mark.slow
def test_wandb_saves_one_offline_run_per_trial(tracked_run):
    run_dir, root = tracked_run.run_dir, tracked_run.root
    ids = sorted(wandb_run_id(RUN, t) for t in trial_states(run_dir))
    offline = sorted(glob.glob(str(root / "wandb" / "offline-run-*")))
    assert sorted(p.rsplit("-", 1)[1] for p in offline) == ids  # the run's key and trial id
    for folder in offline:
        assert glob.glob(os.path.join(folder, "run-*.wandb")), os.listdir(folder)
    line = next(l for l in tracked_run.stdout.splitlines() if "wandb sync" in l)
    assert line.endswith("wandb sync " + " ".join(offline))


def _event_scalars(path: str) -> dict[str, list[float]]:
    """tag -> values of a TensorBoard event file (TFRecord framing; tensorboardX's protobufs)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[float]] = {}
    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = Event.FromString(data[at + 12:at + 12 + length])  # after length and its CRC
        at += 12 + length + 4                                     # the record and its CRC
        for value in event.summary.value:
            out.setdefault(value.tag, []).append(value.simple_value)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_tensorboard_event_files_hold_val_acc(tracked_run):
    for d in trial_dirs(tracked_run.run_dir):
        (events,) = glob.glob(os.path.join(d, "events.out.tfevents.*"))
        scalars = _event_scalars(events)
        assert len(scalars["ray/tune/val_acc"]) == EPOCHS, sorted(scalars)


@pytest.mark.ray
@pytest.mark.slow
def test_the_run_keeps_its_tracking_callbacks_for_a_resume(tracked_run):
    """Ray Tune pickles the callbacks into tuner.pkl; ours by name (built on first use, here by
    the unpickling), so a resume restores them."""
    import ray.cloudpickle

    with open(tracked_run.run_dir / "tuner.pkl", "rb") as f:
        callbacks = ray.cloudpickle.load(f)["_run_config"].callbacks
    kinds = {type(c) for c in callbacks}
    assert {tracking.MLflowCallback, tracking.WandbCallback} <= kinds
