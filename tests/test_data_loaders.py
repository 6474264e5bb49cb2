"""Tests for iterand_tune.data's loaders: DeviceLoader batches and order, ImageNet folders (hold-out
size and place, per-epoch order that survives a restart), ImageNet's JPEGs decoded on the device
(what goes to PIL instead, the PIL path's order, labels and evaluation images, crops that survive a
restart, the decoder a trial gets), make_loaders and its split cache."""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from iterand_tune import data
from iterand_tune.data import AugmentSpec, DataError, DeviceLoader, make_loaders
from iterand_tune.data import jpeg
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
        imagenet_decode=None, seed=0,
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
    make_cifar10(tmp_path, per_batch=8, setattr=monkeypatch.setattr)
    loaders_module._cached_splits.cache_clear()
    calls = []
    real = loaders_module.load_splits
    monkeypatch.setattr(loaders_module, "load_splits", lambda *a, **k: calls.append(a) or real(*a, **k))
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


# ---------------------------------------------------------------- ImageNet decoded on the device


def make_jpeg_folder(root, train_per_class: int = 6, val_per_class: int = 2, odd_files: bool = True) -> None:
    """root/{train,val}/<class>/*.JPEG of photo-like images of several sizes (quality 90, one of them
    progressive); with odd_files, train/n01 also holds a CMYK and a greyscale JPEG and a PNG named
    .JPEG, as ImageNet's train folder does."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, cls in enumerate(("n01", "n02")):
            os.makedirs(root / split / cls)
            for k in range(count):
                small = Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8))
                img = small.resize((40 + 9 * k, 36 + 5 * c), Image.BICUBIC)
                img.save(root / split / cls / f"img{k}.JPEG", quality=90, progressive=k == 1)
    if odd_files:
        grey = np.linspace(0, 255, 30 * 40, dtype=np.uint8).reshape(30, 40)
        Image.fromarray(np.stack([grey] * 4, -1), "CMYK").save(root / "train" / "n01" / "cmyk.JPEG")
        Image.fromarray(grey, "L").save(root / "train" / "n01" / "grey.JPEG")
        Image.fromarray(np.stack([grey] * 3, -1)).save(root / "train" / "n01" / "png.JPEG", format="PNG")


def _device_loaders(root, **kw):
    base = dict(batch_size=4, batch_size_eval=4, num_workers=0, device="cpu", decode="device", seed=5)
    return data.imagenet_loaders(root, **{**base, **kw})


def test_jpeg_frame_headers_decide_what_the_device_decodes(tmp_path):
    make_jpeg_folder(tmp_path)
    read = lambda *p: (tmp_path.joinpath(*p)).read_bytes()  # noqa: E731
    frame = jpeg.jpeg_frame(read("train", "n01", "img0.JPEG"))
    assert frame == jpeg.Frame(0xC0, 8, 36, 40, 3) and jpeg.device_refusal(read("train", "n01", "img0.JPEG")) is None
    assert jpeg.jpeg_frame(read("train", "n01", "img1.JPEG")).marker == 0xC2  # progressive: nvJPEG's too
    assert jpeg.device_refusal(read("train", "n01", "img1.JPEG")) is None
    assert jpeg.device_refusal(read("train", "n01", "cmyk.JPEG")) == "a CMYK JPEG"
    assert jpeg.device_refusal(read("train", "n01", "grey.JPEG")) == "a greyscale JPEG"
    assert jpeg.device_refusal(read("train", "n01", "png.JPEG")) == "not a JPEG (PNG data)"
    assert jpeg.device_refusal(b"hello") == "not a JPEG"
    assert jpeg.device_refusal(read("train", "n01", "img0.JPEG")[:30]) == "a JPEG without a frame header"
    twelve = bytearray(read("train", "n01", "img0.JPEG"))
    at = twelve.index(b"\xff\xc0")
    twelve[at + 4] = 12
    assert jpeg.device_refusal(bytes(twelve)) == "a 12-bit JPEG"
    twelve[at + 1] = 0xC9
    assert jpeg.device_refusal(bytes(twelve)) == "a lossless or arithmetic-coded JPEG (SOF9)"
    with pytest.raises(DataError, match=r"bad\.JPEG cannot be decoded \(.*\): replace or remove it"):
        jpeg.pil_rgb(b"not an image", "bad.JPEG")


def test_imagenet_on_the_device_is_the_pil_path_in_order_labels_and_evaluation(tmp_path):
    make_jpeg_folder(tmp_path)
    pil = data.imagenet_loaders(tmp_path, batch_size=4, batch_size_eval=4, num_workers=0, device="cpu", seed=5)
    with pytest.warns(UserWarning) as caught:
        dev = _device_loaders(tmp_path)
        batches = list(dev.train)
        list(dev.val)
    assert isinstance(dev.train, data.DeviceJpegLoader) and dev.info == pil.info
    assert dev.train.loader.dataset.indices == pil.train.loader.dataset.indices  # the same split
    assert dev.val.loader.dataset.indices == pil.val.loader.dataset.indices
    assert [len(y) for _, y in batches] == [4, 4, 4, 2] and all(x.shape[1:] == (3, 224, 224) for x, _ in batches)
    # The same order as the PIL path: the sampler's generator is seeded alike.
    pil.train.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.cat([y for _, y in pil.train]))
    # The three files nvJPEG does not take: decoded by PIL, counted, each reason warned about once.
    # (One of the 15 training images is held out: the validation loader meets that one.)
    counted = dev.train.decoded_by_pil + dev.val.decoded_by_pil
    assert dict(counted) == {"a CMYK JPEG": 1, "a greyscale JPEG": 1, "not a JPEG (PNG data)": 1}
    said = sorted(str(w.message).split(";")[0] for w in caught)
    assert said == ["ImageNet: cmyk.JPEG is a CMYK JPEG", "ImageNet: grey.JPEG is a greyscale JPEG",
                    "ImageNet: png.JPEG is not a JPEG (PNG data)"]
    in_train = sum(dev.train.decoded_by_pil.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reason is warned about once a loader
        list(dev.train)
    assert sum(dev.train.decoded_by_pil.values()) == 2 * in_train  # counted every epoch
    # Evaluation has no randomness: the device path gives the PIL path's images to within a level.
    one_level = 1 / 255 / min(STD)
    for ours, theirs in ((dev.test, pil.test), (dev.val, pil.val)):
        for (x, y), (x_ref, y_ref) in zip(ours, theirs):
            assert torch.equal(y, y_ref) and x.dtype == torch.float32
            diff = (x - x_ref).abs()
            assert diff.max() <= one_level + 1e-5 and diff.mean() < 0.25 * one_level, (diff.max(), diff.mean())


def test_imagenet_crops_on_the_device_follow_seed_and_epoch_across_a_restart(tmp_path):
    make_jpeg_folder(tmp_path, odd_files=False)
    running = _device_loaders(tmp_path, num_workers=1).train
    epochs = []
    for e in range(3):
        running.set_epoch(e)
        epochs.append(torch.cat([x for x, _ in running]))
    assert not torch.equal(epochs[1], epochs[2])
    restarted = _device_loaders(tmp_path).train  # a fresh process resuming at epoch 2, without workers
    restarted.set_epoch(2)
    assert torch.equal(torch.cat([x for x, _ in restarted]), epochs[2])
    other = _device_loaders(tmp_path, seed=6).train
    assert not torch.equal(torch.cat([x for x, _ in other]), epochs[0])
    assert data.augment_seed(5, 2) != data.epoch_seed(5, 2)  # crops and order: two streams


def test_a_jpeg_the_device_decoder_fails_on_goes_to_pil(tmp_path, monkeypatch):
    make_jpeg_folder(tmp_path, odd_files=False)
    real = jpeg._decode_jpeg
    broken = (tmp_path / "train" / "n02" / "img3.JPEG").read_bytes()

    def fails_on_one(payloads, device):
        if any(p.numpy().tobytes() == broken for p in payloads):
            raise RuntimeError("Error while decoding JPEG images: unsupported\nmore")
        return real(payloads, device)

    monkeypatch.setattr(jpeg, "_decode_jpeg", fails_on_one)
    loaders = _device_loaders(tmp_path)
    with pytest.warns(UserWarning, match=r"img3\.JPEG is a JPEG the device decoder failed on \(Error while decoding"):
        labels = torch.cat([y for _, y in loaders.train])
    assert len(labels) == 11 and dict(loaders.train.decoded_by_pil) == {
        "a JPEG the device decoder failed on (Error while decoding JPEG images: unsupported)": 1}


def test_the_trial_device_chooses_the_imagenet_decoder(tmp_path, monkeypatch):
    make_jpeg_folder(tmp_path, odd_files=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = _cfg(dataset="imagenet", dataset_dir=str(tmp_path), batch_size=4, batch_size_eval=4, imagenet_decode=None)
    assert type(make_loaders(cfg, cpu, torch.Generator()).train) is data.ImageNetLoader  # CPU: PIL by default
    cfg.imagenet_decode = "device"
    assert isinstance(make_loaders(cfg, cpu, torch.Generator()).train, data.DeviceJpegLoader)
    assert data.imagenet_decoder("pil", cuda) == "pil" and data.imagenet_decoder(None, cpu) == "pil"
    monkeypatch.setattr(loaders_module, "device_decode_problem", lambda device: None)
    assert data.imagenet_decoder(None, cuda) == "device"  # CUDA: on the device by default
    monkeypatch.setattr(loaders_module, "device_decode_problem", lambda device: "decode_jpeg on cuda failed (X)")
    with pytest.warns(UserWarning, match=r"decoded by PIL in the DataLoader workers: decode_jpeg on cuda failed"):
        assert data.imagenet_decoder(None, cuda) == "pil"
    with pytest.raises(DataError, match=r"imagenet_decode='device': decode_jpeg on cuda failed \(X\); set"):
        data.imagenet_decoder("device", cuda)
    assert jpeg.device_decode_problem("cpu") is None  # torchvision decodes JPEGs on this CPU
    with pytest.raises(ValueError, match="decode must be 'pil' or 'device'"):
        _device_loaders(tmp_path, decode="gpu")
