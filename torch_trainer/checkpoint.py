"""Checkpoints: written atomically, loaded without unpickling code (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.atomic import atomic_save
from utils.errors import UserError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_save(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickles carrying code, RuntimeError for truncated files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint {path} (only plain tensors and values are accepted): "
                        f"{first_line}") from err
