"""Tests for iterand_tune.tune: the end-of-run summary built from Ray Tune's results, what
`run` asks Ray for, and real Ray Tune runs on digits through the CLI with a logical GPU: four
quarter-GPU trials at once, checkpoints, the summary table (the same as `python -m analysis
table`) and refusals that start nothing. (A driver killed with SIGKILL and resumed: on S3 in
test_storage_s3.py, on the session's Ray with a search in test_search.py.)"""
from __future__ import annotations

import glob
import math
import os
import statistics
from types import SimpleNamespace

import pytest
import torch

import iterand_tune.tune.runner as runner
from analysis.cli import main as analysis_main
from iterand_tune.cli import main
from iterand_tune.experiments import Experiment, load
from iterand_tune.storage import TRIAL_KEY
from iterand_tune.terminal import POINT_STATS
from iterand_tune.runs import Run, TrialRecord
from iterand_tune.tune import RunSummary
from iterand_tune.vocabulary import POINT_LABELS

from helpers import EDGEPOPUP, result_rows, trial_dirs, write_digits

FIGURE1 = os.path.join(os.path.dirname(__file__), "..", "experiments", "figure1.py")
FIGURE2 = os.path.join(os.path.dirname(__file__), "..", "experiments", "figure2.py")


# ------------------------------------------------------------------ the summary

def _grid(experiment: Experiment, accs: list, params: int = 1000, errors=()) -> list:
    """The experiment's trials as the run reader returns them: a test accuracy, or None (stopped
    before the end); trials whose index is in `errors` failed."""
    out = []
    for i, (t, acc) in enumerate(zip(experiment.trials(), accs)):
        rows = [] if acc is None else [{"epoch": 1, "test_acc": acc, "params_after_pruning": params,
                                        "params_before_pruning": 2 * params}]
        out.append(TrialRecord(f"x{i}", f"/r/{i}", f"/r/{i}", dict(t), ("grid", i), rows,
                               ray_status="ERROR" if i in errors else "TERMINATED"))
    return out


def _summary(trials: list, seconds: float = 0.0) -> RunSummary:
    for i, t in enumerate(trials):  # one run's grid indices
        t.slot = ("grid", i)
    return RunSummary.from_run(Run("/r", {"kind": "grid"}, trials), seconds)


def test_summary_means_and_stds():
    sgd = Experiment("a_sgd", dict(model="conv6x0.5", lr=0.01), dict(seed=[1, 2, 3]))
    it = Experiment("b_iterand", dict(model="conv6x0.5", train_mode="score_only", bn_affine=False,
                                      conv_sparsity=0.5, rerand_mode="bernoulli"),
                    dict(seed=[1, 2, 3]))
    grid = _grid(sgd, [80.0, 82.0, 84.5], 1_234_567) + _grid(it, [70.0, None, 73.0], 617_000)
    summary = _summary(grid, 1.0)
    points = {p["experiment"]: p for p in summary.points}
    assert sorted(points) == ["a_sgd", "b_iterand"]
    a, b = points["a_sgd"], points["b_iterand"]
    assert list(a) == [*POINT_LABELS, *POINT_STATS]  # nothing varies inside an experiment
    assert (a["method"], a["init"], a["network"], a["width"]) == ("sgd", "ku", "conv6", 0.5)
    assert (a["trials"], a["test_acc_count"], a["excluded"], a["missing"]) == (3, 3, 0, None)
    assert (b["method"], b["trials"], b["test_acc_count"], b["excluded"]) == ("iterand", 3, 2, 1)
    assert b["missing"] == "seed 2 stopped"
    assert a["test_acc_mean"] == pytest.approx(82.1666666667) and a["test_acc_std"] == pytest.approx(
        statistics.stdev([80.0, 82.0, 84.5]))
    assert b["test_acc_mean"] == pytest.approx(71.5) and b["test_acc_std"] == pytest.approx(2.1213203436)
    assert (a["params_after_pruning"], b["params_after_pruning"]) == (1_234_567, 617_000)
    assert (a["params_before_pruning"], b["params_before_pruning"]) == (2_469_134, 1_234_000)
    table = summary.table()
    a_line = next(line for line in table.splitlines() if line.startswith("a_sgd"))
    b_line = next(line for line in table.splitlines() if line.startswith("b_iterand"))
    assert "3/3" in a_line and "82.17" in a_line and "2.25" in a_line and "1,234,567" in a_line
    assert "2/3" in b_line and "71.50" in b_line and "2.12" in b_line and "617,000" in b_line


def test_summary_of_one_seed_and_of_none():
    e = Experiment("e", dict(model="conv6x0.25"), dict(seed=[1, 2]))
    (p,) = _summary(_grid(e, [None, 90.0]), 0.0).points
    assert (p["test_acc_count"], p["test_acc_mean"]) == (1, 90.0) and math.isnan(p["test_acc_std"])
    summary = _summary(_grid(e, [None, None]), 0.0)
    (q,) = summary.points
    assert q["test_acc_count"] == 0 and math.isnan(q["test_acc_mean"]) and math.isnan(q["test_acc_std"])
    assert q["params_after_pruning"] is None
    line = summary.table().splitlines()[-1]
    assert "0/2" in line and line.split()[-3:] == ["-", "-", "-"]


