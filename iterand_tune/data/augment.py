"""Training augmentation: the batched policy of the in-memory datasets, applied to whole uint8 batches
on their device (pad -> random-resized-crop -> flip with torchvision's sampling rules, no host sync),
and torchvision's per-image transforms for ImageNet folders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vocabulary import DatasetInfo
from .readers import DataError, dataset_info


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


def train_augmentation(name: str, padding_before_crop: bool) -> AugmentSpec:
    """The training augmentation policy of an in-memory dataset (the paper's CIFAR-10 recipe)."""
    dataset_info(name)
    if name in ("cifar10", "cifar100", "synthetic_cifar10"):
        return AugmentSpec(pad=4 if padding_before_crop else 0)
    if name in ("mnist", "digits"):
        # Digits must not be mirrored, and small crops destroy them: keep at least half the area.
        return AugmentSpec(pad=2 if padding_before_crop else 0, scale=(0.5, 1.0), hflip=False)
    raise DataError(f"dataset {name!r} is not held in memory; it has no batched augmentation policy")


def imagenet_transforms(info: DatasetInfo) -> tuple[Any, Any]:
    """(train, eval) per-image torchvision transforms of ImageNet folders: random-resized-crop + flip
    for training, resize 256 + centre crop for evaluation, both normalised."""
    from torchvision import transforms as T  # a slow import (torch._dynamo): only for ImageNet

    norm = T.Normalize(info.mean, info.std)
    train_tf = T.Compose([T.RandomResizedCrop(info.image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(info.image_size), T.ToTensor(), norm])
    return train_tf, eval_tf


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
