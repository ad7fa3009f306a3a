"""Find the face's skin in photos: label map, coloured overlay, skin mask and skin-region image per photo.

Example:
    python face_segmentation.py --input inference_set --output face_segmentation_results --seg_backend segformer

For each image (same relative path as the input, plus a suffix) it writes <name>.labels.png (one value per pixel, see
labels.json), <name>.overlay.jpg, <name>.mask.png (skin 255) and <name>.skin.png (the skin region on black), and
logs the share of pixels per part. segmentation_summary.csv lists every image with face_found, skin_ratio and the
per-part shares; unreadable files are listed in skipped.csv. JPEGs with a shorter side of 1,024 px or more
are parsed at a reduced JPEG decode, like training does; their outputs keep the photo's aspect ratio at that size.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from configs import FaceSegmentationConfig, add_dataclass_arguments, from_namespace, parse_with_config_file
from dataloaders.inference_data import collect_inference_images
from segmentation.face_parsing import build_face_parser
from segmentation.outputs import segment_folder
from utils.cli import run_cli
from utils.device import select_device
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf face segmentation", add_help=add_help,
                                     description="Segment the facial skin in an image or a folder of images.")
    add_dataclass_arguments(parser, FaceSegmentationConfig)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    cfg = from_namespace(FaceSegmentationConfig, args)
    root, paths = collect_inference_images(cfg.input, "--input")
    seg = cfg.segmentation
    parser = build_face_parser(seg.seg_backend, seg.seg_model, seg.seg_revision, select_device(cfg.device).type)
    return segment_folder(root, paths, cfg.output_folder, parser, seg.parts, cfg.reduced_decode)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
