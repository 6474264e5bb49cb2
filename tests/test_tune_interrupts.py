"""Long runs: a run interrupted with Ctrl-C (or SIGTERM) stops its trials, saves Ray Tune's
state, prints what finished and the exact --resume command, and exits 130; the resumed run
ends with the table of an uninterrupted one. A trial whose training loss is not finite stops
with status `diverged` (not an error): in the Trainer, `train`, the run's summary, the analysis
tables and the figures. One real Ray run covers the interrupt, the resume and a diverged trial."""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pandas as pd
import pytest

import iterand_tune.tune.interrupts as interrupts_module
from analysis.figures import _missing_note
from analysis.results import aggregate, load_results
from iterand_tune.cli import main
from iterand_tune.config import TrialConfig
from iterand_tune.experiments import Experiment, all_trials, load, prepare
from iterand_tune.runs import Run, TrialRecord
from iterand_tune.storage import TRIAL_KEY
from iterand_tune.training import Trainer
from iterand_tune.tune import Interruption, RunSummary

from helpers import trained_here

# A learning rate of 1e6 with dense SGD on digits turns the loss to NaN in the first epoch.
BLOW_UP = dict(dataset="digits", model="conv6x0.25", train_mode="normal", lr=1e6, batch_size=32,
               max_train_dataset_size=64, epochs=3, use_cuda=False, debug_max_eval_iters=1)
NOISE = ("Traceback", "FileNotFoundError", "Could not fetch metrics", "error.txt", "Restored on")


# ------------------------------------------------------------------ diverged, without Ray

def test_trainer_stops_after_an_epoch_whose_loss_is_not_finite(tmp_path):
    trainer = Trainer(TrialConfig(**BLOW_UP))
    m = trainer.train_epoch()
    assert m["diverged"] is True and not math.isfinite(m["train_loss"])
    assert trainer.done and trainer.epoch == 1
    assert "test_acc" not in m  # no test evaluation of a diverged model
    with pytest.raises(RuntimeError):
        trainer.train_epoch()
    trainer.save(str(tmp_path / "t.pt"))  # a trial restored from that checkpoint stays done
    again = Trainer(TrialConfig(**BLOW_UP))
    assert not again.done
    again.load(str(tmp_path / "t.pt"))
    assert again.done and again.diverged


def test_train_command_says_diverged_in_one_line(capsys):
    sets = [f"--set={k}={v}" for k, v in BLOW_UP.items() if k != "use_cuda"]
    rc = main(["train", "--device", "cpu", *sets])
    cap = capsys.readouterr()
    assert rc == 1
    err = cap.err.splitlines()
    assert len(err) == 1, cap.err
    assert err[0].startswith("error: the training loss diverged (nan) at epoch 1; try a lower lr")
    assert "epoch   1" in cap.out and "epoch   2" not in cap.out


def _record(i, trial, **last):
    return TrialRecord(f"t{i}", "/r/x", "/r/x", dict(trial), ("grid", i), [last],
                       ray_status="TERMINATED")


def test_summary_counts_diverged_trials():
    e = Experiment("e", dict(model="conv6x0.25"), dict(seed=[1, 2]))
    ok, bad = e.trials()
    trials = [_record(0, ok, epoch=2, test_acc=80.0, diverged=False, params_after_pruning=9),
              _record(1, bad, epoch=1, diverged=True, train_loss=float("nan"),
                      params_after_pruning=9)]
    summary = RunSummary.from_run(Run("/r", {"kind": "grid"}, trials), 1.0)
    assert [t["status"] for t in summary.trials] == ["finished", "diverged"]
    assert summary.diverged == ["e-conv6x0.25-seed2"] and not summary.errored
    assert not summary.unfinished and not summary.ok
    (p,) = summary.points
    assert (p["test_acc_count"], p["excluded"], p["missing"]) == (1, 1, "seed 2 diverged")


