"""A cache of decoded training images for folders of camera-size photos (``main.py --cache_images``).

Every epoch decodes every training photo again. For a 12-megapixel JPEG even the reduced-size decode
(``image_io.load_rgb(min_side=...)``) reads and entropy-decodes the whole file; the cache keeps what that decode
returns, losslessly, so later epochs and later runs read a small uncompressed array instead. Entries are keyed by
the file's content hash and the decode size, so an edited photo or another ``--img_size`` never reads a stale
entry; an entry that does not load (truncated, damaged) is decoded and written again, never trusted.

Layout: ``<cache root>/min<side>/<hash[:2]>/<hash>.npy``; the default root ``<data_dir>/.image_cache`` is hidden
from dataset discovery like the skin-mask cache.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from dataloaders.image_io import load_rgb
from utils.atomic import atomic_save

logger = logging.getLogger(__name__)

IMAGE_CACHE_DIR = ".image_cache"
_CHUNK = 1 << 20


def content_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CachedDecoder:
    """``load_rgb(path, min_side)`` through the cache; picklable for DataLoader workers."""

    def __init__(self, root: str | Path, min_side: int):
        self.min_side = min_side
        self.folder = Path(root) / f"min{min_side}"

    def entry(self, path: Path) -> Path:
        key = content_hash(path)
        return self.folder / key[:2] / f"{key}.npy"

    def __call__(self, path: Path) -> Image.Image:
        entry = self.entry(path)
        if entry.is_file():
            try:
                pixels = np.load(entry, allow_pickle=False)
                if pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8:
                    return Image.fromarray(pixels)
            except (OSError, ValueError, EOFError):  # truncated or damaged: decode again below
                pass
            logger.debug("rebuilding damaged cache entry %s", entry)
        picture = load_rgb(path, min_side=self.min_side)
        pixels = np.asarray(picture)
        atomic_save(entry, lambda tmp: np.save(tmp, pixels, allow_pickle=False))
        return picture
