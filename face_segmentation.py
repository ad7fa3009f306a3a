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
from pathlib import Path
from typing import Any, Optional

from dataloaders.inference_data import collect_inference_images
from segmentation.face_parsing import build_face_parser, segmentation_flags
from segmentation.outputs import segment_folder
from utils.cli import add_bool_flag, device_flags, run_cli
from utils.device import select_device
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf face segmentation", add_help=add_help,
                                     parents=[segmentation_flags(), device_flags("cpu", "where the face parser runs")],
                                     description="Segment the facial skin in an image or a folder of images.")
    parser.add_argument("--input", required=True, help="an image or a folder of images (searched recursively)")
    parser.add_argument("--output", default="face_segmentation_results", help="output folder (default: %(default)s)")
    add_bool_flag(parser, "--reduced_decode", True,
                  "parse large JPEGs at a reduced decode (shorter side >= 512 px, as training and "
                  "inference_with_segmentation.py do); outputs keep the photo's aspect ratio and output_scale in "
                  "segmentation_summary.csv gives their size relative to the photo. False: every pixel "
                  "(default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    root, paths = collect_inference_images(args.input, "--input")
    parser = build_face_parser(args.seg_backend, args.seg_model, args.seg_revision, select_device(args.device).type)
    return segment_folder(root, paths, Path(args.output), parser, args.parts, args.reduced_decode)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
