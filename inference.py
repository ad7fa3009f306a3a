"""Classify a folder of photos with a trained run folder; optionally save Grad-CAM overlays.

Example:
    python inference.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --inference_folder inference_set --inference_output inference_results --generate_gradcam

Writes into --inference_output: predictions.csv, predictions.json, skipped.csv and (with --generate_gradcam)
gradcam/<same relative path as the input>.gradcam.jpg.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from prediction.engine import PredictionOptions, infer_folder, prediction_flags
from prediction.labelled_scoring import ReferenceLabels
from utils.cli import run_cli
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return argparse.ArgumentParser("skinclf inference", add_help=add_help, parents=[prediction_flags()],
                                   description="Classify images with a run folder written by main.py.")


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    return infer_folder(args.model_path, args.inference_folder, Path(args.inference_output),
                        PredictionOptions.from_args(args), batch_size=args.batch_size, num_workers=args.num_workers,
                        reference=ReferenceLabels.from_args(args))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
