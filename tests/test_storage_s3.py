"""S3 storage for real, and a driver killed and resumed: a local S3-compatible server (moto's,
on 127.0.0.1), a run whose --storage-path is an s3:// URI with a query string
(endpoint_override, scheme), its driver and the Ray instance it started killed with SIGKILL
part-way (a trial finished, another running), resumed from the same URI to the end without
training a finished trial again, and read back with `python -m analysis table` from that URI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from analysis.cli import main as analysis_main
from analysis.results import load_history, load_results
from iterand_tune.runs import read_marker, read_run
from iterand_tune.storage import exists, join_path, list_dir, newest_run

from helpers import EDGEPOPUP, ITERAND, trial_states, wait_for, write_digits

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 4


def test_s3_run_killed_resumed_and_read_back(s3_storage, tmp_path, capsys):
    """Four trials, two at a time; the driver and its Ray are killed once a trial has finished
    and another is part-way; the resumed run finishes the rest and leaves the finished ones
    alone."""
    exp = write_digits(str(tmp_path), {"s3_edgepopup": EDGEPOPUP, "s3_iterand": ITERAND},
                       grid={"seed": [1, 2]}, epochs=EPOCHS, debug_max_iters=8)
    name = "tiny-20260101-000000"
    run = join_path(s3_storage, name)
    assert run == s3_storage.replace("/runs?", f"/runs/{name}?")
    # The driver starts a Ray of its own (`--address local`, not one `ray start` left running
    # here), whose workers inherit the credentials of its environment; two trials at a time.
    cmd = [sys.executable, "-m", "iterand_tune", exp, "--address", "local",
           "--storage-path", s3_storage, "--name", name, "--max-concurrent", "2"]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def one_done_one_midway():
        states = trial_states(run)
        if "TERMINATED" in [s for s, _ in states.values()] and any(
                s != "TERMINATED" and 1 <= e < EPOCHS for s, e in states.values()):
            return states
        return None

    try:
        states = wait_for(one_done_one_midway, proc, "one finished trial and one part-way",
                          timeout=240, show=lambda: (tmp_path / "driver.log").read_text()[-2000:])
        # When each finished trial's epochs ended, as its checkpoints in storage hold them (its
        # result.json may still be on its way: Ray Tune uploads it after the state).
        ended = {tid for tid, (s, _) in states.items() if s == "TERMINATED"}
        finished = {t.trial_id: [r["epoch_end_time"] for r in t.rows]
                    for t in read_run(run).started if t.trial_id in ended}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
        log.close()
    assert finished and all(len(times) == EPOCHS for times in finished.values())

    # The CLI's checks read the URI: the run exists, is a grid run, is FILE's newest run.
    assert exists(run) and read_marker(run)["kind"] == "grid"
    assert newest_run(s3_storage, "tiny-") == name

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"resuming {name}" in done.stdout

    assert analysis_main(["table", run, "--rows", "trials"]) == 0
    out = capsys.readouterr().out
    assert "4 trials: 4 finished" in out, out
    # One folder per grid point; every epoch once.
    assert len([d for d in list_dir(run) if "-seed" in d and not d.startswith(".")]) == 4
    trials = load_results(run)
    assert len(trials) == 4 and (trials["status"] == "finished").all()
    assert trials["test_acc"].notna().all()
    for tid, rows in load_history(run).groupby("trial_id"):  # every epoch once
        assert list(rows["epoch"]) == list(range(1, EPOCHS + 1)), (tid, list(rows["epoch"]))
    again = {t.trial_id: [r["epoch_end_time"] for r in t.rows] for t in read_run(run).started}
    for tid, times in finished.items():  # finished trials were not run again
        assert again[tid] == times, tid
