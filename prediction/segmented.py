"""Classification of the face's skin only (inference_with_segmentation.py): a face parser finds the skin, the rest
of the photo is filled as training filled it, and the prediction engine classifies what is left."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from configs import PredictionOptions, SegmentationOptions
from dataloaders.build import effective_workers
from dataloaders.inference_data import InferenceImages
from dataloaders.transforms import build_eval_transform, decode_min_side
from prediction.engine import Batch, WholeImages, infer_folder
from prediction.labelled_scoring import ReferenceLabels
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
from utils.paths import check_only_ours, safe_output_path
from utils.progress import Progress

logger = logging.getLogger(__name__)

EXTRA_COLUMNS = ("face_found", "skin_ratio")
SEGMENTED_SUFFIX = ".skin.png"  # segmented/<relative path>.skin.png: what the classifier saw


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


class SkinRegions(WholeImages):
    """inference_with_segmentation.py's inputs: the face parser finds the skin, the rest of the photo is filled as
    training filled it; what the classifier saw is saved under segmented/ (``save_segmented``)."""

    desc = "segment + classify"
    extra_columns = EXTRA_COLUMNS

    def __init__(self, segmentation: SegmentationOptions, no_face_policy: str = "full_image",
                 save_segmented: bool = True):
        self.segmentation = segmentation
        self.no_face_policy = no_face_policy
        self.save_segmented = save_segmented
        self.segmented_dir: Optional[Path] = None

    def check(self, info: RunInfo, options: PredictionOptions) -> None:
        # The parser loads before any output is written: a parser that cannot load fails first.
        seg = self.segmentation
        self.parser = build_face_parser(seg.seg_backend, seg.seg_model, seg.seg_revision,
                                        select_device(options.device).type)
        self.part_ids = select_parts(self.parser.id2label, parse_parts_flag(seg.parts))
        check_training_match(info, self.parser, part_names(self.parser.id2label, self.part_ids))

    def start(self, output_dir: Path) -> None:
        self.segmented_dir = output_dir / "segmented"
        if self.save_segmented:
            check_only_ours(self.segmented_dir, SEGMENTED_SUFFIX, "--inference_output")
            shutil.rmtree(self.segmented_dir, ignore_errors=True)  # an earlier run's inputs would not match

    def batches(self, root: Path, paths: list[Path], info: RunInfo, options: PredictionOptions, batch_size: int,
                num_workers: int, wants_originals: bool, skipped: list[dict]) -> Iterator[Batch]:
        transform = build_eval_transform(info.preprocessing)
        fill = fill_colour(info.preprocessing)
        # Workers only decode (large JPEGs at the parser's reduced scale, as training's masks were made); the parser
        # runs here, once, rather than once per worker process.
        loader = DataLoader(InferenceImages(paths, np.asarray, PARSE_MIN_SIDE if options.reduced_decode else 0),
                            batch_size=batch_size, num_workers=effective_workers(num_workers),
                            collate_fn=_collate_list)
        min_side = decode_min_side(info.preprocessing) if options.reduced_decode else 0
        for batch in Progress(loader, self.desc, unit="batch"):
            tensors, relatives, originals, extras = [], [], [], []
            for image, index, detail in batch:
                relative = paths[index].relative_to(root)
                if image is None:
                    logger.warning("skipping %s: %s", paths[index], detail)
                    skipped.append({"filename": relative.as_posix(), "reason": detail})
                    continue
                label_map = self.parser.parse(image)
                mask = skin_mask(label_map, self.part_ids)
                face_found = is_face(mask, self.parser.face_detected(label_map))
                skin_ratio = round(float(mask.mean()), 6)
                if not face_found and self.no_face_policy == "skip":
                    skipped.append({"filename": relative.as_posix(), "reason": "no face found (--no_face_policy skip)",
                                    "face_found": False, "skin_ratio": skin_ratio})
                    continue
                # A small face in a large photo is decoded again at a finer scale (see classifier_input).
                picture = classifier_input(paths[index], mask if face_found else None, fill, min_side,
                                           Image.fromarray(image))
                if self.save_segmented:
                    target = safe_output_path(self.segmented_dir, relative, SEGMENTED_SUFFIX)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    picture.save(target)
                tensors.append(transform(picture))
                relatives.append(relative)
                originals.append(np.asarray(picture))
                extras.append({"face_found": face_found, "skin_ratio": skin_ratio})
            if tensors:
                yield torch.stack(tensors), relatives, originals, extras

    def finish(self, summary: dict[str, Any], rows: list[dict], skipped: list[dict]) -> None:
        summary["no_face"] = sum(1 for r in rows if not r["face_found"]) + sum(
            1 for s in skipped if s.get("face_found") is False)
        logger.info("no face found in %d image(s) (policy %s)", summary["no_face"], self.no_face_policy)


def infer_folder_segmented(model_path: str | Path, folder: str | Path, output_dir: Path, options: PredictionOptions,
                           segmentation: SegmentationOptions, *, no_face_policy: str = "full_image",
                           save_segmented: bool = True, batch_size: int = 32, num_workers: int = 2,
                           reference: ReferenceLabels = ReferenceLabels()) -> dict[str, Any]:
    """inference_with_segmentation.py: segment each photo's facial skin, fill the rest as training did, classify,
    write inference.py's outputs plus face_found/skin_ratio and the classifier inputs; returns the summary."""
    return infer_folder(model_path, folder, output_dir, options, batch_size=batch_size, num_workers=num_workers,
                        reference=reference, inputs=SkinRegions(segmentation, no_face_policy, save_segmented))