def test_analysis_labels_diverged_trials(tmp_path, capsys):
    """A run folder without Ray's experiment state: the status comes from the trial's reports."""
    import json

    from analysis.cli import main as analysis_main

    run = tmp_path / "run"
    for seed, rows in ((1, [dict(epoch=1, train_loss=0.5, diverged=False),
                            dict(epoch=2, train_loss=0.4, diverged=False, test_acc=70.0)]),
                       (2, [dict(epoch=1, train_loss=float("nan"), diverged=True)])):
        config = {"experiment": "e", **TrialConfig(model="conv6x0.25", seed=seed,
                                                   epochs=2).to_dict()}
        folder = run / f"e-conv6x0.25-seed{seed}-abc_0000{seed}"
        folder.mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps({TRIAL_KEY: config}))
        (folder / "result.json").write_text("".join(
            json.dumps({**r, "params_after_pruning": 9, "trial_id": f"abc_0000{seed}"}) + "\n"
            for r in rows))
    df = load_results(str(run))
    assert list(df["status"]) == ["finished", "diverged"]
    assert df["diverged"].tolist() == [False, True]
    (p,) = aggregate(df).to_dict("records")
    assert p["missing"] == "seed 2 diverged"
    note = _missing_note(df, aggregate(df), 200)
    assert note.startswith("1 of 2 trials not finished and left out (1 diverged).")
    assert "training loss became inf/NaN" in note
    assert analysis_main(["table", str(run)]) == 0
    out = capsys.readouterr().out
    status = next(line for line in out.splitlines() if line.startswith("2 trials: "))
    assert sorted(status[len("2 trials: "):].split(", ")) == ["1 diverged", "1 finished"]
    assert "seed 2 diverged" in out


def test_partial_figure_note_still_says_partial():
    df = pd.DataFrame(dict(status=["finished", "diverged", "running"]))
    points = pd.DataFrame(dict(test_acc_count=[1], excluded=[2], trials=[3]))
    assert _missing_note(df.assign(test_acc=[1.0, None, None]), points.iloc[:0], 200).startswith(
        "Partial run: 2 of 3 trials not finished")


# ------------------------------------------------------------------ signals, without Ray

