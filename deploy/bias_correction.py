"""Bias correction for INT8 weights: each quantized convolution and Gemm gets its bias moved by the mean shift that
rounding its weights causes in its output, so rounding errors do not add up through the network as a drift.

Rounding a channel's weights to 8 bits changes that channel's output by (W_int8 - W) * x. Over an image that error
has a mean, the rounding error applied to the mean input, and the same shift repeats in every image; on a Lite0
model of clinical photos it was the larger part of what moved INT8's answers away from FP32's. Subtracting it from the
bias removes the mean and leaves only the noise (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", 2019; OpenVINO's post-training quantization applies the same correction by default). The rounded
weights are read back from ONNX Runtime's own INT8 file, so the correction matches its rounding exactly, and the mean
inputs are those of the FP32 graph on the calibration images. A node left in FP32 keeps its original bias.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from utils.onnx_runtime import node_attribute

logger = logging.getLogger(__name__)

CORRECTED_OPS = ("Conv", "Gemm")


def dequantized_weights(int8: Path | Any) -> dict[str, np.ndarray]:
    """The weight each Conv/Gemm of a QDQ file (a path, or the model already loaded) computes with, dequantized from
    its int8 initializer, by node name."""
    import onnx
    from onnx import numpy_helper

    graph = (int8 if isinstance(int8, onnx.ModelProto) else onnx.load(str(int8))).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = {node.input[1] for node in graph.node if node.op_type in CORRECTED_OPS and len(node.input) > 1}
    dequantized = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in constants or node.output[0] not in weights:
            continue
        values = constants[node.input[0]].astype(np.float64)
        scale = constants[node.input[1]].astype(np.float64)
        zero = constants[node.input[2]].astype(np.float64) if len(node.input) > 2 else np.zeros_like(scale)
        axis = node_attribute(node, "axis", 1)  # ONNX's default axis is 1
        if scale.ndim and values.ndim > axis:  # per channel along `axis`
            shape = [1] * values.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        dequantized[node.output[0]] = (values - zero) * scale
    return {node.name: dequantized[node.input[1]] for node in graph.node
            if node.op_type in CORRECTED_OPS and len(node.input) > 1 and node.input[1] in dequantized}


def _mean_inputs(model, node_inputs: dict[str, str], batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Per node, its input tensor averaged over the images (kept per position: a convolution's padding makes the
    border's mean output differ from the inside's)."""
    from utils.onnx_runtime import session_with_outputs

    graph_input = model.graph.input[0].name
    wanted = sorted(set(node_inputs.values()))
    session = session_with_outputs(model, wanted)
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    count = 0
    for batch in batches:
        values = dict(zip(names, session.run(None, {graph_input: batch})))
        values[graph_input] = batch
        for name in wanted:
            sums[name] = sums.get(name, 0) + values[name].astype(np.float64).sum(0)
        count += len(batch)
    return {node: sums[tensor] / max(count, 1) for node, tensor in node_inputs.items()}


def output_mean_shift(node, weight_error: np.ndarray, mean_input: np.ndarray) -> Optional[np.ndarray]:
    """The mean over positions of the node's output change that ``weight_error`` causes for ``mean_input`` (per
    output channel), or None for a node whose geometry is not read here (auto_pad, transposed operands)."""
    if node.op_type == "Gemm":
        if node_attribute(node, "transA", 0) or mean_input.ndim != 1:
            return None
        shift = weight_error @ mean_input if node_attribute(node, "transB", 0) else mean_input @ weight_error
        return node_attribute(node, "alpha", 1.0) * shift / node_attribute(node, "beta", 1.0)
    if node_attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or mean_input.ndim != 3:
        return None
    pads = list(node_attribute(node, "pads", [0, 0, 0, 0]))
    x = torch.nn.functional.pad(torch.from_numpy(mean_input)[None], (pads[1], pads[3], pads[0], pads[2]))
    out = torch.nn.functional.conv2d(x, torch.from_numpy(weight_error), None,
                                     tuple(node_attribute(node, "strides", [1, 1])), 0,
                                     tuple(node_attribute(node, "dilations", [1, 1])),
                                     node_attribute(node, "group", 1))
    return out.mean((0, 2, 3)).numpy()


def weight_rounding_shifts(prepped_path: Path, int8_path: Path, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """For each Conv/Gemm that ``int8_path`` (a QDQ quantization of ``prepped_path``) runs with int8 weights: the
    mean shift of its output channels that the weights' rounding causes on ``batches`` (calibration images)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(prepped_path))
    constants = {t.name: t for t in model.graph.initializer}
    rounded = dequantized_weights(int8_path)
    nodes = {node.name: node for node in model.graph.node
             if node.name in rounded and node.op_type in CORRECTED_OPS and node.input[1] in constants}
    means = _mean_inputs(model, {name: node.input[0] for name, node in nodes.items()}, batches)
    shifts = {}
    for name, node in nodes.items():
        weight = numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
        if rounded[name].shape != weight.shape:
            continue
        shift = output_mean_shift(node, rounded[name] - weight, means[name])
        if shift is not None:
            shifts[name] = shift
    skipped = len(nodes) - len(shifts)
    logger.info("bias correction: the mean output shift of %d INT8 Conv/Gemm nodes measured on the calibration "
                "images%s", len(shifts), f" ({skipped} skipped: geometry not read)" if skipped else "")
    return shifts


def move_quantized_bias(constants: dict, bias_dequantize, shift: np.ndarray) -> None:
    """In a QDQ graph whose initializers by name are ``constants``: subtract ``shift`` (float, per output channel)
    from the int32 bias that the DequantizeLinear node ``bias_dequantize`` reads, in that bias's own scale."""
    from onnx import numpy_helper

    name = bias_dequantize.input[0]
    bias = numpy_helper.to_array(constants[name]).astype(np.int64)
    scale = numpy_helper.to_array(constants[bias_dequantize.input[1]]).astype(np.float64)
    constants[name].CopyFrom(numpy_helper.from_array((bias - np.round(shift / scale)).astype(np.int32), name))


def write_corrected(prepped_path: Path, target: Path, shifts: dict[str, np.ndarray],
                    keep_float: Sequence[str]) -> int:
    """A copy of ``prepped_path`` at ``target`` in which every node of ``shifts`` not kept in FP32 has its bias
    moved against its shift. Returns how many nodes were corrected."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(prepped_path))
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    floats = set(keep_float)
    corrected = 0
    for node in graph.node:
        if node.name not in shifts or node.name in floats:
            continue
        shift = shifts[node.name]
        named = len(node.input) > 2 and bool(node.input[2])
        if named and node.input[2] not in constants:
            continue  # a bias the graph computes: left as it is
        bias = (numpy_helper.to_array(constants[node.input[2]]) if named
                else np.zeros(shift.shape, dtype=np.float32))
        if bias.shape != shift.shape:
            continue
        # A bias of this node alone is replaced in place; one shared with other nodes (the exporter merges equal
        # constants, e.g. zero biases) or missing gets a new initializer of this node's own.
        own = named and uses[node.input[2]] == 1
        new = numpy_helper.from_array((bias.astype(np.float64) - shift).astype(bias.dtype),
                                      node.input[2] if own else f"{node.name}.corrected_bias")
        if own:
            constants[node.input[2]].CopyFrom(new)
        else:
            graph.initializer.append(new)
            if len(node.input) < 3:
                node.input.append(new.name)
            else:
                node.input[2] = new.name
        corrected += 1
    onnx.save(model, str(target))
    return corrected
