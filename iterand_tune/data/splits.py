"""The fixed splits of every in-memory dataset, cut as the original code cuts them: one seed-777
permutation of the training set, validation right after the (possibly truncated) training part;
digits' and synthetic CIFAR-10's own split sizes; ImageNet's 1% held out. load_splits reads a
dataset (readers.py) and cuts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..vocabulary import DATASETS, DatasetInfo
from .readers import Arrays, DataError, dataset_info, digits_images, load_cifar10, load_cifar100, load_mnist

SPLIT_SEED = 777
DIGITS_SPLIT = (1257, 180, 360)  # train / val / test of one seeded permutation of sklearn's 1,797 digits
SYNTHETIC_SPLIT = (45000, 5000, 10000)  # CIFAR-10's sizes after the paper's 45,000 / 5,000 split
IMAGENET_VAL_FRACTION = 0.01


@dataclass
class TensorSplits:
    """An in-memory dataset: images uint8 [N, 3, H, W], labels int64 [N], on CPU."""

    info: DatasetInfo
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor


def _check_max_train(max_train: int | None) -> None:
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train_dataset_size must be a positive integer, got {max_train}")


def split_indices(n: int, n_val: int, max_train: int | None = None, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Indices (train, val) of a seeded permutation `perm` of range(n): train perm[:k], val the n_val
    indices right after it, k = n - n_val or max_train if smaller. As the original code, validation moves
    with a truncated training set (50,000 images, max_train 1,000: train perm[:1000], val perm[1000:6000])."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep = n - n_val if max_train is None else min(n - n_val, max_train)
    return perm[:keep], perm[keep : keep + n_val]


def split_train_val(
    n: int, val_fraction: float = 0.1, max_train: int | None = None, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """split_indices with round(n * val_fraction) validation indices (CIFAR-10: 45,000 / 5,000)."""
    _check_max_train(max_train)
    return split_indices(n, round(n * val_fraction), max_train, seed)


def imagenet_val_size(n: int) -> int:
    """Training images held out for validation out of n: int(0.01 * n) as the original (12,811 of
    ImageNet's 1,281,167), and at least one."""
    return max(1, int(IMAGENET_VAL_FRACTION * n))


def load_digits() -> Arrays:
    """sklearn's 1,797 digits as 32x32 uint8 RGB (readers.digits_images), split by a seed-777
    permutation: (train_x, train_y, test_x, test_y), train the first 1,257 + 180 images of the
    permutation (load_splits takes the last 180 as validation, in this order), test the last 360."""
    x, y = digits_images()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = perm[: DIGITS_SPLIT[0] + DIGITS_SPLIT[1]], perm[DIGITS_SPLIT[0] + DIGITS_SPLIT[1] :]
    return x[train], y[train], x[test], y[test]


def load_synthetic(max_train_dataset_size: int | None = None) -> TensorSplits:
    """synthetic_cifar10: uniform random uint8 [N, 3, 32, 32] images with uniform random labels 0..9,
    SYNTHETIC_SPLIT images per split, each split from its own fixed seed (the same on every machine), so
    that `max_train_dataset_size` makes fewer training images and leaves validation and test alone."""
    _check_max_train(max_train_dataset_size)
    n_train, n_val, n_test = SYNTHETIC_SPLIT
    n_train = min(n_train, max_train_dataset_size or n_train)
    parts: list[Tensor] = []
    for part, n in enumerate((n_train, n_val, n_test)):
        rng = np.random.default_rng([SPLIT_SEED, part])
        parts.append(torch.from_numpy(rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)))
        parts.append(torch.from_numpy(rng.integers(0, 10, size=n, dtype=np.int64)))
    return TensorSplits(DATASETS["synthetic_cifar10"], *parts)


def load_splits(
    name: str,
    root: str | os.PathLike,
    *,
    download: bool = False,
    max_train_dataset_size: int | None = None,
) -> TensorSplits:
    """Read an in-memory dataset (cifar10, cifar100, mnist, digits, synthetic_cifar10) and cut its
    fixed train/val/test splits."""
    info, max_train = dataset_info(name), max_train_dataset_size
    if name == "synthetic_cifar10":
        return load_synthetic(max_train)
    if name == "digits":
        _check_max_train(max_train)
        train_x, train_y, test_x, test_y = load_digits()
        n = DIGITS_SPLIT[0]
        k = min(n, max_train or n)
        return TensorSplits(info, train_x[:k], train_y[:k], train_x[n:], train_y[n:], test_x, test_y)
    readers = {"cifar10": load_cifar10, "cifar100": load_cifar100, "mnist": load_mnist}
    if name not in readers:
        raise DataError(f"dataset {name!r} is read from an image folder, not into memory: use imagenet_loaders")
    train_x, train_y, test_x, test_y = readers[name](root, download=download)
    tr, va = split_train_val(len(train_y), 0.1, max_train, SPLIT_SEED)
    return TensorSplits(info, train_x[tr], train_y[tr], train_x[va], train_y[va], test_x, test_y)
