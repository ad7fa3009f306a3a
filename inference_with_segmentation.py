"""Classify only the face's skin: segment each photo, crop to the skin, fill the rest as training did, classify.

Example:
    python inference_with_segmentation.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --inference_folder inference_set --inference_output inference_results_segmented --seg_backend segformer

Writes inference.py's predictions.csv / predictions.json / skipped.csv (plus the columns face_found and skin_ratio),
segmented/<relative path>.skin.png (what the classifier saw) and, with --generate_gradcam, Grad-CAM overlays on those
inputs. Train the model with ``main.py --input_kind skin_region`` so it sees the same kind of input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from prediction.engine import PredictionOptions, prediction_flags
from prediction.labelled_scoring import ReferenceLabels
from prediction.segmented import SegmentationOptions, infer_folder_segmented
from segmentation.face_parsing import segmentation_flags
from segmentation.skin_region import NO_FACE_POLICIES
from utils.cli import add_bool_flag, run_cli
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "skinclf inference on the skin region", add_help=add_help,
        parents=[prediction_flags(), segmentation_flags()],
        description="Segment the facial skin, then classify it with a run folder written by main.py.")
    parser.set_defaults(inference_output="inference_results_segmented")
    parser.add_argument("--no_face_policy", choices=list(NO_FACE_POLICIES), default="full_image",
                        help="when no face is found: classify the whole photo (as training does) or skip it and "
                             "list it in skipped.csv (default: %(default)s)")
    add_bool_flag(parser, "--save_segmented", True, "save each classifier input under segmented/ (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    return infer_folder_segmented(args.model_path, args.inference_folder, Path(args.inference_output),
                                  PredictionOptions.from_args(args), SegmentationOptions.from_args(args),
                                  batch_size=args.batch_size, num_workers=args.num_workers,
                                  reference=ReferenceLabels.from_args(args))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
