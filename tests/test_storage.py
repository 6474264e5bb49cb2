"""Tests for iterand_tune.storage: paths of folders and URIs (a query string stays at the end),
listing and finding runs, reading files that may be absent or half-written."""
from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from iterand_tune.storage import (absolute, exists, is_uri, join_path, list_dir, newest_run,
                                  open_storage, read_json, read_text)


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


def test_read_text_and_json_of_absent_or_half_written_files(tmp_path):
    fs, root = open_storage(str(tmp_path))
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "cut.json").write_text('{"a": ')
    assert read_text(fs, join_path(root, "ok.json")) == '{"a": 1}'
    assert read_json(fs, join_path(root, "ok.json")) == {"a": 1}
    assert read_json(fs, join_path(root, "cut.json")) is None
    assert read_text(fs, join_path(root, "absent.json")) is None
    assert read_json(fs, join_path(root, "absent.json")) is None
