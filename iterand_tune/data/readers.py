"""Datasets read into memory or checked on disk: CIFAR-10/100 and MNIST through torchvision's dataset
classes (download under a file lock, md5 checks, parsing), sklearn digits, the synthetic CIFAR-shaped
set, the ImageNet folder layout, and the fixed seed-777 train/validation splits.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from filelock import FileLock

from ..vocabulary import DATASETS, DatasetInfo

SPLIT_SEED = 777
# sklearn digits: fixed train / val / test sizes of one seeded permutation of all 1,797 images.
DIGITS_SPLIT = (1257, 180, 360)
# synthetic_cifar10: CIFAR-10's train / val / test sizes after the paper's 45,000 / 5,000 split.
SYNTHETIC_SPLIT = (45000, 5000, 10000)
IMAGENET_VAL_FRACTION = 0.01
IMAGENET_LAYOUT = "train/<class>/*.JPEG and val/<class>/*.JPEG"
DOWNLOAD_TIMEOUT_S = 60.0  # a node behind a silent firewall fails in a minute instead of hanging

_DOWNLOAD_HINT = (
    "pass --download (dataset_download=True) on a machine with internet, "
    "or point --data-dir at a folder that has it"
)
_REDOWNLOAD_HINT = "delete it and run again with --download (dataset_download=True)"

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]


class DataError(Exception):
    """A user-fixable data problem; str(err) is ONE line saying what is wrong and what to do."""

    def __init__(self, message: str) -> None:
        # The CLI prints str(err) as a single line; wrapped OS/network messages may carry newlines.
        super().__init__(" ".join(str(message).splitlines()))


def dataset_info(name: str) -> DatasetInfo:
    """Return the DatasetInfo of `name`; DataError naming the allowed names if unknown."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}"
        ) from None


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


def resolve_root(root: str | os.PathLike) -> str:
    """The absolute form of a data folder, `~` expanded."""
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def _describe(err: BaseException) -> str:
    # AssertionErrors from torchvision's idx reader carry no message: the type alone still helps.
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _locked(root: str, name: str, fetch: Callable[[], Any]) -> None:
    """Run `fetch()` under a file lock in `root` (concurrent trials on a node download once), with
    a socket timeout, since torchvision's downloads take none themselves."""
    try:
        os.makedirs(root, exist_ok=True)
        lock = FileLock(os.path.join(root, f".{name}.lock"))
    except OSError as err:
        raise DataError(f"cannot create data folder {root} ({err}): choose a writable --data-dir") from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with lock:
            fetch()
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision() -> Any:
    """torchvision.datasets (its dataset classes, and `utils` for md5 checks and archives),
    imported on first use: importing torchvision takes about 2 s, half a trial process's start,
    and only CIFAR, MNIST and ImageNet folders need it (digits and synthetic data do not)."""
    import torchvision.datasets  # a slow import (it loads torch._dynamo): only for files on disk
    import torchvision.datasets.utils  # the same package; named so that `.utils` is loaded

    return torchvision.datasets


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


def _cifar_class(cls: type, verify: bool, only: str | None = None) -> type:
    """torchvision's `cls`, optionally narrowed to the one batch file `only` (read as its training
    split) and/or with its md5 checks off. The one place that bends torchvision's class, and only
    through its public class attributes (train_list, test_list, meta):

    - only: torchvision reads a whole split at once, so an error it raises cannot name the file;
      an instance per file can.
    - verify=False: torchvision's check_integrity(path, md5=None) only asks that the file exist.
      For tests, which write tiny files in the real format that cannot match the official md5s.
    """
    if verify and only is None:
        return cls

    def md5s(entries: list) -> list[list]:
        return [[name, md5 if verify else None] for name, md5 in entries]

    if only is None:
        lists = {"train_list": md5s(cls.train_list), "test_list": md5s(cls.test_list)}
    else:
        lists = {"train_list": md5s([e for e in cls.train_list + cls.test_list if e[0] == only]), "test_list": []}
    meta = {**cls.meta, "md5": cls.meta["md5"] if verify else None}
    return type(cls.__name__, (cls,), {**lists, "meta": meta})


