"""Tests for iterand_tune.experiments and the pure parts of runner/cli: every figure's trials
value for value against SPEC 7, the original YAML import, file errors, resources, summaries."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from iterand_tune import runner
from iterand_tune.cli import main
from iterand_tune.config import FIELD_NAMES, ConfigError, TrialConfig
from iterand_tune.data import DIGITS_SPLIT, DeviceLoader
from iterand_tune.experiments import (SMOKE_TEST, Experiment, ExperimentError, check_gpus, load,
                                      load_python, select, smoke_test)
from iterand_tune.models import estimate_macs
from iterand_tune.runner import (RunError, RunOptions, RunSummary, check_cluster, gpu_share,
                                 summarize, trial_request)

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
FIGURE1, FIGURE2, FIGURE3 = (str(EXPERIMENTS_DIR / f"figure{i}.py") for i in (1, 2, 3))
EXAMPLES, QUICKSTART = str(EXPERIMENTS_DIR / "examples.py"), str(EXPERIMENTS_DIR / "quickstart.py")

CIFAR10_COMMON = dict(dataset="cifar10", epochs=100, batch_size=128, optimizer="SGD",
                      lr_scheduler="CustomCosineLR", sgd_momentum=0.9)


# ------------------------------------------------------------------ helpers

def dry_run(capsys, *argv: str) -> list[dict]:
    """Trials of `python -m iterand_tune ... --dry-run --json`, run in-process."""
    rc = main([*argv, "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return [json.loads(line) for line in out.splitlines()]


def method_of(trial: dict) -> str:
    return TrialConfig.from_dict({k: v for k, v in trial.items() if k != "experiment"}).method


def subset(trial: dict, keys) -> dict:
    return {k: trial[k] for k in keys}


def canonical(trials, drop=("dataset_dir",)) -> list[str]:
    """Order-free, comparable form of a trial list (JSON strings, sorted)."""
    return sorted(json.dumps({k: v for k, v in t.items() if k not in drop}, sort_keys=True)
                  for t in trials)


@pytest.fixture
def no_run(monkeypatch):
    """Any attempt to start Ray fails the test instead of starting a cluster."""
    def refuse(*args, **kwargs):
        raise AssertionError("runner.run was called: the CLI tried to start a run")
    monkeypatch.setattr(runner, "run", refuse)
    monkeypatch.setattr(runner, "connect", refuse)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ figure 2 (SPEC 7)

FIG2_NETWORKS = {  # p, wd, lr of pruning methods, lr of SGD
    "conv6": (0.5, 1e-4, 0.3, 0.01),
    "resnet18": (0.6, 5e-4, 0.1, 0.1),
    "resnet34": (0.6, 5e-4, 0.1, 0.1),
}
PRUNING = dict(train_mode="score_only", bn_affine=False)
FIG2_METHODS = {  # expected values and TrialConfig.method
    "ku_sgd": (dict(train_mode="normal", init_mode="kaiming_uniform", conv_sparsity=0.0,
                    bn_affine=True, rerand_mode=None), "sgd"),
    "ku_edgepopup": (dict(PRUNING, init_mode="kaiming_uniform", rerand_mode="bernoulli",
                          rerand_lambda=0.0), "edgepopup"),
    "sc_edgepopup": (dict(PRUNING, init_mode="signed_constant", rerand_mode="bernoulli",
                          rerand_lambda=0.0), "edgepopup"),
    "ku_iterand": (dict(PRUNING, init_mode="kaiming_uniform", rerand_mode="bernoulli",
                        rerand_freq=300, rerand_lambda=0.1), "iterand"),
    "sc_iterand": (dict(PRUNING, init_mode="signed_constant", rerand_mode="bernoulli",
                        rerand_freq=300, rerand_lambda=0.1), "iterand"),
}
WIDTHS = ("0.25", "0.5", "1.0", "2.0")


def test_figure2_dry_run_matches_spec(capsys):
    trials = dry_run(capsys, FIGURE2)
    assert len(trials) == 180
    assert len(set(canonical(trials, drop=()))) == 180  # all distinct
    assert all(set(t) == set(FIELD_NAMES) | {"experiment"} for t in trials)

    expected_points = {(f"figure2_{net}_{m}", f"{net}x{w}", seed)
                       for net in FIG2_NETWORKS for m in FIG2_METHODS for w in WIDTHS
                       for seed in (1, 2, 3)}
    assert {(t["experiment"], t["model"], t["seed"]) for t in trials} == expected_points

    for t in trials:
        _, net, *method = t["experiment"].split("_")
        method = "_".join(method)
        p, wd, lr_pruning, lr_sgd = FIG2_NETWORKS[net]
        values, label = FIG2_METHODS[method]
        sgd = label == "sgd"
        expected = dict(CIFAR10_COMMON, **values, weight_decay=wd, lr=lr_sgd if sgd else lr_pruning)
        expected["conv_sparsity"] = 0.0 if sgd else p
        assert subset(t, expected) == expected, t["experiment"]
        assert method_of(t) == label
        assert t["model"].startswith(net + "x")
        assert t["rerand_freq_unit"] == "iteration" and t["rerand_rate"] == 1.0
        if not sgd:
            assert t["rerand_freq"] == 300  # edge-popup keeps the original's K_per with r = 0
        assert t["warmup_epochs"] == 0 and t["finetuning_epochs"] == 0
        assert t["debug_max_iters"] is None and t["max_train_dataset_size"] is None


def test_figure2_conv6_lrs_and_grid_order(capsys):
    trials = dry_run(capsys, FIGURE2, "--only", "figure2_conv6_ku_sgd", "figure2_conv6_sc_iterand")
    assert [t["experiment"] for t in trials] == ["figure2_conv6_ku_sgd"] * 12 + \
        ["figure2_conv6_sc_iterand"] * 12
    assert {t["lr"] for t in trials[:12]} == {0.01} and {t["lr"] for t in trials[12:]} == {0.3}
    # grid(model=..., seed=...): the first axis (model) varies fastest
    assert [(t["model"], t["seed"]) for t in trials[:12]] == \
        [(f"conv6x{w}", s) for s in (1, 2, 3) for w in WIDTHS]


def test_text_dry_run_ends_with_trial_count(capsys, no_run):
    assert main([FIGURE2, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("180 trials")
    assert len(out.splitlines()) == 180 + 3  # header, rule, one row per trial, count line


# ------------------------------------------------------------ figure 1, 3, examples, quickstart

def test_figure1_dry_run_matches_spec(capsys):
    trials = dry_run(capsys, FIGURE1)
    assert len(trials) == 36
    nets = {"conv6": ("conv6x1.0", 0.5, 0.3, 1e-4), "resnet18": ("resnet18x1.0", 0.6, 0.1, 5e-4),
            "resnet34": ("resnet34x1.0", 0.6, 0.1, 5e-4)}
    assert {(t["experiment"], t["rerand_lambda"], t["seed"]) for t in trials} == {
        (f"figure1_{n}_ku_iterand", r, s) for n in nets for r in (0.0, 0.01, 0.1, 1.0)
        for s in (1, 2, 3)}
    for t in trials:
        model, p, lr, wd = nets[t["experiment"].split("_")[1]]
        expected = dict(CIFAR10_COMMON, model=model, conv_sparsity=p, lr=lr, weight_decay=wd,
                        train_mode="score_only", bn_affine=False, init_mode="kaiming_uniform",
                        rerand_mode="bernoulli", rerand_freq=300, rerand_freq_unit="iteration")
        assert subset(t, expected) == expected
        assert method_of(t) == ("edgepopup" if t["rerand_lambda"] == 0 else "iterand")


def test_figure3_dry_run_matches_spec(capsys):
    trials = dry_run(capsys, FIGURE3)
    assert len(trials) == 8
    assert sorted((t["model"], method_of(t)) for t in trials) == sorted(
        [("resnet18", "sgd"), ("resnet34", "sgd")]
        + [(m, meth) for m in ("resnet34", "resnet50", "resnet101")
           for meth in ("edgepopup", "iterand")])
    common = dict(dataset="imagenet", seed=1, epochs=105, warmup_epochs=5, finetuning_epochs=5,
                  finetuning_lr=1e-5, weight_decay=1e-4, lr=0.1, optimizer="SGD",
                  lr_scheduler="CustomCosineLR", batch_size=128)
    for t in trials:
        assert subset(t, common) == common
        if method_of(t) == "sgd":
            want = dict(train_mode="normal", init_mode="kaiming_uniform", conv_sparsity=0.0,
                        bn_affine=True, rerand_mode=None)
        else:
            want = dict(train_mode="score_only", init_mode="signed_constant", conv_sparsity=0.7,
                        bn_affine=False)
        if method_of(t) == "iterand":
            want.update(rerand_mode="bernoulli", rerand_freq=1000, rerand_lambda=0.1)
        assert subset(t, want) == want, t["experiment"]


def test_figure3_big_resnets_get_two_gpus():
    gpus = {e.name: e.gpus_per_trial for e in load(FIGURE3)}
    two = {f"figure3_resnet{d}_sc_{m}" for d in (50, 101) for m in ("edgepopup", "iterand")}
    assert {n for n, g in gpus.items() if g == 2} == two
    assert all(g is None for n, g in gpus.items() if n not in two)


def test_examples_dry_run_matches_spec(capsys):
    trials = {t["experiment"]: t for t in dry_run(capsys, EXAMPLES)}
    assert sorted(trials) == ["cifar10_resnet18_ku_sgd", "cifar10_resnet18_sc_edgepopup",
                              "cifar10_resnet18_sc_iterand"]
    common = dict(CIFAR10_COMMON, model="resnet18", seed=1, weight_decay=5e-4, lr=0.1)
    assert all(subset(t, common) == common for t in trials.values())
    sgd, ep, it = (trials[f"cifar10_resnet18_{m}"]
                   for m in ("ku_sgd", "sc_edgepopup", "sc_iterand"))
    assert (method_of(sgd), sgd["init_mode"], sgd["conv_sparsity"], sgd["bn_affine"]) == \
        ("sgd", "kaiming_uniform", 0.0, True)
    for t, label in ((ep, "edgepopup"), (it, "iterand")):
        assert (method_of(t), t["init_mode"], t["conv_sparsity"], t["bn_affine"], t["train_mode"]) \
            == (label, "signed_constant", 0.6, False, "score_only")
    assert (it["rerand_mode"], it["rerand_freq"], it["rerand_lambda"]) == ("bernoulli", 300, 0.1)


def test_device_loader_length_is_ceiling():
    x, y = torch.zeros(1257, 3, 2, 2, dtype=torch.uint8), torch.zeros(1257, dtype=torch.int64)
    loader = DeviceLoader(x, y, 64, device="cpu", mean=(0, 0, 0), std=(1, 1, 1), shuffle=False,
                          augment=None, generator=None, out_size=2)
    assert len(loader) == 20 == sum(1 for _ in loader)


def test_quickstart_dry_run_and_rerandomises_several_times(capsys):
    trials = dry_run(capsys, QUICKSTART)
    assert len(trials) == 12
    assert {t["dataset"] for t in trials} == {"digits"}
    assert {(method_of(t), t["model"], t["seed"]) for t in trials} == set(itertools.product(
        ("sgd", "edgepopup", "iterand"), ("conv6x0.25", "conv6x0.5"), (1, 2)))
    assert DIGITS_SPLIT[0] == 1257
    for t in (t for t in trials if method_of(t) == "iterand"):
        assert t["rerand_freq_unit"] == "iteration"
        per_epoch = math.ceil(1257 / t["batch_size"])  # DeviceLoader keeps the last short batch
        assert t["rerand_freq"] < per_epoch
        # SPEC 3: re-randomise before iteration `it` when (it + 1) % K_per == 0
        draws = sum((it + 1) % t["rerand_freq"] == 0 for it in range(t["epochs"] * per_epoch))
        assert draws >= 3


# ------------------------------------------------------------------ YAML import (original format)

ORIGINAL_YAML = """
# -- dataset and network definitions (not experiments) --
cifar10:
    class: 'CIFAR10'
    data_type: 'image'
    num_channels: 3
    image_size: 32
    num_classes: 10
    train_val_split: 0.1

