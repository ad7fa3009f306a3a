"""DataLoaders for the train/val/test splits with seeded shuffling and worker seeding."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from dataloaders.datasets import ImageSamples, collate_skip_none
from dataloaders.discovery import Sample
from dataloaders.image_io import load_rgb
from utils.seed import seed_worker


def effective_workers(requested: int) -> int:
    return max(0, min(requested, os.cpu_count() or 1))


def make_loader(samples: list[Sample], transform: Callable, batch_size: int, num_workers: int, *,
                train: bool, generator: Optional[torch.Generator] = None, pin_memory: bool = False,
                loader: Callable = load_rgb) -> DataLoader:
    workers = effective_workers(num_workers)
    return DataLoader(
        ImageSamples(samples, transform, loader),
        batch_size=batch_size,
        shuffle=train,
        # Full batches only while training: BatchNorm fails on a last batch of one image.
        drop_last=train and len(samples) > batch_size,
        num_workers=workers,
        collate_fn=collate_skip_none,
        worker_init_fn=seed_worker,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
