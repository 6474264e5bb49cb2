"""Tests for iterand_tune.data: on-disk readers (tiny files in the real formats), fixed splits,
batched augmentation against torchvision, and the loaders."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets import CIFAR10, MNIST
from torchvision.transforms import RandomResizedCrop

from iterand_tune import data
from iterand_tune.data import (
    AugmentSpec,
    DataError,
    DeviceLoader,
    augment_batch,
    dataset_info,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_mnist,
    load_splits,
    make_loaders,
    normalize,
    resized_crop_flip,
    sample_crop_params,
    sample_flips,
    split_train_val,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- writers of the real formats


def write_cifar_batch(path, images: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> None:
    """A CIFAR python batch: a pickled dict with bytes keys, data uint8 [N, 3072] channel-major."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    d = {b"batch_label": b"test", label_key: labels, b"data": images.reshape(len(labels), -1), b"filenames": []}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def make_cifar10(root, per_batch: int = 4, n_test: int = 3) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    all_x, all_y = [], []
    for k in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_cifar_batch(os.path.join(root, "cifar-10-batches-py", f"data_batch_{k}"), x, y)
        all_x.append(x)
        all_y += y
    xt = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(os.path.join(root, "cifar-10-batches-py", "test_batch"), xt, [9] * n_test)
    return np.concatenate(all_x), all_y


def write_idx(path, array: np.ndarray) -> None:
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def make_mnist(root) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    raw = os.path.join(root, "MNIST", "raw")
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.array([0, 3, 9, 1, 2], dtype=np.uint8),
        # The test files unpacked, as torchvision leaves them after extracting.
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 4], dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(os.path.join(raw, name), arr)
    return arrays


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- dataset table


def test_dataset_info_and_unknown_name():
    assert dataset_info("cifar100").num_classes == 100
    assert dataset_info("imagenet").image_size == 224
    with pytest.raises(DataError) as err:
        dataset_info("cifar11")
    msg = one_line(err)
    assert "cifar11" in msg and all(n in msg for n in ("cifar10", "cifar100", "mnist", "digits", "imagenet"))


# ---------------------------------------------------------------- readers


def test_cifar10_reads_real_format(tmp_path):
    x_np, y = make_cifar10(tmp_path)
    train_x, train_y, test_x, test_y = load_cifar10(tmp_path, verify=False)
    assert train_x.shape == (20, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (3, 3, 32, 32)
    assert train_y.dtype == torch.int64 and train_y.tolist() == y and test_y.tolist() == [9, 9, 9]
    assert torch.equal(train_x, torch.from_numpy(x_np))
    # Known pixel through the flat layout: green plane (offset 1024), row 5, column 7 of image 6.
    flat = x_np.reshape(20, 3072)
    assert train_x[6, 1, 5, 7].item() == flat[6, 1024 + 5 * 32 + 7]
    assert train_x[6, 2, 31, 0].item() == flat[6, 2048 + 31 * 32]


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    folder = tmp_path / "cifar-100-python"
    write_cifar_batch(str(folder / "train"), x, [5, 99, 42], label_key=b"fine_labels")
    write_cifar_batch(str(folder / "test"), x[:2], [0, 77], label_key=b"fine_labels")
    train_x, train_y, test_x, test_y = load_cifar100(tmp_path, verify=False)
    assert train_x.shape == (3, 3, 32, 32) and test_x.shape == (2, 3, 32, 32)
    assert train_y.tolist() == [5, 99, 42] and test_y.tolist() == [0, 77]
    assert torch.equal(train_x, torch.from_numpy(x))


def test_mnist_reads_idx_gz_and_plain(tmp_path):
    arrays = make_mnist(tmp_path)
    train_x, train_y, test_x, test_y = load_mnist(tmp_path, verify=False)
    assert train_x.shape == (5, 3, 32, 32) and test_x.shape == (2, 3, 32, 32) and train_x.dtype == torch.uint8
    assert train_y.tolist() == [0, 3, 9, 1, 2] and test_y.tolist() == [7, 4] and test_y.dtype == torch.int64
    img = torch.from_numpy(arrays["train-images-idx3-ubyte.gz"])
    assert torch.equal(train_x[:, 0, 2:30, 2:30], img)  # 28x28 centred in 32x32
    assert train_x[:, :, :2].sum() == 0 and train_x[:, :, :, 30:].sum() == 0
    assert torch.equal(train_x[:, 1], train_x[:, 0]) and torch.equal(train_x[:, 2], train_x[:, 0])
    assert torch.equal(test_x[:, 2, 2:30, 2:30], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))


