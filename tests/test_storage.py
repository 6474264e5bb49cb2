"""Tests for iterand_tune.storage: paths of folders and URIs (a query string stays at the end),
listing and finding runs, reading files that may be absent or half-written, and the one reader
of Ray Tune's experiment state (hand-written states here; real runs in test_tune.py)."""
from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest

from iterand_tune.storage import (EXPERIMENT_STATE, SEARCH_STATE_PREFIX, TRIAL_KEY, absolute,
                                  exists, experiment_state, is_search_run, is_uri, join_path,
                                  list_dir, newest_run, open_storage, read_json, read_text)


# ------------------------------------------------------------------ paths

@pytest.mark.parametrize("base, name, joined", [
    ("/runs", "x", "/runs/x"),
    ("/runs/", "x", "/runs/x"),
    ("runs", "x", os.path.join("runs", "x")),
    ("s3://b/runs", "x", "s3://b/runs/x"),
    ("s3://b/runs/", "x", "s3://b/runs/x"),
    ("gs://b", "run/trial", "gs://b/run/trial"),
    ("file:///tmp/runs", "x", "file:///tmp/runs/x"),
    ("s3://b/runs?endpoint_override=h:1&scheme=http", "x",
     "s3://b/runs/x?endpoint_override=h:1&scheme=http"),
    ("s3://b/runs/?region=eu", "x", "s3://b/runs/x?region=eu"),
])
def test_join_path(base, name, joined):
    assert join_path(base, name) == joined


def test_join_path_twice_keeps_the_query_at_the_end():
    uri = join_path(join_path("s3://b/runs?scheme=http", "run"), "trial")
    assert uri == "s3://b/runs/run/trial?scheme=http"


def test_is_uri_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_uri("s3://b/x") and is_uri("file:///x") and not is_uri("/x") and not is_uri("x")
    assert absolute("runs") == str(tmp_path / "runs")
    assert absolute("~/runs") == os.path.expanduser("~/runs")
    assert absolute("s3://b/runs") == "s3://b/runs"


def test_open_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, where = open_storage("runs")
    assert isinstance(fs, pafs.LocalFileSystem) and where == str(tmp_path / "runs")
    fs, where = open_storage(f"file://{tmp_path}/runs")
    assert isinstance(fs, pafs.LocalFileSystem) and where == f"{tmp_path}/runs"


# ------------------------------------------------------------------ folders

def test_list_dir_exists_and_missing_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "f.txt").write_text("x")
    assert sorted(list_dir(str(tmp_path))) == ["a", "b"]
    assert list_dir(str(tmp_path), files=True) == ["f.txt"]
    assert list_dir(str(tmp_path / "absent")) == []
    assert sorted(list_dir(f"file://{tmp_path}")) == ["a", "b"]
    assert exists(str(tmp_path / "a")) and exists(str(tmp_path / "f.txt"))
    assert not exists(str(tmp_path / "absent")) and exists(f"file://{tmp_path}/a")


def test_newest_run_is_the_latest_time_stamp_of_the_prefix(tmp_path):
    for name in ("quickstart-20261128-110126", "quickstart-20261129-090000",
                 "quickstart-search-20261130-000000", "quickstart-notes", "figure2-20270101-000000"):
        (tmp_path / name).mkdir()
    (tmp_path / "quickstart-20271231-000000").write_text("a file, not a run")
    assert newest_run(str(tmp_path), "quickstart-") == "quickstart-20261129-090000"
    assert newest_run(str(tmp_path), "quickstart-search-") == "quickstart-search-20261130-000000"
    assert newest_run(str(tmp_path), "figure1-") is None
    assert newest_run(str(tmp_path / "absent"), "quickstart-") is None


def test_is_search_run(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / f"{SEARCH_STATE_PREFIX}2026-11-28_12-00-00.json").write_text("{}")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "experiment_state-2026-11-28_12-00-00.json").write_text("{}")
    assert is_search_run(str(tmp_path / "s")) and not is_search_run(str(tmp_path / "p"))


