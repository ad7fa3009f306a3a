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
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from configs import QuantOptions
from runs.export_dir import ExportDir
from utils.cpu import cpu_description
from utils.onnx_runtime import node_attribute

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


def pair_safe_overrides(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """quantize_static's per-channel weight overrides for --int8_target_cpu any (deploy.int8_weights): every Conv
    and Gemm weight gets the per-channel ranges at which no two weights the uint8 x int8 matrix kernels add in one
    16-bit sum can overflow; depthwise convolutions (one input and one output channel per group, a kernel that adds
    in 32 bits) plain 8 bits. Any other weight keeps quantize_static's reduce_range (7 bits)."""
    import onnx
    from onnx import numpy_helper

    from deploy.int8_weights import kernel_kind, pair_safe_ranges

    graph = onnx.load(str(model_path)).graph
    weights = {init.name: init for init in graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(weights[node.input[1]]).copy())
        if node.op_type == "Conv":
            axis, per_channel = 0, weight
            depthwise, adjacent = kernel_kind(node_attribute(node, "group", 1), weight.shape)
            if depthwise:
                overrides[node.input[1]] = [{"axis": 0, "reduce_range": False}]
                continue
        else:  # Gemm: ONNX Runtime quantizes B per output column (axis 0 when transposed, as torch's Linear)
            transposed = bool(node_attribute(node, "transB", 0))
            axis, adjacent = (0 if transposed else 1), True
            per_channel = weight if transposed else weight.t()
        ranges = pair_safe_ranges(per_channel, adjacent).tolist()
        overrides[node.input[1]] = [{"axis": axis, "reduce_range": False, "rmin": -r, "rmax": r} for r in ranges]
    return overrides


def quantize_int8(prepped_path: Path, int8_path: Path, reader: Optional[CalibrationReader], method: str,
                  keep_float: Sequence[str] = (), calibration_cache: Optional[Path] = None,
                  target_cpu: str = "any") -> int:
    """QDQ static quantization of a pre-processed model (``prepare_for_quantization``) into ``int8_path``; the nodes
    named in ``keep_float`` stay FP32.

    ``target_cpu`` "any": the weights that ONNX Runtime's uint8 x int8 matrix kernels read get per-channel scales at
    which no pair of them the kernel adds in 16 bits can overflow (``pair_safe_overrides``), so that on x86 CPUs
    without VNNI, whose VPMADDUBSW saturates there, the file computes what it computes everywhere else; depthwise
    weights keep 8 bits. "vnni": 8-bit weights everywhere (QuantOptions.int8_target_cpu).

    With ``calibration_cache`` the activation ranges are computed once and reused by later calls (which may then pass
    no reader), as long as those keep at least the same nodes in float. Returns how many nodes were kept in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    # The quantizer logs one INFO line per adjusted bias scale (hundreds per model) through the root logger.
    logging.disable(logging.INFO)
    try:
        if method == "entropy" and not (calibration_cache and calibration_cache.is_file()):
            # quantize_static's entropy calibrator keeps 128 histogram bins for 128 quantized bins, so the only
            # threshold it can choose is the full range: minmax again. TensorRT's recipe (2048 bins, thresholds
            # from 128 bins up) does clip outliers; its ranges reach quantize_static through the cache.
            with tempfile.TemporaryDirectory() as scratch:
                calibration_cache = calibration_cache or Path(scratch) / "ranges.json"
                _entropy_ranges(prepped_path, reader, calibration_cache)
                return quantize_int8(prepped_path, int8_path, None, method, keep_float, calibration_cache,
                                     target_cpu)
        pair_safe = target_cpu == "any"
        # uint8 activations with int8 weights use the VNNI u8s8 kernels; int8 activations ran slower than FP32.
        quantize_static(str(prepped_path), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=pair_safe,
                        calibrate_method=methods[method], nodes_to_exclude=list(keep_float),
                        calibration_cache_path=calibration_cache,
                        extra_options={"TensorQuantOverrides": pair_safe_overrides(prepped_path)} if pair_safe else {})
    finally:
        logging.disable(logging.NOTSET)
    return len(keep_float)


ENTROPY_HISTOGRAM_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128


def _entropy_ranges(prepped_path: Path, reader: Optional[CalibrationReader], cache: Path) -> None:
    """Activation ranges by KL divergence (TensorRT's calibration) written to ``cache`` for quantize_static."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if reader is None:
        raise ValueError("entropy calibration needs calibration images or an existing cache")
    with tempfile.TemporaryDirectory(prefix="ort.entropy.") as scratch:
        calibrator = create_calibrator(prepped_path, augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": ENTROPY_HISTOGRAM_BINS,
                                                      "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)


# --- which nodes stay FP32 -----------------------------------------------------------------------------------------
# Op types ONNX Runtime's QDQ quantizer turns into INT8; a unit without any has nothing to give back by staying FP32.
QUANTIZED_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sigmoid", "HardSigmoid",
                                "HardSwish", "GlobalAveragePool", "AveragePool", "MaxPool", "Concat", "Softmax",
                                "Resize", "LayerNormalization", "Split", "Where"})


def unit_of(node_name: str) -> str:
    """The block a node belongs to, from the module path torch.onnx writes into node names: the chain of indexed
    containers from the top ('/blocks/blocks.2/blocks.2.0/conv_dw/conv_dw.1/Conv' -> 'blocks.2.0', a timm block;
    'layer1.0' in a ResNet; a padding wrapper inside a block stays in the block), else the top module
    ('/conv_head/Conv' -> 'conv_head'); a node without a path is a unit of its own."""
    parts = [part for part in node_name.split("/") if part][:-1]
    if not parts:
        return node_name
    unit = parts[0]
    for part in parts[1:]:
        if not (part.startswith(unit + ".") and part[len(unit) + 1:].isdigit()):
            break
        unit = part
    return unit


@dataclass(frozen=True)
class FloatUnit:
    name: str
    nodes: tuple[str, ...]


def quantization_units(graph) -> list[FloatUnit]:
    """The graph's blocks (``unit_of``) that hold quantizable nodes, in graph order."""
    units: dict[str, list[Any]] = {}
    for node in graph.node:
        units.setdefault(unit_of(node.name), []).append(node)
    return [FloatUnit(name, tuple(node.name for node in nodes)) for name, nodes in units.items()
            if any(node.op_type in QUANTIZED_OP_TYPES for node in nodes)]


def agreement_and_divergence(path: Path, images: torch.Tensor, reference_probs: np.ndarray) -> tuple[float, float]:
    """Share of ``images`` on which the ONNX model at ``path`` gives the reference's top-1 class, and the mean
    KL divergence of its probabilities from the reference's (nats): the second still moves when a change mends
    answers that were right by a margin, so it ranks what staying FP32 brings on a small validation split."""
    from prediction.predictors import onnx_probs

    return agreement_and_kl(onnx_probs(path, images, reference_probs.shape[1]), reference_probs)


def agreement_and_kl(probs: np.ndarray, reference_probs: np.ndarray) -> tuple[float, float]:
    """Share of rows whose top-1 class is the reference's, and the mean KL divergence from the reference (nats)."""
    agreement = float((probs.argmax(1) == reference_probs.argmax(1)).mean())
    eps = 1e-7
    kl = float(np.mean(np.sum(reference_probs * (np.log(reference_probs + eps) - np.log(probs + eps)), axis=1)))
    return agreement, max(kl, 0.0)


class _Trials:
    """Quantizes one pre-processed model again and again with other FP32 nodes (one calibration, cached) and scores
    each result on the validation images against FP32."""

    def __init__(self, prepped: Path, target: Path, reader: CalibrationReader, method: str, cache: Path,
                 val_images: torch.Tensor, val_fp32_probs: Optional[np.ndarray],
                 bias_shifts: Optional[dict[str, np.ndarray]] = None,
                 pixel_grid: Optional[tuple[Sequence[float], Sequence[float]]] = None, target_cpu: str = "any"):
        self.prepped, self.target, self.reader, self.method, self.cache = prepped, target, reader, method, cache
        self.target_cpu = target_cpu
        self.val_images, self.val_fp32_probs = val_images, val_fp32_probs
        self.bias_shifts = bias_shifts or {}
        self.bias_corrected = 0  # nodes whose bias the last written file has corrected
        self.pixel_grid = pixel_grid  # (mean, std) to put the input's grid on the pixel values, or None
        self.input_on_pixel_grid = False  # whether the last written file's input grid holds every pixel value

    def write(self, float_nodes: Sequence[str]) -> None:
        source = self.prepped
        if self.bias_shifts:  # the INT8 nodes of this choice get corrected biases, its FP32 nodes keep their own
            from deploy.bias_correction import write_corrected

            source = self.target.with_name(self.target.stem + "-bias-corrected.onnx")
            self.bias_corrected = write_corrected(self.prepped, source, self.bias_shifts, float_nodes)
        quantize_int8(source, self.target, None if self.cache.exists() else self.reader, self.method,
                      sorted(set(float_nodes)), self.cache, self.target_cpu)
        if self.pixel_grid is not None:
            from deploy.input_grid import align_input_grid

            self.input_on_pixel_grid = align_input_grid(self.target, *self.pixel_grid)

    def score(self, float_nodes: Sequence[str]) -> tuple[float, float]:
        self.write(float_nodes)
        return agreement_and_divergence(self.target, self.val_images, self.val_fp32_probs)


def _prefix_search(trials: _Trials, graph, levels: list[dict[str, Any]], first_stage: int, target: float
                   ) -> tuple[list[str], int, list[dict[str, Any]]]:
    """Whole leading stages stay FP32, one more at a time, until ``target`` holds; else the best attempt."""
    def nodes_for(stages: int) -> list[str]:
        return nodes_up_to(graph, levels[stages - 1]["module"]) if stages else []

    attempts: list[dict[str, Any]] = []
    for stages in range(first_stage, len(levels) + 1):
        float_nodes = nodes_for(stages)
        agreement, kl = trials.score(float_nodes)
        attempts.append({"float_stages": stages, "float_until": levels[stages - 1]["module"] if stages else None,
                         "float_nodes": len(float_nodes), "val_top1_agreement": agreement, "val_kl": kl})
        logger.info("INT8 with %d float stages: same top-1 as FP32 on %.4f of %d validation images", stages,
                    agreement, len(trials.val_images))
        if agreement >= target:
            return float_nodes, stages, attempts
    best = max(attempts, key=lambda a: (a["val_top1_agreement"], -a["float_stages"]))
    trials.write(nodes_for(best["float_stages"]))
    return nodes_for(best["float_stages"]), best["float_stages"], attempts


def _sensitivity_search(trials: _Trials, units: list[FloatUnit], start_nodes: list[str], target: float,
                        by_divergence: bool = False
                        ) -> tuple[list[str], list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """Start from ``start_nodes`` in FP32 and the rest INT8; if ``target`` is missed, measure for each block what
    keeping it in FP32 (alone, beside the start) does on the validation images: how many answers agree with FP32
    and how far the divergence from FP32 falls. Keep the blocks in that order, the most useful first, until the
    agreement holds (else the best attempt); then give back to INT8 the blocks the agreement turns out not to need
    (``_prune``). ``by_divergence``: order the blocks by the divergence alone (--float_selection divergence).

    Returns (FP32 node names, FP32 block names, attempts, the sensitivity of every block)."""
    float_nodes, float_units = list(start_nodes), []
    agreement, kl = trials.score(float_nodes)
    attempts = [{"float_units": [], "float_nodes": len(float_nodes), "val_top1_agreement": agreement, "val_kl": kl}]
    logger.info("INT8 with %d FP32 nodes: same top-1 as FP32 on %.4f of %d validation images (KL %.4f)",
                len(float_nodes), agreement, len(trials.val_images), kl)
    if agreement >= target:
        return float_nodes, float_units, attempts, []
    started = set(start_nodes)
    candidates = [unit for unit in units if not set(unit.nodes) <= started]
    sensitivity = []
    for unit in candidates:
        unit_agreement, unit_kl = trials.score([*start_nodes, *unit.nodes])
        sensitivity.append({"unit": unit.name, "nodes": len(unit.nodes), "val_kl_when_float": unit_kl,
                            "val_top1_agreement_when_float": unit_agreement, "kl_reduction": kl - unit_kl})
    # Answers brought back first (a block that alone reaches the target ends the search with the fewest nodes),
    # then the divergence, which still ranks blocks when a small validation split moves by whole images.
    # --float_selection divergence ranks by the divergence alone: it moves with every validation answer, where the
    # count of answers turned back moves with the few near ties of this split (a ranking that may not carry over).
    sensitivity.sort(key=lambda s: (-s["kl_reduction"], s["nodes"]) if by_divergence else
                     (-s["val_top1_agreement_when_float"], -s["kl_reduction"], s["nodes"]))
    logger.info("INT8 sensitivity (KL from FP32 %.4f with everything INT8): %s", kl, ", ".join(
        f"{s['unit']} {s['kl_reduction']:+.4f}" for s in sensitivity[:6]))
    by_name = {unit.name: unit for unit in candidates}
    for entry in sensitivity:
        float_units.append(entry["unit"])
        float_nodes = _nodes_of(start_nodes, float_units, by_name)
        agreement, kl = trials.score(float_nodes)
        attempts.append({"float_units": list(float_units), "float_nodes": len(float_nodes),
                         "val_top1_agreement": agreement, "val_kl": kl})
        logger.info("INT8 with %s in FP32 (%d nodes): same top-1 as FP32 on %.4f (KL %.4f)", ", ".join(float_units),
                    len(float_nodes), agreement, kl)
        if agreement >= target:
            float_units = _prune(trials, by_name, start_nodes, float_units, sensitivity, target, attempts)
            float_nodes = _prune_nodes(trials, start_nodes, _nodes_of(start_nodes, float_units, by_name), target,
                                       attempts)
            float_units = [name for name in float_units if set(by_name[name].nodes) & set(float_nodes)]
            return float_nodes, float_units, attempts, sensitivity
    best = max(attempts, key=lambda a: (a["val_top1_agreement"], -a["float_nodes"]))
    float_units = best["float_units"]
    float_nodes = _nodes_of(start_nodes, float_units, by_name)
    trials.write(float_nodes)
    return float_nodes, float_units, attempts, sensitivity


def _prune_nodes(trials: _Trials, start_nodes: list[str], float_nodes: list[str], target: float,
                 attempts: list[dict[str, Any]]) -> list[str]:
    """Then node by node inside the kept blocks: a block's weak spot is often one tensor (seen: the stride-2
    depthwise convolution could go back to INT8 while its block's pointwise convolutions could not)."""
    started = set(start_nodes)
    kept = list(float_nodes)
    candidates = [node for node in float_nodes if node not in started]
    for node in candidates if len(candidates) > 1 else []:
        candidate = [name for name in kept if name != node]
        agreement, kl = trials.score(candidate)
        attempts.append({"float_units": sorted({unit_of(name) for name in candidate if name not in started}),
                         "float_nodes": len(candidate), "val_top1_agreement": agreement, "val_kl": kl,
                         "pruned": node})
        if agreement >= target:
            kept = candidate
    if len(candidates) > 1:
        trials.write(kept)
        logger.info("INT8: %d of the kept blocks' %d nodes went back to INT8 with the agreement kept",
                    len(float_nodes) - len(kept), len(candidates))
    return kept


def _nodes_of(start_nodes: list[str], units: list[str], by_name: dict[str, FloatUnit]) -> list[str]:
    started = set(start_nodes)
    return [*start_nodes, *(n for name in units for n in by_name[name].nodes if n not in started)]


def _prune(trials: _Trials, by_name: dict[str, FloatUnit], start_nodes: list[str], float_units: list[str],
           sensitivity: list[dict[str, Any]], target: float, attempts: list[dict[str, Any]]) -> list[str]:
    """Give back to INT8 every FP32 block the agreement does not need, the least useful first: blocks that were
    added before the one that crossed the target may have moved nothing on the validation answers. Leaves the
    trials' target holding the quantized model of the returned blocks."""
    gain = {entry["unit"]: entry["kl_reduction"] for entry in sensitivity}
    kept = list(float_units)
    for unit in sorted(float_units[:-1], key=lambda name: gain[name]) if len(float_units) > 1 else []:
        candidate = [name for name in kept if name != unit]
        nodes = _nodes_of(start_nodes, candidate, by_name)
        agreement, kl = trials.score(nodes)
        attempts.append({"float_units": list(candidate), "float_nodes": len(nodes), "val_top1_agreement": agreement,
                         "val_kl": kl, "pruned": unit})
        if agreement >= target:
            kept = candidate
            logger.info("INT8: %s back to INT8, agreement still %.4f", unit, agreement)
    if len(float_units) > 1:  # the last trial may have been a rejected candidate
        trials.write(_nodes_of(start_nodes, kept, by_name))
    return kept


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
    train_labels: Optional[list[int]] = None  # for class-balanced calibration
    # The per-channel mean and std load_batch normalises 8-bit pixels with (deploy.input_grid), if known.
    normalisation: Optional[tuple[Sequence[float], Sequence[float]]] = None


# Each view: (mirrored, vertical and horizontal shift as a share of the side, zoom). Small changes a camera or a
# crop makes anyway, so a view's FP32 answer is as honest about new photos as the image's, with its own near ties.
CHECK_VIEWS = ((False, 0.0, 0.0, 1.0), (True, 0.0, 0.0, 1.0), (False, 0.04, 0.04, 1.0), (True, -0.04, -0.04, 1.0),
               (False, 0.0, 0.0, 1.1), (True, 0.0, 0.0, 1.1), (False, 0.04, -0.04, 1.0), (True, -0.04, 0.04, 1.0))


def check_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """The first ``views`` of CHECK_VIEWS of every preprocessed image (N, C, H, W), view after view: the agreement
    check's inputs. Made on the model's input tensor (``view_of``), so nothing is decoded again."""
    if views <= 1 or not len(images):
        return images
    return torch.cat([view_of(images, *view) for view in CHECK_VIEWS[:views]])


def view_of(images: torch.Tensor, mirrored: bool, down: float, right: float, zoom: float) -> torch.Tensor:
    """``images`` (N, C, H, W) mirrored, shifted by ``down`` and ``right`` shares of the side (the edge padded by
    reflection, so no black band a camera never makes) and zoomed into the centre by ``zoom`` (resized back)."""
    import torch.nn.functional as F

    height, width = images.shape[-2:]
    view = images.flip(-1) if mirrored else images
    dy, dx = round(down * height), round(right * width)
    if dy or dx:
        pad = (abs(dx), abs(dx), abs(dy), abs(dy))
        padded = F.pad(view, pad, mode="reflect")
        top, left = abs(dy) - dy, abs(dx) - dx
        view = padded[..., top:top + height, left:left + width]
    if zoom != 1.0:
        crop_h, crop_w = round(height / zoom), round(width / zoom)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        view = F.interpolate(view[..., top:top + crop_h, left:left + crop_w], size=(height, width),
                             mode="bilinear", align_corners=False, antialias=False)
    return view.contiguous()


def calibration_images(paths: list[Path], labels: Optional[list[int]], count: int, sampling: str,
                       seed: int = 0) -> list[Path]:
    """``count`` training images (seeded): ``balanced`` takes them from every class in turn, so a class with few
    photos still shapes the ranges; ``random`` draws in proportion to the classes' sizes."""
    rng = random.Random(seed)
    count = min(count, len(paths))
    if sampling != "balanced" or not labels:
        return rng.sample(paths, count)
    by_class: dict[int, list[Path]] = {}
    for path, label in zip(paths, labels):
        by_class.setdefault(label, []).append(path)
    queues = [rng.sample(members, len(members)) for _, members in sorted(by_class.items())]
    chosen: list[Path] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen


def _select(trials: _Trials, graph, levels: list[dict[str, Any]], float_stages: int, settings: QuantOptions,
            validate: bool) -> dict[str, Any]:
    """One calibration method's answer: which nodes stay FP32 (``settings.float_selection``), written to the
    trials' target, with the attempts that led there."""
    start_nodes = nodes_up_to(graph, levels[float_stages - 1]["module"]) if float_stages else []
    if not validate:
        trials.write(start_nodes)
        return {"float_nodes": start_nodes, "float_stages": float_stages, "float_units": [], "attempts": [],
                "sensitivity": []}
    if settings.float_selection == "prefix":
        nodes, stages, attempts = _prefix_search(trials, graph, levels, float_stages, settings.min_agreement)
        return {"float_nodes": nodes, "float_stages": stages, "float_units": [], "attempts": attempts,
                "sensitivity": []}
    nodes, units, attempts, sensitivity = _sensitivity_search(trials, quantization_units(graph), start_nodes,
                                                              settings.min_agreement,
                                                              settings.float_selection == "divergence")
    return {"float_nodes": nodes, "float_stages": float_stages, "float_units": units, "attempts": attempts,
            "sensitivity": sensitivity}


def _taken_over(trials: _Trials, chosen_on: dict[str, Any], validate: bool) -> dict[str, Any]:
    """Another checkpoint's choice of FP32 nodes, written to the trials' target and scored once for the record."""
    nodes = list(chosen_on["int8_float_node_names"])
    attempts = []
    if validate:
        agreement, kl = trials.score(nodes)
        attempts.append({"float_nodes": len(nodes), "val_top1_agreement": agreement, "val_kl": kl})
    else:
        trials.write(nodes)
    return {"float_nodes": nodes, "float_stages": chosen_on["int8_float_stages"],
            "float_units": list(chosen_on["int8_float_units"]), "attempts": attempts,
            "sensitivity": chosen_on["sensitivity"]}


def _weight_rounding_shifts(prepped: Path, work: Path, calib: list[Path],
                            load_batch: Callable[[list[Path]], torch.Tensor], target_cpu: str) -> dict[str, np.ndarray]:
    """Per INT8 Conv/Gemm node the mean output shift its rounded weights cause (deploy.bias_correction), with the
    weights rounded by ONNX Runtime itself: every node quantized once (weights do not depend on the activation
    ranges, so a few calibration images do)."""
    from deploy.bias_correction import weight_rounding_shifts

    rounded = work / "weights-int8.onnx"
    quantize_int8(prepped, rounded, CalibrationReader(calib[:8], lambda paths: load_batch(paths).numpy()), "minmax",
                  target_cpu=target_cpu)
    batches = (load_batch(calib[i:i + 16]).numpy() for i in range(0, len(calib), 16))
    return weight_rounding_shifts(prepped, rounded, batches)


def int8_rank(float_nodes: int, val_agreement: Optional[float], min_agreement: float) -> tuple:
    """Orders candidate INT8 files, smaller first: reaching the agreement, then the fewest FP32 nodes, then the
    higher agreement (a file checked on no validation image counts as agreeing)."""
    agreement = 1.0 if val_agreement is None else val_agreement
    return agreement < min_agreement, float_nodes, -agreement


def _best_agreement(choice: dict[str, Any]) -> float:
    return max((a["val_top1_agreement"] for a in choice["attempts"]), default=1.0)


def quantize_verified(fp32_path: Path, int8_target: Path, feature_levels: list[dict[str, Any]],
                      metadata: dict[str, str], settings: QuantOptions, test: ReferenceSet,
                      data: CalibrationData, delivered_fp32: Optional[Path] = None,
                      chosen_on: Optional[dict[str, Any]] = None, timed: bool = True) -> dict[str, Any]:
    """Quantize the verified FP32 file to ``int8_target`` (atomically), keeping the parts that need it in FP32 until
    the INT8 model gives FP32's top-1 on ``settings.min_agreement`` of the validation images; then measure its test
    agreement, accuracy, size and batch-1 speed against FP32.

    ``delivered_fp32`` (default ``fp32_path``) is the model INT8 must agree with and is timed and sized against:
    the delivered FP32 file when ``fp32_path`` is a quantization-aware tuned copy of it.

    ``chosen_on``: this function's report on another checkpoint of the same network, whose FP32 nodes and calibration
    method are then used as they are, with no search of its own: a model refit on the validation images answers
    them as it learned them (seen: 97% right on validation against 64% on test, no answer within 0.05 of the
    runner-up), so its own validation agreement cannot tell which INT8 rounding costs answers on new photos; the
    checkpoint selected before the refit never trained on them. The validation agreement of this model is still
    measured and reported (``seen_val_top1_agreement``). ``timed=False`` skips the batch-1 latency of a file that
    is only a means to choose (its ``*_batch1_ms`` are None)."""
    import onnx

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
    calib = calibration_images(data.train_paths, data.train_labels, settings.calib_images, settings.calib_sampling)
    validate = len(data.val_images) > 0 and settings.min_agreement > 0
    delivered_fp32 = delivered_fp32 or fp32_path
    val_fp32_probs = onnx_probs(delivered_fp32, data.val_images, n_class) if validate else None
    methods = ("minmax", "percentile", "entropy") if settings.calibrate_method == "auto" else (
        settings.calibrate_method,)
    if chosen_on is not None:
        methods = (chosen_on["calibrate_method"],)
    with tempfile.TemporaryDirectory(dir=int8_target.parent, prefix=".calibration-") as work:
        prepped = Path(work) / "preprocessed.onnx"
        prepare_for_quantization(fp32_path, prepped)
        graph = onnx.load(str(prepped)).graph
        total_nodes = len(graph.node)
        shifts = (_weight_rounding_shifts(prepped, Path(work), calib, data.load_batch, settings.int8_target_cpu)
                  if settings.bias_correction else {})
        choices = {}
        for method in methods:
            reader = CalibrationReader(calib, lambda paths: data.load_batch(paths).numpy())
            trials = _Trials(prepped, Path(work) / f"int8-{method}.onnx", reader, method,
                             Path(work) / f"ranges-{method}.json", data.val_images, val_fp32_probs, shifts,
                             data.normalisation if settings.pixel_exact_input else None, settings.int8_target_cpu)
            choice = (_select(trials, graph, feature_levels, float_stages, settings, validate) if chosen_on is None
                      else _taken_over(trials, chosen_on, validate))
            choices[method] = {**choice, "path": trials.target, "bias_corrected": trials.bias_corrected,
                               "input_on_pixel_grid": trials.input_on_pixel_grid}
            if len(methods) > 1:
                logger.info("calibration %s: %d FP32 nodes, validation agreement %.4f", method,
                            len(choices[method]["float_nodes"]), _best_agreement(choices[method]))
        # Reaching the agreement first, then the fewest FP32 nodes, then the higher agreement; minmax wins ties.
        method = min(methods, key=lambda m: int8_rank(len(choices[m]["float_nodes"]), _best_agreement(choices[m]),
                                                      settings.min_agreement))  # minmax first among equals
        chosen = choices[method]
        float_nodes = chosen["float_nodes"]
        with atomic_path(int8_target) as int8_tmp:
            os.replace(chosen["path"], int8_tmp)
            write_onnx_metadata(int8_tmp, {**metadata, "precision": "int8", "float_stages": str(chosen["float_stages"]),
                                           "float_nodes": str(len(float_nodes)),
                                           "float_units": ",".join(chosen["float_units"]),
                                           "calibrate_method": method,
                                           "bias_corrected_nodes": str(chosen["bias_corrected"]),
                                           "input_on_pixel_grid": str(chosen["input_on_pixel_grid"]).lower(),
                                           "int8_target_cpu": settings.int8_target_cpu})
            check_onnx_model(int8_tmp)
            int8_probs = onnx_probs(int8_tmp, test.images, n_class)
            fp32_ms, int8_ms = compare_latency([delivered_fp32, int8_tmp], test.images[:1].numpy(),
                                               os.cpu_count() or 1) if timed else (None, None)
            stages = chosen["float_stages"]
            result = {"int8_top1_agreement": float((int8_probs.argmax(1) == test.torch_probs.argmax(1)).mean()),
                      "int8_accuracy": float((int8_probs.argmax(1) == test.labels).mean()),
                      "int8_size_ratio": int8_tmp.stat().st_size / delivered_fp32.stat().st_size,
                      "fp32_batch1_ms": fp32_ms, "int8_batch1_ms": int8_ms, "gated_activations": gated,
                      "float_selection": settings.float_selection,
                      "int8_float_stages": stages,
                      "int8_float_until": feature_levels[stages - 1]["module"] if stages else None,
                      "int8_float_units": chosen["float_units"], "int8_float_nodes": len(float_nodes),
                      "int8_float_node_names": sorted(float_nodes),
                      "graph_nodes": total_nodes, "int8_float_share": len(float_nodes) / total_nodes,
                      "int8_bias_corrected": chosen["bias_corrected"],
                      "int8_input_on_pixel_grid": chosen["input_on_pixel_grid"],
                      "int8_target_cpu": settings.int8_target_cpu,
                      # The agreement above was measured with this CPU's kernels: they saturate where it has no VNNI.
                      "int8_checked_on_cpu": cpu_description(),
                      "calibrate_method": method, "calib_sampling": settings.calib_sampling,
                      "calib_images": len(calib), "min_agreement": settings.min_agreement,
                      "check_views": settings.check_views, "check_images": len(data.val_images) if validate else 0,
                      "agreement_attempts": chosen["attempts"], "sensitivity": chosen["sensitivity"],
                      # The written file's own agreement, measured again: pruning ends on the last candidate that
                      # held the target, which can agree on fewer images than the search's best attempt.
                      "val_top1_agreement": (agreement_and_divergence(int8_tmp, data.val_images, val_fp32_probs)[0]
                                             if validate else None)}
            if chosen_on is not None:
                # The guard's figures are the held-out checkpoint's; this model's own are on images it trained on.
                result.update(val_top1_agreement=chosen_on["val_top1_agreement"],
                              seen_val_top1_agreement=result["val_top1_agreement"],
                              agreement_attempts=chosen_on["agreement_attempts"],
                              chosen_on_test_top1_agreement=chosen_on["int8_top1_agreement"])
            if len(methods) > 1:
                result["calibration_comparison"] = [
                    {"calibrate_method": m, "float_nodes": len(choices[m]["float_nodes"]),
                     "val_top1_agreement": _best_agreement(choices[m])} for m in methods]
    _log_float_choice(result, settings.min_agreement, gated)
    return result


def _log_float_choice(result: dict[str, Any], min_agreement: float, gated: int) -> None:
    attempts = result["agreement_attempts"]
    best_agreement = max((a["val_top1_agreement"] for a in attempts), default=1.0)
    if best_agreement < min_agreement:
        logger.warning("!!! INT8 agrees with FP32 on at most %.4f of the validation images (wanted %.2f) even with "
                       "%d of %d nodes in FP32; kept the best attempt; deploy %s if that matters", best_agreement,
                       min_agreement, max(a["float_nodes"] for a in attempts), result["graph_nodes"],
                       ExportDir.FP32_NAME)
    if result["int8_float_nodes"]:
        where = (f"blocks {', '.join(result['int8_float_units'])}" if result["int8_float_units"] else
                 f"the first {result['int8_float_stages']} stages (through {result['int8_float_until']})")
        if result["int8_float_units"] and result["int8_float_stages"]:
            where += f" beside the first {result['int8_float_stages']} stages"
        logger.info("INT8: %s stay FP32 (%d of %d nodes, %.0f%%)%s", where, result["int8_float_nodes"],
                    result["graph_nodes"], 100 * result["int8_float_share"],
                    f"; {gated} SiLU/SE/hard-swish activations" if gated else "")


def warn_mostly_float(report: dict[str, Any], n_stages: int) -> None:
    """More of the INT8 file stayed FP32 than --max_float_share allows (or it is over half the FP32 size): say what
    stayed float, why, and what to change."""
    if report["int8_float_units"]:
        where = f"blocks {', '.join(report['int8_float_units'])}"
        if report["int8_float_stages"]:
            where += f" and the first {report['int8_float_stages']} of {n_stages} stages"
    else:
        where = f"its first {report['int8_float_stages']} of {n_stages} stages"
    attempts = report["agreement_attempts"]
    if attempts:
        fewest = attempts[0]
        why = (f"for --min_agreement {report['min_agreement']:.2f} (with {fewest['float_nodes']} float nodes INT8 "
               f"gave FP32's answer on {fewest['val_top1_agreement']:.4f} of the validation images); for a smaller, "
               f"faster file try --float_selection sensitivity (keeps fewer answers on new photos) or --qat_epochs "
               f"2, or accept fewer agreeing answers with --min_agreement")
    else:
        why = "as --keep_float_stages asked; lower it for a smaller, faster file"
    logger.warning("!!! %s keeps %d of %d nodes (%.0f%%) in FP32 and is %.0f%% of the FP32 file: %s stay FP32 %s, "
                   "or deploy %s", ExportDir.INT8_NAME, report["int8_float_nodes"], report["graph_nodes"],
                   100 * report["int8_float_share"], 100 * report["int8_size_ratio"], where, why, ExportDir.FP32_NAME)