@pytest.mark.parametrize(
    "loader, expect",
    [(load_cifar10, "cifar-10-batches-py"), (load_cifar100, "cifar-100-python"), (load_mnist, "MNIST/raw")],
)
def test_missing_dataset_is_one_line_error(tmp_path, loader, expect):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        loader(root)
    msg = one_line(err)
    assert str(root.resolve()) in msg and "--download" in msg and expect in msg
    assert not root.exists()  # reading never creates the folder


def test_partial_cifar_names_missing_file(tmp_path):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path, verify=False)
    assert "test_batch" in one_line(err) and "--download" in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "shape"])
def test_corrupt_cifar_file_names_it_and_is_kept(tmp_path, damage):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    else:
        write_cifar_batch(str(path), np.zeros((2, 3000), dtype=np.uint8), [0, 1])
    before = path.read_bytes()
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path, verify=False)
    msg = one_line(err)
    assert str(path) in msg and "delete it" in msg
    assert path.read_bytes() == before


def test_md5_mismatch_with_verify(tmp_path):
    make_cifar10(tmp_path)  # tiny files cannot match the official md5s
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path, verify=True)
    msg = one_line(err)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg and "md5" in msg
    make_mnist(tmp_path)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, verify=True)
    assert "train-images-idx3-ubyte.gz" in one_line(err)


def test_mnist_bad_magic_and_length(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes((0x803).to_bytes(4, "big") + path.read_bytes()[4:])
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, verify=False)
    assert str(path) in one_line(err) and "magic" in str(err.value)
    path.write_bytes((0x801).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, verify=False)
    assert str(path) in one_line(err)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_failed_download_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "download_and_extract_archive", _offline)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "c", download=True)
    msg = one_line(err)
    assert CIFAR10.url in msg and str(tmp_path / "c") in msg
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path / "m", download=True)
    msg = one_line(err)
    assert MNIST.mirrors[0] in msg and str(tmp_path / "m" / "MNIST" / "raw") in msg


def test_download_skipped_when_files_present(tmp_path, monkeypatch):
    make_cifar10(tmp_path)
    monkeypatch.setattr(data, "download_and_extract_archive", _offline)
    train_x, *_ = load_cifar10(tmp_path, download=True, verify=False)
    assert len(train_x) == 20


def _download_in_process(root: str, log: str) -> int:
    """Child process: load CIFAR-10 with a fake, slow download that logs each time it runs."""
    import time

    def fake_download(url, download_root, filename, md5):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the window in which a second process could start downloading
        make_cifar10(download_root)

    data.download_and_extract_archive = fake_download
    train_x, *_ = load_cifar10(root, download=True, verify=False)
    return len(train_x)


def test_concurrent_trials_on_a_node_download_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "downloads.log"
    with ctx.Pool(3) as pool:
        sizes = pool.starmap(_download_in_process, [(str(tmp_path / "data"), str(log))] * 3)
    assert sizes == [20, 20, 20]                       # every process got the data
    assert len(log.read_text().splitlines()) == 1      # and only one fetched it


# ---------------------------------------------------------------- splits


