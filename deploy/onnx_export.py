"""Turning a trained timm model into a fast, self-contained, verified ONNX graph (and the face parser into one).

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
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from configs import ExportOptions
from dataloaders.inference_data import load_preprocessed
from dataloaders.transforms import build_eval_transform, decode_min_side
from deploy.executorch_export import export_executorch
from deploy.mobile import export_mobile
from deploy.onnx_quant import (
    CalibrationData,
    ReferenceSet,
    calibration_images,
    check_views,
    int8_rank,
    quantize_verified,
    warn_mostly_float,
)
from prediction.predictors import onnx_probs
from runs.checkpoint import load_run_model
from runs.export_dir import ExportDir
from runs.run_folder import RunDir
from runs.run_info import write_run_info
from segmentation.skin_region import image_decoder_for_run
from utils.atomic import atomic_path
from utils.errors import UserError
from utils.onnx_runtime import check_onnx_model, create_session, write_onnx_metadata
from utils.paths import check_output_folder

logger = logging.getLogger(__name__)


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


FP32_PROB_TOLERANCE = 1e-4
INT8_ACCURACY_DROP_WARNING = 0.01
# An INT8 file above half the FP32 size means most weights stayed float: the name promises more than the file gives.
INT8_SIZE_RATIO_WARNING = 0.5
SEG_LOGIT_TOLERANCE = 1e-3  # relative to the largest logit
SEG_LABEL_AGREEMENT = 0.999


def export_run(run_dir: Path, export: ExportDir, settings: ExportOptions) -> dict[str, Any]:
    """Export a run's delivered classifier to a verified FP32 ONNX file and (unless ``quantize`` is "none") a
    verified INT8 one, each with the run's contract as metadata, plus a class_info.json copy. A model that fails its
    check is an error and nothing is left under its final name. Returns the export report."""
    check_output_folder(export.root, "--output_dir", {"--model_path": run_dir})
    model, info = load_run_model(run_dir, settings.weights)
    levels = getattr(model, "feature_info", None) or []
    stages = settings.quant.keep_float_stages
    if stages != "auto" and int(stages) > len(levels):
        raise UserError(f"--keep_float_stages {stages}: {info.timm_model_name} has {len(levels)} stages "
                        f"({', '.join(level['module'] for level in levels) or 'none known'})")
    transform = build_eval_transform(info.preprocessing)
    run = RunDir(run_dir)
    decoder = image_decoder_for_run(info, run.dataset_root(settings.data_dir),
                                  decode_min_side(info.preprocessing))
    test_samples = run.split("test", settings.data_dir)
    if settings.verify_images:
        test_samples = test_samples[: settings.verify_images]
    images = load_preprocessed([s.path for s in test_samples], transform, decoder)
    with torch.inference_mode():
        torch_probs = _softmax_in_batches(model, images)
    test = ReferenceSet(images, np.array([s.label for s in test_samples]), torch_probs)
    export.root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"source_run": str(run_dir), "verify_images": len(test_samples),
                              "torch_accuracy": float((torch_probs.argmax(1) == test.labels).mean())}
    metadata = info.onnx_metadata(run_dir, "fp32")
    with atomic_path(export.fp32) as fp32_tmp:
        report["export_rewrites"] = export_fp32(model, list(info.preprocessing.input_size), fp32_tmp, settings.opset)
        write_onnx_metadata(fp32_tmp, metadata)
        check_onnx_model(fp32_tmp)
        report.update(_verify_fp32(fp32_tmp, test))
        data = None
        if settings.quantize == "int8":
            has_val = run.split_csv("val").is_file()
            val = run.split("val", settings.data_dir) if has_val else []
            train = run.split("train", settings.data_dir)
            val_images = (check_views(load_preprocessed([s.path for s in val], transform, decoder),
                                      settings.quant.check_views) if val else torch.empty(0))
            data = CalibrationData([s.path for s in train], val_images,
                                   lambda paths: load_preprocessed(paths, transform, decoder), [s.label for s in train],
                                   (info.preprocessing.mean, info.preprocessing.std))
            held_out = _held_out_checkpoint(run, info.weights, settings.weights) if len(data.val_images) else None
            chosen_on = None
            if held_out is not None and settings.quant.min_agreement > 0:
                chosen_on = _choice_on_held_out_checkpoint(run_dir, list(info.preprocessing.input_size), levels,
                                                           settings, test, data, export.root)
            report.update(quantize_verified(fp32_tmp, export.int8, levels, metadata, settings.quant, test, data,
                                            chosen_on=chosen_on))
            if chosen_on is not None:
                report["int8_chosen_on"] = held_out.name
            quant = settings.quant
            # --max_float_share 0 tunes in every case, also when all nodes are INT8 already (better agreement).
            if quant.qat_epochs and (report["int8_float_share"] > quant.max_float_share or not quant.max_float_share):
                report.update(_quantize_after_tuning(model, info.preprocessing.input_size, fp32_tmp, export,
                                                     levels, metadata, settings, test, data, report))
    if settings.quantize == "none":
        # An INT8 file from an earlier export would otherwise be benchmarked and deployed beside the new FP32 one.
        for older in (export.int8, export.root / export.INT8_ORT_NAME, export.int8_pte):
            if older.exists():
                older.unlink()
                logger.info("removed the older %s from %s", older.name, export.root)
    if "executorch" in settings.target_list:
        report.update(export_executorch(model, info.preprocessing.input_size, export, test, data, settings.quant,
                                        [level["module"] for level in levels], report.get("int8_float_node_names", ())))
    if "ort" in settings.target_list or "executorch" in settings.target_list:
        report.update(export_mobile(export, info, test.images, test.torch_probs.shape[1], run_dir,
                                    settings.quant.min_agreement, ort="ort" in settings.target_list))
    write_run_info(export.root, info)
    _log_export(report, len(levels), settings.quant.max_float_share)
    return report


def _held_out_checkpoint(run: RunDir, delivered: str, weights: str) -> Optional[Path]:
    """model_best.pth when the exported weights were refit on every labelled image (validation included): the
    checkpoint whose validation answers are honest about new photos."""
    if run.checkpoint(weights, delivered).name != RunDir.REFIT_CKPT:
        return None
    best = run.checkpoint("best", delivered)
    return best if best.is_file() else None


def _choice_on_held_out_checkpoint(run_dir: Path, input_size: list[int], levels: list[dict[str, Any]],
                                   settings: ExportOptions, test: ReferenceSet, data: CalibrationData,
                                   scratch_parent: Path) -> dict[str, Any]:
    """The FP32 nodes and calibration method that meet --min_agreement for the run's checkpoint selected before
    the refit, on validation images it never trained on (``quantize_verified``'s ``chosen_on``)."""
    model, _ = load_run_model(run_dir, "best")
    with torch.inference_mode():
        probs = _softmax_in_batches(model, test.images)
    logger.info("INT8: the refit model trained on the validation images, so the FP32 nodes are chosen on %s (the "
                "checkpoint selected before the refit) and used as they are for the delivered model",
                RunDir.BEST_CKPT)
    with tempfile.TemporaryDirectory(dir=scratch_parent, prefix=".held-out-") as work:
        fp32 = Path(work) / "held_out_fp32.onnx"
        export_fp32(model, input_size, fp32, settings.opset)
        return quantize_verified(fp32, Path(work) / "held_out_int8.onnx", levels, {}, settings.quant,
                                 ReferenceSet(test.images, test.labels, probs), data, timed=False)


def _softmax_in_batches(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([model(images[i:i + batch_size]).softmax(1).numpy()
                           for i in range(0, len(images), batch_size)])


def _quantize_after_tuning(model: torch.nn.Module, input_size: Sequence[int], fp32_path: Path, export: ExportDir,
                           levels: list[dict[str, Any]], metadata: dict[str, str], settings: ExportOptions,
                           test: ReferenceSet, data: CalibrationData, ptq: dict[str, Any]) -> dict[str, Any]:
    """Post-training INT8 kept more than --max_float_share in FP32 (or that share is 0): fine-tune a copy for
    quantization, quantize it the same way, and keep it in place of the post-training file when it ranks better
    (``int8_rank``)."""
    from deploy.qat import finetune_for_int8, ort_activation_grids

    quant = settings.quant
    logger.info("INT8 keeps %.0f%% of the nodes in FP32 (--max_float_share %.0f%%): quantization-aware tuning "
                "for %d passes over %d training images", 100 * ptq["int8_float_share"], 100 * quant.max_float_share,
                quant.qat_epochs, len(data.train_paths))
    with tempfile.TemporaryDirectory(dir=export.root, prefix=".qat-") as work:
        # The tuning rounds what an all-INT8 file of this model rounds, on the grids the post-training choice's
        # calibration method gives it.
        calibration = calibration_images(data.train_paths, data.train_labels, quant.calib_images,
                                         quant.calib_sampling)
        grids = ort_activation_grids(model, fp32_path, calibration, data.load_batch, ptq["calibrate_method"],
                                     Path(work))
        tuned = finetune_for_int8(model, data.train_paths, data.load_batch, quant.qat_epochs, grids,
                                  check_images=data.val_images, target_cpu=quant.int8_target_cpu)
        summary = {"epochs": quant.qat_epochs, "seconds": round(tuned.seconds, 1), "steps": tuned.steps,
                   "train_kl": tuned.final_kl, "simulated_activations": tuned.simulated_activations,
                   "best_pass": tuned.best_pass, "passes": tuned.passes,
                   "post_training": {k: ptq[k] for k in ("int8_float_nodes", "int8_float_share",
                                                         "val_top1_agreement", "int8_top1_agreement",
                                                         "int8_accuracy")}}
        if not tuned.best_pass:
            logger.info("quantization-aware tuning took %.0f s and never raised the simulated INT8 agreement on the "
                        "%d check images: keeping the post-training file", tuned.seconds, len(data.val_images))
            return {"qat": {**summary, "kept": "post_training"}}
        tuned_fp32 = Path(work) / "tuned_fp32.onnx"
        export_fp32(tuned.model, list(input_size), tuned_fp32, settings.opset)
        candidate = Path(work) / "int8.onnx"
        qat = quantize_verified(tuned_fp32, candidate, levels, {**metadata, "qat_epochs": str(tuned.best_pass)},
                                quant, test, data, delivered_fp32=fp32_path)
        summary["tuned"] = {k: qat[k] for k in summary["post_training"]}
        tuned_rank = int8_rank(qat["int8_float_nodes"], qat["val_top1_agreement"], quant.min_agreement)
        post_rank = int8_rank(ptq["int8_float_nodes"], ptq["val_top1_agreement"], quant.min_agreement)
        # With the guard off (--min_agreement 0) neither file is scored on the validation images, so equal ranks
        # say nothing; the tuning's own simulated check, which found a pass better than the delivered weights, does.
        unchecked = qat["val_top1_agreement"] is None and ptq["val_top1_agreement"] is None
        keep = tuned_rank < post_rank or (tuned_rank == post_rank and unchecked)
        summary["kept"] = "tuned" if keep else "post_training"
        logger.info("quantization-aware tuning took %.0f s: %d FP32 nodes, validation agreement %.4f (post-training: "
                    "%d, %.4f); keeping the %s file", tuned.seconds, qat["int8_float_nodes"],
                    qat["val_top1_agreement"] or 1.0, ptq["int8_float_nodes"], ptq["val_top1_agreement"] or 1.0,
                    "tuned" if keep else "post-training")
        if keep:
            os.replace(candidate, export.int8)
            return {**qat, "qat": summary}
    return {"qat": summary}


def _verify_fp32(path: Path, test: ReferenceSet) -> dict[str, Any]:
    fp32_probs = onnx_probs(path, test.images, test.torch_probs.shape[1])
    max_diff = float(np.abs(fp32_probs - test.torch_probs).max())
    same_top1 = bool((fp32_probs.argmax(1) == test.torch_probs.argmax(1)).all())
    if max_diff > FP32_PROB_TOLERANCE or not same_top1:
        raise UserError(f"FP32 ONNX disagrees with PyTorch on the test images (max |prob diff| {max_diff:.2e}, "
                        f"same top-1: {same_top1}); nothing was written")
    logger.info("FP32 ONNX matches PyTorch on %d test images (max |prob diff| %.2e)", len(test.images), max_diff)
    return {"fp32_max_prob_diff": max_diff, "fp32_accuracy": float((fp32_probs.argmax(1) == test.labels).mean())}


def _log_export(report: dict[str, Any], n_stages: int, max_float_share: float) -> None:
    logger.info("test accuracy: PyTorch %.4f | ONNX FP32 %.4f%s", report["torch_accuracy"], report["fp32_accuracy"],
                f" | ONNX INT8 {report['int8_accuracy']:.4f} (top-1 agreement with PyTorch "
                f"{report['int8_top1_agreement']:.4f}, size {100 * report['int8_size_ratio']:.0f}% of FP32)"
                if "int8_accuracy" in report else "")
    if "int8_accuracy" not in report:
        return
    if report["fp32_accuracy"] - report["int8_accuracy"] > INT8_ACCURACY_DROP_WARNING:
        logger.warning("!!! INT8 test accuracy is %.1f points below FP32; try --calibrate_method auto, "
                       "--qat_epochs 2, a higher --min_agreement, or deploy the FP32 model",
                       100 * (report["fp32_accuracy"] - report["int8_accuracy"]))
    if report["int8_size_ratio"] > INT8_SIZE_RATIO_WARNING or report["int8_float_share"] > max_float_share:
        warn_mostly_float(report, n_stages)
    logger.info("batch-1 latency on this machine: FP32 %.2f ms, INT8 %.2f ms (%d FP32 nodes; benchmark.py "
                "measures properly)", report["fp32_batch1_ms"], report["int8_batch1_ms"], report["int8_float_nodes"])
    if report["int8_batch1_ms"] >= report["fp32_batch1_ms"]:
        logger.warning("!!! the INT8 model is not faster than FP32 here (%.2f vs %.2f ms); deploy %s unless the "
                       "smaller file matters more", report["int8_batch1_ms"], report["fp32_batch1_ms"],
                       ExportDir.FP32_NAME)


class _LogitsOnly(torch.nn.Module):
    """SegFormer returns a ModelOutput; ONNX wants one plain tensor output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _verification_size(size: list[int]) -> tuple[int, int]:
    """An input size unlike the export example's, so a size frozen at export time shows up as a mismatch."""
    return max(32, (size[0] * 3 // 4) // 32 * 32), max(32, (size[1] * 5 // 8) // 32 * 32)


def export_segmentation(model_ref: str, revision: Optional[str], output_dir: Path, opset: int, parser=None
                        ) -> dict[str, Any]:
    """Export the SegFormer face parser to seg_model.onnx (dynamic batch, height and width), verified first."""
    from segmentation.face_parsing import SegformerParser, parser_preprocessing

    parser = parser or SegformerParser(model_ref, revision)
    pre = parser_preprocessing(parser.processor)
    wrapper = _LogitsOnly(parser.model).eval()  # eval(): the exporter keeps the wrapper's mode, and dropout with it
    example = torch.randn(2, 3, *pre["size"])
    check_h, check_w = _verification_size(pre["size"])
    check = torch.randn(3, 3, check_h, check_w)
    metadata = {"id2label": json.dumps({str(k): v for k, v in parser.id2label.items()}, ensure_ascii=False),
                "parser_preprocessing": json.dumps(pre), "seg_model": model_ref, "seg_revision": parser.revision or "",
                "output": "logits at 1/4 of the input size"}
    target = ExportDir(output_dir).seg
    with atomic_path(target) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, input_names=["pixel_values"],
                              output_names=["logits"], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "logits_height", 3: "logits_width"}})
        write_onnx_metadata(tmp, metadata)
        check_onnx_model(tmp)
        onnx_logits = create_session(tmp).run(None, {"pixel_values": check.numpy()})[0]
        with torch.inference_mode():
            torch_logits = wrapper(check).numpy()
        if onnx_logits.shape != torch_logits.shape:
            raise UserError(f"exported face parser gives shape {onnx_logits.shape} at batch 3, {check_h}x{check_w} "
                            f"but PyTorch gives {torch_logits.shape}; nothing was written")
        max_diff = float(np.abs(onnx_logits - torch_logits).max())
        agreement = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean())
        tolerance = SEG_LOGIT_TOLERANCE * max(1.0, float(np.abs(torch_logits).max()))
        if max_diff > tolerance or agreement < SEG_LABEL_AGREEMENT:
            raise UserError(f"exported face parser disagrees with PyTorch at batch 3, {check_h}x{check_w} (max |logit "
                            f"diff| {max_diff:.2e}, label agreement {agreement:.4f}); nothing was written")
    logger.info("face parser %s -> %s (%d labels; matches PyTorch at batch 3, %dx%d: max |logit diff| %.1e)",
                model_ref, target, len(parser.id2label), check_h, check_w, max_diff)
    return {"seg_model": model_ref, "seg_max_logit_diff": max_diff, "seg_label_agreement": agreement,
            "seg_verified_shape": [3, 3, check_h, check_w]}
