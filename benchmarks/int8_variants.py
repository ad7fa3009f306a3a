"""Test accuracy and FP32 agreement of a run's INT8 model for each calibration method and float-stage count.

Exports the run's best weights exactly as quantize_onnx_models.py does (constant TF-same padding, GlobalAveragePool
for squeeze-excitation means), then quantizes with ONNX Runtime (QDQ, per-channel int8 weights, uint8 activations,
the same training images for every variant) and scores every model on the run's test split. Latency is measured by
benchmark.py and benchmarks/model_zoo_speed.py, not here.

Example (the README's INT8 comparison):
    python -m benchmarks.int8_variants --model_path <ISIC binary run folder> --float_stages 0,1,2,3
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dataloaders.image_io import reduced_decoder
from dataloaders.inference_data import load_preprocessed
from dataloaders.transforms import build_eval_transform, decode_min_side
from deploy.machine import describe_machine, machine_info
from deploy.onnx_export import export_fp32
from deploy.onnx_quant import CalibrationReader, nodes_up_to, prepare_for_quantization, quantize_int8
from prediction.predictors import onnx_probs
from runs.checkpoint import load_run_model
from runs.run_folder import RunDir


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("INT8 accuracy per calibration method and float-stage count", add_help=add_help)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--calib_images", type=int, default=200)
    parser.add_argument("--methods", default="minmax,entropy,percentile")
    parser.add_argument("--float_stages", default="0,1,2,3", help="comma-separated stage counts kept in FP32")
    return parser


def main(args: argparse.Namespace) -> None:
    print(f"machine: {describe_machine(machine_info())}", flush=True)
    run = Path(args.model_path)
    model, info = load_run_model(run)
    transform = build_eval_transform(info.preprocessing)
    test = RunDir(run).split("test")
    labels = np.array([s.label for s in test])
    decoder = reduced_decoder(decode_min_side(info.preprocessing))
    images = load_preprocessed([s.path for s in test], transform, decoder)
    train = RunDir(run).split("train")
    calib = [s.path for s in random.Random(0).sample(train, min(args.calib_images, len(train)))]
    levels = [level["module"] for level in model.feature_info]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        fp32 = work / "fp32.onnx"
        export_fp32(model, list(info.preprocessing.input_size), fp32, 17)
        fp32_pred = onnx_probs(fp32, images, info.n_class).argmax(1)
        prepped = work / "preprocessed.onnx"
        prepare_for_quantization(fp32, prepped)
        print(f"FP32: test accuracy {(fp32_pred == labels).mean():.4f} on {len(labels)} images", flush=True)
        print("method,float_stages,float_until,test_accuracy,drop_points,top1_agreement_with_fp32", flush=True)
        for method in args.methods.split(","):
            for stages in (int(v) for v in args.float_stages.split(",")):
                target = work / f"int8_{method}_{stages}.onnx"
                reader = CalibrationReader(calib, lambda paths: load_preprocessed(paths, transform, decoder).numpy())
                until = levels[stages - 1] if stages else None
                quantize_int8(prepped, target, reader, method,
                              nodes_up_to(onnx.load(str(prepped)).graph, until) if until else [])
                pred = onnx_probs(target, images, info.n_class).argmax(1)
                accuracy = (pred == labels).mean()
                print(f"{method},{stages},{until or '-'},{accuracy:.4f},"
                      f"{100 * ((fp32_pred == labels).mean() - accuracy):.2f},{(pred == fp32_pred).mean():.4f}",
                      flush=True)
                target.unlink()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
