"""Decode, validate and letterbox one uploaded image (CPU, no torch).

Refusals come back as values (``ImageRejected``), not exceptions, so the ingress can turn
them into a 4xx with the sentence unchanged: an exception raised inside a replica reaches the
caller wrapped in Ray's error type, with remote details a client must not see.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from patterns.pipeline.scenes import CANVAS

# The only Pillow parsers that ever read uploaded bytes. The JPEG parser also opens MPO, the
# multi-picture JPEG many phone cameras write (an ordinary JPEG first frame plus extra
# frames), and reports it as format "MPO"; Pillow has no separate MPO parser to name here.
PARSERS = ("PNG", "JPEG")
# ImageNet statistics: what torchvision's pretrained models expect, so one preprocessing
# serves the digit models and real pretrained ones alike (models.as_input applies them on
# the model's device). Here (numpy only), not in models.py, so this CPU stage never imports
# torch.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ImageLimits(BaseModel):
    # Decompression-bomb guard: a 100 KB PNG can claim 50,000 x 50,000 pixels (7.5 GB of
    # RGB once decoded). The header is checked against these before any pixel is decoded.
    max_side: int = Field(default=4096, ge=CANVAS)
    max_pixels: int = Field(default=16_000_000, ge=CANVAS * CANVAS)
    min_side: int = Field(default=16, ge=1)


@dataclass
class ImageRejected:
    status: int
    message: str


@dataclass
class Prepared:
    # (CANVAS, CANVAS, 3) uint8, letterboxed: 28 KB, what travels to the model stages, which
    # normalise it on their own device (models.as_input). A normalised float16 tensor would be
    # twice the size and a float32 one four times.
    image: np.ndarray
    meta: dict[str, Any]  # width, height, format, scale, pad: maps model boxes back


def install_pil_guard(limits: ImageLimits) -> None:
    """Second line of defence inside PIL itself (process-wide; call in a replica)."""
    from PIL import Image

    # PIL warns above MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels


def prepare(data: bytes, limits: ImageLimits) -> Prepared | ImageRejected:
    from PIL import Image, UnidentifiedImageError

    if not data:
        return ImageRejected(400, "The image is empty (0 bytes); send PNG or JPEG bytes.")
    claimed = header_size(data)
    if claimed is not None and _over_limits(*claimed, limits):
        return ImageRejected(413, _too_big_sentence(claimed, limits))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PARSERS)  # reads the header only
    except UnidentifiedImageError:
        return _unidentified(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return ImageRejected(413, _too_big_sentence(None, limits))
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # A PNG or JPEG signature followed by a header cut short or garbled.
        return ImageRejected(422, _corrupt_sentence(_signature(data), exc))
    fmt = "JPEG" if img.format == "MPO" else img.format  # the first frame is read as a JPEG
    width, height = img.size
    if _over_limits(width, height, limits):
        return ImageRejected(413, _too_big_sentence((width, height), limits))
    if width < limits.min_side or height < limits.min_side:
        return ImageRejected(
            422, f"The image is {width}x{height} pixels; send at least "
            f"{limits.min_side}x{limits.min_side}.",
        )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return ImageRejected(413, _too_big_sentence((width, height), limits))
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return ImageRejected(422, _corrupt_sentence(fmt, exc))
    rgb = img.convert("RGB")  # palette, grey, RGBA, CMYK, 16-bit -> 8-bit RGB
    scale = CANVAS / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = rgb.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0)
    # Letterbox: keep the aspect ratio, pad with the mean colour (0 after normalising).
    canvas = Image.new("RGB", (CANVAS, CANVAS), (124, 116, 104))
    pad_x, pad_y = (CANVAS - new_w) // 2, (CANVAS - new_h) // 2
    canvas.paste(resized, (pad_x, pad_y))
    return Prepared(
        image=np.asarray(canvas, dtype=np.uint8),
        meta={
            "width": width,
            "height": height,
            "format": fmt,
            "scale": scale,
            "pad": [pad_x, pad_y],
        },
    )


_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def _signature(data: bytes) -> str | None:
    """PNG or JPEG when the bytes start like one (read by no parser)."""
    return next((name for sig, name in _SIGNATURES.items() if data.startswith(sig)), None)


def _other_format(data: bytes) -> str | None:
    """A few common image formats we do not parse, named from their magic bytes alone, so
    the refusal can say what was sent without handing the bytes to that format's parser."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
        return "HEIF/AVIF"
    if data[:2] == b"BM" and len(data) >= 26 and data[6:10] == b"\x00\x00\x00\x00":
        return "BMP"
    return None


def _unidentified(data: bytes) -> ImageRejected:
    signature = _signature(data)
    if signature:  # starts like a PNG/JPEG, but the parser found no usable header
        return ImageRejected(422, _corrupt_sentence(signature, None))
    other = _other_format(data)
    if other:
        return ImageRejected(415, f"The image is {other}; send PNG or JPEG.")
    return ImageRejected(
        422, "The body is not a PNG or JPEG image (its bytes are not an image format)."
    )


def _corrupt_sentence(fmt: str | None, exc: BaseException | None) -> str:
    why = f" ({exc})" if exc is not None and str(exc) else ""
    return (
        f"The {fmt or 'PNG or JPEG'} image is truncated or corrupt and cannot be decoded{why}; "
        "send the complete file."
    )


def _over_limits(width: int, height: int, limits: ImageLimits) -> bool:
    return width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, read without any decoder: the bomb check
    runs before PIL sees the bytes. None when the header is not one we read."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):  # walk JPEG segments to the first start-of-frame marker
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _too_big_sentence(size: tuple[int, int] | None, limits: ImageLimits) -> str:
    claimed = f"claims {size[0]}x{size[1]} pixels" if size else "is too large to decode"
    return (
        f"The image {claimed}; this service decodes at most {limits.max_side} pixels a side "
        f"and {limits.max_pixels / 1e6:g} megapixels in all (decompression-bomb guard)."
    )


def to_original(box: list[float], meta: dict[str, Any]) -> list[float]:
    """A box in model-input pixels -> the uploaded image's pixels."""
    px, py = meta["pad"]
    s = meta["scale"]
    x1, y1, x2, y2 = box
    w, h = meta["width"], meta["height"]
    return [
        round(min(max((x1 - px) / s, 0), w), 1),
        round(min(max((y1 - py) / s, 0), h), 1),
        round(min(max((x2 - px) / s, 0), w), 1),
        round(min(max((y2 - py) / s, 0), h), 1),
    ]
