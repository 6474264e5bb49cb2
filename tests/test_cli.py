"""Tests for iterand_tune.cli: one tiny `train` run on the offline digits data, the trials a
run would start (--dry-run with --only, --set, --smoke-test, --data-dir), run names and
resumes, every user error ending as one `error: ...` line on stderr with exit code 2
(in-process and as `python -m`), and --help and --dry-run loading neither torch nor Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from iterand_tune.cli import main
from iterand_tune.config import TrialConfig

from helpers import dry_run, write_digits, write_experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_DIR = os.path.join(ROOT, "experiments")
FIGURE1, FIGURE2, FIGURE3 = (os.path.join(EXPERIMENTS_DIR, f"figure{i}.py") for i in (1, 2, 3))
QUICKSTART = os.path.join(EXPERIMENTS_DIR, "quickstart.py")

EPOCH_KEYS = {"epoch", "train_acc", "val_acc", "best_val_acc", "best_epoch", "lr", "iterations",
              "params_before_pruning", "params_after_pruning"}


def method_of(trial: dict) -> str:
    return TrialConfig.from_dict({k: v for k, v in trial.items() if k != "experiment"}).method


def canonical(trials, drop=("dataset_dir",)) -> list[str]:
    """Order-free, comparable form of a trial list (JSON strings, sorted)."""
    return sorted(json.dumps({k: v for k, v in t.items() if k not in drop}, sort_keys=True)
                  for t in trials)


def run_cli(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_train_digits_json(capsys):
    rc, out, err = run_cli(capsys, [
        "train", "--set", "dataset=digits", "--set", "model=conv6x0.25", "--set", "epochs=2",
        "--set", "batch_size=64", "--set", "debug_max_iters=3", "--set", "train_augmentation=false",
        "--method", "edgepopup", "--json",
    ])
    assert rc == 0
    lines = out.splitlines()
    epochs = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(epochs) == 2
    assert len(lines) == 4  # header, two epochs, summary
    assert lines[0].startswith("training conv6x0.25 on digits (edgepopup, 2 epochs) on ")

    for m in epochs:
        assert EPOCH_KEYS <= set(m)
        assert 0.0 <= m["train_acc"] <= 100.0 and 0.0 <= m["val_acc"] <= 100.0
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert [m["iterations"] for m in epochs] == [3, 6]
    # cosine over 2 epochs, no warm-up: 0.1 then 0.5 * (1 + cos(pi / 2)) * 0.1
    assert [m["lr"] for m in epochs] == pytest.approx([0.1, 0.05])
    assert "test_acc" not in epochs[0] and "test_acc" in epochs[1]
    assert 0.0 <= epochs[1]["test_acc"] <= 100.0
    best = max(m["val_acc"] for m in epochs)
    assert epochs[1]["best_val_acc"] == best
    assert epochs[[m["val_acc"] for m in epochs].index(best)]["epoch"] == epochs[1]["best_epoch"]
    # edge-popup preset prunes half of every layer
    before, after = epochs[0]["params_before_pruning"], epochs[0]["params_after_pruning"]
    assert 0 < after < before and after == pytest.approx(before / 2, rel=0.01)
    assert all(m["params_before_pruning"] == before and m["params_after_pruning"] == after for m in epochs)

    summary = lines[-1]
    assert summary.startswith("edgepopup: test accuracy ")
    assert f"{epochs[1]['test_acc']:.2f}%" in summary
    assert f"{after:,} of {before:,}" in summary


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--set", "nonsense=1"], "unknown TrialConfig option 'nonsense'"),
        (["train", "--set", "epoch=3"], "did you mean 'epochs'"),
        (["train", "--set", "lr"], "--set needs KEY=VALUE, got 'lr'"),
        (["train", "--set", "=0.1"], "--set needs KEY=VALUE"),
        (["train", "--set", "epochs=abc"], "option 'epochs' needs int"),
        (["train", "--set", "lr=fast"], "option 'lr' needs float"),
        (["train", "--set", "conv_sparsity=1.5"], "conv_sparsity = 1.5"),
        (["train", "--method", "iterand", "--set", "rerand_lambda=2"], "rerand_lambda = 2.0"),
        (["train", "--method", "sgd", "--set", "conv_sparsity=0.5"], "train_mode 'normal'"),
        (["train", "--method", "bogus"], "--method"),
        (["train", "--device", "nodevice"], "cannot start the trial"),
        (["train", "--unknown-flag"], "--unknown-flag"),
        (["bogus"], "no experiment file at bogus"),
        ([], "give an experiment file"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, fragment):
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and lines[0][len("error: "):].strip()
    assert fragment in lines[0]


@pytest.mark.parametrize("how", ["set", "flag"])
def test_missing_cifar10_folder_is_one_line(capsys, tmp_path, monkeypatch, how):
    folder = tmp_path / "nothing"
    where = ["--set", f"dataset_dir={folder}"] if how == "set" else ["--data-dir", "nothing"]
    monkeypatch.chdir(tmp_path)  # --data-dir is made absolute against the working directory
    rc, out, err = run_cli(capsys, ["train", "--set", "dataset=cifar10", "--set", "dataset_download=false", *where])
    assert rc == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert str(folder) in lines[0]
    assert "--download" in lines[0]
    assert not folder.exists()  # nothing was downloaded or created


def test_module_entry_point_error_as_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "iterand_tune", "train", "--set", "conv_sparsity=1.5"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "conv_sparsity" in lines[0]


# ------------------------------------------------------------------ the trials of a run (--dry-run)

def test_text_dry_run_ends_with_trial_count(capsys, no_run):
    assert main([FIGURE2, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("180 trials")
    assert len(out.splitlines()) == 180 + 3  # header, rule, one row per trial, count line


def test_cli_only_picks_experiments(capsys):
    trials = dry_run(capsys, FIGURE3, "--only", "figure3_resnet101_sc_iterand",
                     "figure3_resnet18_ku_sgd")
    assert [t["experiment"] for t in trials] == ["figure3_resnet101_sc_iterand",
                                                 "figure3_resnet18_ku_sgd"]


def test_cli_set_changes_every_trial(capsys):
    trials = dry_run(capsys, FIGURE1, "--set", "lr=0.5")
    assert len(trials) == 36 and {t["lr"] for t in trials} == {0.5}


def test_cli_set_collapses_grid_axis(capsys):
    trials = dry_run(capsys, FIGURE2, "--set", "seed=7")
    assert len(trials) == 60 and {t["seed"] for t in trials} == {7}
    assert len(set(canonical(trials))) == 60


def test_cli_smoke_test(capsys):
    trials = dry_run(capsys, FIGURE2, "--smoke-test")
    assert len(trials) == 180
    for t in trials:
        assert (t["epochs"], t["debug_max_iters"], t["debug_max_eval_iters"]) == (1, 4, 1)
        assert t["max_train_dataset_size"] == 256
        label = method_of(t)
        if label == "iterand":
            assert t["rerand_freq"] == 2
        if label == "sgd":
            assert t["rerand_freq"] == 300
    # r = 0 stays edge-popup under the smoke test
    assert {method_of(t) for t in trials if "edgepopup" in t["experiment"]} == {"edgepopup"}
    quick = dry_run(capsys, QUICKSTART, "--smoke-test")
    assert {(method_of(t), t["rerand_freq"]) for t in quick} == {
        ("sgd", 300), ("edgepopup", 300), ("iterand", 2)}


def test_cli_figure3_smoke_test_drops_warmup(capsys):
    trials = dry_run(capsys, FIGURE3, "--smoke-test")
    assert {(t["epochs"], t["warmup_epochs"], t["finetuning_epochs"]) for t in trials} == \
        {(1, 0, 0)}


def test_cli_data_dir_is_made_absolute(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {t["dataset_dir"] for t in dry_run(capsys, QUICKSTART, "--data-dir", "rel")} == \
        {str(tmp_path / "rel")}
    assert {t["dataset_dir"] for t in dry_run(capsys, QUICKSTART)} == {str(tmp_path / "data")}


@pytest.mark.parametrize("argv, fragment", [
    (["{tmp}/nope.py"], "no experiment file at"),
    (["{tmp}/empty.py"], "defines no experiments"),
    ([FIGURE2, "--only", "figure2_conv6_ku_sdg"], "did you mean 'figure2_conv6_ku_sgd'"),
    ([FIGURE2, "--set", "lrr=0.5"], "unknown TrialConfig option 'lrr'"),
    ([FIGURE2, "--set", "epochs=abc"], "option 'epochs' needs int"),
    ([FIGURE2, "--set", "conv_sparsity=1.5"], "conv_sparsity = 1.5"),
    ([FIGURE2, "--gpus-per-trial", "0.3"], "--gpus-per-trial"),
    ([FIGURE2, "--json"], "--json goes with --dry-run"),
    ([FIGURE2, "--resume", "--set", "lr=0.1"], "--resume"),
])
def test_run_user_errors(capsys, tmp_path, no_run, argv, fragment):
    (tmp_path / "empty.py").write_text("X = 1\n")
    store = tmp_path / "store"
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--storage-path", str(store)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert not store.exists()


# ------------------------------------------------------------------ run names and resumes

def test_resume_newest_run_of_a_file_without_name(tmp_path, capsys):
    exp = write_digits(str(tmp_path), {"tiny": {}})
    rc = main([exp, "--storage-path", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "no earlier run of tiny under" in err


def test_existing_run_name_is_not_overwritten(tmp_path, capsys, no_run):
    exp = write_digits(str(tmp_path), {"tiny": {}})
    (tmp_path / "r" / "taken").mkdir(parents=True)
    (tmp_path / "r" / "taken" / "keep.txt").write_text("x")
    rc = main([exp, "--storage-path", str(tmp_path / "r"), "--name", "taken"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a run" in err and "--resume" in err
    assert os.listdir(tmp_path / "r" / "taken") == ["keep.txt"]
    for name in ("a/b", ".."):
        assert main([exp, "--storage-path", str(tmp_path / "r"), "--name", name]) == 2
        assert "must be a folder name" in capsys.readouterr().err


def test_resume_takes_the_runs_own_options_and_refuses_others(tmp_path, capsys, no_run):
    """--resume reads the run's run.json (not Ray's files) for what kind of run it is and the
    options it started with; an option given with another value is one line, nothing started."""
    exp = write_digits(str(tmp_path), {"tiny": {}}, search={"tiny": {"lr": "LogUniform(0.05, 0.5)"}})
    storage = tmp_path / "r"
    for name, kind in (("g", "grid"), ("s", "search")):
        (storage / name).mkdir(parents=True)
        flags = {"max_concurrent": 2, "overrides": ["lr=0.2"], "search": kind == "search"}
        (storage / name / "run.json").write_text(json.dumps({"kind": kind, "flags": flags}))
    for argv, message in (
            (["--name", "g", "--search"], "is a grid run (its run.json): resume it without --search"),
            (["--name", "s", "--max-concurrent", "3"],
             "--max-concurrent 3 contradicts the run's 2 (its run.json)"),
            (["--name", "g", "--set", "lr=0.3"], "--set lr=0.3 contradicts the run's lr=0.2"),
            (["--name", "absent"], "there is no run to resume at"),
    ):
        (storage / "old").mkdir(exist_ok=True)
        rc = main([exp, "--storage-path", str(storage), "--resume", *argv])
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)
    rc = main([exp, "--storage-path", str(storage), "--resume", "--name", "old"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "has no run.json: it was started by an older" in err[0]
    assert sorted(p.name for p in (storage / "g").iterdir()) == ["run.json"]  # nothing written


def test_search_user_errors_are_one_line(tmp_path, capsys, no_run):
    plain = write_experiments(tmp_path / "plain.py", ("p", dict(dataset="digits"), dict(seed=[1])))
    for argv, message in (
            ([plain, "--search", "--dry-run"], "defines no search space"),
            ([plain, "--from-search", str(tmp_path), "--dry-run"], "--from-search: no Ray Tune results at"),
            ([plain, "--num-samples", "3"], "go(es) with --search"),
            ([plain, "--search", "--reduction-factor", "1"], "must be > 1"),
            ([plain, "--search", "--from-search", str(tmp_path)], "two steps")):
        rc = main(argv)
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)


# ------------------------------------------------------------------ as a command

@pytest.mark.slow  # a subprocess: about 5 s
def test_dry_run_json_piped_into_head_prints_no_traceback():
    # 180 JSON lines (~280 kB) overflow the pipe buffer, so closing after one line breaks the pipe.
    proc = subprocess.Popen([sys.executable, "-m", "iterand_tune", FIGURE2, "--dry-run", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    assert json.loads(proc.stdout.readline())["experiment"] == "figure2_conv6_ku_sgd"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err


# Each command, run in one fresh process one after the other, then the heavy packages it loaded.
LIGHT_COMMANDS = (["--help"], ["train", "--help"], [FIGURE2, "--dry-run"],
                  [FIGURE2, "--dry-run", "--json"], [FIGURE2, "--search", "--dry-run"],
                  [FIGURE2, "--search", "--dry-run", "--json", "--only", "figure2_conv6_ku_sgd"])
HEAVY = ("torch", "torchvision", "ray", "hyperopt")


def test_help_and_dry_runs_load_neither_torch_nor_ray():
    """A laptop without a GPU, or a login node, lists a run's trials in a fraction of a second;
    torch and Ray (several seconds of imports) wait until something trains or a run starts."""
    code = ("import contextlib, io, json, sys\n"
            "from iterand_tune.cli import main\n"
            f"for argv in {[list(c) for c in LIGHT_COMMANDS]!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            rc = main(argv)\n"
            "        except SystemExit as done:  # --help\n"
            "            rc = done.code\n"
            f"    heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
            "    print(json.dumps([argv[-2:], rc, heavy]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(LIGHT_COMMANDS)
    for argv, rc, heavy in rows:
        assert (rc, heavy) == (0, []), f"{' '.join(argv)} exited {rc} having imported {heavy}"
