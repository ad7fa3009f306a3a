"""Class probabilities from a batch, by PyTorch or ONNX Runtime, with optional flip test-time augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.device import onnx_providers
from utils.errors import UserError


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class TorchPredictor:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> np.ndarray:
        return self.model(images.to(self.device)).float().cpu().numpy()


class OnnxPredictor:
    """Runs an exported classifier; its single input is the preprocessed batch, its first output the logits."""

    def __init__(self, path: str | Path, n_class: int, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX model not found: {path}; export one with quantize_onnx_models.py or pass "
                            f"--onnx_model FILE")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=onnx_providers(device.type))
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"cannot load ONNX model {path}: {str(err).splitlines()[0]}") from err
        self.input_name = self.session.get_inputs()[0].name
        output = self.session.get_outputs()[0]
        self.outputs_probabilities = "prob" in output.name.lower()
        width = output.shape[-1] if output.shape else None
        if isinstance(width, int) and width != n_class:
            raise UserError(f"{path} outputs {width} classes but the run folder records {n_class}")

    def logits(self, images: torch.Tensor) -> np.ndarray:
        out = self.session.run(None, {self.input_name: images.numpy().astype(np.float32)})[0]
        return np.log(np.clip(out, 1e-12, None)) if self.outputs_probabilities else out


def predict_proba(predictor: Any, images: torch.Tensor, tta: bool = False, temperature: float = 1.0) -> np.ndarray:
    """Softmax probabilities of ``logits / temperature`` (the run's fitted temperature scaling); with ``tta`` the
    logits are the mean of the image's and its horizontal mirror's, as main.py computed them when it fitted the
    temperature and reported the test metrics."""
    logits = predictor.logits(images)
    if tta:
        logits = (logits + predictor.logits(torch.flip(images, dims=[3]))) / 2
    return softmax(logits / temperature)
