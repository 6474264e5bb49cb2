"""Tests for the analysis package: tables from the session's real tiny Ray Tune run on digits
(and from copies of it made partial by hand), aggregates and figures on constructed tables,
Parquet round trips, the CLI's outputs and one-line errors, and the figure 2 notebook executed
with nbclient."""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis import (ResultsError, aggregate, figure1, figure2, figure3, load_history,
                      load_results, point_keys, read_parquet, to_parquet)
from analysis.cli import main as analysis_main
from iterand_tune.config import FIELD_NAMES
from iterand_tune.vocabulary import split_model_name

from helpers import result_rows, trial_dirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the real run

@pytest.fixture(scope="module")
def run_dir(digits_run):
    """The session's digits run (conftest.py): edge-popup (KU) and IteRand (SC) x two widths x
    two seeds."""
    return digits_run.path


@pytest.mark.slow
def test_load_results_has_one_row_per_trial_with_labels_config_and_final_metrics(digits_run):
    run_dir = digits_run.path
    df = load_results(run_dir)
    assert len(df) == digits_run.trials == 8 and df["trial_id"].is_unique
    assert set(df["status"]) == {"finished"}
    assert not [c for c in df.columns if c.startswith("config/")]
    assert set(FIELD_NAMES) <= set(df.columns)
    labels = df[["experiment", "method", "init", "network"]].drop_duplicates()
    assert sorted(map(tuple, labels.to_numpy().tolist())) == [
        ("tiny_ku_edgepopup", "edgepopup", "ku", "conv6"),
        ("tiny_sc_iterand", "iterand", "sc", "conv6")]
    assert sorted(df["width"].unique()) == [0.125, 0.25]
    for folder in trial_dirs(run_dir):
        last = result_rows(folder)[-1]
        row = df[df["trial_id"] == last["trial_id"]].iloc[0]
        with open(os.path.join(folder, "params.json")) as f:
            config = json.load(f)["trial"]
        for name in ("model", "seed", "lr", "init_mode", "rerand_mode", "conv_sparsity",
                     "debug_max_iters"):
            assert (row[name] if pd.notna(row[name]) else None) == config[name], name
        assert row["test_acc"] == last["test_acc"] and row["epoch"] == digits_run.epochs
        assert row["last_lr"] == last["lr"]  # the config's lr keeps its name
        assert row["params_after_pruning"] == last["params_after_pruning"]
        assert row["path"] == folder and pd.isna(row["error"])


@pytest.mark.slow
def test_load_history_has_one_row_per_trial_and_epoch(digits_run):
    run_dir, epochs = digits_run.path, digits_run.epochs
    h = load_history(run_dir)
    assert len(h) == digits_run.trials * epochs
    assert all(list(e) == list(range(1, epochs + 1)) for _, e in h.groupby("trial_id")["epoch"])
    assert h.loc[h["epoch"] < epochs, "test_acc"].isna().all()
    assert h.loc[h["epoch"] == epochs, "test_acc"].notna().all()
    rows = result_rows(trial_dirs(run_dir)[0])
    got = h[h["trial_id"] == rows[0]["trial_id"]].sort_values("epoch")
    assert got["val_acc"].tolist() == [r["val_acc"] for r in rows]
    assert got["lr"].tolist() == [r["lr"] for r in rows]


@pytest.mark.slow
def test_a_file_uri_reads_like_a_path(run_dir):
    by_path, by_uri = load_results(run_dir), load_results("file://" + run_dir)
    assert by_uri["path"].str.startswith("file://").all()
    pd.testing.assert_frame_equal(by_path.drop(columns="path"), by_uri.drop(columns="path"))
    pd.testing.assert_frame_equal(load_history(run_dir), load_history("file://" + run_dir))


# ------------------------------------------------------------------ partial runs, made by hand

def _set_state(run, statuses):
    """Rewrite the newest experiment state: trial_id -> Ray status."""
    path = sorted(glob.glob(os.path.join(run, "experiment_state-*.json")))[-1]
    with open(path) as f:
        state = json.load(f)
    for item in state["trial_data"]:
        trial = json.loads(item[0])
        if trial["trial_id"] in statuses:
            trial["status"] = statuses[trial["trial_id"]]
            item[0] = json.dumps(trial)
    with open(path, "w") as f:
        json.dump(state, f)


