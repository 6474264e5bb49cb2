"""Tests for iterand_tune.terminal: the one-line error contract of both command lines
(`run_main`), plain-text tables, and the figure-point table both print."""
from __future__ import annotations

import math

import pytest

from iterand_tune.terminal import (POINT_STATS, OneLineParser, UsageError, fmt, format_table,
                                   points_table, run_main)
from iterand_tune.vocabulary import point_rows


class Refused(Exception):
    pass


def test_run_main_returns_the_commands_code_with_its_arguments(capsys):
    seen = []
    assert run_main(lambda argv: seen.append(argv) or 7, ["a", "b"], ()) == 7
    assert seen == [["a", "b"]]
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("error", [UsageError("bad flag"), Refused("bad flag")])
def test_a_user_error_is_one_line_and_exit_2(capsys, error):
    def command(argv):
        print("partial output")
        raise error

    assert run_main(command, [], (Refused,)) == 2
    out, err = capsys.readouterr()
    assert out == "partial output\n" and err == "error: bad flag\n"


def test_other_errors_are_not_user_errors():
    def command(argv):
        raise Refused("a bug")

    with pytest.raises(Refused):
        run_main(command, [], ())


def test_ctrl_c_is_exit_130(capsys):
    def command(argv):
        raise KeyboardInterrupt

    assert run_main(command, [], ()) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_argparse_errors_are_usage_errors(capsys):
    parser = OneLineParser(prog="p")
    parser.add_argument("--n", type=int)
    assert run_main(lambda argv: parser.parse_args(argv) and 0, ["--n", "x"], ()) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: argument --n: invalid int value: 'x'")


def test_format_table_pads_columns_under_a_rule():
    text = format_table(("a", "long header"), [("wide cell", "1"), ("x", "22")])
    assert text.splitlines() == ["a          long header",
                                 "---------  -----------",
                                 "wide cell  1",
                                 "x          22"]


@pytest.mark.parametrize("value, format_spec, text", [
    (None, "", "-"), (math.nan, ".2f", "-"), (81.256, ".2f", "81.26"), (1234567, ",", "1,234,567"),
    ("sc", "", "sc"), (0.01, "g", "0.01"),
])
def test_fmt(value, format_spec, text):
    assert fmt(value, format_spec) == text


def test_fmt_of_pandas_missing_values():
    pd = pytest.importorskip("pandas")
    assert fmt(pd.NA) == "-" and fmt(pd.NaT) == "-"


def _row(experiment, model, method, init, accs, params, **extra):
    trials = [dict(experiment=experiment, model=model, method=method, init=init, seed=s,
                   status="finished" if a is not None else "running", test_acc=a,
                   params_after_pruning=params, params_before_pruning=2 * params, **extra)
              for s, a in enumerate(accs, 1)]
    return point_rows(trials, ["experiment", "model", "method", "init", *extra])[0]


def test_points_table_columns_and_cells():
    text = points_table([_row("e_ku_sgd", "conv6x0.5", "sgd", "ku", [80.0, 82.0, 84.5], 1_234_567),
                         _row("e_sc_iterand", "conv6x0.5", "iterand", "sc", [70.0, None], 617_000)])
    head, rule, sgd, iterand = text.splitlines()
    assert head.split("  ")[0] == "experiment"
    assert [c.strip() for c in head.split("  ") if c.strip()] == [
        "experiment", "model", "method", "init", "seeds", "test acc %", "std", "params after pruning"]
    assert set(rule) == {"-", " "}
    assert sgd.split() == ["e_ku_sgd", "conv6x0.5", "sgd", "ku", "3/3", "82.17", "2.25", "1,234,567"]
    assert iterand.split() == ["e_sc_iterand", "conv6x0.5", "iterand", "sc", "1/2", "70.00", "-",
                               "617,000"]


def test_points_table_shows_point_fields_after_the_labels():
    text = points_table([_row("f1", "conv6x1.0", "iterand", "ku", [60.0, 61.0], 10, rerand_lambda=0.01),
                         _row("f1", "conv6x1.0", "edgepopup", "ku", [50.0, 51.0], 10, rerand_lambda=0.0)])
    head, _, first, second = text.splitlines()
    assert head.split()[:5] == ["experiment", "model", "method", "init", "rerand_lambda"]
    assert first.split()[4] == "0.01" and second.split()[4] == "0"
    assert not set(POINT_STATS) & set(head.split())


def test_points_table_without_points_is_a_header():
    assert points_table([]).splitlines()[0].split()[:4] == ["experiment", "model", "method", "init"]
