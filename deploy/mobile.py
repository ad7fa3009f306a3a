"""Phones: ONNX Runtime Mobile's ORT format, verified like the ONNX export, and the manifest an app reads.

``.ort`` files come from onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``) with the
"Fixed" optimisation style for ARM: the graph is optimised once here, so the phone runs it as written; the converter
also lists the operators the models use (``required_operators.config``), which a reduced ONNX Runtime build for
Android or iOS compiles in and nothing else. Each ``.ort`` must give its ``.onnx``'s answers on the run's test images
before it is kept; ONNX metadata (classes, preprocessing, temperature, thresholds) survives the conversion.

``mobile_manifest.json`` says in plain fields what an app must do to a photo before the model and to the logits after
it: apps get preprocessing wrong (BGR, 0-255, resize then crop) more often than anything else.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from runs.export_dir import ExportDir
from runs.run_info import RunInfo
from utils.atomic import atomic_write_json
from utils.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
ORT_PROB_TOLERANCE = 1e-4  # FP32: the same bound as the FP32 export's check against PyTorch


def convert_to_ort(onnx_files: list[Path], export: ExportDir,
                   verify: Callable[[Path, Path], None]) -> list[Path]:
    """Convert ``onnx_files`` (in ``export.root``) to ORT format beside them, with required_operators.config.
    ``verify(onnx_path, converted)`` checks each converted file in the working folder; the files appear under their
    final names only once every one converted and passed."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(dir=export.root, prefix=".ort-") as work:
        source, target = Path(work) / "onnx", Path(work) / "ort"
        source.mkdir()
        for path in onnx_files:
            shutil.copy2(path, source / path.name)
        # The converter logs a line per model through the root logger at INFO and prints its own progress.
        convert_onnx_models_to_ort(source, output_dir=target, optimization_styles=[OptimizationStyle.Fixed],
                                   target_platform="arm")
        converted = [target / (path.stem + ".ort") for path in onnx_files]
        for path, ort_path in zip(onnx_files, converted):
            if not ort_path.is_file():
                raise UserError(f"onnxruntime could not convert {path} to ORT format; nothing was written")
            verify(path, ort_path)
        written = [export.ort(path) for path in onnx_files]
        for ort_path, final in zip(converted, written):
            ort_path.replace(final)
        (target / ExportDir.ORT_OPERATORS_NAME).replace(export.ort_operators)
    return written


def verify_ort(onnx_path: Path, ort_path: Path, images, n_class: int, tolerance: float = ORT_PROB_TOLERANCE,
               min_agreement: float = 1.0) -> dict[str, float]:
    """The ORT file must give the ONNX file's top-1 on ``min_agreement`` of ``images`` and, for FP32, its
    probabilities within ``tolerance``. INT8 kernels of the ARM-optimised graph may round differently from the
    desktop ones, so INT8 is held to top-1 agreement, as the INT8 export itself is."""
    from prediction.predictors import onnx_probs

    reference = onnx_probs(onnx_path, images, n_class)
    mobile = onnx_probs(ort_path, images, n_class)
    max_diff = float(np.abs(reference - mobile).max())
    agreement = float((reference.argmax(1) == mobile.argmax(1)).mean())
    if max_diff > tolerance or agreement < min_agreement:
        raise UserError(f"{ort_path.name} does not reproduce {onnx_path.name} (max |prob diff| {max_diff:.2e}, "
                        f"top-1 agreement {agreement:.4f}); no .ort file was written. Deploy the .onnx file with "
                        f"the full ONNX Runtime package instead")
    return {"max_prob_diff": max_diff, "top1_agreement": agreement}


