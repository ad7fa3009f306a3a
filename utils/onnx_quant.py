"""Static INT8 quantization with ONNX Runtime, with the early stages of gated-activation models kept in float.

Why keep stages in float: in SiLU/SE (EfficientNet-B*) and hard-swish (MobileNetV3) models every activation becomes
a quantized Sigmoid plus a quantized Mul (hard-swish: a float HardSigmoid between dequantize and quantize, then a
quantized Mul). Where tensors are large and channels few, in the high-resolution early stages, those element-wise
kernels cost more than the INT8 convolutions save, and quantizing those stages also loses the most FP32 answers.
Keeping the stages up to stride 8 in float measured about as fast as the all-INT8 model (both still slower than FP32
on ONNX Runtime 1.32's CPU kernels; the export warns) with clearly higher agreement. ReLU models gain everywhere and
start fully quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

# Stages whose feature maps are at most this many times smaller than the input stay float in gated models.
GATED_FLOAT_MAX_REDUCTION = 8
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class CalibrationReader:
    """Feeds preprocessed images to ONNX Runtime's calibrator one small batch at a time."""

    def __init__(self, paths: list[Path], load_batch: Callable[[list[Path]], np.ndarray], batch_size: int = 8):
        self.batches = iter([paths[i:i + batch_size] for i in range(0, len(paths), batch_size)])
        self.load_batch = load_batch

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        batch = next(self.batches, None)
        return None if batch is None else {"input": self.load_batch(batch)}


def gated_activation_count(path: Path) -> int:
    """Sigmoids that gate a Mul (SiLU, squeeze-excitation) plus HardSwish/HardSigmoid nodes in an ONNX graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    mul_inputs = {name for node in graph.node if node.op_type == "Mul" for name in node.input}
    return sum(1 for node in graph.node
               if node.op_type in ("HardSwish", "HardSigmoid")
               or (node.op_type == "Sigmoid" and node.output[0] in mul_inputs))


def auto_float_stages(feature_info: list[dict[str, Any]], gated: int) -> int:
    """How many leading stages to keep in float: those up to stride 8 for gated models, none otherwise."""
    if not gated:
        return 0
    return sum(1 for level in feature_info if level["reduction"] <= GATED_FLOAT_MAX_REDUCTION)


def module_node_prefix(module_name: str) -> str:
    """The node-name prefix torch.onnx gives a module's nodes: 'blocks.2' -> '/blocks/blocks.2/'."""
    parts = module_name.split(".")
    return "/" + "/".join(".".join(parts[:i + 1]) for i in range(len(parts))) + "/"


def nodes_up_to(graph, module_name: str) -> list[str]:
    """Names of the module's nodes and of every node they depend on: the float part of the network."""
    producers = {output: node for node in graph.node for output in node.output}
    prefix = module_node_prefix(module_name)
    stack = [node for node in graph.node if node.name.startswith(prefix)]
    if not stack:
        raise ValueError(f"no ONNX node belongs to module {module_name!r} (expected names starting with {prefix})")
    seen: dict[str, None] = {}
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen[node.name] = None
        stack.extend(producers[name] for name in node.input if name in producers)
    return sorted(seen)


def prepare_for_quantization(fp32_path: Path, prepped_path: Path) -> None:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimization); do it once per model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(prepped_path))


def quantize_int8(prepped_path: Path, int8_path: Path, reader: Optional[CalibrationReader], method: str,
                  float_until: Optional[str] = None, calibration_cache: Optional[Path] = None) -> int:
    """QDQ static quantization of a pre-processed model (``prepare_for_quantization``) into ``int8_path``; nodes up
    to module ``float_until`` stay float.

    With ``calibration_cache`` the activation ranges are computed once and reused by later calls (which may then pass
    no reader), as long as those keep at least as many nodes in float. Returns how many nodes were kept in float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    # Node names survive pre-processing, so the float part is found in the graph the quantizer sees.
    keep_float = nodes_up_to(onnx.load(str(prepped_path)).graph, float_until) if float_until else []
    # The quantizer logs one INFO line per adjusted bias scale (hundreds per model) through the root logger.
    logging.disable(logging.INFO)
    try:
        # uint8 activations with int8 weights use the VNNI u8s8 kernels; int8 activations ran slower than FP32.
        quantize_static(str(prepped_path), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=keep_float,
                        calibration_cache_path=calibration_cache)
    finally:
        logging.disable(logging.NOTSET)
    return len(keep_float)


def _median_latency_ms(path: str, batch: np.ndarray, runs: int, threads: int) -> float:
    import onnxruntime as ort

    from utils.timing import call_latencies_ms

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch}
    return float(np.median(call_latencies_ms(lambda: session.run(None, feed), runs)))


def compare_latency(paths: list[Path], batch: np.ndarray, threads: int, runs: int = 20, rounds: int = 3
                    ) -> list[float]:
    """Batch latency (ms) of each model, each timed in its own fresh process, alternating over ``rounds``.

    Separate processes because two ONNX Runtime sessions in one process slow each other down (their worker threads
    spin); alternating rounds so drift on a shared machine hits every model alike; the best round's median because
    interference only ever adds time."""
    import multiprocessing as mp

    best = [float("inf")] * len(paths)
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for _ in range(rounds):
            for i, path in enumerate(paths):
                best[i] = min(best[i], pool.apply(_median_latency_ms, (str(path), batch, runs, threads)))
    return best
