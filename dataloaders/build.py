"""DataLoaders for the train/val/test splits with seeded shuffling and worker seeding."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from dataloaders.datasets import ImageSamples, collate_skip_none
from dataloaders.discovery import Sample
from dataloaders.image_io import load_rgb
from utils.seed import seed_worker


def effective_workers(requested: int) -> int:
    return max(0, min(requested, os.cpu_count() or 1))


def make_loader(samples: list[Sample], transform: Callable, batch_size: int, num_workers: int, *,
                train: bool, generator: Optional[torch.Generator] = None, pin_memory: bool = False,
                decoder: Callable = load_rgb, sampler: Optional[Sampler] = None) -> DataLoader:
    workers = effective_workers(num_workers)
    return DataLoader(
        ImageSamples(samples, transform, decoder),
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
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


def class_frequency_sampler(labels: list[int], generator: torch.Generator, power: float = 0.0
                            ) -> WeightedRandomSampler:
    """Draws class ``k`` with probability proportional to ``count_k ** power`` (with replacement; one epoch = as many
    draws as training images): ``power`` 0 draws every class equally often (balanced), 1 is the natural frequency,
    0.5 square-root sampling. Each image of a class is equally likely, so a small class's few images repeat more."""
    counts = torch.bincount(torch.as_tensor(labels)).double()
    weights = counts.pow(power - 1.0)[torch.as_tensor(labels)]
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)


def balanced_sampler(labels: list[int], generator: torch.Generator) -> WeightedRandomSampler:
    """Draws every class equally often (with replacement), one epoch = as many draws as training images."""
    return class_frequency_sampler(labels, generator, power=0.0)
