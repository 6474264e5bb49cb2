"""Tests for iterand_tune.data's loaders: DeviceLoader batches and order, ImageNet folders (hold-out
size and place, per-epoch order that survives a restart), make_loaders and its split cache."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from iterand_tune import data
from iterand_tune.data import AugmentSpec, DataError, DeviceLoader, make_loaders
from iterand_tune.data import loaders as loaders_module
from test_data_readers import make_cifar10, one_line

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- in-memory datasets


def _labelled(n=37):
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    return x, torch.arange(n)


def test_device_loader_shuffled_epoch():
    x, y = _labelled()
    g = torch.Generator().manual_seed(0)
    loader = DeviceLoader(
        x, y, 8, device="cpu", mean=MEAN, std=STD, shuffle=True, augment=AugmentSpec(pad=4), generator=g, out_size=32
    )
    assert len(loader) == 5
    state = g.get_state()
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [8, 8, 8, 8, 5]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(37)) and seen.tolist() != list(range(37))
    assert all(b[0].shape == (len(b[1]), 3, 32, 32) and b[0].dtype == torch.float32 for b in batches)
    g.set_state(state)
    again = list(loader)
    assert torch.equal(torch.cat([b[1] for b in again]), seen)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    second = torch.cat([b[1] for b in loader])
    assert not torch.equal(second, seen)  # the generator moved on: a new order next epoch


def test_device_loader_eval_normalises_known_pixel():
    x, y = _labelled(10)
    x[7, 2, 3, 4] = 200
    loader = DeviceLoader(
        x, y, 4, device="cpu", mean=MEAN, std=STD, shuffle=False, augment=None, generator=None, out_size=32
    )
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    xb, yb = batches[1]
    assert yb[3] == 7
    assert xb[3, 2, 3, 4].item() == pytest.approx((200 / 255 - 0.406) / 0.225, abs=1e-5)
    assert loader.x.dtype == torch.uint8


def test_device_loader_set_epoch_leaves_its_generator_alone():
    x, y = _labelled()
    g = torch.Generator().manual_seed(0)
    loader = DeviceLoader(
        x, y, 8, device="cpu", mean=MEAN, std=STD, shuffle=True, augment=None, generator=g, out_size=32
    )
    state = g.get_state()
    loader.set_epoch(5)  # its generator is checkpointed by the Trainer: nothing to re-seed
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------- ImageNet folders


def make_image_folder(root, train_per_class: int = 6, val_per_class: int = 2) -> None:
    """root/{train,val}/<class>/*.png; every image one flat grey level of its own, so that it can be
    recognised after any crop, resize and flip (it stays flat)."""
    level = 10
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for cls in ("n01", "n02"):
            os.makedirs(root / split / cls)
            for k in range(count):
                Image.fromarray(np.full((8, 8, 3), level, dtype=np.uint8)).save(root / split / cls / f"img{k}.png")
                level += 9


def test_imagenet_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("n01", "n02"):
            os.makedirs(tmp_path / split / cls)
            for k in range(count):
                arr = rng.integers(0, 256, size=(40 + k, 30, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"img{k}.png")
    loaders = data.imagenet_loaders(tmp_path, batch_size=4, batch_size_eval=3, num_workers=0, device="cpu")
    assert loaders.info.num_classes == 2 and loaders.info.image_size == 224
    assert len(loaders.train.loader.dataset) == 11 and len(loaders.val.loader.dataset) == 1
    assert len(loaders.test.loader.dataset) == 4
    assert (len(loaders.train), len(loaders.val), len(loaders.test)) == (3, 1, 2)
    xb, yb = next(iter(loaders.train))
    assert xb.shape == (4, 3, 224, 224) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    xt, yt = next(iter(loaders.test))
    assert xt.shape == (3, 3, 224, 224) and yt.tolist() == [0, 0, 1]
    held = set(loaders.val.loader.dataset.indices)
    assert held.isdisjoint(loaders.train.loader.dataset.indices)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(777)).tolist()
    assert loaders.train.loader.dataset.indices == perm[:11] and held == {perm[11]}
    # As the original: the held-out image follows the truncated training part.
    small = data.imagenet_loaders(
        tmp_path, batch_size=4, batch_size_eval=3, num_workers=0, device="cpu", max_train_dataset_size=5
    )
    assert small.train.loader.dataset.indices == perm[:5] and small.val.loader.dataset.indices == perm[5:6]
    with pytest.raises(DataError) as err:
        data.imagenet_loaders(tmp_path / "none", batch_size=4, batch_size_eval=3, num_workers=0, device="cpu")
    assert str(tmp_path / "none") in one_line(err)
    os.makedirs(tmp_path / "val" / "n03")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "val" / "n03" / "img0.png")
    with pytest.raises(DataError) as err:
        data.imagenet_loaders(tmp_path, batch_size=4, batch_size_eval=3, num_workers=0, device="cpu")
    assert "class folders" in one_line(err)


def _epoch_order(loader, epoch: int) -> list[float]:
    """Epoch `epoch`'s training order, as the flat grey level of each image."""
    loader.set_epoch(epoch)
    return [round(v, 4) for xb, _ in loader for v in xb[:, 0, 0, 0].tolist()]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_imagenet_epoch_order_survives_a_restart(tmp_path, num_workers):
    make_image_folder(tmp_path)
    kw = dict(batch_size=4, batch_size_eval=4, num_workers=num_workers, device="cpu")
    running = data.imagenet_loaders(tmp_path, seed=5, **kw).train
    orders = [_epoch_order(running, e) for e in range(4)]
    assert len(set(orders[0])) == 11  # every training image once, each recognisable
    assert sorted(orders[1]) == sorted(orders[0]) and orders[1] != orders[0]
    restarted = data.imagenet_loaders(tmp_path, seed=5, **kw).train  # a fresh process resuming at epoch 3
    assert _epoch_order(restarted, 3) == orders[3]
    other_seed = data.imagenet_loaders(tmp_path, seed=6, **kw).train
    assert _epoch_order(other_seed, 0) != orders[0]
    # make_loaders hands the trial's seed over.
    cfg = _cfg(dataset="imagenet", dataset_dir=str(tmp_path), seed=5, batch_size=4, batch_size_eval=4,
               num_workers=num_workers)
    trial = make_loaders(cfg, torch.device("cpu"), torch.Generator())
    assert trial.train.seed == 5 and _epoch_order(trial.train, 3) == orders[3]


# ---------------------------------------------------------------- make_loaders


def _cfg(**kw):
    base = dict(
        dataset="digits", dataset_dir="unused", dataset_download=False, max_train_dataset_size=None,
        train_augmentation=True, padding_before_crop=True, batch_size=64, batch_size_eval=100, num_workers=0,
        seed=0,
    )  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def test_make_loaders_digits():
    g = torch.Generator().manual_seed(0)
    loaders = make_loaders(_cfg(), torch.device("cpu"), g)
    assert loaders.info.num_classes == 10
    assert (len(loaders.train), len(loaders.val), len(loaders.test)) == (20, 2, 4)
    assert loaders.train.augment == AugmentSpec(pad=2, scale=(0.5, 1.0), hflip=False)
    assert loaders.val.augment is None and not loaders.val.shuffle and loaders.train.shuffle
    xb, yb = next(iter(loaders.train))
    assert xb.shape == (64, 3, 32, 32) and yb.shape == (64,)
    small = make_loaders(_cfg(max_train_dataset_size=100, train_augmentation=False), torch.device("cpu"), g)
    assert (len(small.train), len(small.val)) == (2, 2) and small.train.augment is None
    assert torch.equal(small.val.x, loaders.val.x)
    with pytest.raises(DataError):
        make_loaders(_cfg(dataset="svhn"), torch.device("cpu"), g)


def test_make_loaders_caches_splits(tmp_path, monkeypatch):
    make_cifar10(tmp_path, per_batch=8)
    loaders_module._cached_splits.cache_clear()
    calls = []
    real = loaders_module.load_splits
    monkeypatch.setattr(
        loaders_module, "load_splits", lambda *a, **k: calls.append(a) or real(*a, **{**k, "verify": False})
    )
    try:
        cfg = _cfg(dataset="cifar10", dataset_dir=str(tmp_path), batch_size=8, batch_size_eval=4)
        first = make_loaders(cfg, torch.device("cpu"), torch.Generator())
        second = make_loaders(cfg, torch.device("cpu"), torch.Generator())
        assert len(calls) == 1 and len(first.train) == 5 and len(second.val) == 1
        assert first.train.augment == AugmentSpec(pad=4)
        same_folder = _cfg(dataset="cifar10", dataset_dir=str(tmp_path / "." / ""), batch_size=8, batch_size_eval=4)
        make_loaders(same_folder, torch.device("cpu"), torch.Generator())
        assert len(calls) == 1  # the key is the resolved folder
        make_loaders(_cfg(dataset="cifar10", dataset_dir=str(tmp_path), max_train_dataset_size=4),
                     torch.device("cpu"), torch.Generator())
        assert len(calls) == 2 and loaders_module._cached_splits.cache_info().maxsize == 4
    finally:
        loaders_module._cached_splits.cache_clear()  # its entries skipped the md5 checks


def test_prepare_dataset(tmp_path):
    data.prepare_dataset("digits", tmp_path / "none", download=False)  # made in memory: nothing to check
    with pytest.raises(DataError) as err:
        data.prepare_dataset("imagenet", tmp_path / "none", download=True)
    assert "cannot be downloaded" in one_line(err)
    with pytest.raises(DataError) as err:
        data.prepare_dataset("cifar10", tmp_path / "none", download=False)
    assert "--download" in one_line(err)
