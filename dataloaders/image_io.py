"""Reading one image file the way every script does: EXIF orientation applied, converted to 8-bit RGB."""

from __future__ import annotations

import logging
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


def _open_refusing_bombs(path: str | os.PathLike) -> Image.Image:
    """``Image.open``, except that images over Pillow's pixel limit are refused outright: Pillow only warns
    between 1x and 2x the limit and would then decode gigabytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully; raises on anything that is not a readable image."""
    with _open_refusing_bombs(path) as img:
        img.load()
        oriented = ImageOps.exif_transpose(img)
        return _to_rgb(oriented)


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
