"""Batch-1 CPU latency of every README model: PyTorch eager vs ONNX FP32 vs ONNX INT8 (speed only).

For each model it builds a throwaway run folder with random weights over a dataset's splits (latency and file size
do not depend on the weight values; accuracy columns are meaningless here and are dropped), exports and quantizes it
with quantize_onnx_models.py's export_run, and times it with benchmark.py's benchmark_run (each framework in its
own process). Accuracy needs
trained run folders: use quantize_onnx_models.py and benchmark.py on those.

Example (the table in the README):
    python -m benchmarks.model_zoo_speed --data_dir data/demo_dataset --img_size 224 --iterations 30 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pandas as pd

from configs import BenchmarkOptions, ExportOptions, QuantOptions, TrainConfig
from dataloaders.discovery import discover_dataset
from dataloaders.splits import split_dataset
from dataloaders.transforms import resolve_preprocessing
from deploy.benchmarking import benchmark_run
from deploy.machine import describe_machine
from deploy.onnx_export import export_run
from runs.checkpoint import save_checkpoint
from runs.export_dir import ExportDir
from runs.run_folder import RunDir
from runs.run_info import RunInfo, write_run_info
from torch_trainer.models import SUPPORTED_MODELS, build_model
from utils.atomic import atomic_write_json


def make_run_folder(run_dir: Path, model_name: str, data_dir: Path, img_size: int) -> Path:
    splits = split_dataset(discover_dataset(data_dir, check_images=False), 0.2, 0)
    model, timm_name = build_model(model_name, len(splits.class_names), False)
    run_dir.mkdir(parents=True)
    RunDir(run_dir).write_splits(splits)
    atomic_write_json(run_dir / RunDir.CONFIGS, TrainConfig(model_name=model_name, data_dir=str(data_dir),
                                                        img_size=img_size).to_dict())
    write_run_info(run_dir, RunInfo(splits.class_names, model_name, timm_name, resolve_preprocessing(model, img_size),
                                    {"drop_rate": 0.0}))
    save_checkpoint(run_dir / RunDir.BEST_CKPT, {"model": model.state_dict()})
    return run_dir


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("batch-1 latency of every README model", add_help=add_help)
    parser.add_argument("--data_dir", default="data/demo_dataset", help="dataset for splits/calibration images")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="benchmark.py --rounds: each framework keeps its "
                                                               "fastest of this many alternating rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=list(SUPPORTED_MODELS))
    parser.add_argument("--output", default=None, help="optional CSV for the table")
    return parser


def main(args: argparse.Namespace) -> pd.DataFrame:
    rows, machine = [], ""
    with tempfile.TemporaryDirectory(prefix="skinclf-zoo-") as tmp:
        for name in args.models:
            run_dir = make_run_folder(Path(tmp) / name, name, Path(args.data_dir), args.img_size)
            onnx_dir = ExportDir(Path(tmp) / f"{name}_onnx")
            # Random weights agree with nothing, so the validation-agreement guard is off: the INT8 model keeps the
            # default float stages (auto), the configuration a trained model starts from.
            report = export_run(run_dir, onnx_dir, ExportOptions(
                verify_images=32, quant=QuantOptions(calib_images=64, min_agreement=0.0)))
            settings = BenchmarkOptions(batch_sizes="1", device="cpu", iterations=args.iterations, warmup=args.warmup,
                                         rounds=args.rounds, threads=args.threads or os.cpu_count() or 1,
                                         eval_images=16)
            result = benchmark_run(run_dir, onnx_dir, settings)
            if not machine:
                machine = describe_machine(result.machine)
            for row in result.rows:
                rows.append({key: row[key] for key in ("model", "framework", "size_mb", "mean_ms", "p50_ms",
                                                       "p95_ms", "speedup_vs_pytorch")}
                            | {"int8_float_stages": report["int8_float_stages"]})
    table = pd.DataFrame(rows).pivot_table(index=["model", "int8_float_stages"], columns="framework",
                                           values=["size_mb", "p50_ms", "speedup_vs_pytorch"], sort=False)
    print(f"machine: {machine}")
    print(table.to_string())
    if args.output:
        table.to_csv(args.output)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
