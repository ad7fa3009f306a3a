"""The integer grid of an INT8 file's weights, per output channel: one rule for the export (the ranges handed to ONNX
Runtime's quantizer, deploy.onnx_quant) and for the quantization-aware tuning that simulates the file (deploy.qat).

Why a rule at all: on x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 matrix kernels multiply with VPMADDUBSW,
which adds the products of two neighbouring weights (along the input channels) in 16 bits and saturates there. A
uint8 activation reaches 255, so two same-sign weights whose integers add up to more than 128 can overflow
(255 x 128 = 32,640 fits int16's 32,767). ``--int8_target_cpu any`` therefore gives each output channel the finest
scale at which no such pair exceeds 128: ``range = the largest same-sign pair sum``, mapped onto 127. That is 8-bit
precision where the large weights have small or opposite-sign neighbours, and never coarser than ONNX Runtime's
``reduce_range`` (every weight within -64..64). Depthwise convolutions run on a kernel that adds in 32 bits and
keep plain 8 bits; ``vnni`` gives every weight plain 8 bits."""

from __future__ import annotations

from typing import Sequence

import torch

WEIGHT_QMAX = 127  # symmetric int8 weights, as ONNX Runtime's QInt8 per-channel weights
# ONNX Runtime's reduce_range for int8 weights (-64..64): no two weights can overflow a 16-bit pair sum.
SEVEN_BIT_WEIGHT_QMAX = 64


def kernel_kind(groups: int, weight_shape: Sequence[int]) -> tuple[bool, bool]:
    """(depthwise, adjacent_pairs) of a convolution or linear layer from its group count and weight shape
    [out, in / groups, *kernel] (ONNX Conv/Gemm and PyTorch layers alike): depthwise = one input and one output
    channel per group (its own kernel, 32-bit sums); adjacent_pairs = a 1x1 or linear layer, whose pairs the matrix
    kernel takes along the input channels."""
    depthwise = groups > 1 and weight_shape[0] == groups and weight_shape[1] == 1
    adjacent_pairs = groups == 1 and all(size == 1 for size in weight_shape[2:])
    return depthwise, adjacent_pairs


def pair_safe_ranges(weight: torch.Tensor, adjacent_pairs: bool) -> torch.Tensor:
    """Per output channel (dim 0) the magnitude to map onto ±127 so that no two weights the matrix kernel adds in
    one 16-bit sum can overflow it: their integers add up to at most 127 before rounding, 128 after.

    ``adjacent_pairs``: the kernel's pairs are known, neighbours along the flattened input dimension (1x1
    convolutions and linear layers: input channels 0-1, 2-3, ...). Otherwise (a 3x3 convolution, whose kernel
    position order depends on the kernel chosen) the two largest same-sign weights of the channel are assumed to
    meet."""
    w = weight.detach().flatten(1).float()
    positive, negative = w.clamp_min(0), (-w).clamp_min(0)
    if adjacent_pairs:
        if w.shape[1] % 2:
            positive, negative = (torch.nn.functional.pad(t, (0, 1)) for t in (positive, negative))
        pair_sums = torch.maximum(positive[:, 0::2] + positive[:, 1::2], negative[:, 0::2] + negative[:, 1::2])
        largest_pair = pair_sums.amax(1)
    else:
        top = min(2, w.shape[1])
        largest_pair = torch.maximum(positive.topk(top, dim=1).values.sum(1), negative.topk(top, dim=1).values.sum(1))
    seven_bit = w.abs().amax(1) * WEIGHT_QMAX / SEVEN_BIT_WEIGHT_QMAX  # the range reduce_range would give
    return torch.minimum(largest_pair, seven_bit)


def weight_scales(weight: torch.Tensor, target_cpu: str, depthwise: bool, adjacent_pairs: bool) -> torch.Tensor:
    """The per-output-channel scale of ``weight``'s integers in an INT8 file written for ``target_cpu``."""
    if target_cpu == "vnni" or depthwise:
        ranges = weight.detach().flatten(1).abs().amax(1)
    else:
        ranges = pair_safe_ranges(weight, adjacent_pairs)
    return ranges.clamp_min(1e-8) / WEIGHT_QMAX
