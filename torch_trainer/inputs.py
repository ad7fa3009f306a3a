"""How a training run reads its photos: the decoded-image cache (--cache_images) for whole-photo runs, the cached
skin-region loader for skin-region runs, else a plain (reduced-size for large JPEGs) decode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dataloaders.image_cache import IMAGE_CACHE_DIR, CachedLoader
from dataloaders.transforms import decode_min_side
from segmentation.skin_region import image_loader_for_run

if TYPE_CHECKING:
    from configs import TrainConfig
    from runs.run_info import RunInfo

logger = logging.getLogger(__name__)


def training_image_loaders(cfg: "TrainConfig", info: "RunInfo") -> tuple[Callable, Callable]:
    """How evaluation and training read a photo: decoded at the size each transform needs (reduced for large
    JPEGs), through the decoded-image cache with --cache_images."""
    root, pre = cfg.resolved_data_dir, info.preprocessing
    sides = decode_min_side(pre), decode_min_side(pre, cfg.min_crop_scale)
    if cfg.cache_images and info.input_kind == "full_image":
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else root / IMAGE_CACHE_DIR
        logger.info("decoded-image cache: %s", cache_root)
        return CachedLoader(cache_root, sides[0]), CachedLoader(cache_root, sides[1])
    if cfg.cache_images:
        logger.warning("--cache_images applies to whole-photo runs; skin-region runs read their photos as before")
    return image_loader_for_run(info, root, sides[0]), image_loader_for_run(info, root, sides[1])
