"""Tests for iterand_tune.search_space: the domains experiment files write search spaces with,
their bounds, clipping and descriptions, `cast` to a TrialConfig field's type, the check that
every value a domain allows makes a valid trial, and that none of it needs Ray."""
from __future__ import annotations

import subprocess
import sys

import pytest

from iterand_tune.experiments import Experiment, ExperimentError
from iterand_tune.search_space import Choice, LogUniform, QUniform, Uniform, cast, check_space

from helpers import DIGITS

GRID = dict(model=["conv6x0.25"], seed=[1, 2])


@pytest.mark.slow  # a subprocess importing torch: a few seconds
def test_domains_and_experiment_files_load_without_ray():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['hyperopt'] = None\n"
            "import iterand_tune.search_space, iterand_tune.experiments\n"
            "from iterand_tune.experiments import load\n"
            "print(len(load('experiments/quickstart.py')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


@pytest.mark.parametrize("search, message", [
    (dict(seed=Choice([1, 2])), "'seed' is a grid axis"),
    (dict(model=Choice(["conv6x0.5"])), "'model' is a grid axis"),
    (dict(lerning_rate=LogUniform(0.1, 1)), "unknown TrialConfig option 'lerning_rate'"),
    (dict(lr=0.1), "must be a domain of iterand_tune.search_space"),
    (dict(conv_sparsity=Uniform(0.5, 1.5)), "search['conv_sparsity'] allows 1.5"),
])
def test_bad_search_spaces_are_refused(search, message):
    with pytest.raises(ExperimentError) as err:
        Experiment("x", DIGITS, GRID, search=search)
    assert message in str(err.value) and str(err.value).startswith("x: ")


def test_the_seed_is_not_searched():
    with pytest.raises(ExperimentError, match="the seed is not searched"):
        check_space("x", DIGITS, {}, dict(seed=Choice([1, 2])))


def test_a_good_search_space_is_kept():
    space = dict(lr=LogUniform(0.01, 1.0), rerand_freq=QUniform(5, 40, 5), conv_sparsity=Uniform(0.3, 0.7),
                 weight_decay=Choice([1e-4, 5e-4]))
    assert Experiment("x", DIGITS, GRID, search=space).search == space


@pytest.mark.parametrize("make", [
    lambda: LogUniform(0, 1), lambda: LogUniform(1, 0.5), lambda: LogUniform(0.1, float("inf")),
    lambda: Uniform(1, 1), lambda: Uniform("a", 2), lambda: QUniform(5, 40, 4), lambda: QUniform(5, 40, 0),
    lambda: QUniform(5.0, 40), lambda: QUniform(40, 5), lambda: Choice([]), lambda: Choice(3),
])
def test_domains_check_their_bounds(make):
    with pytest.raises(ExperimentError):
        make()


def test_clip_puts_a_value_back_inside_the_domain():
    assert QUniform(5, 40, 5).clip(23.2) == 25 and QUniform(5, 40, 5).clip(99) == 40
    assert QUniform(5, 40, 5).clip(-3) == 5 and isinstance(QUniform(5, 40, 5).clip(23.2), int)
    assert LogUniform(0.01, 1).clip(2.0) == 1 and LogUniform(0.01, 1).clip(0.001) == 0.01
    assert Uniform(0.3, 0.7).clip(0.5) == 0.5
    assert Choice([1, 2]).clip(2) == 2


def test_examples_and_descriptions():
    assert LogUniform(1e-3, 1).examples() == [1e-3, 1] and QUniform(5, 40, 5).examples() == [5, 40]
    assert Choice([0.1, "x"]).values == (0.1, "x")
    assert LogUniform(1e-3, 1).describe() == "log-uniform(0.001, 1)"
    assert Uniform(0.3, 0.7).describe() == "uniform(0.3, 0.7)"
    assert QUniform(5, 40, 5).describe() == "integers 5..40 step 5"
    assert QUniform(1, 4).describe() == "integers 1..4"
    assert Choice([0.1, "x"]).describe() == "one of 0.1, 'x'"


@pytest.mark.parametrize("key, value, expected", [
    ("rerand_freq", 12.7, 13), ("epochs", 3.0, 3), ("lr", 1, 1.0), ("init_mode", "x", "x"),
    ("rerand_lambda", 0.25, 0.25),
])
def test_cast_to_the_fields_type(key, value, expected):
    got = cast(key, value)
    assert got == expected and type(got) is type(expected)


def test_to_tune_builds_ray_tune_domains():
    pytest.importorskip("ray")
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(LogUniform(0.01, 1).to_tune(), Float)
    assert isinstance(Uniform(0.3, 0.7).to_tune(), Float)
    assert isinstance(QUniform(5, 40, 5).to_tune(), Integer)
    assert isinstance(Choice([1, 2]).to_tune(), Categorical)
