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
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from configs import QuantOptions
from runs.export_dir import ExportDir

logger = logging.getLogger(__name__)

# Stages whose feature maps are at most this many times smaller than the input stay float in gated models.
GATED_FLOAT_MAX_REDUCTION = 8


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
    from utils.onnx_runtime import create_session
    from utils.timing import call_latencies_ms

    session = create_session(path, "cpu", threads)
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


@dataclass
class ReferenceSet:
    """Preprocessed images with the answers the INT8 model is checked against."""

    images: torch.Tensor
    labels: np.ndarray
    torch_probs: np.ndarray  # the PyTorch model's probabilities


@dataclass
class CalibrationData:
    train_paths: list[Path]  # calibration images are drawn from these (seeded)
    val_images: torch.Tensor  # the agreement check's images (may be empty)
    load_batch: Callable[[list[Path]], torch.Tensor]


def top1_agreement(path: Path, images: torch.Tensor, reference_top1: np.ndarray, n_class: int) -> float:
    """Share of ``images`` on which the ONNX model at ``path`` gives the ``reference_top1`` class."""
    from prediction.predictors import onnx_probs

    return float((onnx_probs(path, images, n_class).argmax(1) == reference_top1).mean())


def quantize_verified(fp32_path: Path, int8_target: Path, feature_levels: list[dict[str, Any]],
                      metadata: dict[str, str], settings: QuantOptions, test: ReferenceSet,
                      data: CalibrationData) -> dict[str, Any]:
    """Quantize the verified FP32 file to ``int8_target`` (atomically), keeping leading stages in FP32 until the
    INT8 model gives FP32's top-1 on ``settings.min_agreement`` of the validation images; then measure its test
    agreement, accuracy, size and batch-1 speed against FP32."""
    from prediction.predictors import onnx_probs
    from utils.atomic import atomic_path
    from utils.onnx_runtime import check_onnx_model, write_onnx_metadata

    if settings.calibrate_method != "minmax" and settings.calib_images > 300:
        # Seen here: percentile with 600 images of 192 px was killed for memory on a 24 GB machine.
        logger.warning("%s calibration keeps activation histograms of every calibration image in memory; "
                       "%d images may exhaust RAM (200 is usually enough)", settings.calibrate_method,
                       settings.calib_images)
    n_class = test.torch_probs.shape[1]
    gated = gated_activation_count(fp32_path)
    float_stages = (auto_float_stages(feature_levels, gated) if settings.keep_float_stages == "auto"
                    else int(settings.keep_float_stages))
    calib = random.Random(0).sample(data.train_paths, min(settings.calib_images, len(data.train_paths)))
    reader = CalibrationReader(calib, lambda paths: data.load_batch(paths).numpy())
    val_fp32_top1 = onnx_probs(fp32_path, data.val_images, n_class).argmax(1) if len(data.val_images) else None
    attempts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=int8_target.parent, prefix=".calibration-") as work:
        cache = Path(work) / "ranges.json"
        prepped = Path(work) / "preprocessed.onnx"
        prepare_for_quantization(fp32_path, prepped)
        with atomic_path(int8_target) as int8_tmp:
            while True:
                float_until = feature_levels[float_stages - 1]["module"] if float_stages else None
                # Calibrate once; re-quantizing with more float stages reuses the cached ranges.
                float_nodes = quantize_int8(prepped, int8_tmp, None if cache.exists() else reader,
                                            settings.calibrate_method, float_until, cache)
                if val_fp32_top1 is None or settings.min_agreement <= 0:
                    break
                agreement = top1_agreement(int8_tmp, data.val_images, val_fp32_top1, n_class)
                attempts.append({"float_stages": float_stages, "float_until": float_until,
                                 "val_top1_agreement": agreement})
                logger.info("INT8 with %d float stages: same top-1 as FP32 on %.4f of %d validation images",
                            float_stages, agreement, len(data.val_images))
                if agreement >= settings.min_agreement:
                    break
                if float_stages >= len(feature_levels):
                    # None passed: keep the attempt that agreed most (the fewest float stages among equals).
                    best = max(attempts, key=lambda a: (a["val_top1_agreement"], -a["float_stages"]))
                    if best["float_stages"] != float_stages:
                        float_stages, float_until = best["float_stages"], best["float_until"]
                        float_nodes = quantize_int8(prepped, int8_tmp, None, settings.calibrate_method, float_until,
                                                    cache)
                    break
                float_stages += 1
            write_onnx_metadata(int8_tmp, {**metadata, "precision": "int8", "float_stages": str(float_stages)})
            check_onnx_model(int8_tmp)
            int8_probs = onnx_probs(int8_tmp, test.images, n_class)
            fp32_ms, int8_ms = compare_latency([fp32_path, int8_tmp], test.images[:1].numpy(), os.cpu_count() or 1)
            result = {"int8_top1_agreement": float((int8_probs.argmax(1) == test.torch_probs.argmax(1)).mean()),
                      "int8_accuracy": float((int8_probs.argmax(1) == test.labels).mean()),
                      "int8_size_ratio": int8_tmp.stat().st_size / fp32_path.stat().st_size,
                      "fp32_batch1_ms": fp32_ms, "int8_batch1_ms": int8_ms, "gated_activations": gated,
                      "int8_float_stages": float_stages, "int8_float_until": float_until,
                      "int8_float_nodes": float_nodes, "calibrate_method": settings.calibrate_method,
                      "calib_images": len(calib), "min_agreement": settings.min_agreement,
                      "agreement_attempts": attempts}
    best_agreement = max((a["val_top1_agreement"] for a in attempts), default=1.0)
    if best_agreement < settings.min_agreement:
        logger.warning("!!! INT8 agrees with FP32 on at most %.4f of the validation images (wanted %.2f) even with "
                       "every stage but the head in FP32; kept %d float stages, the best attempt; deploy "
                       "%s if that matters", best_agreement, settings.min_agreement, float_stages, ExportDir.FP32_NAME)
    if float_stages:
        logger.info("INT8: the first %d stages (through %s, %d nodes) stay FP32%s", float_stages, float_until,
                    float_nodes, f" ({gated} SiLU/SE/hard-swish activations)" if gated else "")
    return result


def warn_mostly_float(report: dict[str, Any], n_stages: int) -> None:
    """The INT8 file is over half the FP32 size: say why and what to change."""
    attempts = report["agreement_attempts"]
    if attempts:
        fewest = attempts[0]
        why = (f"for --min_agreement {report['min_agreement']:.2f} (with {fewest['float_stages']} float stages "
               f"INT8 gave FP32's answer on {fewest['val_top1_agreement']:.4f} of the validation images); for a "
               f"smaller, faster file accept fewer agreeing answers with --min_agreement or --keep_float_stages")
    else:
        why = "as --keep_float_stages asked; lower it for a smaller, faster file"
    logger.warning("!!! %s is %.0f%% of the FP32 file: its first %d of %d stages stay FP32 %s, or deploy %s",
                   ExportDir.INT8_NAME, 100 * report["int8_size_ratio"], report["int8_float_stages"], n_stages, why,
                   ExportDir.FP32_NAME)
