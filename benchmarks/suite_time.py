"""How long `make test` takes, against an older suite timed side by side on the same machine.

The speed of a shared CPU machine can change by a factor of three within a day, so a pytest
time alone says little. This script runs, one after the other in one go:

1. the test suite of this checkout as `make test` runs it (`pytest -n WORKERS`);
2. the suite of an older commit (default 8ef273f: 589 tests, 428 s of pytest time when it was
   measured on a clean clone of this project's 2-core machine) as `make test` ran it then,
   from a temporary git worktree of that commit, with the checkout's installed packages;
3. this checkout's suite again, so that a drift of the machine's speed shows;

and prints the pytest time of each, the ratio of this suite's mean to the older one's, and
what that ratio makes of the older suite's recorded time.

It needs the git history (a clone, not an archive) and the test extras (`make install`), and
takes about three times the suite's time (15-25 minutes on 2 cores).

Usage: python benchmarks/suite_time.py [--against 8ef273f] [--recorded-s 428] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"^=*\s*(.*\bpassed.*) in ([\d.]+)s", re.M)  # "1 failed, 9 passed in 3.1s"


def pytest_time(cwd: str, args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(pytest's own time, its summary) of `python -m pytest ARGS` run in `cwd`. A run with
    failed tests still counts (its summary says how many); one that did not run the suite not."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True)
    found = SUMMARY.findall(proc.stdout)
    if proc.returncode not in (0, 1) or not found:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise SystemExit(f"suite_time: pytest in {cwd} exited {proc.returncode}:\n{tail}")
    summary, seconds = found[-1]
    return float(seconds), summary.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="8ef273f", help="the older commit (default 8ef273f)")
    ap.add_argument("--recorded-s", type=float, default=428.0,
                    help="its pytest time as once recorded (default 428, 8ef273f's)")
    ap.add_argument("--workers", default="2", help="pytest-xdist workers for this suite (default 2)")
    args = ap.parse_args(argv)

    worktree = tempfile.mkdtemp(prefix="suite_time_")
    os.rmdir(worktree)
    add = subprocess.run(["git", "worktree", "add", "--detach", worktree, args.against], cwd=ROOT,
                         capture_output=True, text=True)
    if add.returncode != 0:
        why = (add.stderr.strip().splitlines() or ["git worktree add failed"])[-1]
        print(f"suite_time: no worktree of {args.against}: {why}", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    older_env = dict(env, PYTHONPATH=worktree)  # its package, before the installed checkout
    ours = ["-n", args.workers] if args.workers != "0" else []
    try:
        runs = []
        for label, cwd, run_args, run_env in (
                ("this checkout", ROOT, ours, env),
                (f"{args.against}", worktree, [], older_env),
                ("this checkout, again", ROOT, ours, env)):
            seconds, summary = pytest_time(cwd, run_args, run_env)
            runs.append(seconds)
            print(f"{label:<24} {seconds:7.1f} s  ({summary})", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(worktree, ignore_errors=True)
    mean = statistics.mean([runs[0], runs[2]])
    ratio = mean / runs[1]
    print(f"\nthis suite / {args.against}'s: {ratio:.2f} (mean of the two runs of this suite)")
    print(f"at the speed at which {args.against}'s took {args.recorded_s:.0f} s, this suite would "
          f"take about {ratio * args.recorded_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
