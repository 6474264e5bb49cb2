"""Tests for the live progress of a run (`iterand_tune.tune.ProgressLines`, driven here by fake
trials and a fake clock: no Ray run) and for the end-of-run summary of a run's folder."""
from __future__ import annotations

import pickle
import re
from types import SimpleNamespace

import pytest

import iterand_tune.tune.progress as progress
import iterand_tune.tune.runner as runner
from iterand_tune.experiments import Experiment, all_trials
from iterand_tune.runs import read_run
from iterand_tune.storage import TRIAL_KEY
from iterand_tune.tune import ProgressLines, RunOptions, RunSummary, say

from test_runs import grid_run


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress, "time", c)
    return c


def fake_trial(i: int, epochs: int = 4, status: str = "PENDING", epoch: int = 0, **result):
    config = {TRIAL_KEY: dict(experiment="e", model="conv6x0.25", seed=i, epochs=epochs)}
    last = {"epoch": epoch, **result} if epoch else {}
    return SimpleNamespace(trial_id=f"t{i}", status=status, config=config, last_result=last,
                           path=f"/r/t{i}")


def report(p: ProgressLines, trials, trial, seconds: float, **metrics) -> None:
    trial.status = "RUNNING"
    epoch = trial.last_result.get("epoch", 0) + 1
    trial.last_result = {"epoch": epoch, "time_this_iter_s": seconds, **metrics}
    p.on_trial_result(0, trials, trial, trial.last_result)


def test_lines_with_eta_off_a_terminal(clock):
    lines: list[str] = []
    p = ProgressLines(lines.append, every=60.0, total_trials=3, total_epochs=12, tty=False)
    p.setup(total_num_samples=3)
    trials = [fake_trial(1)]  # Ray creates trials as it goes: two are not there yet
    p.on_step_end(0, trials)
    assert lines == []
    clock.now += 10
    report(p, trials, trials[0], 10.0)
    p.on_step_end(0, trials)
    clock.now += 50  # 60 s since the start: a progress line
    p.on_step_end(0, trials)
    # 1 of 12 epochs done, 10 s an epoch, one trial at a time: 11 x 10 s left.
    assert lines == ["progress: 1/12 epochs, ETA 1m50s, elapsed 1m00s; trials: 1 running, "
                     "2 pending, 0/3 finished"]
    clock.now += 30  # not a minute since the last line
    p.on_step_end(0, trials)
    assert len(lines) == 1

    for _ in range(3):
        report(p, trials, trials[0], 10.0, test_acc=91.5 if _ == 2 else None)
    trials[0].last_result.update(test_acc=91.5, time_total_s=40.0)
    p.on_trial_complete(0, trials, trials[0])
    trials[0].status = "TERMINATED"
    # The trial's line, then a progress line: every finished trial is followed by one.
    assert lines[1] == "[1/3] e conv6x0.25 seed 1: test 91.50% after 4 epochs, 40 s"
    assert lines[2].startswith("progress: 4/12 epochs, ETA 1m20s,")
    assert lines[2].endswith("trials: 0 running, 2 pending, 1/3 finished")


def test_eta_divides_by_the_concurrency_seen(clock):
    lines: list[str] = []
    p = ProgressLines(lines.append, total_trials=4, total_epochs=40, tty=False)
    p.setup()
    trials = [fake_trial(i, epochs=10, status="RUNNING") for i in range(4)]
    p.on_step_end(0, trials)
    for _ in range(5):  # two trials at once, 20 s an epoch
        clock.now += 20
        report(p, trials, trials[0], 20.0)
        report(p, trials, trials[1], 20.0)
        trials[2].status = trials[3].status = "PENDING"
        p.on_step_end(0, trials)
    n = p.tally(trials)
    assert (n["done"], n["left"], n["running"], n["pending"]) == (10, 30, 2, 2)
    assert n["eta"] == pytest.approx(30 * 20.0 / 2)
    assert "ETA 5m00s" in p.status(trials)


def test_a_search_eta_is_an_upper_bound(clock):
    lines: list[str] = []
    p = ProgressLines(lines.append, total_trials=2, total_epochs=20, upper_bound=True, tty=False)
    p.setup()
    trials = [fake_trial(1, epochs=10), fake_trial(2, epochs=10)]
    p.on_step_end(0, trials)
    assert "ETA --" in p.status(trials)  # nothing measured yet
    clock.now += 5
    report(p, trials, trials[0], 5.0, val_acc=50.0)
    # ASHA stops trial 1 after its first epoch: its other 9 epochs never run.
    p.on_trial_complete(0, trials, trials[0])
    trials[0].status = "TERMINATED"
    assert lines[0] == "[1/2] e conv6x0.25 seed 1: val 50.00% after 1 epochs, 0 s"
    assert lines[1].startswith("progress: 1/at most 11 epochs, ETA at most 50 s,")


