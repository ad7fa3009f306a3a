"""Labels, groups and splits from a HAM10000-style metadata CSV instead of class folders."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

import audit_dataset
import main
from data.synthetic_lesions import generate_dataset
from dataloaders.labels_csv import CsvColumns, index_from_labels_csv
from tests.conftest import train_args
from utils.errors import UserError


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory):
    """One folder of images named like ISIC ids plus metadata.csv (image_id, lesion_id, dx, split); two photos per
    lesion."""
    source = generate_dataset(tmp_path_factory.mktemp("src") / "d", n_train=12, n_test=4, img_size=48, seed=6)
    root = tmp_path_factory.mktemp("ham") / "images"
    root.mkdir()
    rows = []
    for n, path in enumerate(sorted(source.rglob("*set/*/*.jpg"))):
        image_id = f"ISIC_{n:05d}"
        shutil.copy(path, root / f"{image_id}.jpg")
        split = "train" if path.parts[-3] == "trainset" else "test"
        rows.append({"image_id": image_id, "lesion_id": f"L{n // 2:04d}", "dx": path.parts[-2], "split": split})
    pd.DataFrame(rows).to_csv(root.parent / "metadata.csv", index=False)
    return root


HAM_FLAGS = ("--labels_csv", "{csv}", "--csv_file_column", "image_id", "--csv_label_column", "dx",
             "--csv_group_column", "lesion_id", "--csv_split_column", "split")


def test_main_trains_from_a_metadata_csv_with_lesion_groups(flat_images, tmp_path):
    flags = [f.format(csv=flat_images.parent / "metadata.csv") for f in HAM_FLAGS]
    result = main.main(main.parse_args(train_args(flat_images, tmp_path, *flags, "--epochs", "1")))
    run_dir = Path(result["run_dir"])
    train, val, test = (pd.read_csv(run_dir / f"split_{s}.csv") for s in ("train", "val", "test"))
    assert len(train) + len(val) == 36 and len(test) == 12
    assert not set(train["group"]) & set(val["group"])  # a lesion's two photos stay together
    assert sorted(train["class_name"].unique()) == ["benign", "malignant", "normal"]
    assert result["test_metrics"]["intervals"]["method"]["resampled_unit"] == "group"


def test_bad_metadata_rows_are_one_line_errors(flat_images, tmp_path):
    columns = CsvColumns("image_id", "dx", None, "split")
    good = "image_id,dx,split\nISIC_00000,benign,train\n"
    cases = [("name,dx,split\nISIC_00000,benign,train\n", "no column 'image_id'"),
             ("image_id,dx,split\nISIC_99999,benign,train\n", "line 2: image_id 'ISIC_99999' is not an image"),
             (good + "ISIC_00001,,train\n", "line 3: 'ISIC_00001' has an empty dx"),
             (good + "ISIC_00000,malignant,train\n", "line 3: 'ISIC_00000' is listed twice"),
             (good + "ISIC_00001,benign,validation\n", "line 3: split 'validation' is not one of train, test")]
    for text, message in cases:
        csv = tmp_path / "bad.csv"
        csv.write_text(text)
        with pytest.raises(UserError, match=message):
            index_from_labels_csv(csv, flat_images, columns)
    no_split = tmp_path / "nosplit.csv"
    no_split.write_text("image_id,dx\nISIC_00000,benign\n")
    with pytest.raises(UserError, match="not under trainset/ or testset/"):
        index_from_labels_csv(no_split, flat_images, CsvColumns("image_id", "dx"))


def test_audit_reads_the_metadata_csv(flat_images, tmp_path):
    summary = audit_dataset.main(audit_dataset.get_args_parser().parse_args(
        ["--data_dir", str(flat_images), "--labels_csv", str(flat_images.parent / "metadata.csv"),
         "--csv_file_column", "image_id", "--csv_label_column", "dx", "--csv_split_column", "split",
         "--output", str(tmp_path / "audit")]))
    assert summary["readable"] == 48
    assert set(summary["per_class"]) == {"trainset", "testset"}


def test_a_cp949_csv_from_korean_excel_is_read_and_the_encoding_is_said(flat_images, tmp_path, caplog):
    import logging

    frame = pd.read_csv(flat_images.parent / "metadata.csv")
    frame["dx"] = frame["dx"].map({"benign": "양성", "malignant": "악성", "normal": "정상"})
    korean = tmp_path / "라벨.csv"
    korean.write_bytes(frame.to_csv(index=False).encode("cp949"))
    with caplog.at_level(logging.INFO):
        index, _ = index_from_labels_csv(korean, flat_images, CsvColumns("image_id", "dx", None, "split"))
    assert sorted(index.class_names) == sorted(["양성", "악성", "정상"])
    assert any("CP949" in r.getMessage() for r in caplog.records)
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"image_id,dx\n\xff\xfe\xfa,x\n")
    with pytest.raises(UserError, match="neither UTF-8 nor CP949"):
        index_from_labels_csv(broken, flat_images, CsvColumns("image_id", "dx"))
