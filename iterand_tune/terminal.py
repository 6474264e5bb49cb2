"""What the two command lines (`python -m iterand_tune`, `python -m analysis`) share: the
one-line error contract (every user error is one `error: ...` line and exit code 2, never a
traceback), plain-text tables, and the table of figure points both print.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from .vocabulary import POINT_LABELS


class UsageError(Exception):
    """A user error that argparse did not catch; printed as one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(message)


def run_main(command: Callable[[list[str]], int], argv: Sequence[str] | None,
             user_errors: tuple[type[BaseException], ...]) -> int:
    """Run `command(argv)`; a user error (UsageError or one of `user_errors`) becomes one
    `error: ...` line on stderr and exit code 2, Ctrl-C exit code 130, and a closed pipe
    (`... | head`) a quiet exit 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return command(argv)
    except (UsageError, *user_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
        return 0


def format_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: Any, spec: str = "") -> str:
    """`value` formatted with `spec`; `-` for a missing value (None, NaN, pandas' NA)."""
    if value is None or value.__class__.__name__ in ("NAType", "NaTType") or (
            isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


# Columns of a figure-point row beyond its extra point fields (`vocabulary.point_fields`).
POINT_STATS = ("trials", "excluded", "test_acc_mean", "test_acc_std", "test_acc_count",
               "params_after_pruning", "params_before_pruning", "missing")


def points_table(points: Sequence[Mapping[str, Any]]) -> str:
    """The figure-point table of a run: one row per point (mean and sample std of the test
    accuracy over its finished seeds). The run's own summary and `python -m analysis table`
    print it from the same rows."""
    extra = [c for c in (points[0] if points else {}) if c not in POINT_STATS and c not in POINT_LABELS]
    head = ("experiment", "model", "method", "init", *extra, "seeds", "test acc %", "std",
            "params after pruning")
    body = [(str(p["experiment"]), str(p["model"]), fmt(p["method"]), fmt(p["init"]),
             *(fmt(p[k], "g") if isinstance(p[k], float) else fmt(p[k]) for k in extra),
             f"{p['test_acc_count']}/{p['trials']}", fmt(p["test_acc_mean"], ".2f"),
             fmt(p["test_acc_std"], ".2f"), fmt(p["params_after_pruning"], ","))
            for p in points]
    return format_table(head, body)
