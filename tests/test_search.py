"""Tests for iterand_tune.search: figure points, the per-point searcher (one TPE each) and
scheduler (one ASHA each) driven directly, the best-configuration table and its reproduction,
and one real search on digits, read by two tests: two points where one is hopeless, its
driver killed and resumed, the best configurations and `--from-search`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from iterand_tune.cli import main
from iterand_tune.experiments import Experiment, load
from iterand_tune.search import (POINT_KEY, PointScheduler, PointSearcher, default_grace_period,
                                 n_initial_points, point_seed, points, write_best_configs)
from iterand_tune.runs import read_run
from iterand_tune.search_plan import best_row, reproduction, searched_best
from iterand_tune.search_space import LogUniform, QUniform

from helpers import DIGITS, kill_driver_when, resume, run_rows, trial_states, write_digits

ROOT = os.path.join(os.path.dirname(__file__), "..")
BASE = dict(DIGITS, epochs=3)


# ------------------------------------------------------------------ figure points

def test_points_are_grid_combinations_but_the_seed():
    e = Experiment("x", BASE, dict(model=["conv6x0.25", "conv6x0.5"], seed=[2, 3]),
                   search=dict(lr=LogUniform(0.01, 1.0), rerand_freq=QUniform(5, 40, 5)))
    pts = points([e, Experiment("plain", BASE, dict(seed=[1]))])
    assert [p.name for p in pts] == ["x[model=conv6x0.25]", "x[model=conv6x0.5]"]
    for p in pts:
        assert p.experiment.config["seed"] == 2 and p.experiment.config["evaluate_test"] is False
        trial = p.trial({"lr": 0.05, "rerand_freq": 12.7})  # HyperOpt hands out floats
        assert trial["rerand_freq"] == 15 and trial["lr"] == 0.05 and trial["experiment"] == "x"
    # --set / --smoke-test fixing a searched option take it out of the search
    assert set(e.with_values({"rerand_freq": 2}).search) == {"lr"}


def test_experiment_files_have_search_spaces_next_to_unchanged_grids():
    expected = {"quickstart": (12, 6), "figure1": (36, 12), "figure2": (180, 60), "figure3": (8, 8)}
    for name, (trials, n_points) in expected.items():
        experiments = load(os.path.join(ROOT, "experiments", f"{name}.py"))
        assert sum(len(e) for e in experiments) == trials
        assert all(e.search for e in experiments)
        assert len(points(experiments)) == n_points
        for e in experiments:
            keys = set(e.search)
            assert {"lr", "weight_decay"} <= keys
            if "iterand" in e.name and "rerand_lambda" not in e.grid:
                assert {"rerand_freq", "rerand_lambda"} <= keys


# ------------------------------------------------------------------ the routers, driven directly

def _two_points(num_samples=3):
    good = Experiment("good", BASE, dict(seed=[1]), search=dict(lr=LogUniform(0.05, 0.5)))
    bad = Experiment("bad", BASE, dict(seed=[1]), search=dict(lr=LogUniform(1e-7, 1e-6)))
    return points([good, bad])


def _trial(tid, config, status="PENDING", last=None, storage=None):
    """A trial as Ray Tune's controller holds it, for what the searcher and scheduler read."""
    return SimpleNamespace(trial_id=tid, config=config, status=status, last_result=last or {},
                           storage=storage)


def _val(config):
    """A made-up validation accuracy for a sampled learning rate: best near lr 0.2."""
    return 90.0 - 100 * abs(config["trial"]["lr"] - 0.2)


def _drive(searcher, trials=(), until=None):
    """Run a search as the controller would with one trial at a time: at each step the searcher
    sees the trials, proposes one, which runs to its end. Stops after `until` trials (or when the
    searcher is finished); returns the trial list."""
    from ray.tune.search import Searcher

    trials = list(trials)
    while until is None or len(trials) < until:
        for t in trials:  # what the controller holds runs to its end first (one at a time)
            if t.status not in ("TERMINATED", "ERROR"):
                t.status, t.last_result = "TERMINATED", {"val_acc": _val(t.config), "epoch": 3}
                searcher.on_trial_complete(t.trial_id, t.last_result)
        searcher.sync(trials)
        config = searcher.suggest(f"t{len(trials)}")
        if config == Searcher.FINISHED:
            break
        assert config is not None, "nothing runs, yet the searcher waits"
        t = _trial(f"t{len(trials)}", config, "RUNNING")
        trials.append(t)
        t.status, t.last_result = "TERMINATED", {"val_acc": _val(config), "epoch": 3}
        searcher.on_trial_complete(t.trial_id, t.last_result)
    return trials


