"""Datasets for iterand_tune: readers for CIFAR-10/100, MNIST, sklearn digits and ImageNet folders,
a synthetic CIFAR-shaped dataset for speed measurements, the fixed train/val splits of SPEC.md
section 5, and loaders that keep uint8 images on the device and augment whole batches there
(random-resized-crop + flip with torchvision's sampling rules).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100, MNIST
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

__all__ = [
    "DataError",
    "DatasetInfo",
    "AugmentSpec",
    "DATASETS",
    "DIGITS_SPLIT",
    "dataset_info",
    "train_augmentation",
    "TensorSplits",
    "load_cifar10",
    "load_cifar100",
    "load_mnist",
    "load_digits",
    "load_synthetic",
    "split_train_val",
    "load_splits",
    "sample_crop_params",
    "sample_flips",
    "resized_crop_flip",
    "augment_batch",
    "normalize",
    "DeviceLoader",
    "ImageNetLoader",
    "imagenet_loaders",
    "Loaders",
    "make_loaders",
]

SPLIT_SEED = 777
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# sklearn digits: fixed train / val / test sizes of one seeded permutation of all 1,797 images.
DIGITS_SPLIT = (1257, 180, 360)
# synthetic_cifar10: CIFAR-10's train / val / test sizes after SPEC 5's split.
SYNTHETIC_SPLIT = (45000, 5000, 10000)

_DOWNLOAD_HINT = (
    "pass --download (dataset_download=True) on a machine with internet, "
    "or point --data-dir at a folder that has it"
)
_REDOWNLOAD_HINT = "delete it and run again with --download (dataset_download=True)"


class DataError(Exception):
    """A user-fixable data problem; str(err) is ONE line saying what is wrong and what to do."""

    def __init__(self, message: str) -> None:
        # The CLI prints str(err) as a single line; wrapped OS/network messages may carry newlines.
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: class count, side of the (square) model input, normalisation."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation applied to whole batches on the device (pad -> random-resized-crop -> flip)."""

    pad: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"AugmentSpec.pad must be >= 0, got {self.pad}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"AugmentSpec.scale must satisfy 0 < lo <= hi, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"AugmentSpec.ratio must satisfy 0 < lo <= hi, got {self.ratio}")


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


