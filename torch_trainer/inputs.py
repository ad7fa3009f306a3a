"""How a training run reads its photos: the decoded-image cache (--cache_images) for whole-photo runs, the cached
skin-region loader for skin-region runs, else a plain (reduced-size for large JPEGs) decode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from dataloaders.image_cache import IMAGE_CACHE_DIR, CachedDecoder
from dataloaders.transforms import decode_min_side
from segmentation.skin_region import image_decoder_for_run

if TYPE_CHECKING:
    from runs.run_info import RunInfo

logger = logging.getLogger(__name__)


def training_image_decoders(info: "RunInfo", data_root: Path, min_crop_scale: float, cache_images: bool = False,
                           cache_dir: Optional[str] = None) -> tuple[Callable, Callable]:
    """How evaluation and training read a photo: decoded at the size each transform needs (reduced for large
    JPEGs; training's random crops need more pixels, see ``min_crop_scale``), through the decoded-image cache with
    ``cache_images``."""
    pre = info.preprocessing
    sides = decode_min_side(pre), decode_min_side(pre, min_crop_scale)
    if cache_images and info.input_kind == "full_image":
        cache_root = Path(cache_dir) if cache_dir else data_root / IMAGE_CACHE_DIR
        logger.info("decoded-image cache: %s", cache_root)
        return CachedDecoder(cache_root, sides[0]), CachedDecoder(cache_root, sides[1])
    if cache_images:
        logger.warning("--cache_images applies to whole-photo runs; skin-region runs read their photos as before")
    return image_decoder_for_run(info, data_root, sides[0]), image_decoder_for_run(info, data_root, sides[1])
