"""Tests for iterand_tune.search: figure points, the per-point searcher (one TPE each) and
scheduler (one ASHA each) driven directly, the best-configuration table and its reproduction,
and one real search on digits, read by two tests: two points where one is hopeless, its
driver killed and resumed, the best configurations and `--from-search`."""
from __future__ import annotations

import json
import os
import pickle
from types import SimpleNamespace

import pytest
from ray import cloudpickle

from iterand_tune.cli import main
from iterand_tune.experiments import Experiment, load
from iterand_tune.search import (POINT_KEY, PointScheduler, PointSearcher, default_grace_period,
                                 n_initial_points, point_seed, points, read_best_configs,
                                 reproduction, write_best_configs)
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


def test_searcher_gives_each_point_its_own_tpe_round_robin():
    from ray.tune.search import Searcher

    pts = _two_points()
    searcher = PointSearcher(pts, num_samples=3, seed=7)
    configs = {}
    for i in range(7):
        config = searcher.suggest(f"t{i}")
        if i == 6:
            assert config == Searcher.FINISHED  # every point has used its budget
            break
        configs[f"t{i}"] = config
    assert [c[POINT_KEY] for c in configs.values()] == ["good", "bad"] * 3
    assert all(c["trial"]["evaluate_test"] is False and c["trial"]["seed"] == 1
               for c in configs.values())
    assert all(0.05 <= c["trial"]["lr"] <= 0.5 for c in configs.values() if c[POINT_KEY] == "good")
    for tid, c in configs.items():
        val = 90.0 if c[POINT_KEY] == "good" else 10.0
        searcher.on_trial_complete(tid, {"val_acc": val, "epoch": 3})
    tpe = searcher.tpe
    assert tpe["good"] is not tpe["bad"]
    for name, val in (("good", -90.0), ("bad", -10.0)):  # HyperOpt minimises -val_acc
        losses = [t["result"]["loss"] for t in tpe[name]._hpopt_trials.trials]
        assert losses == [val] * 3  # each TPE saw its own point's three results only
    assert tpe["good"].rstate.get_state()[1].tolist() != tpe["bad"].rstate.get_state()[1].tolist()
    assert point_seed(7, "good") == point_seed(7, "good") != point_seed(8, "good")

    # Fixed seeds: the same search proposes the same configurations (given the same results).
    again = PointSearcher(pts, num_samples=3, seed=7)
    assert [again.suggest(f"t{i}")["trial"]["lr"] for i in range(2)] == \
        [configs[f"t{i}"]["trial"]["lr"] for i in range(2)]

    # The saved state restores both TPEs and the bookkeeping.
    restored = PointSearcher(pts, num_samples=3, seed=7)
    restored.set_state(searcher.get_state())
    assert restored.issued == {"good": 3, "bad": 3}
    assert len(restored.tpe["bad"]._hpopt_trials.trials) == 3


def _trial(tid, point):
    return SimpleNamespace(trial_id=tid, config={POINT_KEY: point})


