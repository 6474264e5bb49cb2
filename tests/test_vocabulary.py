"""Tests for iterand_tune.vocabulary: model names, method and init labels, the labels of a stored
config, and figure points (which fields tell them apart, and one row per point with the mean
and sample std over its finished seeds) as both the run's summary and the analysis build them."""
from __future__ import annotations

import math
import statistics

import pytest

from iterand_tune.vocabulary import (DATASETS, METRICS, MODEL_FAMILIES, NOT_POINT_FIELDS,
                                     POINT_LABELS, init_label, labels, method_of, model_names,
                                     parse_model, point_fields, point_rows, split_model_name)


# ------------------------------------------------------------------ model names

@pytest.mark.parametrize("name, split", [
    ("conv6x0.5", ("conv6", 0.5)), ("conv6x1.0", ("conv6", 1.0)), ("resnet18x2.0", ("resnet18", 2.0)),
    ("resnet50", ("resnet50", 1.0)), ("resnet34x.5", ("resnet34", 0.5)), ("conv6x2", ("conv6", 2.0)),
    ("resnet18x0", ("resnet18", 0.0)), ("vgg16", ("vgg16", 1.0)), ("mlp", ("mlp", 1.0)),
])
def test_split_model_name(name, split):
    assert split_model_name(name) == split


@pytest.mark.parametrize("name", ["conv6x", "resnet18x0.5x2", "x0.5", "conv 6", "", "6conv", None])
def test_split_model_name_of_something_else_keeps_the_name_and_no_width(name):
    got, width = split_model_name(name)
    assert got == name and math.isnan(width)


@pytest.mark.parametrize("name, parsed", [
    ("conv6x0.5", ("conv6", 0.5)), ("resnet101", ("resnet101", 1.0)), ("resnet34x0.75", ("resnet34", 0.75)),
    ("resnet18x0", None), ("vgg16", None), ("resnet50x", None), ("conv7x1.0", None), (6, None), (None, None),
])
def test_parse_model_knows_the_families_this_project_builds(name, parsed):
    assert parse_model(name) == parsed


def test_model_names_are_the_papers():
    names = model_names()
    assert names == sorted(names)
    assert {f"{f}x{w}" for f in ("conv6", "resnet18", "resnet34") for w in ("0.25", "0.5", "1.0", "2.0")} \
        <= set(names)
    assert {"resnet50", "resnet101"} <= set(names)
    assert all(parse_model(n) is not None for n in names)
    assert MODEL_FAMILIES[0] == "conv6"


def test_datasets_and_metrics():
    assert {"cifar10", "cifar100", "mnist", "digits", "imagenet", "synthetic_cifar10"} == set(DATASETS)
    assert (DATASETS["imagenet"].num_classes, DATASETS["imagenet"].image_size) == (1000, 224)
    assert DATASETS["cifar100"].num_classes == 100
    assert {"test_acc", "val_acc", "epoch", "params_after_pruning"} <= set(METRICS)


# ------------------------------------------------------------------ methods and inits

@pytest.mark.parametrize("train_mode, rerand_mode, r, method", [
    ("normal", None, 0.1, "sgd"),
    ("normal", "bernoulli", 0.1, "sgd"),       # dense training: whatever else is set
    ("score_only", None, 0.1, "edgepopup"),
    ("score_only", "bernoulli", 0.0, "edgepopup"),  # r = 0 re-draws nothing
    ("score_only", "bernoulli", None, "edgepopup"),
    ("score_only", "bernoulli", 0.1, "iterand"),
    ("score_only", "manual", 0.0, "iterand"),  # manual mixes with mu even at lambda 0
])
def test_method_of(train_mode, rerand_mode, r, method):
    assert method_of(train_mode, rerand_mode, r) == method


@pytest.mark.parametrize("mode, label", [
    ("kaiming_uniform", "ku"), ("signed_constant", "sc"), ("kaiming_normal", "kaiming_normal"),
    (None, None), ("", ""),
])
def test_init_label(mode, label):
    assert init_label(mode) == label


def test_labels_of_a_stored_config():
    config = dict(experiment="figure2_conv6_sc_iterand", model="conv6x0.5", train_mode="score_only",
                  rerand_mode="bernoulli", rerand_lambda=0.1, init_mode="signed_constant")
    assert labels(config) == dict(experiment="figure2_conv6_sc_iterand", network="conv6",
                                  width=0.5, model="conv6x0.5", method="iterand", init="sc")
    assert list(labels(config)) == list(POINT_LABELS)
    # A stored config may hold anything: labels, never an error.
    odd = labels(dict(model="vgg16x3", train_mode="score_only"))
    assert (odd["network"], odd["width"], odd["method"], odd["init"]) == ("vgg16", 3.0, "edgepopup", None)
    empty = labels({})
    assert empty["method"] == "sgd" and empty["model"] is None and math.isnan(empty["width"])


