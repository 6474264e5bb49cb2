"""Tests for iterand_tune.cli: one tiny `train` run on the offline digits data, and every user
error ending as one `error: ...` line on stderr with exit code 2 (in-process and as `python -m`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iterand_tune.cli import main

EPOCH_KEYS = {"epoch", "train_acc", "val_acc", "best_val_acc", "best_epoch", "lr", "iterations",
              "params_before_pruning", "params_after_pruning"}


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
