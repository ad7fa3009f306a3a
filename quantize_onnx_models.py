"""Export a run folder's classifier to ONNX (FP32) and quantize it to INT8, verifying both before keeping them.

Example:
    python quantize_onnx_models.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --output_dir onnx_models

Writes clf_model.onnx (FP32, dynamic batch) and clf_model_int8.onnx (static QDQ quantization with ONNX Runtime:
per-channel int8 weights, uint8 activations, calibrated on the run's own training images; the early stages of
SiLU/hard-swish models, and more stages while the INT8 model disagrees with FP32 on over 1 % of the validation images,
stay FP32), each carrying the class names and preprocessing as ONNX metadata, plus a class_info.json copy. Unless --skip_segmentation is given it also
exports the SegFormer face parser to seg_model.onnx (dynamic batch, height and width; label names and the image
processor's settings as metadata). A model that fails its check is an error and nothing is left under the final name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from configs import str2bool
from dataloaders.image_io import load_rgb
from dataloaders.skin_region import image_loader_for_run
from dataloaders.transforms import build_eval_transform
from torch_trainer import run_folder as rf
from torch_trainer.checkpoint import WEIGHT_CHOICES, load_run_model
from torch_trainer.predictors import OnnxPredictor, softmax
from utils.atomic import atomic_path, atomic_write_json
from utils.cli import run_cli
from utils.errors import UserError
from utils.face_parsing import DEFAULT_SEGFORMER, SEG_ONNX_NAME, SegformerParser, parser_preprocessing
from utils.logging_setup import setup_logging
from utils.onnx_export import export_fp32
from utils.onnx_quant import (CALIBRATION_METHODS, CalibrationReader, auto_float_stages, compare_latency,
                              gated_activation_count, prepare_for_quantization, quantize_int8)

logger = logging.getLogger(__name__)

FP32_NAME = "clf_model.onnx"
INT8_NAME = "clf_model_int8.onnx"
FP32_PROB_TOLERANCE = 1e-4
INT8_ACCURACY_DROP_WARNING = 0.01
# An INT8 file above half the FP32 size means most weights stayed float: the name promises more than the file gives.
INT8_SIZE_RATIO_WARNING = 0.5
SEG_LOGIT_TOLERANCE = 1e-3  # relative to the largest logit
SEG_LABEL_AGREEMENT = 0.999


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf ONNX export and INT8 quantization", add_help=add_help)
    parser.add_argument("--model_path", required=True, help="run folder written by main.py")
    parser.add_argument("--output_dir", default="onnx_models", help="where the ONNX files go (default: %(default)s)")
    parser.add_argument("--skip_segmentation", type=str2bool, nargs="?", const=True, default=False,
                        metavar="True|False",
                        help="export the classifier only, not the SegFormer face parser (default: %(default)s)")
    parser.add_argument("--seg_model", default=DEFAULT_SEGFORMER,
                        help="SegFormer face parser to export: Hugging Face id or local folder (default: %(default)s)")
    parser.add_argument("--seg_revision", default=None, help="Hugging Face revision (commit) of --seg_model")
    parser.add_argument("--weights", choices=list(WEIGHT_CHOICES), default="final",
                        help="final = the run's delivered model, best = best validation epoch, last = last epoch "
                             "(default: %(default)s)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--quantize", choices=["int8", "none"], default="int8", help="(default: %(default)s)")
    parser.add_argument("--calib_images", type=int, default=200,
                        help="training images used to calibrate INT8 activations (default: %(default)s)")
    parser.add_argument("--calibrate_method", choices=CALIBRATION_METHODS, default="minmax",
                        help="(default: %(default)s)")
    parser.add_argument("--keep_float_stages", type=_stage_count, default="auto", metavar="auto|N",
                        help="leading stages (timm feature levels) left in FP32 in the INT8 model; auto: those up to "
                             "stride 8 for SiLU/hard-swish models, whose quantized activations cost more than the "
                             "INT8 convolutions save there, and 0 otherwise (default: %(default)s)")
    parser.add_argument("--min_agreement", type=_share, default=0.99, metavar="0..1",
                        help="share of the run's validation images on which the INT8 model must give the FP32 "
                             "model's top-1 class; below it one more stage is kept in FP32 and the model "
                             "re-quantized, until it does; 0 turns the check off (default: %(default)s)")
    parser.add_argument("--verify_images", type=int, default=0,
                        help="test images for the parity/accuracy checks; 0 = the whole test split (default)")
    parser.add_argument("--data_dir", default=None,
                        help="dataset root if it moved since training (default: the run's configs.json data_dir)")
    return parser


def _stage_count(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a stage count >= 0, got {value!r}")
    return count


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {value!r}")
    return share


def _load_images(paths: list[Path], transform, loader=load_rgb) -> torch.Tensor:
    return torch.stack([transform(loader(p)) for p in paths])


def onnx_metadata(class_info: dict[str, Any], run_dir: Path, precision: str) -> dict[str, str]:
    pre = class_info["preprocessing"]
    return {"class_names": json.dumps(class_info["class_names"], ensure_ascii=False),
            "model_name": class_info["model_name"], "timm_model_name": class_info["timm_model_name"],
            "input_size": json.dumps(pre["input_size"]), "mean": json.dumps(pre["mean"]), "std": json.dumps(pre["std"]),
            "interpolation": pre["interpolation"], "crop_pct": str(pre["crop_pct"]), "crop_mode": pre["crop_mode"],
            "source_run": str(run_dir), "precision": precision, "output": "logits",
            # Divide the logits by this before softmax for calibrated probabilities (1.0 = not calibrated).
            "temperature": str(class_info.get("temperature", 1.0)),
            # "true": the run was tested on the mean logits of the image and its horizontal mirror (inference.py's
            # default for it); run the model on both and average before dividing by the temperature.
            "tta": str(bool(class_info.get("tta", False))).lower()}


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # onnx raises ValidationError and others
        raise UserError(f"exported ONNX model failed onnx.checker: {str(err).splitlines()[0]}") from err


def _onnx_probs(path: Path, images: torch.Tensor, n_class: int) -> np.ndarray:
    predictor = OnnxPredictor(path, n_class, torch.device("cpu"))
    return np.concatenate([softmax(predictor.logits(images[i:i + 32])) for i in range(0, len(images), 32)])


class _LogitsOnly(torch.nn.Module):
    """SegFormer returns a ModelOutput; ONNX wants one plain tensor output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _verification_size(size: list[int]) -> tuple[int, int]:
    """An input size unlike the export example's, so a size frozen at export time shows up as a mismatch."""
    return max(32, (size[0] * 3 // 4) // 32 * 32), max(32, (size[1] * 5 // 8) // 32 * 32)


def export_segmentation(model_ref: str, revision: Optional[str], output_dir: Path, opset: int, parser=None
                        ) -> dict[str, Any]:
    """Export the SegFormer face parser to seg_model.onnx (dynamic batch, height and width), verified first."""
    import onnxruntime as ort

    parser = parser or SegformerParser(model_ref, revision)
    pre = parser_preprocessing(parser.processor)
    wrapper = _LogitsOnly(parser.model).eval()  # eval(): the exporter keeps the wrapper's mode, and dropout with it
    example = torch.randn(2, 3, *pre["size"])
    check_h, check_w = _verification_size(pre["size"])
    check = torch.randn(3, 3, check_h, check_w)
    metadata = {"id2label": json.dumps({str(k): v for k, v in parser.id2label.items()}, ensure_ascii=False),
                "parser_preprocessing": json.dumps(pre), "seg_model": model_ref, "seg_revision": parser.revision or "",
                "output": "logits at 1/4 of the input size"}
    with atomic_path(output_dir / SEG_ONNX_NAME) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, input_names=["pixel_values"],
                              output_names=["logits"], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "logits_height", 3: "logits_width"}})
        _set_metadata(tmp, metadata)
        _check(tmp)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        onnx_logits = session.run(None, {"pixel_values": check.numpy()})[0]
        with torch.inference_mode():
            torch_logits = wrapper(check).numpy()
        if onnx_logits.shape != torch_logits.shape:
            raise UserError(f"exported face parser gives shape {onnx_logits.shape} at batch 3, {check_h}x{check_w} "
                            f"but PyTorch gives {torch_logits.shape}; nothing was written")
        max_diff = float(np.abs(onnx_logits - torch_logits).max())
        agreement = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean())
        tolerance = SEG_LOGIT_TOLERANCE * max(1.0, float(np.abs(torch_logits).max()))
        if max_diff > tolerance or agreement < SEG_LABEL_AGREEMENT:
            raise UserError(f"exported face parser disagrees with PyTorch at batch 3, {check_h}x{check_w} (max |logit "
                            f"diff| {max_diff:.2e}, label agreement {agreement:.4f}); nothing was written")
    logger.info("face parser %s -> %s (%d labels; matches PyTorch at batch 3, %dx%d: max |logit diff| %.1e)",
                model_ref, output_dir / SEG_ONNX_NAME, len(parser.id2label), check_h, check_w, max_diff)
    return {"seg_model": model_ref, "seg_max_logit_diff": max_diff, "seg_label_agreement": agreement,
            "seg_verified_shape": [3, 3, check_h, check_w]}