# ------------------------------------------------------------------ figure points

def trial(experiment, model, seed, status="finished", acc=None, params=None, **values):
    return dict(experiment=experiment, model=model, seed=seed, status=status, test_acc=acc,
                params_after_pruning=params, params_before_pruning=None if params is None else 2 * params,
                **values)


def test_point_fields_are_the_fields_varying_inside_an_experiment():
    trials = [trial("f1", "conv6x1.0", s, rerand_lambda=r, lr=0.1, dataset_dir=f"/d{s}")
              for r in (0.0, 0.1) for s in (1, 2)]
    # lr differs between experiments only: not a point field
    trials += [trial("f2", "conv6x1.0", 1, rerand_lambda=0.1, lr=0.3, dataset_dir="/d")]
    candidates = ["lr", "rerand_lambda", "seed", "dataset_dir", "model", "experiment"]
    assert point_fields(trials, candidates) == ["rerand_lambda"]
    assert {"seed", "dataset_dir", "model"} <= NOT_POINT_FIELDS
    # missing values of every kind count as one value (None, NaN)
    same = [trial("e", "m", 1, linear_sparsity=None), trial("e", "m", 2, linear_sparsity=math.nan)]
    assert point_fields(same, ["linear_sparsity"]) == []
    # candidate order, not trial order
    both = [trial("e", "m", 1, a=1, b=1), trial("e", "m", 2, a=2, b=2)]
    assert point_fields(both, ["b", "a"]) == ["b", "a"]


KEYS = ["experiment", "model"]


def test_point_rows_group_in_the_order_of_the_first_trial():
    trials = [trial("b", "conv6x0.5", 1, acc=80.0, params=100),
              trial("a", "conv6x0.5", 1, acc=70.0, params=100),
              trial("b", "conv6x0.5", 2, acc=84.0, params=100),
              trial("b", "conv6x0.25", 1, acc=60.0, params=25)]
    rows = point_rows(trials, KEYS)
    assert [(r["experiment"], r["model"]) for r in rows] == [
        ("b", "conv6x0.5"), ("a", "conv6x0.5"), ("b", "conv6x0.25")]
    b = rows[0]
    assert list(b) == [*KEYS, "trials", "excluded", "test_acc_mean", "test_acc_std", "test_acc_count",
                       "params_after_pruning", "params_before_pruning", "missing"]
    assert (b["trials"], b["excluded"], b["test_acc_count"], b["missing"]) == (2, 0, 2, None)
    assert b["test_acc_mean"] == pytest.approx(82.0)
    assert b["test_acc_std"] == pytest.approx(statistics.stdev([80.0, 84.0]))  # sample std
    assert (b["params_after_pruning"], b["params_before_pruning"]) == (100, 200)


def test_point_rows_with_one_seed_have_no_std_and_name_what_is_missing():
    trials = [trial("e", "m", 1, acc=90.0, params=10),
              trial("e", "m", 2, status="errored", params=10),
              trial("e", "m", 3, status="running", acc=99.0, params=10),  # not finished: not counted
              trial("e", "m", 4, status=None),
              dict(trial("e", "m", None, status="pending"), trial_id="t_00004")]
    (row,) = point_rows(trials, KEYS)
    assert (row["trials"], row["excluded"], row["test_acc_count"]) == (5, 4, 1)
    assert row["test_acc_mean"] == 90.0 and math.isnan(row["test_acc_std"])
    assert row["missing"] == ("seed 2 errored; seed 3 running; seed 4 without test accuracy; "
                              "t_00004 pending")
    # a finished trial without a test accuracy does not count either
    (row,) = point_rows([trial("e", "m", 1, acc=None)], KEYS)
    assert row["test_acc_count"] == 0 and math.isnan(row["test_acc_mean"])
    assert row["missing"] == "seed 1 finished" and row["params_after_pruning"] is None


def test_point_rows_average_parameter_counts_and_group_missing_values_together():
    trials = [trial("e", "m", 1, acc=50.0, params=100, linear_sparsity=None),
              trial("e", "m", 2, acc=52.0, params=103, linear_sparsity=math.nan),
              trial("e", "m", 3, status="running")]
    (row,) = point_rows(trials, [*KEYS, "linear_sparsity"])
    assert row["trials"] == 3 and row["linear_sparsity"] is None  # the first trial's value
    assert row["params_after_pruning"] == 102 and row["params_before_pruning"] == 203  # rounded means
    assert point_rows([], KEYS) == []