imagenet:
    class: 'ImageNet'
    image_size: 224
    num_classes: 1000

conv6x1.0:
    class: 'Conv6'
    factor: 1.0

resnet18: &__resnet18__
    class: 'ResNet'
    block_class: 'BasicBlock'
    num_blocks: [2, 2, 2, 2]
    factor: 1.0
resnet18x0.5:
    <<: *__resnet18__
    factor: 0.5

__default__: &__default__
    num_workers: 4
    use_cuda: True
    output_dir: '__outputs__'
    dataset_dir: '__data__'
    sync_dir: '__sync__'
    checkpoint_epochs: []
    seed: null
    seed_by_time: false
    dataset_download: true
    num_gpus: 1
    debug_max_iters: null
    load_checkpoint_path: null
    dataset.config_name: null
    model.config_name: null
    save_best_model: true
    print_train_loss: false
    epoch: null
    optimizer: "SGD"
    lr: null
    weight_decay: null
    lr_scheduler: null
    warmup_epochs: 0
    finetuning_epochs: 0
    finetuning_lr: null
    sgd_momentum: 0.9
    lr_milestones: null
    multisteplr_gamma: 0.1
    padding_before_crop: False
    learning_framework: "SupervisedLearning"
    train_mode: 'normal'
    batch_size: 128
    batch_size_eval: 512
    max_train_dataset_size: null
    bn_track_running_stats: True
    bn_affine: True
    bn_momentum: 0.1
    conv_sparsity: 0.0
    linear_sparsity: null
    init_mode: 'kaiming_uniform'
    init_mode_linear: null
    init_mode_mask: 'kaiming_uniform'
    init_scale: 1.0
    init_scale_score: 1.0
    rerand_mode: null
    rerand_freq: 1
    rerand_freq_unit: "iteration"
    rerand_lambda: null
    rerand_mu: null
    rerand_rate: 1.0
    parallel_grid: null
    train_augmentation: True

