"""Quantization-aware fine-tuning for the ONNX Runtime INT8 export.

A copy of the delivered model is fine-tuned for a few passes over the training images while it computes the way
ONNX Runtime's QDQ INT8 file will: weights rounded per output channel to signed 8 bits, and every activation that
the INT8 file rounds (convolution and activation outputs, residual sums, the pooled features, the logits) rounded to
the same unsigned 8-bit grid, at the same place in the network (straight-through gradients, torch's own
fake-quantize ops). The places and grids are not guessed from the PyTorch modules: the FP32 file is quantized once
with ONNX Runtime (every node INT8, the export's calibration method and images), each QuantizeLinear's tensor is
computed by ONNX Runtime and found by value among the PyTorch modules' inputs and outputs, and its scale and zero
point are read from the file. Batch normalisation is not folded: per-channel symmetric rounding of a convolution's
weights gives the same grid before and after multiplying each output channel by its normalisation factor.

The teacher is the FP32 model itself: the loss is the KL divergence from the FP32 model's answers, which is what the
export's agreement guard measures, so no labels are needed and the tuned model learns to give FP32's answers under
INT8 rounding rather than to chase the training labels further. It learns on random views of the training images
(mirrored, shifted, zoomed), so it meets more near ties than the training folder holds, and the pass kept is the one
whose simulated INT8 agrees best with FP32 on the export's agreement-check images (pass 0, the delivered weights,
included): a tuning that lowers the training KL but moves more answers on other photos is not delivered. The tuned
weights stay float: the result is exported and quantized by the same ONNX Runtime path (calibrated anew) and checked
by the same guard as the post-training file.

Why not PyTorch's PT2E flow: it now lives in torchao and lowers to ExecuTorch's kernels, not to the QDQ ONNX file
that ONNX Runtime runs here; rounding the same tensors the same way needs only two core torch ops.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from deploy.int8_weights import WEIGHT_QMAX, kernel_kind, weight_scales

logger = logging.getLogger(__name__)

ACTIVATION_QMAX = 255  # uint8 activations, as QUInt8
# ONNX Runtime renames a graph output it quantizes (the logits) to <name> + this suffix inside the QDQ file.
QUANTIZED_OUTPUT_SUFFIX = "_QuantizeLinear_Input"
# A PyTorch tensor is the ONNX tensor when no element differs by more than this share of the tensor's largest
# magnitude (float32 rounding through folded batch norm stays far below it; a different tensor far above).
MATCH_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ActivationGrid:
    """One activation the INT8 file rounds: its ONNX name, where the PyTorch model computes it, and its uint8 grid."""

    tensor: str
    module: str  # qualified module name; "" is the model itself
    # "output": the module's result; "input": its first argument; "gate": the sigmoid inside a SiLU module, which
    # the ONNX file computes as Sigmoid then Mul and rounds in between.
    position: str
    scale: float
    zero_point: int


class _WeightFakeQuant(nn.Module):
    """Rounds a weight per output channel to the INT8 file's symmetric integers (deploy.int8_weights) in the forward
    pass (straight-through gradient)."""

    def __init__(self, target_cpu: str, depthwise: bool, adjacent_pairs: bool):
        super().__init__()
        self.target_cpu, self.depthwise, self.adjacent_pairs = target_cpu, depthwise, adjacent_pairs

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight_scales(weight, self.target_cpu, self.depthwise, self.adjacent_pairs)
        zero = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


def weight_rounding(layer: nn.Module, target_cpu: str) -> _WeightFakeQuant:
    """The rounding the INT8 file gives this layer's weights (deploy.onnx_quant.quantize_int8): depthwise
    convolutions (one input and one output channel per group) plain 8 bits; 1x1 convolutions and linear layers
    pair-safe along their input channels; other convolutions pair-safe for any order."""
    depthwise, adjacent = kernel_kind(getattr(layer, "groups", 1), layer.weight.shape)
    return _WeightFakeQuant(target_cpu, depthwise, adjacent)


def _round_to(grid: ActivationGrid, x: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, grid.scale, grid.zero_point, 0, ACTIVATION_QMAX)


@contextlib.contextmanager
def simulated_int8(model: nn.Module, grids: Sequence[ActivationGrid], target_cpu: str = "any"
                   ) -> Iterator[nn.Module]:
    """Inside the block ``model`` computes as the INT8 file does (weights of every convolution and linear layer
    rounded as ``target_cpu``'s file rounds them, and the activations in ``grids``); on leaving, its layers are plain
    float again (tuned weights kept)."""
    modules = dict(model.named_modules())
    layers = [m for m in modules.values() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks, gated = [], []
    try:
        for layer in layers:
            parametrize.register_parametrization(layer, "weight", weight_rounding(layer, target_cpu))
        for grid in grids:
            module = modules[grid.module]
            if grid.position == "gate":
                # An instance attribute shadows SiLU.forward until the block ends (deleted below).
                module.forward = lambda x, g=grid: x * _round_to(g, torch.sigmoid(x))
                gated.append(module)
            elif grid.position == "output":
                hooks.append(module.register_forward_hook(lambda _m, _i, out, g=grid: _round_to(g, out)))
            else:
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, inputs, g=grid: (_round_to(g, inputs[0]), *inputs[1:])))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for module in gated:
            del module.forward
        for layer in layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def int8_activation_grids(int8_path: Path) -> dict[str, tuple[float, int]]:
    """Every activation a QDQ file rounds (the input of each QuantizeLinear that is not a weight): its FP32 tensor's
    name and its (scale, zero point)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(int8_path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    grids = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        name = node.input[0].removesuffix(QUANTIZED_OUTPUT_SUFFIX)
        grids[name] = (float(constants[node.input[1]]), int(constants[node.input[2]]))
    return grids


def _onnx_tensors(model, names: Sequence[str], images: torch.Tensor) -> dict[str, np.ndarray]:
    """The values of the named tensors of a loaded FP32 ONNX model for ``images`` (each made a graph output for one
    run)."""
    from utils.onnx_runtime import session_with_outputs

    session = session_with_outputs(model, names)
    feed = {model.graph.input[0].name: images.numpy()}
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    values.update({name: array for name, array in feed.items()})
    return {name: values[name] for name in names if name in values}


def locate_activations(model: nn.Module, fp32_path: Path, grids: dict[str, tuple[float, int]],
                       images: torch.Tensor) -> tuple[list[ActivationGrid], list[str]]:
    """Find where ``model`` computes each tensor of ``grids`` (ONNX names from ``fp32_path``, the model's export):
    the module whose output (else input) has the tensor's values for ``images``. A tensor several modules pass on
    unchanged goes to the outermost module's output, so every consumer of it sees the rounding, as in the INT8 file.
    Returns the located grids and the names of tensors no module computes."""
    import onnx

    fp32 = onnx.load(str(fp32_path))  # read once for both uses below
    gate_of = _silu_gates(fp32.graph, list(grids))
    values = _onnx_tensors(fp32, [*grids, *gate_of.values()], images)
    silu_modules = {name for name, module in model.named_modules() if isinstance(module, nn.SiLU)}
    targets: dict[int, list[tuple[str, np.ndarray, float]]] = {}  # by element count
    for tensor in grids:
        target = values.get(gate_of.get(tensor, tensor))  # a SiLU's gate is found by the SiLU's output
        if target is not None:
            targets.setdefault(target.size, []).append((tensor, target.ravel(),
                                                        MATCH_TOLERANCE * (float(np.abs(target).max()) + 1e-6)))
    matches: dict[str, list[tuple[bool, int, str, str]]] = {tensor: [] for tensor in grids}

    def compare(module: str, position: str, value) -> None:
        # Compared as the forward runs, not kept: every module's input and output of a 192 px batch would take GBs.
        if not torch.is_tensor(value):
            return
        flat = value.detach().numpy().ravel()  # before any in-place activation overwrites it
        # Rounding is elementwise, so a reshaped copy (pooled [N, C, 1, 1] against [N, C]) is the same rounding.
        for tensor, target, tolerance in targets.get(flat.size, ()):
            if tensor in gate_of and (position != "output" or module not in silu_modules):
                continue
            if float(np.abs(flat - target).max()) <= tolerance:
                matches[tensor].append((position != "output", len(module), module, position))

    hooks = []
    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(
            lambda _m, inputs, n=name: compare(n, "input", inputs[0]) if inputs else None))
        hooks.append(module.register_forward_hook(lambda _m, _i, out, n=name: compare(n, "output", out)))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    located, missing = [], []
    for tensor, (scale, zero_point) in grids.items():
        if not matches[tensor]:
            missing.append(tensor)
            continue
        _, _, module, position = min(matches[tensor])
        located.append(ActivationGrid(tensor, module, "gate" if tensor in gate_of else position, scale, zero_point))
    return located, missing


def _silu_gates(graph, names: Sequence[str]) -> dict[str, str]:
    """Of ``names``, the Sigmoid outputs that gate their own input (x * sigmoid(x): a SiLU), each with the Mul's
    output tensor, by which the SiLU module is found."""
    sigmoid_input = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Sigmoid"}
    gates = {}
    for node in graph.node:
        if node.op_type != "Mul":
            continue
        for gate, other in (node.input[:2], node.input[1::-1]):
            if gate in names and sigmoid_input.get(gate) == other:
                gates[gate] = node.output[0]
    return gates


def ort_activation_grids(model: nn.Module, fp32_path: Path, calibration: list[Path],
                         load_batch: Callable[[list[Path]], torch.Tensor], method: str, work: Path
                         ) -> list[ActivationGrid]:
    """Quantize ``fp32_path`` (the export of ``model``) with every node INT8 as the export would, and locate each
    rounded activation and its grid in ``model``. Tensors no module computes are named in a warning: the tuning
    then simulates fewer roundings than the file has."""
    from deploy.onnx_quant import CalibrationReader, prepare_for_quantization, quantize_int8

    prepped, int8 = work / "qat-reference-fp32.onnx", work / "qat-reference-int8.onnx"
    prepare_for_quantization(fp32_path, prepped)
    quantize_int8(prepped, int8, CalibrationReader(calibration, lambda paths: load_batch(paths).numpy()), method)
    grids = int8_activation_grids(int8)
    located, missing = locate_activations(model, prepped, grids, load_batch(calibration[:4]))
    if missing:
        logger.warning("quantization-aware tuning: %d of %d rounded activations of the INT8 file were not found in "
                       "the PyTorch model and are not simulated (%s)", len(missing), len(grids),
                       ", ".join(missing[:5]))
    logger.info("quantization-aware tuning simulates %d rounded activations (%s calibration)", len(located), method)
    return located


# The training views: each image mirrored at random, shifted by up to this share of the side and zoomed into by up
# to this factor, so the tuning sees the near ties of more inputs than the training folder holds (the agreement
# check's views, deploy.onnx_quant.CHECK_VIEWS, lie inside these ranges).
TRAIN_VIEW_SHIFT = 0.06
TRAIN_VIEW_ZOOM = 1.15


def random_views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of every image (``deploy.onnx_quant.view_of``): mirrored or not, shifted, zoomed."""
    from deploy.onnx_quant import view_of

    draws = torch.rand(len(images), 4, generator=generator)
    return torch.cat([view_of(image[None], bool(m < 0.5), float(TRAIN_VIEW_SHIFT * (2 * dy - 1)),
                              float(TRAIN_VIEW_SHIFT * (2 * dx - 1)), float(1 + (TRAIN_VIEW_ZOOM - 1) * z))
                      for image, (m, dy, dx, z) in zip(images, draws)])


@dataclass
class QatResult:
    model: nn.Module  # the tuned copy at its best pass, plain float weights (no fake-quant left in it)
    seconds: float
    steps: int
    final_kl: float  # mean KL from the FP32 answers over the last pass, in nats
    simulated_activations: int
    # Per pass (0 = before tuning) on the check images under simulated INT8: top-1 agreement with FP32 and mean KL.
    passes: list[dict[str, float]]
    best_pass: int  # the pass whose weights ``model`` holds; 0 = tuning never beat the delivered weights


def _log_probs(net: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(images[i:i + batch_size]).log_softmax(1) for i in range(0, len(images), batch_size)])


def _simulated_check(student: nn.Module, images: torch.Tensor, fp32_log_probs: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with FP32 and mean KL from FP32's answers of ``student`` (already under simulation)."""
    log_probs = _log_probs(student, images)
    agreement = (log_probs.argmax(1) == fp32_log_probs.argmax(1)).double().mean().item()
    kl = nn.functional.kl_div(log_probs, fp32_log_probs, log_target=True, reduction="batchmean").item()
    return agreement, kl


def finetune_for_int8(model: nn.Module, images: list[Path], load_batch: Callable[[list[Path]], torch.Tensor],
                      epochs: int, grids: Sequence[ActivationGrid], lr: float = 1e-5, batch_size: int = 16,
                      seed: int = 0, check_images: Optional[torch.Tensor] = None, target_cpu: str = "any"
                      ) -> QatResult:
    """Fine-tune a copy of ``model`` for ``epochs`` passes over random views of ``images`` under simulated
    INT8 (``grids``: see the module docstring), taught by ``model``'s own answers on the same views. ``model`` is
    left unchanged.

    With ``check_images`` (the export's agreement-check inputs: validation images and their views), the simulated
    INT8 agreement with FP32 there is measured before tuning and after every pass, and the weights of the best pass
    (agreement, then KL) are returned. Every pass runs: on a small model the agreement first fell for two passes
    (the weights re-settle under the rounding) and then rose above the start, so stopping at the first fall would
    hand back the delivered weights. The export's guard then checks the real INT8 file on the same images.

    ``lr``: on a DermNet Lite0 model, AdamW at 1e-4 raised the simulated INT8's KL from FP32 on validation photos
    from 0.011 to 0.12 within 5 steps (every weight moves by about lr per step); 1e-5 halved it (0.006), 1e-6 barely
    moved it in 10 steps."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    views = torch.Generator().manual_seed(seed)
    teacher = model.eval()
    student = copy.deepcopy(model)
    # BatchNorm statistics and dropout stay as delivered: the tuning adjusts weights to the rounding, not to a new
    # data distribution (and batches of 16 would give noisy statistics); the grids stay those of the delivered
    # model's calibration, and the export calibrates the tuned model anew.
    student.eval()
    order = random.Random(seed)
    batches_per_epoch = math.ceil(len(images) / batch_size)
    total_steps = max(1, epochs * batches_per_epoch)
    step, last_pass, passes, best_pass, best_state = 0, [], [], 0, None
    checking = check_images is not None and len(check_images) > 0
    fp32_log_probs = _log_probs(teacher, check_images) if checking else None
    with simulated_int8(student, grids, target_cpu):
        if checking:
            agreement, kl = _simulated_check(student, check_images, fp32_log_probs)
            passes.append({"pass": 0, "val_agreement": agreement, "val_kl": kl})
            # Kept inside the simulation: the state holds the parametrized weights' originals, loaded back below.
            best_state = copy.deepcopy(student.state_dict())
            logger.info("quantization-aware tuning: simulated INT8 before tuning agrees with FP32 on %.4f of %d "
                        "check images (KL %.4f)", agreement, len(check_images), kl)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for epoch in range(epochs):
            shuffled = order.sample(images, len(images))
            last_pass = []
            for i in range(0, len(shuffled), batch_size):
                x = random_views(load_batch(shuffled[i:i + batch_size]), views)
                with torch.no_grad():
                    target = teacher(x).log_softmax(1)
                loss = nn.functional.kl_div(student(x).log_softmax(1), target, log_target=True,
                                            reduction="batchmean")
                for group in optimizer.param_groups:  # cosine decay to zero over the whole tuning
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                last_pass.append(loss.item())
            train_kl = sum(last_pass) / max(len(last_pass), 1)
            if not checking:
                logger.info("quantization-aware tuning: pass %d/%d, KL from FP32 %.4f", epoch + 1, epochs, train_kl)
                continue
            agreement, kl = _simulated_check(student, check_images, fp32_log_probs)
            passes.append({"pass": epoch + 1, "train_kl": train_kl, "val_agreement": agreement, "val_kl": kl})
            best = passes[best_pass]
            if (agreement, -kl) > (best["val_agreement"], -best["val_kl"]):
                best_pass, best_state = epoch + 1, copy.deepcopy(student.state_dict())
            logger.info("quantization-aware tuning: pass %d/%d, KL from FP32 %.4f on training views; simulated INT8 "
                        "on the check images: agreement %.4f, KL %.4f (best: pass %d)", epoch + 1, epochs, train_kl,
                        agreement, kl, best_pass)
        if checking:  # the best pass's weights (pass 0: the delivered ones)
            student.load_state_dict(best_state)
        else:
            best_pass = epochs if step else 0
    student.eval()
    return QatResult(student, time.perf_counter() - started, step,
                     sum(last_pass) / len(last_pass) if last_pass else float("nan"), len(grids), passes, best_pass)