def test_searcher_gives_each_point_its_own_tpe_round_robin():
    pts = _two_points()
    trials = _drive(PointSearcher(pts, num_samples=3, seed=7))
    assert [t.config[POINT_KEY] for t in trials] == ["good", "bad"] * 3
    assert [t.config["sample"] for t in trials] == [0, 0, 1, 1, 2, 2]
    assert [t.config["order"] for t in trials] == list(range(6))
    assert all(t.config["trial"]["evaluate_test"] is False and t.config["trial"]["seed"] == 1
               for t in trials)
    assert all(0.05 <= t.config["trial"]["lr"] <= 0.5 for t in trials if t.config[POINT_KEY] == "good")
    # Each sample says which of its own point's samples its TPE had seen: all earlier ones here.
    assert [t.config["seen"] for t in trials] == [[], [], [0], [0], [0, 1], [0, 1]]
    searcher = PointSearcher(pts, num_samples=3, seed=7)
    searcher.sync(trials)
    for name in ("good", "bad"):  # each TPE holds its own point's three results only
        losses = [t["result"]["loss"] for t in searcher.tpe[name]._hpopt_trials.trials]
        assert losses == [-t.last_result["val_acc"] for t in trials if t.config[POINT_KEY] == name]
    assert point_seed(7, "good") == point_seed(7, "good") != point_seed(8, "good")


def test_searcher_rebuilt_from_the_trials_proposes_what_it_would_have():
    """A search interrupted after any trial and resumed from its trials alone (a fresh searcher,
    as Ray Tune restores it from tuner.pkl) proposes the same samples as one never interrupted:
    the TPEs are replayed with exactly the results each had seen."""
    pts = _two_points(num_samples=6)
    whole = [t.config["trial"]["lr"] for t in _drive(PointSearcher(pts, num_samples=6, seed=3))]
    assert len(whole) == 12 and len(set(whole)) == 12
    for cut in (1, 4, 7, 11):
        first = _drive(PointSearcher(pts, num_samples=6, seed=3), until=cut)
        # The trial that was running when the driver died is restored as PENDING, unfinished.
        first[-1].status, first[-1].last_result = "PENDING", {}
        resumed = _drive(PointSearcher(pts, num_samples=6, seed=3), first[:-1] + [first[-1]])
        assert [t.config["trial"]["lr"] for t in resumed[cut:]] == whole[cut:], cut


def test_searcher_limits_concurrency_and_finishes_when_every_sample_ended():
    from ray.tune.search import Searcher

    searcher = PointSearcher(_two_points(num_samples=2), num_samples=2, seed=1, max_concurrent=2)
    assert searcher.suggest("early") is None  # no trials seen yet: after a resume it must see them
    searcher.sync([])
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert searcher.suggest("c") is None  # two live
    trials = [_trial("a", a, "RUNNING"), _trial("b", b, "TERMINATED", {"val_acc": 5.0, "epoch": 3})]
    searcher.sync(trials)
    c = searcher.suggest("c")
    assert c is not None and searcher.suggest("d") is None
    trials.append(_trial("c", c, "TERMINATED", {"val_acc": 6.0, "epoch": 3}))
    searcher.sync(trials)
    d = searcher.suggest("d")
    assert (d["point"], d["sample"]) == ("bad", 1)
    trials.append(_trial("d", d, "RUNNING"))
    for t in trials:
        t.status = "TERMINATED"
    trials[0].status = "RUNNING"
    searcher.sync(trials)
    assert searcher.suggest("e") is None  # every sample handed out, one still running
    trials[0].status = "ERROR"
    searcher.sync(trials)
    assert searcher.suggest("e") == Searcher.FINISHED


