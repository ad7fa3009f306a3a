"""Batch-1 CPU latency of every README model: PyTorch eager vs ONNX FP32 vs ONNX INT8 (speed only).

For each model it builds a throwaway run folder with random weights over a dataset's splits (latency and file size
do not depend on the weight values; accuracy columns are meaningless here and are dropped), exports and quantizes it
with quantize_onnx_models.py, and times it with benchmark.py (each framework in its own process). Accuracy needs
trained run folders: use quantize_onnx_models.py and benchmark.py on those.

Example (the table in the README):
    python benchmarks/model_zoo_speed.py --data_dir data/demo_dataset --img_size 224 --iterations 30 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402
import quantize_onnx_models as qom  # noqa: E402
from configs import TrainConfig  # noqa: E402
from dataloaders.discovery import discover_dataset  # noqa: E402
from dataloaders.splits import save_splits, split_dataset  # noqa: E402
from dataloaders.transforms import resolve_preprocessing  # noqa: E402
from torch_trainer import run_folder as rf  # noqa: E402
from torch_trainer.checkpoint import save_checkpoint  # noqa: E402
from torch_trainer.models import SUPPORTED_MODELS, build_model  # noqa: E402
from utils.atomic import atomic_write_json  # noqa: E402


def make_run_folder(run_dir: Path, model_name: str, data_dir: Path, img_size: int) -> Path:
    splits = split_dataset(discover_dataset(data_dir, check_images=False), 0.2, 0)
    model, timm_name = build_model(model_name, len(splits.class_names), False)
    run_dir.mkdir(parents=True)
    save_splits(run_dir, splits)
    atomic_write_json(run_dir / rf.CONFIGS, TrainConfig(model_name=model_name, data_dir=str(data_dir),
                                                        img_size=img_size).to_dict())
    atomic_write_json(run_dir / rf.CLASS_INFO, rf.build_class_info(
        splits.class_names, model_name, timm_name, resolve_preprocessing(model, img_size), 0.0))
    save_checkpoint(run_dir / rf.BEST_CKPT, {"model": model.state_dict()})
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
    rows = []
    with tempfile.TemporaryDirectory(prefix="skinclf-zoo-") as tmp:
        for name in args.models:
            run_dir = make_run_folder(Path(tmp) / name, name, Path(args.data_dir), args.img_size)
            onnx_dir = Path(tmp) / f"{name}_onnx"
            # Random weights agree with nothing, so the validation-agreement guard is off: the INT8 model keeps the
            # default float stages (auto), the configuration a trained model starts from.
            report = qom.main(qom.get_args_parser().parse_args([
                "--skip_segmentation", "--model_path", str(run_dir), "--output_dir", str(onnx_dir),
                "--calib_images", "64", "--verify_images", "32", "--min_agreement", "0"]))
            argv = ["--pytorch_model_path", str(run_dir), "--onnx_model_dir", str(onnx_dir), "--batch_sizes", "1",
                    "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--eval_images", "16",
                    "--rounds", str(args.rounds)]
            if args.threads:
                argv += ["--threads", str(args.threads)]
            for row in benchmark.main(benchmark.get_args_parser().parse_args(argv)):
                rows.append({key: row[key] for key in ("model", "framework", "size_mb", "mean_ms", "p50_ms",
                                                       "p95_ms", "speedup_vs_pytorch")}
                            | {"int8_float_stages": report["int8_float_stages"]})
    table = pd.DataFrame(rows).pivot_table(index=["model", "int8_float_stages"], columns="framework",
                                           values=["size_mb", "p50_ms", "speedup_vs_pytorch"], sort=False)
    print(table.to_string())
    if args.output:
        table.to_csv(args.output)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
