"""Datasets read from their sources: CIFAR-10/100 and MNIST through torchvision's dataset classes as
they are, decoded once into a cache (cache.py) for every later trial; sklearn's digits; the ImageNet
folder layout. Every user-fixable problem is a one-line DataError. The splits are cut in splits.py.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import socket
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import Tensor

from ..vocabulary import DATASETS, DatasetInfo
from .cache import Arrays, cached, decoded_once, valid, write_atomically

IMAGENET_LAYOUT = "train/<class>/*.JPEG and val/<class>/*.JPEG"
DOWNLOAD_TIMEOUT_S = 60.0  # a node behind a silent firewall fails in a minute instead of hanging

_DOWNLOAD = ("pass --download (dataset_download=True) on a machine with internet, "
             "or point --data-dir at a folder that has it")
_REDOWNLOAD = "delete it and run again with --download (dataset_download=True)"


class DataError(Exception):
    """A user-fixable data problem; str(err) is ONE line saying what is wrong and what to do."""

    def __init__(self, message: str) -> None:
        # The CLI prints str(err) as a single line; wrapped OS/network messages may carry newlines.
        super().__init__(" ".join(str(message).splitlines()))


@contextmanager
def _explained(what: str, todo: str) -> Iterator[None]:
    """Any failure inside (torchvision, the network, the disk) as DataError('WHAT (Type: message): TODO')."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        # An AssertionError of torchvision's idx reader has no message: its type alone still helps.
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise DataError(f"{what} ({why}): {todo}") from None


def dataset_info(name: str) -> DatasetInfo:
    """Return the DatasetInfo of `name`; DataError naming the allowed names if unknown."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}") from None


def resolve_root(root: str | os.PathLike) -> str:
    """The absolute form of a data folder, `~` expanded."""
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def _torchvision() -> Any:
    """torchvision.datasets, imported on first use: the import takes about 2 s of a trial process's start,
    and a dataset found in the cache (or made in memory) does not need it."""
    import torchvision.datasets  # a slow import (it loads torch._dynamo): only for files on disk
    import torchvision.datasets.utils  # the same package; named so that `.utils` is loaded

    return torchvision.datasets


@contextmanager
def _download_lock(root: str, name: str) -> Iterator[None]:
    """A file lock in `root`, so that concurrent trials on a node download once, and a socket timeout,
    since torchvision's downloads take none themselves."""
    os.makedirs(root, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with FileLock(os.path.join(root, f".{name}.lock")):
            yield
    finally:
        socket.setdefaulttimeout(previous)


def _official(path: str, md5: str) -> None:
    if not _torchvision().utils.check_integrity(path, md5):
        raise DataError(f"{path} fails its md5 check (corrupt or not the official file): {_REDOWNLOAD}")


# CIFAR-10 / CIFAR-100, MNIST


def _load_cifar(
    cls_name: str, title: str, num_classes: int, root: str | os.PathLike, download: bool
) -> Arrays:
    root, name = resolve_root(root), cls_name.lower()
    if (arrays := cached(root, name, num_classes)) is not None:
        return arrays
    tv = _torchvision()
    cls = getattr(tv, cls_name)
    files = cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])]
    paths = [os.path.join(root, cls.base_folder, n) for n, _ in files]
    if download and not all(map(os.path.isfile, paths)):
        # torchvision skips the archive when another process finished it while we waited for the lock.
        with _explained(f"could not download {title} from {cls.url} into {root}", "check the internet connection, "
                        f"or download {cls.filename} by hand and unpack it in {root}"), _download_lock(root, name):
            cls(root, train=False, download=True)
    gone = [f"{cls.base_folder}/{n}" for (n, _), p in zip(files, paths) if not os.path.isfile(p)]
    if len(gone) == len(files):
        batches = "data_batch_1..5, test_batch" if cls_name == "CIFAR10" else "train, test"
        raise DataError(f"{title} not found in {root} (expected {cls.base_folder}/{batches}, "
                        f"{cls.meta['filename']}): {_DOWNLOAD}")
    if gone:
        raise DataError(f"{title} in {root} is incomplete (missing {', '.join(gone)}): {_DOWNLOAD}")

    def decode() -> list[np.ndarray]:
        with _explained(f"{os.path.dirname(paths[0])} is unreadable", _REDOWNLOAD):
            try:
                sets = [cls(root, train=train) for train in (True, False)]
            except RuntimeError:  # torchvision's "not found or corrupted" of any file: name the file
                for path, (_, md5) in zip(paths, files):
                    _official(path, md5)
                raise
        # torchvision hands out NHWC (for PIL): back to the channel-major layout of the files.
        return [a for s in sets
                for a in (np.ascontiguousarray(s.data.transpose(0, 3, 1, 2)), np.array(s.targets, np.int64))]

    return decoded_once(root, name, num_classes, paths, decode)


def load_cifar10(root: str | os.PathLike, *, download: bool = False) -> Arrays:
    """CIFAR-10 from root/cifar-10-batches-py: (train_x, train_y, test_x, test_y), uint8 NCHW and int64;
    every file checked against the official md5s, as torchvision's CIFAR10 does."""
    return _load_cifar("CIFAR10", "CIFAR-10", 10, root, download)


