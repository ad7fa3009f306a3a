"""Quantization-aware fine-tuning for the ONNX Runtime INT8 export.

A copy of the delivered model is fine-tuned for a few passes over the training images while every convolution and
linear layer sees its weights and its input the way ONNX Runtime's QDQ INT8 model will: weights rounded per output
channel to signed 8 bits, inputs rounded per tensor to unsigned 8 bits over their observed range (straight-through
gradients, torch's own fake-quantize ops). Its teacher is the FP32 model itself: the loss is the KL divergence from
the FP32 model's answers, which is what the export's agreement guard measures, so no labels are needed and the
tuned model learns to give FP32's answers under INT8 rounding rather than to chase the training labels further.
The tuned weights stay float: the result is exported and quantized by the same ONNX Runtime path and checked by the
same guard as the post-training INT8 file.

Why not PyTorch's PT2E flow: it now lives in torchao and lowers to ExecuTorch's kernels, not to the QDQ ONNX file
that ONNX Runtime runs here; rounding the same tensors the same way needs only two core torch ops.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

logger = logging.getLogger(__name__)

WEIGHT_QMAX = 127  # symmetric int8 weights, as ONNX Runtime's QInt8 per-channel weights
ACTIVATION_QMAX = 255  # uint8 activations, as QUInt8
RANGE_MOMENTUM = 0.99  # running min/max of each input, as PyTorch's moving-average observers


class _WeightFakeQuant(nn.Module):
    """Rounds a weight per output channel to symmetric int8 in the forward pass (straight-through gradient)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / WEIGHT_QMAX
        zero = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


class _InputFakeQuant:
    """Forward pre-hook: rounds a layer's input to uint8 over its running min/max (zero kept exact)."""

    def __init__(self):
        self.low, self.high = None, None

    def observe(self, x: torch.Tensor) -> None:
        low, high = float(x.detach().min()), float(x.detach().max())
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low = RANGE_MOMENTUM * self.low + (1 - RANGE_MOMENTUM) * low
            self.high = RANGE_MOMENTUM * self.high + (1 - RANGE_MOMENTUM) * high

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]):
        x = inputs[0]
        if module.training or self.low is None:
            self.observe(x)
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        scale = max(high - low, 1e-8) / ACTIVATION_QMAX
        zero_point = int(round(-low / scale))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, ACTIVATION_QMAX), *inputs[1:])


@dataclass
class QatResult:
    model: nn.Module  # the tuned copy, plain float weights (no fake-quant left in it)
    seconds: float
    steps: int
    final_kl: float  # mean KL from the FP32 answers over the last pass, in nats


def finetune_for_int8(model: nn.Module, images: list[Path], load_batch: Callable[[list[Path]], torch.Tensor],
                      epochs: int, lr: float = 1e-4, batch_size: int = 16, seed: int = 0) -> QatResult:
    """Fine-tune a copy of ``model`` for ``epochs`` passes over ``images`` under simulated INT8 (see the module
    docstring), taught by ``model``'s own answers. ``model`` is left unchanged."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    teacher = model.eval()
    student = copy.deepcopy(model)
    layers = [m for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _WeightFakeQuant())
        hooks.append(layer.register_forward_pre_hook(_InputFakeQuant()))
    # BatchNorm statistics and dropout stay as delivered: the tuning adjusts weights to the rounding, not to a new
    # data distribution (and batches of 16 would give noisy statistics).
    student.eval()
    for layer in layers:
        layer.train()  # the input observers follow the ranges while tuning
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    batches_per_epoch = math.ceil(len(images) / batch_size)
    total_steps = max(1, epochs * batches_per_epoch)
    step, last_pass = 0, []
    for epoch in range(epochs):
        shuffled = order.sample(images, len(images))
        last_pass = []
        for i in range(0, len(shuffled), batch_size):
            x = load_batch(shuffled[i:i + batch_size])
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            with torch.no_grad():
                target = teacher(x).log_softmax(1)
            loss = nn.functional.kl_div(student(x).log_softmax(1), target, log_target=True, reduction="batchmean")
            for group in optimizer.param_groups:  # cosine decay to zero over the whole tuning
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            last_pass.append(float(loss))
        logger.info("quantization-aware tuning: pass %d/%d, KL from FP32 %.4f", epoch + 1, epochs,
                    sum(last_pass) / max(len(last_pass), 1))
    for hook in hooks:
        hook.remove()
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    student.eval()
    return QatResult(student, time.perf_counter() - started, step,
                     sum(last_pass) / len(last_pass) if last_pass else float("nan"))
