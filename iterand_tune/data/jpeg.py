"""ImageNet's files for decoding on the trial's device: DataLoader workers read each file's bytes and
look at its JPEG frame header; baseline and progressive 8-bit colour JPEGs go to the device as they
are, to be decoded there in one batched torchvision.io.decode_jpeg call (nvJPEG on CUDA), and every
other file (another format, CMYK or greyscale JPEGs, 12-bit or lossless ones) is decoded by PIL in
the worker, as the PIL path decodes it, with the reason kept for the loader to report.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .readers import DataError

# Start-of-frame markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman coded).
# SOF3 (lossless) and the arithmetic-coded SOF9-SOF15 are left to PIL.
DEVICE_FRAMES = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_NOT_FRAMES = {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC share the 0xCn range but are no frame headers
_SIGNATURES = {b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WebP", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF"}
_DEPRECATED = r"The image decoding and encoding capabilities of TorchVision are deprecated"


class Frame(NamedTuple):
    """A JPEG's frame header: its start-of-frame marker, sample precision, size and components."""

    marker: int
    precision: int
    height: int
    width: int
    components: int


def jpeg_frame(data: bytes) -> Frame | str:
    """The frame header of JPEG bytes, or why there is none (another format, a damaged header)."""
    if data[:3] != b"\xff\xd8\xff":
        kind = next((name for sig, name in _SIGNATURES.items() if data.startswith(sig)), None)
        return f"not a JPEG ({kind} data)" if kind else "not a JPEG"
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return "a damaged JPEG header"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            if i + 10 > len(data):
                return "a truncated JPEG frame header"
            height, width = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return Frame(marker, data[i + 4], height, width, data[i + 9])
        if marker in (0xDA, 0xD9):  # scan data or the end before any frame header
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return "a JPEG without a frame header"


def device_refusal(data: bytes) -> Optional[str]:
    """None when the device decoder takes these bytes; else why they go to PIL instead."""
    frame = jpeg_frame(data)
    if isinstance(frame, str):
        return frame
    if frame.marker not in DEVICE_FRAMES:
        return f"a lossless or arithmetic-coded JPEG (SOF{frame.marker - 0xC0})"
    if frame.precision != 8:
        return f"a {frame.precision}-bit JPEG"
    if frame.components != 3:
        kind = {1: "greyscale", 4: "CMYK"}.get(frame.components, f"{frame.components}-component")
        return f"a {kind} JPEG"
    return None


def pil_rgb(data: bytes, name: str) -> Tensor:
    """An image file's bytes decoded by PIL and converted to RGB, as torchvision's ImageFolder loads
    it: uint8 [3, H, W]. DataError naming the file when PIL cannot read it either."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - any decoder error: the file, in one line
        raise DataError(f"{name} cannot be decoded ({type(err).__name__}: {err}): replace or remove it") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


class EncodedImages(torch.utils.data.Dataset):
    """(payload, label, name, why) of each (path, label) of an ImageFolder's samples: the payload is
    the file's bytes (uint8 [n]) when the device decodes them, else the image PIL decoded (uint8
    [3, H, W]) and `why` says why."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> None:
        self.samples = list(samples)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str, Optional[str]]:
        path, label = self.samples[index]
        with open(path, "rb") as f:
            data = f.read()
        why = device_refusal(data)
        name = os.path.basename(path)
        if why is None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, name, None
        return pil_rgb(data, name), label, name, why


class EncodedBatch(NamedTuple):
    """A batch of EncodedImages: payloads, labels int64 [B], file names, reasons (None: bytes)."""

    payloads: list[Tensor]
    labels: Tensor
    names: list[str]
    reasons: list[Optional[str]]


def collate_encoded(items: Sequence[tuple[Tensor, int, str, Optional[str]]]) -> EncodedBatch:
    """DataLoader's collate_fn for EncodedImages: the payloads differ in size, so they stay a list."""
    payloads, labels, names, reasons = zip(*items)
    return EncodedBatch(list(payloads), torch.tensor(labels, dtype=torch.int64), list(names), list(reasons))


def _decode_jpeg(payloads: list[Tensor], device: torch.device) -> list[Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # a slow import: only for ImageNet

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)


def decode_batch(batch: EncodedBatch, device: torch.device) -> tuple[list[Tensor], list[tuple[str, str]]]:
    """The batch's images as uint8 [3, H, W] tensors on `device`, in order: its JPEG bytes decoded
    there in one call, PIL's images copied there. A JPEG the device decoder fails on (its header
    said it could) is decoded by PIL instead; such files come back as (name, why) pairs."""
    images: list[Optional[Tensor]] = [None] * len(batch.payloads)
    encoded = [i for i, p in enumerate(batch.payloads) if p.dim() == 1]
    refused: list[tuple[str, str]] = []
    if encoded:
        try:
            decoded = _decode_jpeg([batch.payloads[i] for i in encoded], device)
        except RuntimeError:  # the call returns nothing when one image fails: find it
            decoded = []
            for i in encoded:
                try:
                    decoded += _decode_jpeg([batch.payloads[i]], device)
                except RuntimeError as err:
                    why = f"a JPEG the device decoder failed on ({str(err).splitlines()[0][:200]})"
                    refused.append((batch.names[i], why))
                    decoded.append(to_device(pil_rgb(batch.payloads[i].numpy().tobytes(), batch.names[i]), device))
        for i, image in zip(encoded, decoded):
            images[i] = image
    for i, payload in enumerate(batch.payloads):
        if payload.dim() == 3:
            images[i] = to_device(payload, device)
    return images, refused  # type: ignore[return-value]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` copied to `device` without waiting for it: from pinned memory on CUDA (a copy from pageable
    memory may first wait for the stream to drain, i.e. for the step in flight)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=None)
def device_decode_problem(device: str) -> Optional[str]:
    """None when torchvision.io.decode_jpeg decodes on `device` here; else why not, in one line (a
    torchvision built without nvJPEG, a missing library)."""
    try:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 30, 90)).save(buffer, format="JPEG", quality=95)
        (image,) = _decode_jpeg([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)],
                                torch.device(device))
        if tuple(image.shape) != (3, 8, 16):
            return f"decode_jpeg on {device} gave an image of shape {tuple(image.shape)} for a 3 x 8 x 16 JPEG"
    except Exception as err:  # noqa: BLE001 - whatever stops it, said in one line
        return f"decode_jpeg on {device} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    return None


def describe(counts: dict[str, int]) -> str:
    """'3 a CMYK JPEG, 1 not a JPEG (PNG data)': the files PIL decoded, by reason."""
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1]))

