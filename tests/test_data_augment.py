"""Tests for iterand_tune.data's batched augmentation: shapes, determinism, the padding frame, and
agreement with torchvision's pad + RandomResizedCrop + flip (values and crop distribution); for
ImageNet's images of different sizes, the crop boxes' distribution against torchvision's, and the
crops and evaluation resizes against torchvision's tensor transforms and its PIL path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as TVT
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from iterand_tune.data import (
    AugmentSpec,
    DataError,
    augment_batch,
    normalize,
    resize_center_crops,
    resized_crop_flip,
    resized_crops,
    sample_crop_boxes,
    sample_crop_params,
    sample_flips,
    train_augmentation,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def test_train_augmentation_policies():
    assert train_augmentation("cifar10", True) == AugmentSpec(pad=4)
    assert train_augmentation("cifar100", False) == AugmentSpec(pad=0)
    assert train_augmentation("mnist", True) == AugmentSpec(pad=2, scale=(0.5, 1.0), hflip=False)
    with pytest.raises(DataError):
        train_augmentation("imagenet", True)
    with pytest.raises(ValueError):
        AugmentSpec(pad=-1)


# ---------------------------------------------------------------- ImageNet: images of different sizes


def _rrc_reference(height: int, width: int, n: int, seed: int) -> torch.Tensor:
    """n draws of torchvision's RandomResizedCrop.get_params (224's defaults) for a height x width image."""
    img = torch.empty(3, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.tensor([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])


# ImageNet-like sizes, and one so elongated that most draws end in torchvision's central fallback.
@pytest.mark.parametrize("height, width", [(350, 400), (500, 333), (90, 600)])
def test_imagenet_crop_boxes_match_torchvision_for_each_image_size(height, width):
    n = 20_000
    sizes = (torch.full((n,), height), torch.full((n,), width))
    top, left, h, w = sample_crop_boxes(*sizes, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5))
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    ref = _rrc_reference(height, width, n, 6)
    ours, theirs = _stats(h, w, height * width), _stats(ref[:, 2], ref[:, 3], height * width)
    assert (ours - theirs).abs().max() < 0.03, (ours, theirs)
    fallback = torch.tensor(RandomResizedCrop.get_params(torch.empty(3, height, width), [9.0, 9.0], [3 / 4, 4 / 3]))
    central = lambda boxes: (boxes == fallback).all(dim=1).double().mean()  # noqa: E731
    assert abs(central(torch.stack([top, left, h, w], 1)) - central(ref)) < 0.015
    for pos, size, side, ref_pos, ref_size in ((top, h, height, ref[:, 0], ref[:, 2]),
                                               (left, w, width, ref[:, 1], ref[:, 3])):
        room, ref_room = size < side, ref_size < side  # position given size: uniform where there is room
        rel = pos[room].double() / (side - size[room]).double()
        assert abs(rel.mean() - (ref_pos[ref_room].double() / (side - ref_size[ref_room]).double()).mean()) < 0.02


def test_imagenet_crop_boxes_per_image_and_the_central_fallback():
    # Nothing fits a 20 x 400 strip (the smallest crop is 22 pixels high): every draw falls back.
    heights, widths = torch.tensor([20, 400, 20]), torch.tensor([400, 20, 400])
    top, left, h, w = sample_crop_boxes(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    for i in range(3):
        expect = RandomResizedCrop.get_params(torch.empty(3, int(heights[i]), int(widths[i])), [0.08, 1.0],
                                              [3 / 4, 4 / 3])
        assert (int(top[i]), int(left[i]), int(h[i]), int(w[i])) == expect
    assert expect == (0, 186, 20, 27)
    # Each image's box fits its own size, drawn in one call for the whole batch.
    heights, widths = torch.tensor([300, 40, 500] * 200), torch.tensor([200, 500, 375] * 200)
    top, left, h, w = sample_crop_boxes(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    assert (top + h <= heights).all() and (left + w <= widths).all() and (h * w > 0).all()
    again = sample_crop_boxes(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((top, left, h, w), again))


def _smooth_image(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 [3, H, W] of a random 20 x 20 image upsampled: photo-like, with detail to alias."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8))
    return torch.from_numpy(np.asarray(small.resize((width, height), Image.BICUBIC)).copy()).permute(2, 0, 1)


def test_imagenet_crops_are_torchvisions_and_within_a_level_of_pils():
    from PIL import Image

    images = [_smooth_image(300, 400, 0), _smooth_image(500, 333, 1), _smooth_image(224, 224, 2)] * 3
    sizes = torch.tensor([tuple(i.shape[-2:]) for i in images])
    g = torch.Generator().manual_seed(3)
    boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], (0.08, 1.0), (3 / 4, 4 / 3), g)
    flips = sample_flips(len(images), g, "cpu")
    out = resized_crops(images, boxes, flips, 224)
    assert out.shape == (9, 3, 224, 224) and out.dtype == torch.float32 and 0 < flips.sum() < 9
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    evaluated = resize_center_crops(images, 256, 224)
    for i, image in enumerate(images):
        top, left, h, w = (int(b[i]) for b in boxes)
        ref = TF.resized_crop(image, top, left, h, w, [224, 224], antialias=True)
        ref = TF.hflip(ref) if flips[i] else ref
        assert torch.equal(out[i], ref.float()), i  # torchvision's tensor transform, exactly
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        crop = pil.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if flips[i] else crop
        diff = (out[i] - torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float()).abs()
        assert diff.max() <= 1 and diff.mean() < 0.35, (i, diff.max(), diff.mean())  # PIL's filter, rounded
        ref = TF.center_crop(TF.resize(image, 256, antialias=True), 224)
        assert torch.equal(evaluated[i], ref.float()), i
        pil_eval = TVT.CenterCrop(224)(TVT.Resize(256)(pil))
        diff = (evaluated[i] - torch.from_numpy(np.asarray(pil_eval).copy()).permute(2, 0, 1).float()).abs()
        assert diff.max() <= 1 and diff.mean() < 0.35, (i, diff.max(), diff.mean())
