"""Seeding for reproducible runs: python, numpy, torch, and each DataLoader worker."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels; on CUDA some ops are only deterministic with this (see REPRODUCIBILITY.md)."""
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch already gives each worker its own seed; numpy and random need it too."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def seed_epoch(seed: int, epoch: int, generator: torch.Generator) -> torch.Generator:
    """Reseed everything for one epoch: python/numpy/torch, and ``generator`` (the DataLoader's shuffling, sampler
    and worker seeds) in place, since the loader and sampler hold it. A different stream per epoch, the same on
    resume, so epoch N is identical whether a run went straight through or was resumed."""
    seed_everything(seed + epoch)
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator
