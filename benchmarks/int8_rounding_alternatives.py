"""Two further post-training corrections of an INT8 file the export wrote, scored beside that file.

  adaround         learned rounding of the weights (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
                   Quantization", 2020): each INT8 Conv/Gemm chooses, weight by weight, to round down or up so that
                   its output on calibration images (sampled positions, FP32 inputs) stays closest to FP32's, with
                   the file's own per-channel scales; its bias then moves by the mean output change of the new
                   rounding (the export's bias correction already covers ONNX Runtime's rounding)
  sequential_mean  layer-by-layer correction of the mean shift of every INT8 Conv/Gemm's output in the INT8 graph
                   itself (activation rounding included), each layer measured after the ones before it were
                   corrected (the empirical bias correction of Nagel et al., 2019)
  sequential_mean_linear
                   the same, only on the convolutions whose output no activation follows (linear bottlenecks,
                   logits)

Each writes <method>/clf_model_int8.onnx under --export_dir (an export folder holding clf_model.onnx and
clf_model_int8.onnx, e.g. a variant of benchmarks.int8_float_selection) and the table gives, for the export's file
and each method's: agreement with FP32 and KL divergence from FP32 on the validation and test images and on 8 views
of each (mirror, shift, zoom), test accuracy, and the seconds the method took on this machine.

Example (docs/measurements_speed.md, "더 해 본 두 보정"):
    python -m benchmarks.int8_rounding_alternatives --model_path <run folder> --export_dir /tmp/int8_selection/all_int8
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deploy.bias_correction import move_quantized_bias, output_mean_shift
from deploy.machine import describe_machine, machine_info
from deploy.onnx_quant import agreement_and_divergence, calibration_images, check_views
from runs.export_dir import ExportDir
from runs.run_folder import RunDir
from runs.run_info import read_run_info
from utils.logging_setup import setup_logging
from utils.onnx_runtime import node_attribute, session_with_outputs

logger = logging.getLogger(__name__)
METHODS = ("adaround", "sequential_mean", "sequential_mean_linear")
VIEWS = 8
LINEAR_OPS = ("Conv", "Gemm")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("INT8 after learned rounding or layer-by-layer mean correction",
                                     add_help=add_help)
    parser.add_argument("--model_path", required=True, help="run folder written by main.py")
    parser.add_argument("--export_dir", required=True, help="export folder with clf_model.onnx and clf_model_int8.onnx")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--calib_images", type=int, default=64, help="class-balanced training images")
    parser.add_argument("--positions", type=int, default=32, help="adaround: output positions sampled per image")
    parser.add_argument("--steps", type=int, default=300, help="adaround: optimisation steps per layer")
    parser.add_argument("--rounding_weight", type=float, default=0.01,
                        help="adaround: weight of the term that pushes every choice to exactly down or up")
    return parser


class _QuantizedNode:
    """An INT8 Conv/Gemm of the QDQ file beside the same node of the FP32 file."""

    def __init__(self, fp32_node, int8_node, producers: dict[str, Any]):
        self.fp32, self.int8 = fp32_node, int8_node
        self.weight_dq = producers[int8_node.input[1]]
        self.bias_dq = producers.get(int8_node.input[2]) if len(int8_node.input) > 2 else None


def _quantized_nodes(fp32_model, int8_model) -> list[_QuantizedNode]:
    """The Conv/Gemm nodes the QDQ file runs with int8 weights and an int32 bias, in graph order, matched to the
    FP32 file's nodes by their weight's name (ONNX Runtime names the dequantized weight after it)."""
    producers = {out: node for node in int8_model.graph.node for out in node.output}
    by_weight = {}
    for node in int8_model.graph.node:
        if node.op_type in LINEAR_OPS and node.input[1] in producers:
            dq = producers[node.input[1]]
            if dq.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2] in producers:
                by_weight[dq.input[0].removesuffix("_quantized")] = node
    return [_QuantizedNode(node, by_weight[node.input[1]], producers) for node in fp32_model.graph.node
            if node.op_type in LINEAR_OPS and node.input[1] in by_weight]


def _array(constants: dict[str, Any], name: str) -> np.ndarray:
    from onnx import numpy_helper

    return np.array(numpy_helper.to_array(constants[name]))  # a writable copy: torch.from_numpy shares it


def _replace(constants: dict[str, Any], name: str, values: np.ndarray) -> None:
    from onnx import numpy_helper

    constants[name].CopyFrom(numpy_helper.from_array(values, name))


def _matrix(node, weight: np.ndarray) -> np.ndarray:
    """The weight as (output channels, inputs per output): a Conv's kernel flattened, a Gemm's B as out x in."""
    if node.op_type == "Gemm":
        return weight if node_attribute(node, "transB", 0) else weight.T
    return weight.reshape(weight.shape[0], -1)


def _unmatrix(node, matrix: np.ndarray, shape: tuple) -> np.ndarray:
    if node.op_type == "Gemm":
        return matrix if node_attribute(node, "transB", 0) else matrix.T
    return matrix.reshape(shape)


def _patches(node, x: torch.Tensor, positions: int, rng: np.random.Generator) -> torch.Tensor:
    """``positions`` random output positions per image of a Conv's input as rows of its receptive field (a Gemm's
    input rows as they are)."""
    if node.op_type == "Gemm":
        return x.reshape(len(x), -1)
    kernel = tuple(node_attribute(node, "kernel_shape", None))
    pads = list(node_attribute(node, "pads", [0, 0, 0, 0]))
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    unfolded = F.unfold(x, kernel, dilation=tuple(node_attribute(node, "dilations", [1, 1])),
                        stride=tuple(node_attribute(node, "strides", [1, 1])))  # N, C*kh*kw, L
    count = min(positions, unfolded.shape[2])
    chosen = torch.from_numpy(np.stack([rng.choice(unfolded.shape[2], count, replace=False) for _ in range(len(x))]))
    rows = torch.gather(unfolded, 2, chosen[:, None, :].expand(-1, unfolded.shape[1], -1))
    return rows.permute(0, 2, 1).reshape(-1, unfolded.shape[1])


def _output(rows: torch.Tensor, matrix: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return rows @ matrix.T
    if groups == matrix.shape[0]:  # depthwise: one input channel per output channel
        return (rows.reshape(len(rows), groups, -1) * matrix.reshape(1, groups, -1)).sum(-1)
    per_group = matrix.reshape(groups, matrix.shape[0] // groups, -1)
    return torch.einsum("pgk,gck->pgc", rows.reshape(len(rows), groups, -1), per_group).reshape(len(rows), -1)


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1)  # AdaRound's stretch (zeta 1.1, gamma -0.1)


def _learned_rounding(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: int, high: int,
                      groups: int, steps: int, rounding_weight: float, seed: int) -> torch.Tensor:
    """Integer weights (out x in) that keep ``rows @ weight`` closest to FP32's, each rounded down or up."""
    generator = torch.Generator().manual_seed(seed)
    floor = torch.floor(weight / scale)
    rest = (weight / scale - floor).clamp(0.01, 0.99)
    # Start where the rectified sigmoid gives the nearest rounding's fraction.
    v = torch.log((rest + 0.1) / 1.2 / (1 - (rest + 0.1) / 1.2)).requires_grad_(True)
    target = _output(rows, weight, groups)
    optimiser = torch.optim.Adam([v], lr=1e-2)
    batch = min(len(rows), 1024)
    for step in range(steps):
        picked = torch.randint(0, len(rows), (batch,), generator=generator)
        soft = torch.clamp(floor + _rectified_sigmoid(v), low, high) * scale
        loss = ((_output(rows[picked], soft, groups) - target[picked]) ** 2).sum(1).mean()
        warm = step / steps
        if warm >= 0.2:  # after a warm-up, push every choice to 0 or 1 with a sharpening exponent 20 -> 2
            beta = 20 - 18 * (warm - 0.2) / 0.8
            loss = loss + rounding_weight * (1 - (2 * _rectified_sigmoid(v) - 1).abs() ** beta).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return torch.clamp(floor + (v.detach() >= 0).float(), low, high)