def test_summary_separates_points_varying_inside_an_experiment():
    (e,) = load(FIGURE1, ["figure1_conv6_ku_iterand"])
    points = _summary(_grid(e, [60.0 + i for i in range(len(e))]), 0.0).points
    # grid(rerand_lambda, seed): r varies fastest; points in the order of their first trial
    assert [p["rerand_lambda"] for p in points] == [0.0, 0.01, 0.1, 1.0]
    assert all(p["trials"] == 3 and p["test_acc_count"] == 3 for p in points)
    by_r = {p["rerand_lambda"]: p for p in points}
    # r = 0.01 got accs 61, 65, 69
    assert by_r[0.01]["test_acc_mean"] == pytest.approx(65.0)
    assert by_r[0.01]["test_acc_std"] == pytest.approx(4.0)
    assert by_r[0.0]["method"] == "edgepopup" and by_r[0.1]["method"] == "iterand"
    head = _summary(_grid(e, [60.0] * len(e)), 0.0).table().splitlines()[0]
    assert head.split()[:5] == ["experiment", "model", "method", "init", "rerand_lambda"]


def test_summary_from_results():
    e = Experiment("e", dict(model="conv6x0.25"), dict(seed=[1, 2, 3]))
    summary = _summary(_grid(e, [50.0, None, None], errors=(2,)), 2.0)
    assert summary.errored == ["e-conv6x0.25-seed3"]
    assert summary.unfinished == ["e-conv6x0.25-seed2"]
    assert not summary.ok
    assert [t["status"] for t in summary.trials] == ["finished", "stopped", "errored"]
    (p,) = summary.points
    assert (p["trials"], p["test_acc_count"], p["test_acc_mean"]) == (3, 1, 50.0)
    assert p["missing"] == "seed 2 stopped; seed 3 errored"


def test_summary_names_the_folders_it_did_not_count():
    e = Experiment("e", dict(model="conv6x0.25"), dict(seed=[1]))
    run = Run("/r", {"kind": "grid"}, _grid(e, [50.0]), [("/r/e-seed1-y", "a second folder")])
    summary = RunSummary.from_run(run, 1.0)
    assert summary.skipped == ["skipped /r/e-seed1-y: a second folder"] and summary.ok


# ------------------------------------------------------------------ what run asks Ray for

class StopHere(Exception):
    pass


SWITCHES = (runner.ray_env.SYNC_WARNING, runner.ray_env.OLD_OUTPUT)  # Ray's, set for a run


@pytest.fixture
def fake_tuner(monkeypatch):
    """`tune.run` up to the Tuner, on a pretend cluster of one node with 4 CPUs and a GPU: the
    Tuner records its arguments and stops the run."""
    import ray.tune as tune

    seen = []
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)

    def tuner(trainable, tune_config, run_config):
        seen.append(SimpleNamespace(trainable=trainable, tune_config=tune_config,
                                    run_config=run_config,
                                    switches={name: os.environ.get(name) for name in SWITCHES}))
        raise StopHere

    monkeypatch.setattr(tune, "Tuner", tuner)
    monkeypatch.setattr(runner, "connect", lambda *a, **k: False)
    monkeypatch.setattr(runner, "live_nodes", lambda: [{"CPU": 4.0, "GPU": 1.0}])
    monkeypatch.setattr(runner, "live_node_ids", lambda: ["n1"])
    return seen


def _bundles(seen, trial):
    return seen.trainable._resources({TRIAL_KEY: trial}).bundles


@pytest.mark.slow
@pytest.mark.parametrize("flag, reuse", [([], True), (["--no-reuse-actors"], False)])
def test_actor_reuse_flag_reaches_the_tuner(tmp_path, fake_tuner, flag, reuse):
    exp = write_digits(str(tmp_path), {"tiny": EDGEPOPUP})
    with pytest.raises(StopHere):
        main([exp, "--storage-path", str(tmp_path / "r"), "--max-failures", "5", *flag])
    (seen,) = fake_tuner
    assert (seen.tune_config.reuse_actors, seen.run_config.failure_config.max_failures) == (reuse, 5)
    # Ray's switches are set while the Tuner is built, and gone when the run has ended.
    assert seen.switches == dict.fromkeys(SWITCHES, "0")
    assert not set(SWITCHES) & set(os.environ)


