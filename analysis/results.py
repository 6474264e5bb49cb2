"""Stored Ray Tune runs as tidy pandas tables: one row per trial (`load_results`), one row per
trial and epoch (`load_history`), figure points aggregated over seeds (`aggregate`), and Parquet
round trips. Everything is read through pyarrow filesystems, so `s3://...` works like a folder.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Optional, Sequence, Union

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from iterand_tune.config import FIELD_NAMES, TrialConfig, field_type
from iterand_tune.runs import ReadError, Run, TrialRecord, read_run
from iterand_tune.storage import open_storage
from iterand_tune.terminal import POINT_STATS
from iterand_tune.vocabulary import METRICS, POINT_LABELS, labels, point_fields, point_rows

PathLike = Union[str, "os.PathLike[str]"]


class ResultsError(Exception):
    """A path that holds no readable results (or a table that lacks what is asked of it);
    the CLI prints it as one line, exit code 2."""


# ------------------------------------------------------------------ vocabulary

LABELS = POINT_LABELS            # figure-point labels: every row of every table carries them

RAY_TIMES = {"time_this_iter_s": "float64", "time_total_s": "float64", "timestamp": "float64"}
# Ray Tune's bookkeeping in result.json: not metrics.
RAY_KEYS = frozenset({"config", "trial_id", "date", "hostname", "node_ip", "pid", "done",
                      "training_iteration", "iterations_since_restore", "time_since_restore",
                      "checkpoint_dir_name", "should_checkpoint", "experiment_tag",
                      "timesteps_total", "timesteps_since_restore", "episodes_total",
                      "experiment_id"})
# In load_results the config's `lr` (the base rate) keeps its name; the last epoch's rate is this.
LAST_LR = "last_lr"


def config_dtype(name: str) -> str:
    """The pandas dtype of TrialConfig field `name` in our tables: fixed, so every run's tables
    share one schema and Parquet files concatenate; nullable, since a trial whose config could
    not be read (or an optional field) has no value."""
    base, _ = field_type(name)
    if base is bool:
        return "boolean"
    if base is int:
        return "Int64"
    if base is float:
        return "float64"
    return "string"  # str, and tuples (lr_milestones) stored as JSON text


def _default(name: str) -> Any:
    return TrialConfig.__dataclass_fields__[name].default


# ------------------------------------------------------------------ reading a run

def open_path(path: PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a folder or a URI such as s3://bucket/run."""
    text = os.fspath(path)
    try:
        return open_storage(text)
    except (pa.ArrowException, ValueError, OSError) as err:
        raise ResultsError(f"cannot open {text}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_run(path: Union[PathLike, Run]) -> list[TrialRecord]:
    """Every trial of the run at `path`, through the project's one run reader (or of the Run it
    already read)."""
    if isinstance(path, Run):
        return path.trials
    try:
        return read_run(os.fspath(path)).trials
    except ReadError as err:
        raise ResultsError(str(err)) from None


def skipped_folders(path: PathLike) -> list[str]:
    """The folders of the run that hold a second copy of a trial and are not counted, one line
    each (the same that the run's own summary names)."""
    try:
        return read_run(os.fspath(path)).notes()
    except ReadError as err:
        raise ResultsError(str(err)) from None


def _labels(trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
    if not config:  # a trial whose config could not be read: no labels rather than wrong ones
        return dict(trial_id=trial_id)
    return dict(trial_id=trial_id, **labels(config))


def _config_values(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in FIELD_NAMES:
        # A field the run predates had its default; a config we could not read has nothing.
        value = config.get(name, _default(name)) if config else None
        if isinstance(value, (list, tuple)):
            value = json.dumps(list(value))
        out[name] = value
    return out


def _extra_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Scalars a trainable reported beyond the standard metrics (e.g. the trainable's `node_id`), kept
    rather than dropped: name -> dtype (numbers float64, text string)."""
    seen: dict[str, str] = {}
    for row in rows:
        for key, value in row.items():
            if key in METRICS or key in RAY_TIMES or key in RAY_KEYS or key in seen:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                seen[key] = "float64"
            elif isinstance(value, str):
                seen[key] = "string"
    return seen


def _typed(records: list[dict[str, Any]], dtypes: dict[str, str]) -> pd.DataFrame:
    """A DataFrame with exactly these columns and dtypes (missing values as NA/NaN)."""
    df = pd.DataFrame.from_records(records, columns=list(dtypes))
    for column, dtype in dtypes.items():
        values = df[column]
        if dtype == "float64":
            df[column] = pd.to_numeric(values, errors="coerce").astype("float64")
        elif dtype in ("Int64", "int64"):
            df[column] = pd.to_numeric(values, errors="coerce").astype(dtype)
        else:  # boolean, string: None (not NaN) is what the nullable dtypes take as missing
            df[column] = values.astype("object").where(values.notna(), None).astype(dtype)
    return df


def _label_dtypes() -> dict[str, str]:
    return {"trial_id": "string", "experiment": "string", "network": "string",
            "width": "float64", "model": "string", "method": "string", "init": "string"}


# ------------------------------------------------------------------ public tables

def load_results(path: Union[PathLike, Run]) -> pd.DataFrame:
    """One row per trial of the run at `path` (a folder or a URI such as s3://bucket/run, or a
    Run that iterand_tune.runs.read_run already read).

    Columns: `trial_id`, the figure-point labels `experiment, network, width, model, method`
    (sgd / edgepopup / iterand) and `init` (ku / sc / other init modes by name), `status`
    (finished / running / pending / errored / stopped / diverged), every TrialConfig field under its own
    name (`lr_milestones` as JSON text), the last reported epoch's metrics (`epoch`, `test_acc`,
    ..., the last epoch's learning rate as `last_lr`), Ray's `time_total_s`, `error` (the
    exception line of error.txt, when there is one) and `path` (the trial's folder).
    """
    trials = _read_run(path)
    extra = _extra_metrics([t.rows[-1] for t in trials if t.rows])
    dtypes = {**_label_dtypes(), "status": "string",
              **{name: config_dtype(name) for name in FIELD_NAMES if name != "model"},
              **{(LAST_LR if k == "lr" else k): v for k, v in METRICS.items()},
              "time_total_s": "float64", **extra,
              "error": "string", "path": "string"}
    records = []
    for t in trials:
        last = t.rows[-1] if t.rows else {}
        record = {**_config_values(t.config), **_labels(t.trial_id, t.config), "status": t.status}
        for key in (*METRICS, "time_total_s", *extra):
            record[LAST_LR if key == "lr" else key] = last.get(key)
        record.update(error=t.error, path=t.display)
        records.append(record)
    return _typed(records, dtypes)


def load_history(path: Union[PathLike, Run]) -> pd.DataFrame:
    """One row per trial and epoch of the run at `path` (as for `load_results`): `trial_id`, the figure-point labels,
    `seed`, `status`, every reported metric (`epoch`, `train_acc`, ..., `lr`; `test_acc` and
    `test_loss` only on the last epoch) and Ray's `time_this_iter_s`, `time_total_s`,
    `timestamp`. An epoch reported twice (re-run after a resume) keeps its last report. Join
    other config fields from `load_results` on `trial_id`.
    """
    trials = _read_run(path)
    extra = _extra_metrics([r for t in trials for r in t.rows])
    dtypes = {**_label_dtypes(), "seed": "Int64", "status": "string", **METRICS, **RAY_TIMES,
              **extra}
    records = []
    for t in trials:
        head = {**_labels(t.trial_id, t.config), "seed": t.config.get("seed"), "status": t.status}
        for row in t.rows:
            records.append({**head, **{k: row.get(k) for k in (*METRICS, *RAY_TIMES, *extra)}})
    return _typed(records, dtypes)


def point_keys(results: pd.DataFrame) -> list[str]:
    """The columns that tell figure points apart: the labels, plus every config field that varies
    inside one experiment other than the seed (e.g. `rerand_lambda` in figure 1)."""
    keys = [c for c in LABELS if c in results.columns]
    if "experiment" not in results.columns:
        return keys
    fields = [n for n in FIELD_NAMES if n in results.columns]
    return keys + point_fields(results[["experiment", *fields]].to_dict("records"), fields)


def finished(results: pd.DataFrame) -> pd.Series:
    """Rows that count: status finished and a test accuracy."""
    ok = results["test_acc"].notna()
    if "status" in results.columns:
        ok &= results["status"].eq("finished").fillna(False).astype(bool)
    return ok


def aggregate(results: pd.DataFrame, by: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per figure point (`by`, default `point_keys(results)`): `trials`, `excluded`
    (trials that did not finish: not counted), `test_acc_mean`, `test_acc_std` (sample std,
    ddof = 1; NaN for one seed), `test_acc_count` (finished seeds), `params_after_pruning` and
    `params_before_pruning` (mean over the trials that report them: the same for every seed),
    and `missing` (e.g. "seed 2 running"). Points keep the order of their first trial. The run's
    own end-of-run table is built from the same rows (`iterand_tune.vocabulary.point_rows`).
    """
    keys = list(by) if by is not None else point_keys(results)
    if not keys:
        raise ResultsError("aggregate needs figure-point columns such as experiment and model")
    wanted = [c for c in dict.fromkeys([*keys, "status", "seed", "trial_id", "test_acc",
                                        "params_after_pruning", "params_before_pruning"])
              if c in results.columns]
    rows = point_rows(results[wanted].to_dict("records"), keys)
    out = pd.DataFrame(rows, columns=[*keys, *POINT_STATS])
    for name in keys:
        if name in results.columns:
            out[name] = out[name].astype(results[name].dtype)
    for name in ("params_after_pruning", "params_before_pruning"):
        out[name] = pd.array([pd.NA if v is None else v for v in out[name]], dtype="Int64")
    out["missing"] = pd.array([pd.NA if v is None else v for v in out["missing"]], dtype="string")
    return out.astype({"trials": "int64", "excluded": "int64", "test_acc_mean": "float64",
                       "test_acc_std": "float64", "test_acc_count": "int64"})


# ------------------------------------------------------------------ Parquet

def to_parquet(df: pd.DataFrame, path: PathLike) -> None:
    """Write `df` (any of our tables) as Parquet to a file path or URI; dtypes are kept."""
    fs, where = open_path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    try:
        pq.write_table(table, where, filesystem=fs)
    except (pa.ArrowException, OSError) as err:
        raise ResultsError(f"cannot write {os.fspath(path)}: {_first_line(err)}") from None


def read_parquet(path: PathLike) -> pd.DataFrame:
    """Read a table written by `to_parquet` (file path or URI) with its dtypes."""
    fs, where = open_path(path)
    try:
        return pq.read_table(where, filesystem=fs).to_pandas()
    except FileNotFoundError:
        raise ResultsError(f"no Parquet file at {os.fspath(path)}") from None
    except (pa.ArrowException, OSError) as err:
        raise ResultsError(f"cannot read {os.fspath(path)} as Parquet: "
                           f"{_first_line(err)}") from None


def write_bytes(data: bytes, path: PathLike) -> None:
    """Write `data` to a file path or URI (figures and CSV tables go through here)."""
    fs, where = open_path(path)
    try:
        with fs.open_output_stream(where) as f:
            f.write(data)
    except (pa.ArrowException, OSError) as err:
        raise ResultsError(f"cannot write {os.fspath(path)}: {_first_line(err)}") from None


def to_csv(df: pd.DataFrame, path: PathLike) -> None:
    """Write `df` as CSV (no index) to a file path or URI."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_bytes(buf.getvalue().encode("utf-8"), path)