cifar10_sgd: &cifar10_sgd
    <<: *__default__
    dataset.config_name: 'cifar10'
    padding_before_crop: True
    epoch: 100
    batch_size: 128
    optimizer: "SGD"
    lr_scheduler: "CustomCosineLR"
    warmup_epochs: 0
    lr: 0.1
    model.config_name: null
    weight_decay: null

imagenet_sgd: &imagenet_sgd
    <<: *__default__
    dataset.config_name: 'imagenet'
    model.config_name: null
    num_workers: 8
    epoch: 105
    batch_size: 128
    sgd_momentum: 0.9
    weight_decay: 0.0001
    optimizer: "SGD"
    lr: 0.1
    lr_scheduler: "CustomCosineLR"
    warmup_epochs: 5
    finetuning_epochs: 5
    finetuning_lr: 0.00001

figure2_conv6_ku_iterand:
    <<: *cifar10_sgd
    init_mode: 'kaiming_uniform'
    train_mode: "score_only"
    rerand_mode: "bernoulli"
    rerand_freq: null
    bn_affine: False
    parallel_grid:
        model.config_name: ["conv6x0.25", "conv6x0.5", "conv6x1.0", "conv6x2.0"]
        conv_sparsity: [0.5]
        rerand_freq: [300]
        rerand_lambda: [0.1]
        lr: [0.3]
        weight_decay: [0.0001]
        seed: [1, 2, 3]

