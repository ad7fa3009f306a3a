"""Classify only the face's skin: segment each photo, crop to the skin, fill the rest as training did, classify.

Example:
    python inference_with_segmentation.py --model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --inference_folder inference_set --inference_output inference_results_segmented --seg_backend segformer

Writes inference.py's predictions.csv / predictions.json / skipped.csv (plus the columns face_found and skin_ratio),
segmented/<relative path>.skin.png (what the classifier saw) and, with --generate_gradcam, Grad-CAM overlays on those
inputs. Train the model with ``main.py --input_kind skin_region`` so it sees the same kind of input.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

import inference
from configs import str2bool
from dataloaders.build import effective_workers
from dataloaders.inference_data import InferenceImages, collect_inference_images
from dataloaders.skin_region import (NO_FACE_POLICIES, fill_colour, make_skin_region, parse_parts_flag, part_names,
                                     select_parts, skin_mask)
from dataloaders.transforms import build_eval_transform
from face_segmentation import add_segmentation_arguments
from utils.cli import run_cli
from utils.device import select_device
from utils.face_parsing import FaceParser, build_face_parser
from utils.logging_setup import setup_logging
from utils.paths import safe_output_path

logger = logging.getLogger(__name__)

EXTRA_COLUMNS = ("face_found", "skin_ratio")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "skinclf inference on the skin region", add_help=add_help,
        parents=[inference.get_args_parser(add_help=False)],
        description="Segment the facial skin, then classify it with a run folder written by main.py.")
    parser.set_defaults(inference_output="inference_results_segmented")
    add_segmentation_arguments(parser)
    parser.add_argument("--no_face_policy", choices=list(NO_FACE_POLICIES), default="full_image",
                        help="when no face is found: classify the whole photo (as training does) or skip it and "
                             "list it in skipped.csv (default: %(default)s)")
    parser.add_argument("--save_segmented", type=str2bool, nargs="?", const=True, default=True, metavar="True|False",
                        help="save each classifier input under segmented/ (default: %(default)s)")
    return parser


def check_training_match(class_info: dict[str, Any], parser: FaceParser, parts: list[str]) -> None:
    """Warn when the model did not see skin regions made this way (the original project's silent mismatch)."""
    if class_info.get("input_kind", "full_image") != "skin_region":
        logger.warning("this model was trained on whole images but is now fed skin regions; its predictions may be "
                       "off. Retrain with main.py --input_kind skin_region --seg_backend %s", parser.backend)
        return
    trained = class_info["skin_region"]
    now = {**parser.describe(), "parts": parts}
    # The backend may differ (segformer in training, its ONNX export here): the parser and the parts must not.
    for key in ("seg_model", "parts"):
        if trained.get(key) != now.get(key):
            logger.warning("the model was trained on skin regions with %s=%s, now %s=%s", key, trained.get(key),
                           key, now.get(key))


def _collate_list(batch):
    return batch


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    run_dir, class_info = inference.open_run(args)
    root, paths = collect_inference_images(args.inference_folder)
    parser = build_face_parser(args.seg_backend, args.seg_model, args.seg_revision, select_device(args.device).type)
    part_ids = select_parts(parser.id2label, parse_parts_flag(args.parts))
    check_training_match(class_info, parser, part_names(parser.id2label, part_ids))
    output_dir = Path(args.inference_output)
    output_dir.mkdir(parents=True, exist_ok=True)
    segmented_dir = output_dir / "segmented"
    if args.save_segmented:
        shutil.rmtree(segmented_dir, ignore_errors=True)  # inputs of an earlier run would not match predictions.csv
    classifier = inference.BatchClassifier(args, run_dir, class_info, output_dir)
    transform = build_eval_transform(class_info["preprocessing"])
    fill = fill_colour(class_info["preprocessing"])
    workers = effective_workers(args.num_workers)
    # Workers only decode; the parser runs here, once, rather than once per worker process.
    loader = DataLoader(InferenceImages(paths, np.asarray), batch_size=args.batch_size, num_workers=workers,
                        collate_fn=_collate_list)

    skipped: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for batch in tqdm(loader, desc="segment + classify", disable=None):
            tensors, relatives, originals, extras = [], [], [], []
            for image, index, detail in batch:
                relative = paths[index].relative_to(root)
                if image is None:
                    logger.warning("skipping %s: %s", paths[index], detail)
                    skipped.append({"filename": relative.as_posix(), "reason": detail})
                    continue
                label_map = parser.parse(image)
                region = make_skin_region(image, skin_mask(label_map, part_ids), fill, parser.face_detected(label_map))
                if not region.face_found and args.no_face_policy == "skip":
                    skipped.append({"filename": relative.as_posix(), "reason": "no face found (--no_face_policy skip)",
                                    "face_found": False, "skin_ratio": round(region.skin_ratio, 6)})
                    continue
                picture = Image.fromarray(region.image)
                if args.save_segmented:
                    target = safe_output_path(segmented_dir, relative, ".skin.png")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    picture.save(target)
                tensors.append(transform(picture))
                relatives.append(relative)
                originals.append(region.image)
                extras.append({"face_found": region.face_found, "skin_ratio": round(region.skin_ratio, 6)})
            if tensors:
                classifier.classify(torch.stack(tensors), relatives, originals, extras)
    except BaseException:
        classifier.abandon()
        raise
    seconds = time.perf_counter() - start
    classifier.finish()
    inference.write_outputs(output_dir, classifier.rows, skipped, class_info["class_names"], EXTRA_COLUMNS)
    summary = inference.summarise(len(paths), classifier.rows, skipped, class_info["class_names"], seconds,
                                  output_dir, args.generate_gradcam)
    if args.labels_from_folders:
        summary["metrics"] = inference.score_labelled_folder(output_dir, classifier.rows, classifier.probs,
                                                             class_info["class_names"])
    summary["no_face"] = sum(1 for r in classifier.rows if not r["face_found"]) + sum(
        1 for s in skipped if s.get("face_found") is False)
    logger.info("no face found in %d image(s) (policy %s)", summary["no_face"], args.no_face_policy)
    return summary


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
