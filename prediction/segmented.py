"""Classification of the face's skin only (inference_with_segmentation.py): a face parser finds the skin, the rest
of the photo is filled as training filled it, and the prediction engine classifies what is left."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs import PredictionOptions, SegmentationOptions
from dataloaders.build import effective_workers
from dataloaders.inference_data import InferenceImages, collect_inference_images
from dataloaders.transforms import build_eval_transform, decode_min_side
from prediction.engine import BatchClassifier, open_run, summarise, write_outputs
from prediction.labelled_scoring import ReferenceLabels, score_labelled_folder
from runs.run_info import RunInfo
from segmentation.face_parsing import FaceParser, build_face_parser
from segmentation.skin_region import (
    PARSE_MIN_SIDE,
    classifier_input,
    fill_colour,
    is_face,
    parse_parts_flag,
    part_names,
    select_parts,
    skin_mask,
)
from utils.device import select_device
from utils.paths import safe_output_path

logger = logging.getLogger(__name__)

EXTRA_COLUMNS = ("face_found", "skin_ratio")


def check_training_match(info: RunInfo, parser: FaceParser, parts: list[str]) -> None:
    """Warn when the model did not see skin regions made this way (the original project's silent mismatch)."""
    if info.input_kind != "skin_region":
        logger.warning("this model was trained on whole images but is now fed skin regions; its predictions may be "
                       "off. Retrain with main.py --input_kind skin_region --seg_backend %s", parser.backend)
        return
    trained = info.skin_region
    now = {**parser.describe(), "parts": parts}
    # The backend may differ (segformer in training, its ONNX export here): the parser and the parts must not.
    for key in ("seg_model", "parts"):
        if trained.get(key) != now.get(key):
            logger.warning("the model was trained on skin regions with %s=%s, now %s=%s", key, trained.get(key),
                           key, now.get(key))


def _collate_list(batch):
    return batch


def infer_folder_segmented(model_path: str | Path, folder: str | Path, output_dir: Path, options: PredictionOptions,
                           segmentation: SegmentationOptions, *, no_face_policy: str = "full_image",
                           save_segmented: bool = True, batch_size: int = 32, num_workers: int = 2,
                           reference: ReferenceLabels = ReferenceLabels()) -> dict[str, Any]:
    """inference_with_segmentation.py: segment each photo's facial skin, fill the rest as training did, classify,
    write inference.py's outputs plus face_found/skin_ratio and the classifier inputs; returns the summary."""
    run_dir, info = open_run(model_path, batch_size, options.topk, options)
    root, paths = collect_inference_images(folder)
    labels = reference.lookup(root, paths) if reference.active else None  # a bad labels CSV fails before the work
    metadata = reference.subgroup_values(root, paths)
    parser = build_face_parser(segmentation.seg_backend, segmentation.seg_model, segmentation.seg_revision,
                               select_device(options.device).type)
    part_ids = select_parts(parser.id2label, parse_parts_flag(segmentation.parts))
    check_training_match(info, parser, part_names(parser.id2label, part_ids))
    output_dir.mkdir(parents=True, exist_ok=True)
    segmented_dir = output_dir / "segmented"
    if save_segmented:
        shutil.rmtree(segmented_dir, ignore_errors=True)  # inputs of an earlier run would not match predictions.csv
    classifier = BatchClassifier(options, run_dir, info, output_dir)
    transform = build_eval_transform(info.preprocessing)
    fill = fill_colour(info.preprocessing)
    workers = effective_workers(num_workers)
    # Workers only decode (large JPEGs at the parser's reduced scale, as training's masks were made); the parser
    # runs here, once, rather than once per worker process.
    loader = DataLoader(InferenceImages(paths, np.asarray, PARSE_MIN_SIDE if options.reduced_decode else 0),
                        batch_size=batch_size, num_workers=workers, collate_fn=_collate_list)
    min_side = decode_min_side(info.preprocessing) if options.reduced_decode else 0

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
                mask = skin_mask(label_map, part_ids)
                face_found, skin_ratio = is_face(mask, parser.face_detected(label_map)), round(float(mask.mean()), 6)
                if not face_found and no_face_policy == "skip":
                    skipped.append({"filename": relative.as_posix(), "reason": "no face found (--no_face_policy skip)",
                                    "face_found": False, "skin_ratio": skin_ratio})
                    continue
                # A small face in a large photo is decoded again at a finer scale (see classifier_input).
                picture = classifier_input(paths[index], mask if face_found else None, fill, min_side,
                                           Image.fromarray(image))
                if save_segmented:
                    target = safe_output_path(segmented_dir, relative, ".skin.png")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    picture.save(target)
                tensors.append(transform(picture))
                relatives.append(relative)
                originals.append(np.asarray(picture))
                extras.append({"face_found": face_found, "skin_ratio": skin_ratio})
            if tensors:
                classifier.classify(torch.stack(tensors), relatives, originals, extras)
    except BaseException:
        classifier.abandon()
        raise
    seconds = time.perf_counter() - start
    classifier.finish()
    write_outputs(output_dir, classifier.rows, skipped, info.class_names, EXTRA_COLUMNS + classifier.decision_columns)
    summary = summarise(len(paths), classifier.rows, skipped, info.class_names, seconds, output_dir,
                        options.generate_gradcam)
    if labels is not None:
        summary["metrics"] = score_labelled_folder(output_dir, classifier.rows, classifier.probs, info.class_names,
                                                   labels, reference.source, metadata, root)
    summary["no_face"] = sum(1 for r in classifier.rows if not r["face_found"]) + sum(
        1 for s in skipped if s.get("face_found") is False)
    logger.info("no face found in %d image(s) (policy %s)", summary["no_face"], no_face_policy)
    return summary
