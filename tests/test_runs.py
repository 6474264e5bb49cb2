"""Tests for iterand_tune.runs, the one reader of a run's folder, on hand-written folders in the
real on-disk layout: run.json, Ray Tune's experiment states (newest readable first), trial folders
with result.json and checkpoints holding every report so far, a grid point with two folders
(counted once, the other named), planned points without a trial, and a search's order. Real runs
are read in test_tune.py, test_search.py, test_analysis.py and the kill-and-resume tests."""
from __future__ import annotations

import json

import pytest

from iterand_tune.runs import (REPORTS_FILE, ReadError, merge_reports, read_marker, read_run,
                               state_files, write_marker)
from iterand_tune.storage import TRIAL_KEY, open_storage

TRIAL = dict(experiment="e", model="conv6x0.25", seed=1, epochs=3, evaluate_test=True,
             train_mode="score_only", rerand_mode=None, rerand_lambda=0.1,
             init_mode="kaiming_uniform")


def trial(seed: int, **kw) -> dict:
    return {**TRIAL, "seed": seed, **kw}


def state_item(trial_id, status, config, folder=None, epoch=None, as_text=True):
    """One entry of `trial_data` as Ray Tune 2.60 writes it: the trial and its runtime metadata,
    each a JSON string (or, for configs it cannot write as JSON, a pickle we never unpickle)."""
    item = {"trial_id": trial_id, "status": status, "config": config, "relative_logdir": folder}
    meta = {"last_result": {"epoch": epoch} if epoch is not None else {}}
    return [json.dumps(item), json.dumps(meta)] if as_text else [item, meta]


def write_state(run, stamp, items):
    path = run / f"experiment_state-{stamp}.json"
    path.write_text(json.dumps({"trial_data": items, "runner_data": {}}))
    return path


