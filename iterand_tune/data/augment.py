"""Training augmentation: the batched policy of the in-memory datasets, applied to whole uint8 batches
on their device (pad -> random-resized-crop -> flip with torchvision's sampling rules, no host sync);
for ImageNet, torchvision's per-image transforms (the PIL path) and their device counterparts for
decoded images of different sizes (random-resized crop + flip, resize + centre crop).
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


IMAGENET_RESIZE = 256  # evaluation: the shorter side resized to 256, then the centre 224 x 224
IMAGENET_AUGMENT = AugmentSpec(pad=0)  # RandomResizedCrop's defaults and a horizontal flip

_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random crops before its central fallback


def _crop_boxes(hh: Tensor, ww: Tensor, u: Tensor, u_pos: Tensor, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's RandomResizedCrop.get_params for images of hh x ww (float [n]) from uniform draws
    u [2, n, _ATTEMPTS] (area, aspect) and u_pos [2, n] (offsets), on their device and in their
    dtype: boxes (top, left, h, w), int64 [n]. Every attempt at once (the first that fits, else
    the central crop cut to the nearest allowed aspect ratio), so nothing reads back."""
    area = (hh * ww)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.sqrt(area * aspect).round()  # round-half-even, like Python's round()
    h = torch.sqrt(area / aspect).round()
    valid = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none)
    found = valid.any(dim=1)
    in_ratio = ww / hh
    h = torch.where(found, h.gather(1, first).squeeze(1),
                    torch.where(in_ratio < min(ratio), (ww / min(ratio)).round(), hh))
    w = torch.where(found, w.gather(1, first).squeeze(1),
                    torch.where(in_ratio > max(ratio), (hh * max(ratio)).round(), ww))
    # floor(U * n) is uniform on 0..n-1 like randint(0, n); the clamp guards float rounding at U -> 1.
    top = torch.where(found, torch.minimum(torch.floor(u_pos[0] * (hh - h + 1)), hh - h),
                      torch.div(hh - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.minimum(torch.floor(u_pos[1] * (ww - w + 1)), ww - w),
                       torch.div(ww - w, 2, rounding_mode="floor"))
    return top.long(), left.long(), h.long(), w.long()


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
    u = torch.rand(2, batch, _ATTEMPTS, generator=generator, device=device)
    u_pos = torch.rand(2, batch, generator=generator, device=device)
    hh = torch.full((batch,), float(height + 2 * spec.pad), device=device)
    ww = torch.full((batch,), float(width + 2 * spec.pad), device=device)
    return _crop_boxes(hh, ww, u, u_pos, spec.scale, spec.ratio)


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


# ----------------------------------------------------------------------------- images of different sizes
# ImageNet's decoded images differ in size, so there is no batch tensor to crop with one grid_sample:
# boxes are drawn on the CPU for the whole batch at once (the sizes are known there, so the crop
# offsets need no read-back from the device), and each image is cropped and resized on its device.


def sample_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RandomResizedCrop.get_params for images of heights x widths (int64 [B], CPU): boxes (top,
    left, h, w), int64 [B], drawn at once in float64 from `generator` (_crop_boxes)."""
    n = len(heights)
    u = torch.rand(2, n, _ATTEMPTS, generator=generator, dtype=torch.float64)
    u_pos = torch.rand(2, n, generator=generator, dtype=torch.float64)
    return _crop_boxes(heights.double(), widths.double(), u, u_pos, scale, ratio)


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """A [C, H, W] image (any dtype) resized bilinearly with antialiasing, as torchvision's tensor
    resize does to approximate PIL's: float32 [1, C, height, width] in the input's value range."""
    if tuple(image.shape[-2:]) == (height, width):
        return image[None].float()
    return F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)


def resized_crops(
    images: Sequence[Tensor], boxes: tuple[Tensor, Tensor, Tensor, Tensor], flips: Tensor | None, size: int
) -> Tensor:
    """Each uint8 [3, H, W] image's box (top, left, h, w, CPU tensors) resized to size x size and
    mirrored where `flips` says (CPU bool): float32 [B, 3, size, size] on the images' device, in
    0..255 rounded to integers as the uint8 result of torchvision's PIL path is."""
    out = torch.empty(len(images), 3, size, size, device=images[0].device)
    flipped = flips.tolist() if flips is not None else [False] * len(images)
    for i, (image, top, left, h, w) in enumerate(zip(images, *(b.tolist() for b in boxes))):
        crop = _resize(image[:, top : top + h, left : left + w], size, size)[0]
        out[i] = crop.flip(-1) if flipped[i] else crop
    return out.round_().clamp_(0.0, 255.0)


def resize_center_crops(images: Sequence[Tensor], resize: int, size: int) -> Tensor:
    """torchvision's Resize(resize) (shorter side to `resize`, the longer int(resize * long / short))
    then CenterCrop(size) of each uint8 [3, H, W] image: float32 [B, 3, size, size] on the images'
    device, in 0..255 rounded to integers."""
    out = torch.empty(len(images), 3, size, size, device=images[0].device)
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        if width <= height:
            new_w, new_h = resize, int(resize * height / width)
        else:
            new_h, new_w = resize, int(resize * width / height)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        out[i] = _resize(image, new_h, new_w)[0, :, top : top + size, left : left + size]
    return out.round_().clamp_(0.0, 255.0)