def test_diverged_and_failed_trials_get_their_own_line(clock, tmp_path):
    lines: list[str] = []
    p = ProgressLines(lines.append, total_trials=2, total_epochs=8, tty=False)
    p.setup()
    trials = [fake_trial(1), fake_trial(2)]
    report(p, trials, trials[0], 1.0, train_loss=float("nan"), diverged=True)
    p.on_trial_complete(0, trials, trials[0])
    assert lines[0] == ("[1/2] e conv6x0.25 seed 1: diverged at epoch 1 (training loss nan); "
                        "lower its lr")
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\nValueError: boom\n")
    trials[1].error_file, trials[1].path = str(tmp_path / "error.txt"), str(tmp_path)
    p.on_trial_error(0, trials, trials[1])
    assert lines[-1] == f"trial e conv6x0.25 seed 2 failed: ValueError: boom (details: {tmp_path}/error.txt)"


def test_bar_on_a_terminal(clock, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lines: list[str] = []
    p = ProgressLines(lines.append, total_trials=2, total_epochs=8, tty=True, redraw=1.0)
    p.setup()
    trials = [fake_trial(1), fake_trial(2)]
    p.on_step_end(0, trials)
    clock.now += 4
    report(p, trials, trials[0], 4.0)
    p.on_step_end(0, trials)
    out = capsys.readouterr().out
    bars = out.split("\r")
    assert bars[-1] == ("[#..........] 1/8 epochs  ETA 28 s  4 s elapsed  1 running, 1 pending, "
                        "0/2 done\x1b[K")
    assert lines == []  # on a terminal only finished trials get a line of their own
    clock.now += 0.5  # redrawn at most once a second
    p.on_step_end(0, trials)
    assert capsys.readouterr().out == ""
    for _ in range(3):
        report(p, trials, trials[0], 4.0)
    trials[0].last_result.update(test_acc=80.0, time_total_s=16.0)
    p.on_trial_complete(0, trials, trials[0])
    out = capsys.readouterr().out
    assert out.startswith("\r\x1b[K")  # the bar is cleared for the trial's line ...
    assert lines == ["[1/2] e conv6x0.25 seed 1: test 80.00% after 4 epochs, 16 s"]
    assert "4/8 epochs" in out.split("\r")[-1]  # ... and drawn again below it
    p.on_experiment_end(trials)
    assert capsys.readouterr().out.endswith("\n")
    assert len(p.bar(trials, width=40)) == 39  # never as wide as the terminal
    assert p.bar(trials, width=200).startswith("[" + "#" * 15 + "." * 15 + "] 4/8 epochs")


def test_progress_lines_pickle_and_old_pickles_still_work(clock):
    p = ProgressLines(say, total_trials=3, total_epochs=9)
    q = pickle.loads(pickle.dumps(p))
    assert (q.total_trials, q.total_epochs, q.echo) == (3, 9, say)
    # A callback pickled by an earlier version (tuner.pkl of a run being resumed).
    old = ProgressLines.__new__(ProgressLines)
    old.__dict__.update(echo=say, every=60.0, last=0.0, done=0)
    old.setup()
    trials = [fake_trial(1)]
    old.on_step_end(0, trials)
    assert "0/4 epochs" in old.status(trials) and old.tty is False  # pytest captures stdout


def test_eta_counts_epochs_finished_before_a_resume(clock):
    p = ProgressLines(lambda line: None, total_trials=3, total_epochs=6, tty=False)
    p.setup()
    trials = [fake_trial(1, epochs=2, status="TERMINATED", epoch=2),
              fake_trial(2, epochs=2, status="PENDING", epoch=1), fake_trial(3, epochs=2)]
    n = p.tally(trials)
    assert (n["done"], n["left"], n["finished"], n["pending"]) == (3, 3, 1, 2)


# ------------------------------------------------------------------ the summary of a run's folder

def test_summary_of_an_interrupted_run_counts_trials_never_created(tmp_path):
    """Trials in the run's order (grid index), planned points without a trial as pending: the
    run's folder as the run reader reads it (a grid point's second folder not counted)."""
    summary = RunSummary.from_run(read_run(str(grid_run(tmp_path))), 1.0)
    assert [t["status"] for t in summary.trials] == ["finished", "running", "pending"]
    assert [t["seed"] for t in summary.trials] == [1, 2, 3]
    assert summary.unfinished == ["e-conv6x0.25-seed2", "e-conv6x0.25-seed3"]
    (p,) = summary.points
    assert (p["trials"], p["test_acc_count"]) == (3, 1)
    assert re.search(r"\b1/3\b", summary.table().splitlines()[-1])
    assert len(summary.skipped) == 1 and "seed2-ccc" in summary.skipped[0]


def test_progress_plans_every_trial_and_epoch_of_a_run():
    e = Experiment("e", dict(model="conv6x0.25", epochs=3), dict(seed=[1, 2]))
    f = Experiment("f", dict(model="conv6x0.25", epochs=5))
    opts = RunOptions(storage_path="/r", name="n", marker={"trials": all_trials([e, f])})
    p = runner._progress(opts, say, None)
    assert (p.total_trials, p.total_epochs, p.upper_bound) == (3, 11, False)
    # A search: 6 trials over two points of 4 and 2 epochs, each of which ASHA may stop early.
    search = SimpleNamespace(num_samples=6, points=[SimpleNamespace(epochs=4),
                                                    SimpleNamespace(epochs=2)])
    p = runner._progress(opts, say, search)
    assert (p.total_trials, p.total_epochs, p.upper_bound) == (6, 18, True)
