"""Test accuracy of a run's INT8 model under several ONNX Runtime calibration settings, against FP32.

Exports the run's best weights (the same way quantize_onnx_models.py does), then quantizes with QDQ, per-channel int8
weights and 200 training images per variant, and scores every model on the run's test split.

Example (the README's INT8 calibration comparison):
    python benchmarks/int8_calibration_variants.py --model_path <ISIC binary run folder>
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quantize_onnx_models as qom  # noqa: E402
from dataloaders.image_io import load_rgb  # noqa: E402
from dataloaders.transforms import build_eval_transform  # noqa: E402
from torch_trainer import run_folder as rf  # noqa: E402
from torch_trainer.checkpoint import load_run_model  # noqa: E402


def main() -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    parser = argparse.ArgumentParser("INT8 calibration variants")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--calib_images", type=int, default=200)
    args = parser.parse_args()
    run = Path(args.model_path)
    model, info = load_run_model(run)
    transform = build_eval_transform(info["preprocessing"])
    test = rf.run_split(run, "test")
    labels = np.array([s.label for s in test])
    images = qom._load_images([s.path for s in test], transform)
    train = rf.run_split(run, "train")
    calib = [s.path for s in random.Random(0).sample(train, min(args.calib_images, len(train)))]
    variants = {
        "minmax": dict(calibrate_method=CalibrationMethod.MinMax),
        "minmax + CalibMovingAverage": dict(calibrate_method=CalibrationMethod.MinMax,
                                            extra_options={"CalibMovingAverage": True}),
        "percentile 99.99": dict(calibrate_method=CalibrationMethod.Percentile,
                                 extra_options={"CalibPercentile": 99.99}),
        "entropy": dict(calibrate_method=CalibrationMethod.Entropy),
        "minmax, int8 activations": dict(calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QInt8),
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        fp32 = work / "fp32.onnx"
        qom.export_fp32(model, info["preprocessing"]["input_size"], fp32, 17)
        quant_pre_process(str(fp32), str(work / "pre.onnx"))

        def accuracy(path: Path) -> float:
            return float((qom._onnx_probs(path, images, info["n_class"]).argmax(1) == labels).mean())

        print(f"FP32: test accuracy {accuracy(fp32):.4f} on {len(labels)} images", flush=True)
        logging.disable(logging.INFO)
        for i, (name, options) in enumerate(variants.items()):
            options = dict(options)
            activation = options.pop("activation_type", QuantType.QUInt8)
            target = work / f"int8_{i}.onnx"
            quantize_static(str(work / "pre.onnx"), str(target), qom._CalibrationReader(calib, transform, load_rgb),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=activation,
                            weight_type=QuantType.QInt8, **options)
            print(f"INT8 {name}: test accuracy {accuracy(target):.4f}", flush=True)


if __name__ == "__main__":
    main()