def write_trial(run, folder, config, epochs, checkpoint_epochs=(), test_acc=None, error=None):
    """A trial's folder: params.json, result.json with `epochs`' reports, and a checkpoint per
    epoch in `checkpoint_epochs` holding every report up to it."""
    d = run / folder
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(config))
    rows = [dict(epoch=e, val_acc=10.0 * e, trial_id=folder.rsplit("-", 1)[-1], timestamp=100 + e)
            for e in epochs]
    if rows and test_acc is not None:
        rows[-1]["test_acc"] = test_acc
    (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, e in enumerate(checkpoint_epochs):
        c = d / f"checkpoint_{i:06d}"
        c.mkdir()
        reports = [dict(epoch=k, val_acc=10.0 * k) for k in range(1, e + 1)]
        if e == TRIAL["epochs"] and test_acc is not None:
            reports[-1]["test_acc"] = test_acc
        (c / REPORTS_FILE).write_text(json.dumps(reports))
    if error:
        (d / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    return d


def test_state_files_newest_first_unreadable_flagged(tmp_path):
    write_state(tmp_path, "2026-01-01_00-00-00", [state_item("a", "RUNNING", {}, epoch=1)])
    (tmp_path / "experiment_state-2026-01-01_00-05-00.json").write_text('{"trial_data": [["{')
    (tmp_path / "experiment_state-2026-01-01_00-06-00.json").write_text('{"other": 1}')
    write_state(tmp_path, "2026-01-01_00-07-00", [
        state_item("b", "ERROR", {"__pickled__": "gAS..."}, epoch=2, as_text=False)])
    fs, root = open_storage(str(tmp_path))
    states = state_files(fs, root, [p.name for p in tmp_path.iterdir()] + ["notes.json"])
    assert [s.session for s in states] == ["2026-01-01_00-07-00", "2026-01-01_00-06-00",
                                           "2026-01-01_00-05-00", "2026-01-01_00-00-00"]
    assert [s.trials is None for s in states] == [False, True, True, False]
    assert states[1].problem and states[2].problem  # what is wrong with it, for the user
    # A config Ray stored as a pickle is not unpickled: no trial config rather than a guess.
    (b,) = states[0].trials
    assert (b["trial_id"], b["status"], b["logdir"], b["last_result"]) == ("b", "ERROR", None,
                                                                            {"epoch": 2})
    assert TRIAL_KEY not in b["config"]


def grid_run(tmp_path):
    """A grid run of three planned trials: seed 1 finished; seed 2 with two folders (the one the
    state names has run further); seed 3 not created yet."""
    run = tmp_path / "run"
    run.mkdir()
    planned = [trial(1), trial(2), trial(3)]
    write_marker(str(run), {"kind": "grid", "trials": planned})
    one = {TRIAL_KEY: planned[0], "index": 0}
    two = {TRIAL_KEY: planned[1], "index": 1}
    write_trial(run, "e-conv6x0.25-seed1-aaa", one, [1, 2, 3], [3], test_acc=91.0)
    write_trial(run, "e-conv6x0.25-seed2-bbb", two, [1, 2], [2])
    write_trial(run, "e-conv6x0.25-seed2-ccc", two, [1], [1])  # started after the last save
    write_state(run, "2026-01-01_00-00-00", [
        state_item("aaa", "TERMINATED", one, "e-conv6x0.25-seed1-aaa", 3),
        state_item("bbb", "RUNNING", two, "e-conv6x0.25-seed2-bbb", 2)])
    return run


def test_a_grid_run_in_grid_order_one_folder_per_point(tmp_path):
    run = read_run(str(grid_run(tmp_path)))
    assert run.kind == "grid" and run.state == "experiment_state-2026-01-01_00-00-00.json"
    assert [t.slot for t in run.trials] == [("grid", 0), ("grid", 1), ("grid", 2)]
    assert [t.trial_id for t in run.trials] == ["aaa", "bbb", None]
    assert [t.status for t in run.trials] == ["finished", "running", "pending"]
    assert [len(t.rows) for t in run.trials] == [3, 2, 0]
    assert run.trials[0].record()["test_acc"] == 91.0 and run.trials[2].config["seed"] == 3
    assert [t.trial_id for t in run.started] == ["aaa", "bbb"]
    (note,) = run.notes()
    assert "seed2-ccc" in note and "a second folder of grid point 1" in note and "seed2-bbb" in note


def test_the_files_are_newer_than_the_state(tmp_path):
    """A trial that finished after the state's last save is finished; without any state the
    statuses come from the files (error.txt: errored)."""
    run = grid_run(tmp_path)
    write_trial(run, "e-conv6x0.25-seed3-ddd", {TRIAL_KEY: trial(3), "index": 2}, [1, 2, 3],
                test_acc=88.0)
    assert read_run(str(run)).trials[2].status == "finished"
    for p in run.glob("experiment_state-*"):
        p.unlink()
    write_trial(run, "e-conv6x0.25-seed9-eee", {TRIAL_KEY: trial(9), "index": 7}, [1],
                error="DataError: no data")
    statuses = {t.trial_id: t.status for t in read_run(str(run)).trials}
    assert statuses == {"aaa": "finished", "bbb": "running", "ddd": "finished", "eee": "errored"}


def test_reports_in_the_checkpoint_fill_what_result_json_lost(tmp_path):
    """A result.json copied to storage before it got its last lines (or written anew by a resumed
    driver) loses nothing: the newest checkpoint holds every report up to it."""
    run = tmp_path / "run"
    run.mkdir()
    write_marker(str(run), {"kind": "grid", "trials": [trial(1)]})
    d = write_trial(run, "e-conv6x0.25-seed1-aaa", {TRIAL_KEY: trial(1), "index": 0}, [3],
                    [2, 3], test_acc=90.0)
    (t,) = read_run(str(run)).trials
    assert [r["epoch"] for r in t.rows] == [1, 2, 3] and t.status == "finished"
    assert t.rows[-1]["trial_id"] == "aaa"  # result.json's report, with Ray's keys, wins
    (d / "result.json").unlink()
    (t,) = read_run(str(run)).trials
    assert [r["epoch"] for r in t.rows] == [1, 2, 3] and t.record()["test_acc"] == 90.0


def test_merge_reports_keeps_the_later_report_of_an_epoch():
    first = [dict(epoch=1, v=1), dict(epoch=2, v=2), dict(epoch=1, v=10)]  # epoch 1 re-run
    assert merge_reports(first, [dict(epoch=3, v=3), dict(epoch=2, v=99)]) == [
        dict(epoch=1, v=10), dict(epoch=2, v=2), dict(epoch=3, v=3)]


def test_a_search_in_point_then_sample_order(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_marker(str(run), {"kind": "search", "points": ["p2", "p1"], "num_samples": 2})
    for point, sample, name in (("p1", 0, "a"), ("p2", 1, "b"), ("p2", 0, "c"), ("p1", 1, "d")):
        write_trial(run, f"{point}-conv6x0.25-seed1-{name}",
                    {TRIAL_KEY: trial(1, experiment=point, evaluate_test=False), "point": point,
                     "sample": sample, "order": ord(name), "seen": [0] if sample else []}, [1, 2, 3])
    r = read_run(str(run))
    assert [t.trial_id for t in r.trials] == ["c", "b", "a", "d"]
    assert [t.status for t in r.trials] == ["finished"] * 4  # all epochs, no test set in a search
    assert r.trials[1].seen == (0,) and r.trials[1].order == ord("b")


def test_marker_round_trip_and_unreadable_paths(tmp_path):
    write_marker(str(tmp_path / "r"), {"kind": "grid", "trials": []})
    assert read_marker(str(tmp_path / "r")) == {"kind": "grid", "trials": []}
    assert read_marker(f"file://{tmp_path}/r") == {"kind": "grid", "trials": []}
    assert read_marker(str(tmp_path)) is None
    assert not list((tmp_path / "r").glob(".*tmp"))  # written whole, then moved into place
    with pytest.raises(ReadError, match="no such folder"):
        read_run(str(tmp_path / "absent"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ReadError, match="is a file"):
        read_run(str(tmp_path / "f.txt"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "old").mkdir()
    (tmp_path / "empty" / "old" / "run.json").write_text("{}")
    with pytest.raises(ReadError, match="it holds runs: old"):
        read_run(str(tmp_path / "empty"))


def test_every_reader_counts_a_duplicate_folder_once_and_says_so(tmp_path, capsys):
    """A grid point with two folders (an older version's resume could leave one): the run reader,
    `python -m analysis table` (points and trials), a figure and the report count one trial and
    name the other folder."""
    from analysis.cli import main as analysis_main
    from analysis.results import load_history, load_results

    run = grid_run(tmp_path)
    assert len(load_results(str(run))) == 3 and set(load_history(str(run))["trial_id"]) == {"aaa", "bbb"}
    for argv in (["table", str(run)], ["table", str(run), "--rows", "trials"],
                 ["figure2", str(run), "-o", str(tmp_path / "f.png")]):
        assert analysis_main(argv) == 0
        out = capsys.readouterr().out
        assert out.count("seed2-ccc") == 1 and "note: skipped" in out, (argv, out)
        assert "ccc " not in out.replace("seed2-ccc", "")
    from analysis.report import build_report

    html = build_report(str(run)).html
    assert html.count("skipped ") == 1 and "seed2-ccc" in html
