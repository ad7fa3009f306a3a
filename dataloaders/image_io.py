"""Reading one image file the way every script does: EXIF orientation applied, converted to 8-bit RGB."""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def looks_like_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path.name)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's own I;16 -> RGB conversion clips at 255, which turns most 16-bit photos white; rescale instead.
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry arbitrary colour; composite on white, as viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# No photo is 20 times longer than wide; a strip like 20,000,000 x 1 (19 KB as a PNG) passes Pillow's pixel limit,
# and the resize to the model's short side would then ask for gigabytes.
MAX_ASPECT_RATIO = 20
STRIP_MIN_SIDE = 512


class NotAPhoto(ValueError):
    """An image whose shape no photo has: refused before decoding, skipped and listed like any unreadable file."""


def _open_refusing_bombs(path: str | os.PathLike) -> Image.Image:
    """``Image.open``, except that images over Pillow's pixel limit are refused outright (Pillow only warns between
    1x and 2x the limit and would then decode gigabytes), and so are strips longer than MAX_ASPECT_RATIO:1."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)
    width, height = img.size
    # A small image of any shape is cheap; a long one is resized to a long side of ratio x the input size.
    if max(width, height) > STRIP_MIN_SIDE and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        img.close()
        raise NotAPhoto(f"{width}x{height} pixels: longer than {MAX_ASPECT_RATIO}:1, not a photo")
    return img


def load_rgb(path: str | os.PathLike, min_side: int = 0, max_side: int = 0) -> Image.Image:
    """Decode ``path`` as 8-bit RGB, upright (EXIF orientation applied); raises on anything that is not a readable
    image.

    ``min_side``: the caller needs at most this many pixels on the shorter side. A JPEG larger than that is decoded
    at the smallest DCT scale (1/2, 1/4 or 1/8) that still leaves the shorter side at least ``min_side``, never below:
    a 12-megapixel photo decodes in a tenth of the time, and the resize that follows works from enough pixels. Other
    formats decode fully. ``max_side``: then shrink (never enlarge) so the longer side is at most this (overlays).
    """
    with _open_refusing_bombs(path) as img:
        _draft(img, min_side, max_side)
        img.load()
        oriented = _to_rgb(ImageOps.exif_transpose(img))
    if max_side and max(oriented.size) > max_side:
        oriented.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return oriented


# EXIF orientations that turn the stored image by 90 degrees (ImageOps.exif_transpose swaps width and height)
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def decoded_size(path: str | os.PathLike, min_side: int = 0) -> tuple[int, int]:
    """The upright (width, height) that ``load_rgb(path, min_side)`` returns, from the file's header alone."""
    with _open_refusing_bombs(path) as img:
        _draft(img, min_side, 0)
        width, height = img.size
        turned = img.getexif().get(0x0112) in _QUARTER_TURNS
    return (height, width) if turned else (width, height)


def file_format(path: str | os.PathLike) -> str:
    """The format Pillow detects from the file's content (JPEG, PNG, ...), whatever its extension says."""
    with _open_refusing_bombs(path) as img:
        return img.format or Path(path).suffix.lstrip(".").upper()


def _draft(img: Image.Image, min_side: int, max_side: int) -> None:
    """Ask the JPEG decoder for a reduced size (DCT scaling) that keeps the shorter side >= ``min_side`` or, with
    only ``max_side``, the longer side >= ``max_side``."""
    if img.format != "JPEG" or not (min_side or max_side):
        return
    width, height = img.size
    factor = min_side / min(width, height) if min_side else max_side / max(width, height)
    if factor < 1:
        # draft() returns the smallest scale whose size is at least the requested one in both dimensions.
        img.draft(img.mode, (math.ceil(width * factor), math.ceil(height * factor)))


def reduced_decoder(min_side: int):
    """``load_rgb`` with a fixed ``min_side``, picklable for DataLoader workers."""
    return functools.partial(load_rgb, min_side=min_side) if min_side else load_rgb


def failure_reason(path: str | os.PathLike, err: BaseException) -> str:
    """A one-line reason for the skipped-files lists."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file"
    except OSError:
        pass
    message = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {message}".rstrip(": ")


def check_image(path: str | os.PathLike) -> Optional[str]:
    """Return why ``path`` cannot be used as an image, or None if it decodes."""
    try:
        with _open_refusing_bombs(path) as img:
            # A reduced-size JPEG decode still reads the whole entropy-coded stream, so truncation is caught,
            # at a fraction of the cost of a full decode.
            img.draft("RGB", (64, 64))
            img.load()
        return None
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return failure_reason(path, err)
