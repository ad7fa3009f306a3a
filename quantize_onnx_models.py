"""Export a run folder's classifier to ONNX (FP32) and quantize it to INT8, verifying both before keeping them.

Example:
    python quantize_onnx_models.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --output_dir onnx_models

Writes clf_model.onnx (FP32, dynamic batch) and clf_model_int8.onnx (static QDQ quantization with ONNX Runtime:
per-channel int8 weights, uint8 activations, calibrated on the run's own training images; the early stages of
SiLU/hard-swish models, and more stages while the INT8 model disagrees with FP32 on over 1 % of the validation images,
stay FP32), each carrying the class names and preprocessing as ONNX metadata, plus a class_info.json copy. For a
run trained on skin regions (or with --skip_segmentation False) it also exports the SegFormer face parser to
seg_model.onnx (dynamic batch, height and width; label names and the image processor's settings as metadata). A model
that fails its check is an error and nothing is left under the final name.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

from configs import ExportConfig, add_dataclass_arguments, from_namespace, parse_with_config_file
from deploy.onnx_export import export_run, export_segmentation
from runs.export_dir import ExportDir
from runs.run_folder import resolve_model_path
from runs.run_info import read_run_info
from segmentation.face_parsing import DEFAULT_SEGFORMER, SegformerParser
from utils.atomic import atomic_write_json
from utils.cli import run_cli
from utils.errors import UserError
from utils.logging_setup import setup_logging

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf ONNX export and INT8 quantization", add_help=add_help,
                                     description="Export a run folder's classifier to verified FP32 and INT8 ONNX "
                                                 "files (and, unless --skip_segmentation, the SegFormer face parser).")
    add_dataclass_arguments(parser, ExportConfig)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    cfg = from_namespace(ExportConfig, args)
    export = ExportDir(cfg.output_folder)
    model_path = resolve_model_path(cfg.model_path)
    run_parser = read_run_info(model_path).skin_region or {}  # the face parser a skin-region run was trained with
    seg_model = cfg.seg_model or (run_parser.get("seg_model") if run_parser.get("seg_backend") == "segformer"
                                  else None) or DEFAULT_SEGFORMER
    # Load the parser first: a parser that cannot be loaded must fail before any file is written.
    seg_parser = None
    skip = cfg.skip_segmentation
    if skip is None:  # a SegFormer parser is exported where the run was trained with one, or when one is named
        skip = not (cfg.seg_model or run_parser.get("seg_backend") == "segformer")
        if skip and run_parser:
            logger.info("the run's face parser is %s: no parser model to export", run_parser.get("seg_backend"))
    if not skip:
        try:
            seg_parser = SegformerParser(seg_model, cfg.seg_revision)
        except UserError as err:
            raise UserError(f"{err}. To export the classifier only, pass --skip_segmentation") from err
    report = export_run(model_path, export, cfg.export)
    if seg_parser is not None:
        report.update(export_segmentation(seg_model, cfg.seg_revision, export.root, cfg.export.opset, seg_parser))
    atomic_write_json(export.report, report)
    logger.info("wrote %s", ", ".join(str(p) for p in export.written()))
    return report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
