"""Command line of the analysis package. Every error a user can cause ends here as one line on
stderr (`error: ...`) and exit code 2.

    python -m analysis table RUN [--rows points|trials|epochs] [-o FILE.csv|FILE.parquet]
    python -m analysis figure1|figure2|figure3 RUN [-o FILE.png|.pdf|.svg]
    python -m analysis report RUN [-o FILE.html] [--claims FILE.yaml]

RUN is a run's folder (STORAGE/NAME, or a URI such as s3://bucket/runs/NAME), or a Parquet
table of trials written by `table --rows trials -o FILE.parquet`.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import pandas as pd

from iterand_tune.storage import join_path
from iterand_tune.terminal import OneLineParser, UsageError, fmt, format_table, points_table, run_main

from .figures import FIGURES, save
from .report import REPORT_FILE, build_report, load_claims
from .results import (ResultsError, aggregate, load_history, load_results, read_parquet,
                      skipped_folders, to_csv, to_parquet, write_bytes)

TABLE_FORMATS = (".csv", ".parquet")
FIGURE_FORMATS = (".png", ".pdf", ".svg")
REPORT_FORMATS = (".html", ".htm")




def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis",
                description="Tables and the paper's figures from a stored iterand_tune run.")
    sub = p.add_subparsers(dest="command", metavar="{table,figure1,figure2,figure3,report}",
                           parser_class=OneLineParser)
    results_help = ("the run's folder (STORAGE/NAME) or URI (s3://...), or a Parquet table "
                    "written by `table --rows trials`")
    t = sub.add_parser("table", help="print the figure points (or trials, or epochs); -o writes "
                                     "CSV or Parquet")
    t.add_argument("results", metavar="RUN", help=results_help)
    t.add_argument("--rows", choices=("points", "trials", "epochs"), default="points",
                   help="one row per figure point (mean over seeds, the default), per trial, or "
                        "per trial and epoch")
    t.add_argument("-o", "--output", metavar="FILE",
                   help="also write the table (all columns) as .csv or .parquet (path or URI)")
    for name, what in (("figure1", "test accuracy against r, a panel per network"),
                       ("figure2", "test accuracy against parameters after pruning, a panel per "
                                   "network"),
                       ("figure3", "the ImageNet comparison")):
        f = sub.add_parser(name, help=what)
        f.add_argument("results", metavar="RUN", help=results_help)
        f.add_argument("-o", "--output", metavar="FILE",
                       help=f"where to write it: .png, .pdf or .svg (default {name}.png)")
    r = sub.add_parser("report", help="one self-contained HTML file: what was run, the paper's "
                                      "claims checked, figures, learning curves, search, cost")
    r.add_argument("results", metavar="RUN", help="the run's folder (STORAGE/NAME) or URI (s3://...)")
    r.add_argument("-o", "--output", metavar="FILE",
                   help=f"where to write it: .html, a path or URI (default RUN/{REPORT_FILE})")
    r.add_argument("--claims", metavar="FILE",
                   help="the claims to check (default: claims.yaml beside the run's experiment "
                        "file, else experiments/claims.yaml)")
    return p


def _check_output(path: Optional[str], formats: Sequence[str], what: str) -> None:
    if path is None:
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in formats:
        raise UsageError(f"-o {path}: {what} is written as {', '.join(formats)} (by extension)")
    if "://" not in path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"-o {path}: no folder {folder}")


def load_trials(path: str) -> pd.DataFrame:
    """One row per trial from a run's folder/URI, or from a Parquet table of trials."""
    if path.lower().endswith(".parquet"):
        df = read_parquet(path)
        if not {"trial_id", "status", "test_acc", "model"} <= set(df.columns):
            raise ResultsError(f"{path} is not a table of trials (write one with `python -m "
                               "analysis table RUN --rows trials -o FILE.parquet`)")
        return df
    return load_results(path)


