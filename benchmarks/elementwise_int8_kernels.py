"""ONNX Runtime's quantized element-wise kernels against their float counterparts, one tensor, one node at a time.

Explains why SiLU models (EfficientNet-B*) are slower in INT8 than in FP32 on ONNX Runtime's CPU provider: every SiLU
becomes QLinearSigmoid (a 256-entry table lookup) plus QLinearMul, where FP32 runs one fused, vectorised QuickGelu.
The default tensor is EfficientNet-B0's largest SiLU input (1x96x112x112). Each model is a single node, the SiLU pair,
or the SiLU kept in float between a dequantize and a quantize, with ONNX Runtime's default optimisations; the median
of --runs calls is printed.

Example (the README's figures):
    python -m benchmarks.elementwise_int8_kernels --runs 200 --threads 2
"""

from __future__ import annotations

import argparse

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from deploy.machine import describe_machine, machine_info
from utils.onnx_runtime import create_session
from utils.timing import call_latencies_ms


def _session(nodes, input_type: int, shape: list[int], threads: int) :
    quant_params = [numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
                    numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
                    numpy_helper.from_array(np.array(1 / 255, np.float32), "gate_scale"),
                    numpy_helper.from_array(np.array(0, np.uint8), "gate_zero")]
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", input_type, shape)],
                              [helper.make_tensor_value_info("y", input_type, shape)],
                              [t for t in quant_params if t.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return create_session(model.SerializeToString(), "cpu", threads)


def cases() -> dict[str, tuple[list, int]]:
    ms = "com.microsoft"
    q_sigmoid = helper.make_node("QLinearSigmoid", ["x", "x_scale", "x_zero", "gate_scale", "gate_zero"], ["g"],
                                 domain=ms)
    return {
        "float Sigmoid": ([helper.make_node("Sigmoid", ["x"], ["y"])], TensorProto.FLOAT),
        "float QuickGelu (fused SiLU)": ([helper.make_node("QuickGelu", ["x"], ["y"], domain=ms, alpha=1.0)],
                                         TensorProto.FLOAT),
        "uint8 QLinearSigmoid": ([helper.make_node("QLinearSigmoid", ["x", "x_scale", "x_zero", "gate_scale",
                                                                      "gate_zero"], ["y"], domain=ms)],
                                 TensorProto.UINT8),
        "uint8 QLinearMul": ([helper.make_node("QLinearMul", ["x", "x_scale", "x_zero", "x", "x_scale", "x_zero",
                                                              "x_scale", "x_zero"], ["y"], domain=ms)],
                             TensorProto.UINT8),
        "uint8 SiLU = QLinearSigmoid + QLinearMul": (
            [q_sigmoid, helper.make_node("QLinearMul", ["x", "x_scale", "x_zero", "g", "gate_scale", "gate_zero",
                                                        "x_scale", "x_zero"], ["y"], domain=ms)],
            TensorProto.UINT8),
        # SiLU left out of quantization: between two INT8 convolutions it costs a dequantize and a quantize too.
        "uint8 -> float QuickGelu -> uint8": (
            [helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["x_float"]),
             helper.make_node("QuickGelu", ["x_float"], ["y_float"], domain=ms, alpha=1.0),
             helper.make_node("QuantizeLinear", ["y_float", "x_scale", "x_zero"], ["y"])],
            TensorProto.UINT8),
    }


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ONNX Runtime quantized vs float element-wise kernels", add_help=add_help)
    parser.add_argument("--shape", default="1,96,112,112", help="NCHW tensor shape (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main(args: argparse.Namespace) -> None:
    shape = [int(v) for v in args.shape.split(",")]
    rng = np.random.default_rng(0)
    inputs = {TensorProto.FLOAT: rng.standard_normal(shape).astype(np.float32),
              TensorProto.UINT8: rng.integers(0, 256, shape, dtype=np.uint8)}
    print(f"machine: {describe_machine(machine_info(args.threads))}")
    print(f"{np.prod(shape):,} values, {args.threads} threads, median of {args.runs} runs")
    for name, (nodes, input_type) in cases().items():
        session = _session(nodes, input_type, shape, args.threads)
        feed = {"x": inputs[input_type]}
        times = call_latencies_ms(lambda: session.run(None, feed), args.runs, warmup=20)
        print(f"{name:45s} {float(np.median(times)):7.3f} ms")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
