"""Measure the audit's near-duplicate detector on a real folder: how far planted copies land from their original
(recall at the threshold) and how many pairs of other photos fall within it.

    python -m benchmarks.audit_threshold --data_dir ../shared/data/dermnet_a --n 300

Copies made from each sampled trainset photo: half size, JPEG quality 50, central crops of 3/5/8/10% a side, a 10%
crop from the left only, brightness +20%. "Other photos" are the sampled photos against each other: a pair within the
threshold there is a false match or a real copy already in the data (check those by eye in the audit's
duplicate_pairs.png). Prints a table and writes it as CSV with the machine description.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from dataloaders.discovery import list_images
from dataloaders.fingerprints import NEAR_DUPLICATE_BITS, hash_views, view_distance
from dataloaders.image_io import load_rgb
from deploy.machine import describe_machine, machine_info


def copies(img: Image.Image) -> dict[str, Image.Image]:
    width, height = img.size
    out = {"resize_50%": img.resize((width // 2, height // 2), Image.Resampling.BILINEAR)}
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=50)
    out["jpeg_q50"] = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    for share in (0.03, 0.05, 0.08, 0.10):
        dx, dy = int(width * share), int(height * share)
        out[f"central_crop_{share:.0%}"] = img.crop((dx, dy, width - dx, height - dy))
    out["left_crop_10%"] = img.crop((int(width * 0.1), 0, width, height))
    out["brightness_+20%"] = ImageEnhance.Brightness(img).enhance(1.2)
    return out


def main(args: argparse.Namespace) -> pd.DataFrame:
    print(describe_machine(machine_info()))
    paths = list_images(Path(args.data_dir) / "trainset")
    paths = random.Random(args.seed).sample(paths, min(args.n, len(paths)))
    originals, distances = [], {}
    for path in paths:
        img = load_rgb(path)
        views = hash_views(img)
        originals.append(views)
        for name, copy in copies(img).items():
            distances.setdefault(name, []).append(view_distance(views, hash_views(copy)))
    others = [view_distance(originals[i], originals[j]) for i in range(len(originals))
              for j in range(i + 1, len(originals))]
    rows = [{"pairs": name, "n": len(d), "median_bits": float(np.median(d)), "max_bits": int(np.max(d)),
             f"within_{args.threshold}": float(np.mean(np.array(d) <= args.threshold))} for name, d in distances.items()]
    rows.append({"pairs": "other photos", "n": len(others), "median_bits": float(np.median(others)),
                 "max_bits": int(np.max(others)), f"within_{args.threshold}": float(np.mean(np.array(others) <= args.threshold)),
                 "count_within": int(np.sum(np.array(others) <= args.threshold)), "min_bits": int(np.min(others))})
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    if args.output:
        frame.assign(data_dir=args.data_dir).to_csv(args.output, index=False)
    return frame


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("audit near-duplicate threshold")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--n", type=int, default=300, help="trainset photos sampled")
    parser.add_argument("--threshold", type=int, default=NEAR_DUPLICATE_BITS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="CSV file for the table")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