def _trials_text(df: pd.DataFrame) -> list[tuple[str, ...]]:
    head = ("trial", "experiment", "model", "seed", "status", "epochs", "test acc %",
            "params after pruning", "error")
    body = [(str(t["trial_id"]), str(t["experiment"]), str(t["model"]), fmt(t["seed"]),
             fmt(t["status"]), f"{fmt(t['epoch'])}/{fmt(t['epochs'])}",
             fmt(t["test_acc"], ".2f"), fmt(t["params_after_pruning"], ","),
             fmt(t["error"])[:60])
            for _, t in df.iterrows()]
    return [head, *body]


def _epochs_text(df: pd.DataFrame) -> list[tuple[str, ...]]:
    head = ("trial", "experiment", "model", "seed", "epoch", "train acc %", "val acc %",
            "test acc %", "lr")
    body = [(str(r["trial_id"]), str(r["experiment"]), str(r["model"]), fmt(r["seed"]),
             fmt(r["epoch"]), fmt(r["train_acc"], ".2f"), fmt(r["val_acc"], ".2f"),
             fmt(r["test_acc"], ".2f"), fmt(r["lr"], ".4g"))
            for _, r in df.iterrows()]
    return [head, *body]


def _skipped(path: str) -> list[str]:
    """The run's folders that hold a second copy of a trial and were not counted (as the run's
    own summary names them); none for a Parquet table."""
    return [] if path.lower().endswith(".parquet") else skipped_folders(path)


def _status_line(trials: pd.DataFrame) -> str:
    counts = trials["status"].fillna("unknown").value_counts()
    return f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def _table(args: argparse.Namespace) -> int:
    _check_output(args.output, TABLE_FORMATS, "a table")
    if args.rows == "epochs":
        if args.results.lower().endswith(".parquet"):
            raise UsageError(f"{args.results} holds no epochs; pass the run's folder for "
                             "--rows epochs")
        df = load_history(args.results)
        lines = _epochs_text(df)
        text = format_table(lines[0], lines[1:])
        footer = [f"{len(df)} epochs of {df['trial_id'].nunique()} trials"]
    else:
        trials = load_trials(args.results)
        df = aggregate(trials) if args.rows == "points" else trials
        if args.rows == "points":
            text = points_table(df.to_dict("records"))
        else:
            lines = _trials_text(df)
            text = format_table(lines[0], lines[1:])
        footer = [_status_line(trials)]
        if args.rows == "points":
            footer += [f"not finished (left out of the means): {p['model']} "
                       f"{p['experiment']}: {p['missing']}"
                       for _, p in df.iterrows() if p["excluded"] > 0]
    footer += [f"note: {line}" for line in _skipped(args.results)]
    print(text)
    print()
    print("\n".join(footer))
    if args.output:
        (to_parquet if args.output.lower().endswith(".parquet") else to_csv)(df, args.output)
        print(f"wrote {args.output} ({len(df)} rows, {len(df.columns)} columns)")
    return 0


def _figure(args: argparse.Namespace) -> int:
    output = args.output or f"{args.command}.png"
    _check_output(output, FIGURE_FORMATS, "a figure")
    trials = load_trials(args.results)
    fig = FIGURES[args.command](trials)
    save(fig, output)
    print(f"wrote {output} ({_status_line(trials)})")
    for line in _skipped(args.results):
        print(f"note: {line}")
    return 0


def _report(args: argparse.Namespace) -> int:
    _check_output(args.output, REPORT_FORMATS, "a report")
    if args.results.lower().endswith(".parquet"):
        raise UsageError(f"{args.results}: a report needs the run's folder (its run.json, "
                         "epochs and errors), not a table of trials")
    if args.claims is not None:
        load_claims(args.claims)  # a claims file asked for by name must be readable: say so now
    output = args.output or join_path(args.results, REPORT_FILE)
    report = build_report(args.results, args.claims)
    write_bytes(report.html.encode("utf-8"), output)
    print(f"wrote {output} ({report.summary})")
    return 0


def _command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise UsageError("give a command: table, figure1, figure2, figure3 or report, then a "
                         "run's folder, e.g. `python -m analysis report ray_results/NAME`")
    if args.command == "report":
        return _report(args)
    return _table(args) if args.command == "table" else _figure(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_command, argv, (ResultsError,))