def dataset_info(name: str) -> DatasetInfo:
    """Return the DatasetInfo of `name`; DataError naming the allowed names if unknown."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}"
        ) from None


def train_augmentation(name: str, padding_before_crop: bool) -> AugmentSpec:
    """The training augmentation policy of an in-memory dataset (SPEC.md section 5)."""
    dataset_info(name)
    if name in ("cifar10", "cifar100", "synthetic_cifar10"):
        return AugmentSpec(pad=4 if padding_before_crop else 0)
    if name in ("mnist", "digits"):
        # Digits must not be mirrored, and small crops destroy them: keep at least half the area.
        return AugmentSpec(pad=2 if padding_before_crop else 0, scale=(0.5, 1.0), hflip=False)
    raise DataError(f"dataset {name!r} is not held in memory; it has no batched augmentation policy")


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


# --------------------------------------------------------------------------------------------
# On-disk readers
# --------------------------------------------------------------------------------------------

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]


def _root(root: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


DOWNLOAD_TIMEOUT_S = 60.0  # a node behind a silent firewall fails in a minute instead of hanging


def _download_locked(root: str, name: str, fetch: Any) -> None:
    """Run `fetch()` under a file lock in `root` so concurrent trials on a node download once."""
    from filelock import FileLock

    try:
        os.makedirs(root, exist_ok=True)
        lock = FileLock(os.path.join(root, f".{name}.lock"))
    except OSError as err:
        raise DataError(f"cannot create data folder {root} ({err}): choose a writable --data-dir") from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen takes no timeout itself
    try:
        with lock:
            fetch()
    finally:
        socket.setdefaulttimeout(previous)


def _fetch_archive(url: str, root: str, filename: str, md5: str, title: str) -> None:
    try:
        download_and_extract_archive(url, download_root=root, filename=filename, md5=md5)
    except Exception as err:  # urllib, socket, tarfile and md5 failures all mean the same to the user
        raise DataError(
            f"could not download {title} from {url} into {root} ({type(err).__name__}: {err}): "
            f"check the internet connection, or download {filename} by hand and unpack it in {root}"
        ) from None


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            # The official CIFAR batches are Python-2 pickles: this is the documented way to read them.
            obj = pickle.load(f, encoding="bytes")
    except Exception as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__}: {err}): {_REDOWNLOAD_HINT}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch (a {type(obj).__name__}, not a dict): {_REDOWNLOAD_HINT}")
    return obj


def _get(d: dict, key: str) -> Any:
    # Python-2 pickles give bytes keys, Python-3 re-pickles give str keys.
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _read_cifar_batch(path: str, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    d = _unpickle(path)
    data, labels = _get(d, "data"), _get(d, label_key)
    if data is None or labels is None:
        raise DataError(f"{path} lacks the 'data' or '{label_key}' entry: {_REDOWNLOAD_HINT}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path} has data {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]: {_REDOWNLOAD_HINT}"
        )
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise DataError(f"{path} has labels that do not match its {data.shape[0]} images: {_REDOWNLOAD_HINT}")
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values, each a 32x32 row-major plane.
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_cifar(
    cls: type, title: str, label_key: str, num_classes: int, root: str | os.PathLike, download: bool, verify: bool
) -> Arrays:
    root = _root(root)
    folder = os.path.join(root, cls.base_folder)
    names = [n for n, _ in cls.train_list] + [n for n, _ in cls.test_list]
    expected = (
        f"{cls.base_folder}/data_batch_1..5, test_batch" if cls is CIFAR10 else f"{cls.base_folder}/train, test"
    )

    def missing() -> list[str]:
        return [n for n in names if not os.path.isfile(os.path.join(folder, n))]

    def fetch() -> None:
        if missing():  # another process may have finished the download while we waited for the lock
            _fetch_archive(cls.url, root, cls.filename, cls.tgz_md5, title)

    if download and missing():
        _download_locked(root, title.lower(), fetch)
    gone = missing()
    if len(gone) == len(names):
        raise DataError(f"{title} not found in {root} (expected {expected}): {_DOWNLOAD_HINT}")
    if gone:
        raise DataError(
            f"{title} in {root} is incomplete (missing {', '.join(cls.base_folder + '/' + n for n in gone)}): "
            f"{_DOWNLOAD_HINT}"
        )
    if verify:
        for name, md5 in cls.train_list + cls.test_list:
            path = os.path.join(folder, name)
            if not check_integrity(path, md5):
                raise DataError(f"{path} fails its md5 check (corrupt or not the official file): {_REDOWNLOAD_HINT}")
    parts = []
    for file_list in (cls.train_list, cls.test_list):
        xs, ys = zip(*(_read_cifar_batch(os.path.join(folder, n), label_key, num_classes) for n, _ in file_list))
        parts += [torch.cat(xs), torch.cat(ys)]
    return parts[0], parts[1], parts[2], parts[3]


def load_cifar10(root: str | os.PathLike, *, download: bool = False, verify: bool = True) -> Arrays:
    """CIFAR-10 from root/cifar-10-batches-py: (train_x, train_y, test_x, test_y), uint8 NCHW and int64."""
    return _load_cifar(CIFAR10, "CIFAR-10", "labels", 10, root, download, verify)


def load_cifar100(root: str | os.PathLike, *, download: bool = False, verify: bool = True) -> Arrays:
    """CIFAR-100 (fine labels) from root/cifar-100-python: (train_x, train_y, test_x, test_y)."""
    return _load_cifar(CIFAR100, "CIFAR-100", "fine_labels", 100, root, download, verify)


_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned-byte idx files of 1 and 3 dimensions


def _read_idx(path: str, ndim: int) -> np.ndarray:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__}: {err}): {_REDOWNLOAD_HINT}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[ndim]:
        raise DataError(f"{path} is not an idx{ndim}-ubyte file (bad magic number): {_REDOWNLOAD_HINT}")
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    if len(raw) != header + math.prod(dims):
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data, its header says {math.prod(dims)}: {_REDOWNLOAD_HINT}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_files(raw: str) -> dict[str, str | None]:
    """Map each MNIST resource (.gz name) to the file to read: the .gz if present, else its unpacked twin."""
    found: dict[str, str | None] = {}
    for gz_name, _ in MNIST.resources:
        gz, plain = os.path.join(raw, gz_name), os.path.join(raw, gz_name[: -len(".gz")])
        found[gz_name] = gz if os.path.isfile(gz) else plain if os.path.isfile(plain) else None
    return found


def load_mnist(root: str | os.PathLike, *, download: bool = False, verify: bool = True) -> Arrays:
    """MNIST from root/MNIST/raw idx files (.gz or unpacked); 28x28 zero-padded to 32x32, grey -> 3 channels."""
    root = _root(root)
    raw = os.path.join(root, "MNIST", "raw")

    def fetch() -> None:
        for gz_name, md5 in MNIST.resources:
            if _mnist_files(raw)[gz_name] is not None:
                continue
            urls = [mirror + gz_name for mirror in MNIST.mirrors]
            reason = "no mirror"
            for url in urls:
                try:
                    download_and_extract_archive(url, download_root=raw, filename=gz_name, md5=md5)
                    break
                except Exception as err:
                    reason = f"{type(err).__name__}: {err}"
            else:
                raise DataError(
                    f"could not download MNIST {gz_name} into {raw} from {' or '.join(urls)} ({reason}): "
                    f"check the internet connection, or copy the four MNIST idx files into {raw}"
                )

    if download and None in _mnist_files(raw).values():
        _download_locked(root, "mnist", fetch)
    files = _mnist_files(raw)
    gone = [name for name, path in files.items() if path is None]
    if gone:
        raise DataError(
            f"MNIST not found in {root} (missing MNIST/raw/{', '.join(gone)}, expected "
            f"MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]): {_DOWNLOAD_HINT}"
        )
    if verify:
        # torchvision only knows the md5 of the .gz files; unpacked files get the structural checks below.
        for gz_name, md5 in MNIST.resources:
            path = files[gz_name]
            if path.endswith(".gz") and not check_integrity(path, md5):
                raise DataError(f"{path} fails its md5 check (corrupt or not the official file): {_REDOWNLOAD_HINT}")
    out = []
    for prefix in ("train", "t10k"):
        img_path = files[f"{prefix}-images-idx3-ubyte.gz"]
        lbl_path = files[f"{prefix}-labels-idx1-ubyte.gz"]
        images, labels = _read_idx(img_path, 3), _read_idx(lbl_path, 1)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{img_path} holds {list(images.shape[1:])} images, MNIST has 28x28: {_REDOWNLOAD_HINT}")
        if labels.shape[0] != images.shape[0] or (labels.size and labels.max() > 9):
            raise DataError(f"{lbl_path} does not match {img_path} (count or label range): {_REDOWNLOAD_HINT}")
        x = torch.from_numpy(images.copy()).unsqueeze(1)
        x = F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
        out += [x, torch.from_numpy(labels.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


def load_digits() -> Arrays:
    """sklearn's 1,797 8x8 digits upsampled to 32x32 uint8 RGB, split by a seed-777 permutation.

    Returns (train_x, train_y, test_x, test_y): train holds the first 1,257 + 180 images of the
    permutation (load_splits takes the last 180 as validation, in this order), test the last 360.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # slow import, only when asked for

    bunch = sklearn_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    x = (images * 255.0).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train_val = DIGITS_SPLIT[0] + DIGITS_SPLIT[1]
    train, test = perm[:n_train_val], perm[n_train_val:]
    return x[train], y[train], x[test], y[test]


