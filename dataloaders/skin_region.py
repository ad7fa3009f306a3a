"""The skin-region input, defined once for training and inference: skin mask -> crop -> fill the non-skin pixels.

A model trained with ``--input_kind skin_region`` sees images made by ``skin_region_image``; the masks are computed
once per dataset and parser and cached beside the dataset (``<data_dir>/.skin_masks/<parser key>/``, a hidden
folder that dataset discovery ignores), and inference_with_segmentation.py builds its inputs with the same function.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataloaders.image_io import load_rgb, reduced_loader
from utils.atomic import atomic_save
from utils.errors import UserError

if TYPE_CHECKING:  # types only: the run contract sits above this package
    from configs import TrainConfig
    from dataloaders.splits import DataSplits
    from dataloaders.transforms import Preprocessing
    from torch_trainer.run_info import RunInfo

logger = logging.getLogger(__name__)

DEFAULT_PARTS = ("skin", "nose")
MIN_SKIN_RATIO = 0.01  # below 1% of the pixels there is no face worth classifying
CROP_MARGIN = 0.05  # share of the skin box added on each side, so lesions at the skin's edge keep some context
MASK_CACHE_DIR = ".skin_masks"
NO_FACE_POLICIES = ("skip", "full_image")


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


def skin_region_image(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int],
                      margin: float = CROP_MARGIN) -> np.ndarray:
    """Crop ``image`` to the mask's bounding box (plus ``margin``) and paint non-skin pixels with ``fill``."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    pad_y = int(round((rows.max() - rows.min() + 1) * margin))
    pad_x = int(round((cols.max() - cols.min() + 1) * margin))
    top, bottom = max(0, rows.min() - pad_y), min(height, rows.max() + 1 + pad_y)
    left, right = max(0, cols.min() - pad_x), min(width, cols.max() + 1 + pad_x)
    region = image[top:bottom, left:right].copy()
    region[~mask[top:bottom, left:right]] = fill
    return region


def make_skin_region(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int],
                     detector_says_face: Optional[bool] = None) -> SkinRegion:
    ratio = float(mask.mean()) if mask.size else 0.0
    face_found = ratio >= MIN_SKIN_RATIO and detector_says_face is not False
    region = skin_region_image(image, mask, fill) if face_found else image
    return SkinRegion(region, mask, face_found, ratio)


def fill_colour(preprocessing: "Preprocessing") -> tuple[int, int, int]:
    """The normalisation mean as 8-bit RGB: non-skin pixels become zero after normalisation."""
    return tuple(int(round(m * 255)) for m in preprocessing.mean)  # type: ignore[return-value]


def settings_key(settings: dict[str, Any]) -> str:
    """A folder name for one parser + parts combination; different settings never share cached masks."""
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{settings['seg_backend']}-{settings.get('seg_model') or ''}")
    digest = hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:10]
    return f"{readable[:60]}-{digest}"


class MaskCache:
    """Binary skin masks (PNG, 0/255, the image's size) under ``<data_root>/.skin_masks/<key>/<relative>.png``."""

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
        for path in tqdm(missing, desc="skin masks", disable=None):
            try:
                image = np.asarray(load_rgb(path))
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


class SkinRegionLoader:
    """Dataset image loader for skin-region runs: the decoded image cut to its cached skin mask (picklable)."""

    def __init__(self, cache: MaskCache, fill: tuple[int, int, int]):
        self.cache = cache
        self.fill = fill

    def __call__(self, path: Path) -> Image.Image:
        image = load_rgb(path)
        mask = self.cache.read(path)
        if mask is None or mask.shape != (image.height, image.width) or mask.mean() < MIN_SKIN_RATIO:
            return image  # no face found (or a mask from an edited file): the whole photo, as at inference
        return Image.fromarray(skin_region_image(np.asarray(image), mask, self.fill))


def cache_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a mask (the parser and the parts), the key of the mask cache."""
    return {k: settings.get(k) for k in ("seg_backend", "seg_model", "seg_revision", "parts")}


def region_settings(parser_description: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """What class_info.json records about a skin-region run (and what inference compares against)."""
    return {**parser_description, "parts": parts, "fill": "normalisation mean", "crop_margin": CROP_MARGIN,
            "min_skin_ratio": MIN_SKIN_RATIO, "no_face": "full_image"}


def image_loader_for_run(info: "RunInfo", data_root: str | Path, min_side: int = 0):
    """``load_rgb`` for whole-image runs (JPEGs decoded at a reduced size that keeps ``min_side`` pixels on the
    shorter side, see ``image_io.load_rgb``); the cached-mask loader for skin-region runs (masks must exist; their
    photos decode fully, since the masks are stored at the photo's full size)."""
    if info.input_kind != "skin_region":
        return reduced_loader(min_side)
    cache = MaskCache(data_root, cache_settings(info.skin_region))
    if not cache.folder.is_dir():
        raise UserError(f"skin masks for this run are not in {cache.folder}; run main.py --resume or retrain so "
                        f"they are computed")
    return SkinRegionLoader(cache, fill_colour(info.preprocessing))


def prepare_skin_masks(cfg: "TrainConfig", splits: "DataSplits", device: Any) -> dict[str, Any]:
    """Compute (or reuse) every image's skin mask; returns the settings class_info.json records."""
    from dataloaders.face_parsing import build_face_parser

    parser = build_face_parser(cfg.seg_backend, cfg.seg_model, cfg.seg_revision, device.type)
    part_ids = select_parts(parser.id2label, parse_parts_flag(cfg.parts))
    settings = region_settings(parser.describe(), part_names(parser.id2label, part_ids))
    cache = MaskCache(cfg.resolved_data_dir, cache_settings(settings))
    paths = [s.path for s in splits.train + splits.val + splits.test]
    counts = cache.fill_missing(paths, parser, part_ids)
    logger.info("skin masks (%s, parts %s): %d cached, %d computed, %d without a face (whole image used), "
                "%d unreadable", settings["seg_backend"], ",".join(settings["parts"]), counts["cached"],
                counts["computed"], counts["no_face"], counts["failed"])
    return settings
