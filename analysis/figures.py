"""The paper's figures from a results table (`load_results`) or a run's path: figure 1 (accuracy
against r), figure 2 (accuracy against parameters after pruning), figure 3 (ImageNet). Drawn with
matplotlib's object API, not pyplot, so nothing global is touched; a partial run draws what
exists and says, under the plot, what is missing.
"""
from __future__ import annotations

import io
import os
import textwrap
from typing import Any, Optional, Sequence, Union

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from iterand_tune.terminal import POINT_STATS
from iterand_tune.vocabulary import DIVERGED, METHOD_ORDER, MODEL_FAMILIES, POINT_LABELS

from .results import PathLike, ResultsError, aggregate, finished, load_results, point_keys, write_bytes

Results = Union[pd.DataFrame, PathLike]

METHOD_NAMES = {"sgd": "SGD", "edgepopup": "edge-popup", "iterand": "IteRand"}
METHOD_COLORS = {"sgd": "0.35", "edgepopup": "tab:blue", "iterand": "tab:red"}
# Weight init -> (marker, line style): the same method keeps its colour across inits.
INIT_STYLES = {"ku": ("o", "-"), "sc": ("s", "--")}
SGD_STYLE = ("^", ":")
OTHER_STYLE = ("v", "-.")
NETWORK_NAMES = {"conv6": "Conv6", "resnet18": "ResNet18", "resnet34": "ResNet34",
                 "resnet50": "ResNet50", "resnet101": "ResNet101"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet",
                 "mnist": "MNIST"}
SHORT_KEYS = {"rerand_lambda": "r", "rerand_freq": "K_per", "conv_sparsity": "p",
              "weight_decay": "wd"}
NOTE_LINES = 5  # at most this many lines of "what is missing" under a figure
DODGE = 1.025  # horizontal spread between the lines of one panel (log axis: a factor per line)