def _read_cifar_file(
    cls: type, root: str, name: str, md5: str, num_classes: int, verify: bool
) -> tuple[Tensor, Tensor]:
    path = os.path.join(root, cls.base_folder, name)
    meta_path = os.path.join(root, cls.base_folder, cls.meta["filename"])
    try:
        ds = _cifar_class(cls, verify, only=name)(root, train=True)
    except Exception as err:
        # torchvision says "not found or corrupted" for either file it checks: name the one that fails.
        if isinstance(err, RuntimeError) and verify:
            for bad, expected in ((path, md5), (meta_path, cls.meta["md5"])):
                if not _torchvision().utils.check_integrity(bad, expected):
                    raise DataError(
                        f"{bad} fails its md5 check (corrupt or not the official file): {_REDOWNLOAD_HINT}"
                    ) from None
        raise DataError(f"{path} is unreadable ({_describe(err)}): {_REDOWNLOAD_HINT}") from None
    data, labels = ds.data, np.asarray(ds.targets)
    if data.dtype != np.uint8:
        raise DataError(f"{path} has {data.dtype} pixels, expected uint8: {_REDOWNLOAD_HINT}")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise DataError(f"{path} has labels that do not match its {len(data)} images: {_REDOWNLOAD_HINT}")
    # torchvision hands out NHWC (for PIL); its transpose of the channel-major rows is undone without a copy.
    x = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_cifar(
    name: str, title: str, num_classes: int, root: str | os.PathLike, download: bool, verify: bool
) -> Arrays:
    """`name`: torchvision's class, CIFAR10 or CIFAR100."""
    cls = getattr(_torchvision(), name)
    root = resolve_root(root)
    folder = os.path.join(root, cls.base_folder)
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    batches = "data_batch_1..5, test_batch" if name == "CIFAR10" else "train, test"
    expected = f"{cls.base_folder}/{batches}, {cls.meta['filename']}"

    def missing() -> list[str]:
        return [n for n in names if not os.path.isfile(os.path.join(folder, n))]

    def fetch() -> None:
        # torchvision's download() skips the archive when another process finished it while we
        # waited for the lock; constructing the test split (the small one) runs it.
        try:
            _cifar_class(cls, verify)(root, train=False, download=True)
        except Exception as err:  # urllib, socket, tarfile and md5 failures all mean the same to the user
            raise DataError(
                f"could not download {title} from {cls.url} into {root} ({_describe(err)}): "
                f"check the internet connection, or download {cls.filename} by hand and unpack it in {root}"
            ) from None

    if download and missing():
        _locked(root, title.lower(), fetch)
    gone = missing()
    if len(gone) == len(names):
        raise DataError(f"{title} not found in {root} (expected {expected}): {_DOWNLOAD_HINT}")
    if gone:
        raise DataError(
            f"{title} in {root} is incomplete (missing {', '.join(cls.base_folder + '/' + n for n in gone)}): "
            f"{_DOWNLOAD_HINT}"
        )
    parts = []
    for file_list in (cls.train_list, cls.test_list):
        xs, ys = zip(*(_read_cifar_file(cls, root, n, md5, num_classes, verify) for n, md5 in file_list))
        parts += [torch.cat(xs), torch.cat(ys)]
    return parts[0], parts[1], parts[2], parts[3]


def load_cifar10(root: str | os.PathLike, *, download: bool = False, verify: bool = True) -> Arrays:
    """CIFAR-10 from root/cifar-10-batches-py: (train_x, train_y, test_x, test_y), uint8 NCHW and int64.

    verify=False skips the md5 checks against the official files (for tests' tiny files)."""
    return _load_cifar("CIFAR10", "CIFAR-10", 10, root, download, verify)


def load_cifar100(root: str | os.PathLike, *, download: bool = False, verify: bool = True) -> Arrays:
    """CIFAR-100 (fine labels) from root/cifar-100-python: (train_x, train_y, test_x, test_y)."""
    return _load_cifar("CIFAR100", "CIFAR-100", 100, root, download, verify)


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------


def _mnist_files(raw: str) -> list[tuple[str, str, str]]:
    """(.gz path, unpacked path, md5 of the .gz) of each MNIST resource; torchvision reads the unpacked."""
    return [(os.path.join(raw, gz), os.path.join(raw, gz[: -len(".gz")]), md5) for gz, md5 in _torchvision().MNIST.resources]