def load_cifar100(root: str | os.PathLike, *, download: bool = False) -> Arrays:
    """CIFAR-100 (fine labels) from root/cifar-100-python: (train_x, train_y, test_x, test_y)."""
    return _load_cifar("CIFAR100", "CIFAR-100", 100, root, download)


def load_mnist(root: str | os.PathLike, *, download: bool = False) -> Arrays:
    """MNIST from root/MNIST/raw idx files (.gz or unpacked); 28x28 zero-padded to 32x32, grey -> 3 channels."""
    root, name = resolve_root(root), "mnist"
    if (arrays := cached(root, name, 10)) is not None:
        return arrays
    tv = _torchvision()
    raw = os.path.join(root, "MNIST", "raw")
    files = [(os.path.join(raw, gz), os.path.join(raw, gz[:-3]), md5) for gz, md5 in tv.MNIST.resources]
    if download and not all(os.path.isfile(plain) for _, plain, _ in files):
        # torchvision keeps any official .gz already there and tries each mirror.
        with _explained(f"could not download MNIST from {' or '.join(tv.MNIST.mirrors)} into {raw}",
                        f"check the internet connection, or copy the four MNIST idx files into {raw}"), \
                _download_lock(root, name):
            tv.MNIST(root, train=False, download=True)
    for gz, plain, md5 in files:  # torchvision reads the unpacked files: unpack .gz files put there by hand
        if os.path.isfile(gz) and not os.path.isfile(plain):
            _official(gz, md5)  # torchvision checks the md5s of its own downloads only
            with _explained(f"cannot unpack {gz}", f"gunzip it by hand, or {_REDOWNLOAD}"), gzip.open(gz) as f:
                write_atomically(plain, lambda out: shutil.copyfileobj(f, out))
    gone = [os.path.basename(gz) for gz, plain, _ in files if not os.path.isfile(plain)]
    if gone:
        raise DataError(f"MNIST not found in {root} (missing MNIST/raw/{', '.join(gone)}, expected MNIST/raw/"
                        f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]): {_DOWNLOAD}")

    def decode() -> list[np.ndarray]:
        out = []
        for train, img, lbl in ((True, files[0][1], files[1][1]), (False, files[2][1], files[3][1])):
            with _explained(f"{img} or {lbl} is unreadable",  # torchvision reads the two together: name both
                            "delete both and run again with --download (dataset_download=True)"):
                ds = tv.MNIST(root, train=train)
            x = F.pad(ds.data.unsqueeze(1), (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous().numpy()
            if not valid(x, ds.targets.numpy(), 10):
                raise DataError(f"{lbl} does not match {img} (label count or range, or images not 28x28): "
                                "delete both and run again with --download (dataset_download=True)")
            out += [x, ds.targets.numpy()]
        return out

    return decoded_once(root, name, 10, [plain for _, plain, _ in files], decode)


# sklearn digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits (images float [1797, 8, 8] in 0..16, labels int [1797]) as sklearn.datasets.
    load_digits gives them, read as it reads them (np.loadtxt of the digits.csv.gz inside scikit-learn's
    package, the label last), without importing sklearn.datasets: 1.5 s, most of a digits trial's start.
    If a scikit-learn release moves the file, its own loader is used."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        with gzip.open(path, mode="rt", encoding="utf-8") as f:
            data = np.loadtxt(f, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits as sklearn_digits  # slow import: only if the file moved

    bunch = sklearn_digits()
    return bunch.images, bunch.target


def digits_images() -> tuple[Tensor, Tensor]:
    """sklearn's 1,797 8x8 digits in sklearn's order, upsampled (bilinear) to 32x32 uint8 RGB, and their
    int64 labels."""
    images, target = _digits_arrays()
    images = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    x = (images * 255.0).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(np.asarray(target, dtype=np.int64))


# ImageNet folders


def require_imagenet_folders(root: str | os.PathLike) -> None:
    """DataError unless root/train and root/val exist (ImageNet cannot be downloaded automatically)."""
    root = resolve_root(root)
    if not all(os.path.isdir(os.path.join(root, part)) for part in ("train", "val")):
        raise DataError(f"ImageNet not found in {root} (expected {IMAGENET_LAYOUT}); it cannot be downloaded "
                        "automatically: get it from image-net.org, sort val into class folders, and point "
                        "--data-dir at it")


def imagenet_folders(
    root: str | os.PathLike, train_transform: Callable, eval_transform: Callable
) -> tuple[Any, Any, Any]:
    """(train with train_transform, the same train images with eval_transform, val as the test set) of
    root/{train,val}/<class>/* as torchvision ImageFolders; DataError if missing, unreadable or the class
    folders differ."""
    root = resolve_root(root)
    require_imagenet_folders(root)
    folder = _torchvision().ImageFolder
    with _explained(f"cannot read ImageNet in {root}", f"expected {IMAGENET_LAYOUT}"):
        train_aug = folder(os.path.join(root, "train"), transform=train_transform)
        train_eval = folder(os.path.join(root, "train"), transform=eval_transform)
        test = folder(os.path.join(root, "val"), transform=eval_transform)
    if test.classes != train_aug.classes:
        raise DataError(f"{root}/val has classes that differ from {root}/train ({len(test.classes)} vs "
                        f"{len(train_aug.classes)} folders): sort val into the same class folders as train")
    return train_aug, train_eval, test