def _checkpoints_up_to(folder, epoch):
    """Remove the trial's checkpoints after `epoch` (each holds every report up to its epoch)."""
    for c in glob.glob(os.path.join(folder, "checkpoint_*")):
        with open(os.path.join(c, "reports.json")) as f:
            if json.load(f)[-1]["epoch"] > epoch:
                shutil.rmtree(c)


@pytest.fixture
def partial_run(digits_run, tmp_path):
    """A copy of the run (2 epochs) with one trial running (1 epoch + a line cut mid-write), one
    errored, one not started, and one resumed (epoch 2 reported twice)."""
    assert digits_run.epochs == 2, "the partial run is made for a run of two epochs"
    run = str(tmp_path / "partial")
    shutil.copytree(digits_run.path, run)
    folders = trial_dirs(run)
    ids = [result_rows(f)[0]["trial_id"] for f in folders]
    running, errored, pending, resumed = folders[0], folders[1], folders[2], folders[3]
    rows = result_rows(running)
    with open(os.path.join(running, "result.json"), "w") as f:
        f.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:40])
    _checkpoints_up_to(running, 1)
    first = result_rows(errored)[0]
    _checkpoints_up_to(errored, 1)
    with open(os.path.join(errored, "result.json"), "w") as f:
        f.write(json.dumps(first) + "\n")
    with open(os.path.join(errored, "error.txt"), "w") as f:
        f.write("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    shutil.rmtree(pending)
    rows = result_rows(resumed)
    again = dict(rows[1], val_acc=12.5, test_acc=33.25)
    with open(os.path.join(resumed, "result.json"), "a") as f:
        f.write(json.dumps(again) + "\n")
    _set_state(run, {ids[0]: "RUNNING", ids[1]: "ERROR", ids[2]: "PENDING"})
    return run, ids


@pytest.mark.slow
def test_a_partial_run_has_statuses_and_aggregate_leaves_unfinished_trials_out(partial_run):
    run, ids = partial_run
    df = load_results(run).set_index("trial_id")
    assert df.loc[ids[0], "status"] == "running" and df.loc[ids[0], "epoch"] == 1
    assert df.loc[ids[1], "status"] == "errored"
    assert df.loc[ids[1], "error"] == "RuntimeError: CUDA out of memory"
    # A trial Ray has not started is known from the experiment state alone, with its config.
    assert df.loc[ids[2], "status"] == "pending" and pd.isna(df.loc[ids[2], "epoch"])
    assert pd.notna(df.loc[ids[2], "seed"]) and df.loc[ids[2], "experiment"].startswith("tiny_")
    assert df.loc[ids[3], "status"] == "finished" and df.loc[ids[3], "test_acc"] == 33.25
    assert (df["status"] == "finished").sum() == 5

    h = load_history(run)
    resumed = h[h["trial_id"] == ids[3]]
    assert resumed["epoch"].tolist() == [1, 2] and resumed["val_acc"].iloc[-1] == 12.5
    assert h[h["trial_id"] == ids[0]]["epoch"].tolist() == [1]  # the cut-off line is skipped

    points = aggregate(load_results(run))
    assert points["trials"].sum() == 8 and points["excluded"].sum() == 3
    assert points["test_acc_count"].sum() == 5
    full = load_results(run)
    for _, p in points.iterrows():
        ok = full[(full["experiment"] == p["experiment"]) & (full["model"] == p["model"])
                  & (full["status"] == "finished")]
        assert p["test_acc_count"] == len(ok)
        if len(ok):
            assert p["test_acc_mean"] == pytest.approx(ok["test_acc"].mean())


@pytest.mark.slow
def test_without_experiment_state_the_status_comes_from_the_files(partial_run):
    run, ids = partial_run
    for path in glob.glob(os.path.join(run, "experiment_state-*.json")):
        os.remove(path)
    df = load_results(run)
    assert len(df) == 8  # the trial that never started: a planned point of run.json, pending
    (pending,) = df.index[df["trial_id"].isna()]
    assert df.loc[pending, "status"] == "pending" and df.loc[pending, "experiment"].startswith("tiny_")
    df = df.dropna(subset=["trial_id"]).set_index("trial_id")
    assert df.loc[ids[0], "status"] == "running"
    assert df.loc[ids[1], "status"] == "errored"
    assert df.loc[ids[3], "status"] == "finished"


@pytest.mark.slow
def test_a_figure_of_a_partial_run_draws_what_exists_and_says_what_is_missing(partial_run):
    run, _ = partial_run
    fig = figure2(run)
    (ax,) = fig.axes
    assert ax.get_title() == "Conv6"
    drawn = sum(len(c.lines[0].get_xdata()) for c in ax.containers)
    points = aggregate(load_results(run))
    assert drawn == (points["test_acc_count"] > 0).sum()
    note = fig._supxlabel.get_text()
    assert "3 of 8 trials not finished" in note
    assert "running" in note and "errored" in note and "pending" in note


# ------------------------------------------------------------------ constructed tables

def trials_table(rows):
    """A load_results-like table from (experiment, model, method, init, seed, status, test_acc,
    params_after_pruning[, rerand_lambda]) tuples."""
    records = []
    for i, r in enumerate(rows):
        network, width = split_model_name(r[1])
        records.append(dict(trial_id=f"t{i:03d}", experiment=r[0], network=network, width=width,
                            model=r[1], method=r[2], init=r[3], seed=r[4], status=r[5],
                            test_acc=r[6], params_after_pruning=r[7],
                            params_before_pruning=2 * r[7],
                            rerand_lambda=r[8] if len(r) > 8 else 0.1, dataset="cifar10"))
    return pd.DataFrame(records)


def test_aggregate_equals_hand_computed_means_and_stds():
    df = trials_table([
        ("e_ku_iterand", "conv6x0.5", "iterand", "ku", 1, "finished", 80.0, 100),
        ("e_ku_iterand", "conv6x0.5", "iterand", "ku", 2, "finished", 82.0, 100),
        ("e_ku_iterand", "conv6x0.5", "iterand", "ku", 3, "finished", 87.0, 100),
        ("e_ku_iterand", "conv6x1.0", "iterand", "ku", 1, "finished", 90.0, 400),
        ("e_ku_iterand", "conv6x1.0", "iterand", "ku", 2, "errored", np.nan, 400),
        ("e_ku_iterand", "conv6x1.0", "iterand", "ku", 3, "running", 99.0, 400),  # not counted
        ("e_ku_sgd", "conv6x0.5", "sgd", "ku", 1, "running", np.nan, 300),
    ])
    points = aggregate(df).set_index(["experiment", "model"])
    a = points.loc[("e_ku_iterand", "conv6x0.5")]
    assert a["test_acc_mean"] == pytest.approx(83.0)
    assert a["test_acc_std"] == pytest.approx(np.sqrt(((80 - 83) ** 2 + 1 + 16) / 2))  # ddof 1
    assert (a["test_acc_count"], a["trials"], a["excluded"]) == (3, 3, 0)
    assert a["params_after_pruning"] == 100 and a["params_before_pruning"] == 200
    b = points.loc[("e_ku_iterand", "conv6x1.0")]
    assert b["test_acc_mean"] == 90.0 and np.isnan(b["test_acc_std"])
    assert (b["test_acc_count"], b["trials"], b["excluded"]) == (1, 3, 2)
    assert b["missing"] == "seed 2 errored; seed 3 running"
    c = points.loc[("e_ku_sgd", "conv6x0.5")]
    assert np.isnan(c["test_acc_mean"]) and c["test_acc_count"] == 0 and c["excluded"] == 1
    assert c["params_after_pruning"] == 300  # known before the trial finishes: where it will go
    assert list(aggregate(df)["model"]) == ["conv6x0.5", "conv6x1.0", "conv6x0.5"]


def test_a_config_field_that_varies_inside_an_experiment_defines_points():
    df = trials_table([
        ("f1", "conv6x1.0", "iterand", "ku", s, "finished", 70.0 + s + 10 * r, 100, r)
        for r in (0.01, 0.1) for s in (1, 2)])
    assert point_keys(df) == ["experiment", "network", "width", "model", "method", "init",
                              "rerand_lambda"]
    points = aggregate(df)
    assert points["rerand_lambda"].tolist() == [0.01, 0.1]
    assert points["test_acc_mean"].tolist() == pytest.approx([71.6, 72.5])


def test_parquet_round_trip_keeps_values_and_dtypes(tmp_path):
    df = pd.DataFrame({
        "name": pd.array(["a", None, "c"], dtype="string"),
        "count": pd.array([1, None, 3], dtype="Int64"),
        "flag": pd.array([True, None, False], dtype="boolean"),
        "acc": [81.25, np.nan, 90.5],
        "n": np.array([1, 2, 3], dtype="int64"),
    })
    for path in (str(tmp_path / "t.parquet"), "file://" + str(tmp_path / "u.parquet")):
        to_parquet(df, path)
        back = read_parquet(path)
        assert back.dtypes.to_dict() == df.dtypes.to_dict()
        pd.testing.assert_frame_equal(back, df)
    points = aggregate(trials_table([("e", "conv6x0.5", "iterand", "sc", 1, "finished", 80.0, 9)]))
    to_parquet(points, tmp_path / "p.parquet")
    pd.testing.assert_frame_equal(read_parquet(tmp_path / "p.parquet"), points)


@pytest.mark.slow
def test_parquet_round_trip_of_a_real_run(run_dir, tmp_path):
    for table in (load_results(run_dir), load_history(run_dir)):
        to_parquet(table, tmp_path / "t.parquet")
        back = read_parquet(tmp_path / "t.parquet")
        assert back.dtypes.to_dict() == table.dtypes.to_dict()
        pd.testing.assert_frame_equal(back, table)


def _figure2_input():
    rows = []
    for network, widths in (("conv6", ("0.25", "0.5", "1.0")), ("resnet18", ("0.5", "1.0"))):
        for method, init in (("sgd", "ku"), ("edgepopup", "sc"), ("iterand", "sc")):
            for k, w in enumerate(widths):
                for seed in (1, 2):
                    rows.append((f"{network}_{init}_{method}", f"{network}x{w}", method, init,
                                 seed, "finished", 60.0 + 5 * k + seed, 1000 * 4 ** k))
    return trials_table(rows)


def _lines(ax):
    """label -> (x, y) of each line drawn with error bars."""
    return {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
            for c in ax.containers}


def test_figure2_has_a_panel_per_network_a_line_per_method_and_a_point_per_width():
    fig = figure2(_figure2_input())
    assert [ax.get_title() for ax in fig.axes] == ["Conv6", "ResNet18"]
    for ax, widths in zip(fig.axes, (3, 2)):
        lines = _lines(ax)
        assert sorted(lines) == ["IteRand (SC)", "SGD (KU)", "edge-popup (SC)"]
        assert all(len(x) == widths for x, _ in lines.values())
        assert lines["IteRand (SC)"][1] == pytest.approx([61.5 + 5 * k for k in range(widths)])
        assert ax.get_xscale() == "log"
        assert ax.get_xlabel() == "parameters after pruning (log scale)"
        assert ax.get_ylabel() == "test accuracy (%)"
        bars = [c for c in ax.containers if c.has_yerr]
        assert len(bars) == 3  # std over the two seeds: 0.5 * sqrt(2)
        seg = bars[0].lines[2][0].get_segments()[0]
        assert seg[1][1] - seg[0][1] == pytest.approx(2 * np.std([1, 2], ddof=1))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "SGD (KU)", "edge-popup (SC)", "IteRand (SC)"]
    assert "mean ± std over 2 seeds" in fig._suptitle.get_text()
    assert fig._supxlabel is None  # nothing missing, no note


