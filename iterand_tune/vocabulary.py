"""The project's vocabulary, in one torch-free module: dataset registry, model names, method and
init labels, metric names and what makes a figure point. Config, models, data, the Ray Tune
layer, the search, the analysis package and the tests all speak it, so they agree by construction.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

# ------------------------------------------------------------------ datasets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: class count, side of the (square) model input, normalisation."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 32, IMAGENET_MEAN, IMAGENET_STD),
    "cifar100": DatasetInfo("cifar100", 100, 32, IMAGENET_MEAN, IMAGENET_STD),
    "mnist": DatasetInfo("mnist", 10, 32, IMAGENET_MEAN, IMAGENET_STD),
    "digits": DatasetInfo("digits", 10, 32, IMAGENET_MEAN, IMAGENET_STD),
    "imagenet": DatasetInfo("imagenet", 1000, 224, IMAGENET_MEAN, IMAGENET_STD),
    # Fixed-seed random images of CIFAR-10's shape, sizes and augmentation: for measuring speed
    # where no dataset can be fetched. Labels are random, so there is nothing to learn.
    "synthetic_cifar10": DatasetInfo("synthetic_cifar10", 10, 32, IMAGENET_MEAN, IMAGENET_STD),
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)

# ------------------------------------------------------------------ models

# Network families in the order figures show them; `<family>x<width>` names a width of one.
MODEL_FAMILIES = ("conv6", "resnet18", "resnet34", "resnet50", "resnet101")
PAPER_WIDTHS = (0.25, 0.5, 1.0, 2.0)
WIDTH_FAMILIES = ("conv6", "resnet18", "resnet34")  # the families figure 2 varies in width
_MODEL_NAME = re.compile(r"([A-Za-z]+\d*)(?:x(\d+(?:\.\d*)?|\.\d+))?")


def split_model_name(name: str) -> tuple[str, float]:
    """`conv6x0.5` -> ("conv6", 0.5); `resnet50` -> ("resnet50", 1.0), for any family name;
    (name, nan) when the name has no such shape (stored runs may hold anything)."""
    m = _MODEL_NAME.fullmatch(name or "")
    if not m:
        return name, math.nan
    return m.group(1), float(m.group(2)) if m.group(2) else 1.0


def parse_model(name: str) -> Optional[tuple[str, float]]:
    """(family, width) of a model this project builds, or None (unknown family, width <= 0)."""
    if not isinstance(name, str):
        return None
    family, width = split_model_name(name)
    if family not in MODEL_FAMILIES or not width > 0:
        return None
    return family, width


def model_names() -> list[str]:
    """The names the paper's experiments use (other widths `<family>x<w>` are accepted too)."""
    names = set(MODEL_FAMILIES)
    names.update(f"{f}x{w}" for f in WIDTH_FAMILIES for w in PAPER_WIDTHS)
    return sorted(names)


# ------------------------------------------------------------------ methods and inits

METHOD_ORDER = ("sgd", "edgepopup", "iterand")
INIT_ABBREVIATIONS = {"kaiming_uniform": "ku", "signed_constant": "sc"}


def method_of(train_mode: Any, rerand_mode: Any, rerand_lambda: Any) -> str:
    """The figure label of a trial: sgd (dense training), edgepopup (a supermask without
    effective re-randomisation: no mode, or bernoulli with r = 0) or iterand."""
    if train_mode == "normal":
        return "sgd"
    if rerand_mode is None or (rerand_mode == "bernoulli" and not rerand_lambda):
        return "edgepopup"
    return "iterand"


def init_label(init_mode: Optional[str]) -> Optional[str]:
    """`kaiming_uniform` -> ku, `signed_constant` -> sc; other modes keep their name."""
    return INIT_ABBREVIATIONS.get(init_mode, init_mode) if init_mode else init_mode


# ------------------------------------------------------------------ metrics

