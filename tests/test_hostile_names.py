"""Names from the real world in the pictures and files the suite writes: "$" (matplotlib's math marker), ..."""

import numpy as np
import pytest

from evaluation.plots import plot_confusion_matrix, plot_roc_curves


@pytest.mark.parametrize("names", [["$\\frac{$", "normal"], ["$x^$", "price $5"], ["$a$b$c_{$", "d"]])
def test_dollar_signs_in_class_names_are_drawn_as_text(tmp_path, names):
    plot_confusion_matrix(np.array([[3, 1], [0, 4]]), names, tmp_path / "confusion.png", title=f"{names[0]} run")
    curve = (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0]))
    plot_roc_curves([curve, curve], [0.8, 0.8], names, tmp_path / "roc.png")
    assert (tmp_path / "confusion.png").stat().st_size > 0 and (tmp_path / "roc.png").is_file()


FORMULA_FILE = '=HYPERLINK("http://example.invalid","open").jpg'


def test_csv_cells_a_spreadsheet_would_run_are_written_as_text_and_json_keeps_them(tmp_path):
    import csv
    import json

    from prediction.engine import write_outputs

    row = {"filename": FORMULA_FILE, "predicted_class": 0, "predicted_label": "=1+2", "confidence": 0.9,
           "probabilities": {"=1+2": 0.9, "-b": 0.1}, "decision": "+x"}
    write_outputs(tmp_path, [row], [{"filename": "@evil.png", "reason": "-broken"}], ["=1+2", "-b"], ("decision",))
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as handle:
        header, cells = list(csv.reader(handle))
    assert cells[0] == "'" + FORMULA_FILE and cells[2] == "'=1+2" and cells[-1] == "'+x"
    assert header[4:6] == ["prob_=1+2", "prob_-b"]  # headers start with "prob_": never run
    with open(tmp_path / "skipped.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle))[1] == ["'@evil.png", "'-broken"]
    entries = json.loads((tmp_path / "predictions.json").read_text(encoding="utf-8"))
    assert entries[0]["filename"] == FORMULA_FILE and entries[0]["predicted_label"] == "=1+2"


def test_split_files_with_formula_names_read_back_to_the_real_files(tmp_path):
    from dataloaders.discovery import Sample
    from dataloaders.splits import read_split_csv, write_split_csv

    samples = [Sample(tmp_path / "trainset" / "+x" / FORMULA_FILE, 0), Sample(tmp_path / "trainset" / "a.jpg", 1)]
    write_split_csv(tmp_path / "split.csv", samples, tmp_path, ["+x", "b"], {s.path: "-P1" for s in samples})
    text = (tmp_path / "split.csv").read_text(encoding="utf-8")
    assert "\n'+x/" not in text and "'+x" in text and "'-P1" in text  # a path starting with + is neutralised too
    groups = {}
    assert read_split_csv(tmp_path / "split.csv", tmp_path, groups) == samples
    assert set(groups.values()) == {"-P1"}


def test_per_class_report_of_a_class_named_like_a_formula(tmp_path):
    from evaluation.reports import write_classification_report

    targets = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.6, 0.4], [0.55, 0.45]])
    write_classification_report(tmp_path, targets, probs, ["@SUM(A1)", "normal"], metrics_name="m.json")
    lines = (tmp_path / "per_class_metrics.csv").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("'@SUM(A1),") for line in lines)


@pytest.mark.parametrize("label,problem", [("x/../../../../../outside", "path separator"), ("..", "relative path"),
                                           ("a\\\\b", "path separator"), ("tab\there", "control character"),
                                           ("n" * 120, "longer than 100 bytes")])
def test_a_class_name_that_would_leave_the_output_folder_is_refused_where_it_comes_from(tmp_path, label, problem):
    from data.synthetic_lesions import generate_dataset
    from dataloaders.labels_csv import CsvColumns, index_from_labels_csv
    from utils.errors import UserError

    root = generate_dataset(tmp_path / "d", n_train=4, n_test=2, img_size=32, seed=1)
    images = sorted(root.rglob("*.jpg"))
    rows = [f"{p.relative_to(root).as_posix()},{label if i == 0 else 'benign'}" for i, p in enumerate(images)]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,label\n" + "\n".join(f'"{r.split(",")[0]}","{r.split(",", 1)[1]}"' for r in rows),
                        encoding="utf-8")
    with pytest.raises(UserError, match=f"labels.csv line 2: class name .* {problem}"):
        index_from_labels_csv(csv_path, root, CsvColumns())


def test_a_class_folder_with_a_control_character_is_refused(tmp_path):
    from data.synthetic_lesions import generate_dataset
    from dataloaders.discovery import discover_dataset
    from utils.errors import UserError

    root = generate_dataset(tmp_path / "d", n_train=4, n_test=2, img_size=32, seed=1)
    (root / "trainset" / "benign").rename(root / "trainset" / "be\x07nign")
    with pytest.raises(UserError, match="control character"):
        discover_dataset(root, check_images=False)


