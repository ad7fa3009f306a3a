"""Turning a trained timm model into a fast, self-contained ONNX graph.

Two rewrites make the graph faster without changing its answers (the export is verified against PyTorch afterwards):
- TF-"same" convolutions (tf_* models such as tf_efficientnet_lite0) compute their padding from the input shape at
  run time. Exported as is, that is a chain of Shape/Gather/Div/Pad nodes before every strided conv: 25 % of the
  FP32 time, and in INT8 a float island (dequantize, pad, quantize) around each of them. The input size is fixed at
  export, so the padding is a constant: a ZeroPad2d that ONNX Runtime folds into the conv.
- Squeeze-excitation's `x.mean((2, 3), keepdim=True)` exports as ReduceMean, which ONNX Runtime's quantizer leaves in
  float (dequantize, reduce, quantize); the identical GlobalAveragePool has an INT8 kernel.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn


def freeze_same_padding(model: nn.Module, input_size: list[int]) -> int:
    """Replace timm's dynamic-padding Conv2dSame layers by constant padding for ``input_size``; returns how many."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    input_hw: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:  # returning a value would replace the inputs
            input_hw[name] = tuple(inputs[0].shape[-2:])
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, (height, width) in input_hw.items():
        conv = model.get_submodule(name)
        pad_h = get_same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pad_w = get_same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                          conv.groups, conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        padded = nn.Sequential(nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)), plain)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, padded)
    return len(input_hw)


def export_fp32(model: nn.Module, input_size: list[int], path: Path, opset: int) -> dict[str, int]:
    """Export with a dynamic batch axis to one self-contained file; returns what the rewrites changed."""
    model = copy.deepcopy(model).eval()  # the caller's model stays the PyTorch reference
    padded = freeze_same_padding(model, input_size)
    dummy = torch.randn(2, *input_size)
    # The TorchScript exporter writes one self-contained file; the dynamo exporter would need onnxscript and puts
    # weights in a side .onnx.data file by default.
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice, tracer and shape-inference warnings are expected here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True)
    pooled = spatial_means_to_global_pool(path)
    return {"same_padding_frozen": padded, "reduce_mean_to_global_pool": pooled}


def spatial_means_to_global_pool(path: Path) -> int:
    """Rewrite ReduceMean over H and W (keepdims) of 4-D tensors as GlobalAveragePool, in place; returns how many."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.input, *inferred.value_info]
             if v.type.tensor_type.HasField("shape")}
    count = 0
    nodes = []
    for node in model.graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # Opset < 18 carries the axes as an attribute; a second input (opset 18+) is left alone.
        if (node.op_type == "ReduceMean" and len(node.input) == 1 and ranks.get(node.input[0]) == 4
                and list(attributes.get("axes", [])) in ([2, 3], [-2, -1]) and attributes.get("keepdims", 1) == 1):
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
            count += 1
        else:
            nodes.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))
    return count