def adaround(fp32_model, int8_model, calib: np.ndarray, positions: int, steps: int, rounding_weight: float
             ) -> tuple[Any, dict[str, float]]:
    """A copy of the QDQ model with learned weight rounding and the bias moved by the new rounding's mean shift."""
    model = copy.deepcopy(int8_model)
    constants = {t.name: t for t in model.graph.initializer}
    fp32_constants = {t.name: t for t in fp32_model.graph.initializer}
    nodes = _quantized_nodes(fp32_model, model)
    graph_input = fp32_model.graph.input[0].name
    session = session_with_outputs(fp32_model, [n.fp32.input[0] for n in nodes])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(nodes))}
    mean_inputs: dict[int, torch.Tensor] = {}
    for start in range(0, len(calib), 16):
        values = dict(zip(names, session.run(None, {graph_input: calib[start:start + 16]})))
        values[graph_input] = calib[start:start + 16]
        for i, node in enumerate(nodes):
            x = torch.from_numpy(values[node.fp32.input[0]])
            mean_inputs[i] = mean_inputs.get(i, 0) + x.double().sum(0)
            rows[i].append(_patches(node.fp32, x, positions, rng))
    error_before = error_after = 0.0
    for i, node in enumerate(nodes):
        fp32_weight = _array(fp32_constants, node.fp32.input[1])
        weight = torch.from_numpy(_matrix(node.fp32, fp32_weight)).float()
        int8_name, scale_name = node.weight_dq.input[0], node.weight_dq.input[1]
        stored = _array(constants, int8_name)
        if len(node.weight_dq.input) > 2 and np.any(_array(constants, node.weight_dq.input[2])):
            continue  # an asymmetric weight grid: not what ONNX Runtime writes for per-channel weights
        nearest = torch.from_numpy(_matrix(node.fp32, stored.astype(np.float32)))
        scale = torch.from_numpy(_array(constants, scale_name).astype(np.float32))
        scale = scale.reshape(-1, 1) if scale.ndim else scale
        if node.fp32.op_type == "Gemm" and scale.ndim and scale.shape[0] != weight.shape[0]:
            scale = scale.reshape(1, -1)
        groups = node_attribute(node.fp32, "group", 1) if node.fp32.op_type == "Conv" else 1
        x = torch.cat(rows[i]).float()
        low, high = (-128, 127) if stored.dtype == np.int8 else (0, 255)
        learned = _learned_rounding(x, weight, scale, low, high, groups, steps, rounding_weight, seed=i)
        target = _output(x, weight, groups)
        before = float(((_output(x, nearest * scale, groups) - target) ** 2).mean())
        after = float(((_output(x, learned * scale, groups) - target) ** 2).mean())
        change = _unmatrix(node.fp32, ((learned - nearest) * scale).double().numpy(), fp32_weight.shape)
        shift = output_mean_shift(node.fp32, change, (mean_inputs[i] / len(calib)).numpy())
        error_before += before
        if after >= before or shift is None:  # keep the nearest rounding where learning did not help on these rows
            error_after += before  # (or where the bias could not follow the new rounding)
            continue
        error_after += after
        _replace(constants, int8_name, _unmatrix(node.fp32, learned.numpy(), stored.shape).astype(stored.dtype))
        move_quantized_bias(constants, node.bias_dq, shift)
    return model, {"layer_error_nearest": error_before, "layer_error_learned": error_after}