def test_audit_and_export_refuse_an_output_among_their_inputs(tmp_path, tiny_run):
    import audit_dataset
    import quantize_onnx_models
    from data.synthetic_lesions import generate_dataset
    from utils.errors import UserError

    data = generate_dataset(tmp_path / "d", n_train=4, n_test=2, img_size=32, seed=1)
    with pytest.raises(UserError, match="--output .* lies inside --data_dir"):
        audit_dataset.main(audit_dataset.parse_args(["--data_dir", str(data), "--output", str(data / "audit")]))
    assert not (data / "audit").exists()
    with pytest.raises(UserError, match="--output_dir .* is --model_path"):
        quantize_onnx_models.main(quantize_onnx_models.parse_args(
            ["--model_path", str(tiny_run), "--output_dir", str(tiny_run), "--skip_segmentation"]))
    assert not (tiny_run / "clf_model.onnx").exists()


def test_long_legal_file_names_give_outputs_whose_names_fit(tmp_path, tiny_run, lesion_dataset):
    import os
    import shutil

    import face_segmentation
    import inference
    from utils.paths import NAME_MAX, fit_file_name

    a, b = "x" * 240 + "_a", "x" * 240 + "_b"
    assert fit_file_name("short", ".gradcam.jpg") == "short.gradcam.jpg"
    assert len({fit_file_name(a, ".gradcam.jpg"), fit_file_name(b, ".gradcam.jpg")}) == 2  # long names stay apart
    assert all(len(os.fsencode(fit_file_name(n, ".labels.png"))) <= NAME_MAX for n in (a, b, "한" * 84))

    photos = tmp_path / "photos"
    photos.mkdir()
    long_name = "가" * 60 + "_" + "y" * 60 + ".jpg"  # 241 bytes: legal, but not with a suffix added
    shutil.copy(next((lesion_dataset / "testset" / "benign").glob("*.jpg")), photos / long_name)
    inference.main(inference.parse_args(["--model_path", str(tiny_run), "--inference_folder", str(photos),
                                         "--inference_output", str(tmp_path / "out"), "--generate_gradcam",
                                         "--num_workers", "0"]))
    (overlay,) = (tmp_path / "out" / "gradcam").iterdir()
    assert overlay.name.endswith(".gradcam.jpg") and len(os.fsencode(overlay.name)) <= NAME_MAX
    face_segmentation.main(face_segmentation.parse_args(["--input", str(photos), "--output", str(tmp_path / "seg"),
                                                         "--seg_backend", "opencv"]))
    written = [p for p in (tmp_path / "seg").iterdir() if p.name.endswith((".labels.png", ".mask.png"))]
    assert len(written) == 2 and all(len(os.fsencode(p.name)) <= NAME_MAX for p in written)


@pytest.mark.slow
def test_file_names_that_are_not_utf8_survive_audit_training_inference_and_segmentation(tmp_path):
    import csv
    import json
    import os

    import audit_dataset
    import face_segmentation
    import inference
    import main
    from data.synthetic_lesions import generate_dataset
    from runs.run_folder import RunDir
    from tests.conftest import train_args

    data = generate_dataset(tmp_path / "d", n_train=12, n_test=6, img_size=48, seed=3)
    renamed = {}
    for split in ("trainset", "testset"):
        source = next((data / split / "benign").glob("*.jpg"))
        raw = os.fsencode(source.parent) + b"/" + "사진_한글.jpg".encode("cp949")  # a Korean Windows zip's name
        os.rename(os.fsencode(source), raw)
        renamed[split] = os.fsdecode(raw)
    audit_dataset.main(audit_dataset.parse_args(["--data_dir", str(data), "--output", str(tmp_path / "audit")]))
    json.loads((tmp_path / "audit" / "data_audit.json").read_text(encoding="utf-8"))

    result = main.main(main.parse_args(train_args(data, tmp_path / "runs", "--epochs", "1")))
    run = RunDir(result["run_dir"])
    assert renamed["testset"] in {str(s.path) for s in run.split("test")}  # the record reads back to the real file

    inference.main(inference.parse_args(["--model_path", str(run.root), "--inference_folder", str(data / "testset"),
                                         "--inference_output", str(tmp_path / "out"), "--labels_from_folders",
                                         "--generate_gradcam", "--num_workers", "0"]))
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as handle:
        names = [row["filename"] for row in csv.DictReader(handle)]
    assert any("\\udc" in name for name in names)  # escaped, readable as UTF-8
    entries = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))
    expected = os.path.relpath(renamed["testset"], data / "testset").replace(os.sep, "/")
    assert expected in {e["filename"] for e in entries}  # JSON gives the very same name back
    face_segmentation.main(face_segmentation.parse_args(["--input", str(data / "testset"), "--output",
                                                         str(tmp_path / "seg"), "--seg_backend", "opencv"]))
    assert (tmp_path / "seg" / "segmentation_summary.csv").is_file()
