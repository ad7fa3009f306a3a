"""Phones, PyTorch-native: ExecuTorch programs (``.pte``) lowered to the XNNPACK delegate, FP32 and INT8, each run by
ExecuTorch's own runtime on the run's test photos before it is kept.

INT8 uses PT2E with XNNPACK's quantizer (symmetric, per-channel weights), calibrated on the same training photos as the
ONNX INT8 model (``onnx_quant.calibration_images``), and must give the FP32 model's top-1 on ``--min_agreement`` of the
validation photos, as the ONNX INT8 file must. It first keeps in FP32 the blocks the ONNX INT8 file keeps in FP32
(``onnx_float_modules``: the same choice, at the block level XNNPACK's quantizer filters by); where that misses the
agreement, the leading stages stay FP32 as well, one more at a time, as the ONNX INT8 export's prefix rule does (on
DermNet photos all-INT8 Lite0 kept 83% of the validation answers, with its first two stages in FP32 all of them). The
programs take one image (batch 1), as an app classifies one photo.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from configs import QuantOptions
from deploy.onnx_quant import CalibrationData, ReferenceSet, calibration_images, unit_of
from prediction.predictors import ExecuTorchPredictor, predict_proba
from runs.export_dir import ExportDir
from utils.errors import UserError

logger = logging.getLogger(__name__)

PTE_PROB_TOLERANCE = 1e-4  # FP32: the same bound as the FP32 ONNX export's check against PyTorch


def executorch_missing() -> Optional[str]:
    """Why ExecuTorch cannot export here, or None."""
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except Exception as err:  # noqa: BLE001 - an ImportError or a broken native extension both mean "not usable"
        return f"{type(err).__name__}: {err}"
    return None


def _lower(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, (example,))
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def leading_modules(model: torch.nn.Module, stage_module: str) -> list[str]:
    """The modules that run up to and through ``stage_module`` (a timm feature level such as ``blocks.1``), less the
    containers that hold it: what stays FP32 when the first stages do."""
    names = [name for name, _ in model.named_modules() if name]
    if stage_module not in names:
        raise ValueError(f"{stage_module} is not a module of {type(model).__name__}")
    return [name for name in names[: names.index(stage_module) + 1] if not stage_module.startswith(name + ".")]


def onnx_float_modules(model: torch.nn.Module, float_node_names: Sequence[str]) -> list[str]:
    """The model's modules (blocks, or top-level modules such as conv_stem) that hold the ONNX INT8 file's FP32 nodes,
    in the model's order: torch.onnx writes each node's module path into its name (``onnx_quant.unit_of``). Nodes
    outside any module (a graph-level Flatten) hold no weights and are left out."""
    units = {unit_of(name) for name in float_node_names}
    return [name for name, _ in model.named_modules() if name in units]


def _merged(*module_lists: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(name for names in module_lists for name in names))


def _innermost_module(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _quantized(model: torch.nn.Module, example: torch.Tensor, calibration: Sequence[torch.Tensor],
               float_modules: Sequence[str] = ()) -> torch.nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    def quantize_node(node) -> bool:
        path = _innermost_module(node)
        return not any(path == name or path.startswith(name + ".") for name in float_modules)

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantizer.set_filter_function(quantize_node)
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(image[None])
    return convert_pt2e(prepared)


def _probs(path: Path, images: torch.Tensor, n_class: int) -> np.ndarray:
    return predict_proba(ExecuTorchPredictor(path, n_class), images)


def export_executorch(model: torch.nn.Module, input_size: Sequence[int], export: ExportDir, test: ReferenceSet,
                      data: Optional[CalibrationData], quant: QuantOptions, stages: Sequence[str] = (),
                      onnx_float_nodes: Sequence[str] = ()) -> dict[str, Any]:
    """clf_model.pte (FP32) and, with ``data``, clf_model_int8.pte, each verified by ExecuTorch's runtime; a file
    that fails its check is not written (FP32: an error; INT8: a warning, the other files stay). ``stages``: the
    model's feature-level modules in order (timm's ``feature_info``), which INT8 may leave in FP32 from the front;
    ``onnx_float_nodes``: the nodes the ONNX INT8 file keeps in FP32, whose blocks INT8 keeps in FP32 first."""
    missing = executorch_missing()
    if missing:
        raise UserError(f"--targets executorch needs the executorch package ({missing}); install the project's "
                        f"requirements.txt or leave executorch out of --targets")
    model = model.eval()
    example = torch.zeros(1, *input_size)
    n_class = test.torch_probs.shape[1]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=export.root, prefix=".pte-") as work:
        fp32 = Path(work) / ExportDir.FP32_PTE_NAME
        fp32.write_bytes(_lower(model, example))
        probs = _probs(fp32, test.images, n_class)
        max_diff = float(np.abs(probs - test.torch_probs).max())
        same_top1 = bool((probs.argmax(1) == test.torch_probs.argmax(1)).all())
        if max_diff > PTE_PROB_TOLERANCE or not same_top1:
            raise UserError(f"{fp32.name} disagrees with PyTorch on the test images (max |prob diff| {max_diff:.2e}, "
                            f"same top-1: {same_top1}); no .pte file was written")
        report.update(pte_fp32_max_prob_diff=max_diff, pte_fp32_accuracy=float((probs.argmax(1) == test.labels).mean()),
                      pte_fp32_size_mb=round(fp32.stat().st_size / 2**20, 2))
        logger.info("%s: PyTorch's answers on %d test images (max |prob diff| %.1e), %.1f MB", fp32.name,
                    len(test.images), max_diff, fp32.stat().st_size / 2**20)
        os.replace(fp32, export.fp32_pte)
        if data is not None:
            report.update(_export_int8(model, example, export, test, data, quant, Path(work), stages,
                                       onnx_float_modules(model, onnx_float_nodes)))
    return report


def _export_int8(model: torch.nn.Module, example: torch.Tensor, export: ExportDir, test: ReferenceSet,
                 data: CalibrationData, quant: QuantOptions, work: Path, stages: Sequence[str],
                 shared_float: Sequence[str]) -> dict[str, Any]:
    n_class = test.torch_probs.shape[1]
    chosen = calibration_images(data.train_paths, data.train_labels, quant.calib_images, quant.calib_sampling)
    calibration = data.load_batch(chosen)
    # With validation photos, the check is on them and more stages may stay FP32; without, on the test photos, once.
    check_images = data.val_images if len(data.val_images) else test.images
    with torch.inference_mode():
        reference = torch.cat([model(check_images[i:i + 32]) for i in range(0, len(check_images), 32)]).argmax(1)
    # The ONNX INT8 file's FP32 blocks first (none when it is all INT8), then also 1, 2, ... leading stages; a
    # choice that adds nothing new (the ONNX file kept those stages already) is not lowered again.
    attempts: dict[tuple[str, ...], int] = {}
    for stage_count in [0, *range(1, len(stages) + 1)] if len(data.val_images) else [0]:
        leading = leading_modules(model, stages[stage_count - 1]) if stage_count else []
        attempts.setdefault(tuple(_merged(shared_float, leading)), stage_count)
    int8 = work / ExportDir.INT8_PTE_NAME
    for modules, float_stages in attempts.items():
        float_modules = list(modules)
        int8.write_bytes(_lower(_quantized(model, example, calibration, float_modules), example))
        agreement = float((_probs(int8, check_images, n_class).argmax(1) == reference.numpy()).mean())
        logger.info("ExecuTorch INT8 with %d FP32 stages%s: FP32's top-1 on %.4f of %d %s images", float_stages,
                    f" and the ONNX INT8 file's FP32 blocks ({', '.join(shared_float)})" if shared_float else "",
                    agreement, len(check_images), "validation" if len(data.val_images) else "test")
        if agreement >= quant.min_agreement:
            break
    probs = _probs(int8, test.images, n_class)
    report: dict[str, Any] = {
        "pte_int8_size_mb": round(int8.stat().st_size / 2**20, 2), "pte_int8_float_stages": float_stages,
        "pte_int8_float_modules": float_modules, "pte_int8_onnx_float_modules": list(shared_float),
        "pte_int8_check_agreement": agreement,
        "pte_int8_top1_agreement": float((probs.argmax(1) == test.torch_probs.argmax(1)).mean()),
        "pte_int8_accuracy": float((probs.argmax(1) == test.labels).mean())}
    if agreement < quant.min_agreement:
        logger.warning("!!! %s not written: even with %d leading stages in FP32 it gives the FP32 model's top-1 on "
                       "%.4f of the check images, below --min_agreement %.2f; use %s on the phone", int8.name,
                       float_stages, agreement, quant.min_agreement, ExportDir.FP32_PTE_NAME)
        report["pte_int8_written"] = False
        return report
    os.replace(int8, export.int8_pte)
    report["pte_int8_written"] = True
    logger.info("%s: %d leading stages in FP32, FP32's top-1 on %.4f of the check images and %.4f of the test "
                "images (accuracy %.4f), %.1f MB", int8.name, float_stages, agreement,
                report["pte_int8_top1_agreement"], report["pte_int8_accuracy"], report["pte_int8_size_mb"])
    return report
