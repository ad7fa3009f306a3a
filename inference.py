"""Classify a folder of photos with a trained run folder; optionally save Grad-CAM overlays.

Example:
    python inference.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --inference_folder inference_set --inference_output inference_results --generate_gradcam

Writes into --inference_output: predictions.csv, predictions.json, skipped.csv and (with --generate_gradcam)
gradcam/<same relative path as the input>.gradcam.jpg.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from configs import InferenceConfig, add_dataclass_arguments, from_namespace, parse_with_config_file
from prediction.engine import infer_folder
from prediction.labelled_scoring import ReferenceLabels
from runs.run_folder import resolve_model_path
from utils.cli import run_cli
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf inference", add_help=add_help,
                                     description="Classify images with a run folder written by main.py.")
    add_dataclass_arguments(parser, InferenceConfig)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    cfg = from_namespace(InferenceConfig, args)
    return infer_folder(resolve_model_path(cfg.model_path), cfg.inference_folder, cfg.output_folder, cfg.prediction,
                        batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        reference=ReferenceLabels.from_options(cfg.reference))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
