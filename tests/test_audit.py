"""The dataset audit finds planted copies (and nothing among distinct images), --on_leak acts on exactly them, the
shortcut check fires on classes saved differently, and audit_dataset.py works on any labelled folder."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

import audit_dataset
import main
from data.synthetic_lesions import generate_dataset
from dataloaders.audit import DUPLICATE_COLUMNS, apply_leak_policy, discover_for_audit, run_audit
from dataloaders.discovery import discover_dataset
from tests.conftest import train_args
from utils.errors import UserError


def _plant(root: Path) -> dict[str, tuple[str, str]]:
    """Copies of existing images under new names; returns {copy name: (original, copy)} as root-relative paths."""
    train, test = root / "trainset", root / "testset"
    planted = {}

    def save(original: str, copy: str, make) -> None:
        img = Image.open(root / original).convert("RGB")
        make(img).save(root / copy, quality=50 if copy.endswith("reencoded.jpg") else 95)
        planted[Path(copy).name] = (original, copy)

    save("trainset/benign/benign_0000.jpg", "trainset/benign/zz_exact.png", lambda im: im)  # same decoded pixels
    save("trainset/benign/benign_0001.jpg", "trainset/benign/zz_resized.jpg",
         lambda im: im.resize((im.width * 3 // 4, im.height * 3 // 4)))
    save("trainset/benign/benign_0002.jpg", "trainset/benign/zz_reencoded.jpg", lambda im: im)
    save("trainset/benign/benign_0003.jpg", "trainset/benign/zz_cropped.jpg",
         lambda im: im.crop((5, 5, im.width - 5, im.height - 5)))
    save("trainset/benign/benign_0004.jpg", "trainset/benign/zz_bright.jpg",
         lambda im: ImageEnhance.Brightness(im).enhance(1.15))
    shutil.copy(train / "malignant/malignant_0000.jpg", train / "normal/zz_conflict.jpg")
    planted["zz_conflict.jpg"] = ("trainset/malignant/malignant_0000.jpg", "trainset/normal/zz_conflict.jpg")
    shutil.copy(test / "benign/benign_0000.jpg", train / "benign/zz_leak.jpg")
    planted["zz_leak.jpg"] = ("testset/benign/benign_0000.jpg", "trainset/benign/zz_leak.jpg")
    return planted


@pytest.fixture
def planted_dataset(tmp_path):
    root = generate_dataset(tmp_path / "planted", n_train=20, n_test=6, img_size=96, seed=3)
    return root, _plant(root)


def _pairs(frame: pd.DataFrame) -> set[frozenset]:
    return {frozenset((row.path_a, row.path_b)) for row in frame.itertuples(index=False)}


def test_audit_finds_every_planted_copy_and_no_pair_among_distinct_images(planted_dataset):
    root, planted = planted_dataset
    audit = run_audit(discover_for_audit(root), root)
    assert list(audit.pairs.columns) == DUPLICATE_COLUMNS
    assert _pairs(audit.pairs) == {frozenset(pair) for pair in planted.values()}
    relation = {Path(row.path_b).name if "zz_" in row.path_b else Path(row.path_a).name: (row.relation, row.kind)
                for row in audit.pairs.itertuples(index=False)}
    assert relation["zz_exact.png"] == ("duplicate", "exact")
    for name in ("zz_resized.jpg", "zz_reencoded.jpg", "zz_cropped.jpg", "zz_bright.jpg"):
        assert relation[name] == ("duplicate", "near"), name
    assert relation["zz_conflict.jpg"] == ("label_conflict", "exact")
    assert relation["zz_leak.jpg"] == ("train_test_leak", "exact")
    counts = audit.summary["duplicates"]
    assert counts["label_conflict_clusters"] == 1 and counts["train_test_clusters"] == 1
    assert counts["clusters"] == len(planted)


def test_on_leak_drop_removes_exactly_the_leaked_and_conflicting_copies(planted_dataset):
    root, _ = planted_dataset
    index = discover_dataset(root)
    audit = run_audit(discover_for_audit(root), root)
    assert apply_leak_policy(index, audit, "warn") is index
    with pytest.raises(UserError, match="--on_leak drop"):
        apply_leak_policy(index, audit, "error")
    kept = apply_leak_policy(index, audit, "drop")
    removed = {p.relative_to(root).as_posix() for p in {s.path for s in index.train + index.test}
               - {s.path for s in kept.train + kept.test}}
    assert removed == {"trainset/normal/zz_conflict.jpg", "trainset/malignant/malignant_0000.jpg",
                       "trainset/benign/zz_leak.jpg"}  # the test original stays
    assert {r.relative_to(root).as_posix() for r in audit.removals} == removed


def test_main_stops_before_training_on_leak_error_and_records_the_audit_otherwise(planted_dataset, tmp_path):
    root, _ = planted_dataset
    with pytest.raises(UserError, match="audit_dataset.py"):
        main.main(main.parse_args(train_args(root, tmp_path / "runs", "--on_leak", "error")))
    assert not (tmp_path / "runs").exists()  # nothing written

    result = main.main(main.parse_args(train_args(root, tmp_path / "runs", "--on_leak", "drop", "--epochs", "1")))
    run_dir = Path(result["run_dir"])
    report = json.loads((run_dir / "data_audit.json").read_text())
    assert {r["path"] for r in report["removed"]} == {"trainset/normal/zz_conflict.jpg",
                                                      "trainset/malignant/malignant_0000.jpg",
                                                      "trainset/benign/zz_leak.jpg"}
    assert len(pd.read_csv(run_dir / "duplicates.csv")) == 7
    split = pd.concat([pd.read_csv(run_dir / f"split_{s}.csv") for s in ("train", "val")])
    assert "trainset/benign/zz_leak.jpg" not in set(split["filepath"])
    # copies kept in trainset share a group, so the validation split never separates them
    groups = split.set_index("filepath")["group"]
    assert groups["trainset/benign/zz_exact.png"] == groups["trainset/benign/benign_0000.jpg"]
    val = set(pd.read_csv(run_dir / "split_val.csv")["filepath"])
    for copy in ("zz_exact.png", "zz_resized.jpg", "zz_cropped.jpg"):
        original = {"zz_exact.png": "benign_0000.jpg", "zz_resized.jpg": "benign_0001.jpg",
                    "zz_cropped.jpg": "benign_0003.jpg"}[copy]
        assert (f"trainset/benign/{copy}" in val) == (f"trainset/benign/{original}" in val)


def test_shortcut_warning_when_size_and_format_predict_the_class(tmp_path):
    root = generate_dataset(tmp_path / "shortcut", n_train=15, n_test=2, img_size=64, seed=1)
    fair = run_audit(discover_for_audit(root), root)
    assert fair.summary["shortcut"]["warning"] is False
    for path in sorted((root / "trainset" / "malignant").glob("*.jpg")):  # one class re-saved larger, as PNG
        Image.open(path).resize((80, 80)).save(path.with_suffix(".png"))
        path.unlink()
    skewed = run_audit(discover_for_audit(root), root)
    assert skewed.summary["shortcut"]["warning"] is True
    assert skewed.summary["per_class"]["trainset"]["malignant"]["formats"] == {"PNG": 15}


def test_audit_script_on_a_testset_only_folder_lists_unreadable_files(tmp_path):
    root = generate_dataset(tmp_path / "full", n_train=2, n_test=8, img_size=64, seed=2)
    testset = root / "testset"
    (testset / "benign" / "broken.jpg").write_bytes(b"not an image")
    shutil.copy(testset / "normal" / "normal_0001.jpg", testset / "normal" / "again.jpg")
    out = tmp_path / "report"
    summary = audit_dataset.main(audit_dataset.get_args_parser().parse_args(
        ["--data_dir", str(testset), "--output", str(out)]))
    assert summary["readable"] == 25 and [u["path"] for u in summary["unreadable"]] == ["benign/broken.jpg"]
    pairs = pd.read_csv(out / "duplicates.csv")
    assert list(pairs.columns) == DUPLICATE_COLUMNS and len(pairs) == 1
    assert (out / "duplicate_pairs.png").stat().st_size > 1000
    assert json.loads((out / "data_audit.json").read_text())["duplicates"]["exact_pairs"] == 1
    with pytest.raises(UserError, match="folder not found"):
        audit_dataset.main(audit_dataset.get_args_parser().parse_args(["--data_dir", str(tmp_path / "nope")]))


def test_near_duplicate_threshold_separates_copies_from_distinct_images(tmp_path):
    """The distances behind the default: planted copies well inside it, distinct images well outside."""
    from dataloaders.fingerprints import NEAR_DUPLICATE_BITS, hash_views, view_distance

    root = generate_dataset(tmp_path / "d", n_train=10, n_test=1, img_size=128, seed=4)
    images = [Image.open(p).convert("RGB") for p in sorted((root / "trainset").rglob("*.jpg"))]
    views = [hash_views(im) for im in images]
    distinct = [view_distance(views[i], views[j]) for i in range(len(views)) for j in range(i + 1, len(views))]
    assert min(distinct) > NEAR_DUPLICATE_BITS
    copy = ImageEnhance.Brightness(images[0].crop((6, 6, 122, 122)).resize((100, 100))).enhance(0.9)
    assert view_distance(views[0], hash_views(copy)) <= NEAR_DUPLICATE_BITS
    assert np.array_equal(hash_views(images[0]), views[0])


@pytest.mark.slow
def test_the_demo_data_gives_no_false_near_duplicate(tmp_path):
    """make demo's first screen is the audit of its own synthetic photos: 600 distinct images, so no pair may show."""
    root = generate_dataset(tmp_path / "demo_dataset")  # make demo's settings: 150 + 50 per class, 128 px, seed 0
    audit = run_audit(discover_for_audit(root), root, threshold=40, tiny_side=128, num_threads=2)
    assert audit.summary["duplicates"]["exact_pairs"] == 0
    assert audit.summary["duplicates"]["near_pairs"] == 0, audit.summary["duplicates"]
