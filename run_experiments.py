"""Run a sweep of main.py trainings in-process and rank them.

Example:
    python run_experiments.py --template run_experiments_template.py --sweep_dir experiments/skin \
        --data_name skin --epochs 30

The template (Python or YAML, see run_experiments_template.py) declares BASE options, a GRID (every combination is
run) and/or RUNS (an explicit list). Options come, lowest first, from main.py's defaults, the template's BASE, flags on
this command line, and the run's own grid values. Every run is validated before the first one starts. A run that
already finished is skipped, so a sweep that was interrupted continues where it stopped (an unfinished run is resumed
from its model_last.pth). Writes into --sweep_dir: experiments_state.json, experiments_summary.csv, experiments_summary.md
(runs ranked by validation balanced accuracy) and experiments_comparison.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import pandas as pd

import main as train_main
from configs import SweepOptions, add_dataclass_arguments, from_namespace, parse_with_config_file
from experiments.sweep import build_configs, load_template, read_state, run_sweep, summarise_sweep, to_argv
from torch_trainer.training import run_training
from utils.cli import run_cli
from utils.logging_setup import setup_logging

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf experiment sweep", add_help=add_help,
                                     parents=[train_main.get_args_parser(add_help=False)],
                                     description="Run a grid of main.py trainings and rank them.")
    add_dataclass_arguments(parser, SweepOptions)
    return parser


def main(args: argparse.Namespace) -> pd.DataFrame:
    setup_logging()
    options = from_namespace(SweepOptions, args)
    template = load_template(options.template)
    runs = build_configs(args, template)
    sweep_dir = Path(options.sweep_dir)
    state = read_state(sweep_dir)
    logger.info("%d run(s) in the sweep (%d already finished)", len(runs),
                sum(1 for key, _, _ in runs if state.get(key, {}).get("status") == "finished"))
    if options.dry_run:
        for key, _, cfg in runs:
            logger.info("%s %s: python main.py %s", state.get(key, {}).get("status", "todo"), key,
                        " ".join(to_argv(cfg)))
        return pd.DataFrame()
    run_sweep(runs, sweep_dir, state, run_training)
    return summarise_sweep(runs, sweep_dir, state, options.latency_iterations)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