def test_split_train_val_cifar10():
    train, val = split_train_val(50_000)
    assert len(train) == 45_000 and len(val) == 5_000
    assert len(set(train.tolist()) | set(val.tolist())) == 50_000
    perm = torch.randperm(50_000, generator=torch.Generator().manual_seed(777))
    assert torch.equal(train, perm[:45_000]) and torch.equal(val, perm[45_000:])
    train2, val2 = split_train_val(50_000)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    small, val3 = split_train_val(50_000, max_train=1000)
    assert torch.equal(small, perm[:1000]) and torch.equal(val3, val)


def test_load_splits_cifar10(tmp_path):
    make_cifar10(tmp_path, per_batch=8)  # 40 images -> 36 train, 4 val
    s = load_splits("cifar10", tmp_path, verify=False, max_train_dataset_size=10)
    full_x, full_y, *_ = load_cifar10(tmp_path, verify=False)
    train, val = split_train_val(40, max_train=10)
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


# ---------------------------------------------------------------- augmentation


def _batch(b=8, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_augment_shape_range_and_determinism():
    x = _batch()
    spec = AugmentSpec(pad=4)
    a = augment_batch(x, spec, torch.Generator().manual_seed(1), 32)
    b = augment_batch(x, spec, torch.Generator().manual_seed(1), 32)
    c = augment_batch(x, spec, torch.Generator().manual_seed(2), 32)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_augment_identity_and_padding_frame():
    x = _batch()
    ident = AugmentSpec(pad=0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    out = augment_batch(x, ident, torch.Generator().manual_seed(0), 32)
    assert (out - x.float() / 255).abs().max() <= 1e-6
    # The whole padded 40x40 frame at 40x40: the zero border must appear exactly.
    padded = augment_batch(x, AugmentSpec(pad=4, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False), None, 40)
    assert (padded - TF.pad(x.float() / 255, [4])).abs().max() <= 1e-6
    # With flips, each image is either itself or its mirror, as the flip draws say.
    g = torch.Generator().manual_seed(0)  # a seed whose 8 draws mix flipped and unflipped
    state = g.get_state()
    out = augment_batch(x, AugmentSpec(pad=0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True), g, 32)
    g.set_state(state)
    sample_crop_params(8, 32, 32, ident, g, "cpu")
    flips = sample_flips(8, g, "cpu")
    expect = torch.where(flips[:, None, None, None], x.flip(-1), x).float() / 255
    assert 0 < flips.sum() < 8 and (out - expect).abs().max() <= 1e-6


def test_augment_matches_torchvision_pad_crop_resize_flip():
    x = _batch(b=32)
    spec = AugmentSpec(pad=4)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = augment_batch(x, spec, g, 32)
    g.set_state(state)
    top, left, h, w = sample_crop_params(32, 32, 32, spec, g, "cpu")
    flips = sample_flips(32, g, "cpu")
    padded = TF.pad(x.float() / 255, [4])
    for i in range(32):
        ref = TF.resized_crop(padded[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], antialias=False)
        if flips[i]:
            ref = TF.hflip(ref)
        assert (out[i] - ref).abs().max() < 1e-4, i
    direct = resized_crop_flip(x, top, left, h, w, flips, 4, 32)
    assert torch.equal(direct, out)


def _stats(h: torch.Tensor, w: torch.Tensor, area: int) -> torch.Tensor:
    frac = (h * w).double() / area
    logr = torch.log(w.double() / h.double())
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    return torch.cat([frac.mean()[None], torch.quantile(frac, q), logr.mean()[None], torch.quantile(logr, q)])


@pytest.mark.parametrize("spec", [AugmentSpec(pad=4), AugmentSpec(pad=2, scale=(0.5, 1.0), hflip=False)])
def test_crop_distribution_matches_torchvision(spec):
    n, side = 20_000, 32 + 2 * spec.pad
    top, left, h, w = sample_crop_params(n, 32, 32, spec, torch.Generator().manual_seed(11), "cpu")
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= side).all() and (left + w <= side).all()
    img = torch.empty(3, side, side)
    with torch.random.fork_rng():
        torch.manual_seed(12)
        ref = torch.tensor([RandomResizedCrop.get_params(img, list(spec.scale), list(spec.ratio)) for _ in range(n)])
    ours, theirs = _stats(h, w, side * side), _stats(ref[:, 2], ref[:, 3], side * side)
    assert (ours - theirs).abs().max() < 0.03, (ours, theirs)
    # Position given size: top / (side - h) is uniform, mean 1/2 where there is room.
    room = h < side
    rel = top[room].double() / (side - h[room]).double()
    ref_room = ref[:, 2] < side
    ref_rel = ref[ref_room, 0].double() / (side - ref[ref_room, 2]).double()
    assert abs(rel.mean() - ref_rel.mean()) < 0.02


def test_crop_fallback_is_torchvision_central_crop():
    # Target areas larger than the image never fit: every image takes the central fallback.
    spec = AugmentSpec(pad=0, scale=(2.0, 3.0))
    top, left, h, w = sample_crop_params(16, 20, 40, spec, torch.Generator().manual_seed(0), "cpu")
    expect = RandomResizedCrop.get_params(torch.empty(3, 20, 40), [2.0, 3.0], [3 / 4, 4 / 3])
    assert expect == (0, 6, 20, 27)
    for got in zip(top.tolist(), left.tolist(), h.tolist(), w.tolist()):
        assert got == expect


def test_flips_about_half():
    flips = sample_flips(20_000, torch.Generator().manual_seed(4), "cpu")
    assert abs(int(flips.sum()) - 10_000) < 5 * math.sqrt(5_000)


def test_normalize_values():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    out = normalize(x, MEAN, STD).flatten()
    expect = torch.tensor([(0.0 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (1.0 - 0.406) / 0.225])
    assert torch.allclose(out, expect, atol=1e-6)


# ---------------------------------------------------------------- loaders


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
    small = data.imagenet_loaders(
        tmp_path, batch_size=4, batch_size_eval=3, num_workers=0, device="cpu", max_train_dataset_size=5
    )
    assert len(small.train.loader.dataset) == 5 and set(small.val.loader.dataset.indices) == held
    with pytest.raises(DataError) as err:
        data.imagenet_loaders(tmp_path / "none", batch_size=4, batch_size_eval=3, num_workers=0, device="cpu")
    assert str(tmp_path / "none") in one_line(err)


def _cfg(**kw):
    base = dict(
        dataset="digits", dataset_dir="unused", dataset_download=False, max_train_dataset_size=None,
        train_augmentation=True, padding_before_crop=True, batch_size=64, batch_size_eval=100, num_workers=0,
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
    monkeypatch.setattr(data, "_cache", type(data._cache)())
    calls = []
    real = data.load_splits
    monkeypatch.setattr(data, "load_splits", lambda *a, **k: calls.append(a) or real(*a, **{**k, "verify": False}))
    cfg = _cfg(dataset="cifar10", dataset_dir=str(tmp_path), batch_size=8, batch_size_eval=4)
    first = make_loaders(cfg, torch.device("cpu"), torch.Generator())
    second = make_loaders(cfg, torch.device("cpu"), torch.Generator())
    assert len(calls) == 1 and len(first.train) == 5 and len(second.val) == 1
    assert first.train.augment == AugmentSpec(pad=4)


def test_downloads_time_out_instead_of_hanging(tmp_path, monkeypatch):
    import socket

    seen = []

    def silent_network(url, download_root, filename, md5):
        seen.append(socket.getdefaulttimeout())  # what a stalled urlopen would wait for
        raise TimeoutError("timed out")

    monkeypatch.setattr(data, "download_and_extract_archive", silent_network)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path, download=True)
    assert seen == [data.DOWNLOAD_TIMEOUT_S] and 0 < data.DOWNLOAD_TIMEOUT_S <= 120
    assert "TimeoutError: timed out" in one_line(err)
    assert socket.getdefaulttimeout() == before  # restored for the rest of the process
