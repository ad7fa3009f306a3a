"""Seeded generator of synthetic skin-lesion photos with their lesion masks (the embedded demo data).

Three classes; the two lesion classes follow the dermatologist's ABCD cues:
  benign     round/oval, one even brown, sharp regular border
  malignant  asymmetric, several colours (dark brown, black, red, blue-grey), irregular blurred border
  normal     skin only (its mask is empty)
on a textured skin-tone background (uneven tone, pores, a few hairs). With a lesion-free class, "benign" has to be
recognised by its lesion too, not only by the absence of malignant colours. Lesion size and position are drawn from the
same ranges for both classes, so the model has to look at the lesion itself, which later tests use to check that
Grad-CAM points at the lesion mask.

Layout written (the project's own, plus masks beside it):
  OUT/trainset/<class>/<class>_0000.jpg     OUT/masks/trainset/<class>/<class>_0000.png
  OUT/testset/<class>/<class>_0000.jpg      OUT/masks/testset/<class>/<class>_0000.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

CLASSES = ("benign", "malignant", "normal")
SPLITS = {"trainset": 0, "testset": 1}

SKIN_TONES = np.array([[236, 192, 160], [224, 172, 138], [198, 145, 110], [170, 118, 84], [141, 92, 62]], float)
BENIGN_BROWNS = np.array([[150, 100, 65], [125, 80, 50], [170, 120, 80]], float)
MALIGNANT_COLOURS = np.array([[60, 35, 25], [25, 18, 15], [150, 55, 50], [95, 100, 125], [110, 65, 40]], float)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled smoothly."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _skin_background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 6, 3)
    # Blotchy enough that two round brown lesions on plain skin do not hash alike: the demo's audit shows no false
    # near-duplicate pair.
    tone = _smooth_noise(rng, size, 4)[..., None] * 22 + _smooth_noise(rng, size, 12)[..., None] * 5
    image = base[None, None, :] + tone + rng.normal(0, 3.0, (size, size, 3))
    for _ in range(rng.integers(size // 4, size // 2)):  # pores
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(image, centre, 1, tuple(float(c) for c in base * 0.85), -1)
    for _ in range(rng.integers(0, 4)):  # hairs
        start = rng.integers(0, size, 2)
        end = start + rng.integers(-size // 2, size // 2, 2)
        cv2.line(image, tuple(int(v) for v in start), tuple(int(v) for v in end),
                 tuple(float(c) for c in base * 0.45), 1, cv2.LINE_AA)
    return image


def _lesion_outline(rng: np.random.Generator, size: int, malignant: bool) -> np.ndarray:
    centre = size / 2 + rng.uniform(-0.15, 0.15, 2) * size
    # Irregular outlines cover less area than a circle of the same radius; scale up so size is no class cue.
    radius = rng.uniform(0.13, 0.26) * size * (1.2 if malignant else 1.0)
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    if malignant:  # asymmetric, notched border: several strong harmonics
        r = np.ones_like(theta)
        for k in range(2, 8):
            r += rng.uniform(0.03, 0.11) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        r += rng.normal(0, 0.025, theta.shape)
        aspect = rng.uniform(0.7, 1.0)
    else:  # round or gently oval, smooth border
        r = 1 + 0.015 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
        aspect = rng.uniform(0.8, 1.0)
    angle = rng.uniform(0, np.pi)
    x, y = r * np.cos(theta) * radius, r * np.sin(theta) * radius * aspect
    xr = x * np.cos(angle) - y * np.sin(angle) + centre[0]
    yr = x * np.sin(angle) + y * np.cos(angle) + centre[1]
    return np.stack([xr, yr], 1).round().astype(np.int32)


def make_lesion_image(rng: np.random.Generator, size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rgb uint8 HxWx3, mask uint8 HxW with 255 on the lesion)`` for a class in CLASSES."""
    image = _skin_background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    if kind == "normal":
        return np.clip(image, 0, 255).astype(np.uint8), mask
    malignant = kind == "malignant"
    cv2.fillPoly(mask, [_lesion_outline(rng, size, malignant)], 255)
    inside = mask.astype(np.float32) / 255.0

    if malignant:
        colours = MALIGNANT_COLOURS[rng.choice(len(MALIGNANT_COLOURS), 3, replace=False)]
        field = _smooth_noise(rng, size, 6)
        cuts = np.quantile(field[mask > 0], [1 / 3, 2 / 3]) if mask.any() else [0, 0]
        zone = np.digitize(field, cuts)
        lesion = colours[zone] + rng.normal(0, 8, (size, size, 3))
        alpha = cv2.GaussianBlur(inside, (0, 0), sigmaX=size / 80)
    else:
        colour = BENIGN_BROWNS[rng.integers(len(BENIGN_BROWNS))] + rng.normal(0, 5, 3)
        lesion = colour[None, None, :] + _smooth_noise(rng, size, 3)[..., None] * 6 + rng.normal(0, 3, (size, size, 3))
        alpha = cv2.GaussianBlur(inside, (0, 0), sigmaX=0.6)
    alpha = alpha[..., None]
    image = image * (1 - alpha) + lesion * alpha
    return np.clip(image, 0, 255).astype(np.uint8), mask


def generate_dataset(output: str | Path, n_train: int = 150, n_test: int = 50, img_size: int = 128,
                     seed: int = 0) -> Path:
    """Write the dataset under ``output``; each image depends only on (seed, split, class, index)."""
    output = Path(output)
    counts = {"trainset": n_train, "testset": n_test}
    for split, split_id in SPLITS.items():
        for class_id, name in enumerate(CLASSES):
            image_dir = output / split / name
            mask_dir = output / "masks" / split / name
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_id, class_id, i])
                image, mask = make_lesion_image(rng, img_size, name)
                stem = f"{name}_{i:04d}"
                cv2.imwrite(str(image_dir / f"{stem}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
                cv2.imwrite(str(mask_dir / f"{stem}.png"), mask)
    return output


def mask_path_for(image_path: Path, dataset_root: Path) -> Path:
    relative = image_path.relative_to(dataset_root)
    return dataset_root / "masks" / relative.with_suffix(".png")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("synthetic skin-lesion demo data", add_help=add_help)
    parser.add_argument("--output", default="data/demo_dataset", help="dataset root to write (default: %(default)s)")
    parser.add_argument("--n_train", type=int, default=150, help="training images per class (default: %(default)s)")
    parser.add_argument("--n_test", type=int, default=50, help="test images per class (default: %(default)s)")
    parser.add_argument("--img_size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    output = generate_dataset(args.output, args.n_train, args.n_test, args.img_size, args.seed)
    total = (args.n_train + args.n_test) * len(CLASSES)
    logger.info("wrote %d images (+ masks) to %s", total, output)
    return output


if __name__ == "__main__":
    main(get_args_parser().parse_args())
