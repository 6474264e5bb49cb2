"""Tests for iterand_tune.config: TrialConfig defaults (docs/method.md), option names, type coercion,
validation messages, the `method` label, METHODS presets, dict round trips and parse_value."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from iterand_tune.config import (
    FIELD_NAMES,
    METHODS,
    ConfigError,
    TrialConfig,
    field_type,
    parse_value,
)
from iterand_tune.models import model_names

# Options that pruning needs (train_mode 'normal' is the dense SGD baseline).
SCORE = dict(train_mode="score_only", bn_affine=False)
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- defaults and option names


def test_defaults_are_the_papers_cifar10_settings():
    cfg = TrialConfig()
    expected = dict(
        epochs=100, batch_size=128, batch_size_eval=512, optimizer="SGD", sgd_momentum=0.9, lr=0.1,
        lr_scheduler="CustomCosineLR", warmup_epochs=0, finetuning_epochs=0, rerand_freq=300,
        rerand_freq_unit="iteration", rerand_lambda=0.1, rerand_rate=1.0, bn_momentum=0.1,
        init_mode="kaiming_uniform", init_mode_mask="kaiming_uniform", init_scale=1.0,
        init_scale_score=1.0, dataset="cifar10", seed=1, conv_sparsity=0.0, rerand_mode=None,
    )
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.method == "sgd"


ORIGINAL_OPTIONS = (
    "conv_sparsity linear_sparsity init_mode init_mode_linear init_mode_mask init_scale "
    "init_scale_score rerand_mode rerand_freq rerand_freq_unit rerand_lambda rerand_mu rerand_rate "
    "bn_affine bn_track_running_stats bn_momentum train_mode optimizer lr weight_decay lr_scheduler "
    "warmup_epochs finetuning_epochs finetuning_lr sgd_momentum lr_milestones multisteplr_gamma "
    "padding_before_crop batch_size batch_size_eval max_train_dataset_size train_augmentation seed "
    "num_workers dataset_download dataset_dir"
).split()


@pytest.mark.parametrize("name", ORIGINAL_OPTIONS + ["model", "dataset", "epochs"])
def test_original_option_names_and_renames_are_fields(name):
    assert name in FIELD_NAMES


def test_field_names_match_the_dataclass_and_epoch_is_not_one():
    assert FIELD_NAMES == tuple(f.name for f in dataclasses.fields(TrialConfig))
    assert "epoch" not in FIELD_NAMES


def test_from_dict_refuses_old_name_epoch_with_hint():
    with pytest.raises(ConfigError, match=r"'epoch'.*did you mean 'epochs'"):
        TrialConfig.from_dict({"epoch": 10})


def test_from_dict_refuses_unknown_key_without_close_match():
    with pytest.raises(ConfigError, match="unknown TrialConfig option 'zzzzqqq'$"):
        TrialConfig.from_dict({"zzzzqqq": 1})


# ---------------------------------------------------------------- types


def test_frozen():
    cfg = TrialConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.3  # type: ignore[misc]
    assert cfg.lr == 0.1


@pytest.mark.parametrize("name", ["lr", "weight_decay", "sgd_momentum", "init_scale", "bn_momentum", "rerand_rate"])
def test_int_is_coerced_to_float(name):
    value = 0 if name in ("sgd_momentum", "weight_decay") else 1
    cfg = TrialConfig(**{name: value})
    got = getattr(cfg, name)
    assert type(got) is float and got == float(value)


def test_int_is_coerced_for_optional_float():
    cfg = TrialConfig(**SCORE, conv_sparsity=0.5, linear_sparsity=0)
    assert type(cfg.linear_sparsity) is float and cfg.linear_sparsity == 0.0


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", True),              # bool is not a number
        ("epochs", True),
        ("conv_sparsity", False),
        ("linear_sparsity", True),
        ("bn_affine", 1),          # number is not a bool
        ("dataset_download", 0),
        ("train_augmentation", 1.0),
        ("epochs", 10.0),          # float is not an int
        ("epochs", "10"),          # str is not an int
        ("model", 6),
        ("lr", None),              # not optional
        ("lr_milestones", [30, True]),
        ("lr_milestones", "30,60"),
    ],
)
def test_wrong_types_are_refused(name, value):
    with pytest.raises(ConfigError, match=rf"TrialConfig\.{name} must (be|not be None)"):
        TrialConfig(**{name: value})


@pytest.mark.parametrize("value", [[30, 60], (30, 60)])
def test_lr_milestones_become_tuple(value):
    cfg = TrialConfig(lr_scheduler="MultiStepLR", lr_milestones=value)
    assert cfg.lr_milestones == (30, 60) and isinstance(cfg.lr_milestones, tuple)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("lr", (float, False)),
        ("epochs", (int, False)),
        ("bn_affine", (bool, False)),
        ("model", (str, False)),
        ("linear_sparsity", (float, True)),
        ("lr_scheduler", (str, True)),
        ("lr_milestones", (tuple, True)),
        ("max_train_dataset_size", (int, True)),
    ],
)
def test_field_type(name, expected):
    assert field_type(name) == expected


# ---------------------------------------------------------------- validation


INVALID = [
    # (options, field named in the message, part of the allowed range/values)
    ({**SCORE, "conv_sparsity": -0.1}, "conv_sparsity", "[0, 1)"),
    ({**SCORE, "conv_sparsity": 1.0}, "conv_sparsity", "[0, 1)"),
    ({**SCORE, "conv_sparsity": 0.5, "linear_sparsity": 1.0}, "linear_sparsity", "[0, 1)"),
    ({"lr": -0.1}, "lr", ">= 0"),
    ({"weight_decay": -1}, "weight_decay", ">= 0"),
    ({"lr": NAN}, "lr", "finite"),
    ({"lr": INF}, "lr", "finite"),
    ({"model": "conv7x1.0"}, "model", "did you mean 'conv6x1.0'"),
    ({"model": "resnet18x0"}, "model", "width factor > 0"),
    ({"dataset": "cifar11"}, "dataset", "'cifar10', 'cifar100'"),
    ({"init_mode": "xavier"}, "init_mode", "'kaiming_uniform', 'kaiming_normal'"),
    ({"init_mode_mask": "xavier"}, "init_mode_mask", "'signed_constant'"),
    ({"init_mode_linear": "xavier"}, "init_mode_linear", "'signed_constant' or None"),
    ({**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": 1.5}, "rerand_lambda", "[0, 1]"),
    ({**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": -0.1}, "rerand_lambda", "[0, 1]"),
    ({**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": None}, "rerand_lambda", "must be set"),
    ({**SCORE, "rerand_mode": "gauss"}, "rerand_mode", "'bernoulli', 'manual' or None"),
    ({"rerand_freq": 0}, "rerand_freq", ">= 1"),
    ({"rerand_rate": 1.5}, "rerand_rate", "[0, 1]"),
    ({"rerand_freq_unit": "week"}, "rerand_freq_unit", "'iteration', 'epoch'"),
    ({"train_mode": "normal", "rerand_mode": "bernoulli"}, "rerand_mode", "train_mode 'score_only'"),
    ({**SCORE, "rerand_mode": "manual", "rerand_lambda": 0.5}, "rerand_mu", "must be set"),
    ({"train_mode": "normal", "conv_sparsity": 0.5}, "conv_sparsity", "must be 0 with train_mode 'normal'"),
    ({"train_mode": "prune"}, "train_mode", "'normal', 'score_only'"),
    ({"epochs": 0}, "epochs", ">= 1"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
    ({"batch_size_eval": 0}, "batch_size_eval", ">= 1"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"max_train_dataset_size": 0}, "max_train_dataset_size", ">= 1"),
    ({"epochs": 10, "warmup_epochs": 10}, "warmup_epochs", "< epochs (10)"),
    ({"epochs": 10, "warmup_epochs": 5, "finetuning_epochs": 5, "finetuning_lr": 1e-5},
     "warmup_epochs", "< epochs (10)"),
    ({"warmup_epochs": -1}, "warmup_epochs", ">= 0"),
    ({"finetuning_epochs": 5}, "finetuning_lr", "finetuning_epochs > 0"),
    ({"finetuning_epochs": 5, "finetuning_lr": -1e-5}, "finetuning_lr", ">= 0"),
    ({"lr_scheduler": "MultiStepLR"}, "lr_milestones", "increasing epochs >= 1"),
    ({"lr_scheduler": "MultiStepLR", "lr_milestones": [60, 30]}, "lr_milestones", "increasing epochs >= 1"),
    ({"lr_scheduler": "MultiStepLR", "lr_milestones": [0, 30]}, "lr_milestones", "increasing epochs >= 1"),
    ({"sgd_momentum": 1.0}, "sgd_momentum", "[0, 1)"),
    ({"optimizer": "Adam"}, "optimizer", "'SGD', 'AdamW'"),
    ({"lr_scheduler": "step"}, "lr_scheduler", "'CustomCosineLR', 'MultiStepLR' or None"),
    ({"bn_momentum": 1.5}, "bn_momentum", "[0, 1]"),
    ({"init_scale": 0}, "init_scale", "> 0"),
    ({"debug_max_iters": 0}, "debug_max_iters", ">= 1"),
]


@pytest.mark.parametrize("options, field, allowed", INVALID, ids=[f"{c[1]}-{i}" for i, c in enumerate(INVALID)])
def test_invalid_values_name_field_and_allowed_range(options, field, allowed):
    with pytest.raises(ConfigError) as excinfo:
        TrialConfig(**options)
    msg = str(excinfo.value)
    assert msg.startswith(f"TrialConfig.{field} = ")
    assert allowed in msg
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    "options",
    [
        {**SCORE, "conv_sparsity": 0.999},
        {**SCORE, "conv_sparsity": 0.0},
        {**SCORE, "conv_sparsity": 0.5, "linear_sparsity": 0.0},
        {**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": 0},
        {**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": 1},
        {**SCORE, "rerand_mode": "manual", "rerand_lambda": 0.5, "rerand_mu": 0.5},
        {"lr": 0, "weight_decay": 0, "sgd_momentum": 0},
        {"epochs": 10, "warmup_epochs": 4, "finetuning_epochs": 5, "finetuning_lr": 0},
        {"epochs": 1},
        {"epochs": 3, "warmup_epochs": 5, "lr_scheduler": None},  # no cosine phase to protect
        {"lr_scheduler": "MultiStepLR", "lr_milestones": [30, 60]},
        {"rerand_rate": 0, "rerand_freq": 1, "rerand_freq_unit": "epoch"},
        {"optimizer": "AdamW", "lr": 1e-3},
        {"init_mode": "signed_constant", "init_mode_linear": "uniform(-1,1)", "init_mode_mask": "kaiming_normal"},
    ],
)
def test_boundary_values_are_accepted(options):
    cfg = TrialConfig(**options)
    for key, value in options.items():
        got = getattr(cfg, key)
        assert got == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize("name", ["conv6x0.75", "resnet18x3.0", "resnet34x0.1", "resnet50", "resnet101"])
def test_widths_beyond_registry_are_accepted(name):
    assert TrialConfig(model=name).model == name


def test_registry_is_the_papers_names():
    names = model_names()
    for family in ("conv6", "resnet18", "resnet34"):
        for width in ("0.25", "0.5", "1.0", "2.0"):
            assert f"{family}x{width}" in names
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= set(names)


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_is_accepted(name):
    assert TrialConfig(model=name).model == name


# ---------------------------------------------------------------- method and presets


@pytest.mark.parametrize(
    "options, method",
    [
        ({}, "sgd"),
        ({"train_mode": "normal", "rerand_mode": None, "rerand_lambda": 0.5}, "sgd"),
        ({**SCORE, "conv_sparsity": 0.5}, "edgepopup"),
        ({**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": 0.0}, "edgepopup"),
        ({**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": 0.1}, "iterand"),
        ({**SCORE, "rerand_mode": "bernoulli", "rerand_lambda": 1.0}, "iterand"),
        ({**SCORE, "rerand_mode": "manual", "rerand_lambda": 0.0, "rerand_mu": 1.0}, "iterand"),
    ],
)
def test_method_label(options, method):
    assert TrialConfig(**options).method == method


def test_methods_are_the_papers_three():
    assert sorted(METHODS) == ["edgepopup", "iterand", "sgd"]


@pytest.mark.parametrize("key", sorted(METHODS))
def test_method_presets_build_valid_configs(key):
    cfg = TrialConfig(**METHODS[key])
    assert cfg.method == key
    assert cfg.bn_affine is (key == "sgd")
    assert cfg.train_mode == ("normal" if key == "sgd" else "score_only")
    if key == "iterand":
        assert (cfg.rerand_mode, cfg.rerand_freq, cfg.rerand_lambda) == ("bernoulli", 300, 0.1)


# ---------------------------------------------------------------- dict round trip and replace


ROUND_TRIP = [
    {},
    {**METHODS["iterand"], "model": "resnet18x0.5", "lr": 0.3, "seed": 3},
    {"lr_scheduler": "MultiStepLR", "lr_milestones": [30, 60, 90], "multisteplr_gamma": 0.2},
    {"lr_scheduler": None, "max_train_dataset_size": 1000, "finetuning_epochs": 5, "finetuning_lr": 1e-5},
]


@pytest.mark.parametrize("options", ROUND_TRIP)
def test_to_dict_from_dict_round_trip(options):
    cfg = TrialConfig(**options)
    d = cfg.to_dict()
    assert set(d) == set(FIELD_NAMES)
    assert TrialConfig.from_dict(d) == cfg
    # JSON-safe: a stored result config rebuilds the same trial
    assert TrialConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_to_dict_gives_milestones_as_list():
    d = TrialConfig(lr_scheduler="MultiStepLR", lr_milestones=(30, 60)).to_dict()
    assert d["lr_milestones"] == [30, 60] and isinstance(d["lr_milestones"], list)
    assert TrialConfig().to_dict()["lr_milestones"] is None


def test_replace_changes_only_what_is_asked():
    cfg = TrialConfig(**METHODS["edgepopup"])
    new = cfg.replace(lr=0.3, model="resnet18x2.0")
    assert (new.lr, new.model) == (0.3, "resnet18x2.0")
    assert cfg.lr == 0.1 and cfg.model == "conv6x1.0"
    assert {k: v for k, v in new.to_dict().items() if k not in ("lr", "model")} == \
        {k: v for k, v in cfg.to_dict().items() if k not in ("lr", "model")}


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"conv_sparsity": 2.0}, r"TrialConfig\.conv_sparsity = 2\.0"),
        ({"train_mode": "normal"}, r"TrialConfig\.conv_sparsity = 0\.5"),  # edge-popup preset is sparse
        ({"epoch": 3}, r"did you mean 'epochs'"),
        ({"lr": "0.1"}, r"TrialConfig\.lr must be float"),
    ],
)
def test_replace_revalidates(changes, match):
    cfg = TrialConfig(**METHODS["edgepopup"])
    with pytest.raises(ConfigError, match=match):
        cfg.replace(**changes)


# ---------------------------------------------------------------- parse_value


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", "yes", " yes "])
def test_parse_bool_true(text):
    assert parse_value("bn_affine", text) is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "NO"])
def test_parse_bool_false(text):
    assert parse_value("dataset_download", text) is False


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("epochs", "5", 5),
        ("seed", " 3 ", 3),
        ("lr", "0.3", 0.3),
        ("lr", "1e-4", 1e-4),
        ("lr", "1", 1.0),
        ("model", "resnet18x0.5", "resnet18x0.5"),
        ("init_mode", "uniform(-1,1)", "uniform(-1,1)"),
        ("lr_milestones", "30,60", (30, 60)),
        ("lr_milestones", "[30, 60, 90]", (30, 60, 90)),
        ("lr_milestones", "45", (45,)),
    ],
)
def test_parse_typed_values(name, text, expected):
    got = parse_value(name, text)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "name, text",
    [
        ("linear_sparsity", "none"),
        ("lr_scheduler", "None"),
        ("finetuning_lr", "null"),
        ("max_train_dataset_size", "none"),
        ("rerand_mode", "none"),
        ("init_mode_linear", "NONE"),
        ("lr_milestones", "none"),
        ("debug_max_iters", ""),
    ],
)
def test_parse_none_for_optional_fields(name, text):
    assert parse_value(name, text) is None


@pytest.mark.parametrize("name, hint", [("epoch", "epochs"), ("lrr", "lr"), ("rerand_lamda", "rerand_lambda")])
def test_parse_unknown_key_hints(name, hint):
    with pytest.raises(ConfigError, match=rf"unknown TrialConfig option '{name}'; did you mean '{hint}'\?"):
        parse_value(name, "1")


@pytest.mark.parametrize(
    "name, text, want",
    [
        ("lr", "abc", "needs float"),
        ("lr", "none", "needs float"),          # lr is not optional
        ("epochs", "0.5", "needs int"),
        ("epochs", "ten", "needs int"),
        ("linear_sparsity", "half", "needs float or none"),
        ("bn_affine", "maybe", "needs bool"),
        ("bn_affine", "none", "needs bool"),
        ("lr_milestones", "30,x", "needs comma-separated integers or none"),
        ("lr_milestones", "30.5", "needs comma-separated integers"),
    ],
)
def test_parse_wrong_type(name, text, want):
    with pytest.raises(ConfigError) as excinfo:
        parse_value(name, text)
    msg = str(excinfo.value)
    assert f"option '{name}' {want}" in msg and repr(text) in msg


def test_parse_then_build_matches_direct_build():
    texts = {"model": "conv6x0.5", "train_mode": "score_only", "bn_affine": "false", "conv_sparsity": "0.5",
             "rerand_mode": "bernoulli", "rerand_lambda": "0.1", "lr": "0.3", "epochs": "3"}
    cfg = TrialConfig.from_dict({k: parse_value(k, v) for k, v in texts.items()})
    assert cfg == TrialConfig(model="conv6x0.5", train_mode="score_only", bn_affine=False, conv_sparsity=0.5,
                              rerand_mode="bernoulli", rerand_lambda=0.1, lr=0.3, epochs=3)
    assert cfg.method == "iterand"


# ---------------------------------------------------------------- regressions found in review


def test_normal_mode_with_linear_sparsity_names_linear_sparsity():
    with pytest.raises(ConfigError) as excinfo:
        TrialConfig(train_mode="normal", linear_sparsity=0.5)
    assert str(excinfo.value).startswith("TrialConfig.linear_sparsity = 0.5")


@pytest.mark.parametrize(
    "options, field",
    [
        ({"finetuning_epochs": 5, "finetuning_lr": INF}, "finetuning_lr"),
        ({"init_scale": INF}, "init_scale"),
        ({"init_scale_score": INF}, "init_scale_score"),
        ({**SCORE, "rerand_mode": "manual", "rerand_lambda": NAN, "rerand_mu": 0.5}, "rerand_lambda"),
        ({**SCORE, "rerand_mode": "manual", "rerand_lambda": 0.5, "rerand_mu": NAN}, "rerand_mu"),
        ({**SCORE, "rerand_mode": "manual", "rerand_lambda": 0.5, "rerand_mu": INF}, "rerand_mu"),
    ],
)
def test_non_finite_values_are_refused(options, field):
    assert not all(math.isfinite(v) for v in options.values() if isinstance(v, float))
    with pytest.raises(ConfigError, match=rf"TrialConfig\.{field} = "):
        TrialConfig(**options)


def test_multisteplr_with_empty_milestones_is_refused():
    with pytest.raises(ConfigError, match=r"TrialConfig\.lr_milestones = \(\)"):
        TrialConfig(lr_scheduler="MultiStepLR", lr_milestones=[])


# ---------------------------------------------------------------- runtime (speed) options


def test_speed_options_default_to_faithful_fp32_eager():
    cfg = TrialConfig()
    assert (cfg.channels_last, cfg.autocast, cfg.compile, cfg.cudnn_benchmark) == (False, None, False, None)
    assert cfg.deterministic is True


@pytest.mark.parametrize("options", [
    dict(channels_last=True), dict(autocast="bf16"), dict(compile=True),
    dict(deterministic=False, cudnn_benchmark=True), dict(cudnn_benchmark=False),
    dict(channels_last=True, autocast="bf16", compile=True, deterministic=False),
])
def test_speed_options_are_accepted_and_round_trip(options):
    cfg = TrialConfig(**options)
    assert TrialConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("options, field, match", [
    (dict(autocast="fp16"), "autocast", "'bf16' or None"),
    (dict(autocast="bfloat16"), "autocast", "'bf16' or None"),
    (dict(cudnn_benchmark=True), "cudnn_benchmark", "deterministic=False"),
    (dict(channels_last=1), "channels_last", "must be bool"),
    (dict(compile="yes"), "compile", "must be bool"),
])
def test_bad_speed_options_are_refused(options, field, match):
    with pytest.raises(ConfigError) as excinfo:
        TrialConfig(**options)
    assert str(excinfo.value).startswith(f"TrialConfig.{field}") and match in str(excinfo.value)


@pytest.mark.parametrize("name, text, expected", [
    ("channels_last", "true", True), ("autocast", "bf16", "bf16"), ("autocast", "none", None),
    ("compile", "1", True), ("cudnn_benchmark", "false", False), ("cudnn_benchmark", "none", None),
])
def test_parse_speed_options(name, text, expected):
    assert parse_value(name, text) == expected


def test_config_datasets_are_the_data_modules():
    from iterand_tune.data import DATASETS as DATA_DATASETS
    from iterand_tune.vocabulary import DATASET_NAMES, DATASETS

    assert DATA_DATASETS is DATASETS and DATASET_NAMES == tuple(DATASETS)
    assert TrialConfig(dataset="synthetic_cifar10").dataset == "synthetic_cifar10"
    for name in DATASETS:
        assert TrialConfig(dataset=name).dataset == name


# ---------------------------------------------------------------- ImageNet pipeline options


def test_imagenet_options_default_to_one_part_and_the_device_deciding_the_decoder():
    cfg = TrialConfig()
    assert (cfg.bn_splits, cfg.imagenet_decode) == (1, None)


@pytest.mark.parametrize("options", [
    dict(bn_splits=2), dict(bn_splits=128, batch_size=128), dict(imagenet_decode="device"),
    dict(imagenet_decode="pil"), dict(dataset="imagenet", imagenet_decode="device", bn_splits=2),
])
def test_imagenet_options_are_accepted_and_round_trip(options):
    cfg = TrialConfig(**options)
    assert all(getattr(cfg, k) == v for k, v in options.items())
    assert TrialConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("options, field, match", [
    (dict(bn_splits=0), "bn_splits", "must be >= 1 and at most batch_size (128)"),
    (dict(bn_splits=9, batch_size=8), "bn_splits", "at most batch_size (8): every part needs an image"),
    (dict(bn_splits=2.0), "bn_splits", "must be int"),
    (dict(imagenet_decode="gpu"), "imagenet_decode", "'device', 'pil' or None"),
    (dict(imagenet_decode=True), "imagenet_decode", "must be str or None"),
])
def test_bad_imagenet_options_are_refused(options, field, match):
    with pytest.raises(ConfigError) as excinfo:
        TrialConfig(**options)
    assert str(excinfo.value).startswith(f"TrialConfig.{field}") and match in str(excinfo.value)


@pytest.mark.parametrize("name, text, expected", [
    ("bn_splits", "2", 2), ("imagenet_decode", "device", "device"), ("imagenet_decode", "none", None),
])
def test_parse_imagenet_options(name, text, expected):
    assert parse_value(name, text) == expected