def _unpack_mnist(raw: str) -> None:
    """Unpack the .gz files that lack their unpacked twin (a folder filled by hand with the four .gz)."""
    for gz, plain, _ in _mnist_files(raw):
        if os.path.isfile(plain) or not os.path.isfile(gz):  # another process may have unpacked it meanwhile
            continue
        # Into a scratch folder, then renamed: a reader never sees a half-written file.
        try:
            scratch = tempfile.mkdtemp(dir=raw, prefix=".unpack-")
        except OSError as err:
            raise DataError(f"cannot unpack {gz} ({_describe(err)}): gunzip the MNIST files by hand") from None
        try:
            os.replace(_torchvision().utils.extract_archive(gz, scratch), plain)
        except Exception as err:
            raise DataError(f"{gz} is unreadable ({_describe(err)}): {_REDOWNLOAD_HINT}") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def load_mnist(root: str | os.PathLike, *, download: bool = False, verify: bool = True) -> Arrays:
    """MNIST from root/MNIST/raw idx files (.gz or unpacked); 28x28 zero-padded to 32x32, grey -> 3 channels."""
    root = resolve_root(root)
    raw = os.path.join(root, "MNIST", "raw")
    files = _mnist_files(raw)
    if verify:
        # torchvision checks a .gz's md5 only while downloading it; check those on disk as well.
        # (Unpacked files have no official md5: a damaged one fails to parse below.)
        for gz, _, md5 in files:
            if os.path.isfile(gz) and not _torchvision().utils.check_integrity(gz, md5):
                raise DataError(f"{gz} fails its md5 check (corrupt or not the official file): {_REDOWNLOAD_HINT}")

    def absent() -> list[tuple[str, str, str]]:
        return [f for f in files if not os.path.isfile(f[1])]

    def fetch() -> None:
        # torchvision's download() keeps (and unpacks) any official .gz already there, skips
        # everything when another process finished while we waited, and tries each mirror.
        try:
            _torchvision().MNIST(root, train=False, download=True)
        except Exception as err:
            raise DataError(
                f"could not download MNIST into {raw} ({_describe(err)}): "
                f"check the internet connection, or copy the four MNIST idx files into {raw}"
            ) from None

    if absent():
        if download:
            _locked(root, "mnist", fetch)
        elif all(os.path.isfile(gz) for gz, _, _ in absent()):
            _locked(root, "mnist", lambda: _unpack_mnist(raw))
    gone = [os.path.basename(gz) for gz, plain, _ in absent() if not os.path.isfile(gz)]
    if gone:
        raise DataError(
            f"MNIST not found in {root} (missing MNIST/raw/{', '.join(gone)}, expected "
            f"MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]): {_DOWNLOAD_HINT}"
        )
    out = []
    for train, prefix in ((True, "train"), (False, "t10k")):
        img_path = os.path.join(raw, f"{prefix}-images-idx3-ubyte")
        lbl_path = os.path.join(raw, f"{prefix}-labels-idx1-ubyte")
        try:
            ds = _torchvision().MNIST(root, train=train)
        except Exception as err:  # torchvision reads the two files together: name both
            raise DataError(
                f"{img_path} or {lbl_path} is unreadable ({_describe(err)}): "
                "delete both and run again with --download (dataset_download=True)"
            ) from None
        images, labels = ds.data, ds.targets
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (28, 28):
            raise DataError(f"{img_path} holds {list(images.shape[1:])} images, MNIST has 28x28: {_REDOWNLOAD_HINT}")
        if len(labels) != len(images) or (len(labels) and labels.max() > 9):
            raise DataError(f"{lbl_path} does not match {img_path} (count or label range): {_REDOWNLOAD_HINT}")
        x = F.pad(images.unsqueeze(1), (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
        out += [x, labels.to(torch.int64)]
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------------------------
# Made in memory: sklearn digits, synthetic CIFAR-10
# --------------------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as (images float [1797, 8, 8] in 0..16, labels int [1797]), as
    sklearn.datasets.load_digits gives them. Read straight from the CSV that scikit-learn ships
    inside its package, as that function reads it (np.loadtxt of sklearn/datasets/data/
    digits.csv.gz, the label last): importing sklearn.datasets costs 1.5 s, most of a digits trial
    process's start. If a scikit-learn release moves the file, its own loader is used."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        with gzip.open(path, mode="rt", encoding="utf-8") as f:
            data = np.loadtxt(f, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits as sklearn_digits  # slow import: only if the file moved

    bunch = sklearn_digits()
    return bunch.images, bunch.target


def load_digits() -> Arrays:
    """sklearn's 1,797 8x8 digits upsampled to 32x32 uint8 RGB, split by a seed-777 permutation.

    Returns (train_x, train_y, test_x, test_y): train holds the first 1,257 + 180 images of the
    permutation (load_splits takes the last 180 as validation, in this order), test the last 360.
    """
    images, target = _digits_arrays()
    images = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    x = (images * 255.0).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(np.asarray(target, dtype=np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train_val = DIGITS_SPLIT[0] + DIGITS_SPLIT[1]
    train, test = perm[:n_train_val], perm[n_train_val:]
    return x[train], y[train], x[test], y[test]


def _check_max_train(max_train: int | None) -> None:
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train_dataset_size must be a positive integer, got {max_train}")


def load_synthetic(max_train_dataset_size: int | None = None) -> TensorSplits:
    """synthetic_cifar10: uniform random uint8 [N, 3, 32, 32] images with uniform random labels
    0..9, SYNTHETIC_SPLIT images per split, each split from its own fixed seed (the same on every
    machine). `max_train_dataset_size` makes fewer training images (and costs less to make); the
    validation and test sets stay the same, being made apart from the training images."""
    n_train, n_val, n_test = SYNTHETIC_SPLIT
    _check_max_train(max_train_dataset_size)
    if max_train_dataset_size is not None:
        n_train = min(n_train, max_train_dataset_size)
    parts: list[Tensor] = []
    for part, n in enumerate((n_train, n_val, n_test)):
        rng = np.random.default_rng([SPLIT_SEED, part])
        parts.append(torch.from_numpy(rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)))
        parts.append(torch.from_numpy(rng.integers(0, 10, size=n, dtype=np.int64)))
    return TensorSplits(DATASETS["synthetic_cifar10"], *parts)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def split_indices(
    n: int, n_val: int, max_train: int | None = None, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """Indices (train, val) of a seeded permutation `perm` of range(n).

    Training is perm[:k], validation the n_val indices right after it, perm[k:k + n_val], where
    k = n - n_val, or max_train if that is smaller: as the original code, validation moves with a
    truncated training set (50,000 images, max_train 1,000: train perm[:1000], val perm[1000:6000]).
    """
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


def load_splits(
    name: str,
    root: str | os.PathLike,
    *,
    download: bool = False,
    max_train_dataset_size: int | None = None,
    verify: bool = True,
) -> TensorSplits:
    """Read an in-memory dataset (cifar10, cifar100, mnist, digits, synthetic_cifar10) and cut its
    fixed train/val/test splits."""
    info = dataset_info(name)
    if name == "synthetic_cifar10":
        return load_synthetic(max_train_dataset_size)
    if name == "digits":
        train_x, train_y, test_x, test_y = load_digits()
        _check_max_train(max_train_dataset_size)
        n_train = DIGITS_SPLIT[0]
        if max_train_dataset_size is not None:
            n_train = min(n_train, max_train_dataset_size)
        return TensorSplits(
            info,
            train_x[:n_train], train_y[:n_train],
            train_x[DIGITS_SPLIT[0]:], train_y[DIGITS_SPLIT[0]:],
            test_x, test_y,
        )  # fmt: skip
    readers = {"cifar10": load_cifar10, "cifar100": load_cifar100, "mnist": load_mnist}
    if name not in readers:
        raise DataError(f"dataset {name!r} is read from an image folder, not into memory: use imagenet_loaders")
    train_x, train_y, test_x, test_y = readers[name](root, download=download, verify=verify)
    tr, va = split_train_val(len(train_y), 0.1, max_train_dataset_size, SPLIT_SEED)
    return TensorSplits(info, train_x[tr], train_y[tr], train_x[va], train_y[va], test_x, test_y)


# --------------------------------------------------------------------------------------------
# ImageNet folders
# --------------------------------------------------------------------------------------------


def require_imagenet_folders(root: str | os.PathLike) -> None:
    """DataError unless root/train and root/val exist (ImageNet cannot be downloaded automatically)."""
    root = resolve_root(root)
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(root, part)):
            raise DataError(
                f"ImageNet not found in {root} (expected {IMAGENET_LAYOUT}); it cannot be downloaded "
                "automatically: get it from image-net.org, sort val into class folders, and point "
                "--data-dir at it"
            )


def imagenet_folders(
    root: str | os.PathLike, train_transform: Callable, eval_transform: Callable
) -> tuple[Any, Any, Any]:
    """(train with train_transform, the same train images with eval_transform, val as the test set)
    of root/{train,val}/<class>/*, as torchvision ImageFolders; DataError if missing, unreadable or the class folders differ."""
    root = resolve_root(root)
    require_imagenet_folders(root)
    ImageFolder = _torchvision().ImageFolder
    try:
        train_aug = ImageFolder(os.path.join(root, "train"), transform=train_transform)
        train_eval = ImageFolder(os.path.join(root, "train"), transform=eval_transform)
        test = ImageFolder(os.path.join(root, "val"), transform=eval_transform)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"cannot read ImageNet in {root} ({err}): expected {IMAGENET_LAYOUT}") from None
    if test.classes != train_aug.classes:
        raise DataError(
            f"{root}/val has classes that differ from {root}/train ({len(test.classes)} vs "
            f"{len(train_aug.classes)} folders): sort val into the same class folders as train"
        )
    return train_aug, train_eval, test
