"""Device selection shared by every script."""

from __future__ import annotations

import functools
import logging

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prefers_channels_last(device: torch.device) -> bool:
    """Convolutions run faster on NHWC tensors with cuDNN and with oneDNN on CPU: on a 2-core AVX-512 CPU, batch 32,
    EfficientNet-Lite0 at 192 px ran 1.43x faster in inference and 1.72x in training, EfficientNet-B0 at 224 px
    1.40x and 1.46x (benchmarks/memory_format.py, docs/measurements_speed.md)."""
    return device.type in ("cuda", "cpu")


def onnx_cuda_available() -> bool:
    """The CUDA provider ships only in the onnxruntime-gpu wheel, not in the plain onnxruntime one."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_providers(device: str, warn: bool = True) -> list[str]:
    """ONNX Runtime execution providers for ``device`` ('cpu' or 'cuda'); a CUDA request that this onnxruntime cannot
    serve runs on the CPU, said once per process so a GPU user knows where the ONNX model really ran."""
    if device == "cuda" and onnx_cuda_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda" and warn:
        _warn_no_onnx_cuda()
    return ["CPUExecutionProvider"]


@functools.lru_cache(maxsize=None)
def _warn_no_onnx_cuda() -> None:
    logger.warning("!!! this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu in place of "
                   "onnxruntime for GPU inference); ONNX models run on the CPU")
