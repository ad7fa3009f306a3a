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
import os
from pathlib import Path

from deploy.benchmarking import BenchmarkSettings, benchmark_run, format_benchmark, write_benchmark
from runs.export_dir import DEFAULT_EXPORT_DIR, ExportDir
from utils.cli import device_flags, model_path_flags, run_cli
from utils.errors import UserError
from utils.logging_setup import setup_logging

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "skinclf PyTorch vs ONNX benchmark", add_help=add_help,
        parents=[model_path_flags("--pytorch_model_path"), device_flags("cpu", "where PyTorch and ONNX Runtime run")])
    parser.add_argument("--onnx_model_dir", default=str(DEFAULT_EXPORT_DIR),
                        help="folder written by quantize_onnx_models.py (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=100, help="timed runs per batch size (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of fresh processes; each framework keeps its fastest round, so a "
                             "burst of load from other programs does not decide the comparison (default: %(default)s)")
    parser.add_argument("--batch_sizes", default="1,32", help="comma-separated (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads for every framework (default: all cores, %(default)s)")
    parser.add_argument("--eval_images", type=int, default=0,
                        help="test images for the accuracy columns; 0 = the whole test split (default)")
    parser.add_argument("--data_dir", default=None, help="dataset root if it moved since training")
    parser.add_argument("--output_dir", default=None, help="where results go (default: --onnx_model_dir)")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError as err:
        raise UserError(f"--batch_sizes {args.batch_sizes!r}: expected comma-separated integers such as 1,32") from err
    return BenchmarkSettings(batch_sizes=batch_sizes, iterations=args.iterations, warmup=args.warmup,
                             rounds=args.rounds, threads=args.threads, device=args.device,
                             eval_images=args.eval_images, data_dir=args.data_dir)


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging()
    settings = settings_from_args(args)
    result = benchmark_run(Path(args.model_path), ExportDir(Path(args.onnx_model_dir)), settings)
    output = ExportDir(Path(args.output_dir or args.onnx_model_dir))
    write_benchmark(result, output)
    print("\n" + format_benchmark(result, settings))
    print(f"results: {output.benchmark_file('results.csv')}")
    return result.rows + result.segmentation_rows


if __name__ == "__main__":
    run_cli(main, lambda: get_args_parser().parse_args())