figure2_resnet18_sc_edgepopup:
    <<: *cifar10_sgd
    init_mode: 'signed_constant'
    train_mode: "score_only"
    rerand_mode: "bernoulli"
    rerand_freq: null
    bn_affine: False
    parallel_grid:
        model.config_name: ["resnet18x0.25", "resnet18x0.5", "resnet18x1.0", "resnet18x2.0"]
        conv_sparsity: [0.6]
        rerand_freq: [300]
        rerand_lambda: [0.0]
        weight_decay: [0.0005]
        seed: [1, 2, 3]

figure1_resnet18_ku_iterand:
    <<: *cifar10_sgd
    init_mode: 'kaiming_uniform'
    train_mode: "score_only"
    rerand_mode: "bernoulli"
    rerand_freq: null
    bn_affine: False
    parallel_grid:
        model.config_name: ["resnet18x1.0"]
        conv_sparsity: [0.6]
        rerand_freq: [300]
        rerand_lambda: [0.0, 0.1, 0.01, 1.0]
        weight_decay: [0.0005]
        seed: [1, 2, 3]

figure3_resnet34_sc_iterand:
    <<: *imagenet_sgd
    num_gpus: 1
    init_mode: 'signed_constant'
    train_mode: "score_only"
    bn_affine: False
    rerand_mode: "bernoulli"
    rerand_freq: null
    model.config_name: "resnet34"
    parallel_grid:
        conv_sparsity: [0.7]
        rerand_freq: [1000]
        rerand_lambda: [0.1]
        seed: [1]

figure3_resnet50_sc_iterand:
    <<: *imagenet_sgd
    num_gpus: 2
    init_mode: 'signed_constant'
    train_mode: "score_only"
    bn_affine: False
    rerand_mode: "bernoulli"
    rerand_freq: null
    model.config_name: "resnet50"
    parallel_grid:
        conv_sparsity: [0.7]
        rerand_freq: [1000]
        rerand_lambda: [0.1]
        seed: [1]

typo_entry:
    <<: *cifar10_sgd
    model.config_name: "conv6x1.0"
    weight_decay: 0.0001
    seed: 1
    rerand_fre: 300
