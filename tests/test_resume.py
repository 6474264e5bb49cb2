"""Tests for iterand_tune.tune.resume, what `--resume` checks in a run's folder before Ray Tune
reads it (no Ray here; real kill-and-resume runs are in test_resume_loops.py, test_search.py and
test_storage_s3.py): an unreadable newest state set aside for the previous good one, folders of
trials the state does not hold set aside, a grid rebuilt from its trial folders when no state is
left, and one line when nothing can be done."""
from __future__ import annotations

import pytest

from iterand_tune.storage import TRIAL_KEY, RunError
from iterand_tune.tune.resume import SET_ASIDE, prepare

from test_runs import state_item, trial, write_state, write_trial


def run_folder(tmp_path, kind="grid"):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tuner.pkl").write_bytes(b"pickled tuner")
    marker = {"kind": kind, "trials": [trial(1), trial(2), trial(3)]}
    return run, marker


def configs():
    return [{TRIAL_KEY: trial(s), "index": s - 1} for s in (1, 2, 3)]


def aside(run):
    """Names set aside, relative to the set-aside folder's time-stamped subfolder."""
    return sorted(p.relative_to(next((run / SET_ASIDE).iterdir())).as_posix()
                  for p in (run / SET_ASIDE).rglob("*") if p.is_file())


def test_a_readable_state_is_restored_and_unknown_trial_folders_set_aside(tmp_path):
    run, marker = run_folder(tmp_path)
    c = configs()
    write_trial(run, "e-conv6x0.25-seed1-aaa", c[0], [1, 2, 3], [3], test_acc=90.0)
    write_trial(run, "e-conv6x0.25-seed2-bbb", c[1], [1], [1])  # pending in the state
    write_trial(run, "e-conv6x0.25-seed3-ccc", c[2], [1], [1])  # not in the state at all
    write_state(run, "2026-01-01_00-00-00", [
        state_item("aaa", "TERMINATED", c[0], "e-conv6x0.25-seed1-aaa", 3),
        state_item("bbb", "PENDING", c[1])])
    plan = prepare(str(run), marker)
    assert (plan.how, plan.state) == ("restore", "experiment_state-2026-01-01_00-00-00.json")
    assert sorted(p.name for p in run.iterdir() if "-seed" in p.name) == ["e-conv6x0.25-seed1-aaa"]
    assert "e-conv6x0.25-seed2-bbb/result.json" in aside(run)
    assert "e-conv6x0.25-seed3-ccc/checkpoint_000000/reports.json" in aside(run)
    assert len([n for n in plan.notes if "starts again" in n]) == 2
    # Nothing to tidy: nothing said, nothing moved.
    again = prepare(str(run), marker)
    assert again.how == "restore" and again.notes == []


def test_a_truncated_newest_state_falls_back_to_the_previous_one(tmp_path):
    run, marker = run_folder(tmp_path)
    c = configs()
    write_trial(run, "e-conv6x0.25-seed1-aaa", c[0], [1], [1])
    write_state(run, "2026-01-01_00-00-00", [state_item("aaa", "RUNNING", c[0],
                                                        "e-conv6x0.25-seed1-aaa", 1)])
    bad = "2026-01-02_00-00-00"
    (run / f"experiment_state-{bad}.json").write_text('{"trial_data": [["{"trial_id"')
    (run / f"search_gen_state-{bad}.json").write_text("{}")
    (run / f"searcher-state-{bad}.pkl").write_bytes(b"x")
    plan = prepare(str(run), marker)
    assert (plan.how, plan.state) == ("restore", "experiment_state-2026-01-01_00-00-00.json")
    assert aside(run) == [f"experiment_state-{bad}.json", f"search_gen_state-{bad}.json",
                          f"searcher-state-{bad}.pkl"]
    assert any(f"experiment_state-{bad}.json is unreadable" in n for n in plan.notes)
    assert (run / "e-conv6x0.25-seed1-aaa").is_dir()


def test_without_a_readable_state_a_grid_is_rebuilt_from_its_trial_folders(tmp_path):
    run, marker = run_folder(tmp_path)
    c = configs()
    write_trial(run, "e-conv6x0.25-seed1-aaa", c[0], [1, 2, 3], [3], test_acc=90.0)
    write_trial(run, "e-conv6x0.25-seed2-bbb", c[1], [1], [1])
    (run / "experiment_state-2026-01-01_00-00-00.json").write_text("")
    (run / "run.json").write_text("{}")
    plan = prepare(str(run), marker)
    assert plan.how == "rebuild" and plan.done == [0]  # the finished trial is kept, not re-run
    assert sorted(p.name for p in run.iterdir()) == [SET_ASIDE, "e-conv6x0.25-seed1-aaa", "run.json"]
    assert "tuner.pkl" in aside(run) and "experiment_state-2026-01-01_00-00-00.json" in aside(run)
    assert "e-conv6x0.25-seed2-bbb/params.json" in aside(run)
    assert any("rebuilt from the trial folders; 1 finished trial(s) kept" in n for n in plan.notes)


def test_what_cannot_be_rebuilt_is_one_line(tmp_path):
    run, marker = run_folder(tmp_path)
    (run / "experiment_state-2026-01-01_00-00-00.json").write_text("{")
    with pytest.raises(RunError, match=r"experiment_state-2026-01-01_00-00-00.json is unreadable "
                                       r"and .* has no run.json"):
        prepare(str(run), None)
    c = configs()
    write_trial(run, "e-conv6x0.25-seed1-aaa", {**c[0], "point": "p", "sample": 0}, [1], [1])
    with pytest.raises(RunError, match="a search cannot be rebuilt"):
        prepare(str(run), {**marker, "kind": "search"})
    import shutil
    shutil.rmtree(run / "e-conv6x0.25-seed1-aaa")
    assert sorted(p.name for p in run.iterdir()) == [
        "experiment_state-2026-01-01_00-00-00.json", "tuner.pkl"]  # nothing moved


def test_a_search_killed_before_any_report_starts_again(tmp_path):
    run, marker = run_folder(tmp_path)
    (run / "run.json").write_text("{}")
    plan = prepare(str(run), {**marker, "kind": "search"})  # no state saved yet, no report
    assert (plan.how, plan.done) == ("rebuild", [])
    assert sorted(p.name for p in run.iterdir()) == [SET_ASIDE, "run.json"]
    assert "no trial has reported yet" in plan.notes[0]
