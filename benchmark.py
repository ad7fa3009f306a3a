"""PyTorch eager vs ONNX FP32 vs ONNX INT8: latency, throughput, size and accuracy, measured fairly.

Example:
    python benchmark.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --onnx_model_dir onnx_models --batch_sizes 1,32 --iterations 100 --warmup 10

Fair means: every framework gets the same thread count, runs in its own fresh process (ONNX Runtime's spinning
worker threads slow PyTorch down when both live in one process), is warmed up first, and is fed the same real
preprocessed images from the run's test split. On a shared machine other tenants only ever add time, and they do
so in bursts that can land on one framework and not the next, so the frameworks are timed in ``--rounds``
alternating rounds and each keeps its fastest round (by median); every round's median is in the JSON.
Writes benchmark_results.csv/.json/.png into --output_dir; every row and the printed header name the machine (CPU
model, instruction sets, threads, library versions), since INT8 gains depend on them.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional

from configs import BenchmarkConfig, add_dataclass_arguments, from_namespace, parse_with_config_file
from deploy.benchmarking import benchmark_run, format_benchmark, write_benchmark
from runs.export_dir import ExportDir
from runs.run_folder import resolve_model_path
from utils.cli import run_cli
from utils.logging_setup import setup_logging
from utils.paths import check_output_folder

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf PyTorch vs ONNX benchmark", add_help=add_help,
                                     description="Time PyTorch eager, ONNX FP32 and ONNX INT8 fairly on the run's "
                                                 "test images: latency, throughput, size and accuracy.")
    add_dataclass_arguments(parser, BenchmarkConfig)
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging()
    cfg = from_namespace(BenchmarkConfig, args)
    model_path = resolve_model_path(cfg.model_path)
    check_output_folder(cfg.output_folder, "--output_dir", {"--model_path": model_path})
    result = benchmark_run(model_path, ExportDir(cfg.onnx_model_dir), cfg.benchmark)
    output = ExportDir(cfg.output_folder)
    write_benchmark(result, output)
    print("\n" + format_benchmark(result, cfg.benchmark))
    print(f"results: {output.benchmark_file('results.csv')}")
    return result.rows + result.segmentation_rows


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
