"""Loaders of a trial: DeviceLoader (an in-memory dataset kept as uint8 on the device, augmented in
whole batches there), ImageNetLoader (a torch DataLoader over image folders, its order a function of
the trial's seed and the epoch), DeviceJpegLoader (the same folders, their JPEGs decoded and cropped on
the device), and make_loaders / prepare_dataset, which pick them for a config.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..vocabulary import DATASETS, DatasetInfo
from .augment import (
    IMAGENET_AUGMENT,
    IMAGENET_RESIZE,
    AugmentSpec,
    augment_batch,
    imagenet_transforms,
    normalize,
    resize_center_crops,
    resized_crops,
    sample_crop_boxes,
    sample_flips,
    train_augmentation,
)
from .jpeg import EncodedImages, collate_encoded, decode_batch, device_decode_problem, to_device
from .readers import DataError, dataset_info, imagenet_folders, require_imagenet_folders, resolve_root
from .splits import SPLIT_SEED, TensorSplits, imagenet_val_size, load_splits, split_indices


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

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the order and augmentation draw from `generator`, whose state the Trainer
        checkpoints, so a resumed run continues the same stream."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The CPU generator seed of `epoch` of a trial seeded `seed`: plain arithmetic (no hash(), which
    varies between processes), distinct for every (seed, epoch) with epoch < 1,000,003."""
    return (seed * 1_000_003 + epoch) % 2**63


class ImageNetLoader:
    """A torch DataLoader whose batches are moved to `device` (non-blocking); same contract as DeviceLoader.

    set_epoch(e) re-seeds the DataLoader's own CPU generator (sampler order, worker seeds) from
    (seed, e), so that epoch e draws the same order whether or not the process restarted before it:
    that generator is not in the Trainer's checkpoint.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device | str, seed: int = 0) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass draw epoch `epoch`'s order (a no-op for a loader that does not shuffle)."""
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def augment_seed(seed: int, epoch: int) -> int:
    """The seed of the crop and flip draws of `epoch` on the device path: epoch_seed's, moved to a
    stream of its own (the sampler's generator takes epoch_seed itself)."""
    return (epoch_seed(seed, epoch) + 0x9E3779B97F4A7C15) % 2**63


