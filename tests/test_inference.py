"""inference.py: outputs a user opens in Excel or code, bad input, backends, and the run-folder contract."""

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from dataloaders.image_io import load_rgb
from dataloaders.transforms import build_eval_transform
from deploy.onnx_export import export_fp32
from runs.checkpoint import load_run_model
from tests.conftest import ROOT
from utils.errors import UserError
from utils.onnx_runtime import write_onnx_metadata

pytestmark = pytest.mark.slow  # every test here needs the trained tiny run


def run(run_dir, folder, output, *extra):
    argv = ["--model_path", str(run_dir), "--inference_folder", str(folder), "--inference_output", str(output),
            "--num_workers", "0", "--batch_size", "4", *extra]
    return inference.main(inference.parse_args(argv))


@pytest.fixture(scope="module")
def photo_folder(lesion_dataset, tmp_path_factory):
    """Good images in nested folders (two share a name), one non-square, and three files that are not images."""
    folder = tmp_path_factory.mktemp("photos")
    test = lesion_dataset / "testset"
    (folder / "clinic_a").mkdir()
    (folder / "clinic_b" / "deeper").mkdir(parents=True)
    shutil.copy(test / "benign" / "benign_0000.jpg", folder / "clinic_a" / "img1.jpg")
    shutil.copy(test / "malignant" / "malignant_0000.jpg", folder / "clinic_b" / "img1.jpg")
    shutil.copy(test / "normal" / "normal_0001.jpg", folder / "clinic_b" / "deeper" / "skin.JPG")
    Image.open(test / "malignant" / "malignant_0003.jpg").resize((120, 70)).save(folder / "wide.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    data = (test / "benign" / "benign_0002.jpg").read_bytes()
    (folder / "clinic_a" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return folder


@pytest.fixture(scope="module")
def outputs(tiny_run, photo_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("out")
    summary = run(tiny_run, photo_folder, output, "--generate_gradcam", "--topk", "2")
    return output, summary


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_csv_header_rows_and_probabilities(outputs, tiny_run):
    output, summary = outputs
    class_names = json.loads((tiny_run / "class_info.json").read_text())["class_names"]
    with open(output / "predictions.csv", newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == ["filename", "predicted_class", "predicted_label", "confidence"] + \
        [f"prob_{name}" for name in class_names]
    rows = read_csv(output / "predictions.csv")
    assert sorted(r["filename"] for r in rows) == ["clinic_a/img1.jpg", "clinic_b/deeper/skin.JPG",
                                                   "clinic_b/img1.jpg", "wide.png"]
    for row in rows:
        probs = np.array([float(row[f"prob_{n}"]) for n in class_names])
        assert abs(probs.sum() - 1) < 1e-4
        assert int(row["predicted_class"]) == int(probs.argmax())
        assert row["predicted_label"] == class_names[int(row["predicted_class"])]
        assert abs(float(row["confidence"]) - probs.max()) < 1e-6
    assert summary["predicted"] == 4 and summary["skipped"] == 3 and summary["images_found"] == 7


def test_skipped_files_are_listed_with_reasons(outputs):
    output, summary = outputs
    skipped = {r["filename"]: r["reason"] for r in read_csv(output / "skipped.csv")}
    assert set(skipped) == {"empty.jpg", "notes.png", "clinic_a/truncated.jpg"}
    assert skipped["empty.jpg"] == "empty file"
    assert all(reason for reason in skipped.values())
    assert len(read_csv(output / "predictions.csv")) + len(skipped) == summary["images_found"]


def test_json_schema(outputs, tiny_run):
    output, _ = outputs
    class_names = json.loads((tiny_run / "class_info.json").read_text())["class_names"]
    entries = json.loads((output / "predictions.json").read_text())
    assert isinstance(entries, list) and len(entries) == 7
    done = [e for e in entries if not e["skipped"]]
    skipped = [e for e in entries if e["skipped"]]
    assert len(done) == 4 and len(skipped) == 3
    for entry in done:
        assert {"filename", "predicted_class", "predicted_label", "confidence", "probabilities", "topk"} <= set(entry)
        assert list(entry["probabilities"]) == class_names
        assert abs(sum(entry["probabilities"].values()) - 1) < 1e-4
        assert entry["topk"][0]["label"] == entry["predicted_label"] and len(entry["topk"]) == 2
    assert all(e["reason"] and e["predicted_class"] is None for e in skipped)


def test_predictions_match_the_model_run_directly(outputs, tiny_run, photo_folder):
    """The probabilities are the model's, scaled by the temperature the run fitted on its validation split, with the
    flip test-time augmentation the run was tested with (main.py's default)."""
    output, _ = outputs
    model, info = load_run_model(tiny_run)
    assert info.temperature > 0 and info.tta is True
    transform = build_eval_transform(info.preprocessing)
    rows = {r["filename"]: r for r in read_csv(output / "predictions.csv")}
    with torch.inference_mode():
        for name, row in rows.items():
            x = transform(load_rgb(photo_folder / name)).unsqueeze(0)
            logits = (model(x) + model(torch.flip(x, dims=[3]))) / 2
            probs = (logits / info.temperature).softmax(1)[0].numpy()
            expected = [float(row[f"prob_{n}"]) for n in info.class_names]
            assert np.allclose(probs, expected, atol=1e-5), name


def test_gradcam_overlays_mirror_input_paths_and_keep_aspect_ratio(outputs, photo_folder):
    output, _ = outputs
    overlays = sorted(p.relative_to(output / "gradcam").as_posix() for p in (output / "gradcam").rglob("*.jpg"))
    assert overlays == ["clinic_a/img1.jpg.gradcam.jpg", "clinic_b/deeper/skin.JPG.gradcam.jpg",
                        "clinic_b/img1.jpg.gradcam.jpg", "wide.png.gradcam.jpg"]
    assert Image.open(output / "gradcam" / "wide.png.gradcam.jpg").size == (120, 70)
    assert not (output / ".gradcam.partial").exists()


def test_single_image_file(tiny_run, photo_folder, tmp_path):
    summary = run(tiny_run, photo_folder / "wide.png", tmp_path / "one")
    rows = read_csv(tmp_path / "one" / "predictions.csv")
    assert summary["predicted"] == 1 and [r["filename"] for r in rows] == ["wide.png"]


def test_rerun_replaces_previous_outputs(tiny_run, photo_folder, tmp_path):
    out = tmp_path / "out"
    run(tiny_run, photo_folder, out, "--generate_gradcam")
    run(tiny_run, photo_folder / "clinic_a", out, "--generate_gradcam")
    assert [r["filename"] for r in read_csv(out / "predictions.csv")] == ["img1.jpg"]
    assert [p.name for p in (out / "gradcam").rglob("*.jpg")] == ["img1.jpg.gradcam.jpg"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_tta_averages_the_logits_of_the_image_and_its_mirror_and_can_be_turned_off(tiny_run, photo_folder,
                                                                                   tmp_path):
    model, info = load_run_model(tiny_run)
    x = build_eval_transform(info.preprocessing)(load_rgb(photo_folder / "wide.png")).unsqueeze(0)
    t = info.temperature
    with torch.inference_mode():
        with_tta = ((model(x) + model(torch.flip(x, dims=[3]))) / 2 / t).softmax(1)[0].numpy()
        without = (model(x) / t).softmax(1)[0].numpy()
    for flag, expected in (("True", with_tta), ("False", without)):
        run(tiny_run, photo_folder / "wide.png", tmp_path / flag, "--tta", flag)
        row = read_csv(tmp_path / flag / "predictions.csv")[0]
        assert np.allclose([float(row[f"prob_{n}"]) for n in info.class_names], expected, atol=1e-5)


def test_onnx_backend_agrees_with_torch(outputs, tiny_run, photo_folder, tmp_path):
    model, info = load_run_model(tiny_run)
    onnx_path = tmp_path / "clf_model.onnx"
    torch.onnx.export(model, (torch.randn(2, *info.preprocessing.input_size),), str(onnx_path), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    run(tiny_run, photo_folder, tmp_path / "onnx", "--backend", "onnx", "--onnx_model", str(onnx_path))
    torch_rows = {r["filename"]: r for r in read_csv(outputs[0] / "predictions.csv")}
    onnx_rows = {r["filename"]: r for r in read_csv(tmp_path / "onnx" / "predictions.csv")}
    assert onnx_rows.keys() == torch_rows.keys()
    for name, row in onnx_rows.items():
        assert row["predicted_class"] == torch_rows[name]["predicted_class"]
        for label in info.class_names:
            assert abs(float(row[f"prob_{label}"]) - float(torch_rows[name][f"prob_{label}"])) < 1e-4



def test_onnx_backend_warns_when_the_file_came_from_another_run(tiny_run, photo_folder, tmp_path, caplog):
    model, info = load_run_model(tiny_run)
    onnx_path = tmp_path / "other.onnx"
    export_fp32(model, list(info.preprocessing.input_size), onnx_path, 17)
    write_onnx_metadata(onnx_path, info.onnx_metadata(tmp_path / "another_run", "fp32"))
    with caplog.at_level(logging.WARNING):
        run(tiny_run, photo_folder, tmp_path / "o", "--backend", "onnx", "--onnx_model", str(onnx_path))
    assert "was exported from" in caplog.text and "another_run" in caplog.text
    caplog.clear()
    write_onnx_metadata(onnx_path, info.onnx_metadata(tiny_run, "fp32"))
    with caplog.at_level(logging.WARNING):
        run(tiny_run, photo_folder, tmp_path / "o", "--backend", "onnx", "--onnx_model", str(onnx_path))
    assert "was exported from" not in caplog.text

def test_an_onnx_file_of_another_input_size_is_refused_in_one_line(tiny_run, photo_folder, tmp_path, caplog):
    model, info = load_run_model(tiny_run)
    onnx_path = tmp_path / "bigger.onnx"
    channels, height, width = info.preprocessing.input_size
    export_fp32(model, [channels, height + 32, width + 32], onnx_path, 17)
    write_onnx_metadata(onnx_path, info.onnx_metadata(tmp_path / "another_run", "fp32"))
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match=f"takes 3x{height + 32}x{width + 32} "
                                                                          f"inputs but .* makes 3x{height}x{width}"):
        run(tiny_run, photo_folder, tmp_path / "o", "--backend", "onnx", "--onnx_model", str(onnx_path))
    assert "another_run" in caplog.text  # the provenance warning comes first and explains it


def test_onnx_backend_without_a_model_file_says_how_to_get_one(tiny_run, photo_folder, tmp_path):
    with pytest.raises(UserError, match="quantize_onnx_models.py"):
        run(tiny_run, photo_folder, tmp_path / "o", "--backend", "onnx", "--onnx_model", str(tmp_path / "no.onnx"))


def test_broken_run_folders_are_one_line_errors(tiny_run, photo_folder, tmp_path):
    no_info = tmp_path / "no_info"
    shutil.copytree(tiny_run, no_info)
    (no_info / "class_info.json").unlink()
    with pytest.raises(UserError, match="class_info.json is missing"):
        run(no_info, photo_folder, tmp_path / "o")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_run, no_weights)
    (no_weights / "model_best.pth").unlink()
    with pytest.raises(UserError, match="model_best.pth is missing"):
        run(no_weights, photo_folder, tmp_path / "o")

    wrong = tmp_path / "wrong_arch"
    shutil.copytree(tiny_run, wrong)
    info = json.loads((wrong / "class_info.json").read_text())
    info["class_names"] += ["extra_a", "extra_b"]  # the run says 5 classes; its weights have 3
    (wrong / "class_info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="does not fit"):
        run(wrong, photo_folder, tmp_path / "o")


def test_empty_inference_folder(tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        run(tiny_run, tmp_path / "empty", tmp_path / "o")


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "inference.py", "--model_path", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_torch_predictor_runs_channels_last_with_the_same_answers(tiny_run):
    """The torch backend switches the model to NHWC on CPU for speed; its logits must be the NCHW model's."""
    import copy

    from prediction.predictors import TorchPredictor

    model, _ = load_run_model(tiny_run)
    reference = copy.deepcopy(model).eval()
    predictor = TorchPredictor(model, torch.device("cpu"))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = reference(images).numpy()
    np.testing.assert_allclose(predictor.logits(images), expected, atol=1e-4, rtol=1e-4)


def _checksums(folder):
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["input", "inside_input", "run", "inside_run"])
def test_outputs_never_land_in_the_input_folder_or_a_run_folder(tiny_run, photo_folder, tmp_path, where):
    photos = tmp_path / "photos"
    shutil.copytree(photo_folder, photos)
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    output = {"input": photos, "inside_input": photos / "results", "run": run_dir,
              "inside_run": run_dir / "inference"}[where]
    before = _checksums(tmp_path)
    with pytest.raises(UserError, match="--inference_output .* (is|lies inside)"):
        run(run_dir, photos, output, "--generate_gradcam", "--labels_from_folders")
    assert _checksums(tmp_path) == before  # nothing written, nothing changed


def test_a_gradcam_folder_the_suite_did_not_write_is_never_replaced(tiny_run, photo_folder, tmp_path):
    output = tmp_path / "results"
    (output / "gradcam").mkdir(parents=True)
    (output / "gradcam" / "my_notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="gradcam holds files this program did not write"):
        run(tiny_run, photo_folder, output, "--generate_gradcam")
    assert (output / "gradcam" / "my_notes.txt").read_text() == "keep me"
    run(tiny_run, photo_folder, tmp_path / "fresh", "--generate_gradcam")
    run(tiny_run, photo_folder, tmp_path / "fresh", "--generate_gradcam")  # its own overlays are replaced freely
    assert all(p.name.endswith(".gradcam.jpg") for p in (tmp_path / "fresh" / "gradcam").rglob("*") if p.is_file())


def test_a_folder_labelled_like_the_run_gets_a_hint_to_score_it(tiny_run, lesion_dataset, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run(tiny_run, lesion_dataset / "testset", tmp_path / "o")
    assert "add --labels_from_folders" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(tiny_run, lesion_dataset / "testset", tmp_path / "o2", "--labels_from_folders")
    assert "add --labels_from_folders" not in caplog.text


def test_model_path_latest_finds_the_run_main_py_just_wrote(tiny_run, photo_folder, tmp_path, monkeypatch):
    # The README's walk-through pastes --model_path latest after training with the default --save_dir save_results.
    (tmp_path / "save_results").symlink_to(tiny_run.parents[2], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    summary = run("latest", photo_folder, tmp_path / "o")
    assert Path(summary["run_dir"]).resolve() == tiny_run.resolve()