"""


@pytest.fixture
def original_yaml(tmp_path) -> str:
    return write(tmp_path, "config.yaml", ORIGINAL_YAML)


@pytest.mark.parametrize("key, python_file", [
    ("figure2_conv6_ku_iterand", FIGURE2),
    ("figure2_resnet18_sc_edgepopup", FIGURE2),
    ("figure1_resnet18_ku_iterand", FIGURE1),
    ("figure3_resnet34_sc_iterand", FIGURE3),
    ("figure3_resnet50_sc_iterand", FIGURE3),
])
def test_yaml_import_equals_python_experiment(original_yaml, key, python_file):
    (from_yaml,) = load(original_yaml, [key])
    (from_python,) = load(python_file, [key])
    assert from_yaml.name == key and len(from_yaml) == len(from_python)
    # figure3.py turns dataset_download off (ImageNet cannot be fetched); the original leaves the
    # inert default on. Everything else must agree value for value.
    drop = ("dataset_dir", "dataset_download") if key.startswith("figure3") else ("dataset_dir",)
    assert canonical(from_yaml.trials(), drop) == canonical(from_python.trials(), drop)
    assert {t["dataset_dir"] for t in from_yaml.trials()} == {"__data__"}
    assert from_yaml.gpus_per_trial == from_python.gpus_per_trial


def test_yaml_num_gpus(original_yaml):
    two, one = load(original_yaml, ["figure3_resnet50_sc_iterand", "figure3_resnet34_sc_iterand"])
    assert two.gpus_per_trial == 2
    assert one.gpus_per_trial is None  # num_gpus: 1 keeps the fractional share by model size


def test_yaml_renames_and_grid(original_yaml):
    (e,) = load(original_yaml, ["figure2_conv6_ku_iterand"])
    assert e.grid["model"] == ["conv6x0.25", "conv6x0.5", "conv6x1.0", "conv6x2.0"]
    assert e.config["dataset"] == "cifar10" and e.config["epochs"] == 100
    assert not {"model.config_name", "epoch", "output_dir", "num_gpus", "parallel_grid",
                "learning_framework", "rerand_freq"} & set(e.config)


def test_yaml_via_cli(capsys, original_yaml, no_run):
    trials = dry_run(capsys, original_yaml, "figure2_conv6_ku_iterand")
    assert len(trials) == 12
    assert {t["experiment"] for t in trials} == {"figure2_conv6_ku_iterand"}
    assert {t["model"] for t in trials} == {f"conv6x{w}" for w in WIDTHS}


def test_yaml_unknown_key_suggests_closest(original_yaml):
    with pytest.raises(ExperimentError, match="did you mean 'figure2_conv6_ku_iterand'"):
        load(original_yaml, ["figure2_conv6_ku_iterandd"])
    with pytest.raises(ExperimentError, match="no experiment key '__default__'"):
        load(original_yaml, ["__default__"])


def test_yaml_without_keys_asks_for_them(original_yaml):
    with pytest.raises(ExperimentError, match="name the experiment keys"):
        load(original_yaml)


@pytest.mark.parametrize("key, option", [("typo_entry", "rerand_fre"), ("cifar10", "class")])
def test_yaml_unknown_option_is_named(original_yaml, key, option):
    with pytest.raises(ExperimentError, match=f"unknown TrialConfig option '{option}'") as info:
        load(original_yaml, [key])
    assert "\n" not in str(info.value)


def test_invalid_yaml_is_one_line_with_line_number(tmp_path, capsys, no_run):
    path = write(tmp_path, "broken.yaml", "a:\n    lr: 0.1\n  seed: 2\n")
    with pytest.raises(ExperimentError) as info:
        load(path, ["a"])
    message = str(info.value)
    assert "line 3" in message and "not valid YAML" in message and "\n" not in message
    assert main([path, "a", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ")


# ------------------------------------------------------------------ Experiment validation

def test_unknown_option_in_config_or_grid_suggests():
    with pytest.raises(ExperimentError, match="unknown TrialConfig option 'learning_rate'"):
        Experiment("e", dict(learning_rate=0.1))
    with pytest.raises(ExperimentError, match="did you mean 'seed'"):
        Experiment("e", {}, dict(seeds=[1, 2]))


@pytest.mark.parametrize("axis", [[], (), "abc", 3])
def test_grid_axis_must_be_non_empty_list(axis):
    with pytest.raises(ExperimentError, match="grid axis 'seed'"):
        Experiment("e", {}, dict(seed=axis))


@pytest.mark.parametrize("name", ["", "two words", None])
def test_experiment_name_must_be_a_word(name):
    with pytest.raises(ExperimentError):
        Experiment(name)


@pytest.mark.parametrize("gpus", [0.3, 1.5, -1, 0.33, True, float("nan")])
def test_gpus_per_trial_refused(gpus):
    with pytest.raises(ExperimentError, match="gpus_per_trial"):
        Experiment("e", gpus_per_trial=gpus)


@pytest.mark.parametrize("gpus", [0.25, 0.5, 1, 2, 1 / 3, 0.125])
def test_gpus_per_trial_accepted(gpus):
    assert Experiment("e", gpus_per_trial=gpus).gpus_per_trial == pytest.approx(gpus)
    assert check_gpus(gpus, "x") == pytest.approx(gpus)


def test_invalid_trial_value_raises_at_construction_naming_experiment():
    with pytest.raises((ConfigError, ExperimentError), match=r"my_exp: .*conv_sparsity = 1\.5"):
        Experiment("my_exp", dict(train_mode="score_only", bn_affine=False),
                   dict(conv_sparsity=[0.5, 1.5]))


def test_with_values_collapses_axis_and_keeps_original():
    e = Experiment("e", dict(lr=0.2), dict(model=[f"conv6x{w}" for w in WIDTHS], seed=[1, 2, 3]))
    fixed = e.with_values({"seed": 7})
    assert (len(e), len(fixed), len(fixed.trials())) == (12, 4, 4)
    assert {t["seed"] for t in fixed.trials()} == {7} and "seed" not in fixed.grid
    assert len(e.with_values({"lr": 0.5})) == 12  # a non-grid value keeps the grid
    assert {t["lr"] for t in e.trials()} == {0.2}  # the original is untouched


def test_grid_order_first_axis_fastest():
    e = Experiment("e", {}, dict(lr=[0.1, 0.2], seed=[1, 2, 3]))
    assert [(t["lr"], t["seed"]) for t in e.trials()] == [
        (0.1, 1), (0.2, 1), (0.1, 2), (0.2, 2), (0.1, 3), (0.2, 3)]
    assert all(t["experiment"] == "e" for t in e.trials())


def test_smoke_test_values():
    iterand = Experiment("it", dict(train_mode="score_only", bn_affine=False, conv_sparsity=0.5,
                                    rerand_mode="bernoulli", rerand_freq=300), dict(seed=[1, 2]))
    sgd = Experiment("sgd", {}, dict(seed=[1, 2]))
    for t in smoke_test(iterand).trials():
        assert subset(t, SMOKE_TEST) == SMOKE_TEST and t["rerand_freq"] == 2
    assert {t["rerand_freq"] for t in smoke_test(sgd).trials()} == {300}
    assert SMOKE_TEST["debug_max_iters"] > 2  # IteRand re-draws at least once within an epoch


# ------------------------------------------------------------------ experiment files

@pytest.mark.parametrize("text, fragment", [
    ("X = 1\n", "defines no experiments"),
    ("EXPERIMENTS = []\n", "defines no experiments"),
    ("EXPERIMENTS = [1, 2]\n", "must be a list of"),
    ("from iterand_tune.experiments import Experiment\nEXPERIMENTS = [Experiment('a'),\n"
     "  Experiment('b'), Experiment('a')]\n", "repeated: a"),
    ("x = 1\ny = (\nz = 3\n", " line "),
    ("x = 1\n\ny = 1 / 0\n", "line 3: ZeroDivisionError"),
    ("from iterand_tune.experiments import Experiment\nEXPERIMENTS = [Experiment('a', "
     "dict(lrr=0.1))]\n", "did you mean 'lr'"),
])
def test_broken_experiment_file_is_one_line(tmp_path, text, fragment):
    path = write(tmp_path, "exp.py", text)
    with pytest.raises(ExperimentError) as info:
        load(path)
    message = str(info.value)
    assert fragment in message and path in message and "\n" not in message


def test_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "exp.py", "x = 1\n\nEXPERIMENTS = [\n    def\n]\n")
    with pytest.raises(ExperimentError, match=r"exp\.py line 4: "):
        load_python(path)


def test_select_unknown_lists_known_names():
    experiments = load(FIGURE1)
    with pytest.raises(ExperimentError) as info:
        select(experiments, ["figure1_conv6_ku_iterandd"], "figure1.py")
    message = str(info.value)
    assert "did you mean 'figure1_conv6_ku_iterand'" in message
    assert all(e.name in message for e in experiments)
    assert [e.name for e in select(experiments, ["figure1_resnet34_ku_iterand",
                                                 "figure1_conv6_ku_iterand"], "f")] == \
        ["figure1_resnet34_ku_iterand", "figure1_conv6_ku_iterand"]


def test_load_missing_and_wrong_extension(tmp_path):
    with pytest.raises(ExperimentError, match="no experiment file at"):
        load(str(tmp_path / "missing.py"))
    with pytest.raises(ExperimentError, match=r"\.py module or an original \.yaml"):
        load(write(tmp_path, "notes.txt", "EXPERIMENTS = []\n"))


# ------------------------------------------------------------------ CLI

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
def test_cli_user_errors(capsys, tmp_path, no_run, argv, fragment):
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


# ------------------------------------------------------------------ resources

def test_estimate_macs_conv6_by_hand():
    convs = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256),
             (8, 256, 256)]  # (spatial size, C_in, C_out), 3x3 kernels, padding 1
    linear = 256 * 4 * 4 * 256 + 256 * 256 + 256 * 10
    by_hand = sum(h * h * cin * cout * 9 for h, cin, cout in convs) + linear
    assert by_hand == 153_881_088
    assert estimate_macs("conv6x1.0") == by_hand


@pytest.mark.parametrize("model, share", [
    ("conv6x0.25", 0.25), ("conv6x0.5", 0.25), ("conv6x1.0", 0.25), ("resnet18x0.25", 0.25),
    ("resnet18x0.5", 0.25), ("resnet18x1.0", 0.5), ("conv6x2.0", 0.5), ("resnet18x2.0", 1.0),
    ("resnet34x2.0", 1.0),
])
def test_gpu_share(model, share):
    assert gpu_share(model, "cifar10") == share


OPTS = RunOptions(storage_path="/nonexistent/store", name="run")


def _trial(**values) -> tuple[dict, Experiment]:
    e = Experiment("e", values)
    return e.trials()[0], e


def test_trial_request_gpus():
    trial, e = _trial(model="conv6x1.0")
    assert trial_request(trial, e, OPTS, have_gpus=False) == (1.0, 0.0)
    assert trial_request(trial, e, OPTS, have_gpus=True) == (1.0, 0.25)
    two = e.replace(gpus_per_trial=2)
    assert trial_request(trial, two, OPTS, have_gpus=True) == (1.0, 2.0)
    forced = RunOptions(storage_path="/x", name="r", gpus_per_trial=0.5)
    assert trial_request(trial, two, forced, have_gpus=True) == (1.0, 0.5)
    assert trial_request(trial, e, forced, have_gpus=False) == (1.0, 0.5)
    cpu_only, e2 = _trial(model="conv6x1.0", use_cuda=False)
    assert trial_request(cpu_only, e2, OPTS, have_gpus=True) == (1.0, 0.0)


def test_trial_request_cpus():
    trial, e = _trial(model="resnet50", dataset="imagenet", num_workers=8)
    assert trial_request(trial, e, OPTS, have_gpus=True) == (9.0, 1.0)
    assert trial_request(trial, e.replace(cpus_per_trial=3), OPTS, have_gpus=True)[0] == 3.0
    opts = RunOptions(storage_path="/x", name="r", cpus_per_trial=2)
    assert trial_request(trial, e.replace(cpus_per_trial=3), opts, have_gpus=True)[0] == 2.0


def test_check_cluster_refuses_impossible_request():
    nodes = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}]
    with pytest.raises(RunError) as info:
        check_cluster({"figure3_resnet50_sc_iterand (resnet50)": (9.0, 2.0)}, nodes)
    message = str(info.value)
    assert "figure3_resnet50_sc_iterand" in message
    assert "2 node(s)" in message and "32 CPUs" in message and "2 GPUs" in message
    assert "\n" not in message
    with pytest.raises(RunError):
        check_cluster({"e": (1.0, 0.0)}, [])


def test_check_cluster_accepts_satisfiable_requests():
    check_cluster({"a": (9.0, 2.0), "b": (1.0, 0.0)}, [{"CPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}])
    check_cluster({"a": (1.0, 0.25), "b": (1.0, 0.5), "c": (1.0, 1.0)}, [{"CPU": 4.0, "GPU": 1.0}])


# ------------------------------------------------------------------ summaries

def _rows(experiment: Experiment, accs: list, params: int = 1000) -> list[tuple]:
    return [(t, {} if acc is None else {"test_acc": acc, "params_after_pruning": params},
             acc is not None) for t, acc in zip(experiment.trials(), accs)]


def test_summarize_means_and_stds():
    sgd = Experiment("a_sgd", dict(model="conv6x0.5", lr=0.01), dict(seed=[1, 2, 3]))
    it = Experiment("b_iterand", dict(model="conv6x0.5", train_mode="score_only", bn_affine=False,
                                      conv_sparsity=0.5, rerand_mode="bernoulli"),
                    dict(seed=[1, 2, 3]))
    rows = _rows(sgd, [80.0, 82.0, 84.5], 1_234_567) + _rows(it, [70.0, None, 73.0], 617_000)
    points = {p.experiment: p for p in summarize(rows)}
    assert sorted(points) == ["a_sgd", "b_iterand"]
    a, b = points["a_sgd"], points["b_iterand"]
    assert (a.method, a.trials, a.done, a.label) == ("sgd", 3, 3, "")
    assert (b.method, b.trials, b.done) == ("iterand", 3, 2)
    assert a.mean == pytest.approx(82.1666666667) and a.std == pytest.approx(
        statistics.stdev([80.0, 82.0, 84.5]))
    assert b.mean == pytest.approx(71.5) and b.std == pytest.approx(2.1213203436)
    assert (a.params_after_pruning, b.params_after_pruning) == (1_234_567, 617_000)
    table = RunSummary("/r", summarize(rows), [], [], 1.0).table()
    a_line = next(line for line in table.splitlines() if line.startswith("a_sgd"))
    b_line = next(line for line in table.splitlines() if line.startswith("b_iterand"))
    assert "3/3" in a_line and "82.17" in a_line and "2.25" in a_line and "1,234,567" in a_line
    assert "2/3" in b_line and "71.50" in b_line and "2.12" in b_line and "617,000" in b_line


def test_summarize_single_and_no_result():
    e = Experiment("e", dict(model="conv6x0.25"), dict(seed=[1, 2]))
    (p,) = summarize(_rows(e, [None, 90.0]))
    assert (p.done, p.mean, p.std) == (1, 90.0, None)
    (q,) = summarize(_rows(e, [None, None]))
    assert (q.done, q.mean, q.std, q.params_after_pruning) == (0, None, None, None)
    line = RunSummary("/r", [q], [], [], 0.0).table().splitlines()[-1]
    assert "0/2" in line and line.split()[-3:] == ["-", "-", "-"]


def test_summarize_separates_points_varying_inside_experiment():
    (e,) = load(FIGURE1, ["figure1_conv6_ku_iterand"])
    accs = [60.0 + i for i in range(len(e))]
    points = summarize(_rows(e, accs))
    assert len(points) == 4
    assert sorted(p.label for p in points) == [f"rerand_lambda={r}" for r in (0.0, 0.01, 0.1, 1.0)]
    assert all(p.trials == 3 and p.done == 3 for p in points)
    by_label = {p.label: p for p in points}
    # grid(rerand_lambda, seed): r varies fastest, so r = 0.01 got accs 61, 65, 69
    assert by_label["rerand_lambda=0.01"].test_accs == [61.0, 65.0, 69.0]
    assert by_label["rerand_lambda=0.0"].method == "edgepopup"
    assert by_label["rerand_lambda=0.1"].method == "iterand"


def test_run_summary_from_results():
    e = Experiment("e", dict(model="conv6x0.25"), dict(seed=[1, 2, 3]))
    t1, t2, t3 = e.trials()
    grid = [SimpleNamespace(config={runner.TRIAL_KEY: t1}, metrics={"test_acc": 50.0}, error=None),
            SimpleNamespace(config={runner.TRIAL_KEY: t2}, metrics={"epoch": 3}, error=None),
            SimpleNamespace(config={runner.TRIAL_KEY: t3}, metrics={}, error=RuntimeError("x"))]
    summary = RunSummary.from_results(grid, "/r", 2.0)
    assert summary.errored == ["e-conv6x0.25-seed3"]
    assert summary.unfinished == ["e-conv6x0.25-seed2"]
    assert not summary.ok
    (p,) = summary.points
    assert (p.trials, p.done, p.test_accs) == (3, 1, [50.0])


def test_run_summary_counts_trials_cancelled_before_they_ran():
    # Ray gives such a trial no config (seen on an overloaded machine); it is an error, not a crash.
    e = Experiment("e", dict(model="conv6x0.25"), dict(seed=[1]))
    grid = [SimpleNamespace(config={runner.TRIAL_KEY: e.trials()[0]}, metrics={"test_acc": 50.0},
                            error=None, path="/r/e-conv6x0.25-seed1-x_00000"),
            SimpleNamespace(config=None, metrics=None, error=RuntimeError("cancelled"),
                            path="/r/e-conv6x0.25-seed2-x_00001")]
    summary = RunSummary.from_results(grid, "/r", 1.0)
    assert summary.errored == ["e-conv6x0.25-seed2-x_00001"] and not summary.ok
    (p,) = summary.points
    assert (p.trials, p.done) == (1, 1)


@pytest.mark.slow  # a subprocess: about 5 s
def test_dry_run_json_piped_into_head_prints_no_traceback():
    # 180 JSON lines (~280 kB) overflow the pipe buffer, so closing after one line breaks the pipe.
    proc = subprocess.Popen([sys.executable, "-m", "iterand_tune", FIGURE2, "--dry-run", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=EXPERIMENTS_DIR.parent)
    assert json.loads(proc.stdout.readline())["experiment"] == "figure2_conv6_ku_sgd"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err