def test_scheduler_ranks_trials_only_against_their_own_point():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    pts = _two_points()
    scheduler = PointScheduler(pts, grace_period=1, reduction_factor=2)
    shared = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=3,
                           grace_period=1, reduction_factor=2)  # what one ASHA for all would do
    # The "bad" point here reports high accuracies first; the "good" point's trials are worse.
    sequence = [("b1", "bad", 95.0), ("b2", "bad", 96.0), ("b3", "bad", 97.0),
                ("a1", "good", 50.0), ("a2", "good", 40.0)]
    decisions, shared_decisions = {}, {}
    for tid, point, val in sequence:
        trial = _trial(tid, point)
        scheduler.on_trial_add(None, trial)
        shared.on_trial_add(None, trial)
        result = {"epoch": 1, "val_acc": val}
        decisions[tid] = scheduler.on_trial_result(None, trial, result)
        shared_decisions[tid] = shared.on_trial_result(None, trial, result)
    assert shared_decisions["a1"] == TrialScheduler.STOP  # one ASHA: stopped by the other point
    assert decisions["a1"] == TrialScheduler.CONTINUE     # per point: first of its rung
    assert decisions["a2"] == TrialScheduler.STOP         # ...and ranked against a1 only
    assert scheduler.stopped["good"] == [("a2", 1)]
    for name, ids in (("good", {"a1", "a2"}), ("bad", {"b1", "b2", "b3"})):
        recorded = {t for _, rung in scheduler.asha[name]._brackets[0]._rungs for t in rung}
        assert recorded == ids
    assert scheduler.asha["good"]._max_t == 3
    # State round trip (saved with the searcher's state on every experiment checkpoint).
    copy = PointScheduler(pts, grace_period=1, reduction_factor=2)
    copy.set_state(scheduler.get_state())
    assert copy.members == {"good": {"a1", "a2"}, "bad": {"b1", "b2", "b3"}}
    assert copy.stopped == scheduler.stopped
    assert copy.on_trial_result(None, _trial("a3", "good"), {"epoch": 1, "val_acc": 30.0}) \
        == TrialScheduler.STOP


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
    back = read_best_configs(str(tmp_path / "run"))
    experiments = reproduction(back)
    assert [len(e) for e in experiments] == [3, 3]
    assert all(t["evaluate_test"] and t["lr"] in (0.2, 5e-7) for e in experiments for t in e.trials())
    assert sorted(t["seed"] for t in experiments[0].trials()) == [1, 2, 3]
    # Storage may be a URI: the table goes through pyarrow filesystems.
    uri = f"file://{tmp_path}/uri_run"
    assert write_best_configs(rows, uri)[0] == uri + "/best_configs.parquet"
    assert read_best_configs(uri) == back


# ------------------------------------------------------------------ real searches (Ray)

def write_search_file(folder, epochs):
    """Two figure points on digits: `good` searches sensible learning rates, `bad` absurd ones."""
    return write_digits(str(folder), {"tiny_good": {}, "tiny_bad": {}}, grid=dict(seed=[1, 2]),
                        search={"tiny_good": {"lr": "LogUniform(0.05, 0.5)"},
                                "tiny_bad": {"lr": "LogUniform(1e-7, 1e-6)"}},
                        epochs=epochs, debug_max_iters=6, debug_max_eval_iters=1)


def _searcher_state(run_dir):
    """The searcher's newest saved state, its TPEs' and ASHAs' states unpacked."""
    newest = max(p for p in os.listdir(run_dir) if p.startswith("searcher-state-"))
    with open(os.path.join(run_dir, newest), "rb") as f:
        state = cloudpickle.load(f)
    state["tpe"] = {n: cloudpickle.loads(b) for n, b in state["tpe"].items()}
    state["scheduler"]["asha"] = {n: pickle.loads(b) for n, b in state["scheduler"]["asha"].items()}
    return state


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
    state = _searcher_state(run_dir)
    assert state["issued"] == {"tiny_good": 2, "tiny_bad": 2}
    assert sorted(r["point"] for r in read_best_configs(str(run_dir))) == ["tiny_bad", "tiny_good"]


@pytest.mark.slow
def test_search_of_two_points_keeps_them_apart(killed_search, capsys):
    run_dir, out = killed_search.run_dir, killed_search.out
    trials = run_rows(run_dir)
    point_of = {tid: rows[-1]["config"][POINT_KEY] for tid, rows in trials.items()}
    assert sorted(point_of.values()) == ["tiny_bad"] * 2 + ["tiny_good"] * 2
    for tid, rows in trials.items():
        assert all("test_acc" not in r for r in rows)  # the test set is never touched
        assert rows[-1]["config"]["trial"]["seed"] == 1
        assert rows[-1]["config"]["trial"]["experiment"] == point_of[tid]

    state = _searcher_state(run_dir)
    # Each point's TPE saw its own two trials, and nothing else.
    for name in ("tiny_good", "tiny_bad"):
        mine = {t for t, p in state["owner"].items() if p == name}
        assert mine == {t for t, p in point_of.items() if p == name}
        assert len(state["tpe"][name]["_hpopt_trials"].trials) == 2
    # Each point's ASHA ranked only its own trials: the hopeless point never stopped a good one.
    for name, asha in state["scheduler"]["asha"].items():
        recorded = {t for _, rung in asha["_brackets"][0]._rungs for t in rung}
        assert recorded and all(point_of[t] == name for t in recorded), name
    for name, stopped in state["scheduler"]["stopped"].items():
        assert all(point_of[t] == name for t, _ in stopped)
    assert set(state["scheduler"]["members"]) == {"tiny_good", "tiny_bad"}

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
