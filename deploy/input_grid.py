"""Pixel-exact INT8 input: the quantized input's grid moved by half a step so that every 8-bit pixel value of a
photo is one of its points, and the first convolution's bias takes the move back.

A photo reaches the model as 8-bit pixels p (the eval transform resizes with PIL, which keeps 8 bits) normalised to
x = (p / 255 - mean) / std. When every channel has the same mean and std, those values lie 1 / (255 std) apart, the
same step ONNX Runtime's calibration gives the input over the full pixel range. But its grid starts at the rounded
zero point: with mean 0.5 (EfficientNet-Lite and the other TensorFlow-trained models) every pixel falls halfway
between two points and is rounded by half a step, the largest error rounding makes, on every value of every image.
Adding the missing half step before the QuantizeLinear and choosing the zero point that goes with it makes the
rounding exact for every pixel value; the first convolution then sees x + offset, and its bias loses offset times
the sum of its weights. Nothing is added to the INT8 compute: one float Add on the input before it is quantized.
The convolution pads with zeros in the shifted values, so its border outputs keep a shift of the padded taps' share
(one row and column of the first feature map for a TensorFlow-"same" stem).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

OFFSET_NAME = "input_pixel_grid_offset"
SCALE_TOLERANCE = 1e-4  # relative: the calibrated scale is a float32 of 1 / (255 std)


def pixel_step(mean: Sequence[float], std: Sequence[float]) -> float | None:
    """The distance between neighbouring 8-bit pixel values after normalisation, or None when the channels are
    normalised differently (their pixel values then lie on different grids, which one per-tensor grid cannot hold)."""
    if not mean or not std or max(mean) - min(mean) > 1e-6 or max(std) - min(std) > 1e-6 or std[0] <= 0:
        return None
    return 1.0 / (255.0 * std[0])


def align_input_grid(int8_path: Path, mean: Sequence[float], std: Sequence[float]) -> bool:
    """Rewrite the QDQ file at ``int8_path`` so that its quantized input holds every 8-bit pixel value exactly (see
    the module's docstring). Returns False and leaves the file as it is where that does not apply: channels
    normalised differently, an input not quantized (its first convolution kept in FP32), a calibrated scale that is
    not the pixel step, or an input read by anything other than INT8 convolutions with a bias."""
    import onnx
    from onnx import helper, numpy_helper

    from deploy.bias_correction import dequantized_weights, move_quantized_bias

    step = pixel_step(mean, std)
    if step is None:
        return False
    model = onnx.load(str(int8_path))
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    input_name = graph.input[0].name
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == input_name]
    if len(quantizers) != 1 or len(quantizers[0].input) < 3:
        return False
    quantize = quantizers[0]
    scale = float(numpy_helper.to_array(constants[quantize.input[1]]))
    zero_dtype = numpy_helper.to_array(constants[quantize.input[2]]).dtype
    if zero_dtype != np.uint8 or abs(scale - step) > SCALE_TOLERANCE * step:
        logger.debug("input grid left as calibrated: scale %.6g, pixel step %.6g", scale, step)
        return False
    producers = {out: node for node in graph.node for out in node.output}
    int8_weights = dequantized_weights(model)  # by node name, as each convolution computes with them
    dequantizers = [n for n in graph.node if n.input and n.input[0] == quantize.output[0]]
    convs = []
    for dequantize in dequantizers:
        readers = [n for n in graph.node if dequantize.output[0] in n.input]
        if dequantize.op_type != "DequantizeLinear" or len(dequantize.input) < 3 or not readers:
            return False
        for conv in readers:
            bias = producers.get(conv.input[2]) if conv.op_type == "Conv" and len(conv.input) > 2 else None
            if (conv.input[0] != dequantize.output[0] or conv.name not in int8_weights or bias is None
                    or bias.op_type != "DequantizeLinear"):
                return False
            convs.append((conv, bias))
    if not convs:
        return False
    # p maps to x / scale = p - 255 mean; with the zero point z = floor(255 mean) and the input moved by
    # (255 mean - z) scale, round(x / scale + move / scale) + z = p for every p in 0..255.
    zero_point = int(np.floor(255.0 * mean[0] + 1e-9))
    offset = (255.0 * mean[0] - zero_point) * scale
    zero_name = quantize.input[2] + "_pixel_grid"
    graph.initializer.append(numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), zero_name))
    calibrated_zero = quantize.input[2]
    for node in [quantize, *dequantizers]:
        node.input[2] = zero_name
    if not any(calibrated_zero in node.input for node in graph.node):
        graph.initializer.remove(constants[calibrated_zero])
    if offset:
        graph.initializer.append(numpy_helper.from_array(np.array(offset, dtype=np.float32), OFFSET_NAME))
        shifted = input_name + "_on_pixel_grid"
        graph.node.insert(list(graph.node).index(quantize),
                          helper.make_node("Add", [input_name, OFFSET_NAME], [shifted], name=OFFSET_NAME + "_Add"))
        quantize.input[0] = shifted
        for conv, bias in convs:
            weights = int8_weights[conv.name]
            move_quantized_bias(constants, bias, offset * weights.reshape(len(weights), -1).sum(1))
    onnx.save(model, str(int8_path))
    return True
