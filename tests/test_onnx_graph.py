"""deploy/onnx_export.py and deploy/onnx_quant.py: graph rewrites that keep answers, and the float/INT8 split."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from timm.layers import create_conv2d
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from deploy.onnx_export import export_fp32
from deploy.onnx_quant import auto_float_stages, gated_activation_count, module_node_prefix, nodes_up_to


class SameConvSE(nn.Module):
    """TF-'same' strided convs (dynamic padding in timm) and a squeeze-excitation gate."""

    def __init__(self):
        super().__init__()
        self.stem = create_conv2d(3, 8, 3, stride=2, padding="same")
        self.reduce = create_conv2d(8, 8, 3, stride=2, padding="same")
        self.se = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = nn.functional.silu(self.stem(x))
        x = self.reduce(x)
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        channel_mean = x.mean(1, keepdim=True)  # not a spatial mean: must stay a ReduceMean
        return self.head((x + channel_mean).mean((2, 3)))


def _onnx_logits(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def test_export_freezes_same_padding_and_pools_se_means_without_changing_answers(tmp_path):
    model = SameConvSE().eval()
    path = tmp_path / "m.onnx"
    rewrites = export_fp32(model, [3, 45, 38], path, 17)  # odd sizes: asymmetric TF padding
    assert rewrites == {"same_padding_frozen": 2, "reduce_mean_to_global_pool": 1}
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Shape" not in ops, "padding must not be computed from the input shape at run time"
    assert ops.count("GlobalAveragePool") == 1 and "ReduceMean" in ops  # the channel mean is left alone
    x = torch.randn(3, 3, 45, 38)  # another batch size than the export example
    with torch.inference_mode():
        expected = model(x).numpy()
    np.testing.assert_allclose(_onnx_logits(path, x), expected, atol=1e-5)
    assert isinstance(model.stem, Conv2dSame), "the caller's model must stay untouched"


class Staged(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU()) for _ in range(3)])
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Hardswish())

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x).mean((2, 3))


def test_float_part_is_a_module_and_everything_it_depends_on(tmp_path):
    path = tmp_path / "staged.onnx"
    export_fp32(Staged().eval(), [3, 16, 16], path, 17)
    graph = onnx.load(str(path)).graph
    assert module_node_prefix("blocks.1") == "/blocks/blocks.1/"
    float_part = nodes_up_to(graph, "blocks.1")
    assert any(name.startswith("/stem/") for name in float_part)
    assert any(name.startswith("/blocks/blocks.0/") for name in float_part)
    assert any(name.startswith("/blocks/blocks.1/") for name in float_part)
    assert not [name for name in float_part if name.startswith(("/blocks/blocks.2/", "/head/"))]
    with pytest.raises(ValueError, match="no ONNX node belongs to module 'blocks.7'"):
        nodes_up_to(graph, "blocks.7")
    assert gated_activation_count(path) == 4  # three SiLUs (Sigmoid * x) and one HardSwish


def test_auto_keeps_stages_up_to_stride_8_in_float_for_gated_models_only():
    levels = [{"module": f"blocks.{i}", "reduction": 2 ** (i + 1)} for i in range(5)]
    assert auto_float_stages(levels, gated=0) == 0
    assert auto_float_stages(levels, gated=49) == 3
