"""The fixed splits (iterand_tune.data.splits): the seed-777 permutation, validation after a truncated
training part, ImageNet's 1% held out, digits' 1,257 / 180 / 360."""

from __future__ import annotations

import pytest
import torch

from iterand_tune.data import (
    SYNTHETIC_SPLIT,
    DataError,
    imagenet_val_size,
    load_cifar10,
    load_digits,
    load_splits,
    load_synthetic,
    split_indices,
    split_train_val,
)

from test_data_readers import make_cifar10


def test_split_train_val_cifar10():
    train, val = split_train_val(50_000)
    assert len(train) == 45_000 and len(val) == 5_000
    assert len(set(train.tolist()) | set(val.tolist())) == 50_000
    perm = torch.randperm(50_000, generator=torch.Generator().manual_seed(777))
    assert torch.equal(train, perm[:45_000]) and torch.equal(val, perm[45_000:])
    train2, val2 = split_train_val(50_000)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    # As the original: validation follows the truncated training part.
    small, val3 = split_train_val(50_000, max_train=1000)
    assert torch.equal(small, perm[:1000]) and torch.equal(val3, perm[1000:6000])
    big, val4 = split_train_val(50_000, max_train=49_000)  # more than there is: the full split
    assert torch.equal(big, train) and torch.equal(val4, val)
    with pytest.raises(DataError):
        split_train_val(50_000, max_train=0)


def test_split_indices_and_imagenet_hold_out():
    assert imagenet_val_size(1_281_167) == 12_811  # int(0.01 * n), as the original (round gives 12,812)
    assert imagenet_val_size(150) == 1 and imagenet_val_size(12) == 1 and imagenet_val_size(2) == 1
    perm = torch.randperm(1_000, generator=torch.Generator().manual_seed(777))
    tr, va = split_indices(1_000, 10, max_train=100)
    assert torch.equal(tr, perm[:100]) and torch.equal(va, perm[100:110])
    tr, va = split_indices(1_000, 10)
    assert torch.equal(tr, perm[:990]) and torch.equal(va, perm[990:])


def test_load_splits_cifar10(tmp_path, monkeypatch):
    make_cifar10(tmp_path, per_batch=8, setattr=monkeypatch.setattr)  # 40 images -> 36 train, 4 val
    s = load_splits("cifar10", tmp_path, max_train_dataset_size=10)
    full_x, full_y, *_ = load_cifar10(tmp_path)
    train, val = split_train_val(40, max_train=10)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(777))
    assert torch.equal(val, perm[10:14])
    assert len(s.train_y) == 10 and len(s.val_y) == 4 and len(s.test_y) == 3
    assert torch.equal(s.train_x, full_x[train]) and torch.equal(s.val_y, full_y[val])


def test_digits():
    train_x, train_y, test_x, test_y = load_digits()
    assert train_x.shape == (1437, 3, 32, 32) and test_x.shape == (360, 3, 32, 32) and train_x.dtype == torch.uint8
    s = load_splits("digits", "unused")
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (1257, 180, 360)
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
        assert set(y.tolist()) == set(range(10))
    assert s.train_x.max() >= 250 and s.train_x.min() == 0  # scaled to the full 0..255 range
    again = load_splits("digits", "unused", max_train_dataset_size=100)
    assert torch.equal(again.train_x, s.train_x[:100]) and torch.equal(again.val_y, s.val_y)
    assert torch.equal(again.test_x, s.test_x)
    # No image appears in two splits (digits has a few duplicates, so compare through the permutation).
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(777))
    from sklearn.datasets import load_digits as sk_digits

    target = torch.from_numpy(sk_digits().target)
    assert torch.equal(s.test_y, target[perm[1437:]]) and torch.equal(s.val_y, target[perm[1257:1437]])


def test_synthetic_cifar10_is_fixed_and_cifar_shaped():
    a, b = load_synthetic(), load_synthetic(300)
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == SYNTHETIC_SPLIT == (45000, 5000, 10000)
    assert a.train_x.shape == (45000, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.train_y.dtype == torch.int64 and set(a.test_y.unique().tolist()) == set(range(10))
    assert len(b.train_y) == 300
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.test_y, b.test_y)  # same held-out sets
    assert torch.equal(load_splits("synthetic_cifar10", "/nonexistent").val_x, a.val_x)
    assert not torch.equal(a.val_x[:100], a.test_x[:100])
