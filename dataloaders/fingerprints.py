"""Per-image fingerprints for the dataset audit, and the search for exact and near-duplicate pairs.

Exact duplicates share their decoded pixels (a hash of the upright RGB array, so a re-saved PNG of a JPEG's pixels
or a renamed copy is found; the file bytes do not matter). Near duplicates (resized, re-encoded, brightened or
slightly cropped copies) are found with the perceptual hash of the ``imagehash`` library at hash size 16 (256 bits
from the DCT of the 64x64 grey image; the usual 64-bit pHash only sees "a dark blob in the middle" on dermoscopy and
matched distinct lesions). A pHash does not survive cropping, so each image also gets the pHash of its central
95/90/85/80%, and two images match when the whole of one is within ``threshold`` bits of any view of the other.
Measured by ``python -m benchmarks.audit_threshold`` on 300 photos of each real set (docs/measurements_accuracy.md,
"Dataset audit"): at 40 bits every resized, re-encoded (JPEG q50), brightened (+20%) and centrally cropped
(3-10% a side) copy was found, one-sided 10% crops were not, and at most 2 of 44,850 pairs of other photos fell
within 40 bits (both of them copies found by eye).
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from configs import NEAR_DUP_THRESHOLD
from dataloaders.image_io import failure_reason, file_format, load_rgb

logger = logging.getLogger(__name__)

CROP_VIEWS = (1.0, 0.95, 0.9, 0.85, 0.8)  # share of each side kept by the central views that are hashed
HASH_SIZE = 16  # pHash of the 64x64 grey image's 16x16 lowest frequencies: 256 bits
HASH_WORDS = HASH_SIZE * HASH_SIZE // 64
NEAR_DUPLICATE_BITS = NEAR_DUP_THRESHOLD.default  # default match threshold (of 256 bits), measured as above
ROW_CHUNK = 64  # rows of the distance matrix computed together: bounds memory for large folders


@dataclass(frozen=True)
class Fingerprint:
    pixel_hash: str
    phash_views: np.ndarray  # (len(CROP_VIEWS), HASH_WORDS) uint64: the pHash of each central view
    width: int  # upright (after EXIF orientation)
    height: int
    file_format: str
    file_bytes: int


def _central(img: Image.Image, keep: float) -> Image.Image:
    if keep >= 1.0:
        return img
    width, height = img.size
    dx, dy = int(width * (1 - keep) / 2), int(height * (1 - keep) / 2)
    return img.crop((dx, dy, width - dx, height - dy))


def _phash_words(img: Image.Image) -> np.ndarray:
    import imagehash

    bits = imagehash.phash(img, hash_size=HASH_SIZE).hash.flatten()
    return np.packbits(bits).view(">u8").astype(np.uint64)  # HASH_WORDS words, for fast XOR + popcount


def fingerprint(path: Path) -> Fingerprint:
    """Decode ``path`` once (as the model sees it: upright RGB) and hash it; raises on an unreadable image."""
    rgb = load_rgb(path)
    pixels = np.asarray(rgb)
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=16)
    digest.update(str(pixels.shape).encode())
    return Fingerprint(digest.hexdigest(), hash_views(rgb), rgb.width, rgb.height, file_format(path),
                       path.stat().st_size)


def hash_views(rgb: Image.Image) -> np.ndarray:
    """(len(CROP_VIEWS), HASH_WORDS) pHash words of the image and its central views."""
    grey = rgb.convert("L")
    return np.stack([_phash_words(_central(grey, keep)) for keep in CROP_VIEWS])


def view_distance(a: np.ndarray, b: np.ndarray) -> int:
    """The match distance of two images' ``hash_views``: the whole of one against any view of the other."""
    forward = np.bitwise_count(a[0][None, :] ^ b).sum(-1).min()
    backward = np.bitwise_count(a ^ b[0][None, :]).sum(-1).min()
    return int(min(forward, backward))


def fingerprint_all(paths: list[Path], num_threads: int) -> tuple[list[Optional[Fingerprint]], dict[Path, str]]:
    """Fingerprints in ``paths`` order (None where unreadable) and the unreadable files with their reasons."""
    def safe(path: Path) -> tuple[Optional[Fingerprint], Optional[str]]:
        try:
            return fingerprint(path), None
        except Exception as err:  # noqa: BLE001 - Pillow raises many types; the audit lists them and goes on
            return None, failure_reason(path, err)

    # Decoding and resizing release the GIL, so threads share the work.
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(pool.map(safe, paths))
    unreadable = {path: reason for path, (_, reason) in zip(paths, results) if reason is not None}
    return [fp for fp, _ in results], unreadable


def exact_pairs(prints: list[Fingerprint]) -> Iterator[tuple[int, int]]:
    """Index pairs (i < j) with identical decoded pixels."""
    by_hash: dict[str, list[int]] = {}
    for i, fp in enumerate(prints):
        by_hash.setdefault(fp.pixel_hash, []).append(i)
    for members in by_hash.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                yield members[a], members[b]


def near_pairs(prints: list[Fingerprint], threshold: int) -> Iterator[tuple[int, int, int]]:
    """Index pairs (i < j) whose perceptual distance (the smallest Hamming distance between the whole of one image
    and any central view of the other) is at most ``threshold`` bits, with that distance."""
    if len(prints) < 2:
        return
    views = np.stack([fp.phash_views for fp in prints])  # (n, views, words)
    whole = views[:, 0]
    for start in range(0, len(prints), ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        # whole(i) against every view of j, and every view of i against whole(j)
        forward = np.bitwise_count(whole[rows, None, None, :] ^ views[None, :, :, :]).sum(-1, dtype=np.int32).min(-1)
        backward = np.bitwise_count(views[rows, None, :, :] ^ whole[None, :, None, :]).sum(-1, dtype=np.int32).min(-1)
        distance = np.minimum(forward, backward)
        for i_local, j in zip(*np.nonzero(distance <= threshold)):
            i = start + int(i_local)
            if i < j:
                yield i, int(j), int(distance[i_local, j])