def test_figure2_leaves_out_a_point_without_finished_seeds_and_names_it():
    df = _figure2_input()
    gone = (df["model"] == "conv6x1.0") & (df["method"] == "iterand")
    df.loc[gone, "status"] = ["errored", "running"]
    fig = figure2(df)
    lines = _lines(fig.axes[0])
    assert len(lines["IteRand (SC)"][0]) == 2 and len(lines["SGD (KU)"][0]) == 3
    note = fig._supxlabel.get_text()
    assert "2 of 30 trials not finished" in note and "1 errored" in note
    assert "conv6x1.0 IteRand (SC)" in note.replace("\n", " ")


def test_figure1_has_a_panel_per_network_and_r_on_x():
    rows = []
    for network in ("conv6", "resnet18"):
        for r in (0.0, 0.01, 0.1, 1.0):
            method = "edgepopup" if r == 0 else "iterand"
            for seed in (1, 2, 3):
                rows.append((f"figure1_{network}_ku_iterand", f"{network}x1.0", method, "ku",
                             seed, "finished", 80 + 10 * r + seed, 1000, 0.1 if r == 0 else r))
    rows.append(("figure1_conv6_ku_sgd", "conv6x1.0", "sgd", "ku", 1, "finished", 50.0, 2000))
    fig = figure1(trials_table(rows))
    assert [ax.get_title() for ax in fig.axes] == ["Conv6", "ResNet18"]
    for ax in fig.axes:
        lines = _lines(ax)
        assert list(lines) == ["KU weights"]
        x, y = lines["KU weights"]
        assert x == [0, 1, 2, 3] and y == pytest.approx([82.0, 82.1, 83.0, 92.0])
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.01", "0.1", "1"]
        assert ax.get_ylabel() == "test accuracy (%)"


