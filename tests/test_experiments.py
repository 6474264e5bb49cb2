"""Tests for iterand_tune.experiments: every figure's trials value for value against the paper
(docs/method.md), the original YAML import, Experiment validation, overrides, the smoke test and
`prepare`, and experiment files that are broken in every way a user can break them."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from iterand_tune.cli import main
from iterand_tune.config import FIELD_NAMES, ConfigError, TrialConfig
from iterand_tune.data import DIGITS_SPLIT, DeviceLoader
from iterand_tune.experiments import (SMOKE_TEST, Experiment, ExperimentError, all_trials, load,
                                      load_python, prepare, select, smoke_test)

from helpers import dry_run

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
FIGURE1, FIGURE2, FIGURE3 = (str(EXPERIMENTS_DIR / f"figure{i}.py") for i in (1, 2, 3))
EXAMPLES, QUICKSTART = str(EXPERIMENTS_DIR / "examples.py"), str(EXPERIMENTS_DIR / "quickstart.py")

CIFAR10_COMMON = dict(dataset="cifar10", epochs=100, batch_size=128, optimizer="SGD",
                      lr_scheduler="CustomCosineLR", sgd_momentum=0.9)


# ------------------------------------------------------------------ helpers

def method_of(trial: dict) -> str:
    return TrialConfig.from_dict({k: v for k, v in trial.items() if k != "experiment"}).method


def subset(trial: dict, keys) -> dict:
    return {k: trial[k] for k in keys}


def canonical(trials, drop=("dataset_dir",)) -> list[str]:
    """Order-free, comparable form of a trial list (JSON strings, sorted)."""
    return sorted(json.dumps({k: v for k, v in t.items() if k not in drop}, sort_keys=True)
                  for t in trials)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)

# ------------------------------------------------------------------ figure 2

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


def test_figure2_dry_run_matches_the_paper(capsys):
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

# ------------------------------------------------------------ figure 1, 3, examples, quickstart

def test_figure1_dry_run_matches_the_paper(capsys):
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


def test_figure3_dry_run_matches_the_paper(capsys):
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


def test_figure3_big_resnets_get_one_gpu_and_batchnorm_over_two_halves():
    # The paper's ResNet50/101 ran on 2 GPUs with half of the batch each: one GPU here, with
    # BatchNorm over each half (docs/method.md section 4).
    experiments = load(FIGURE3)
    halves = {f"figure3_resnet{d}_sc_{m}" for d in (50, 101) for m in ("edgepopup", "iterand")}
    assert {e.name: e.gpus_per_trial for e in experiments if e.name in halves} == dict.fromkeys(halves, 1)
    assert all(e.gpus_per_trial is None for e in experiments if e.name not in halves)
    splits = {t["experiment"]: t["bn_splits"] for t in all_trials(experiments)}
    assert {n for n, k in splits.items() if k == 2} == halves
    assert all(k == 1 for n, k in splits.items() if n not in halves)
    assert all(t["batch_size"] == 128 and t["imagenet_decode"] is None for t in all_trials(experiments))


def test_examples_dry_run_matches_the_paper(capsys):
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
        # docs/method.md: re-randomise before iteration `it` when (it + 1) % K_per == 0
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
    assert from_yaml.gpus_per_trial == from_python.gpus_per_trial
    assert canonical(from_yaml.trials(), drop) == canonical(from_python.trials(), drop)
    assert {t["dataset_dir"] for t in from_yaml.trials()} == {"__data__"}


def test_yaml_num_gpus(original_yaml):
    # The original's num_gpus: 2 split the batch over two GPUs, each normalising its half: one GPU
    # computing BatchNorm over each half (bn_splits=2) is the same, as figure3.py runs it.
    two, one = load(original_yaml, ["figure3_resnet50_sc_iterand", "figure3_resnet34_sc_iterand"])
    assert (two.gpus_per_trial, {t["bn_splits"] for t in two.trials()}) == (1.0, {2})
    assert (one.gpus_per_trial, {t["bn_splits"] for t in one.trials()}) == (None, {1})


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


# ------------------------------------------------------------------ what a run sees

def test_prepare_fixes_values_applies_the_smoke_test_and_makes_data_folders_absolute(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = Experiment("plain", dict(train_mode="score_only", bn_affine=False, conv_sparsity=0.5,
                                     rerand_mode="bernoulli"), dict(seed=[1, 2], lr=[0.1, 0.3]))
    folders = Experiment("folders", {}, dict(dataset_dir=["a", "/abs/b"]))
    assert [t["dataset_dir"] for t in all_trials(prepare([plain, folders]))] == \
        [str(tmp_path / "data")] * 4 + [str(tmp_path / "a"), "/abs/b"]
    fixed, _ = prepare([plain, folders], {"lr": 0.5, "dataset_dir": "d"}, smoke=True)
    assert len(fixed) == 2 and "lr" not in fixed.grid
    for t in fixed.trials():
        assert t["lr"] == 0.5 and t["dataset_dir"] == str(tmp_path / "d")
        assert {k: t[k] for k in SMOKE_TEST} == SMOKE_TEST and t["rerand_freq"] == 2
    assert len(all_trials([plain, folders])) == 6
    assert {t["dataset_dir"] for t in plain.trials()} == {"data"}  # the originals are untouched
