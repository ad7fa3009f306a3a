"""A map-style dataset over discovered samples that survives files going bad after discovery."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from PIL import Image
from torch.utils.data import Dataset, default_collate

from dataloaders.discovery import Sample
from dataloaders.image_io import load_rgb

logger = logging.getLogger(__name__)


class ImageSamples(Dataset):
    def __init__(self, samples: list[Sample], transform: Optional[Callable] = None,
                 decoder: Callable[[Path], Image.Image] = load_rgb):
        self.samples = samples
        self.transform = transform
        self.decode = decoder  # load_rgb, or the skin-region decoder for runs trained on skin regions

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:  # the transform too: an image that decodes but cannot be resized is skipped like any other
            image = self.decode(sample.path)
            if self.transform is not None:
                image = self.transform(image)
        except Exception as err:  # noqa: BLE001 - a file that broke after discovery must not end the epoch
            logger.warning("skipping %s in this batch: %s", sample.path, err)
            return None
        return image, sample.label, index


def collate_skip_none(batch):
    """Drop samples that failed to load; an all-failed batch becomes None, which the trainer skips."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return default_collate(batch)