def figure1(results: Results) -> Figure:
    """Test accuracy against the re-randomisation rate r, one panel per network, one line per
    weight init (and width, when a network has several), error bars over seeds. Edge-popup
    trials are r = 0; SGD trials have no r and are left out."""
    df = _table(results)
    if "rerand_lambda" not in df.columns:
        raise ResultsError("figure 1 needs the rerand_lambda column of load_results")
    df = df[df["method"].isin(["edgepopup", "iterand"])].copy()
    if df.empty:
        raise ResultsError("figure 1 plots IteRand's accuracy against r, but the run has no "
                           "edge-popup or IteRand trials")
    # Edge-popup is IteRand with r = 0, whatever rerand_lambda its config carries.
    df["r"] = df["rerand_lambda"].astype("float64").where(df["method"].eq("iterand").astype(bool),
                                                          0.0)
    keys = [k for k in point_keys(df) if k not in ("rerand_lambda", "method", "rerand_mode")]
    points = aggregate(df, by=[*keys, "r"])
    networks = _ordered(points["network"], MODEL_FAMILIES)
    fig, axes, note = _new_figure(df, points, len(networks))
    for ax, network in zip(axes, networks):
        panel = points[points["network"] == network]
        rs = sorted(panel["r"].dropna().unique())
        # r spans 0 and several decades: evenly spaced ticks read best.
        position = {r: i for i, r in enumerate(rs)}
        several_widths = panel["width"].nunique() > 1
        extra = [k for k in keys if k not in POINT_LABELS]
        for line_key, line in panel.groupby(["init", "width", *extra], dropna=False, sort=True):
            init, width = line_key[0], line_key[1]
            label = f"{_init_name(init)} weights"
            if several_widths:
                label += f", x{width:g}"
            label += _extra_label(extra, line_key[2:])
            marker, style = INIT_STYLES.get(init, OTHER_STYLE)
            _errorbar(ax, line, [position[r] for r in line["r"]], label, "tab:red", marker, style)
        ax.set_xticks(range(len(rs)), [f"{r:g}" for r in rs])
        ax.set_xlabel("re-randomisation rate r  (r = 0: edge-popup)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(_network_name(network, panel))
        ax.grid(True, alpha=0.3)
    _finish(fig, axes, points, note,
            f"Figure 1: IteRand's test accuracy against r ({_datasets(df)})")
    return fig


def figure2(results: Results) -> Figure:
    """Test accuracy against the number of parameters after pruning (log x), one panel per
    network, one line per method and weight init, a point per width, error bars over seeds."""
    df = _table(results)
    points = aggregate(df)
    networks = _ordered(points["network"], MODEL_FAMILIES)
    fig, axes, note = _new_figure(df, points, len(networks))
    for ax, network in zip(axes, networks):
        _accuracy_vs_params(ax, points[points["network"] == network], annotate=False)
        ax.set_title(_network_name(network, points[points["network"] == network]))
    _finish(fig, axes, points, note,
            f"Figure 2: test accuracy against parameters after pruning ({_datasets(df)})")
    return fig


def figure3(results: Results) -> Figure:
    """The ImageNet comparison: test accuracy against parameters after pruning (log x) in one
    panel, one line per method and weight init, each point labelled with its network."""
    df = _table(results)
    points = aggregate(df)
    fig, axes, note = _new_figure(df, points, 1, panel_width=6.5)
    _accuracy_vs_params(axes[0], points, annotate=True)
    axes[0].set_title(_datasets(df))
    _finish(fig, axes, points, note,
            f"Figure 3: test accuracy against parameters after pruning ({_datasets(df)})")
    return fig


FIGURES = {"figure1": figure1, "figure2": figure2, "figure3": figure3}


# ------------------------------------------------------------------ drawing

def _accuracy_vs_params(ax: Any, points: pd.DataFrame, annotate: bool) -> None:
    extra = [k for k in points.columns if k not in POINT_LABELS and k in _point_columns(points)]
    line_keys = ["method", "init", *extra]
    # Two experiments with the same labels and models in one panel would draw one zigzag line:
    # tell them apart by name.
    by_experiment = bool(points.duplicated(subset=[*line_keys, "model"]).any())
    if by_experiment:
        line_keys.append("experiment")
    groups = points.groupby(line_keys, dropna=False, sort=False)
    order = sorted(groups.groups, key=_line_order)
    for i, line_key in enumerate(order):
        line = groups.get_group(line_key).sort_values("params_after_pruning")
        method, init = line_key[0], line_key[1]
        label = _method_label(method, init) + _extra_label(extra, line_key[2:2 + len(extra)])
        if by_experiment:
            label += f" [{line_key[-1]}]"
        marker, style = SGD_STYLE if method == "sgd" else INIT_STYLES.get(init, OTHER_STYLE)
        # Pruning methods share parameter counts: spread the lines by a few percent so that
        # their error bars do not hide each other.
        x = line["params_after_pruning"].astype("float64") * DODGE ** (i - (len(order) - 1) / 2)
        drawn = _errorbar(ax, line, list(x), label, METHOD_COLORS.get(method), marker, style)
        if annotate:
            for _, p in drawn.iterrows():
                ax.annotate(NETWORK_NAMES.get(p["network"], p["model"]),
                            (float(p["_x"]), p["test_acc_mean"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_count))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters after pruning (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="major", alpha=0.3)


def _errorbar(ax: Any, line: pd.DataFrame, x: Sequence[float], label: str, color: Optional[str],
              marker: str, style: str) -> pd.DataFrame:
    """One line with error bars through the points that have a finished trial; returns them."""
    line = line.assign(_x=list(x))
    drawn = line[line["test_acc_count"] > 0]
    if drawn.empty:
        return drawn
    std = drawn["test_acc_std"].astype("float64").fillna(0.0)  # one seed: no spread to show
    ax.errorbar(drawn["_x"].astype("float64"), drawn["test_acc_mean"].astype("float64"),
                yerr=std.to_numpy(), label=label, color=color, marker=marker, linestyle=style,
                capsize=3, markersize=5, linewidth=1.5)
    return drawn


def _new_figure(df: pd.DataFrame, points: pd.DataFrame, panels: int,
                panel_width: float = 4.6) -> tuple[Figure, list[Any], Optional[str]]:
    width = panels * panel_width + 2.0  # the legend sits right of the panels
    note = _missing_note(df, points, width_chars=int(width * 16))
    lines = note.count("\n") + 1 if note else 0
    fig = Figure(figsize=(width, 4.2 + 0.15 * lines), layout="constrained")
    axes = list(fig.subplots(1, max(panels, 1), squeeze=False)[0])
    return fig, axes, note


def _finish(fig: Figure, axes: list[Any], points: pd.DataFrame, note: Optional[str],
            title: str) -> None:
    handles, labels = [], []
    for ax in axes:
        if not ax.containers:  # an empty panel should not look like a drawing bug
            ax.text(0.5, 0.5, "no finished trials", transform=ax.transAxes, ha="center",
                    va="center", color="0.4")
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{_spread(points)}", fontsize=10)
    if note:  # as the figure's x label, so that the layout makes room for it
        fig.supxlabel(note, x=0.01, ha="left", fontsize=7.5, color="0.25")


def _spread(points: pd.DataFrame) -> str:
    counts = sorted({int(n) for n in points["test_acc_count"] if n > 0})
    if not counts:
        return "no trial has finished"
    if counts == [1]:
        return "one seed per point (no error bars)"
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"mean ± std over {seeds} seeds per point"


def _missing_note(df: pd.DataFrame, points: pd.DataFrame, width_chars: int) -> Optional[str]:
    """What a partial run leaves out: trials not finished, points not drawn, points short of
    seeds."""
    left_out = df[~finished(df)]
    if left_out.empty:
        return None
    statuses = left_out["status"].fillna("no test accuracy").value_counts()
    diverged = int(statuses.get(DIVERGED, 0))  # ended early, by their own loss: not a partial run
    parts = [("Partial run: " if diverged < len(left_out) else "")
             + f"{len(left_out)} of {len(df)} trials not finished and left out ("
             + ", ".join(f"{n} {s}" for s, n in statuses.items()) + ")."]
    if diverged:
        parts.append(f"{'A diverged trial' if diverged == 1 else 'Diverged trials'} stopped when "
                     "the training loss became inf/NaN (a lower lr may help).")
    absent = points[points["test_acc_count"] == 0]
    if not absent.empty:
        parts.append("Not drawn (no finished seed): " + "; ".join(
            _point_name(p) + f" ({p['missing']})" for _, p in absent.iterrows()) + ".")
    short = points[(points["test_acc_count"] > 0) & (points["excluded"] > 0)]
    if not short.empty:
        parts.append("Fewer seeds: " + "; ".join(
            f"{_point_name(p)} {p['test_acc_count']}/{p['trials']} ({p['missing']})"
            for _, p in short.iterrows()) + ".")
    lines = textwrap.wrap(" ".join(parts), width=max(60, width_chars))
    if len(lines) > NOTE_LINES:
        lines = lines[:NOTE_LINES]
        lines[-1] = lines[-1][: max(0, width_chars - 40)] + " ... (python -m analysis table)"
    return "\n".join(lines)


# ------------------------------------------------------------------ names and order

def _table(results: Results) -> pd.DataFrame:
    df = results if isinstance(results, pd.DataFrame) else load_results(results)
    need = {"experiment", "network", "width", "model", "method", "init", "test_acc",
            "params_after_pruning"}
    lacking = sorted(need - set(df.columns))
    if lacking:
        raise ResultsError(f"the table lacks {', '.join(lacking)}: figures need one row per trial "
                           "as load_results makes it")
    if df.empty:
        raise ResultsError("the table has no trials")
    return df


def _point_columns(points: pd.DataFrame) -> set[str]:
    return set(points.columns) - set(POINT_STATS)


def _ordered(values: pd.Series, known: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(v for v in values if isinstance(v, str)))
    return sorted(present, key=lambda v: (known.index(v) if v in known else len(known), v))


def _line_order(key: tuple) -> tuple:
    method, init = key[0], key[1]
    m = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (m, str(init), *(str(k) for k in key[2:]))


def _init_name(init: Any) -> str:
    return init.upper() if init in INIT_STYLES else str(init)


def _method_label(method: Any, init: Any) -> str:
    return f"{METHOD_NAMES.get(method, str(method))} ({_init_name(init)})"


def _extra_label(keys: Sequence[str], values: Sequence[Any]) -> str:
    return "".join(f", {SHORT_KEYS.get(k, k)}={v:g}" if isinstance(v, float) else
                   f", {SHORT_KEYS.get(k, k)}={v}" for k, v in zip(keys, values))


def _point_name(p: pd.Series) -> str:
    """e.g. "conv6x0.5 IteRand (SC)", or "conv6x1.0 KU, r=0.1" in figure 1."""
    name = f"{p['model']} " + (_method_label(p["method"], p["init"]) if "method" in p.index
                               else _init_name(p["init"]))
    extra = [k for k in p.index if k not in POINT_LABELS and k not in POINT_STATS]
    return name + _extra_label(extra, [p[k] for k in extra])


def _network_name(network: str, panel: pd.DataFrame) -> str:
    name = NETWORK_NAMES.get(network, network)
    widths = sorted(w for w in panel["width"].dropna().unique())
    if len(widths) == 1 and widths[0] != 1.0:
        name += f" x{widths[0]:g}"
    return name


def _datasets(df: pd.DataFrame) -> str:
    if "dataset" not in df.columns:
        return "results"
    names = [DATASET_NAMES.get(str(d), str(d)) for d in df["dataset"].dropna().unique()]
    return ", ".join(names) or "results"


def _count(x: float, _pos: Any = None) -> str:
    """Tick labels for parameter counts: 70k, 200k, 1M, 1.5M."""
    if x >= 1e9:
        return f"{x / 1e9:g}G"
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def save(fig: Figure, path: Union[str, "os.PathLike[str]"], dpi: int = 150) -> None:
    """Write `fig` as PNG, PDF or SVG (by the path's extension) to a file path or URI."""
    fmt = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if fmt not in ("png", "pdf", "svg"):
        raise ResultsError(f"{os.fspath(path)}: a figure is written as .png, .pdf or .svg")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    write_bytes(buf.getvalue(), path)
