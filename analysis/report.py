"""A run's reproduction report: one self-contained HTML file (what was run, the paper's claims of
experiments/claims.yaml checked, figures, learning curves, a search's samples, cost), and the claim
checks themselves. Runs are read only through `iterand_tune.runs.read_run` and analysis.results.
"""
from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import io
import math
import os
import shlex
import statistics
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import jinja2
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from iterand_tune.runs import SEARCH, Run, TrialRecord, read_run
from iterand_tune.search_plan import best_rows
from iterand_tune.storage import is_uri, join_path, open_storage, read_text
from iterand_tune.vocabulary import DIVERGED, POINT_LABELS, VALIDATION_METRIC

from .figures import DATASET_NAMES, FIGURES, METHOD_COLORS, METHOD_NAMES, NETWORK_NAMES
from .results import (PathLike, ResultsError, aggregate, finished, load_history, load_results,
                      point_keys, write_bytes)

REPORT_FILE = "report.html"      # written into the run's folder by default
CLAIMS_FILE = "claims.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CLAIMS = os.path.join(ROOT, "experiments", CLAIMS_FILE)
HELD, NOT_HELD, NOT_COVERED = "held", "not held", "not covered"
DPI = 90  # embedded PNGs: sharp on screen and paper, a few tens of kB each


class ClaimsError(ResultsError):
    """A claims file that cannot be read or says something unreadable; one line for the user."""


# ------------------------------------------------------------------ claims

@dataclass(frozen=True)
class Claim:
    """One of the paper's claims as a check: group `a` against group `b` of a run's finished
    trials, pair by pair (experiments/claims.yaml says what each field means)."""

    id: str
    text: str
    dataset: str
    a: Mapping[str, Any]
    b: Mapping[str, Any]
    source: str = ""
    experiments: str = "*"
    where: Mapping[str, Any] = field(default_factory=dict)
    pair_on: tuple[str, ...] = ("network", "width", "init")
    b_width: float = 1.0
    min_seeds: int = 3
    tolerance_std: float = 1.0
    tolerance_points: float = 0.0

    def tolerance_text(self) -> str:
        parts = []
        if self.tolerance_std:
            parts.append(f"{self.tolerance_std:g} x the larger standard deviation over seeds")
        if self.tolerance_points or not parts:
            parts.append(f"{self.tolerance_points:g} percentage points")
        rule = " or ".join(parts) + (", the larger" if len(parts) > 1 else "")
        return (f"a pair holds when {_side_name(self.a, self)}'s mean test accuracy is at least "
                f"{_side_name(self.b, self)}'s minus {rule}; each side needs "
                f"{self.min_seeds} finished seed{'s' if self.min_seeds != 1 else ''}")


_CLAIM_KEYS = {"id", "text", "dataset", "a", "b", "source", "experiments", "where", "pair_on",
               "b_width", "min_seeds", "tolerance"}


