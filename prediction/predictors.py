"""Class probabilities from a batch, by PyTorch or ONNX Runtime, with optional flip test-time augmentation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from utils.cpu import cpu_description, int8_pairs_saturate
from utils.device import prefers_channels_last
from utils.errors import UserError
from utils.onnx_runtime import create_session

logger = logging.getLogger(__name__)
_warned_saturation: set[Path] = set()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class TorchPredictor:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.channels_last = prefers_channels_last(device)
        self.model = model.to(device).eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.device = device

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> np.ndarray:
        images = images.to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images).float().cpu().numpy()


class OnnxPredictor:
    """Runs an exported classifier; its single input is the preprocessed batch, its first output the logits."""

    def __init__(self, path: str | Path, n_class: int, device: torch.device, threads: int = 0,
                 input_size: Optional[tuple[int, int, int]] = None):
        """``input_size`` (channels, height, width): the run's, checked against the file's fixed input shape."""
        path = Path(path)
        self.path = path
        self.session = create_session(path, device.type, threads,
                                      missing_hint="export one with quantize_onnx_models.py or pass --onnx_model FILE")
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        fixed = list(model_input.shape[1:]) if model_input.shape else []
        if input_size is not None and len(fixed) == 3 and all(isinstance(d, int) for d in fixed) \
                and tuple(fixed) != tuple(input_size):
            raise UserError(f"{path} takes {'x'.join(map(str, fixed))} inputs but the run folder's preprocessing "
                            f"makes {'x'.join(map(str, input_size))}; export this run with quantize_onnx_models.py "
                            f"or pass the --model_path it was exported from")
        _warn_if_int8_saturates(path, self.session.get_modelmeta().custom_metadata_map)
        output = self.session.get_outputs()[0]
        self.outputs_probabilities = "prob" in output.name.lower()
        width = output.shape[-1] if output.shape else None
        if isinstance(width, int) and width != n_class:
            raise UserError(f"{path} outputs {width} classes but the run folder records {n_class}")

    def logits(self, images: torch.Tensor) -> np.ndarray:
        out = self.session.run(None, {self.input_name: images.numpy().astype(np.float32)})[0]
        return np.log(np.clip(out, 1e-12, None)) if self.outputs_probabilities else out


def _warn_if_int8_saturates(path: Path, metadata: dict[str, str]) -> None:
    """Once per file: an INT8 file with 8-bit weights everywhere (--int8_target_cpu vnni, and every file exported
    before that option) runs on saturating uint8 x int8 kernels on x86 CPUs without VNNI, so its answers here can
    differ from those its export checked."""
    if metadata.get("precision") != "int8" or metadata.get("int8_target_cpu", "vnni") != "vnni" \
            or path in _warned_saturation or not int8_pairs_saturate():
        return
    _warned_saturation.add(path)
    logger.warning("%s has 8-bit INT8 weights, whose products ONNX Runtime adds in 16 bits on this CPU (%s, no "
                   "VNNI) and can saturate: its answers may differ from those its export checked; export it again "
                   "with quantize_onnx_models.py --int8_target_cpu any", path, cpu_description())


class ExecuTorchPredictor:
    """Runs an ExecuTorch program (.pte, from quantize_onnx_models.py --targets executorch) with ExecuTorch's own
    runtime and its XNNPACK kernels; the program takes one image, so a batch is run image by image."""

    def __init__(self, path: str | Path, n_class: int):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} not found; export one with quantize_onnx_models.py --targets onnx,executorch")
        try:
            from executorch.runtime import Runtime
        except ImportError as err:
            raise UserError(f"running {path} needs the executorch package ({err}); install requirements.txt") from err
        self.path = path
        try:
            self.method = Runtime.get().load_program(path).load_method("forward")
        except Exception as err:  # noqa: BLE001 - the runtime raises RuntimeError/ValueError on a bad file
            raise UserError(f"{path} is not an ExecuTorch program this runtime can load ({err}); export it again "
                            f"with quantize_onnx_models.py --targets onnx,executorch") from err
        self.n_class = n_class

    def logits(self, images: torch.Tensor) -> np.ndarray:
        rows = [self.method.execute([image[None].contiguous()])[0] for image in images.float()]
        out = torch.cat([torch.as_tensor(row).reshape(1, -1) for row in rows]).numpy()
        if out.shape[1] != self.n_class:
            raise UserError(f"{self.path} outputs {out.shape[1]} classes but the run folder records {self.n_class}")
        return out


def predict_proba(predictor: Any, images: torch.Tensor, tta: bool = False, temperature: float = 1.0,
                  batch_size: int = 0) -> np.ndarray:
    """Softmax probabilities of ``logits / temperature`` (the run's fitted temperature scaling); with ``tta`` the
    logits are the mean of the image's and its horizontal mirror's, as main.py computed them when it fitted the
    temperature and reported the test metrics. ``batch_size``: score that many images at a time (0: all at once)."""
    if batch_size and len(images) > batch_size:
        return np.concatenate([predict_proba(predictor, images[i:i + batch_size], tta, temperature)
                               for i in range(0, len(images), batch_size)])
    logits = predictor.logits(images)
    if tta:
        logits = (logits + predictor.logits(torch.flip(images, dims=[3]))) / 2
    return softmax(logits / temperature)


def onnx_probs(path: str | Path, images: torch.Tensor, n_class: int, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities of an ONNX classifier on the CPU (export verification), ``batch_size`` at a time."""
    return predict_proba(OnnxPredictor(path, n_class, torch.device("cpu")), images, batch_size=batch_size)