@pytest.mark.slow
def test_each_trial_asks_for_its_share_and_cpus_per_trial_wins(tmp_path, fake_tuner):
    exp = tmp_path / "own.py"
    exp.write_text("from iterand_tune.experiments import Experiment\n"
                   "EXPERIMENTS = [Experiment('own', dict(dataset='digits', model='conv6x0.25'),\n"
                   "    dict(seed=[1]), gpus_per_trial=0.5, cpus_per_trial=3),\n"
                   "  Experiment('sized', dict(dataset='digits'), dict(model=['conv6x0.25', 'resnet18x2.0']))]\n")
    trials = {(t["experiment"], t["model"]): t for e in load(str(exp)) for t in e.trials()}
    for i, (argv, expected) in enumerate((
            ([], {("own", "conv6x0.25"): (3, 0.5), ("sized", "conv6x0.25"): (1, 0.25),
                  ("sized", "resnet18x2.0"): (1, 1)}),
            (["--cpus-per-trial", "2"], {("own", "conv6x0.25"): (2, 0.5),
                                         ("sized", "conv6x0.25"): (2, 0.25)}),
            (["--gpus-per-trial", "0.25"], {("own", "conv6x0.25"): (3, 0.25),
                                            ("sized", "resnet18x2.0"): (1, 0.25)}))):
        fake_tuner.clear()
        with pytest.raises(StopHere):
            main([str(exp), "--storage-path", str(tmp_path / "r"), "--name", f"n{i}", *argv])
        (seen,) = fake_tuner
        for key, (cpus, gpus) in expected.items():
            assert _bundles(seen, trials[key]) == [{"CPU": cpus, "GPU": gpus}], (argv, key)
        assert seen.run_config.storage_path == str(tmp_path / "r")


@pytest.mark.slow
def test_missing_data_is_one_line_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    rc = main([FIGURE2, "--only", "figure2_conv6_ku_sgd", "--data-dir", str(tmp_path / "empty"),
               "--set", "dataset_download=false", "--storage-path", str(tmp_path / "r")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: CIFAR-10 not found in {tmp_path / 'empty'}")
    assert "--download" in err[0]
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ real runs (Ray)

def interval(rows):
    """(start, end) wall times of a trial from its reports."""
    return rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]


def most_at_once(spans):
    """The most trials certainly running at one moment. Ray's `timestamp` is whole seconds, so
    a trial is certain to run from a second after its start until its last timestamp."""
    events = sorted([(s + 1, 1) for s, _ in spans] + [(e, -1) for _, e in spans])  # ends first on ties
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_four_quarter_gpu_trials_run_at_once(digits_run):
    dirs = trial_dirs(digits_run.path)
    epochs = list(range(1, digits_run.epochs + 1))
    spans = []
    for d in dirs:
        rows = result_rows(d)
        assert [r["epoch"] for r in rows] == epochs  # every epoch reported once
        assert "test_acc" in rows[-1] and all("test_acc" not in r for r in rows[:-1])
        trial = rows[-1]["config"]["trial"]
        assert trial["dataset_dir"] == os.path.join(digits_run.cwd, "data")  # made absolute
        # Only the newest checkpoints are kept, and they load without pickles.
        ckpts = sorted(glob.glob(os.path.join(d, "checkpoint_*")))
        assert 1 <= len(ckpts) <= 2
        state = torch.load(os.path.join(ckpts[-1], "trainer.pt"), weights_only=True)
        assert state["epoch"] == epochs[-1] and state["config"]["seed"] == trial["seed"]
        spans.append(interval(rows))
    # One logical GPU and two CPUs: only 0.25 GPU + 0.5 CPU per trial lets four overlap.
    assert most_at_once(spans) == 4

    # The summary: one row per figure point, both seeds done, the mean of the trials' test_acc.
    accs = {}
    for d in dirs:
        last = result_rows(d)[-1]
        accs.setdefault((last["config"]["trial"]["experiment"], last["config"]["trial"]["model"]),
                        []).append(last["test_acc"])
    assert len(accs) == 4
    for (name, model), values in accs.items():
        line = next(line for line in digits_run.out.splitlines()
                    if line.startswith(name + " ") and f" {model} " in line)
        assert "2/2" in line and f"{sum(values) / 2:.2f}" in line
    assert f"results: {digits_run.path}" in digits_run.out


@pytest.mark.slow
def test_the_run_summary_is_the_analysis_table(digits_run, capsys):
    printed = digits_run.out.splitlines()
    start = next(i for i, line in enumerate(printed) if line.startswith("experiment "))
    summary = printed[start:printed.index("", start)]
    assert analysis_main(["table", digits_run.path]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert summary == table
    assert len(table) == 2 + 4  # header, rule, one row per figure point


@pytest.mark.slow
def test_resume_without_a_run_is_one_line(ray_cluster, tmp_path, capsys):
    exp = write_digits(str(tmp_path), {"tiny": EDGEPOPUP})
    rc = main([exp, "--storage-path", str(tmp_path / "none"), "--name", "nothing", "--resume"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: --resume: there is no run to resume at ")
    assert not (tmp_path / "none" / "nothing").exists()


@pytest.mark.slow
def test_impossible_request_is_refused_before_anything_runs(ray_cluster, tmp_path, capsys):
    exp = write_digits(str(tmp_path), {"tiny": EDGEPOPUP})
    rc = main([exp, "--storage-path", str(tmp_path / "r"), "--gpus-per-trial", "2"])
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    assert rc == 2 and len(err) == 1, cap.err
    assert "asks for 1 CPU + 2 GPU per trial" in err[0]
    assert "cluster: 1 node(s), 2 CPUs, 1 GPUs" in err[0]
    assert not glob.glob(str(tmp_path / "r" / "*" / "tiny*"))  # no trial was created
