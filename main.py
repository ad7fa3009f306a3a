"""Train a timm CNN on a folder of images and write a run folder that inference, export and benchmark read back.

Example:
    python main.py --data_name skin --model_name efficientnet_b0 --epochs 50 --pre_trained True

The run itself (data, phases, calibration, test report) is torch_trainer/training.py; this script parses flags.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

from configs import add_dataclass_arguments, parse_with_config_file
from torch_trainer.training import resolve_config, run_training
from utils.cli import run_cli
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf training", add_help=add_help,
                                     description="Train an image classifier on ROOT/trainset/<class>/ folders.")
    add_dataclass_arguments(parser)
    return parser


def main(args: argparse.Namespace, on_run_dir: Optional[Callable[[Path], None]] = None) -> dict[str, Any]:
    """Train one run; ``on_run_dir`` hears the run folder as soon as it exists (run_experiments.py records it)."""
    setup_logging()
    result = run_training(resolve_config(args), on_run_dir)
    # The last lines a user sees name the run folder: every later command takes it (or "latest") as --model_path.
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone speaks
        print(f"run folder: {result['run_dir']}\n"
              f"next: python inference.py --model_path {shlex.quote(result['run_dir'])} --inference_folder <photos> "
              f"--inference_output <folder>")
    return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
