import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataloaders.discovery import discover_dataset, list_images
from dataloaders.image_io import load_rgb
from dataloaders.splits import split_dataset
from runs.run_folder import RunDir
from utils.errors import UserError


def write_image(path: Path, color=(200, 120, 90), size=(12, 10), fmt=None, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path, format=fmt)
    return path


def make_layout(root: Path, classes=("acne", "normal"), n=4, test_classes=None):
    for split, names in (("trainset", classes), ("testset", test_classes or classes)):
        for name in names:
            for i in range(n):
                write_image(root / split / name / f"{name}_{i}.jpg")
    return root


def test_class_folders_with_subfolders_extensions_and_hidden_files(tmp_path):
    root = make_layout(tmp_path / "ds")
    write_image(root / "trainset" / "acne" / "clinic_a" / "deep.PNG", fmt="PNG")
    write_image(root / "trainset" / "acne" / "UPPER.JPEG", fmt="JPEG")
    write_image(root / "trainset" / "acne" / "x.webp", fmt="WEBP")
    write_image(root / "trainset" / "acne" / "x.tif", fmt="TIFF")
    write_image(root / "trainset" / "acne" / "x.bmp", fmt="BMP")
    write_image(root / "trainset" / "acne" / ".hidden.jpg")
    write_image(root / "trainset" / "acne" / ".cache" / "inside.jpg")
    (root / "trainset" / "acne" / "notes.txt").write_text("not an image")
    index = discover_dataset(root)
    assert index.class_names == ["acne", "normal"]
    acne = [s.path.relative_to(root / "trainset" / "acne").as_posix() for s in index.train if s.label == 0]
    assert acne == sorted(acne, key=str)  # sorted, deterministic
    assert "clinic_a/deep.PNG" in acne and "UPPER.JPEG" in acne
    assert {"x.webp", "x.tif", "x.bmp"} <= set(acne)
    assert not any(".hidden" in p or ".cache" in p or p.endswith(".txt") for p in acne)
    assert len(index.test) == 8


def test_flat_dogcat_layout_takes_class_from_file_name(tmp_path):
    root = tmp_path / "dogcat"
    for split in ("trainset", "testset"):
        for name in ("cat", "dog"):
            for i in range(3):
                write_image(root / split / f"{name}.{i}.jpg")
    index = discover_dataset(root)
    assert index.class_names == ["cat", "dog"]
    assert sorted(s.label for s in index.train) == [0, 0, 0, 1, 1, 1]
    assert all(s.path.name.startswith(index.class_names[s.label]) for s in index.train)


def test_flat_layout_without_class_names_is_a_clear_error(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "trainset" / "IMG001.jpg")
    (root / "testset").mkdir()
    with pytest.raises(UserError, match="IMG001.jpg.*class folders"):
        discover_dataset(root)


def test_missing_dataset_folder_names_path_and_layout(tmp_path):
    with pytest.raises(UserError) as err:
        discover_dataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "trainset/<class>" in str(err.value)


def test_missing_testset(tmp_path):
    root = make_layout(tmp_path / "ds")
    for p in (root / "testset").rglob("*.jpg"):
        p.unlink()
    for d in sorted((root / "testset").iterdir()):
        d.rmdir()
    (root / "testset").rmdir()
    with pytest.raises(UserError, match="missing .*testset"):
        discover_dataset(root)


def test_empty_class_folder(tmp_path):
    root = make_layout(tmp_path / "ds")
    (root / "trainset" / "rosacea").mkdir()
    with pytest.raises(UserError, match="rosacea.*no images"):
        discover_dataset(root)


def test_single_class(tmp_path):
    root = make_layout(tmp_path / "ds", classes=("acne",))
    with pytest.raises(UserError, match="single class"):
        discover_dataset(root)


def test_test_classes_must_exist_in_trainset(tmp_path):
    root = make_layout(tmp_path / "ds", test_classes=("acne", "psoriasis"))
    with pytest.raises(UserError, match="psoriasis"):
        discover_dataset(root)


def test_n_class_mismatch_lists_the_folders(tmp_path):
    root = make_layout(tmp_path / "ds")
    with pytest.raises(UserError, match=r"--n_class 6 .*\['acne', 'normal'\]"):
        discover_dataset(root, n_class=6)
    assert len(discover_dataset(root, n_class=2).class_names) == 2


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    root = make_layout(tmp_path / "ds")
    (root / "trainset" / "acne" / "empty.jpg").write_bytes(b"")
    (root / "trainset" / "acne" / "text.png").write_text("hello")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(good, format="JPEG")
    (root / "trainset" / "normal" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    index = discover_dataset(root)
    skipped = {p.name: reason for p, reason in index.skipped}
    assert set(skipped) == {"empty.jpg", "text.png", "truncated.jpg"}
    assert skipped["empty.jpg"] == "empty file"
    assert all(s.path.name not in skipped for s in index.train)
    assert len(index.train) == 8


def test_exif_orientation_is_applied_and_images_become_rgb(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    loaded = load_rgb(tmp_path / "rot.jpg")
    assert loaded.size == (20, 40) and loaded.mode == "RGB"
    Image.new("L", (5, 5), 80).save(tmp_path / "gray.png")
    Image.new("RGBA", (5, 5), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.fromarray(np.full((5, 5), 60000, np.uint16)).save(tmp_path / "deep.png")
    assert load_rgb(tmp_path / "gray.png").getpixel((0, 0)) == (80, 80, 80)
    assert load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparent shows as white
    assert load_rgb(tmp_path / "deep.png").getpixel((0, 0))[0] == int(60000 / 65535 * 255)  # not clipped to white


def test_symlink_loop_does_not_hang(tmp_path):
    root = make_layout(tmp_path / "ds")
    os.symlink(root / "trainset" / "acne", root / "trainset" / "acne" / "loop")
    assert len(list_images(root / "trainset" / "acne")) == 4


def test_split_is_stratified_seeded_disjoint_and_saved(tmp_path):
    root = make_layout(tmp_path / "ds", classes=("a", "b", "c"), n=10)
    index = discover_dataset(root)
    first = split_dataset(index, val_ratio=0.3, seed=1)
    again = split_dataset(index, val_ratio=0.3, seed=1)
    other = split_dataset(index, val_ratio=0.3, seed=2)
    assert [s.path for s in first.val] == [s.path for s in again.val]
    assert [s.path for s in first.val] != [s.path for s in other.val]
    assert not {s.path for s in first.train} & {s.path for s in first.val}
    assert len(first.train) + len(first.val) == 30
    assert sorted(s.label for s in first.val) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 3 of 10 per class
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).write_splits(first)
    header = (run_dir / "split_val.csv").read_text().splitlines()[0]
    assert header == "filepath,label,class_name"
    assert (run_dir / "skipped_files.csv").read_text().splitlines() == ["filepath,reason"]
    loaded = RunDir(run_dir).read_splits(root, index.class_names)
    for name in ("train", "val", "test"):
        assert [(s.path, s.label) for s in getattr(loaded, name)] == [(s.path, s.label) for s in getattr(first, name)]


def test_class_with_one_image_cannot_be_split(tmp_path):
    root = make_layout(tmp_path / "ds", n=3)
    for p in sorted((root / "trainset" / "normal").iterdir())[1:]:
        p.unlink()
    with pytest.raises(UserError, match="'normal' has 1 training image"):
        split_dataset(discover_dataset(root), val_ratio=0.2, seed=0)
