"""benchmarks/suite_time.py: the pytest time it reads, and a commit it cannot check out."""
from __future__ import annotations

import os
import subprocess

import pytest

from helpers import ROOT, load_benchmark


@pytest.fixture(scope="module")
def suite_time():
    return load_benchmark("suite_time")


def test_pytest_time_of_a_suite_with_a_failure(suite_time, tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import time\n\ndef test_ok():\n    time.sleep(0.2)\n\ndef test_bad():\n    assert False\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    seconds, summary = suite_time.pytest_time(str(tmp_path), [], env)
    assert summary == "1 failed, 1 passed" and 0.2 <= seconds < 60
    with pytest.raises(SystemExit, match="exited 4"):  # a usage error ran no test: no time
        suite_time.pytest_time(str(tmp_path), ["--no-such-option"], env)


def test_a_commit_it_cannot_check_out_is_one_line(suite_time, capsys):
    before = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True)
    if before.returncode != 0:
        pytest.skip("not a git checkout")
    assert suite_time.main(["--against", "no-such-commit-0000"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("suite_time: no worktree of no-such-commit-0000: ")
    after = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True)
    assert after.stdout == before.stdout  # nothing left behind
