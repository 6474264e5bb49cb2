"""Figure 3's input pipeline and step, measured: a folder of synthetic JPEGs of ImageNet's kind written
for it; the loader alone, PIL in DataLoader workers against decoding and cropping on the device
(images/s, training and evaluation); the training step and the evaluation forward of figure 3's
trials; both together, as a trial's epoch runs them; and the GPU-hours of a figure-3 trial from the
slower of loader and step. benchmarks/gpu_check.py's `imagenet` part runs it in a child process
(docs/gpu.md); it also runs alone:

    python benchmarks/imagenet_pipeline.py [--device cuda] [--classes 1000] [--out DIR]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (ROOT, HERE):  # the checkout and the sibling benchmarks, without an install
    if _path not in sys.path:
        sys.path.insert(0, _path)

from iterand_tune.config import TrialConfig  # noqa: E402
from iterand_tune.data import imagenet_loaders, imagenet_val_size  # noqa: E402
from iterand_tune.training import Trainer  # noqa: E402
from iterand_tune.trial_setup import claim_resources  # noqa: E402
from step_overhead import timed  # noqa: E402

Emit = Callable[[dict[str, Any]], None]
FIGURE3 = os.path.join(ROOT, "experiments", "figure3.py")
IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 train/ images; imagenet_val_size of them validate
IMAGENET_TEST = 50_000      # its val/ folder, the test set
PIPELINES = ("pil", "device")


# ----------------------------------------------------------------------------- the images


def write_jpegs(root: str, classes: int, train_per_class: int, val_per_class: int,
                size: tuple[int, int] = (350, 400), quality: int = 90, distinct: int = 64,
                seed: int = 0) -> dict[str, Any]:
    """root/{train,val}/cNNNN/*.JPEG: `distinct` photo-like images (a coarse random pattern resized
    bicubically, with noise) of heights and widths within 15% of `size`, encoded once each at
    `quality` and written round-robin: decoding costs what such images cost, whatever their number."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(distinct):
        h, w = (int(s * rng.uniform(0.85, 1.15)) for s in size)
        coarse = Image.fromarray(rng.integers(0, 256, size=(60, 70, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(np.float32)
        pixels += rng.normal(0.0, 10.0, pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    k = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"c{c:04d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                with open(os.path.join(folder, f"{i:04d}.JPEG"), "wb") as f:
                    f.write(encoded[k % distinct])
                k += 1
    return dict(images=k, train_images=classes * train_per_class, test_images=classes * val_per_class,
                classes=classes, size=list(size), quality=quality, distinct=distinct,
                mean_kb=round(float(np.mean([len(e) for e in encoded])) / 1024, 1))


def decoder_agreement(root: str, device: torch.device, count: int = 64) -> dict[str, Any]:
    """How far decode_jpeg on `device` is from PIL's decoding (the `pil` path's) on the first `count`
    training files: the largest and the mean absolute difference, in levels of 255."""
    from iterand_tune.data.jpeg import EncodedBatch, decode_batch, pil_rgb

    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, "train")) for f in files)[:count]
    data = []
    for path in paths:
        with open(path, "rb") as f:
            data.append(f.read())
    batch = EncodedBatch([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data],
                         torch.zeros(len(data), dtype=torch.int64), [os.path.basename(p) for p in paths],
                         [None] * len(data))
    images, _ = decode_batch(batch, device)
    diffs = [(image.cpu().int() - pil_rgb(b, "").int()).abs() for image, b in zip(images, data)]
    return dict(images=len(diffs), max_level_diff=int(max(d.max() for d in diffs)),
                mean_level_diff=float(torch.cat([d.flatten() for d in diffs]).double().mean()))


# ----------------------------------------------------------------------------- the loader alone


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(root: str, decode: str, device: torch.device, batch: int, workers: int, split: str,
                passes: int = 2) -> dict[str, Any]:
    """Images/s of the `split` loader ("train": random-resized crops; "eval": resize and centre crop,
    over the test folder) of one pipeline, images on `device` when the pass ends: the last of
    `passes` whole passes, the start of its worker processes included (a trial's training loader
    starts them every epoch)."""
    loaders = imagenet_loaders(root, batch_size=batch, batch_size_eval=batch, num_workers=workers,
                               device=device, decode=decode)
    loader = loaders.train if split == "train" else loaders.test
    seconds, images = 0.0, 0
    for p in range(passes):
        loader.set_epoch(p)
        _sync(device)
        t0 = time.perf_counter()
        images = 0
        for x, y in loader:
            images += len(y)
        _sync(device)
        seconds = time.perf_counter() - t0
    row = dict(pipeline=decode, split=split, batch=batch, workers=workers, images=images, seconds=seconds,
               images_per_s=images / seconds)
    if decode == "device":
        row["decoded_by_pil"] = dict(getattr(loader, "decoded_by_pil", {}))
    return row


# ----------------------------------------------------------------------------- figure 3's trials


def figure3_trial(model: str) -> dict[str, Any]:
    """The TrialConfig values of figure 3's IteRand trial of `model` (its edge-popup trial costs the
    same, less a re-randomisation every 1,000 steps); a network not in the figure (the CPU version's)
    takes ResNet-50's values with that network."""
    from iterand_tune.experiments import all_trials, load

    trials = {t["model"]: t for t in all_trials(load(FIGURE3)) if t["experiment"].endswith("_sc_iterand")}
    values = dict(trials.get(model) or trials["resnet50"], model=model)
    values.pop("experiment")
    return values


def step_rates(values: dict[str, Any], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """The trial's training step (its batch, bn_splits and runtime options; a fixed batch already on
    the device, so no loader) and its evaluation forward (its evaluation batch), images/s."""
    cfg = TrialConfig.from_dict(values)
    trainer = Trainer(cfg, device=device)
    classes = trainer.model.fc.out_features
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, 224, 224, generator=gen, device=device)
    y = torch.randint(0, classes, (cfg.batch_size,), generator=gen, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.model.train()
    loss_sum = torch.zeros((), device=device)

    def step() -> None:
        nonlocal loss_sum
        loss_sum += trainer.train_step(x, y)[0]

    train_s = timed(step, steps, warmup, device)
    if not torch.isfinite(loss_sum).item():  # read once, after the timing
        raise RuntimeError(f"{cfg.model}: the training loss is not finite")
    x_eval = torch.randn(cfg.batch_size_eval, 3, 224, 224, generator=gen, device=device)
    trainer.model.eval()

    @torch.no_grad()
    def forward() -> None:
        with trainer.autocast():
            trainer.net(trainer.to_input(x_eval))

    eval_s = timed(forward, max(2, steps // 4), max(1, warmup // 2), device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(model=cfg.model, method=cfg.method, batch=cfg.batch_size, bn_splits=cfg.bn_splits,
                channels_last=cfg.channels_last, autocast=cfg.autocast, steps=steps,
                train_images_per_s=steps * cfg.batch_size / train_s, eval_batch=cfg.batch_size_eval,
                eval_images_per_s=max(2, steps // 4) * cfg.batch_size_eval / eval_s, peak_allocated_mb=peak)


def epoch_rate(values: dict[str, Any], decode: str, device: torch.device, iters: int) -> dict[str, Any]:
    """Loader and step together, as a trial's training epoch runs them: images/s of `iters`
    iterations after one (the workers' start and the first batch's latency left out)."""
    cfg = TrialConfig.from_dict(dict(values, imagenet_decode=decode))
    trainer = Trainer(cfg, device=device)
    trainer.model.train()
    loss_sum = torch.zeros((), device=device)
    images, timed_iters, t0 = 0, 0, 0.0
    for i, (x, y) in enumerate(trainer.loaders.train):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        loss_sum += trainer.train_step(x, y)[0]
        if i >= 1:
            images, timed_iters = images + len(y), timed_iters + 1
        if i == iters:
            break
    _sync(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss_sum).item():
        raise RuntimeError(f"{cfg.model}: the training loss is not finite")
    return dict(model=cfg.model, pipeline=decode, iterations=timed_iters, images=images, seconds=seconds,
                images_per_s=images / seconds if images else None)


def trial_hours(loader_train: float, loader_eval: float, step_train: float, step_eval: float,
                epochs: int, train_images: int, val_images: int, test_images: int,
                gpus: float = 1.0) -> dict[str, Any]:
    """GPU-hours of one trial when each phase runs at the slower of its loader and its step (images/s):
    `epochs` passes over the training images and the validation images, then the test images once."""
    train, evaluation = min(loader_train, step_train), min(loader_eval, step_eval)
    seconds = epochs * (train_images / train + val_images / evaluation) + test_images / evaluation
    return dict(hours=gpus * seconds / 3600, train_images_per_s=train, eval_images_per_s=evaluation,
                train_bound="loader" if loader_train < step_train else "step",
                eval_bound="loader" if loader_eval < step_eval else "step")


# ----------------------------------------------------------------------------- the child's entry point


def imagenet_rows(emit: Emit, device: str, classes: int, train_per_class: int, val_per_class: int,
                  size: list[int], models: list[str], workers: Optional[int], steps: int, warmup: int,
                  epoch_iters: int, batch: Optional[int] = None, batch_eval: Optional[int] = None,
                  folder: Optional[str] = None) -> None:
    """The `imagenet` part's rows, each emitted as soon as it is measured: the images written, how far
    the device's decoding is from PIL's, each pipeline's loader (training, evaluation), then per model its step, its GPU-hours per pipeline and
    (for the first model) loader and step together. `workers`, `batch` and `batch_eval` default to
    figure 3's; the CPU version sets them small."""
    dev = torch.device(device)
    base = figure3_trial(models[0])
    workers = base["num_workers"] if workers is None else workers
    claim_resources(1 + workers, 1.0 if dev.type == "cuda" else 0.0)  # what a figure-3 trial asks for
    with tempfile.TemporaryDirectory(dir=folder) as root:
        facts = write_jpegs(root, classes, train_per_class, val_per_class, tuple(size))
        emit(dict(what="images", **facts))
        emit(dict(what="decode", device=device, **decoder_agreement(root, dev)))
        loaders: dict[tuple[str, str], float] = {}
        for decode in PIPELINES:
            for split in ("train", "eval"):
                row = loader_rate(root, decode, dev, batch or base["batch_size"], workers, split)
                loaders[(decode, split)] = row["images_per_s"]
                emit(dict(what="loader", **row))
        n_val = imagenet_val_size(IMAGENET_TRAIN)
        for k, model in enumerate(models):
            values = dict(figure3_trial(model), dataset_dir=root, num_workers=workers,
                          use_cuda=dev.type == "cuda", evaluate_test=False)
            if batch:
                values.update(batch_size=batch, bn_splits=min(values["bn_splits"], batch))
            if batch_eval:
                values["batch_size_eval"] = batch_eval
            step = step_rates(values, dev, steps, warmup)
            emit(dict(what="step", **step))
            trial = figure3_trial(model)
            for decode in PIPELINES:
                hours = trial_hours(loaders[(decode, "train")], loaders[(decode, "eval")],
                                    step["train_images_per_s"], step["eval_images_per_s"], trial["epochs"],
                                    IMAGENET_TRAIN - n_val, n_val, IMAGENET_TEST)
                emit(dict(what="hours", model=model, pipeline=decode, epochs=trial["epochs"],
                          train_images=IMAGENET_TRAIN - n_val, val_images=n_val, test_images=IMAGENET_TEST,
                          **hours))
            if k == 0:
                for decode in PIPELINES:
                    emit(dict(what="epoch", **epoch_rate(values, decode, dev, epoch_iters)))


CALLS: dict[str, Callable[..., None]] = {"imagenet": imagenet_rows}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--classes", type=int, default=1000, help="class folders (default 1000, as ImageNet)")
    ap.add_argument("--train-per-class", type=int, default=2, help="training images per class (default 2)")
    ap.add_argument("--models", nargs="+", default=["resnet50"], help="figure 3's networks to time")
    ap.add_argument("--out", default=None, help="also write the rows to OUT/imagenet.jsonl")
    args = ap.parse_args(argv)
    rows = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)

    imagenet_rows(emit, args.device, args.classes, args.train_per_class, 1, [350, 400], args.models,
                  None, 20, 5, 15)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "imagenet.jsonl"), "w") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