# Reported by every trial every epoch (name -> pandas dtype of the analysis tables); `test_acc`
# and `test_loss` only after the last epoch. Accuracies are percentages. `diverged` is true for
# the epoch whose training loss was not finite: the trial's last (it stops there, untested).
METRICS: dict[str, str] = {
    "epoch": "Int64", "train_acc": "float64", "train_loss": "float64", "val_acc": "float64",
    "val_loss": "float64", "best_val_acc": "float64", "best_epoch": "Int64", "lr": "float64",
    "iterations": "Int64", "epoch_seconds": "float64", "params_before_pruning": "Int64",
    "params_after_pruning": "Int64", "test_acc": "float64", "test_loss": "float64",
    "diverged": "boolean",
}
DIVERGED = "diverged"           # the status (and metric) of a trial whose training loss blew up
VALIDATION_METRIC = "val_acc"   # what a search optimises; the test set never informs a choice
TEST_METRIC = "test_acc"        # what a figure shows

# ------------------------------------------------------------------ figure points

# Every row of every table carries these labels of its figure point.
POINT_LABELS = ("experiment", "network", "width", "model", "method", "init")
# Config fields that never tell figure points apart: the seed (points are averaged over it),
# the data folder (differs between machines) and the model (a label already).
NOT_POINT_FIELDS = frozenset({"seed", "dataset_dir", "model"})


def labels(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's figure-point labels from its stored config (TrialConfig fields + experiment),
    without building a TrialConfig: a stored run may hold values today's validation refuses."""
    network, width = split_model_name(config.get("model", ""))
    method = method_of(config.get("train_mode", "normal"), config.get("rerand_mode"),
                       config.get("rerand_lambda", 0.1))
    return dict(experiment=config.get("experiment"), network=network, width=width,
                model=config.get("model"), method=method, init=init_label(config.get("init_mode")))


def point_fields(trials: Iterable[Mapping[str, Any]], candidates: Iterable[str]) -> list[str]:
    """The `candidates` (config fields) that tell figure points apart beyond the labels: those
    that vary inside some experiment (e.g. `rerand_lambda` in figure 1), in candidate order."""
    candidates = [c for c in candidates if c not in NOT_POINT_FIELDS and c != "experiment"]
    values: dict[tuple[Any, str], set] = {}
    for t in trials:
        for key in candidates:
            if key in t:
                values.setdefault((t.get("experiment"), key), set()).add(repr(_missing_as_none(t[key])))
    return [k for k in candidates if any(len(v) > 1 for (_, key), v in values.items() if key == k)]


def _missing_as_none(value: Any) -> Any:
    """None for every kind of missing value (None, NaN, pandas' NA), so that they group together."""
    if value is None or value.__class__.__name__ == "NAType":
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def point_rows(trials: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per figure point of `trials` (mappings holding `keys`, `status`, `seed`,
    `test_acc` and the parameter counts), points in the order of their first trial:
    the keys, `trials`, `excluded` (trials that did not finish, left out of the means),
    `test_acc_mean`, `test_acc_std` (sample std; NaN for one seed), `test_acc_count`,
    `params_after_pruning`/`params_before_pruning` (mean over the trials that report them: the
    same for every seed) and `missing` (e.g. "seed 2 running"; None when nothing is).
    The run's own summary and the analysis package both build their tables from these rows."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for t in trials:
        groups.setdefault(tuple(_missing_as_none(t.get(k)) for k in keys), []).append(t)
    rows = []
    for key, group in groups.items():
        done = [t for t in group if _missing_as_none(t.get("status")) == "finished"
                and _missing_as_none(t.get(TEST_METRIC)) is not None]
        accs = [float(t[TEST_METRIC]) for t in done]
        row: dict[str, Any] = dict(zip(keys, (group[0].get(k) for k in keys)))
        row.update(trials=len(group), excluded=len(group) - len(done),
                   test_acc_mean=statistics.fmean(accs) if accs else math.nan,
                   test_acc_std=statistics.stdev(accs) if len(accs) > 1 else math.nan,
                   test_acc_count=len(accs))
        for name in ("params_after_pruning", "params_before_pruning"):
            counts = [float(t[name]) for t in group if _missing_as_none(t.get(name)) is not None]
            row[name] = round(statistics.fmean(counts)) if counts else None
        missing = [f"{_who(t)} {_missing_as_none(t.get('status')) or 'without test accuracy'}"
                   for t in group if not any(t is d for d in done)]
        row["missing"] = "; ".join(missing) or None
        rows.append(row)
    return rows


def _who(trial: Mapping[str, Any]) -> str:
    seed = _missing_as_none(trial.get("seed"))
    return f"seed {seed}" if seed is not None else str(trial.get("trial_id", "a trial"))
