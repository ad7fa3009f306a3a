"""Checkpoints: written atomically, loaded without unpickling code (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from custom_models import register_custom_models
from utils.atomic import atomic_save
from utils.errors import UserError

if TYPE_CHECKING:
    from runs.run_info import RunInfo


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




def load_run_model(run_dir: str | Path, weights: str = "final") -> tuple[torch.nn.Module, "RunInfo"]:
    """Rebuild a trained model from a run folder alone: architecture and classes from class_info.json, weights
    from the delivered checkpoint (``final``: model_refit.pth after a refit, else model_best.pth), model_best.pth
    (the best validation epoch) or model_last.pth. Returns ``(model in eval mode on CPU, run info)``."""
    import timm

    from runs.run_folder import RunDir
    from runs.run_info import read_run_info

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}; pass the folder main.py printed at the end of training")
    info = read_run_info(run_dir)
    ckpt_path = RunDir(run_dir).checkpoint(weights, info.weights)
    if not ckpt_path.is_file():
        raise UserError(f"{ckpt_path} is missing; the run may not have finished (try --weights "
                        f"{'last' if weights != 'last' else 'best'})")
    state = load_checkpoint(ckpt_path)
    state = state.get("model", state) if isinstance(state, dict) else state
    register_custom_models()  # a run of an own architecture (custom_models/) rebuilds like any timm model
    if not timm.is_model(info.timm_model_name):
        raise UserError(f"{run_dir / RunDir.CLASS_INFO}: timm_model_name {info.timm_model_name!r} is not a model this "
                        f"timm knows; restore the file or install the timm version the run was trained with")
    try:
        model = timm.create_model(info.timm_model_name, pretrained=False, num_classes=info.n_class,
                                  **info.model_kwargs)
    except (TypeError, ValueError) as err:  # an argument the architecture does not take, or a bad value
        raise UserError(f"{run_dir / RunDir.CLASS_INFO}: model_kwargs {info.model_kwargs} do not build "
                        f"{info.timm_model_name} ({str(err).splitlines()[0]})") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"{ckpt_path} does not fit {info.timm_model_name} with {info.n_class} classes as recorded "
                        f"in class_info.json ({detail})") from err
    return model.eval(), info