def _sched_trial(tid, point):
    return _trial(tid, {POINT_KEY: point, "sample": 0})


def test_scheduler_ranks_trials_only_against_their_own_point():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    pts = _two_points()
    scheduler = PointScheduler(pts, grace_period=1, reduction_factor=2)
    assert scheduler.milestones["good"] == [1, 2]  # as Ray Tune's ASHA: grace 1, factor 2, 3 epochs
    shared = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=3,
                           grace_period=1, reduction_factor=2)  # what one ASHA for all would do
    # The "bad" point here reports high accuracies first; the "good" point's trials are worse.
    sequence = [("b1", "bad", 95.0), ("b2", "bad", 96.0), ("b3", "bad", 97.0),
                ("a1", "good", 50.0), ("a2", "good", 40.0), ("a3", "good", 44.0)]
    decisions, shared_decisions = {}, {}
    for tid, point, val in sequence:
        trial = _sched_trial(tid, point)
        shared.on_trial_add(None, trial)
        result = {"epoch": 1, "val_acc": val}
        decisions[tid] = scheduler.on_trial_result(None, trial, result)
        shared_decisions[tid] = shared.on_trial_result(None, trial, result)
    assert shared_decisions["a1"] == TrialScheduler.STOP  # one ASHA: stopped by the other point
    assert decisions["a1"] == TrialScheduler.CONTINUE     # per point: first of its rung
    assert decisions["a2"] == TrialScheduler.STOP         # ...and ranked against a1 only
    assert decisions["a3"] == TrialScheduler.STOP         # below the median of 50 and 40
    # Within one point the rule is Ray Tune's ASHA's.
    alone = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=3,
                          grace_period=1, reduction_factor=2)
    for tid, point, val in sequence[3:]:
        trial = _sched_trial(tid, point)
        alone.on_trial_add(None, trial)
        assert alone.on_trial_result(None, trial, {"epoch": 1, "val_acc": val}) == decisions[tid]
    assert scheduler.stopped["good"] == [("a2", 1), ("a3", 1)]
    assert scheduler.recorded["good"][1] == {"a1": 50.0, "a2": 40.0, "a3": 44.0}
    assert set(scheduler.recorded["bad"][1]) == {"b1", "b2", "b3"}


def test_scheduler_rebuilt_from_the_reports_in_storage(tmp_path):
    """After a resume the scheduler's records come back from the restored trials' reports (up to
    the epoch each was restored at), so it stops what it would have stopped."""
    import pyarrow.fs as pafs
    from ray.tune.schedulers import TrialScheduler

    pts = _two_points()
    live = PointScheduler(pts, grace_period=1, reduction_factor=2)
    trials = []
    for tid, vals in (("a1", [50.0, 60.0, 61.0]), ("a2", [55.0, 70.0])):
        folder = tmp_path / tid
        folder.mkdir()
        rows = [{"epoch": e, "val_acc": v} for e, v in enumerate(vals, 1)]
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        trial = _trial(tid, {POINT_KEY: "good", "sample": len(trials)}, "PENDING", rows[-1],
                       SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(),
                                       trial_fs_path=str(folder)))
        for r in rows:
            live.on_trial_result(None, trial, r)
        trials.append(trial)
    # A report after the restored epoch (a2's epoch 3, lost with the driver) is not counted.
    with open(tmp_path / "a2" / "result.json", "a") as f:
        f.write(json.dumps({"epoch": 3, "val_acc": 99.0}) + "\n")
    rebuilt = PointScheduler(pts, grace_period=1, reduction_factor=2)
    rebuilt.sync(trials)
    assert rebuilt.recorded == live.recorded
    newcomer = _sched_trial("a3", "good")
    assert rebuilt.on_trial_result(None, newcomer, {"epoch": 1, "val_acc": 51.0}) == \
        live.on_trial_result(None, newcomer, {"epoch": 1, "val_acc": 51.0}) == TrialScheduler.STOP


