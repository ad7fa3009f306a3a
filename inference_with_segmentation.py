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
from typing import Any, Optional

from configs import SegmentedInferenceConfig, add_dataclass_arguments, from_namespace, parse_with_config_file
from prediction.labelled_scoring import ReferenceLabels
from prediction.segmented import infer_folder_segmented
from runs.run_folder import resolve_model_path
from utils.cli import run_cli
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf inference on the skin region", add_help=add_help,
                                     description="Segment the facial skin, then classify it with a run folder "
                                                 "written by main.py.")
    add_dataclass_arguments(parser, SegmentedInferenceConfig)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    cfg = from_namespace(SegmentedInferenceConfig, args)
    return infer_folder_segmented(resolve_model_path(cfg.model_path), cfg.inference_folder, cfg.output_folder, cfg.prediction,
                                  cfg.segmentation, no_face_policy=cfg.no_face_policy,
                                  save_segmented=cfg.save_segmented, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, reference=ReferenceLabels.from_options(cfg.reference))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
