"""Tests for iterand_tune.data's readers: tiny files in the real on-disk formats read through
torchvision's dataset classes, one-line DataErrors for every failure, the download lock and timeout,
the decoded-once cache, and the fixed seed-777 splits (with the original code's numbers)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.mnist as tv_mnist
from torchvision.datasets import CIFAR10, CIFAR100, MNIST

from iterand_tune import data
from iterand_tune.data import readers
from iterand_tune.data import cache as data_cache
from iterand_tune.data import (
    DataError,
    dataset_info,
    load_cifar10,
    load_cifar100,
    load_mnist,
)

# ---------------------------------------------------------------- writers of the real formats


def write_pickle(path, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar_batch(path, images: np.ndarray, labels: list[int], label_key: str = "labels") -> None:
    """A CIFAR python batch: a pickled dict, data uint8 [N, 3072] channel-major. (The official files
    are Python-2 pickles whose keys load as str with torchvision's encoding="latin1".)"""
    write_pickle(path, {"batch_label": "test", label_key: labels, "data": images.reshape(len(labels), -1),
                        "filenames": []})


def make_cifar10(root, per_batch: int = 4, n_test: int = 3, setattr=setattr) -> tuple[np.ndarray, list[int]]:
    """Tiny CIFAR-10 files under `root`, which torchvision's CIFAR10 then takes for the official
    ones (`official`)."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-10-batches-py")
    all_x, all_y = [], []
    for k in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_cifar_batch(os.path.join(folder, f"data_batch_{k}"), x, y)
        all_x.append(x)
        all_y += y
    xt = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(os.path.join(folder, "test_batch"), xt, [9] * n_test)
    write_pickle(os.path.join(folder, "batches.meta"), {"label_names": [f"c{k}" for k in range(10)]})
    official(CIFAR10, root, setattr)
    return np.concatenate(all_x), all_y


def _md5(path) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def official(cls, root, setattr=setattr) -> None:
    """Make the tiny files under `root` torchvision's official `cls` (CIFAR10, CIFAR100, MNIST): its
    md5s become theirs, since the readers check every file against them (MNIST: the .gz files
    there are). `setattr`: monkeypatch.setattr in a test (this module restores them after each)."""
    if cls is MNIST:
        raw = os.path.join(root, "MNIST", "raw")
        setattr(cls, "resources", [(n, _md5(os.path.join(raw, n)) if os.path.isfile(os.path.join(raw, n)) else md5)
                                   for n, md5 in cls.resources])
        return
    folder = os.path.join(root, cls.base_folder)
    for attr in ("train_list", "test_list"):
        setattr(cls, attr, [[name, _md5(os.path.join(folder, name))] for name, _ in getattr(cls, attr)])
    setattr(cls, "meta", {**cls.meta, "md5": _md5(os.path.join(folder, cls.meta["filename"]))})


@pytest.fixture(autouse=True)
def _official_md5s_restored():
    """The official md5s put back after every test of this module (`official` changes them)."""
    saved = [(cls, name, getattr(cls, name)) for cls in (CIFAR10, CIFAR100)
             for name in ("train_list", "test_list", "meta")]
    saved.append((MNIST, "resources", MNIST.resources))
    yield
    for cls, name, value in saved:
        setattr(cls, name, value)


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
        # The training files packed, as a folder filled by hand with the downloads.
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.array([0, 3, 9, 1, 2], dtype=np.uint8),
        # The test files unpacked, as torchvision leaves them after extracting.
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 4], dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(os.path.join(raw, name), arr)
    official(MNIST, root)
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


def test_registry_is_the_vocabulary_one():
    from iterand_tune import vocabulary

    assert data.DATASETS is vocabulary.DATASETS and data.DatasetInfo is vocabulary.DatasetInfo
    assert (data.IMAGENET_MEAN, data.IMAGENET_STD) == (vocabulary.IMAGENET_MEAN, vocabulary.IMAGENET_STD)


# ---------------------------------------------------------------- readers


def test_cifar10_reads_real_format(tmp_path):
    x_np, y = make_cifar10(tmp_path)
    train_x, train_y, test_x, test_y = load_cifar10(tmp_path)
    assert train_x.shape == (20, 3, 32, 32) and train_x.dtype == torch.uint8 and train_x.is_contiguous()
    assert test_x.shape == (3, 3, 32, 32)
    assert train_y.dtype == torch.int64 and train_y.tolist() == y and test_y.tolist() == [9, 9, 9]
    assert torch.equal(train_x, torch.from_numpy(x_np))
    # Known pixel through the flat layout: green plane (offset 1024), row 5, column 7 of image 6.
    flat = x_np.reshape(20, 3072)
    assert train_x[6, 1, 5, 7].item() == flat[6, 1024 + 5 * 32 + 7]
    assert train_x[6, 2, 31, 0].item() == flat[6, 2048 + 31 * 32]


def make_cifar100(root, x: np.ndarray, train: list[int], test: list[int]) -> None:
    folder = os.path.join(root, "cifar-100-python")
    write_cifar_batch(os.path.join(folder, "train"), x[:len(train)], train, label_key="fine_labels")
    write_cifar_batch(os.path.join(folder, "test"), x[:len(test)], test, label_key="fine_labels")
    write_pickle(os.path.join(folder, "meta"), {"fine_label_names": [f"c{k}" for k in range(100)]})
    official(CIFAR100, root)


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    make_cifar100(tmp_path, x, [5, 99, 42], [0, 77])
    train_x, train_y, test_x, test_y = load_cifar100(tmp_path)
    assert train_x.shape == (3, 3, 32, 32) and test_x.shape == (2, 3, 32, 32)
    assert train_y.tolist() == [5, 99, 42] and test_y.tolist() == [0, 77]
    assert torch.equal(train_x, torch.from_numpy(x))


def test_mnist_reads_idx_gz_and_plain(tmp_path):
    arrays = make_mnist(tmp_path)
    train_x, train_y, test_x, test_y = load_mnist(tmp_path)
    assert train_x.shape == (5, 3, 32, 32) and test_x.shape == (2, 3, 32, 32) and train_x.dtype == torch.uint8
    assert train_y.tolist() == [0, 3, 9, 1, 2] and test_y.tolist() == [7, 4] and test_y.dtype == torch.int64
    img = torch.from_numpy(arrays["train-images-idx3-ubyte.gz"])
    assert torch.equal(train_x[:, 0, 2:30, 2:30], img)  # 28x28 centred in 32x32
    assert train_x[:, :, :2].sum() == 0 and train_x[:, :, :, 30:].sum() == 0
    assert torch.equal(train_x[:, 1], train_x[:, 0]) and torch.equal(train_x[:, 2], train_x[:, 0])
    assert torch.equal(test_x[:, 2, 2:30, 2:30], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    # The .gz files were unpacked beside themselves (torchvision reads the unpacked ones), nothing else left.
    assert sorted(os.listdir(tmp_path / "MNIST" / "raw")) == sorted(
        [n for n in arrays] + ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    )


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


@pytest.mark.parametrize("name", ["test_batch", "batches.meta"])
def test_partial_cifar_names_missing_file(tmp_path, name):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / name)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    assert name in one_line(err) and "incomplete" in str(err.value) and "--download" in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "shape", "labels", "keys"])
def test_corrupt_cifar_file_names_it_and_is_kept(tmp_path, damage):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "shape":
        write_cifar_batch(str(path), np.zeros((2, 3000), dtype=np.uint8), [0, 1])
    elif damage == "labels":
        write_cifar_batch(str(path), np.zeros((2, 3072), dtype=np.uint8), [0, 1, 2])
    else:  # bytes keys: not what torchvision's latin1 reading of the official files gives
        write_pickle(str(path), {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]})
    before = path.read_bytes()
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    msg = one_line(err)
    assert str(path) in msg and "delete it" in msg
    assert path.read_bytes() == before


def test_a_file_that_is_not_the_official_one_is_named(tmp_path):
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    write_cifar_batch(str(batch), np.zeros((4, 3072), dtype=np.uint8), [0, 1, 2, 3])  # well-formed, not official
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    msg = one_line(err)
    assert str(batch) in msg and "md5" in msg and "delete it" in msg
    make_mnist(tmp_path)
    write_idx(str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"), np.zeros((5, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte.gz" in one_line(err) and "md5" in str(err.value)


def test_mnist_bad_magic_and_length(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes((0x803).to_bytes(4, "big") + path.read_bytes()[4:])
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    assert str(path) in one_line(err) and "delete" in str(err.value)
    path.write_bytes((0x801).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    assert str(path) in one_line(err)
    write_idx(str(path), np.array([7, 4, 1], dtype=np.uint8))  # well-formed, one label too many
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    assert str(path) in one_line(err) and "does not match" in str(err.value)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_failed_download_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _offline)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", _offline)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "c", download=True)
    msg = one_line(err)
    assert CIFAR10.url in msg and str(tmp_path / "c") in msg and "name resolution" in msg
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path / "m", download=True)
    msg = one_line(err)  # torchvision's report (multi-line in some versions) on one line
    assert all(mirror in msg for mirror in MNIST.mirrors) and str(tmp_path / "m" / "MNIST" / "raw") in msg


def test_download_skipped_when_files_present(tmp_path, monkeypatch):
    make_cifar10(tmp_path)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _offline)
    train_x, *_ = load_cifar10(tmp_path, download=True)
    assert len(train_x) == 20


def _download_in_process(root: str, log: str) -> int:
    """Child process: load CIFAR-10 with a fake, slow download that logs each time it runs."""
    import tempfile
    import time

    scratch = tempfile.mkdtemp()
    make_cifar10(scratch)  # the same bytes as the fake download writes: their md5s become the official ones

    def fake_download(url, download_root, filename=None, md5=None):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the window in which a second process could start downloading
        make_cifar10(download_root)

    tv_cifar.download_and_extract_archive = fake_download
    train_x, *_ = load_cifar10(root, download=True)
    return len(train_x)


def test_concurrent_trials_on_a_node_download_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "downloads.log"
    with ctx.Pool(2) as pool:
        sizes = pool.starmap(_download_in_process, [(str(tmp_path / "data"), str(log))] * 2)
    assert sizes == [20, 20]                           # both processes got the data
    assert len(log.read_text().splitlines()) == 1      # and only one fetched it


def test_downloads_time_out_instead_of_hanging(tmp_path, monkeypatch):
    import socket

    seen = []

    def silent_network(url, download_root, filename=None, md5=None):
        seen.append(socket.getdefaulttimeout())  # what a stalled urlopen would wait for
        raise TimeoutError("timed out")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", silent_network)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path, download=True)
    assert seen == [data.DOWNLOAD_TIMEOUT_S] and 0 < data.DOWNLOAD_TIMEOUT_S <= 120
    assert "TimeoutError: timed out" in one_line(err)
    assert socket.getdefaulttimeout() == before  # restored for the rest of the process


# ---------------------------------------------------------------- the cache


def _no_torchvision(monkeypatch) -> None:
    def unavailable():
        raise AssertionError("torchvision used, not the cache")

    monkeypatch.setattr(readers, "_torchvision", unavailable)


def _same(a, b) -> bool:
    return all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_second_load_reads_the_cache(tmp_path, monkeypatch, name):
    if name == "cifar10":
        make_cifar10(tmp_path)
    elif name == "cifar100":
        make_cifar100(tmp_path, np.random.default_rng(3).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
                      [1, 2, 3, 99], [0, 5])
    else:
        make_mnist(tmp_path)
    load = {"cifar10": load_cifar10, "cifar100": load_cifar100, "mnist": load_mnist}[name]
    first = load(tmp_path)
    cache = tmp_path / "iterand_cache" / f"{name}.npz"
    assert sorted(os.listdir(cache.parent)) == [cache.name, cache.name + ".lock"]
    with np.load(cache, allow_pickle=False) as f:  # plain arrays: nothing pickled
        assert f["train_x"].dtype == np.uint8 and f["train_x"].shape[1:] == (3, 32, 32)
    with monkeypatch.context() as m:
        _no_torchvision(m)
        m.setattr(readers, "FileLock", None)  # and no lock taken
        m.setattr(data_cache, "FileLock", None)
        again = load(tmp_path)
        assert _same(first, again)
        assert all(t.is_contiguous() and t.numpy().flags.writeable for t in again)
        moved = tmp_path.rename(tmp_path.parent / (tmp_path.name + "-moved"))  # the cache moves with its folder
        assert _same(load(moved), first)


def _tampered(cache, damage: str, root) -> None:
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:1000])
    elif damage == "flipped byte":  # in the pixels: the zip's CRC catches it
        raw = bytearray(cache.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        cache.write_bytes(bytes(raw))
    elif damage == "garbage":
        cache.write_bytes(b"not a zip")
    elif damage in ("wrong shape", "label out of range", "pickled"):
        with np.load(cache, allow_pickle=False) as f:
            arrays = dict(f)
        if damage == "wrong shape":
            arrays["train_x"] = arrays["train_x"][:, :, :16]
        elif damage == "label out of range":
            arrays["train_y"] = arrays["train_y"] + 10
        else:
            arrays["train_y"] = arrays["train_y"].astype(object)
        with open(cache, "wb") as f:
            np.savez(f, **arrays)
    else:  # "stale": a source file replaced after the cache was written (now 5 images, not 4)
        x = np.full((5, 3, 32, 32), 7, dtype=np.uint8)
        write_cifar_batch(str(root / "cifar-10-batches-py" / "data_batch_2"), x, [1, 1, 1, 1, 2])
        official(CIFAR10, root)  # a new official release, say


@pytest.mark.parametrize(
    "damage", ["truncated", "flipped byte", "garbage", "wrong shape", "label out of range", "pickled", "stale"]
)
def test_damaged_or_stale_cache_is_rebuilt(tmp_path, damage):
    make_cifar10(tmp_path)
    load_cifar10(tmp_path)
    cache = tmp_path / "iterand_cache" / "cifar10.npz"
    _tampered(cache, damage, tmp_path)
    fresh = load_cifar10(tmp_path)
    if damage == "stale":
        assert len(fresh[0]) == 21 and (fresh[0][4:9] == 7).all() and fresh[1][4:9].tolist() == [1, 1, 1, 1, 2]
    else:
        expected, _ = make_cifar10(tmp_path / "again", setattr=lambda *a: None)  # the same bytes
        assert torch.equal(fresh[0], torch.from_numpy(expected))
    with pytest.MonkeyPatch.context() as m:  # rebuilt: the next load reads it
        _no_torchvision(m)
        assert _same(load_cifar10(tmp_path), fresh)
    assert sorted(os.listdir(cache.parent)) == [cache.name, cache.name + ".lock"]


def test_unwritable_cache_folder_still_loads(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "iterand_cache").write_text("a file where the folder would be")
    first = load_cifar10(tmp_path)
    assert _same(first, load_cifar10(tmp_path)) and len(first[0]) == 20


def _decode_in_process(root: str, log: str) -> list[int]:
    """Child process: load CIFAR-10 with a slow decoder that logs each time it runs."""
    import time

    official(CIFAR10, root)  # in this process too
    decode = CIFAR10.__init__

    def slow(self, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the window in which the other process could decode and write too
        decode(self, *args, **kwargs)

    CIFAR10.__init__ = slow
    return [int(t.sum()) for t in load_cifar10(root)]


def test_concurrent_trials_decode_once_into_one_file(tmp_path):
    import multiprocessing

    make_cifar10(tmp_path)
    log = tmp_path / "decodes.log"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sums = pool.starmap(_decode_in_process, [(str(tmp_path), str(log))] * 2)
    assert sums[0] == sums[1]
    assert len(set(log.read_text().splitlines())) == 1  # one process decoded (train and test split)
    cache = tmp_path / "iterand_cache" / "cifar10.npz"
    assert sorted(os.listdir(cache.parent)) == [cache.name, cache.name + ".lock"]  # no temporary files left
    with pytest.MonkeyPatch.context() as m:
        _no_torchvision(m)
        assert [int(t.sum()) for t in load_cifar10(tmp_path)] == sums[0]


# ---------------------------------------------------------------- sklearn digits


def test_digits_are_sklearns_read_without_importing_sklearn(monkeypatch):
    """The CSV inside scikit-learn's package, parsed as sklearn.datasets.load_digits parses it
    (the same values, dtypes and order), without importing sklearn.datasets (1.5 s a trial)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # importing it now fails
    images, target = readers._digits_arrays()
    assert images.dtype == bunch.images.dtype and target.dtype == bunch.target.dtype
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)