def test_figure_points_live_in_search_plan_alone():
    """--search --dry-run plans without Ray (search_plan); the search uses the same objects."""
    import iterand_tune.search as search
    import iterand_tune.search_plan as plan

    assert search.points is plan.points and search.Point is plan.Point
    assert search.default_grace_period is plan.default_grace_period


def test_grace_period_and_initial_points_defaults():
    assert [default_grace_period(e) for e in (1, 9, 10, 100)] == [1, 1, 1, 10]
    assert [n_initial_points(n) for n in (1, 8, 20, 200)] == [2, 2, 5, 20]


def test_best_config_table_round_trip_and_reproduction(tmp_path):
    pts = _two_points()
    rows = []
    for p, acc in zip(pts, (80.0, 12.0)):
        trial = p.trial({"lr": 0.2 if p.name == "good" else 5e-7})
        rows.append(dict(point=p.name, experiment=trial["experiment"], model=trial["model"],
                         method="edgepopup", searched={"lr": trial["lr"]}, best_val_acc=acc,
                         best_epoch=3, epochs_trained=3, max_epochs=3, trial_id="x", trials=3,
                         epochs_spent=7, config={k: v for k, v in trial.items() if k != "experiment"}))
    written = write_best_configs(rows, str(tmp_path / "run"))
    import pandas as pd

    table = pd.read_parquet(written[0])
    assert list(table["point"]) == ["good", "bad"] and list(table["lr"]) == [0.2, 5e-7]
    back = json.loads((tmp_path / "run" / "best_configs.json").read_text())
    assert back == rows
    experiments = reproduction(back)
    assert [len(e) for e in experiments] == [3, 3]
    assert all(t["evaluate_test"] and t["lr"] in (0.2, 5e-7) for e in experiments for t in e.trials())
    assert sorted(t["seed"] for t in experiments[0].trials()) == [1, 2, 3]
    # Storage may be a URI: the table goes through pyarrow filesystems.
    uri = f"file://{tmp_path}/uri_run"
    assert write_best_configs(rows, uri)[0] == uri + "/best_configs.parquet"
    assert json.loads((tmp_path / "uri_run" / "best_configs.json").read_text()) == back


# ------------------------------------------------------------------ real searches (Ray)

def write_search_file(folder, epochs):
    """Two figure points on digits: `good` searches sensible learning rates, `bad` absurd ones."""
    return write_digits(str(folder), {"tiny_good": {}, "tiny_bad": {}}, grid=dict(seed=[1, 2]),
                        search={"tiny_good": {"lr": "LogUniform(0.05, 0.5)"},
                                "tiny_bad": {"lr": "LogUniform(1e-7, 1e-6)"}},
                        epochs=epochs, debug_max_iters=6, debug_max_eval_iters=1)


@pytest.fixture(scope="module")
def killed_search(ray_cluster, tmp_path_factory):
    """One real search of the two points, two trials each, ASHA from epoch 1, two trials at a
    time, whose driver is killed with SIGKILL part-way (one trial done, another running) and
    then resumed to the end. Both tests below read it."""
    folder = tmp_path_factory.mktemp("search")
    exp = write_search_file(folder, epochs=3)
    run_dir = folder / "r" / "killed"
    argv = [exp, "--search", "--num-samples", "2", "--grace-period", "1", "--reduction-factor", "2",
            "--address", ray_cluster, "--storage-path", str(folder / "r"), "--name", "killed",
            "--cpus-per-trial", "0.5", "--max-concurrent", "2"]

    def one_done_one_part_way():
        states = trial_states(run_dir)
        return any(s == "TERMINATED" for s, _ in states.values()) and any(
            s != "TERMINATED" and e >= 1 for s, e in states.values())

    kill_driver_when(argv, one_done_one_part_way, "one trial done and another part-way")
    written_before_resume = (run_dir / "best_configs.json").exists()
    out = resume(argv)
    return SimpleNamespace(exp=exp, run_dir=run_dir, out=out,
                           written_before_resume=written_before_resume)


