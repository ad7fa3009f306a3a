"""Export a run folder's classifier to ONNX (FP32) and quantize it to INT8, verifying both before keeping them.

Example:
    python quantize_onnx_models.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --output_dir onnx_models

Writes clf_model.onnx (FP32, dynamic batch) and clf_model_int8.onnx (static QDQ quantization with ONNX Runtime:
per-channel int8 weights, uint8 activations, calibrated on the run's own training images; the early stages of
SiLU/hard-swish models, and more stages while the INT8 model disagrees with FP32 on over 1 % of the validation images,
stay FP32), each carrying the class names and preprocessing as ONNX metadata, plus a class_info.json copy. Unless --skip_segmentation is given it also
exports the SegFormer face parser to seg_model.onnx (dynamic batch, height and width; label names and the image
processor's settings as metadata). A model that fails its check is an error and nothing is left under the final name.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from deploy.onnx_export import ExportSettings, export_run, export_segmentation
from deploy.onnx_quant import CALIBRATION_METHODS, QuantSettings
from runs.checkpoint import WEIGHT_CHOICES
from runs.export_dir import DEFAULT_EXPORT_DIR, ExportDir
from segmentation.face_parsing import DEFAULT_SEGFORMER, SegformerParser
from utils.atomic import atomic_write_json
from utils.cli import add_bool_flag, model_path_flags, run_cli
from utils.errors import UserError
from utils.logging_setup import setup_logging

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf ONNX export and INT8 quantization", add_help=add_help,
                                     parents=[model_path_flags()])
    parser.add_argument("--output_dir", default=str(DEFAULT_EXPORT_DIR),
                        help="where the ONNX files go (default: %(default)s)")
    add_bool_flag(parser, "--skip_segmentation", False,
                  "export the classifier only, not the SegFormer face parser (default: %(default)s)")
    parser.add_argument("--seg_model", default=DEFAULT_SEGFORMER,
                        help="SegFormer face parser to export: Hugging Face id or local folder (default: %(default)s)")
    parser.add_argument("--seg_revision", default=None, help="Hugging Face revision (commit) of --seg_model")
    parser.add_argument("--weights", choices=list(WEIGHT_CHOICES), default="final",
                        help="final = the run's delivered model, best = best validation epoch, last = last epoch "
                             "(default: %(default)s)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--quantize", choices=["int8", "none"], default="int8", help="(default: %(default)s)")
    parser.add_argument("--calib_images", type=int, default=200,
                        help="training images used to calibrate INT8 activations (default: %(default)s)")
    parser.add_argument("--calibrate_method", choices=CALIBRATION_METHODS, default="minmax",
                        help="(default: %(default)s)")
    parser.add_argument("--keep_float_stages", type=_stage_count, default="auto", metavar="auto|N",
                        help="leading stages (timm feature levels) left in FP32 in the INT8 model; auto: those up to "
                             "stride 8 for SiLU/hard-swish models, whose quantized activations cost more than the "
                             "INT8 convolutions save there, and 0 otherwise (default: %(default)s)")
    parser.add_argument("--min_agreement", type=_share, default=0.99, metavar="0..1",
                        help="share of the run's validation images on which the INT8 model must give the FP32 "
                             "model's top-1 class; below it one more stage is kept in FP32 and the model "
                             "re-quantized, until it does; 0 turns the check off (default: %(default)s)")
    parser.add_argument("--verify_images", type=int, default=0,
                        help="test images for the parity/accuracy checks; 0 = the whole test split (default)")
    parser.add_argument("--data_dir", default=None,
                        help="dataset root if it moved since training (default: the run's configs.json data_dir)")
    return parser


def _stage_count(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a stage count >= 0, got {value!r}")
    return count


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {value!r}")
    return share


def settings_from_args(args: argparse.Namespace) -> ExportSettings:
    return ExportSettings(weights=args.weights, opset=args.opset, quantize=args.quantize,
                          verify_images=args.verify_images, data_dir=args.data_dir,
                          quant=QuantSettings(calibrate_method=args.calibrate_method, calib_images=args.calib_images,
                                              keep_float_stages=args.keep_float_stages,
                                              min_agreement=args.min_agreement))


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    export = ExportDir(Path(args.output_dir))
    # Load the parser first: a parser that cannot be loaded must fail before any file is written.
    seg_parser = None
    if not args.skip_segmentation:
        try:
            seg_parser = SegformerParser(args.seg_model, args.seg_revision)
        except UserError as err:
            raise UserError(f"{err}. To export the classifier only, pass --skip_segmentation") from err
    report = export_run(Path(args.model_path), export, settings_from_args(args))
    if seg_parser is not None:
        report.update(export_segmentation(args.seg_model, args.seg_revision, export.root, args.opset, seg_parser))
    atomic_write_json(export.report, report)
    logger.info("wrote %s", ", ".join(str(p) for p in export.written()))
    return report


if __name__ == "__main__":
    run_cli(main, lambda: get_args_parser().parse_args())
