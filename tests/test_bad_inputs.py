"""The bad-input matrix through training discovery, the training loader and inference.py; path safety."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inference
from dataloaders.datasets import ImageSamples
from dataloaders.discovery import discover_dataset
from dataloaders.image_io import load_rgb
from tests.bad_inputs import make_bad_input_folder
from utils.errors import UserError
from utils.paths import safe_output_path


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "photos"
    return folder, make_bad_input_folder(folder)


def test_every_readable_case_loads_as_oriented_rgb(matrix):
    folder, expected = matrix
    for name, (verdict, detail) in expected.items():
        if verdict == "ok":
            image = load_rgb(folder / name)
            assert image.mode == "RGB" and image.size == detail, name
    exif = np.asarray(load_rgb(folder / "exif_rotated.jpg"))
    plain = np.asarray(load_rgb(folder / "UPPER.JPG"))
    # rotated 90 degrees clockwise: the original's left column (dark end of the gradient) is now the top row
    assert abs(exif[0].mean() - plain[:, 0].mean()) < 20 and exif[0].mean() < exif[-1].mean() - 40


def test_training_discovery_skips_and_lists_every_bad_file(matrix, tmp_path):
    folder, expected = matrix
    root = tmp_path / "dataset"
    shutil.copytree(folder, root / "trainset" / "messy", symlinks=True)
    for split in ("trainset", "testset"):
        for cls in ("clean", "messy") if split == "testset" else ("clean",):
            target = root / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (40 * i, 90, 120)).save(target / f"{i}.png")
    index = discover_dataset(root)
    messy = root / "trainset" / "messy"
    skipped = {p.relative_to(messy).as_posix(): reason for p, reason in index.skipped}
    used = {s.path.relative_to(messy).as_posix() for s in index.train if s.path.is_relative_to(messy)}
    assert set(skipped) == {n for n, (v, _) in expected.items() if v == "skip"}
    assert used == {n for n, (v, _) in expected.items() if v == "ok"}
    for name, reason in skipped.items():
        assert expected[name][1].lower() in reason.lower(), (name, reason)
    dataset = ImageSamples([s for s in index.train if s.path.is_relative_to(messy)])
    assert all(item is not None and item[0].mode == "RGB" for item in dataset)


def test_inference_processes_or_lists_every_case(tiny_run, matrix, tmp_path):
    folder, expected = matrix
    out = tmp_path / "out"
    summary = inference.main(inference.parse_args(
        ["--model_path", str(tiny_run), "--inference_folder", str(folder), "--inference_output", str(out),
         "--generate_gradcam", "--num_workers", "2", "--batch_size", "4"]))
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        predicted = {row["filename"] for row in csv.DictReader(fh)}
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        skipped = {row["filename"]: row["reason"] for row in csv.DictReader(fh)}
    assert predicted == {n for n, (v, _) in expected.items() if v == "ok"}
    assert set(skipped) == {n for n, (v, _) in expected.items() if v == "skip"}
    assert summary["images_found"] == len(expected) == len(predicted) + len(skipped)
    for name, reason in skipped.items():
        assert expected[name][1].lower() in reason.lower(), (name, reason)
    overlay = Image.open(out / "gradcam" / "exif_rotated.jpg.gradcam.jpg")
    assert overlay.size == (32, 48)  # drawn on the upright photo
    assert (out / "gradcam" / "한국어 이름 with space.jpg.gradcam.jpg").is_file()


def test_output_paths_never_leave_the_output_folder(tmp_path):
    out = tmp_path / "out"
    assert safe_output_path(out, Path("a/b.jpg"), ".gradcam.jpg") == out / "a" / "b.jpg.gradcam.jpg"
    for relative in (Path("../escape.jpg"), Path("a/../../escape.jpg"), Path("/etc/passwd")):
        with pytest.raises(UserError, match="outside"):
            safe_output_path(out, relative, ".x")
    # a file really named with backslashes and dots (legal on Linux) stays a plain name inside the folder
    odd = safe_output_path(out, Path("..\\..\\evil.jpg"), ".gradcam.jpg")
    assert odd.parent == out


def test_inference_on_a_file_named_like_a_path_escape(tiny_run, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (30, 30), (120, 80, 60)).save(folder / "x\\..\\..\\evil.png")
    out = tmp_path / "out"
    inference.main(inference.parse_args(["--model_path", str(tiny_run), "--inference_folder", str(folder),
                                         "--inference_output", str(out), "--generate_gradcam", "--num_workers", "0"]))
    written = [p for p in tmp_path.rglob("*.gradcam.jpg")]
    assert len(written) == 1 and written[0].parent == out / "gradcam"