@pytest.mark.slow
def test_search_killed_and_resumed_completes(killed_search):
    run_dir = killed_search.run_dir
    assert not killed_search.written_before_resume
    trials = run_rows(run_dir)
    assert len(trials) == 4  # the budget, not more: the searcher resumed with its state
    for tid, rows in trials.items():
        epochs = [r["epoch"] for r in rows]
        assert sorted(set(epochs)) == list(range(1, max(epochs) + 1)), (tid, epochs)
    run = read_run(str(run_dir))
    assert not run.skipped and all(t.ended for t in run.trials)
    assert sorted(t.slot for t in run.trials) == [("search", p, k) for p in ("tiny_bad", "tiny_good")
                                                  for k in (0, 1)]
    assert sorted(r["point"] for r in searched_best(str(run_dir))) == ["tiny_bad", "tiny_good"]


@pytest.mark.slow
def test_search_of_two_points_keeps_them_apart(killed_search, capsys):
    run_dir, out = killed_search.run_dir, killed_search.out
    trials = run_rows(run_dir)
    run = read_run(str(run_dir))
    point_of = {t.trial_id: t.slot[1] for t in run.trials}
    assert sorted(point_of.values()) == ["tiny_bad"] * 2 + ["tiny_good"] * 2
    for t in run.trials:
        assert all("test_acc" not in r for r in t.rows)  # the test set is never touched
        assert t.config["seed"] == 1 and t.config["experiment"] == point_of[t.trial_id]

    # Each point's TPE saw only its own point's samples; the good point's trials all trained to
    # the end or were stopped by its own ASHA, never by the hopeless point's.
    for t in read_run(str(run_dir)).trials:
        assert set(t.seen) <= {0, 1} and t.seen == tuple(sorted(t.seen))

    # One row per point in the table, the best trial by best_val_acc.
    import pandas as pd

    table = pd.read_parquet(run_dir / "best_configs.parquet")
    assert sorted(table["point"]) == ["tiny_bad", "tiny_good"]
    good = table.set_index("point").loc["tiny_good"]
    best = max(rows[-1]["best_val_acc"] for t, rows in trials.items() if point_of[t] == "tiny_good")
    assert good["best_val_acc"] == best and 0.05 <= good["lr"] <= 0.5
    assert good["epochs_spent"] == sum(rows[-1]["epoch"] for t, rows in trials.items()
                                       if point_of[t] == "tiny_good")
    assert "best val %" in out and "--from-search" in out

    # --from-search expands every point to seeds 1, 2, 3 with its best configuration.
    rc = main([killed_search.exp, "--from-search", str(run_dir), "--dry-run", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 6
    for name in ("tiny_good", "tiny_bad"):
        mine = [t for t in lines if t["experiment"] == name]
        assert sorted(t["seed"] for t in mine) == [1, 2, 3]
        assert {t["lr"] for t in mine} == {float(table.set_index("point").loc[name, "lr"])}
        assert all(t["evaluate_test"] for t in mine)

    # ... reading the search's folder without torch or Ray, as every --dry-run does.
    code = ("import contextlib, io, sys\nfrom iterand_tune.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = main([{killed_search.exp!r}, '--from-search', {str(run_dir)!r}, '--dry-run'])\n"
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'hyperopt'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[0] == "0 []", proc.stdout + proc.stderr


def test_best_row_never_chooses_a_diverged_or_errored_trial():
    def sample(lr, best, epoch, status="finished", **extra):
        config = dict(experiment="p", dataset="digits", model="conv6x0.25", lr=lr)
        return config, dict(best_val_acc=best, epoch=epoch, best_epoch=epoch, trial_id=f"t{lr}", **extra), status

    trials = [sample(0.1, 60.0, 3), sample(0.2, 90.0, 2, "errored"), sample(0.3, 95.0, 1, diverged=True),
              sample(0.4, 60.0, 2, "stopped")]
    row = best_row("p", ["lr"], 3, trials)
    # 0.2 and 0.3 score higher but errored and diverged; of the two at 60%, the longer-trained wins.
    assert (row["searched"], row["trial_id"], row["trials"], row["epochs_spent"]) == ({"lr": 0.1}, "t0.1", 4, 8)
    assert best_row("p", ["lr"], 3, trials[1:3]) is None