def load_claims(path: Optional[PathLike] = None) -> list[Claim]:
    """The claims of a claims file (a path or URI; default experiments/claims.yaml)."""
    where = os.fspath(path) if path is not None else DEFAULT_CLAIMS
    try:
        fs, p = open_storage(where)
    except Exception as err:  # pyarrow's errors for a bad URI are of several kinds
        raise ClaimsError(f"cannot open claims file {where}: {_first_line(err)}") from None
    text = read_text(fs, p)
    if text is None:
        raise ClaimsError(f"no claims file at {where}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ClaimsError(f"{where} is not valid YAML: {_first_line(err)}") from None
    items = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ClaimsError(f"{where}: expected a mapping with a list `claims:`")
    return [_claim(item, i, where) for i, item in enumerate(items)]


def _claim(item: Any, i: int, where: str) -> Claim:
    name = item.get("id", f"#{i + 1}") if isinstance(item, dict) else f"#{i + 1}"
    if not isinstance(item, dict):
        raise ClaimsError(f"{where}: claim {name} is not a mapping")
    unknown = sorted(set(item) - _CLAIM_KEYS)
    if unknown:  # a typo would otherwise silently widen what is checked
        raise ClaimsError(f"{where}: claim {name}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(_CLAIM_KEYS))})")
    lacking = [k for k in ("id", "text", "dataset", "a", "b") if k not in item]
    if lacking:
        raise ClaimsError(f"{where}: claim {name} lacks {', '.join(lacking)}")
    for key in ("a", "b", "where"):
        if not isinstance(item.get(key, {}), dict):
            raise ClaimsError(f"{where}: claim {name}: `{key}` must be a mapping")
    tolerance = item.get("tolerance") or {}
    try:
        return Claim(
            id=str(item["id"]), text=" ".join(str(item["text"]).split()),
            dataset=str(item["dataset"]), a=dict(item["a"]), b=dict(item["b"]),
            source=" ".join(str(item.get("source", "")).split()),
            experiments=str(item.get("experiments", "*")), where=dict(item.get("where") or {}),
            pair_on=tuple(item.get("pair_on") or ("network", "width", "init")),
            b_width=float(item.get("b_width", 1.0)), min_seeds=int(item.get("min_seeds", 3)),
            tolerance_std=float(tolerance.get("std", 1.0)),
            tolerance_points=float(tolerance.get("points", 0.0)))
    except (TypeError, ValueError, AttributeError) as err:
        raise ClaimsError(f"{where}: claim {name}: {_first_line(err)}") from None


@dataclass
class Side:
    """One side of a pair: its trials' finished test accuracies."""

    accs: list[float]
    trials: int
    missing: str = ""  # e.g. "seed 3 running"

    @property
    def n(self) -> int:
        return len(self.accs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs) if self.accs else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else math.nan

    def text(self) -> str:
        if not self.accs:
            return f"no finished seed of {self.trials}"
        spread = f" ± {self.std:.2f}" if self.n > 1 else ""
        return f"{self.mean:.2f}{spread} ({self.n} seed{'s' if self.n != 1 else ''})"


@dataclass
class PairCheck:
    label: str
    a: Side
    b: Side
    outcome: str          # holds / fails / undecided
    margin: float = math.nan      # a's mean minus b's, percentage points
    tolerance: float = math.nan
    why: str = ""         # undecided: what it waits for


@dataclass
class ClaimCheck:
    claim: Claim
    verdict: str          # held / not held / not covered
    summary: str          # the numbers behind the verdict, or why it is not covered
    pairs: list[PairCheck] = field(default_factory=list)
    scope: Optional[int] = None   # pairs the claim names (None: not countable)

    @property
    def a_name(self) -> str:
        return _side_name(self.claim.a, self.claim)

    @property
    def b_name(self) -> str:
        name = _side_name(self.claim.b, self.claim)
        return name + (f" at x{self.claim.b_width:g} the width" if self.claim.b_width != 1 else "")


def check_claims(results: pd.DataFrame, claims: Sequence[Claim],
                 kind: Optional[str] = None) -> list[ClaimCheck]:
    """Each claim's verdict on a run's trials (`load_results`): held, not held or not covered,
    with the numbers behind it. `kind` is the run's kind (a search has no test accuracy)."""
    return [_check(results, c, kind) for c in claims]


def _check(results: pd.DataFrame, claim: Claim, kind: Optional[str]) -> ClaimCheck:
    scope_n = _scope_size(claim)
    datasets = sorted(str(d) for d in results.get("dataset", pd.Series(dtype="string")).dropna().unique())
    if claim.dataset not in datasets:
        why = (f"this run trains on {_names(datasets) or 'no dataset'}; the claim is about "
               f"{DATASET_NAMES.get(claim.dataset, claim.dataset)}.")
        return ClaimCheck(claim, NOT_COVERED, why, scope=scope_n)
    if kind == SEARCH:
        return ClaimCheck(claim, NOT_COVERED, "a --search run measures validation accuracy only "
                          "(its trials never see the test set); run its best configurations "
                          "with --from-search and report that run.", scope=scope_n)
    df = results[results["dataset"].astype("string").eq(claim.dataset).fillna(False).astype(bool)]
    names = df["experiment"].astype("string").fillna("")
    df = df[names.map(lambda n: fnmatch.fnmatchcase(n, claim.experiments)).astype(bool)]
    df = df[_select(df, claim.where, claim)]
    if df.empty:
        return ClaimCheck(claim, NOT_COVERED, f"no trial of this run is in the claim's scope "
                          f"(experiments {claim.experiments}, "
                          f"{_where_text(claim.where) or 'any point'}).", scope=scope_n)
    a_groups = _groups(df[_select(df, claim.a, claim)], claim.pair_on)
    b_groups = _groups(df[_select(df, claim.b, claim)], claim.pair_on)
    pairs = []
    for key, a_trials in a_groups.items():
        b_key = _shifted(key, claim)
        if b_key in b_groups:
            pairs.append(_pair(claim, key, b_key, a_trials, b_groups[b_key]))
    a_name, b_name = _side_name(claim.a, claim), _side_name(claim.b, claim)
    if not pairs:
        have = a_name if a_groups else b_name if b_groups else None
        return ClaimCheck(claim, NOT_COVERED, f"this run has no pair of {a_name} and {b_name} at "
                          f"the same {', '.join(claim.pair_on)}"
                          + (f" (only {have})." if have else "."), scope=scope_n)
    coverage = (f" This run covers {len(pairs)} of the claim's {scope_n} pairs."
                if scope_n is not None and len(pairs) < scope_n else "")
    failed = [p for p in pairs if p.outcome == "fails"]
    decided = [p for p in pairs if p.outcome != "undecided"]
    if failed:
        return ClaimCheck(claim, NOT_HELD, f"fails at {len(failed)} of {len(pairs)} pairs: "
                          + "; ".join(f"{p.label} ({p.margin:+.2f} points, tolerance "
                                      f"{p.tolerance:.2f})" for p in failed) + "." + coverage,
                          pairs, scope_n)
    if len(decided) == len(pairs):
        worst = min(pairs, key=lambda p: p.margin + p.tolerance)  # closest to failing
        return ClaimCheck(claim, HELD, f"holds at all {len(pairs)} pairs; closest: {worst.label}, "
                          f"{a_name} {worst.margin:+.2f} points against {b_name} (tolerance "
                          f"{worst.tolerance:.2f})." + coverage, pairs, scope_n)
    waiting = [p for p in pairs if p.outcome == "undecided"]
    return ClaimCheck(claim, NOT_COVERED, f"{len(decided)} of {len(pairs)} pairs decided so far"
                      + (" (all hold)" if decided else "") + "; waiting for: "
                      + "; ".join(f"{p.label}: {p.why}" for p in waiting) + "." + coverage,
                      pairs, scope_n)


def _pair(claim: Claim, key: tuple, b_key: tuple, a_trials: pd.DataFrame,
          b_trials: pd.DataFrame) -> PairCheck:
    a, b = _side(a_trials), _side(b_trials)
    label = _pair_label(claim, key, b_key)
    short = [f"{_side_name(s, claim)} {side.n}/{claim.min_seeds} seeds finished"
             + (f" ({side.missing})" if side.missing else "")
             for s, side in ((claim.a, a), (claim.b, b)) if side.n < claim.min_seeds]
    if short:
        return PairCheck(label, a, b, "undecided", why=", ".join(short))
    margin = a.mean - b.mean
    spread = max((s for s in (a.std, b.std) if not math.isnan(s)), default=0.0)
    tolerance = max(claim.tolerance_std * spread, claim.tolerance_points)
    return PairCheck(label, a, b, "holds" if margin >= -tolerance - 1e-9 else "fails",
                     margin, tolerance)


def _side(trials: pd.DataFrame) -> Side:
    done = trials[finished(trials)]
    missing = trials[~finished(trials)]
    what = "; ".join(f"seed {s} {st}" for s, st in zip(missing.get("seed", []),
                                                       missing["status"].fillna("unknown")))
    return Side([float(v) for v in done["test_acc"]], len(trials), what)


def _select(df: pd.DataFrame, wanted: Mapping[str, Any], claim: Claim) -> pd.Series:
    ok = pd.Series(True, index=df.index)
    for key, value in wanted.items():
        if key not in df.columns:
            raise ClaimsError(f"claim {claim.id}: no column {key!r} in the run's table (use a "
                              "figure-point label or a TrialConfig field)")
        ok &= _matches(df[key], value)
    return ok


def _matches(column: pd.Series, value: Any) -> pd.Series:
    values = value if isinstance(value, list) else [value]
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        numbers = pd.to_numeric(column, errors="coerce").astype("float64")
        ok = pd.Series(False, index=column.index)
        for v in values:  # widths and rates are floats: 0.1 written in YAML is 0.1 stored
            ok |= (numbers - float(v)).abs().le(1e-9).fillna(False)
        return ok
    return column.astype("string").isin([str(v) for v in values]).fillna(False).astype(bool)


def _groups(df: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, pd.DataFrame]:
    if df.empty:
        return {}
    return {tuple(_norm(v) for v in (k if isinstance(k, tuple) else (k,))): g
            for k, g in df.groupby(list(keys), dropna=False, sort=False)}


def _norm(value: Any) -> Any:
    if isinstance(value, float) and not math.isnan(value):
        return round(value, 9)
    return value


def _shifted(key: tuple, claim: Claim) -> tuple:
    if claim.b_width == 1.0 or "width" not in claim.pair_on:
        return key
    i = claim.pair_on.index("width")
    return (*key[:i], _norm(float(key[i]) * claim.b_width), *key[i + 1:])


def _scope_size(claim: Claim) -> Optional[int]:
    """How many pairs the claim names: the product of its listed values per paired label."""
    n = 1
    for key in claim.pair_on:
        value = claim.a.get(key, claim.where.get(key))
        n *= len(value) if isinstance(value, list) else 1
    return n


def _pair_label(claim: Claim, key: tuple, b_key: tuple) -> str:
    values = dict(zip(claim.pair_on, key))
    parts = []
    if "network" in values:
        parts.append(NETWORK_NAMES.get(values["network"], str(values["network"])))
    if "width" in values:
        width = f"x{values['width']:g}"
        if b_key != key:
            width += f" vs x{dict(zip(claim.pair_on, b_key))['width']:g}"
        parts.append(width)
    if "init" in values:
        parts.append(str(values["init"]).upper())
    parts += [f"{k}={v}" for k, v in values.items() if k not in ("network", "width", "init")]
    return " ".join(parts)


def _side_name(wanted: Mapping[str, Any], claim: Claim) -> str:
    parts = []
    for key, value in wanted.items():
        if key in claim.pair_on:
            continue
        if key == "method":
            parts.append(METHOD_NAMES.get(value, str(value)) if not isinstance(value, list)
                         else "/".join(METHOD_NAMES.get(v, str(v)) for v in value))
        elif key == "rerand_lambda":
            parts.append(f"r = {value:g}" if isinstance(value, (int, float)) else f"r in {value}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts) or "the trials"


def _where_text(where: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {'/'.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in where.items())


def _names(datasets: Sequence[str]) -> str:
    return ", ".join(DATASET_NAMES.get(d, d) for d in datasets)


def claims_for(marker: Optional[Mapping[str, Any]]) -> str:
    """The claims file a run is checked against: claims.yaml beside the run's experiment file
    when there is one (a user's own copy of experiments/), else the project's."""
    file = (marker or {}).get("file")
    if isinstance(file, str):
        beside = os.path.join(os.path.dirname(file), CLAIMS_FILE)
        if os.path.isfile(beside):
            return beside
    return DEFAULT_CLAIMS


# ------------------------------------------------------------------ figures

def _png(fig: Figure) -> str:
    """The figure as a data URI: the report carries its images."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _line_name(row: Mapping[str, Any], extra: Sequence[str]) -> str:
    method = METHOD_NAMES.get(row.get("method"), str(row.get("method")))
    init = row.get("init")
    name = f"{method} ({str(init).upper()})" if isinstance(init, str) else method
    for k in extra:
        v = row.get(k)
        name += f", {'r' if k == 'rerand_lambda' else k}={v:g}" if isinstance(v, float) else f", {k}={v}"
    return name


def learning_curves(results: pd.DataFrame, history: pd.DataFrame) -> Figure:
    """Validation accuracy against epoch, one panel per network and width, one colour per figure
    point: each seed a thin line, their mean bold; the test accuracy after the last epoch as
    small dots (seeds) and a star (their mean)."""
    keys = point_keys(results)
    extra = [k for k in keys if k not in POINT_LABELS]
    cols = [c for c in dict.fromkeys(["trial_id", *keys, "seed"]) if c in results.columns]
    h = history.drop(columns=[c for c in cols if c != "trial_id" and c in history.columns])
    h = h.merge(results[cols], on="trial_id", how="inner")
    panels = list(dict.fromkeys(zip(results["network"], results["width"])))
    lines = list(dict.fromkeys(_line_name(r, extra) for r in results[[*keys]].to_dict("records")))
    palette = ["tab:blue", "tab:red", "0.35", "tab:green", "tab:orange", "tab:purple",
               "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    colors = {}
    for name in lines:  # the paper's colours where a method has one line
        method = next((m for m, n in METHOD_NAMES.items() if name.startswith(n + " ")), None)
        same = [n for n in lines if method and n.startswith(METHOD_NAMES[method] + " ")]
        colors[name] = (METHOD_COLORS[method] if method and len(same) == 1 and
                        METHOD_COLORS[method] not in colors.values()
                        else palette[len(colors) % len(palette)])
    ncols = min(4, max(1, len(panels)))
    nrows = math.ceil(len(panels) / ncols) if panels else 1
    fig = Figure(figsize=(3.3 * ncols + 2.4, 2.7 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (network, width) in zip(axes, panels):
        panel = h[(h["network"] == network) & (h["width"] == width)]
        for key, point in panel.groupby(keys, dropna=False, sort=False):
            name = _line_name(dict(zip(keys, key)), extra)
            color = colors[name]
            for _, seed in point.groupby("trial_id", sort=False):
                seed = seed.sort_values("epoch")
                ax.plot(seed["epoch"], seed[VALIDATION_METRIC], color=color, lw=0.8, alpha=0.35)
                test = seed.dropna(subset=["test_acc"])
                ax.plot(test["epoch"], test["test_acc"], ".", color=color, ms=4, alpha=0.6)
            mean = point.groupby("epoch")[VALIDATION_METRIC].mean()
            ax.plot(mean.index, mean.to_numpy(), color=color, lw=2.2, label=name)
            tests = point.dropna(subset=["test_acc"])
            if not tests.empty:
                ax.plot([tests["epoch"].max()], [tests["test_acc"].mean()], "*", color=color,
                        ms=11, mec="black", mew=0.5)
        ax.set_title(f"{NETWORK_NAMES.get(network, network)} x{width:g}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in axes for lab in ax.get_legend_handles_labels()[1]]
    seen = dict(zip(labels, handles))
    seen["each seed (thin)"] = Line2D([], [], color="0.5", lw=0.8, alpha=0.5)
    seen["test acc. after the last epoch (mean: star)"] = Line2D([], [], color="0.3", marker="*",
                                                                 ls="", ms=10, mec="black")
    fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=7.5,
               frameon=False)
    fig.suptitle("Learning curves: validation accuracy per epoch (mean over seeds bold)",
                 fontsize=10)
    return fig


def _search_figure(samples: list[dict[str, Any]], searched: Sequence[str], max_epochs: int,
                   chosen: Optional[str]) -> Figure:
    """One search point: each sample's validation accuracy per epoch (where ASHA stopped it,
    a cross), and its best validation accuracy against each searched option."""
    n = 1 + len(searched)
    ncols = min(3, n)  # at most three panels a row: readable at the page's width
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.4 * ncols + 0.4, 2.5 * nrows + 0.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    axes = axes[:n]
    ax = axes[0]
    for s in samples:
        rows = [r for r in s["rows"] if r.get(VALIDATION_METRIC) is not None]
        if not rows:
            continue
        best = s["trial_id"] == chosen
        x = [r["epoch"] for r in rows]
        y = [r[VALIDATION_METRIC] for r in rows]
        ax.plot(x, y, color="tab:red" if best else "tab:blue", lw=2.2 if best else 0.8,
                alpha=1.0 if best else 0.45, zorder=3 if best else 2)
        if s["status"] == "stopped":
            ax.plot(x[-1:], y[-1:], "x", color="0.2", ms=5)
        elif s["status"] == DIVERGED:
            ax.plot(x[-1:], y[-1:], "v", color="tab:orange", ms=5)
    ax.set_xlim(0.5, max(max_epochs, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("val. accuracy (%)", fontsize=8)
    ax.set_title("samples (x: stopped by ASHA; v: diverged; red: chosen)", fontsize=8)
    for ax, option in zip(axes[1:], searched):
        xs = [(s["config"].get(option), s["best_val_acc"], s) for s in samples
              if isinstance(s["config"].get(option), (int, float)) and s["best_val_acc"] is not None]
        for x, y, s in xs:
            best = s["trial_id"] == chosen
            ax.plot([x], [y], "*" if best else "o", color="tab:red" if best else "tab:blue",
                    ms=11 if best else 5, mfc="tab:red" if best else
                    ("none" if s["status"] != "finished" else "tab:blue"), zorder=3 if best else 2)
        positive = [x for x, _, _ in xs if x > 0]
        if positive and len(positive) == len(xs) and max(positive) / min(positive) > 20:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_xlabel(_option_name(option), fontsize=8)
        ax.set_ylabel("best val. acc. (%)", fontsize=8)
    if len(axes) > 1:
        axes[1].set_title("each sample (hollow: ended early; star: chosen)", fontsize=8, loc="left")
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    return fig


def _option_name(option: str) -> str:
    return {"rerand_lambda": "r (rerand_lambda)", "rerand_freq": "K_per (rerand_freq)",
            "conv_sparsity": "p (conv_sparsity)"}.get(option, option)


# ------------------------------------------------------------------ the run's facts

def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _when(seconds: Optional[float]) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: Optional[float]) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _trial_name(t: TrialRecord) -> str:
    c = t.config
    if t.slot and t.slot[0] == SEARCH:
        return f"{t.slot[1]} sample {t.slot[2]}"
    return f"{c.get('experiment', '?')} {c.get('model', '?')} seed {c.get('seed', '?')}"


def _times(trials: Sequence[TrialRecord]) -> tuple[Optional[float], Optional[float]]:
    """(first epoch's start, last report's end) over the run's trials, from their reports."""
    starts, ends = [], []
    for t in trials:
        if not t.rows:
            continue
        first, last = t.rows[0], t.rows[-1]
        end0 = first.get("epoch_end_time") or first.get("timestamp")
        if end0 is not None:
            starts.append(float(end0) - float(first.get("epoch_seconds")
                                              or first.get("time_this_iter_s") or 0))
        end = last.get("epoch_end_time") or last.get("timestamp")
        if end is not None:
            ends.append(float(end))
    return (min(starts) if starts else None), (max(ends) if ends else None)


def _planned(run: Run) -> int:
    marker = run.marker or {}
    if run.kind == SEARCH:
        return max(int(marker.get("num_samples") or 0) * len(marker.get("points") or []),
                   len(run.trials))
    return len(run.trials)


def _resume_command(run: Run) -> Optional[str]:
    marker = run.marker or {}
    if not isinstance(marker.get("file"), str):
        return None
    path = run.path.rstrip("/")
    storage, name = (path.rsplit("/", 1) if is_uri(path) else os.path.split(os.path.abspath(path)))
    return " ".join(shlex.quote(p) for p in ("python", "-m", "iterand_tune", marker["file"],
                                             "--storage-path", storage, "--name", name,
                                             "--resume"))


def _overview(run: Run) -> dict[str, Any]:
    statuses = Counter(t.status for t in run.trials)
    planned = _planned(run)
    ended = sum(t.ended for t in run.trials)
    unsampled = planned - len(run.trials)
    start, end = _times(run.trials)
    complete = ended == planned
    problems = {s: statuses[s] for s in ("errored", DIVERGED) if statuses.get(s)}
    if complete and not problems:
        state, css = "finished", "ok"
    elif complete:
        state, css = "finished, with " + ", ".join(f"{n} {s}" for s, n in problems.items()), "warn"
    else:
        state, css = "not finished", "partial"
    counts = ", ".join(f"{n} {s}" for s, n in statuses.most_common())
    if unsampled > 0:
        counts += f", {unsampled} not sampled yet"
    missing = [f"{_trial_name(t)}: {t.status}" for t in run.trials if not t.ended]
    return dict(state=state, css=css, complete=complete, planned=planned, ended=ended,
                counts=counts, missing=missing, unsampled=max(unsampled, 0),
                resume=None if complete else _resume_command(run),
                start=_when(start), end=_when(end),
                elapsed=_duration(end - start) if start and end else "-",
                created=(run.marker or {}).get("created"))


def _what_was_run(run: Run, results: pd.DataFrame) -> dict[str, Any]:
    marker = run.marker or {}
    command = marker.get("command")
    versions = dict(marker.get("versions") or {})
    if "cuda" not in versions:
        versions["cuda"] = None  # shown as "not recorded": the run did not say
    flags = {k: v for k, v in (marker.get("flags") or {}).items()
             if v not in (None, False, [], "")}
    datasets = []
    if "dataset" in results.columns:
        for name, group in results.groupby(results["dataset"].astype("string").fillna("?"),
                                           sort=False):
            folders = sorted({str(d) for d in group.get("dataset_dir", pd.Series()).dropna()})
            datasets.append((DATASET_NAMES.get(name, name), len(group), ", ".join(folders)))
    experiments, notes = [], {}
    for name, info in (marker.get("experiments") or {}).items():
        n = int((results["experiment"] == name).sum()) if "experiment" in results else 0
        experiments.append((name, n))
        if (info or {}).get("note"):  # a note is usually shared by every experiment of a file
            notes.setdefault(info["note"], []).append(name)
    return dict(file=marker.get("file"), file_text=marker.get("file_text"),
                command=" ".join(shlex.quote(str(c)) for c in command) if isinstance(command, list)
                else None, kind=run.kind or "unknown (no run.json)", flags=flags,
                versions=versions, datasets=datasets, experiments=experiments,
                notes=[(note, names if len(names) < len(experiments) else None)
                       for note, names in notes.items()],
                nodes=_nodes(run.trials), marker=run.marker is not None)


def _nodes(trials: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    """What the reports say of the machines: Ray's host name and IP, our node id, and whether
    the epochs ran on a CUDA device (they then report its peak memory); the GPU or CPU model each
    trial reports (`device_name`; runs before it was reported: "not recorded")."""
    nodes: dict[str, dict[str, Any]] = {}
    for t in trials:
        for r in t.rows:
            key = str(r.get("node_id") or r.get("hostname") or "unknown")
            n = nodes.setdefault(key, dict(node_id=r.get("node_id"), hostname=r.get("hostname"),
                                           ip=r.get("node_ip"), trials=set(), epochs=0, peak=None,
                                           name=None))
            n["name"] = r.get("device_name") or n["name"]
            n["trials"].add(t.trial_id)
            n["epochs"] += 1
            if r.get("peak_gpu_memory_mb") is not None:
                n["peak"] = max(n["peak"] or 0.0, float(r["peak_gpu_memory_mb"]))
    out = []
    for n in nodes.values():
        peak = f"peak {n['peak']:.0f} MiB allocated" if n["peak"] is not None else None
        if n["name"]:
            device = n["name"] + (f" ({peak})" if peak else "")
        else:
            device = (f"CUDA GPU ({peak}; model not recorded)" if peak
                      else "CPU (model not recorded)")
        out.append(dict(host=n["hostname"] or "-", ip=n["ip"] or "-",
                        node_id=(n["node_id"] or "-")[:12], trials=len(n["trials"]),
                        epochs=n["epochs"], device=device))
    return out


def _point_table(points: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in points.columns if k not in ("trials", "excluded", "test_acc_mean",
                                                   "test_acc_std", "test_acc_count",
                                                   "params_after_pruning",
                                                   "params_before_pruning", "missing")]
    shown = [k for k in keys if k not in ("network", "width")]
    head = [*shown, "seeds", "test acc. % (mean ± std)", "params before pruning",
            "params after pruning", "not finished"]
    body = []
    for _, p in points.iterrows():
        acc = "-" if p["test_acc_count"] == 0 else (
            f"{p['test_acc_mean']:.2f}" + (f" ± {p['test_acc_std']:.2f}"
                                           if not pd.isna(p["test_acc_std"]) else ""))
        body.append([*(_cell(p[k]) for k in shown), f"{p['test_acc_count']}/{p['trials']}", acc,
                     _cell(p["params_before_pruning"], ","), _cell(p["params_after_pruning"], ","),
                     _cell(p["missing"])])
    return head, body


def _cell(value: Any, spec: str = "") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and not spec:
        return f"{value:g}"
    return format(value, spec)


def _figure_subsets(results: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The paper's figures a grid run covers: figure 3 for ImageNet trials, figure 1 for the
    experiments that vary r (or are named figure1_*), figure 2 for the rest."""
    out = []
    imagenet = results["dataset"].astype("string").eq("imagenet").fillna(False).astype(bool)
    if imagenet.any():
        out.append(("figure3", results[imagenet]))
    rest = results[~imagenet]
    if rest.empty:
        return out
    varies = rest.groupby("experiment")["rerand_lambda"].nunique(dropna=False)
    fig1 = {e for e, n in varies.items() if n > 1 or str(e).startswith("figure1")}
    in_fig1 = rest["experiment"].isin(fig1).fillna(False).astype(bool)
    if in_fig1.any():
        out.insert(0, ("figure1", rest[in_fig1]))
    if (~in_fig1).any():
        out.insert(1 if in_fig1.any() else 0, ("figure2", rest[~in_fig1]))
    return out


FIGURE_TITLES = {"figure1": "Figure 1: the effect of the re-randomisation rate r",
                 "figure2": "Figure 2: test accuracy against parameters after pruning",
                 "figure3": "Figure 3: ImageNet"}


def _figures(results: pd.DataFrame, kind: Optional[str]) -> dict[str, Any]:
    if kind == SEARCH:
        return dict(figures=[], note="A --search run measures validation accuracy only, so it draws "
                    "none of the paper's figures (they show test accuracy); its samples are in the "
                    "search section. Reproduce the chosen configurations with --from-search.",
                    head=[], body=[])
    figures = []
    for name, subset in _figure_subsets(results):
        try:
            figures.append(dict(title=FIGURE_TITLES[name], img=_png(FIGURES[name](subset))))
        except ResultsError as err:
            figures.append(dict(title=FIGURE_TITLES[name], img=None, error=str(err)))
    head, body = _point_table(aggregate(results))
    return dict(figures=figures, head=head, body=body, note=None)


def _search(run: Run) -> dict[str, Any]:
    """Per point: every sample's searched values, epochs, best validation accuracy and where
    ASHA stopped it, and the configuration the search chose (its own rule)."""

    marker = run.marker or {}
    rows, _, _ = best_rows(run)
    chosen = {r["point"]: r for r in rows}
    points = []
    names = list(dict.fromkeys([*(marker.get("points") or []),
                                *(t.slot[1] for t in run.trials if t.slot and t.slot[0] == SEARCH)]))
    for name in names:
        trials = [t for t in run.trials if t.slot and t.slot[0] == SEARCH and t.slot[1] == name]
        searched = list((marker.get("searched") or {}).get(name) or [])
        max_epochs = int((marker.get("max_epochs") or {}).get(name) or 0)
        best = chosen.get(name)
        samples = []
        for t in trials:
            last = t.last
            epochs = last.get("epoch")
            status = t.status
            where = {"stopped": f"stopped by ASHA after epoch {epochs}",
                     DIVERGED: f"diverged at epoch {epochs}",
                     "errored": f"errored: {t.error or 'see error.txt'}"}.get(status, status)
            samples.append(dict(sample=t.slot[2], trial_id=t.trial_id, config=t.config,
                                rows=t.rows, status=status, where=where, epochs=epochs,
                                best_val_acc=last.get("best_val_acc"),
                                cells=[_cell(t.config.get(k), ".4g")
                                        if isinstance(t.config.get(k), float)
                                        else _cell(t.config.get(k)) for k in searched]))
        chosen_id = best["trial_id"] if best else None
        img = _png(_search_figure(samples, searched, max_epochs, chosen_id)) if samples else None
        points.append(dict(
            name=name, searched=[_option_name(k) for k in searched], max_epochs=max_epochs,
            samples=[{**s, "chosen": s["trial_id"] == chosen_id,
                      "best": _cell(s["best_val_acc"], ".2f")} for s in samples],
            img=img, unchosen=None if best else (
                "No sample can be chosen: each one that reported diverged or ended in an error."
                if any(x["best_val_acc"] is not None for x in samples)
                else "No sample has reported a validation accuracy yet."),
            chosen=(", ".join(f"{k}={_cell(v, '.4g') if isinstance(v, float) else v}"
                                       for k, v in best["searched"].items())
                             + f" (best val. acc. {best['best_val_acc']:.2f}% at epoch "
                             f"{best['best_epoch']}, sample {next((s['sample'] for s in samples if s['trial_id'] == chosen_id), '?')})"
                             if best else None)))
    return dict(points=points, per_point=marker.get("num_samples"),
                from_search=f"python -m iterand_tune {marker.get('file') or 'FILE'} "
                            f"--from-search {run.path}")


def _cost(run: Run, results: pd.DataFrame) -> dict[str, Any]:
    """Wall time and GPU-hours (time x GPU share) per trial, point and in total; the trials that
    failed, diverged or were stopped, with their last line."""
    marker = run.marker or {}
    forced = (marker.get("flags") or {}).get("gpus_per_trial")
    by_name = marker.get("experiments") or {}
    keys = point_keys(results) if not results.empty else []
    point_of = {}
    for _, r in results.iterrows():
        point_of[r["trial_id"]] = " ".join(_cell(r[k]) for k in keys
                                           if k not in ("network", "width"))
    rows, sources = [], set()
    for t in run.trials:
        if not t.rows:
            continue
        last = t.last
        seconds = last.get("time_total_s")
        if seconds is None:
            seconds = sum(float(r.get("epoch_seconds") or 0) for r in t.rows)
        share, source = _gpu_share(t, forced, by_name)
        sources.add(source)
        point = t.slot[1] if t.slot and t.slot[0] == SEARCH else point_of.get(t.trial_id, "?")
        rows.append(dict(point=point, seconds=float(seconds), share=share,
                         gpu_hours=float(seconds) / 3600 * share))
    points: dict[str, dict[str, Any]] = {}
    for r in rows:
        p = points.setdefault(r["point"], dict(point=r["point"], trials=0, seconds=0.0,
                                               gpu_hours=0.0, shares=set()))
        p["trials"] += 1
        p["seconds"] += r["seconds"]
        p["gpu_hours"] += r["gpu_hours"]
        p["shares"].add(r["share"])
    table = [[p["point"], str(p["trials"]), _duration(p["seconds"]),
              "/".join(f"{s:g}" for s in sorted(p["shares"])), f"{p['gpu_hours']:.3f}"]
             for p in points.values()]
    total_s = sum(r["seconds"] for r in rows)
    total_gpu = sum(r["gpu_hours"] for r in rows)
    cpu_run = all(r["share"] == 0 for r in rows)
    how = ("CPU run: no trial trained on a GPU, so 0 GPU-hours." if cpu_run else
           "GPU share per trial from " + ", ".join(sorted(sources - {"CPU"})) +
           "; GPU-hours = the trial's time x its share.")
    return dict(table=table, total=_duration(total_s), total_hours=f"{total_s / 3600:.3f}",
                gpu_hours=f"{total_gpu:.3f}", cpu_run=cpu_run, how=how,
                trials=len(rows), problems=_problems(run))


def _gpu_share(t: TrialRecord, forced: Any, by_name: Mapping[str, Any]) -> tuple[float, str]:
    """The GPU share a trial held: what its reports say it was given (`gpu_share`), else as the
    run requested it; counted only when its epochs ran on a CUDA device (they report its peak
    memory)."""
    if not any(r.get("peak_gpu_memory_mb") is not None for r in t.rows):
        return 0.0, "CPU"
    given = next((r["gpu_share"] for r in reversed(t.rows) if r.get("gpu_share") is not None), None)
    if given is not None:
        return float(given), "the trial's reports"
    if forced is not None:
        return float(forced), "--gpus-per-trial"
    chosen = (by_name.get(t.config.get("experiment")) or {}).get("gpus_per_trial")
    if chosen is not None:
        return float(chosen), "the experiment's gpus_per_trial"
    return 0.0, "not recorded (a run before trials reported their share)"


def _problems(run: Run) -> list[list[str]]:
    out = []
    for t in run.trials:
        status = t.status
        if status not in ("errored", DIVERGED, "stopped"):
            continue
        last = t.last
        epochs = f"{_cell(last.get('epoch'))}/{_cell(t.config.get('epochs'))}"
        if status == "errored":
            line = t.error or "error.txt absent: Ray marked it failed"
        elif status == DIVERGED:
            line = (f"training loss {last.get('train_loss')} at epoch {last.get('epoch')} "
                    "(not finite): the trial stopped there; a lower lr may help")
        else:
            line = (f"stopped after epoch {last.get('epoch')} (val. acc. "
                    f"{_cell(last.get(VALIDATION_METRIC), '.2f')}%)"
                    + (" by ASHA" if run.kind == SEARCH else ""))
        out.append([_trial_name(t), str(t.trial_id), status, epochs, line])
    return out


# ------------------------------------------------------------------ the page

def _section(build: Callable[[], Any]) -> dict[str, Any]:
    """A section's content, or the one line saying why it could not be made: a report of a
    partial or odd run still shows everything else."""
    try:
        return dict(ok=True, data=build())
    except Exception as err:  # noqa: BLE001 - any failure of one section is shown, not raised
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return dict(ok=False, error=f"{type(err).__name__}: {_first_line(err)}",
                    where=f"{os.path.basename(frame.filename)}:{frame.lineno}, in {frame.name}")


@dataclass
class Report:
    html: str
    summary: str   # one line: the run's state and the claims' verdicts


def render_report(run_path: PathLike, claims: Optional[PathLike] = None) -> str:
    """The report of the run at `run_path` (folder or URI) as HTML text. `claims`: a claims file
    (default: claims.yaml beside the run's experiment file, else experiments/claims.yaml).
    Raises ResultsError only when the path holds no run."""
    return build_report(run_path, claims).html


def build_report(run_path: PathLike, claims: Optional[PathLike] = None) -> Report:
    """The report (`render_report`) and a one-line summary of it."""
    path = os.fspath(run_path)
    run = _read(path)
    results = _section(lambda: load_results(run))  # the folder is read once, here
    history = _section(lambda: load_history(run))
    trials = results["data"] if results["ok"] else None
    claims_file = os.fspath(claims) if claims is not None else claims_for(run.marker)
    notes = list(dict.fromkeys(e.get("note") for e in ((run.marker or {}).get("experiments") or {}).values()
                               if isinstance(e, dict) and e.get("note")))
    is_search = run.kind == SEARCH
    sections = dict(
        overview=_section(lambda: _overview(run)),
        claims=_section(lambda: check_claims(_need(trials), load_claims(claims_file), run.kind)),
        what=_section(lambda: _what_was_run(run, _need(trials))),
        figures=_section(lambda: _figures(_need(trials), run.kind)),
        curves=None if is_search else _section(
            lambda: _png(learning_curves(_need(trials), _need(history["data"] if history["ok"] else None)))
            if not _need(trials).empty else None),
        search=_section(lambda: _search(run)) if is_search else None,
        cost=_section(lambda: _cost(run, _need(trials))),
    )
    try:
        html = _template().render(
            name=os.path.basename(path.rstrip("/").split("?")[0]) or path, path=path, run=run,
            s=sections, claims_file=claims_file, skipped=run.notes(),
            generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), HELD=HELD, NOT_HELD=NOT_HELD,
            NOT_COVERED=NOT_COVERED, notes=notes,
            problems=[results, history])
    except Exception as err:  # noqa: BLE001 - a page that says what failed beats no page
        html = _fallback(path, err)
    return Report(html, _summary(sections))


def _summary(sections: Mapping[str, Any]) -> str:
    o, c = sections["overview"], sections["claims"]
    run = (f"run {o['data']['state']}, {o['data']['ended']} of {o['data']['planned']} trials ended"
           if o["ok"] else "run state unknown")
    if not c["ok"]:
        return f"{run}; claims not checked ({c['error']})"
    verdicts = Counter(check.verdict for check in c["data"])
    return f"{run}; claims: " + ", ".join(f"{verdicts.get(v, 0)} {v}"
                                          for v in (HELD, NOT_HELD, NOT_COVERED))


def _fallback(path: str, err: BaseException) -> str:
    """The page when the report itself could not be laid out: the run, the error, the way on."""
    import html as html_text
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>IteRand "
            f"reproduction report: {html_text.escape(path)}</title></head><body><h1>IteRand "
            f"reproduction report</h1><p>{html_text.escape(path)}</p><p>The report could not "
            f"be made: {html_text.escape(type(err).__name__ + ': ' + _first_line(err))}.</p>"
            "<p>Its tables are still there: <code>python -m analysis table RUN</code>.</p>"
            "</body></html>")


def _need(table: Optional[pd.DataFrame]) -> pd.DataFrame:
    if table is None:
        raise ResultsError("the run's table could not be read (see the first section)")
    return table


def _read(path: str) -> Run:
    from iterand_tune.runs import ReadError
    try:
        return read_run(path)
    except ReadError as err:
        raise ResultsError(str(err)) from None


def write_report(run_path: str, output: Optional[str] = None, *,
                 claims: Optional[str] = None) -> str:
    """Write the run's report (default RUN/report.html; a path or URI, through pyarrow
    filesystems) and return where it went. A partial, interrupted or failed run gets a report
    that says what is missing; a section that cannot be made is replaced by one line saying why.
    Raises ResultsError only for a path that holds no run or an output it cannot write."""
    where = output if output is not None else join_path(run_path, REPORT_FILE)
    write_bytes(build_report(run_path, claims).html.encode("utf-8"), where)
    return where


# The page: one file, its style inline, its images data URIs; no script, no link off the page.
TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>IteRand reproduction report: {{ name }}</title>
<style>
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d1d1f; margin: 0 auto; max-width: 1120px; padding: 18px 28px 40px; }
h1 { font-size: 25px; margin: 4px 0 2px; }
h2 { font-size: 19px; margin: 30px 0 8px; border-bottom: 2px solid #e3e3e8; padding-bottom: 3px; }
h3 { font-size: 15.5px; margin: 18px 0 6px; }
p { margin: 6px 0; }
.sub { color: #555; margin: 0 0 10px; word-break: break-all; }
.banner { border-radius: 6px; padding: 9px 14px; margin: 8px 0 10px; }
.banner.ok { background: #e7f6ea; border: 1px solid #9bd3a6; }
.banner.warn { background: #fff6e0; border: 1px solid #f0cc72; }
.banner.partial { background: #fdecea; border: 1px solid #eba39b; }
.intro { color: #333; font-size: 14px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid #d9d9de; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; border-radius: 4px; padding: 1px 8px; font-weight: 700;
         font-size: 12.5px; white-space: nowrap; }
.held { background: #1f8a3b; color: white; }
.not-held { background: #c62828; color: white; }
.not-covered { background: #8a8a93; color: white; }
.holds { color: #1f8a3b; font-weight: 600; }
.fails { color: #c62828; font-weight: 600; }
.undecided { color: #6d6d75; }
.claimtext { font-weight: 600; }
.small { font-size: 12.5px; color: #555; }
code, pre { font: 12.5px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
pre { background: #f6f6f8; border: 1px solid #e3e3e8; border-radius: 5px; padding: 8px 10px;
      overflow: auto; white-space: pre-wrap; word-break: break-word; }
pre.file { max-height: 26em; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
nav { font-size: 13.5px; margin: 4px 0 6px; }
nav a { margin-right: 12px; color: #2455a4; text-decoration: none; }
.error { color: #c62828; }
.note { background: #f3f6fb; border-left: 3px solid #7a9cd3; padding: 5px 10px; font-size: 13.5px; }
.chosen td { background: #fdeceb; font-weight: 600; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  nav { display: none; }
  pre.file { max-height: none; overflow: visible; }
  h2 { break-after: avoid; }
  img, table, .banner { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
}
</style>
</head>
<body>
{% macro failed(sec) -%}
<p class="error">This section could not be made: {{ sec.error }} ({{ sec.where }}).</p>
{%- endmacro %}
{% macro verdict(v) -%}
<span class="badge {{ v | replace(' ', '-') }}">{{ v }}</span>
{%- endmacro %}
<h1>IteRand reproduction report: {{ name }}</h1>
<p class="sub">{{ path }}</p>
{% set ov = s.overview %}
{% if ov.ok %}{% set o = ov.data %}
<div class="banner {{ o.css }}">
  <b>Run {{ o.state }}</b>: {{ o.ended }} of {{ o.planned }} trials ended ({{ o.counts }}).
  {% if not o.complete %}This report shows what exists so far; the run is still going or was
  interrupted.{% if o.resume %} To continue an interrupted run: <code>{{ o.resume }}</code>{% endif %}{% endif %}
  <br><span class="small">First epoch started {{ o.start }}; last report {{ o.end }} (span {{ o.elapsed }}).
  Report made {{ generated }}.</span>
</div>
{% else %}{{ failed(ov) }}{% endif %}
<p class="intro">IteRand (Chijiwa et al., "Pruning Randomly Initialized Neural Networks with Iterative
Randomization", NeurIPS 2021) trains only a mask over a network's random weights (edge-popup) and
re-randomises the pruned weights now and then (rate r). Its claim: with the same random weights,
IteRand is at least as accurate as edge-popup, so it needs fewer parameters for a given accuracy.
This page checks that claim on the run above and shows everything behind the verdicts.</p>
<nav><a href="#claims">Claims</a><a href="#what">What was run</a>{% if s.search %}<a href="#search">Search</a>{% else %}<a href="#figures">Figures</a><a href="#curves">Learning curves</a>{% endif %}<a href="#cost">Cost and failures</a>{% if s.overview.ok and not s.overview.data.complete %}<a href="#missing">Missing</a>{% endif %}<a href="#about">About</a></nav>

<h2 id="claims">1. Does the run reproduce the paper's claims?</h2>
{% if s.claims.ok %}
<p>{% for v in [HELD, NOT_HELD, NOT_COVERED] %}{{ verdict(v) }} {{ s.claims.data | selectattr('verdict', 'equalto', v) | list | length }}&nbsp;&nbsp; {% endfor %}
<span class="small">of {{ s.claims.data | length }} claims checked against this run</span></p>
{% if notes and s.claims.data | selectattr('verdict', 'equalto', NOT_COVERED) | list %}
{% for n in notes %}<p class="note"><b>Note of this run's experiment file:</b> {{ n }}</p>{% endfor %}
{% endif %}
<table>
<tr><th>verdict</th><th>claim</th><th>the numbers behind it</th></tr>
{% for c in s.claims.data %}
<tr id="claim-{{ c.claim.id }}"><td>{{ verdict(c.verdict) }}</td><td><span class="claimtext">{{ c.claim.text }}</span>
<br><span class="small">{{ c.claim.id }}; {{ c.claim.source }}</span></td><td>{{ c.summary }}</td></tr>
{% endfor %}
</table>
{% for c in s.claims.data if c.pairs %}
<h3>{{ verdict(c.verdict) }} {{ c.claim.id }}</h3>
<p class="small">Rule: {{ c.claim.tolerance_text() }}. Test accuracy in %, mean ± standard deviation over seeds.</p>
<table>
<tr><th>pair</th><th>{{ c.a_name }}</th><th>{{ c.b_name }}</th><th>difference</th><th>tolerance</th><th>result</th></tr>
{% for p in c.pairs %}
<tr><td>{{ p.label }}</td><td class="num">{{ p.a.text() }}</td><td class="num">{{ p.b.text() }}</td>
<td class="num">{{ '%+.2f' % p.margin if p.outcome != 'undecided' else '-' }}</td>
<td class="num">{{ '%.2f' % p.tolerance if p.outcome != 'undecided' else '-' }}</td>
<td class="{{ p.outcome }}">{{ p.outcome }}{% if p.why %}: {{ p.why }}{% endif %}</td></tr>
{% endfor %}
</table>
{% endfor %}
<p class="small">Claims from <code>{{ claims_file }}</code>: edit it to change what is checked.</p>
{% else %}{{ failed(s.claims) }}{% endif %}

<h2 id="what">2. What was run</h2>
{% if s.what.ok %}{% set w = s.what.data %}
<table>
<tr><th>kind</th><td>{{ w.kind }}{% if w.kind == 'search' %} (hyperparameter search: TPE proposes, ASHA stops weak samples early){% endif %}</td></tr>
<tr><th>command</th><td><code>{{ w.command or 'not recorded' }}</code></td></tr>
<tr><th>experiment file</th><td><code>{{ w.file or 'not recorded' }}</code></td></tr>
<tr><th>datasets</th><td>{% for d in w.datasets %}{{ d[0] }} ({{ d[1] }} trials{% if d[2] %}; data in {{ d[2] }}{% endif %}){% if not loop.last %}; {% endif %}{% else %}-{% endfor %}</td></tr>
<tr><th>versions</th><td>{% for k, v in w.versions.items() %}{{ k }} {{ v if v else 'not recorded' }}{% if not loop.last %} · {% endif %}{% endfor %}</td></tr>
{% if w.flags %}<tr><th>options</th><td>{% for k, v in w.flags.items() %}<code>{{ k }}={{ v }}</code> {% endfor %}</td></tr>{% endif %}
</table>
{% if w.nodes %}
<h3>Machines</h3>
<table><tr><th>host</th><th>IP</th><th>Ray node</th><th>trials</th><th>epochs</th><th>device</th></tr>
{% for n in w.nodes %}<tr><td>{{ n.host }}</td><td>{{ n.ip }}</td><td><code>{{ n.node_id }}</code></td><td class="num">{{ n.trials }}</td><td class="num">{{ n.epochs }}</td><td>{{ n.device }}</td></tr>{% endfor %}
</table>
{% endif %}
{% if w.experiments %}
<h3>Experiments</h3>
<table><tr><th>experiment</th><th>trials</th></tr>
{% for e in w.experiments %}<tr><td><code>{{ e[0] }}</code></td><td class="num">{{ e[1] }}</td></tr>{% endfor %}
</table>
{% for note, names in w.notes %}<p class="small">Note{% if names %} of {{ names | join(', ') }}{% endif %}: {{ note }}</p>{% endfor %}
{% endif %}
{% if w.file_text %}<h3>The experiment file as it was run</h3>
<pre class="file">{{ w.file_text }}</pre>{% endif %}
{% if not w.marker %}<p class="small">This run has no run.json (started by an older version): command, file and versions were not recorded.</p>{% endif %}
{% else %}{{ failed(s.what) }}{% endif %}

{% if s.search %}
<h2 id="search">3. The search</h2>
{% if s.search.ok %}{% set q = s.search.data %}
<p>Each figure point had its own search{% if q.per_point %} of {{ q.per_point }} samples{% endif %}: TPE proposed
configurations, ASHA stopped the weaker ones early on validation accuracy, and the chosen
configuration is the sample with the best validation accuracy (a sample that diverged or ended in
an error is never chosen). Reproduce the chosen ones with
three seeds and test accuracy: <code>{{ q.from_search }}</code></p>
{% for p in q.points %}
<h3>{{ p.name }}</h3>
{% if p.chosen %}<p>Chosen: <b>{{ p.chosen }}</b></p>{% else %}<p class="small">{{ p.unchosen }}</p>{% endif %}
{% if p.img %}<img alt="search of {{ p.name }}" src="{{ p.img }}">{% endif %}
<table><tr><th>sample</th>{% for k in p.searched %}<th>{{ k }}</th>{% endfor %}<th>epochs</th><th>best val. acc. %</th><th>outcome</th></tr>
{% for x in p.samples %}<tr{% if x.chosen %} class="chosen"{% endif %}><td class="num">{{ x.sample }}{% if x.chosen %} (chosen){% endif %}</td>{% for v in x.cells %}<td class="num">{{ v }}</td>{% endfor %}<td class="num">{{ x.epochs if x.epochs is not none else '-' }}/{{ p.max_epochs }}</td><td class="num">{{ x.best }}</td><td>{{ x.where }}</td></tr>{% endfor %}
</table>
{% endfor %}
{% else %}{{ failed(s.search) }}{% endif %}
{% else %}
<h2 id="figures">3. The paper's figures</h2>
{% if s.figures.ok %}{% set f = s.figures.data %}
{% if f.note %}<p>{{ f.note }}</p>{% endif %}
{% for fig in f.figures %}<h3>{{ fig.title }}</h3>
{% if fig.img %}<img alt="{{ fig.title }}" src="{{ fig.img }}">{% else %}<p class="error">{{ fig.error }}</p>{% endif %}
{% endfor %}
{% if f.body %}
<h3>Every figure point</h3>
<p class="small">Test accuracy over the finished seeds (standard deviation with ddof = 1); parameters
counted by the model (before pruning: all prunable weights; after: those the mask keeps).</p>
<table><tr>{% for h in f.head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in f.body %}<tr>{% for c in row %}<td{% if loop.index > f.head|length - 4 and loop.index < f.head|length %} class="num"{% endif %}>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}
{% else %}{{ failed(s.figures) }}{% endif %}

<h2 id="curves">4. Learning curves</h2>
{% if s.curves.ok %}
{% if s.curves.data %}<img alt="learning curves" src="{{ s.curves.data }}">{% else %}<p>No trial has reported an epoch yet.</p>{% endif %}
{% else %}{{ failed(s.curves) }}{% endif %}
{% endif %}

{% set k = 4 if s.search else 5 %}
<h2 id="cost">{{ k }}. Cost and failures</h2>
{% if s.cost.ok %}{% set c = s.cost.data %}
<p>{{ c.trials }} trials trained for <b>{{ c.total }}</b> in total ({{ c.total_hours }} trial-hours),
<b>{{ c.gpu_hours }} GPU-hours</b>. {{ c.how }} A trial's time is Ray's <code>time_total_s</code>: its training
and evaluation, over all its attempts; trials that ran side by side overlap.</p>
{% if c.table %}
<table><tr><th>point</th><th>trials</th><th>time</th><th>GPU share</th><th>GPU-hours</th></tr>
{% for r in c.table %}<tr><td>{{ r[0] }}</td><td class="num">{{ r[1] }}</td><td class="num">{{ r[2] }}</td><td class="num">{{ r[3] }}</td><td class="num">{{ r[4] }}</td></tr>{% endfor %}
</table>
{% endif %}
<h3>Trials that failed, diverged or were stopped</h3>
{% if c.problems %}
<table><tr><th>trial</th><th>id</th><th>status</th><th>epochs</th><th>last line</th></tr>
{% for r in c.problems %}<tr><td>{{ r[0] }}</td><td><code>{{ r[1] }}</code></td><td>{{ r[2] }}</td><td class="num">{{ r[3] }}</td><td><code>{{ r[4] }}</code></td></tr>{% endfor %}
</table>
{% else %}<p>None.</p>{% endif %}
{% else %}{{ failed(s.cost) }}{% endif %}

{% if s.overview.ok and not s.overview.data.complete %}{% set o = s.overview.data %}
<h2 id="missing">{{ k + 1 }}. What is missing</h2>
<p>{{ o.missing | length }} trial{{ '' if o.missing | length == 1 else 's' }} started or planned {{ 'has' if o.missing | length == 1 else 'have' }} not ended{% if o.unsampled %}, and {{ o.unsampled }} search sample{{ '' if o.unsampled == 1 else 's' }} {{ 'is' if o.unsampled == 1 else 'are' }} not drawn yet{% endif %}.
{% if o.resume %}If the run was interrupted, continue it with <code>{{ o.resume }}</code>, then make the report again.{% endif %}</p>
{% if o.missing %}<pre>{% for m in o.missing %}{{ m }}
{% endfor %}</pre>{% endif %}
{% endif %}

<h2 id="about">About this report</h2>
<p class="small">Made by <code>python -m analysis report {{ path }}</code> from the run's folder alone
(run.json, Ray Tune's trial folders and experiment state), read by <code>iterand_tune.runs.read_run</code>.
Self-contained: images are embedded and nothing is fetched, so it can be mailed, attached or printed.
In Python: <code>from analysis import load_results, aggregate, check_claims, load_claims</code>.
{% for p in problems if not p.ok %}<br><span class="error">{{ p.error }}</span>{% endfor %}
{% for line in skipped %}<br>{{ line }}{% endfor %}</p>
</body>
</html>
"""


def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE)
