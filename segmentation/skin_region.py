"""The skin-region input, defined once for training and inference: skin mask -> crop -> fill the non-skin pixels.

A model trained with ``--input_kind skin_region`` sees images made by ``skin_region_image``; the masks are computed
once per dataset and parser and cached beside the dataset (``<data_dir>/.skin_masks/<parser key>/``, a hidden
folder that dataset discovery ignores), and inference_with_segmentation.py builds its inputs with the same function.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np
from PIL import Image

from dataloaders.image_io import decoded_size, load_rgb, reduced_decoder
from utils.atomic import atomic_save
from utils.errors import UserError
from utils.progress import Progress

if TYPE_CHECKING:  # types only: the run contract sits above this package
    from configs import SegmentationOptions
    from dataloaders.splits import DataSplits
    from dataloaders.transforms import Preprocessing
    from runs.run_info import RunInfo

logger = logging.getLogger(__name__)

DEFAULT_PARTS = ("skin", "nose")
MIN_SKIN_RATIO = 0.01  # below 1% of the pixels there is no face worth classifying
CROP_MARGIN = 0.05  # share of the skin box added on each side, so lesions at the skin's edge keep some context
MASK_CACHE_DIR = ".skin_masks"
# The face parser sees large JPEGs decoded at the smallest DCT scale that keeps this many pixels on the shorter side
# (SegFormer parses at 512x512; the Haar detector's smallest face is 15% of the shorter side), in training and
# inference alike, so both get the same mask; a 12-megapixel photo is parsed at 1008x756 rather than 4032x3024.
PARSE_MIN_SIDE = 512


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def select_parts(id2label: dict[int, str], parts: Optional[Iterable[str]]) -> list[int]:
    """Label values that count as skin. Default: the parser's 'skin' and 'nose' labels, matched by name."""
    by_name = {_normalise(name): value for value, name in id2label.items()}
    available = ", ".join(sorted(id2label.values()))
    if parts is None:
        chosen = [by_name[p] for p in DEFAULT_PARTS if p in by_name]
        if not chosen:
            raise UserError(f"the face parser has no 'skin' or 'nose' label; pass --parts from: {available}")
        return sorted(chosen)
    names = [p for p in (_normalise(p) for p in parts) if p]
    unknown = [p for p in names if p not in by_name]
    if unknown or not names:
        raise UserError(f"--parts {','.join(unknown) or '(empty)'}: not a label of this face parser; choose from "
                        f"{available}")
    return sorted({by_name[p] for p in names})


def parse_parts_flag(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None or not value.strip() else [p for p in value.split(",") if p.strip()]


def part_names(id2label: dict[int, str], part_ids: list[int]) -> list[str]:
    return [id2label[i] for i in part_ids]


def skin_mask(label_map: np.ndarray, part_ids: list[int]) -> np.ndarray:
    return np.isin(label_map, part_ids)


@dataclass
class SkinRegion:
    image: np.ndarray  # what the classifier sees (the full image when no face was found)
    mask: np.ndarray
    face_found: bool
    skin_ratio: float


def region_box(mask: np.ndarray, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the mask's bounding box plus ``margin`` of its size on each side."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    pad_y = int(round((rows.max() - rows.min() + 1) * margin))
    pad_x = int(round((cols.max() - cols.min() + 1) * margin))
    return (max(0, rows.min() - pad_y), min(height, rows.max() + 1 + pad_y),
            max(0, cols.min() - pad_x), min(width, cols.max() + 1 + pad_x))


def skin_region_image(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int],
                      margin: float = CROP_MARGIN) -> np.ndarray:
    """Crop ``image`` to the mask's bounding box (plus ``margin``) and paint non-skin pixels with ``fill``."""
    top, bottom, left, right = region_box(mask, margin)
    region = image[top:bottom, left:right].copy()
    region[~mask[top:bottom, left:right]] = fill
    return region


def is_face(mask: np.ndarray, detector_says_face: Optional[bool] = None) -> bool:
    return bool(mask.size) and float(mask.mean()) >= MIN_SKIN_RATIO and detector_says_face is not False


def make_skin_region(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int],
                     detector_says_face: Optional[bool] = None) -> SkinRegion:
    face_found = is_face(mask, detector_says_face)
    region = skin_region_image(image, mask, fill) if face_found else image
    return SkinRegion(region, mask, face_found, float(mask.mean()) if mask.size else 0.0)