def test_figure1_without_pruning_trials_is_an_error():
    with pytest.raises(ResultsError, match="no edge-popup or IteRand trials"):
        figure1(trials_table([("s", "conv6x1.0", "sgd", "ku", 1, "finished", 50.0, 10)]))


def test_figure3_is_one_panel_with_a_line_per_method_and_a_point_per_network():
    rows = [("figure3_resnet18_ku_sgd", "resnet18", "sgd", "ku", 1, "finished", 70.0, 11),
            ("figure3_resnet34_ku_sgd", "resnet34", "sgd", "ku", 1, "finished", 73.0, 21)]
    for method, accs in (("edgepopup", (66.0, 72.0, 75.0)), ("iterand", (68.0, 74.0, 76.0))):
        for (net, params), acc in zip((("resnet34", 6), ("resnet50", 7), ("resnet101", 13)), accs):
            rows.append((f"figure3_{net}_sc_{method}", net, method, "sc", 1, "finished", acc,
                         params))
    fig = figure3(trials_table(rows))
    (ax,) = fig.axes
    lines = _lines(ax)
    assert list(lines) == ["SGD (KU)", "edge-popup (SC)", "IteRand (SC)"]
    assert [len(x) for x, _ in lines.values()] == [2, 3, 3]
    assert lines["IteRand (SC)"][1] == [68.0, 74.0, 76.0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(
        ["ResNet18", "ResNet34", "ResNet34", "ResNet50", "ResNet101", "ResNet34", "ResNet50",
         "ResNet101"])
    assert "one seed per point" in fig._suptitle.get_text()


# ------------------------------------------------------------------ CLI

def _one_error_line(capsys, rc):
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["figure2", "{tmp}/nothing"], "no results at"),
    (["table", "{tmp}/empty"], "no Ray Tune results at"),
    (["table", "{tmp}/file.txt"], "is a file"),
    (["figure1", "nosuchscheme://bucket/run"], "cannot open"),
    (["table", "{tmp}/nothing.parquet"], "no Parquet file"),
    (["figure2", "{tmp}/empty", "-o", "{tmp}/fig.jpg"], ".png, .pdf, .svg"),
    (["figure2", "{tmp}/empty", "-o", "{tmp}/no/such/fig.png"], "no folder"),
    (["table", "{tmp}/empty", "-o", "{tmp}/t.xlsx"], ".csv, .parquet"),
    (["figure4", "{tmp}/empty"], "invalid choice"),
    ([], "give a command"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, args, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    rc = analysis_main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert says in _one_error_line(capsys, rc)


def test_cli_refuses_a_run_folder_that_holds_runs_and_names_them(tmp_path, capsys):
    for name in ("quickstart-1", "quickstart-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    line = _one_error_line(capsys, analysis_main(["table", str(tmp_path)]))
    assert "it holds runs: quickstart-1, quickstart-2" in line


@pytest.mark.slow
@pytest.mark.parametrize("ext, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<svg")])
def test_cli_figure_writes_the_format_of_its_extension(run_dir, tmp_path, capsys, ext, magic):
    out = tmp_path / f"fig{ext}"
    assert analysis_main(["figure2", run_dir, "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}")
    data = out.read_bytes()
    assert (magic in data[:400]) if ext == ".svg" else data.startswith(magic)


@pytest.mark.slow
def test_cli_table_prints_and_writes_csv_and_parquet(digits_run, tmp_path, capsys):
    run_dir, n = digits_run.path, digits_run.trials
    assert analysis_main(["table", run_dir, "-o", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    points = aggregate(load_results(run_dir))
    for _, p in points.iterrows():
        line = next(li for li in out.splitlines()
                    if li.startswith(f"{p['experiment']} ") and f" {p['model']} " in li)
        assert f"{p['test_acc_mean']:.2f}" in line and "2/2" in line
    assert f"{n} trials: {n} finished" in out
    csv = pd.read_csv(tmp_path / "p.csv")
    assert csv["test_acc_mean"].tolist() == pytest.approx(points["test_acc_mean"].tolist())
    assert list(csv.columns) == list(points.columns)

    assert analysis_main(["table", run_dir, "--rows", "trials",
                          "-o", str(tmp_path / "t.parquet")]) == 0
    out = capsys.readouterr().out
    assert out.count(" finished ") == n
    trials = read_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(trials, load_results(run_dir))
    # The Parquet table of trials is a RESULTS argument too: plot without the run's folder.
    assert analysis_main(["figure2", str(tmp_path / "t.parquet"),
                          "-o", str(tmp_path / "f.svg")]) == 0
    assert (tmp_path / "f.svg").exists()

    assert analysis_main(["table", run_dir, "--rows", "epochs",
                          "-o", str(tmp_path / "h.csv")]) == 0
    assert f"{n * digits_run.epochs} epochs of {n} trials" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "h.csv")) == n * digits_run.epochs


# ------------------------------------------------------------------ the notebook

@pytest.mark.slow
def test_figure2_notebook_runs_and_shows_the_plot(run_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = os.path.join(ROOT, "analysis", "notebooks", "figure2.ipynb")
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("ITERAND_RESULTS", run_dir)  # the kernel inherits this environment
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any(run_dir in o.get("text", "") for o in outputs)
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("test_acc_mean" in t for t in tables)


def test_a_trial_run_again_in_a_second_folder_is_read_once(tmp_path):
    """Ray Tune 2.60 can start a killed driver's grid point again after the resume, as a trial
    with the same id in a second folder (NAME_xxxx): the newest of the two is read."""
    from iterand_tune.config import TrialConfig
    from iterand_tune.storage import TRIAL_KEY

    run = tmp_path / "run"
    config = {"experiment": "e", **TrialConfig(model="conv6x0.25", seed=1, epochs=2).to_dict()}
    first = dict(trial_id="abc_00001", params_after_pruning=9)
    for folder, start, test_acc in (("e-conv6x0.25-seed1-abc_00001", 100, 68.0),
                                    ("e-conv6x0.25-seed1-abc_00001_ffc9", 200, 69.0)):
        rows = [dict(epoch=1, timestamp=start, val_acc=50.0),
                dict(epoch=2, timestamp=start + 10, val_acc=60.0, test_acc=test_acc)]
        (run / folder).mkdir(parents=True)
        (run / folder / "params.json").write_text(json.dumps({TRIAL_KEY: config}))
        (run / folder / "result.json").write_text("".join(json.dumps({**first, **r}) + "\n" for r in rows))
    (trial,) = load_results(str(run)).to_dict("records")
    assert (trial["trial_id"], trial["status"], trial["epoch"], trial["test_acc"]) == (
        "abc_00001", "finished", 2, 69.0)
    assert list(load_history(str(run))["epoch"]) == [1, 2]
