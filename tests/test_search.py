"""Tests for iterand_tune.search: search-space domains and their validation, figure points, the
per-point searcher (one TPE each) and scheduler (one ASHA each) driven directly, and real
searches on digits: two points where one is hopeless, the best-config table, `--from-search`,
and a search whose driver is killed and resumed."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from iterand_tune.cli import main
from iterand_tune.experiments import Experiment, ExperimentError, load
from iterand_tune.search import (POINT_KEY, Choice, LogUniform, QUniform, Uniform, make_scheduler,
                                 make_searcher, point_seed, points, read_best_configs,
                                 reproduction, write_best_configs)

from helpers import trial_states

ROOT = os.path.join(os.path.dirname(__file__), "..")
BASE = dict(dataset="digits", model="conv6x0.25", epochs=3, batch_size=64, train_augmentation=False,
            train_mode="score_only", bn_affine=False, conv_sparsity=0.5, lr=0.3)


# ------------------------------------------------------------------ domains and points

def test_importing_the_domains_does_not_import_ray():
    code = "import sys, iterand_tune.search; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("search, message", [
    (dict(seed=Choice([1, 2])), "'seed' is a grid axis"),
    (dict(model=Choice(["conv6x0.5"])), "'model' is a grid axis"),
    (dict(lerning_rate=LogUniform(0.1, 1)), "unknown TrialConfig option 'lerning_rate'"),
    (dict(lr=0.1), "must be a domain of iterand_tune.search"),
    (dict(conv_sparsity=Uniform(0.5, 1.5)), "search['conv_sparsity'] allows 1.5"),
])
def test_bad_search_spaces_are_refused(search, message):
    with pytest.raises(ExperimentError) as err:
        Experiment("x", BASE, dict(model=["conv6x0.25"], seed=[1, 2]), search=search)
    assert message in str(err.value)


def test_domains_check_their_bounds():
    for make in (lambda: LogUniform(0, 1), lambda: Uniform(1, 1), lambda: QUniform(5, 40, 4),
                 lambda: Choice([])):
        with pytest.raises(ExperimentError):
            make()
    assert QUniform(5, 40, 5).clip(23.2) == 25 and QUniform(5, 40, 5).clip(99) == 40
    assert LogUniform(0.01, 1).clip(2.0) == 1


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
    searcher = make_searcher(pts, num_samples=3, seed=7)
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
    again = make_searcher(pts, num_samples=3, seed=7)
    assert [again.suggest(f"t{i}")["trial"]["lr"] for i in range(2)] == \
        [configs[f"t{i}"]["trial"]["lr"] for i in range(2)]

    # The saved state restores both TPEs and the bookkeeping.
    restored = make_searcher(pts, num_samples=3, seed=7)
    restored.set_state(searcher.get_state())
    assert restored.issued == {"good": 3, "bad": 3}
    assert len(restored.tpe["bad"]._hpopt_trials.trials) == 3


def _trial(tid, point):
    return SimpleNamespace(trial_id=tid, config={POINT_KEY: point})


def test_scheduler_ranks_trials_only_against_their_own_point():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    pts = _two_points()
    scheduler = make_scheduler(pts, grace_period=1, reduction_factor=2)
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
    copy = make_scheduler(pts, grace_period=1, reduction_factor=2)
    copy.set_state(scheduler.get_state())
    assert copy.on_trial_result(None, _trial("a3", "good"), {"epoch": 1, "val_acc": 30.0}) \
        == TrialScheduler.STOP


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


def test_search_user_errors_are_one_line(tmp_path, capsys):
    plain = tmp_path / "plain.py"
    plain.write_text("from iterand_tune.experiments import Experiment\n"
                     "EXPERIMENTS = [Experiment('p', dict(dataset='digits'), dict(seed=[1]))]\n")
    for argv, message in (
            ([str(plain), "--search", "--dry-run"], "defines no search space"),
            ([str(plain), "--from-search", str(tmp_path), "--dry-run"], "holds no readable best_configs.json"),
            ([str(plain), "--num-samples", "3"], "go(es) with --search"),
            ([str(plain), "--search", "--reduction-factor", "1"], "must be > 1"),
            ([str(plain), "--search", "--from-search", str(tmp_path)], "two steps")):
        rc = main(argv)
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)


# ------------------------------------------------------------------ real searches (Ray)

def write_search_file(folder, epochs=3):
    """Two figure points on digits: `good` searches sensible learning rates, `bad` absurd ones."""
    path = folder / "tiny.py"
    path.write_text(textwrap.dedent(f"""
        from iterand_tune.experiments import Experiment
        from iterand_tune.search import LogUniform
        BASE = dict(dataset="digits", model="conv6x0.25", epochs={epochs}, batch_size=64,
                    train_augmentation=False, train_mode="score_only", bn_affine=False,
                    conv_sparsity=0.5, lr=0.3, debug_max_iters=6, debug_max_eval_iters=1)
        EXPERIMENTS = [
            Experiment("tiny_good", BASE, dict(seed=[1, 2]), search=dict(lr=LogUniform(0.05, 0.5))),
            Experiment("tiny_bad", BASE, dict(seed=[1, 2]), search=dict(lr=LogUniform(1e-7, 1e-6))),
        ]
    """))
    return path


def _trial_rows(run_dir):
    out = {}
    for d in glob.glob(os.path.join(run_dir, "tiny_*")):
        if not os.path.exists(os.path.join(d, "result.json")):
            continue  # a trial the killed driver created after its last experiment checkpoint
        with open(os.path.join(d, "result.json")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows:
            out[rows[-1]["trial_id"]] = rows
    return out


def _searcher_state(run_dir):
    from ray import cloudpickle

    newest = max(glob.glob(os.path.join(run_dir, "searcher-state-*.pkl")))
    with open(newest, "rb") as f:
        return cloudpickle.load(f)


@pytest.mark.slow
def test_search_of_two_points_keeps_them_apart(ray_cluster, tmp_path, capsys):
    exp = write_search_file(tmp_path)
    rc = main([str(exp), "--search", "--num-samples", "4", "--grace-period", "1",
               "--reduction-factor", "2", "--storage-path", str(tmp_path / "r"), "--name", "s",
               "--cpus-per-trial", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    run_dir = tmp_path / "r" / "s"
    trials = _trial_rows(run_dir)
    assert len(trials) == 8
    point_of = {tid: rows[-1]["config"][POINT_KEY] for tid, rows in trials.items()}
    assert sorted(point_of.values()) == ["tiny_bad"] * 4 + ["tiny_good"] * 4
    for tid, rows in trials.items():
        assert all("test_acc" not in r for r in rows)  # the test set is never touched
        assert rows[-1]["config"]["trial"]["seed"] == 1
        assert rows[-1]["config"]["trial"]["experiment"] == point_of[tid]

    state = _searcher_state(run_dir)
    # Each point's TPE saw its own four trials, and nothing else.
    for name in ("tiny_good", "tiny_bad"):
        mine = {t for t, p in state["owner"].items() if p == name}
        assert mine == {t for t, p in point_of.items() if p == name}
        assert len(state["tpe"][name]["_hpopt_trials"].trials) == 4
    # Each point's ASHA ranked only its own trials: the hopeless point never stopped a good one.
    import pickle

    ashas = pickle.loads(state["scheduler"]["asha"])
    for name, asha in ashas.items():
        recorded = {t for _, rung in asha["_brackets"][0]._rungs for t in rung}
        assert recorded and all(point_of[t] == name for t in recorded), name
    for name, stopped in state["scheduler"]["stopped"].items():
        assert all(point_of[t] == name for t, _ in stopped)

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
    rc = main([str(exp), "--from-search", str(run_dir), "--dry-run", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 6
    for name in ("tiny_good", "tiny_bad"):
        mine = [t for t in lines if t["experiment"] == name]
        assert sorted(t["seed"] for t in mine) == [1, 2, 3]
        assert {t["lr"] for t in mine} == {float(table.set_index("point").loc[name, "lr"])}
        assert all(t["evaluate_test"] for t in mine)


@pytest.mark.slow
def test_search_killed_and_resumed_completes(ray_cluster, tmp_path):
    exp = write_search_file(tmp_path, epochs=4)
    storage = tmp_path / "r"
    base = [sys.executable, "-m", "iterand_tune", str(exp), "--search", "--num-samples", "3",
            "--grace-period", "2", "--address", ray_cluster, "--storage-path", str(storage),
            "--name", "killed", "--cpus-per-trial", "0.5", "--max-concurrent", "2"]
    run_dir = storage / "killed"
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, states = time.time() + 300, {}
    try:
        while time.time() < deadline:  # one trial done, another part-way: kill the driver
            states = trial_states(run_dir)
            if any(s == "TERMINATED" for s, _ in states.values()) and any(
                    s != "TERMINATED" and e >= 1 for s, e in states.values()):
                break
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail(f"no mid-run moment seen: {states}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "best_configs.json").exists()

    done = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming killed" in done.stdout
    trials = _trial_rows(run_dir)
    assert len(trials) == 6  # the budget, not more: the searcher resumed with its state
    for tid, rows in trials.items():
        epochs = [r["epoch"] for r in rows]
        assert sorted(set(epochs)) == list(range(1, max(epochs) + 1)), (tid, epochs)
    state = _searcher_state(run_dir)
    assert state["issued"] == {"tiny_good": 3, "tiny_bad": 3}
    assert sorted(r["point"] for r in read_best_configs(str(run_dir))) == ["tiny_bad", "tiny_good"]


def test_resume_must_match_the_kind_of_run(tmp_path, capsys):
    exp = write_search_file(tmp_path)
    run_dir = tmp_path / "r" / "s"
    run_dir.mkdir(parents=True)
    (run_dir / "search_gen_state-2026-11-28_12-00-00.json").write_text("{}")
    rc = main([str(exp), "--storage-path", str(tmp_path / "r"), "--name", "s", "--resume"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "resume it with --search --resume" in err[0]
    plain = tmp_path / "r" / "p"
    plain.mkdir()
    rc = main([str(exp), "--search", "--storage-path", str(tmp_path / "r"), "--name", "p", "--resume"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "not a search run" in err[0]
