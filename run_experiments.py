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
from experiments.sweep import build_configs, load_template, read_state, run_sweep, summarise_sweep, to_argv
from utils.cli import run_cli
from utils.logging_setup import setup_logging

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf experiment sweep", add_help=add_help,
                                     parents=[train_main.get_args_parser(add_help=False)],
                                     description="Run a grid of main.py trainings and rank them.")
    parser.add_argument("--template", default="run_experiments_template.py",
                        help="Python file with BASE/GRID/RUNS, or YAML with base:/grid:/runs: (default: %(default)s)")
    parser.add_argument("--sweep_dir", default="experiments", help="state and summary files (default: %(default)s)")
    parser.add_argument("--dry_run", action="store_true", help="validate and list the runs, train nothing")
    parser.add_argument("--latency_iterations", type=int, default=20,
                        help="batch-1 CPU forward passes per model for the latency column (default: %(default)s)")
    return parser


def main(args: argparse.Namespace, argv: Optional[list[str]] = None) -> pd.DataFrame:
    setup_logging()
    template = load_template(args.template)
    runs = build_configs(args, list(argv or []), template)
    sweep_dir = Path(args.sweep_dir)
    state = read_state(sweep_dir)
    logger.info("%d run(s) in the sweep (%d already finished)", len(runs),
                sum(1 for key, _, _ in runs if state.get(key, {}).get("status") == "finished"))
    if args.dry_run:
        for key, _, cfg in runs:
            logger.info("%s %s: python main.py %s", state.get(key, {}).get("status", "todo"), key,
                        " ".join(to_argv(cfg)))
        return pd.DataFrame()
    run_sweep(runs, sweep_dir, state,
              lambda run_argv, on_run_dir: train_main.main(train_main.parse_args(run_argv), on_run_dir=on_run_dir))
    return summarise_sweep(runs, sweep_dir, state, args.latency_iterations)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    import sys

    run_cli(lambda args: main(args, sys.argv[1:]), parse_args)
