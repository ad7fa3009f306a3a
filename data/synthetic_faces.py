"""Seeded drawn faces (frontal, cartoon-like) for the face-segmentation tests and demo, with their true skin masks.

OpenCV's Haar face detector finds these faces (dark brows and eyes over brighter cheeks, a nose bridge), so the
opencv backend can be tested without any real photo. Two classes:
  acne     red papules on the cheeks and forehead
  normal   clear skin
The background is a bluish wall, which YCrCb skin thresholds reject.

Layout written: OUT/trainset/<class>/<class>_0000.png, OUT/testset/<class>/<class>_0000.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("acne", "normal")
SKIN_TONES = ((224, 172, 140), (198, 134, 96), (236, 196, 164), (170, 112, 80))
BACKGROUNDS = ((60, 90, 140), (70, 110, 90), (90, 90, 110))


def make_face_image(rng: np.random.Generator, size: int = 256, acne: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8 image, bool mask of the face skin)`` for one drawn face."""
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    centre = size // 2 + int(rng.integers(-size // 40, size // 40 + 1))
    face_w, face_h = int(size * 0.30), int(size * 0.40)
    cv2.ellipse(image, (centre, size // 2 + size // 40), (face_w, face_h), 0, 0, 360, skin, -1)
    face = np.zeros((size, size), np.uint8)
    cv2.ellipse(face, (centre, size // 2 + size // 40), (face_w, face_h), 0, 0, 360, 1, -1)
    hair = np.zeros_like(face)
    cv2.ellipse(hair, (centre, size // 2 - int(face_h * 0.75)), (int(face_w * 1.05), int(face_h * 0.45)), 0, 180,
                360, 1, -1)
    image[hair > 0] = (40, 30, 25)
    features = np.zeros_like(face)
    eye_y, eye_dx = size // 2 - int(face_h * 0.15), int(face_w * 0.42)
    for side in (-1, 1):
        eye = (centre + side * eye_dx, eye_y)
        cv2.ellipse(image, eye, (int(face_w * 0.22), int(face_h * 0.08)), 0, 0, 360, (245, 245, 245), -1)
        cv2.ellipse(features, eye, (int(face_w * 0.22), int(face_h * 0.08)), 0, 0, 360, 1, -1)
        cv2.circle(image, eye, int(face_h * 0.07), (50, 35, 30), -1)
        cv2.ellipse(image, (eye[0], eye_y - int(face_h * 0.2)), (int(face_w * 0.28), int(face_h * 0.05)), 0, 180, 360,
                    (50, 35, 30), max(2, size // 50))
        cv2.ellipse(features, (eye[0], eye_y - int(face_h * 0.2)), (int(face_w * 0.28), int(face_h * 0.05)), 0, 180,
                    360, 1, max(2, size // 50))
    cv2.ellipse(image, (centre, size // 2 + int(face_h * 0.2)), (int(face_w * 0.1), int(face_h * 0.08)), 0, 0, 180,
                (180, 120, 100), 2)
    mouth = (centre, size // 2 + int(face_h * 0.5))
    cv2.ellipse(image, mouth, (int(face_w * 0.35), int(face_h * 0.1)), 0, 0, 180, (150, 60, 60), -1)
    cv2.ellipse(features, mouth, (int(face_w * 0.35), int(face_h * 0.1)), 0, 0, 180, 1, -1)
    skin_mask = (face > 0) & (hair == 0) & (features == 0)
    if acne:
        ys, xs = np.nonzero(skin_mask)
        for i in rng.choice(len(ys), size=int(rng.integers(8, 16)), replace=False):
            radius = max(2, int(size * rng.uniform(0.008, 0.016)))
            cv2.circle(image, (int(xs[i]), int(ys[i])), radius, (185, 55, 60), -1)
    image = cv2.GaussianBlur(image, (0, 0), size / 200)
    noisy = image.astype(np.float32) + rng.normal(0, 3, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), skin_mask


def generate_dataset(output: str | Path, n_train: int = 12, n_test: int = 4, img_size: int = 160,
                     seed: int = 0) -> Path:
    from PIL import Image

    output = Path(output)
    rng = np.random.default_rng(seed)
    for split, count in (("trainset", n_train), ("testset", n_test)):
        for name in CLASSES:
            folder = output / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, _ = make_face_image(rng, img_size, acne=name == "acne")
                Image.fromarray(image).save(folder / f"{name}_{i:04d}.png")
    return output


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("synthetic face photos", add_help=add_help)
    parser.add_argument("--output", default="data/demo_faces_dataset", help="(default: %(default)s)")
    parser.add_argument("--n_train", type=int, default=40, help="images per class in trainset (default: %(default)s)")
    parser.add_argument("--n_test", type=int, default=10, help="images per class in testset (default: %(default)s)")
    parser.add_argument("--img_size", type=int, default=192, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> Path:
    return generate_dataset(args.output, args.n_train, args.n_test, args.img_size, args.seed)


if __name__ == "__main__":
    print(main(get_args_parser().parse_args()))