def test_read_text_and_json_of_absent_or_half_written_files(tmp_path):
    fs, root = open_storage(str(tmp_path))
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "cut.json").write_text('{"a": ')
    assert read_text(fs, join_path(root, "ok.json")) == '{"a": 1}'
    assert read_json(fs, join_path(root, "ok.json")) == {"a": 1}
    assert read_json(fs, join_path(root, "cut.json")) is None
    assert read_text(fs, join_path(root, "absent.json")) is None
    assert read_json(fs, join_path(root, "absent.json")) is None


# ------------------------------------------------------------------ Ray Tune's experiment state

def _trial_item(trial_id, status, config, epoch=None, as_text=True):
    """One entry of `trial_data` as Ray Tune 2.x writes it: the trial and its runtime metadata,
    each a JSON string."""
    trial = {"trial_id": trial_id, "status": status, "config": config,
             "relative_logdir": f"e-conv6x0.25-seed1-{trial_id}"}
    meta = {"last_result": {"epoch": epoch} if epoch is not None else {}}
    return [json.dumps(trial), json.dumps(meta)] if as_text else [trial, meta]


def _write_state(folder, stamp, items):
    path = folder / f"experiment_state-{stamp}.json"
    path.write_text(json.dumps({"trial_data": items, "runner_data": {}}))
    return path


def test_experiment_state_reads_the_newest_state(tmp_path):
    config = {TRIAL_KEY: {"experiment": "e", "seed": 1, "lr": 0.1}}
    _write_state(tmp_path, "2026-11-28_12-00-00", [_trial_item("a_00000", "RUNNING", config, 1)])
    _write_state(tmp_path, "2026-11-28_12-05-00", [
        _trial_item("a_00000", "TERMINATED", config, 3),
        _trial_item("a_00001", "PENDING", {TRIAL_KEY: {"experiment": "e", "seed": 2}}),
        _trial_item("a_00002", "ERROR", {"__pickled__": "gAS..."}, 2, as_text=False)])
    fs, root = open_storage(str(tmp_path))
    state = experiment_state(fs, root)
    assert list(state) == ["a_00000", "a_00001", "a_00002"]
    assert state["a_00000"] == dict(status="TERMINATED", config=config[TRIAL_KEY],
                                    logdir="e-conv6x0.25-seed1-a_00000", last_result={"epoch": 3})
    assert state["a_00001"]["config"] == {"experiment": "e", "seed": 2}
    assert state["a_00001"]["last_result"] == {}
    # A config Ray stored as a pickle is not unpickled: no config rather than a guess.
    assert state["a_00002"]["status"] == "ERROR" and state["a_00002"]["config"] == {}
    # Names may be given (the caller listed the folder already); others are not read.
    assert experiment_state(fs, root, ["experiment_state-2026-11-28_12-00-00.json"])[
        "a_00000"]["status"] == "RUNNING"


def test_experiment_state_skips_a_newest_state_caught_mid_write(tmp_path):
    config = {TRIAL_KEY: {"experiment": "e", "seed": 1}}
    _write_state(tmp_path, "2026-11-28_12-00-00", [_trial_item("a_00000", "RUNNING", config, 1)])
    (tmp_path / "experiment_state-2026-11-28_12-05-00.json").write_text('{"trial_data": [["{')
    (tmp_path / "experiment_state-2026-11-28_12-06-00.json").write_text('{"other": 1}')
    fs, root = open_storage(str(tmp_path))
    assert experiment_state(fs, root)["a_00000"]["status"] == "RUNNING"


def test_experiment_state_without_a_state_is_empty(tmp_path):
    (tmp_path / "notes.json").write_text("{}")
    fs, root = open_storage(str(tmp_path))
    assert experiment_state(fs, root) == {}
    assert experiment_state(fs, str(tmp_path / "absent")) == {}
    assert EXPERIMENT_STATE.fullmatch("experiment_state-2026-11-28_12-00-00.json")
    assert not EXPERIMENT_STATE.fullmatch("experiment_state-x.json.tmp")