class DeviceJpegLoader(ImageNetLoader):
    """ImageNet batches decoded and cropped on `device`: DataLoader workers read the files (EncodedImages),
    decode_jpeg decodes a batch's JPEGs in one call there, and each image is cropped and resized there.

    Training: RandomResizedCrop(224) boxes and flips with torchvision's distribution, drawn on the CPU
    from a generator that set_epoch re-seeds from (seed, epoch), like the sampler's. Evaluation:
    Resize(256) and CenterCrop(224). Both bilinear with antialiasing, rounded to 0..255 as PIL's uint8
    result, then normalised. Files PIL had to decode are counted by reason (`decoded_by_pil`), and
    each reason is warned about once, naming its first file.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device | str, seed: int, *,
                 train: bool, info: DatasetInfo) -> None:
        self.train = train
        self.size = info.image_size
        self.augment_generator = torch.Generator()  # on the CPU, where the boxes are drawn
        self.decoded_by_pil: Counter[str] = Counter()
        super().__init__(loader, device, seed)
        self.mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(info.std, dtype=torch.float32, device=self.device)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.augment_generator.manual_seed(augment_seed(self.seed, epoch))

    def _count(self, pairs: Iterable[tuple[str, Optional[str]]]) -> None:
        for name, why in pairs:
            if why is None:
                continue
            if why not in self.decoded_by_pil:
                warnings.warn(f"ImageNet: {name} is {why}; PIL decodes it, and every such file after it, "
                              "on the CPU (the loader's decoded_by_pil counts them)", stacklevel=3)
            self.decoded_by_pil[why] += 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        spec = IMAGENET_AUGMENT
        for batch in self.loader:
            self._count(zip(batch.names, batch.reasons))
            images, refused = decode_batch(batch, self.device)
            self._count(refused)
            if self.train:
                sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
                boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], spec.scale, spec.ratio, self.augment_generator)
                flips = sample_flips(len(images), self.augment_generator, "cpu") if spec.hflip else None
                x = resized_crops(images, boxes, flips, self.size)
            else:
                x = resize_center_crops(images, IMAGENET_RESIZE, self.size)
            yield normalize(x.div_(255.0), self.mean, self.std), to_device(batch.labels, self.device)


@dataclass
class Loaders:
    """The three loaders of a trial and the facts of their dataset; each loader has __len__."""

    info: DatasetInfo
    train: Iterable
    val: Iterable
    test: Iterable


def prepare_dataset(name: str, root: str | os.PathLike, *, download: bool) -> None:
    """Make sure `name` is readable under `root`, downloading it (once, under the lock) if allowed;
    a DataError otherwise. The runner calls this before a local run, so that missing data is one
    line before any trial starts instead of every trial failing the same way."""
    if name == "imagenet":
        require_imagenet_folders(root)
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
    seed: int = 0,
    decode: str = "pil",
) -> Loaders:
    """Loaders for an ImageNet-style folder root/{train,val}/<class>/*.JPEG (torchvision ImageFolder).

    imagenet_val_size(n) training images are held out for validation, right after the (possibly
    truncated) training part of the seed-777 permutation; root/val is the test set. The training
    order of each epoch follows from `seed` (ImageNetLoader.set_epoch). info.num_classes is the
    number of class folders found (1000 for ImageNet itself). decode "pil": PIL decodes and crops
    in the DataLoader workers (ImageNetLoader); "device": the workers read the files and `device`
    decodes and crops them (DeviceJpegLoader).
    """
    if decode not in ("pil", "device"):
        raise ValueError(f"decode must be 'pil' or 'device', got {decode!r}")
    info = DATASETS["imagenet"]
    train_tf, eval_tf = imagenet_transforms(info) if decode == "pil" else (None, None)
    train_aug, train_eval, test = imagenet_folders(root, train_tf, eval_tf)
    n = len(train_aug)
    if n < 2:
        raise DataError(
            f"{resolve_root(root)}/train holds {n} image(s): need at least 2 to hold one out for validation"
        )
    if max_train_dataset_size is not None and max_train_dataset_size < 1:
        raise DataError(f"max_train_dataset_size must be a positive integer, got {max_train_dataset_size}")
    tr, va = split_indices(n, imagenet_val_size(n), max_train_dataset_size, SPLIT_SEED)
    on_device = decode == "device"
    if on_device:  # the same files and labels, read as bytes; the loader decodes and crops
        train_aug = train_eval = EncodedImages(train_aug.samples, train_aug.classes)
        test = EncodedImages(test.samples, test.classes)
    # Pinned memory speeds the copy of decoded batches; the device path copies little but labels.
    pin = torch.device(device).type == "cuda" and not on_device
    info = replace(info, num_classes=len(train_aug.classes))

    def loader(ds: Any, bs: int, shuffle: bool) -> ImageNetLoader:
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=bs,
            shuffle=shuffle,
            num_workers=num_workers,
            pin_memory=pin,
            # Persistent workers draw their seeds once and skip that draw in later epochs, so a resumed
            # run would shuffle differently: the training loader starts its workers afresh each epoch.
            persistent_workers=num_workers > 0 and not shuffle,
            generator=torch.Generator() if shuffle else None,
            collate_fn=collate_encoded if on_device else None,
        )
        if on_device:
            return DeviceJpegLoader(dl, device, seed, train=shuffle, info=info)
        return ImageNetLoader(dl, device, seed)

    return Loaders(
        info=info,
        train=loader(torch.utils.data.Subset(train_aug, tr.tolist()), batch_size, True),
        val=loader(torch.utils.data.Subset(train_eval, va.tolist()), batch_size_eval, False),
        test=loader(test, batch_size_eval, False),
    )


def imagenet_decoder(choice: Optional[str], device: torch.device) -> str:
    """The ImageNet decoder a trial uses: its `imagenet_decode` choice, or by default "device" on
    CUDA (falling back to "pil", with a warning saying why, where decode_jpeg cannot run there) and
    "pil" elsewhere. DataError when "device" is asked for where it cannot run."""
    if choice == "pil" or (choice is None and device.type != "cuda"):
        return "pil"
    problem = device_decode_problem(str(device))
    if problem is None:
        return "device"
    if choice == "device":
        raise DataError(f"imagenet_decode='device': {problem}; set imagenet_decode='pil' to decode with PIL")
    warnings.warn(f"ImageNet JPEGs are decoded by PIL in the DataLoader workers: {problem}", stacklevel=2)
    return "pil"


@functools.lru_cache(maxsize=4)
def _cached_splits(name: str, root: str, download: bool, max_train: int | None) -> TensorSplits:
    # Several trainers in one process (tests, sequential trials) would otherwise re-read and re-verify files.
    return load_splits(name, root, download=download, max_train_dataset_size=max_train)


def make_loaders(cfg: Any, device: torch.device, generator: torch.Generator) -> Loaders:
    """Train/val/test loaders for a trial config (duck-typed: dataset, dataset_dir, dataset_download,
    max_train_dataset_size, train_augmentation, padding_before_crop, batch_size, batch_size_eval,
    num_workers, imagenet_decode, seed).

    `generator` lives on `device` and drives shuffling and augmentation of the in-memory datasets;
    ImageNet's order follows from cfg.seed and the epoch instead (ImageNetLoader.set_epoch).
    """
    info = dataset_info(cfg.dataset)
    if info.name == "imagenet":
        return imagenet_loaders(
            cfg.dataset_dir,
            batch_size=cfg.batch_size,
            batch_size_eval=cfg.batch_size_eval,
            num_workers=cfg.num_workers,
            device=device,
            max_train_dataset_size=cfg.max_train_dataset_size,
            seed=cfg.seed,
            decode=imagenet_decoder(cfg.imagenet_decode, torch.device(device)),
        )
    # The cache key: a normalised folder, and none for datasets made in memory.
    root = "" if info.name in ("digits", "synthetic_cifar10") else resolve_root(cfg.dataset_dir)
    splits = _cached_splits(info.name, root, cfg.dataset_download, cfg.max_train_dataset_size)
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
