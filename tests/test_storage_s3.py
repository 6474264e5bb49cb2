"""S3 storage for real, and a driver killed and resumed: a local S3-compatible server (moto's,
on 127.0.0.1), a run whose --storage-path is an s3:// URI with a query string (endpoint_override,
scheme), its driver (and the Ray it started) killed with SIGKILL once one trial has finished
and another is part-way, resumed from the same URI on the session's Ray, whose processes hold
the dummy credentials (conftest): no epoch missing, the finished trials not run again. Then
read back with `python -m analysis table` from that URI."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from analysis.cli import main as analysis_main
from analysis.results import load_history, load_results
from iterand_tune.storage import exists, is_search_run, join_path, newest_run, open_storage

from helpers import AWS, EDGEPOPUP, ITERAND, NO_AWS, resume, trial_states, wait_for, write_digits

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 3


@pytest.fixture
def s3_storage(monkeypatch):
    """`s3://bucket/runs?endpoint_override=127.0.0.1:PORT&scheme=http` on a moto server."""
    moto_server = pytest.importorskip("moto.server")

    for key, value in AWS.items():  # no credentials or settings of this machine's user
        monkeypatch.setenv(key, value)
    for key in (*NO_AWS, "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        query = f"endpoint_override={host}:{port}&scheme=http"
        fs, _ = pafs.FileSystem.from_uri(f"s3://bucket?{query}&allow_bucket_creation=true")
        fs.create_dir("bucket")
        yield f"s3://bucket/runs?{query}"
    finally:
        server.stop()


def result_texts(run: str) -> dict[str, str]:
    """Trial folder name -> the text of its result.json, read from the run's URI."""
    fs, root = open_storage(run)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and "-seed" in info.base_name:
            try:
                with fs.open_input_stream(f"{info.path}/result.json") as f:
                    out[info.base_name] = f.read().decode()
            except FileNotFoundError:
                pass
    return out


def test_s3_run_killed_resumed_and_read_back(s3_storage, ray_cluster, tmp_path, capsys):
    exp = write_digits(str(tmp_path), {"s3_edgepopup": EDGEPOPUP, "s3_iterand": ITERAND},
                       grid={"seed": [1, 2]}, epochs=EPOCHS, batch_size=32,
                       max_train_dataset_size=64)
    name = "tiny-20260101-000000"
    run = join_path(s3_storage, name)
    assert run == s3_storage.replace("/runs?", f"/runs/{name}?")
    argv = [exp, "--storage-path", s3_storage, "--name", name, "--cpus-per-trial", "0.5",
            "--max-concurrent", "2"]

    def one_done_one_midway():
        states = trial_states(run)
        if "TERMINATED" in [s for s, _ in states.values()] and any(
                s != "TERMINATED" and 1 <= e < EPOCHS for s, e in states.values()):
            return states

    # The driver starts a Ray of its own (as a run without --address does), in its own process
    # group: SIGKILL takes the driver and that Ray down together, as a lost machine would.
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "iterand_tune", *argv, "--address", "local"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        states = wait_for(one_done_one_midway, proc, "one finished trial and one part-way",
                          timeout=240, show=lambda: (tmp_path / "driver.log").read_text()[-2000:])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    done = [tid for tid, (s, _) in states.items() if s == "TERMINATED"]
    finished = {d: text for d, text in result_texts(run).items() if d.endswith(tuple(done))}
    assert len(finished) == len(done) >= 1

    # The CLI's checks read the URI: the run exists, is not a search, is FILE's newest run.
    assert exists(run) and not is_search_run(run)
    assert newest_run(s3_storage, "tiny-") == name

    # Resumed on the session's Ray, as a new driver on a cluster that is still up.
    assert f"resuming {name}" in resume([*argv, "--address", ray_cluster])
    texts = result_texts(run)
    reports: dict[str, list[dict]] = {}  # trial id -> its reports in time order
    folders = {d: [json.loads(line) for line in text.splitlines()] for d, text in texts.items()}
    for rows in sorted((r for r in folders.values() if r), key=lambda r: r[0]["timestamp"]):
        # Ray Tune 2.60 can continue a trial that was running in a second folder, NAME_xxxx
        # (docs/cluster.md); `python -m analysis` reads the two as one trial.
        reports.setdefault(rows[0]["trial_id"], []).extend(rows)
    assert sorted(reports) == sorted(states)
    for tid, rows in reports.items():
        epochs = [r["epoch"] for r in rows]
        # No epoch missing. One reported after the last checkpoint the killed driver recorded
        # is trained again from that checkpoint, and reported twice.
        assert set(epochs) == set(range(1, EPOCHS + 1)) and epochs == sorted(epochs), (tid, epochs)
        assert "test_acc" in rows[-1]
    for d, text in finished.items():  # finished trials were not run again
        assert texts[d] == text

    assert analysis_main(["table", run, "--rows", "trials"]) == 0
    out = capsys.readouterr().out
    assert "4 trials: 4 finished" in out, out
    trials = load_results(run)
    assert list(trials["status"]) == ["finished"] * 4
    assert trials["test_acc"].notna().all()
    for _, rows in load_history(run).groupby("trial_id"):
        assert list(rows["epoch"]) == list(range(1, EPOCHS + 1))  # each epoch once, its last report