def sequential_mean(fp32_model, int8_model, calib: np.ndarray, linear_only: bool) -> Any:
    """A copy of the QDQ model in which each INT8 Conv/Gemm, in graph order, has its bias moved by the mean shift of
    its output from FP32's on the calibration images, measured with every node before it already corrected."""
    import onnx
    import onnxruntime as ort

    model = copy.deepcopy(int8_model)
    constants = {t.name: t for t in model.graph.initializer}
    nodes = _quantized_nodes(fp32_model, model)
    if linear_only:  # ONNX Runtime folds a ReLU6 into its node's output range: ask the FP32 graph
        activated = _activation_inputs(fp32_model)
        nodes = [n for n in nodes if n.fp32.output[0] not in activated]
    graph_input = fp32_model.graph.input[0].name
    reference = session_with_outputs(fp32_model, [n.fp32.output[0] for n in nodes])
    fp32_means = _channel_means(reference, graph_input, calib)
    # The int32 biases become inputs, so one session measures every step; no graph optimisation, so the QDQ
    # nodes compute as written (the float output of each node before its QuantizeLinear is still there).
    probe = copy.deepcopy(model)
    outputs = {o.name for o in probe.graph.output}
    for node in nodes:
        if node.int8.output[0] not in outputs:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.int8.output[0]))
        bias = _array(constants, node.bias_dq.input[0])
        probe.graph.input.append(onnx.helper.make_tensor_value_info(node.bias_dq.input[0], onnx.TensorProto.INT32,
                                                                    list(bias.shape)))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # the biases fed as inputs are initializers too: that warning is expected
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for node in nodes:
        feeds = {n.bias_dq.input[0]: _array(constants, n.bias_dq.input[0]) for n in nodes}
        sums, count = 0.0, 0
        for start in range(0, len(calib), 32):
            feeds[graph_input] = calib[start:start + 32]
            out = session.run([node.int8.output[0]], feeds)[0].astype(np.float64)
            sums = sums + (out.mean((2, 3)) if out.ndim == 4 else out).sum(0)
            count += len(out)
        move_quantized_bias(constants, node.bias_dq, sums / count - fp32_means[node.fp32.output[0]])
    return model