def _file_entry(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def preprocessing_steps(info: RunInfo) -> dict[str, Any]:
    """The eval transform as fields an app can follow without timm or torchvision (timm's eval transform, as
    dataloaders.transforms.build_eval_transform builds it)."""
    pre = info.preprocessing
    _, height, width = pre.input_size
    scaled = math.floor(pre.image_size / pre.crop_pct)
    resize = {"center": {"mode": "shorter_side", "size": scaled,
                         "rule": "scale so the shorter side is `size`; the longer side becomes "
                                 "floor(size * longer / shorter)"},
              "squash": {"mode": "both_sides", "size": [scaled, scaled],
                         "rule": "scale both sides to `size`, ignoring the aspect ratio"},
              "border": {"mode": "longer_side", "size": scaled,
                         "rule": "scale so the longer side is `size`, keeping the aspect ratio"}}[pre.crop_mode]
    return {
        "color_order": "RGB", "orientation": "apply the EXIF orientation first",
        "resize": {**resize, "interpolation": pre.interpolation, "antialias": True},
        "crop": {"mode": "center" if pre.crop_mode != "border" else "center_or_pad", "height": height,
                 "width": width, "pad_value": 0,
                 "rule": "cut the centred height x width window (left = round((W - width) / 2), top likewise); "
                         "where the image is smaller, pad with pad_value"},
        "scale": "divide the 0-255 pixel values by 255",
        "normalize": {"mean": list(pre.mean), "std": list(pre.std), "rule": "(value - mean[c]) / std[c] per channel"},
        "layout": "NCHW float32: channels first, one image per batch row",
    }


def write_mobile_manifest(export: ExportDir, info: RunInfo, models: dict[str, Path], input_name: str,
                          output_name: str, source_run: Path, executorch_models: Optional[dict[str, Path]] = None
                          ) -> Path:
    """mobile_manifest.json: the files with their checksums, the input, the preprocessing and the decisions.
    ``models``: the ORT-format files by precision; ``executorch_models``: the .pte files (one input, batch 1)."""
    _, height, width = info.preprocessing.input_size
    runtimes = (["ONNX Runtime Mobile (ORT format)"] if models else []) + (
        ["ExecuTorch (XNNPACK delegate)"] if executorch_models else [])
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION, "runtime": " and ".join(runtimes),
        "models": {precision: _file_entry(path) for precision, path in models.items()},
        **({"required_operators": ExportDir.ORT_OPERATORS_NAME} if models else {}),
        **({"executorch_models": {precision: _file_entry(path) for precision, path in executorch_models.items()}}
           if executorch_models else {}),
        "input": {"name": input_name, "shape": [1, 3, height, width], "dtype": "float32"},
        "preprocessing": preprocessing_steps(info),
        "output": {"name": output_name, "kind": "logits", "classes": info.class_names},
        "postprocessing": {
            "tta": {"enabled": info.tta, "rule": "run the image and its left-right mirror, average the two logit "
                                                 "vectors (what the run was tested with)"},
            "temperature": info.temperature,
            "probabilities": "softmax(logits / temperature)",
            "operating_points": info.operating_points,
            "abstain": info.abstain,
            "decisions": "flag a class when its probability >= its operating point's threshold; answer "
                         "'uncertain' when the top probability < the abstain threshold",
        },
        "model": {"name": info.model_name, "timm_name": info.timm_model_name},
        "source_run": str(source_run), "class_info_schema_version": info.schema_version,
    }
    atomic_write_json(export.mobile_manifest, manifest)
    return export.mobile_manifest


def export_mobile(export: ExportDir, info: RunInfo, images, n_class: int, source_run: Path,
                  min_agreement: float, ort: bool = True) -> dict[str, Any]:
    """With ``ort``, ORT-format twins of every exported classifier, each verified on ``images`` (INT8: top-1
    agreement with the INT8 .onnx of at least ``min_agreement``); then the manifest, naming the ExecuTorch programs
    too when they were written."""
    from utils.onnx_runtime import create_session

    onnx_files = [path for path in (export.fp32, export.int8) if path.is_file()]
    report: dict[str, Any] = {}
    pte = {precision: path for precision, path in (("fp32", export.fp32_pte), ("int8", export.int8_pte))
           if path.is_file()}

    def verify(onnx_path: Path, ort_path: Path) -> None:
        precision = "int8" if onnx_path == export.int8 else "fp32"
        checked = (verify_ort(onnx_path, ort_path, images, n_class) if precision == "fp32" else
                   verify_ort(onnx_path, ort_path, images, n_class, tolerance=1.0, min_agreement=min_agreement))
        report[f"ort_{precision}_top1_agreement"] = checked["top1_agreement"]
        report[f"ort_{precision}_max_prob_diff"] = checked["max_prob_diff"]
        report[f"ort_{precision}_size_mb"] = round(ort_path.stat().st_size / 2**20, 2)
        logger.info("%s: %s's top-1 on %.4f of %d test images (max |prob diff| %.1e), %.1f MB", ort_path.name,
                    onnx_path.name, checked["top1_agreement"], len(images), checked["max_prob_diff"],
                    ort_path.stat().st_size / 2**20)

    written = convert_to_ort(onnx_files, export, verify) if ort else []
    session = create_session(written[0] if written else export.fp32)
    write_mobile_manifest(export, info, {("int8" if p == export.int8 else "fp32"): o
                                         for p, o in zip(onnx_files, written)},
                          session.get_inputs()[0].name, session.get_outputs()[0].name, source_run, pte)
    return report
