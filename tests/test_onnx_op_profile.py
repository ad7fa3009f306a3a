"""benchmarks/onnx_op_profile.py: the per-operator table that explains INT8-vs-FP32 speed in the README."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks import onnx_op_profile


def _two_conv_model(path):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32), "w_pw"),
               numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w_dw")]
    # Tensor names as torch.onnx.export writes them: ONNX Runtime renames the nodes it rewrites (NCHWc) after them.
    pw_out, dw_out = "/blocks.0/conv_pw/Conv_output_0", "/blocks.0/conv_dw/Conv_output_0"
    nodes = [helper.make_node("Conv", ["input", "w_pw"], [pw_out], name="/blocks.0/conv_pw/Conv"),
             helper.make_node("Conv", [pw_out, "w_dw"], [dw_out], name="/blocks.0/conv_dw/Conv", group=8,
                              pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info(dw_out, TensorProto.FLOAT, [1, 8, 32, 32])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_operator_time_is_split_by_module_name(tmp_path):
    _two_conv_model(tmp_path / "m.onnx")
    median_ms, per_op = onnx_op_profile.profile(tmp_path / "m.onnx", threads=1, runs=5,
                                                name_pattern="conv_pw|conv_dw")
    assert median_ms > 0
    assert {"Conv conv_pw", "Conv conv_dw"} <= set(per_op) and "Conv" not in per_op
    assert abs(sum(share for share, _ in per_op.values()) - 100) < 1e-6
    assert all(ms > 0 for _, ms in per_op.values())
    _, by_type = onnx_op_profile.profile(tmp_path / "m.onnx", threads=1, runs=5)
    assert "Conv" in by_type and "Conv conv_pw" not in by_type