def load_for_parsing(path: str | Path, reduced: bool = True) -> Image.Image:
    """The photo as the face parser sees it (see PARSE_MIN_SIDE); ``reduced=False`` decodes every pixel."""
    return load_rgb(path, min_side=PARSE_MIN_SIDE if reduced else 0)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` at (width, height) ``size``: a mask found on one decode of a photo, applied to another."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127


def classifier_input(path: str | Path, mask: Optional[np.ndarray], fill: tuple[int, int, int], min_side: int = 0,
                     decoded: Optional[Image.Image] = None) -> Image.Image:
    """What a skin-region model sees of the photo at ``path``: its skin region (``mask`` found on any decode of the
    photo; None means no face, and the whole photo is used).

    ``min_side``: the pixels the classifier's resize needs on the shorter side of its input (see
    ``transforms.decode_min_side``; 0 decodes every pixel). A large JPEG is decoded at the smallest DCT scale that
    leaves the skin box that many pixels, so a face that fills the frame decodes at 1/4 or 1/8 and a small face at a
    finer scale. ``decoded``: a decode already at hand (the parser's), used when it is fine enough.
    """
    need = min_side
    if mask is not None and min_side:
        top, bottom, left, right = region_box(mask)
        need = math.ceil(min_side * min(mask.shape) / max(1, min(bottom - top, right - left)))
    if decoded is None or min(decoded.size) < min(decoded_size(path, need)):
        decoded = load_rgb(path, min_side=need)
    if mask is None:
        return decoded
    if mask.shape != (decoded.height, decoded.width):
        mask = resize_mask(mask, decoded.size)
    return Image.fromarray(skin_region_image(np.asarray(decoded), mask, fill))


def fill_colour(preprocessing: "Preprocessing") -> tuple[int, int, int]:
    """The normalisation mean as 8-bit RGB: non-skin pixels become zero after normalisation."""
    return tuple(int(round(m * 255)) for m in preprocessing.mean)  # type: ignore[return-value]


def settings_key(settings: dict[str, Any]) -> str:
    """A folder name for one parser + parts combination; different settings never share cached masks."""
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{settings['seg_backend']}-{settings.get('seg_model') or ''}")
    digest = hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:10]
    return f"{readable[:60]}-{digest}"


class MaskCache:
    """Binary skin masks (PNG, 0/255, at the size the parser saw the image, see PARSE_MIN_SIDE) under
    ``<data_root>/.skin_masks/<key>/<relative>.png``."""

    def __init__(self, data_root: str | Path, settings: dict[str, Any]):
        self.data_root = Path(data_root)
        self.folder = self.data_root / MASK_CACHE_DIR / settings_key(settings)

    def path_for(self, image_path: Path) -> Path:
        try:
            relative = Path(image_path).resolve().relative_to(self.data_root.resolve())
        except ValueError:  # an image outside the dataset root: key it by its full path instead
            relative = Path(hashlib.sha1(str(Path(image_path).resolve()).encode()).hexdigest())
        return self.folder / relative.with_name(relative.name + ".png")

    def read(self, image_path: Path) -> Optional[np.ndarray]:
        path = self.path_for(image_path)
        if not path.is_file():
            return None
        with Image.open(path) as mask:
            return np.asarray(mask.convert("L")) > 127

    def write(self, image_path: Path, mask: np.ndarray) -> None:
        atomic_save(self.path_for(image_path),
                    lambda tmp: Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG"))

    def fill_missing(self, image_paths: list[Path], parser: Any, part_ids: list[int]) -> dict[str, int]:
        """Compute masks that are not cached yet; returns counts of computed, cached, no-face and failed images."""
        missing = [p for p in image_paths if not self.path_for(p).is_file()]
        counts = {"cached": len(image_paths) - len(missing), "computed": 0, "no_face": 0, "failed": 0}
        if missing:
            logger.info("computing skin masks for %d image(s) into %s", len(missing), self.folder)
        for path in Progress(missing, "skin masks", unit="image"):
            try:
                image = np.asarray(load_for_parsing(path))
            except Exception:  # noqa: BLE001 - unreadable files were already reported by discovery
                counts["failed"] += 1
                continue
            label_map = parser.parse(image)
            mask = skin_mask(label_map, part_ids)
            if parser.face_detected(label_map) is False or mask.mean() < MIN_SKIN_RATIO:
                counts["no_face"] += 1
                mask = np.zeros_like(mask)  # an empty mask means "no face": the full image is used
            self.write(path, mask)
            counts["computed"] += 1
        return counts


class SkinRegionDecoder:
    """Dataset image loader for skin-region runs: the photo cut to its cached skin mask, decoded at the scale that
    leaves the skin box ``min_side`` pixels (``classifier_input``; 0: every pixel). Picklable."""

    def __init__(self, cache: MaskCache, fill: tuple[int, int, int], min_side: int = 0):
        self.cache = cache
        self.fill = fill
        self.min_side = min_side

    def __call__(self, path: Path) -> Image.Image:
        mask = self.cache.read(path)
        if mask is not None and (mask.mean() < MIN_SKIN_RATIO or not self._fits(path, mask)):
            mask = None  # no face found (or a mask from an edited file): the whole photo, as at inference
        return classifier_input(path, mask, self.fill, self.min_side)

    @staticmethod
    def _fits(path: Path, mask: np.ndarray) -> bool:
        # Masks are stored at the parser's decode; masks cached before reduced decoding are at the photo's full size.
        size = (mask.shape[1], mask.shape[0])
        return size == decoded_size(path, PARSE_MIN_SIDE) or size == decoded_size(path)


def cache_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a mask (the parser and the parts), the key of the mask cache."""
    return {k: settings.get(k) for k in ("seg_backend", "seg_model", "seg_revision", "parts")}


def region_settings(parser_description: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """What class_info.json records about a skin-region run (and what inference compares against)."""
    return {**parser_description, "parts": parts, "fill": "normalisation mean", "crop_margin": CROP_MARGIN,
            "min_skin_ratio": MIN_SKIN_RATIO, "no_face": "full_image"}


def image_decoder_for_run(info: "RunInfo", data_root: str | Path, min_side: int = 0):
    """``load_rgb`` for whole-image runs (JPEGs decoded at a reduced size that keeps ``min_side`` pixels on the
    shorter side, see ``image_io.load_rgb``); the cached-mask loader for skin-region runs (masks must exist; the
    skin box keeps ``min_side`` pixels)."""
    if info.input_kind != "skin_region":
        return reduced_decoder(min_side)
    cache = MaskCache(data_root, cache_settings(info.skin_region))
    if not cache.folder.is_dir():
        raise UserError(f"skin masks for this run are not in {cache.folder}; run main.py --resume or retrain so "
                        f"they are computed")
    return SkinRegionDecoder(cache, fill_colour(info.preprocessing), min_side)


def prepare_skin_masks(options: "SegmentationOptions", data_root: Path, splits: "DataSplits",
                       device: Any) -> dict[str, Any]:
    """Compute (or reuse) every image's skin mask; returns the settings class_info.json records."""
    from segmentation.face_parsing import build_face_parser

    parser = build_face_parser(options.seg_backend, options.seg_model, options.seg_revision, device.type)
    part_ids = select_parts(parser.id2label, parse_parts_flag(options.parts))
    settings = region_settings(parser.describe(), part_names(parser.id2label, part_ids))
    cache = MaskCache(data_root, cache_settings(settings))
    paths = [s.path for s in splits.train + splits.val + splits.test]
    counts = cache.fill_missing(paths, parser, part_ids)
    logger.info("skin masks (%s, parts %s): %d cached, %d computed, %d without a face (whole image used), "
                "%d unreadable", settings["seg_backend"], ",".join(settings["parts"]), counts["cached"],
                counts["computed"], counts["no_face"], counts["failed"])
    return settings