def _activation_inputs(fp32_model) -> set[str]:
    return {name for n in fp32_model.graph.node if n.op_type in ("Clip", "Relu", "HardSwish", "Sigmoid")
            for name in n.input}


def _channel_means(session, graph_input: str, calib: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    for start in range(0, len(calib), 32):
        for name, out in zip(names, session.run(None, {graph_input: calib[start:start + 32]})):
            out = out.astype(np.float64)
            sums[name] = sums.get(name, 0) + (out.mean((2, 3)) if out.ndim == 4 else out).sum(0)
    return {name: total / len(calib) for name, total in sums.items()}


def _scores(path: Path, sets: dict[str, torch.Tensor], references: dict[str, np.ndarray],
            test_labels: np.ndarray) -> dict[str, float]:
    row = {}
    for name, images in sets.items():
        agreement, kl = agreement_and_divergence(path, images, references[name])
        row[f"{name}_agreement"], row[f"{name}_kl"] = round(agreement, 4), round(kl, 5)
    from prediction.predictors import onnx_probs

    probs = onnx_probs(path, sets["test"], references["test"].shape[1])
    row["test_accuracy"] = round(float((probs.argmax(1) == test_labels).mean()), 4)
    return row


def main(args: argparse.Namespace) -> list[dict]:
    import onnx

    from dataloaders.inference_data import load_preprocessed
    from dataloaders.transforms import build_eval_transform, decode_min_side
    from prediction.predictors import onnx_probs
    from segmentation.skin_region import image_decoder_for_run

    setup_logging()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"error: --methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    run_dir, export = Path(args.model_path), ExportDir(Path(args.export_dir))
    info = read_run_info(run_dir)
    run = RunDir(run_dir)
    transform = build_eval_transform(info.preprocessing)
    decoder = image_decoder_for_run(info, run.dataset_root(None), decode_min_side(info.preprocessing))

    def load(samples):
        return load_preprocessed([s.path for s in samples], transform, decoder)

    train = run.split("train", None)
    calib = load_preprocessed(calibration_images([s.path for s in train], [s.label for s in train],
                                                 args.calib_images, "balanced"), transform, decoder).numpy()
    test_samples = run.split("test", None)
    sets = {"val": load(run.split("val", None)), "test": load(test_samples)}
    sets.update({f"{name}_views_{VIEWS}": check_views(images, VIEWS) for name, images in list(sets.items())})
    n_class = info.n_class
    references = {name: onnx_probs(export.fp32, images, n_class) for name, images in sets.items()}
    labels = np.array([s.label for s in test_samples])
    fp32_model, int8_model = onnx.load(str(export.fp32)), onnx.load(str(export.int8))
    rows = [{"file": "export", **_scores(export.int8, sets, references, labels)}]
    for method in methods:
        started = time.perf_counter()
        extra: dict[str, float] = {}
        if method == "adaround":
            model, extra = adaround(fp32_model, int8_model, calib, args.positions, args.steps, args.rounding_weight)
        else:
            model = sequential_mean(fp32_model, int8_model, calib, linear_only=method.endswith("_linear"))
        seconds = round(time.perf_counter() - started, 1)
        target = export.root / method / export.int8.name
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(target))
        rows.append({"file": method, **_scores(target, sets, references, labels), "seconds": seconds,
                     **{k: round(v, 5) for k, v in extra.items()}})
        logger.info("%s: %s", method, rows[-1])
    print(f"machine: {describe_machine(machine_info(0))}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(",".join(columns))
    for row in rows:
        print(",".join("" if row.get(c) is None else str(row.get(c)) for c in columns))
    return rows


if __name__ == "__main__":
    logging.captureWarnings(True)
    main(get_args_parser().parse_args())
