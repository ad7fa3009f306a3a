"""Images to classify: a folder (searched recursively) or one file, streamed in batches; bad files are reported."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from dataloaders.build import effective_workers
from dataloaders.discovery import list_images
from dataloaders.image_io import IMAGE_EXTENSIONS, failure_reason, load_rgb, looks_like_image
from utils.errors import UserError


def collect_inference_images(path: str | Path, flag: str = "--inference_folder") -> tuple[Path, list[Path]]:
    """Return ``(root, images)``; file names in the outputs are relative to ``root``."""
    path = Path(path)
    if path.is_file():
        if not looks_like_image(path):
            raise UserError(f"{path} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return path.parent, [path]
    if not path.is_dir():
        raise UserError(f"{flag} {path} not found; pass a folder of images or one image file")
    images = list_images(path)
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {path} or its sub-folders")
    return path, images


class InferenceImages(Dataset):
    """``(transform(picture), index, size)`` per path, or ``(None, index, reason)`` for a file that does not decode;
    ``min_side`` as in ``image_io.load_rgb`` (0 decodes every pixel)."""

    def __init__(self, paths: list[Path], transform: Callable, min_side: int = 0):
        self.paths = paths
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:  # the transform too: an image that decodes but cannot be resized is skipped like any other
            image = load_rgb(self.paths[index], min_side=self.min_side)
            return self.transform(image), index, image.size
        except Exception as err:  # noqa: BLE001 - any undecodable file is reported, never fatal
            return None, index, failure_reason(self.paths[index], err)


def collate_inference(batch):
    """``(images or None, indices, original sizes, [(index, reason), ...])``."""
    good = [item for item in batch if item[0] is not None]
    failed = [(item[1], item[2]) for item in batch if item[0] is None]
    images = torch.stack([item[0] for item in good]) if good else None
    return images, [item[1] for item in good], [item[2] for item in good], failed


def make_inference_loader(paths: list[Path], transform: Callable, batch_size: int, num_workers: int,
                          min_side: int = 0) -> DataLoader:
    workers = effective_workers(num_workers)
    return DataLoader(InferenceImages(paths, transform, min_side), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_inference, prefetch_factor=2 if workers > 0 else None)


def load_preprocessed(paths: list[Path], transform, decoder: Callable = load_rgb) -> torch.Tensor:
    """A batch of preprocessed images, decoded in this process (export calibration and verification)."""
    return torch.stack([transform(decoder(p)) for p in paths])