def _load_parser_for_export(args: argparse.Namespace) -> SegformerParser:
    try:
        return SegformerParser(args.seg_model, args.seg_revision)
    except UserError as err:
        raise UserError(f"{err}. To export the classifier only, pass --skip_segmentation") from err


def _top1_agreement(path: Path, images: torch.Tensor, reference_top1: np.ndarray, n_class: int) -> float:
    return float((_onnx_probs(path, images, n_class).argmax(1) == reference_top1).mean())


def _quantize_verified(args: argparse.Namespace, run_dir: Path, class_info: dict, model: torch.nn.Module,
                       fp32_path: Path, images: torch.Tensor, labels: np.ndarray, torch_probs: np.ndarray, transform,
                       loader, output_dir: Path) -> dict[str, Any]:
    """Quantize the verified FP32 file to clf_model_int8.onnx, then measure its agreement, accuracy and speed."""
    if args.calibrate_method != "minmax" and args.calib_images > 300:
        # Seen here: percentile with 600 images of 192 px was killed for memory on a 24 GB machine.
        logger.warning("%s calibration keeps activation histograms of every calibration image in memory; "
                       "%d images may exhaust RAM (200 is usually enough)", args.calibrate_method, args.calib_images)
    levels = getattr(model, "feature_info", None) or []
    gated = gated_activation_count(fp32_path)
    float_stages = (auto_float_stages(levels, gated) if args.keep_float_stages == "auto"
                    else args.keep_float_stages)
    train = rf.run_split(run_dir, "train", args.data_dir)
    calib = [s.path for s in random.Random(0).sample(train, min(args.calib_images, len(train)))]
    reader = CalibrationReader(calib, lambda paths: _load_images(paths, transform, loader).numpy())
    val = rf.run_split(run_dir, "val", args.data_dir) if (run_dir / "split_val.csv").is_file() else []
    val_images = _load_images([s.path for s in val], transform, loader) if val else torch.empty(0)
    val_fp32_top1 = _onnx_probs(fp32_path, val_images, class_info["n_class"]).argmax(1) if len(val_images) else None
    attempts = []
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".calibration-") as work:
        cache = Path(work) / "ranges.json"
        prepped = Path(work) / "preprocessed.onnx"
        prepare_for_quantization(fp32_path, prepped)
        with atomic_path(output_dir / INT8_NAME) as int8_tmp:
            while True:
                float_until = levels[float_stages - 1]["module"] if float_stages else None
                # Calibrate once; re-quantizing with more float stages reuses the cached ranges.
                float_nodes = quantize_int8(prepped, int8_tmp, None if cache.exists() else reader,
                                            args.calibrate_method, float_until, cache)
                if val_fp32_top1 is None or args.min_agreement <= 0:
                    break
                attempts.append({"float_stages": float_stages, "float_until": float_until,
                                 "val_top1_agreement": _top1_agreement(int8_tmp, val_images, val_fp32_top1,
                                                                       class_info["n_class"])})
                logger.info("INT8 with %d float stages: same top-1 as FP32 on %.4f of %d validation images",
                            float_stages, attempts[-1]["val_top1_agreement"], len(val_images))
                if attempts[-1]["val_top1_agreement"] >= args.min_agreement:
                    break
                if float_stages >= len(levels):
                    # None passed: keep the attempt that agreed most (the fewest float stages among equals).
                    best = max(attempts, key=lambda a: (a["val_top1_agreement"], -a["float_stages"]))
                    if best["float_stages"] != float_stages:
                        float_stages, float_until = best["float_stages"], best["float_until"]
                        float_nodes = quantize_int8(prepped, int8_tmp, None, args.calibrate_method, float_until,
                                                    cache)
                    break
                float_stages += 1
            metadata = onnx_metadata(class_info, run_dir, "int8")
            metadata["float_stages"] = str(float_stages)
            _set_metadata(int8_tmp, metadata)
            _check(int8_tmp)
            int8_probs = _onnx_probs(int8_tmp, images, class_info["n_class"])
            fp32_ms, int8_ms = compare_latency([fp32_path, int8_tmp], images[:1].numpy(), os.cpu_count() or 1)
            result = {"int8_top1_agreement": float((int8_probs.argmax(1) == torch_probs.argmax(1)).mean()),
                      "int8_accuracy": float((int8_probs.argmax(1) == labels).mean()),
                      "int8_size_ratio": int8_tmp.stat().st_size / fp32_path.stat().st_size,
                      "fp32_batch1_ms": fp32_ms, "int8_batch1_ms": int8_ms, "gated_activations": gated,
                      "int8_float_stages": float_stages, "int8_float_until": float_until,
                      "int8_float_nodes": float_nodes, "calibrate_method": args.calibrate_method,
                      "calib_images": len(calib), "min_agreement": args.min_agreement,
                      "agreement_attempts": attempts}
    best_agreement = max((a["val_top1_agreement"] for a in attempts), default=1.0)
    if best_agreement < args.min_agreement:
        logger.warning("!!! INT8 agrees with FP32 on at most %.4f of the validation images (wanted %.2f) even with "
                       "every stage but the head in FP32; kept %d float stages, the best attempt; deploy "
                       "clf_model.onnx if that matters", best_agreement, args.min_agreement, float_stages)
    if float_stages:
        logger.info("INT8: the first %d stages (through %s, %d nodes) stay FP32%s", float_stages, float_until,
                    float_nodes, f" ({gated} SiLU/SE/hard-swish activations)" if gated else "")
    return result


