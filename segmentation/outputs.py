"""face_segmentation.py's outputs: per photo a label map, a coloured overlay, the skin mask and the skin region, plus a
summary of every photo's face and skin share."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from dataloaders.image_io import decoded_size, failure_reason
from segmentation.face_parsing import FaceParser, colour_overlay
from segmentation.skin_region import (
    load_for_parsing,
    make_skin_region,
    parse_parts_flag,
    part_names,
    select_parts,
    skin_mask,
)
from utils.atomic import atomic_path, atomic_save, atomic_write_json
from utils.csv_cells import neutralise, open_for_people
from utils.paths import check_output_folder, safe_output_path
from utils.progress import Progress

logger = logging.getLogger(__name__)


def write_image(path: Path, array: np.ndarray, **save_kwargs: Any) -> None:
    atomic_save(path, lambda tmp: Image.fromarray(array).save(tmp, format=_format(path), **save_kwargs))


def _format(path: Path) -> str:
    return "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"


def part_shares(label_map: np.ndarray, id2label: dict[int, str]) -> dict[str, float]:
    counts = np.bincount(label_map.ravel(), minlength=max(id2label) + 1)
    return {name: float(counts[value]) / label_map.size for value, name in sorted(id2label.items())}


def segment_one(parser: FaceParser, part_ids: list[int], image: np.ndarray):
    label_map = parser.parse(image)
    region = make_skin_region(image, skin_mask(label_map, part_ids), (0, 0, 0), parser.face_detected(label_map))
    return label_map, region


def segment_folder(root: Path, paths: list[Path], output: Path, parser: FaceParser, parts: Optional[str] = None,
                   reduced_decode: bool = True) -> dict[str, Any]:
    """face_segmentation.py: label map, overlay, skin mask and skin region of every image in ``paths`` (named by
    their path under ``root``), plus segmentation_summary.csv, skipped.csv and labels.json in ``output``; returns
    the summary. Large JPEGs are parsed (and their outputs written) at the reduced decode training and
    inference_with_segmentation.py use, with the photo's aspect ratio; ``output_scale`` in the summary is the
    outputs' width over the photo's."""
    check_output_folder(output, "--output", {"--input": root})
    part_ids = select_parts(parser.id2label, parse_parts_flag(parts))
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / "labels.json", {"id2label": {str(k): v for k, v in parser.id2label.items()},
                                               "skin_parts": part_names(parser.id2label, part_ids),
                                               **parser.describe()})
    logger.info("face parser %s; skin = %s", parser.describe(), ", ".join(part_names(parser.id2label, part_ids)))

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for path in Progress(paths, "segmentation", unit="image"):
        relative = path.relative_to(root)
        try:
            image = np.asarray(load_for_parsing(path, reduced_decode))
            photo_width = decoded_size(path)[0]
        except Exception as err:  # noqa: BLE001 - any undecodable file is reported, never fatal
            skipped.append({"filename": relative.as_posix(), "reason": failure_reason(path, err)})
            logger.warning("skipping %s: %s", path, skipped[-1]["reason"])
            continue
        label_map, region = segment_one(parser, part_ids, image)
        write_image(safe_output_path(output, relative, ".labels.png"), label_map)
        write_image(safe_output_path(output, relative, ".overlay.jpg"), colour_overlay(image, label_map), quality=90)
        write_image(safe_output_path(output, relative, ".mask.png"), region.mask.astype(np.uint8) * 255)
        if region.face_found:
            write_image(safe_output_path(output, relative, ".skin.png"), region.image)
        shares = part_shares(label_map, parser.id2label)
        present = ", ".join(f"{name} {share:.1%}" for name, share in shares.items() if share > 0)
        logger.info("%s: %s; %s", relative.as_posix(), "face" if region.face_found else "NO FACE FOUND", present)
        rows.append({"filename": relative.as_posix(), "face_found": region.face_found,
                     "skin_ratio": round(region.skin_ratio, 6), "output_scale": round(image.shape[1] / photo_width, 6),
                     **{f"share_{name}": round(share, 6) for name, share in shares.items()}})

    columns = (["filename", "face_found", "skin_ratio", "output_scale"]
               + [f"share_{n}" for _, n in sorted(parser.id2label.items())])
    with atomic_path(output / "segmentation_summary.csv") as tmp, open_for_people(tmp) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({key: neutralise(value) for key, value in row.items()} for row in rows)
    with atomic_path(output / "skipped.csv") as tmp, open_for_people(tmp) as fh:
        writer = csv.DictWriter(fh, fieldnames=["filename", "reason"])
        writer.writeheader()
        writer.writerows({key: neutralise(value) for key, value in row.items()} for row in skipped)
    no_face = [r["filename"] for r in rows if not r["face_found"]]
    logger.info("%d images: %d with a face, %d without (see segmentation_summary.csv), %d unreadable; results in %s",
                len(paths), len(rows) - len(no_face), len(no_face), len(skipped), output)
    return {"segmented": len(rows), "no_face": no_face, "skipped": len(skipped), "output": str(output)}
