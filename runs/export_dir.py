"""The export folder written by quantize_onnx_models.py and read by inference.py, the face parser and benchmark.py:
every file name in it is known here and nowhere else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from configs import EXPORT_DIR
from runs.run_folder import RunDir
from utils.onnx_runtime import read_onnx_metadata

DEFAULT_EXPORT_DIR = Path(EXPORT_DIR)


@dataclass(frozen=True)
class ExportDir:
    root: Path = DEFAULT_EXPORT_DIR

    FP32_NAME = "clf_model.onnx"
    INT8_NAME = "clf_model_int8.onnx"
    SEG_NAME = "seg_model.onnx"
    CLASS_INFO_NAME = RunDir.CLASS_INFO  # a copy of the run's contract, as runs.run_info writes it
    REPORT_NAME = "export_report.json"
    # --targets ort: ONNX Runtime Mobile's format, the operators a reduced build needs, and what an app must know.
    FP32_ORT_NAME = "clf_model.ort"
    INT8_ORT_NAME = "clf_model_int8.ort"
    ORT_OPERATORS_NAME = "required_operators.config"
    MOBILE_MANIFEST_NAME = "mobile_manifest.json"
    # --targets executorch: ExecuTorch programs lowered to XNNPACK (batch 1).
    FP32_PTE_NAME = "clf_model.pte"
    INT8_PTE_NAME = "clf_model_int8.pte"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def fp32(self) -> Path:
        return self.root / self.FP32_NAME

    @property
    def int8(self) -> Path:
        return self.root / self.INT8_NAME

    @property
    def seg(self) -> Path:
        return self.root / self.SEG_NAME

    @property
    def report(self) -> Path:
        return self.root / self.REPORT_NAME

    @property
    def fp32_pte(self) -> Path:
        return self.root / self.FP32_PTE_NAME

    @property
    def int8_pte(self) -> Path:
        return self.root / self.INT8_PTE_NAME

    def classifiers(self) -> dict[str, Path]:
        """The exported classifiers present, by benchmark framework name."""
        found = (("onnx_fp32", self.fp32), ("onnx_int8", self.int8), ("ort_fp32", self.root / self.FP32_ORT_NAME),
                 ("ort_int8", self.root / self.INT8_ORT_NAME), ("executorch_fp32", self.fp32_pte),
                 ("executorch_int8", self.int8_pte))
        return {name: path for name, path in found if path.is_file()}

    def benchmark_file(self, suffix: str) -> Path:
        """benchmark_results.csv/.json/.png and benchmark_segmentation.csv."""
        return self.root / f"benchmark_{suffix}"

    def ort(self, onnx_path: Path) -> Path:
        """The ORT-format twin of an exported ONNX classifier."""
        return self.root / {self.FP32_NAME: self.FP32_ORT_NAME, self.INT8_NAME: self.INT8_ORT_NAME}[onnx_path.name]

    @property
    def ort_operators(self) -> Path:
        return self.root / self.ORT_OPERATORS_NAME

    @property
    def mobile_manifest(self) -> Path:
        return self.root / self.MOBILE_MANIFEST_NAME

    def written(self) -> list[Path]:
        names = (self.FP32_NAME, self.INT8_NAME, self.CLASS_INFO_NAME, self.SEG_NAME, self.FP32_ORT_NAME,
                 self.INT8_ORT_NAME, self.ORT_OPERATORS_NAME, self.MOBILE_MANIFEST_NAME, self.FP32_PTE_NAME,
                 self.INT8_PTE_NAME)
        return [self.root / name for name in names if (self.root / name).exists()]


DEFAULT_EXPORT = ExportDir()


def recorded_source_run(model_path: str | Path) -> Optional[str]:
    """The run folder an exported classifier names as its source: ONNX and ORT files in their metadata; an ExecuTorch
    program has none, so its export folder's mobile_manifest.json says it."""
    model_path = Path(model_path)
    if model_path.suffix.lower() != ".pte":
        return read_onnx_metadata(model_path).get("source_run")
    try:
        manifest = json.loads((model_path.parent / ExportDir.MOBILE_MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    source = manifest.get("source_run") if isinstance(manifest, dict) else None
    return source if isinstance(source, str) else None


def other_source_run(model_path: str | Path, run_dir: str | Path) -> Optional[str]:
    """The run folder an exported classifier came from, when that is not ``run_dir`` (None when it is, or unknown):
    such a file gives that run's answers under this run's class names."""
    source = recorded_source_run(model_path)
    return source if source and Path(source).resolve() != Path(run_dir).resolve() else None