def _warn_mostly_float(report: dict[str, Any], n_stages: int) -> None:
    attempts = report["agreement_attempts"]
    if attempts:
        fewest = attempts[0]
        why = (f"for --min_agreement {report['min_agreement']:.2f} (with {fewest['float_stages']} float stages "
               f"INT8 gave FP32's answer on {fewest['val_top1_agreement']:.4f} of the validation images); for a "
               f"smaller, faster file accept fewer agreeing answers with --min_agreement or --keep_float_stages")
    else:
        why = "as --keep_float_stages asked; lower it for a smaller, faster file"
    logger.warning("!!! clf_model_int8.onnx is %.0f%% of the FP32 file: its first %d of %d stages stay FP32 %s, "
                   "or deploy clf_model.onnx", 100 * report["int8_size_ratio"], report["int8_float_stages"],
                   n_stages, why)


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    # Load the parser first: a parser that cannot be loaded must fail before any file is written.
    seg_parser = None if args.skip_segmentation else _load_parser_for_export(args)
    run_dir = Path(args.model_path)
    model, class_info = load_run_model(run_dir, args.weights)
    levels = getattr(model, "feature_info", None) or []
    if args.keep_float_stages != "auto" and args.keep_float_stages > len(levels):
        raise UserError(f"--keep_float_stages {args.keep_float_stages}: {class_info['timm_model_name']} has "
                        f"{len(levels)} stages ({', '.join(level['module'] for level in levels) or 'none known'})")
    pre = class_info["preprocessing"]
    transform = build_eval_transform(pre)
    n_class = class_info["n_class"]
    loader = image_loader_for_run(class_info, rf.dataset_root(run_dir, args.data_dir))

    test = rf.run_split(run_dir, "test", args.data_dir)
    if args.verify_images:
        test = test[: args.verify_images]
    images = _load_images([s.path for s in test], transform, loader)
    labels = np.array([s.label for s in test])
    with torch.inference_mode():
        torch_probs = np.concatenate([model(images[i:i + 32]).softmax(1).numpy() for i in range(0, len(images), 32)])
    torch_acc = float((torch_probs.argmax(1) == labels).mean())

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"source_run": str(run_dir), "verify_images": len(test), "torch_accuracy": torch_acc}

    with atomic_path(output_dir / FP32_NAME) as tmp:
        report["export_rewrites"] = export_fp32(model, pre["input_size"], tmp, args.opset)
        _set_metadata(tmp, onnx_metadata(class_info, run_dir, "fp32"))
        _check(tmp)
        fp32_probs = _onnx_probs(tmp, images, n_class)
        max_diff = float(np.abs(fp32_probs - torch_probs).max())
        same_top1 = bool((fp32_probs.argmax(1) == torch_probs.argmax(1)).all())
        if max_diff > FP32_PROB_TOLERANCE or not same_top1:
            raise UserError(f"FP32 ONNX disagrees with PyTorch on the test images (max |prob diff| {max_diff:.2e}, "
                            f"same top-1: {same_top1}); nothing was written")
        report.update(fp32_max_prob_diff=max_diff, fp32_accuracy=float((fp32_probs.argmax(1) == labels).mean()))
        fp32_tmp = tmp
        logger.info("FP32 ONNX matches PyTorch on %d test images (max |prob diff| %.2e)", len(test), max_diff)

        if args.quantize == "int8":
            report.update(_quantize_verified(args, run_dir, class_info, model, fp32_tmp, images, labels, torch_probs,
                                             transform, loader, output_dir))
    if args.quantize == "none" and (output_dir / INT8_NAME).exists():
        # An INT8 file from an earlier export would otherwise be benchmarked and deployed beside the new FP32 one.
        (output_dir / INT8_NAME).unlink()
        logger.info("removed the older %s from %s", INT8_NAME, output_dir)
    atomic_write_json(output_dir / rf.CLASS_INFO, class_info)
    if seg_parser is not None:
        report.update(export_segmentation(args.seg_model, args.seg_revision, output_dir, args.opset, seg_parser))

    logger.info("test accuracy: PyTorch %.4f | ONNX FP32 %.4f%s", torch_acc, report["fp32_accuracy"],
                f" | ONNX INT8 {report['int8_accuracy']:.4f} (top-1 agreement with PyTorch "
                f"{report['int8_top1_agreement']:.4f}, size {100 * report['int8_size_ratio']:.0f}% of FP32)"
                if "int8_accuracy" in report else "")
    if "int8_accuracy" in report and report["fp32_accuracy"] - report["int8_accuracy"] > INT8_ACCURACY_DROP_WARNING:
        logger.warning("!!! INT8 test accuracy is %.1f points below FP32; try --calibrate_method percentile, "
                       "--keep_float_stages with more stages in float, or deploy the FP32 model",
                       100 * (report["fp32_accuracy"] - report["int8_accuracy"]))
    if report.get("int8_size_ratio", 0.0) > INT8_SIZE_RATIO_WARNING:
        _warn_mostly_float(report, len(levels))
    if "int8_batch1_ms" in report:
        logger.info("batch-1 latency on this machine: FP32 %.2f ms, INT8 %.2f ms (%d float stages; benchmark.py "
                    "measures properly)", report["fp32_batch1_ms"], report["int8_batch1_ms"],
                    report["int8_float_stages"])
        if report["int8_batch1_ms"] >= report["fp32_batch1_ms"]:
            logger.warning("!!! the INT8 model is not faster than FP32 here (%.2f vs %.2f ms); deploy "
                           "clf_model.onnx unless the smaller file matters more", report["int8_batch1_ms"],
                           report["fp32_batch1_ms"])
    atomic_write_json(output_dir / "export_report.json", report)
    logger.info("wrote %s", ", ".join(str(output_dir / n) for n in (FP32_NAME, INT8_NAME, rf.CLASS_INFO, SEG_ONNX_NAME)
                                      if (output_dir / n).exists()))
    return report


if __name__ == "__main__":
    run_cli(main, lambda: get_args_parser().parse_args())