def load_synthetic(max_train_dataset_size: int | None = None) -> TensorSplits:
    """synthetic_cifar10: uniform random uint8 [N, 3, 32, 32] images with uniform random labels
    0..9, SYNTHETIC_SPLIT images per split, each split from its own fixed seed (the same on every
    machine). `max_train_dataset_size` makes fewer training images (and costs less to make)."""
    n_train, n_val, n_test = SYNTHETIC_SPLIT
    if max_train_dataset_size is not None:
        if max_train_dataset_size < 1:
            raise DataError(f"max_train_dataset_size must be a positive integer, got {max_train_dataset_size}")
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


def _split_indices(n: int, n_val: int, max_train: int | None, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = n - n_val
    keep = n_train if max_train is None else min(n_train, max_train)
    return perm[:keep], perm[n_train : n_train + n_val]


def split_train_val(
    n: int, val_fraction: float = 0.1, max_train: int | None = None, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """Indices (train, val) of a seeded permutation of range(n): the first n - n_val train, the next n_val validate.

    `max_train` truncates the training indices only, so the validation set is the same whatever it is.
    """
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train_dataset_size must be a positive integer, got {max_train}")
    return _split_indices(n, round(n * val_fraction), max_train, seed)


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
        n_train = DIGITS_SPLIT[0]
        if max_train_dataset_size is not None:
            if max_train_dataset_size < 1:
                raise DataError(f"max_train_dataset_size must be a positive integer, got {max_train_dataset_size}")
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
# Batched augmentation on the device
# --------------------------------------------------------------------------------------------

_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random crops before its central fallback


def _central_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback crop (top, left, h, w) of a height x width image."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_params(
    batch: int,
    height: int,
    width: int,
    spec: AugmentSpec,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random-resized-crop boxes (top, left, h, w), int64 [batch], for images of height x width before padding.

    Boxes are in the padded frame ((height + 2*pad) x (width + 2*pad)) and follow torchvision's
    RandomResizedCrop.get_params distribution; all attempts are drawn at once, so nothing syncs.
    """
    ph, pw = height + 2 * spec.pad, width + 2 * spec.pad
    u = torch.rand(2, batch, _ATTEMPTS, generator=generator, device=device)
    target_area = (ph * pw) * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[0])
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.sqrt(target_area * aspect).round()  # round-half-even, like Python's round()
    h = torch.sqrt(target_area / aspect).round()
    valid = (w > 0) & (w <= pw) & (h > 0) & (h <= ph)
    first = valid.float().argmax(dim=1, keepdim=True)  # index of the first valid attempt (0 if none)
    found = valid.any(dim=1)
    f_top, f_left, f_h, f_w = _central_crop(ph, pw, spec.ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), float(f_h))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(f_w))
    u_pos = torch.rand(2, batch, generator=generator, device=device)
    # floor(U * n) is uniform on 0..n-1 like randint(0, n); the clamp guards float rounding at U -> 1.
    top = torch.minimum(torch.floor(u_pos[0] * (ph - h + 1)), ph - h)
    left = torch.minimum(torch.floor(u_pos[1] * (pw - w + 1)), pw - w)
    top = torch.where(found, top, float(f_top))
    left = torch.where(found, left, float(f_left))
    return top.long(), left.long(), h.long(), w.long()


def sample_flips(batch: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Horizontal-flip draws, bool [batch], each True with probability 1/2 (torchvision: rand < 0.5)."""
    return torch.rand(batch, generator=generator, device=device) < 0.5


def resized_crop_flip(
    x_uint8: Tensor,
    top: Tensor,
    left: Tensor,
    h: Tensor,
    w: Tensor,
    flip: Tensor | None,
    pad: int,
    out_size: int,
) -> Tensor:
    """Crop boxes given in the zero-padded frame, bilinearly resized to out_size and optionally mirrored.

    One grid_sample over the unpadded images: outside them it reads zeros, which is the padding.
    Returns float32 [B, C, out_size, out_size] in [0, 1]. Matches torchvision's pad + resized_crop
    (bilinear, antialias=False) + hflip, to float rounding.
    """
    b, _, height, width = x_uint8.shape
    o = torch.arange(out_size, device=x_uint8.device, dtype=torch.float32)
    hf, wf = h.float()[:, None], w.float()[:, None]
    ox = o.expand(b, out_size)
    if flip is not None:
        ox = torch.where(flip[:, None], (out_size - 1) - o, o)
    # Half-pixel source coordinates inside the crop, clamped to its first/last pixel as F.interpolate
    # does, so that a crop never blends in pixels from outside its own box.
    cy = ((o + 0.5) * hf / out_size - 0.5).clamp(min=0).minimum(hf - 1)
    cx = ((ox + 0.5) * wf / out_size - 0.5).clamp(min=0).minimum(wf - 1)
    py = top.float()[:, None] - pad + cy  # pixel centres of the unpadded image
    px = left.float()[:, None] - pad + cx
    gy = (2 * py + 1) / height - 1  # grid_sample's align_corners=False normalisation
    gx = (2 * px + 1) / width - 1
    grid = torch.stack(
        (gx[:, None, :].expand(b, out_size, out_size), gy[:, :, None].expand(b, out_size, out_size)), dim=-1
    )
    x = x_uint8.float().div_(255.0)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)  # bilinear weights are convex; the clamp only removes rounding excursions


def augment_batch(x_uint8: Tensor, spec: AugmentSpec, generator: torch.Generator | None, out_size: int) -> Tensor:
    """Pad -> RandomResizedCrop(out_size) -> RandomHorizontalFlip for a whole uint8 batch, on its device.

    Returns float32 [B, 3, out_size, out_size] in [0, 1], not normalised. Draws crop boxes
    (sample_crop_params) then flips (sample_flips, only if spec.hflip) from `generator`.
    """
    b, _, height, width = x_uint8.shape
    top, left, h, w = sample_crop_params(b, height, width, spec, generator, x_uint8.device)
    flip = sample_flips(b, generator, x_uint8.device) if spec.hflip else None
    return resized_crop_flip(x_uint8, top, left, h, w, flip, spec.pad, out_size)


def normalize(x01: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """(x - mean) / std per channel of an NCHW batch in [0, 1]; float32."""
    x01 = x01.float()
    if not isinstance(mean, Tensor):
        mean = torch.tensor(mean, dtype=torch.float32, device=x01.device)
    if not isinstance(std, Tensor):
        std = torch.tensor(std, dtype=torch.float32, device=x01.device)
    return (x01 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class DeviceLoader:
    """Batches of an in-memory uint8 dataset held on `device`.

    Yields (images float32 normalised NCHW, labels int64), both on device, with no host sync:
    shuffling and augmentation draw from `generator`, which must live on `device`.
    """

    def __init__(
        self,
        x_uint8: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        augment: AugmentSpec | None,
        generator: torch.Generator | None,
        out_size: int,
    ) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            raise ValueError(f"DeviceLoader wants uint8 NCHW images, got {x_uint8.dtype} {list(x_uint8.shape)}")
        if len(x_uint8) != len(y):
            raise ValueError(f"{len(x_uint8)} images but {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment is None and tuple(x_uint8.shape[-2:]) != (out_size, out_size):
            raise ValueError(f"images are {list(x_uint8.shape[-2:])}, out_size is {out_size}, and nothing resizes them")
        self.device = torch.device(device)
        # One copy to the device for the whole run; uint8 keeps it 4x smaller than float.
        self.x = x_uint8.to(self.device)
        self.y = y.to(self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.out_size = out_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, bs = len(self.y), self.batch_size
        perm = torch.randperm(n, generator=self.generator, device=self.device) if self.shuffle else None
        for start in range(0, n, bs):
            if perm is None:
                xb, yb = self.x[start : start + bs], self.y[start : start + bs]
            else:
                idx = perm[start : start + bs]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None:
                x01 = augment_batch(xb, self.augment, self.generator, self.out_size)
            else:
                x01 = xb.float().div_(255.0)
            yield normalize(x01, self.mean, self.std), yb


class ImageNetLoader:
    """A torch DataLoader whose batches are moved to `device` (non-blocking); same contract as DeviceLoader."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device | str) -> None:
        self.loader = loader
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class Loaders:
    """The three loaders of a trial and the facts of their dataset; each loader has __len__."""

    info: DatasetInfo
    train: Iterable
    val: Iterable
    test: Iterable


IMAGENET_VAL_FRACTION = 0.01


IMAGENET_LAYOUT = "train/<class>/*.JPEG and val/<class>/*.JPEG"


def _require_imagenet_folders(root: str) -> None:
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(root, part)):
            raise DataError(
                f"ImageNet not found in {root} (expected {IMAGENET_LAYOUT}); it cannot be downloaded "
                "automatically: get it from image-net.org, sort val into class folders, and point "
                "--data-dir at it"
            )


def prepare_dataset(name: str, root: str | os.PathLike, *, download: bool) -> None:
    """Make sure `name` is readable under `root`, downloading it (once, under the lock) if allowed;
    a DataError otherwise. The runner calls this before a local run, so that missing data is one
    line before any trial starts instead of every trial failing the same way."""
    if name == "imagenet":
        _require_imagenet_folders(_root(root))
        return
    if name not in ("digits", "synthetic_cifar10"):  # nothing to fetch: made in memory
        load_splits(name, root, download=download)


def imagenet_loaders(
    root: str | os.PathLike,
    *,
    batch_size: int,
    batch_size_eval: int,
    num_workers: int,
    device: torch.device | str,
    max_train_dataset_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Loaders:
    """Loaders for an ImageNet-style folder root/{train,val}/<class>/*.JPEG (torchvision ImageFolder).

    1% of train (at least one image, seed-777 permutation) is held out for validation; root/val is the
    test set. `generator` (CPU) drives shuffling and worker seeds. info.num_classes is the number of
    class folders found (1000 for ImageNet itself).
    """
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    root = _root(root)
    info = DATASETS["imagenet"]
    _require_imagenet_folders(root)
    norm = T.Normalize(info.mean, info.std)
    train_tf = T.Compose([T.RandomResizedCrop(info.image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(info.image_size), T.ToTensor(), norm])
    try:
        train_aug = ImageFolder(os.path.join(root, "train"), transform=train_tf)
        train_eval = ImageFolder(os.path.join(root, "train"), transform=eval_tf)
        test = ImageFolder(os.path.join(root, "val"), transform=eval_tf)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"cannot read ImageNet in {root} ({err}): expected {IMAGENET_LAYOUT}") from None
    if test.classes != train_aug.classes:
        raise DataError(
            f"{root}/val has classes that differ from {root}/train ({len(test.classes)} vs "
            f"{len(train_aug.classes)} folders): sort val into the same class folders as train"
        )
    n = len(train_aug)
    if n < 2:
        raise DataError(f"{root}/train holds {n} image(s): need at least 2 to hold one out for validation")
    if max_train_dataset_size is not None and max_train_dataset_size < 1:
        raise DataError(f"max_train_dataset_size must be a positive integer, got {max_train_dataset_size}")
    n_val = max(1, round(n * IMAGENET_VAL_FRACTION))
    tr, va = _split_indices(n, n_val, max_train_dataset_size, SPLIT_SEED)
    pin = torch.device(device).type == "cuda"

    def loader(ds: Any, bs: int, shuffle: bool) -> ImageNetLoader:
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=bs,
            shuffle=shuffle,
            num_workers=num_workers,
            pin_memory=pin,
            persistent_workers=num_workers > 0,
            generator=generator if shuffle else None,
        )
        return ImageNetLoader(dl, device)

    return Loaders(
        info=replace(info, num_classes=len(train_aug.classes)),
        train=loader(torch.utils.data.Subset(train_aug, tr.tolist()), batch_size, True),
        val=loader(torch.utils.data.Subset(train_eval, va.tolist()), batch_size_eval, False),
        test=loader(test, batch_size_eval, False),
    )


_CACHE_SIZE = 4
_cache: OrderedDict[tuple, TensorSplits] = OrderedDict()
_cache_lock = threading.Lock()


def _cached_splits(
    name: str, root: str, download: bool, max_train: int | None, verify: bool = True
) -> TensorSplits:
    # Several trainers in one process (tests, sequential trials) would otherwise re-read and re-verify files.
    key = (name, "" if name in ("digits", "synthetic_cifar10") else _root(root), max_train, verify)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    splits = load_splits(name, root, download=download, max_train_dataset_size=max_train, verify=verify)
    with _cache_lock:
        _cache[key] = splits
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return splits


def make_loaders(cfg: Any, device: torch.device, generator: torch.Generator) -> Loaders:
    """Train/val/test loaders for a trial config (duck-typed: dataset, dataset_dir, dataset_download,
    max_train_dataset_size, train_augmentation, padding_before_crop, batch_size, batch_size_eval, num_workers).

    `generator` lives on `device` and drives shuffling and augmentation of the in-memory datasets.
    """
    info = dataset_info(cfg.dataset)
    if info.name == "imagenet":
        if generator is not None and generator.device.type == "cpu":
            loader_gen = generator
        else:
            # DataLoader samplers need a CPU generator: seed one from the trial's generator, once.
            seed = int(torch.randint(2**62, (1,), generator=generator, device=device).item())
            loader_gen = torch.Generator().manual_seed(seed)
        return imagenet_loaders(
            cfg.dataset_dir,
            batch_size=cfg.batch_size,
            batch_size_eval=cfg.batch_size_eval,
            num_workers=cfg.num_workers,
            device=device,
            max_train_dataset_size=cfg.max_train_dataset_size,
            generator=loader_gen,
        )
    splits = _cached_splits(info.name, cfg.dataset_dir, cfg.dataset_download, cfg.max_train_dataset_size)
    augment = train_augmentation(info.name, cfg.padding_before_crop) if cfg.train_augmentation else None
    common = dict(device=device, mean=info.mean, std=info.std, out_size=info.image_size)
    return Loaders(
        info=info,
        train=DeviceLoader(
            splits.train_x, splits.train_y, cfg.batch_size,
            shuffle=True, augment=augment, generator=generator, **common,
        ),
        val=DeviceLoader(
            splits.val_x, splits.val_y, cfg.batch_size_eval,
            shuffle=False, augment=None, generator=None, **common,
        ),
        test=DeviceLoader(
            splits.test_x, splits.test_y, cfg.batch_size_eval,
            shuffle=False, augment=None, generator=None, **common,
        ),
    )  # fmt: skip