def test_signals_ask_ray_tune_to_stop_then_stop_at_once(monkeypatch):
    asked, exits = [], []
    monkeypatch.setattr(interrupts_module.os, "_exit", lambda code: exits.append(code))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with interrupts_module.Interrupts() as interrupts:
        assert os.environ[interrupts_module.NO_RAY_SIGINT] == "1"
        with pytest.raises(KeyboardInterrupt):  # before the trials start: a plain Ctrl-C
            signal.raise_signal(signal.SIGINT)
        interrupts.fitting = True
        signal.signal(signal.SIGUSR1, lambda s, f: asked.append(s))  # what Ray Tune installs
        signal.raise_signal(signal.SIGTERM)  # SIGTERM takes Ctrl-C's path
        assert asked == [signal.SIGUSR1] and interrupts.interrupted and exits == []
        signal.raise_signal(signal.SIGINT)
        assert exits == [130] and asked == [signal.SIGUSR1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert interrupts_module.NO_RAY_SIGINT not in os.environ


# ------------------------------------------------------------------ one real run

def write_file(folder):
    path = folder / "longrun.py"
    path.write_text(textwrap.dedent("""
        from iterand_tune.experiments import Experiment
        BASE = dict(dataset="digits", model="conv6x0.25", epochs=2, batch_size=32,
                    max_train_dataset_size=64, train_augmentation=False, train_mode="normal",
                    lr=0.01, debug_max_eval_iters=2)
        EXPERIMENTS = [Experiment("tiny", BASE, dict(seed=[1, 2, 3])),
                       Experiment("tiny_nan", dict(BASE, lr=1e6), dict(seed=[1]))]
    """))
    return path


def table_of(out: str) -> str:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("experiment  model"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def uninterrupted(experiments) -> RunSummary:
    """The summary of a run of `experiments` that nothing interrupted: every trial trained to its
    end here, without Ray (helpers.trained_here)."""
    trials = [TrialRecord(f"t{i}", "", "", dict(trial), ("grid", i), trained_here(trial),
                          ray_status="TERMINATED")
              for i, trial in enumerate(all_trials(experiments))]
    return RunSummary.from_run(Run("", {"kind": "grid"}, trials), 0.0)


@pytest.mark.ray
@pytest.mark.slow
def test_interrupt_resume_and_a_diverged_trial(ray_cluster, tmp_path):
    exp = write_file(tmp_path)
    storage = tmp_path / "results"

    # The reference: the table of the same file's trials, each trained to its end uninterrupted.
    reference = uninterrupted(prepare(load(str(exp))))
    assert reference.diverged == ["tiny_nan-conv6x0.25-seed1"] and not reference.errored
    assert [t["status"] for t in reference.trials] == ["finished"] * 3 + ["diverged"]

    # Ctrl-C once the first trial has finished, one trial at a time: some are left.
    cmd = [sys.executable, "-m", "iterand_tune", str(exp), "--address", ray_cluster,
           "--storage-path", str(storage), "--name", "stopped", "--max-concurrent", "1",
           "--cpus-per-trial", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = [], time.time() + 300
    try:
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("progress:"):  # follows the first finished trial's line
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 130, out + err
    assert re.search(r"^\[1/4\] tiny\S* conv6x0.25 seed \d: ", out, re.M), out
    assert "ETA" in out
    m = re.search(r"^interrupted: (\d) of 4 trials finished$", out, re.M)
    assert m and 1 <= int(m.group(1)) < 4, out
    assert "experiment  model" in out  # the partial table
    resume = re.search(r"^continue with: (.+)$", out, re.M).group(1)
    assert resume.startswith(f"python -m iterand_tune {exp} --resume --name stopped")
    for noise in NOISE:
        assert noise not in out + err, (noise, out + err)

    words = shlex.split(resume)
    done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr  # the diverged trial
    assert table_of(done.stdout) == reference.table()
    assert re.search(r"^\[\d/4\] tiny_nan conv6x0.25 seed 1: diverged at epoch 1 ", done.stdout,
                     re.M), done.stdout
    assert re.search(r"^error: 1 trial\(s\) diverged.*tiny_nan-conv6x0.25-seed1", done.stderr,
                     re.M), done.stderr
    for noise in NOISE:
        assert noise not in done.stdout + done.stderr, (noise, done.stdout + done.stderr)

    trials = load_results(str(storage / "stopped")).set_index(["experiment", "seed"])
    assert trials.loc[("tiny_nan", 1), "status"] == "diverged"
    assert trials.loc[("tiny_nan", 1), "epoch"] == 1  # stopped there, its last metrics kept
    assert pd.isna(trials.loc[("tiny_nan", 1), "test_acc"])
    assert (trials.drop(index=("tiny_nan", 1))["status"] == "finished").all()


def test_resume_command_repeats_what_the_run_needs(tmp_path, capsys):
    from iterand_tune.cli import _build_run_parser, _interrupted, _resume_command

    parse = _build_run_parser().parse_args
    args = parse(["experiments/figure2.py"])
    assert _resume_command(args, "r1") == "python -m iterand_tune experiments/figure2.py --resume --name r1"
    args = parse(["my file.py", "k1", "--search", "--only", "a", "b", "--storage-path",
                  str(tmp_path), "--address", "auto"])
    assert _resume_command(args, "r2") == (
        f"python -m iterand_tune 'my file.py' k1 --resume --name r2 --search --storage-path "
        f"{tmp_path} --address auto --only a b")
    summary = SimpleNamespace(interrupted=Interruption(2, 5), path="/runs/r2",
                              seconds=12.0, table=lambda: "the table")
    assert _interrupted(summary, args, "r2") == 130
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["", "interrupted: 2 of 5 trials finished", "", "the table"]
    assert out[-1].startswith("continue with: python -m iterand_tune 'my file.py' k1 --resume")
