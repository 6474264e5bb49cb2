"""Runs interrupted and resumed for real, on the session's Ray: a grid and a search, one and two
trials at a time, the driver killed (SIGKILL) or stopped (SIGINT) at several moments (before the
first report, mid-run, after the last trial ended, while a checkpoint is being written); and on
the tests' S3 server mid-run and while a checkpoint is uploaded, each driver with a Ray of its
own that SIGKILL takes down with it. Every
resume must end by itself within a bound, leave one folder per grid point (a search: its full
sample count per point), and print the table an uninterrupted run prints (a search with one trial
at a time: the same samples and the same best configurations).

The loops are marked `resume_loop` (`make test-resume`); `make test` runs the cases marked here
without it: a run whose every experiment state is unreadable, rebuilt from its trial folders.
The other single cases of `make test` are in test_search.py (a search killed), test_tune_interrupts.py
(Ctrl-C) and test_storage_s3.py (killed on S3)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from iterand_tune.cli import main
from iterand_tune.runs import read_run
from iterand_tune.storage import exists, is_uri, join_path, list_dir, open_storage, read_json

from helpers import ITERAND, trial_states, wait_for, write_digits

EPOCHS = 3
MOMENTS = ("before_first_report", "mid_run", "after_last_trial", "during_checkpoint")


def table_of(out: str) -> str:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"(experiment|point)\s+(model|method)", line))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def run_here(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loops")
    grid = write_digits(str(folder), {"g_edgepopup": {}, "g_iterand": ITERAND},
                        grid={"seed": [1, 2]}, epochs=EPOCHS, debug_max_iters=6,
                        debug_max_eval_iters=1, file="grid.py")
    search = write_digits(str(folder), {"s_good": {}, "s_bad": {}}, grid={"seed": [1]},
                          search={"s_good": {"lr": "LogUniform(0.05, 0.5)"},
                                  "s_bad": {"lr": "LogUniform(1e-7, 1e-6)"}},
                          epochs=EPOCHS, debug_max_iters=6, debug_max_eval_iters=1,
                          file="search.py")
    return SimpleNamespace(folder=folder, grid=grid, search=search)


def argv_of(files, kind, storage, name, ray_cluster, mc):
    common = ["--address", ray_cluster, "--storage-path", str(storage), "--name", name,
              "--cpus-per-trial", "0.5", "--max-concurrent", str(mc)]
    if kind == "grid":
        return [files.grid, *common]
    return [files.search, "--search", "--num-samples", "3", "--grace-period", "1",
            "--reduction-factor", "2", "--search-seed", "5", *common]


@pytest.fixture(scope="module")
def references(files, ray_cluster):
    """The uninterrupted runs, one per (kind, max-concurrent), made once when first needed."""
    made = {}

    def get(kind, mc):
        if (kind, mc) not in made:
            storage = files.folder / "reference"
            rc, out, err = run_here(argv_of(files, kind, storage, f"{kind}{mc}", ray_cluster, mc))
            assert rc == 0, out + err
            made[kind, mc] = SimpleNamespace(out=out, path=str(storage / f"{kind}{mc}"))
        return made[kind, mc]

    return get


def reached(moment, run_dir, total):
    """Whether the run at `run_dir` (a folder or an s3:// URI) has reached the moment to be
    interrupted at."""
    if moment == "before_first_report":
        return exists(join_path(run_dir, "run.json"))
    if not exists(run_dir):
        return False
    states = trial_states(run_dir)
    ended = [s for s, _ in states.values() if s in ("TERMINATED", "ERROR")]
    if moment == "mid_run":
        return ended and any(s not in ("TERMINATED", "ERROR") and e >= 1
                             for s, e in states.values())
    if moment == "after_last_trial":
        return len(ended) >= total
    # during_checkpoint: a worker has written a trial's checkpoint that the saved state does not
    # record yet (checkpoint_00000N holds epoch N + 1)
    known = {t: e for t, (_, e) in states.items()}
    for d in list_dir(run_dir):
        tid = d.rsplit("-", 1)[-1]
        if tid in known:
            numbers = [int(c.rsplit("_", 1)[-1]) for c in list_dir(join_path(run_dir, d))
                       if c.startswith("checkpoint_")]
            if numbers and max(numbers) + 1 > known[tid]:
                return True
    return False


def interrupt(argv, run_dir, moment, how, total, own_ray=False):
    """Start the run, and interrupt it with `how` at `moment`. `own_ray`: the driver starts a Ray
    of its own (`--address local`), and SIGKILL kills it with the driver (a machine gone)."""
    proc = subprocess.Popen([sys.executable, "-m", "iterand_tune", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=own_ray)

    def stop(signum):
        if own_ray and signum == signal.SIGKILL:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)

    try:
        wait_for(lambda: reached(moment, run_dir, total), proc, moment, timeout=240,
                 every=0.2 if is_uri(run_dir) else 0.1)
    except (AssertionError, pytest.fail.Exception):
        if proc.poll() is not None and moment in ("after_last_trial", "during_checkpoint"):
            print(f"the run ended before {moment}")  # pytest -rP shows it
            return proc.communicate()[0]  # it ended before the moment came: resume must still work
        raise
    finally:
        if proc.poll() is None:
            stop(how)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                stop(signal.SIGKILL)
                proc.wait()
        if own_ray:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray outlived the driver
    return proc.communicate()[0]


def check_resumed(kind, mc, run_dir, out, reference):
    run = read_run(str(run_dir))
    assert not run.skipped, run.notes()
    assert all(t.ended for t in run.trials), [(t.slot, t.status) for t in run.trials]
    folders = [d for d in list_dir(str(run_dir)) if "-seed" in d and not d.startswith(".")]
    if kind == "grid":
        assert sorted(t.slot for t in run.trials) == [("grid", i) for i in range(4)]
        assert len(folders) == 4, folders  # exactly one folder per grid point
        assert table_of(out) == table_of(reference.out)
    else:
        slots = sorted(t.slot for t in run.trials)
        assert slots == [("search", p, k) for p in ("s_bad", "s_good") for k in range(3)]
        assert len(folders) == 6, folders
        if mc == 1:  # the order of results is fixed: the same samples, the same best configs
            ref = {t.slot: t.config["lr"] for t in read_run(reference.path).trials}
            assert {t.slot: t.config["lr"] for t in run.trials} == ref
            def best(folder):  # trial ids are drawn afresh by every run: not compared
                fs, root = open_storage(join_path(str(folder), "best_configs.json"))
                return [{k: v for k, v in row.items() if k != "trial_id"} for row in read_json(fs, root)]

            assert best(run_dir) == best(reference.path)
            assert table_of(out) == table_of(reference.out)  # the search's table, as printed
    for t in run.trials:  # every epoch once, in order
        assert [r["epoch"] for r in t.rows] == list(range(1, len(t.rows) + 1)), (t.slot, t.rows)


@pytest.mark.resume_loop
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill", "int"])
@pytest.mark.parametrize("mc", [1, 2])
@pytest.mark.parametrize("kind", ["grid", "search"])
def test_interrupted_and_resumed(files, references, ray_cluster, tmp_path, kind, mc, how, moment):
    reference = references(kind, mc)
    storage = tmp_path / "r"
    argv = argv_of(files, kind, storage, "run", ray_cluster, mc)
    run_dir = storage / "run"
    total = 4 if kind == "grid" else 6
    interrupt(argv, str(run_dir), moment, how, total)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "iterand_tune", *argv, "--resume"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.time() - start < 600
    check_resumed(kind, mc, run_dir, done.stdout, reference)


@pytest.mark.resume_loop
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", ["mid_run", "during_checkpoint"])  # uploads under way
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill", "int"])
@pytest.mark.parametrize("mc", [1, 2])
@pytest.mark.parametrize("kind", ["grid", "search"])
def test_interrupted_and_resumed_on_s3(files, references, ray_cluster, s3_storage, tmp_path, kind, mc, how,
                                       moment):
    """The same on the S3 server, its driver starting a Ray of its own (whose workers inherit the
    server's credentials); SIGKILL takes that Ray down with the driver."""
    reference = references(kind, mc)
    name = tmp_path.name  # moto keeps its buckets in this process: a name of the case's own
    argv = argv_of(files, kind, s3_storage, name, "local", mc)
    run_dir = join_path(s3_storage, name)
    interrupt(argv, run_dir, moment, how, 4 if kind == "grid" else 6, own_ray=True)
    done = subprocess.run([sys.executable, "-m", "iterand_tune", *argv, "--resume"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_resumed(kind, mc, run_dir, done.stdout, reference)


@pytest.mark.slow
def test_a_run_with_every_state_unreadable_is_rebuilt_without_training_again(digits_run, tmp_path):
    """The newest (and only) experiment state truncated, as a crash mid-copy leaves it: --resume
    says so, rebuilds the run from its trial folders, trains nothing again and prints the run's
    table; never a silent restart of the whole run."""
    run = tmp_path / "results" / "packing"
    shutil.copytree(digits_run.path, run)
    for state in run.glob("experiment_state-*.json"):
        state.write_text(state.read_text()[:200])
    before = {p.name: (p / "result.json").read_text() for p in run.iterdir()
              if "-seed" in p.name and p.is_dir()}
    rc, out, err = run_here([digits_run.file, "--storage-path", str(tmp_path / "results"),
                             "--name", "packing", "--resume", "--report"])
    assert rc == 0, out + err
    # --report: the run's last lines name its report, written into the run's folder.
    assert re.search(rf"^report: {re.escape(str(run))}/report.html  \(run finished, 8 of 8 "
                     r"trials ended; claims: .*; open it in a browser\)$", out, re.M), out
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert re.search(r"experiment_state-\S+\.json is unreadable: rebuilt from the trial folders; "
                     r"8 finished trial\(s\) kept", out), out
    assert table_of(out) == table_of(digits_run.out)
    after = {p.name: (p / "result.json").read_text() for p in run.iterdir()
             if "-seed" in p.name and p.is_dir()}
    assert after == before  # nothing trained again, no new folder
    assert not re.search(r"^\[\d+/8\]", out, re.M)  # no trial ran


@pytest.mark.resume_loop
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_search_stopped_three_times_chooses_as_one_never_stopped(files, references, ray_cluster,
                                                                    tmp_path):
    """One trial at a time (the order of results fixed), Ctrl-C after the 1st, 3rd and 5th of six
    trials ended, resumed each time: the same samples and best configurations as the
    uninterrupted search with the same --search-seed."""
    reference = references("search", 1)
    argv = argv_of(files, "search", tmp_path / "r", "run", ray_cluster, 1)
    run_dir = tmp_path / "r" / "run"

    def ended_at_least(n):
        return lambda: sum(s in ("TERMINATED", "ERROR") for s, _ in
                           trial_states(str(run_dir)).values()) >= n if run_dir.is_dir() else False

    for i, n in enumerate((1, 3, 5)):
        proc = subprocess.Popen([sys.executable, "-m", "iterand_tune", *argv, *(["--resume"] if i else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(ended_at_least(n), proc, f"{n} trials ended", timeout=300)
        finally:
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=180)[0]
        assert proc.returncode == 130, out[-3000:]
    done = subprocess.run([sys.executable, "-m", "iterand_tune", *argv, "--resume"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_resumed("search", 1, run_dir, done.stdout, reference)
