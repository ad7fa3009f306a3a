"""quantize_onnx_models.py --targets ort: ORT-format files verified against the ONNX ones, the operator list for a
reduced ONNX Runtime build, and a manifest from which an app reproduces the run's answers without this code."""

import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

import benchmark
import inference
import quantize_onnx_models as qom
from configs import ExportOptions
from utils.errors import UserError

PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def manifest_input(path, pre):
    """The model input for one photo, from the manifest's words alone: what a Kotlin or Swift app would write."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    resize, crop = pre["resize"], pre["crop"]
    width, height = image.size
    if resize["mode"] == "shorter_side":
        short, long = sorted((width, height))
        scaled_long = int(resize["size"] * long / short)
        size = (resize["size"], scaled_long) if width <= height else (scaled_long, resize["size"])
    elif resize["mode"] == "both_sides":
        size = tuple(resize["size"])
    else:
        raise AssertionError(f"this test app knows no resize mode {resize['mode']}")
    image = image.resize(size, PIL_FILTERS[resize["interpolation"]])
    left = int(round((image.width - crop["width"]) / 2))
    top = int(round((image.height - crop["height"]) / 2))
    image = image.crop((left, top, left + crop["width"], top + crop["height"]))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mean, std = np.array(pre["normalize"]["mean"]), np.array(pre["normalize"]["std"])
    return ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def mobile_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mobile")
    report = qom.main(qom.parse_args(["--model_path", str(tiny_run), "--output_dir", str(out), "--targets",
                                      "onnx,ort", "--calib_images", "16"]))
    return out, report


@pytest.mark.slow
def test_ort_files_are_verified_and_list_their_operators(mobile_export):
    out, report = mobile_export
    for name in ("clf_model.ort", "clf_model_int8.ort", "required_operators.config", "mobile_manifest.json"):
        assert (out / name).is_file(), name
    assert report["ort_fp32_max_prob_diff"] <= 1e-4 and report["ort_int8_top1_agreement"] >= 0.99
    operators = (out / "required_operators.config").read_text()
    assert "Conv" in operators and "QuantizeLinear" in operators  # the INT8 model's operators are in the list
    manifest = json.loads((out / "mobile_manifest.json").read_text())
    for entry in manifest["models"].values():
        assert (out / entry["file"]).stat().st_size == entry["bytes"]
    assert not list(out.glob(".ort-*")), "the converter's working folder is left behind"


@pytest.mark.slow
def test_an_app_following_the_manifest_alone_gives_the_runs_answers(mobile_export, tiny_run, lesion_dataset,
                                                                    tmp_path):
    out, _ = mobile_export
    manifest = json.loads((out / "mobile_manifest.json").read_text())
    photos = sorted((lesion_dataset / "testset").glob("*/*.jpg"))[:12]
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:  # a portrait crop too: the resize rule must hold for both orientations
        Image.open(photo).crop((0, 0, 48, 64)).save(folder / f"tall_{photo.name}")
    photos += sorted(folder.glob("*.jpg"))
    session = ort.InferenceSession(str(out / manifest["models"]["fp32"]["file"]), providers=["CPUExecutionProvider"])
    post = manifest["postprocessing"]
    app = {}
    for photo in photos:
        x = manifest_input(photo, manifest["preprocessing"])
        logits = session.run([manifest["output"]["name"]], {manifest["input"]["name"]: x})[0]
        if post["tta"]["enabled"]:
            logits = (logits + session.run(None, {manifest["input"]["name"]: x[..., ::-1].copy()})[0]) / 2
        z = logits[0] / post["temperature"]
        app[photo.name] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    for source in (lesion_dataset / "testset", folder):
        inference.main(inference.parse_args([
            "--model_path", str(tiny_run), "--inference_folder", str(source), "--inference_output",
            str(tmp_path / "out" / source.name), "--backend", "onnx", "--onnx_model", str(out / "clf_model.ort"),
            "--num_workers", "0"]))
    classes = manifest["output"]["classes"]
    compared = 0
    for source in (lesion_dataset / "testset", folder):
        with open(tmp_path / "out" / source.name / "predictions.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                name = row["filename"].split("/")[-1]
                if name in app:
                    suite = np.array([float(row[f"prob_{c}"]) for c in classes])
                    assert np.abs(suite - app[name]).max() < 1e-4, (name, suite, app[name])
                    compared += 1
    assert compared == len(photos)


def test_unknown_export_targets_are_refused_before_anything_runs():
    with pytest.raises(UserError, match="--targets"):
        ExportOptions(targets="onnx,apk")
    assert ExportOptions(targets="onnx, ort").target_list == ("onnx", "ort")


@pytest.mark.slow
def test_the_manifest_says_what_class_info_says(mobile_export, tiny_run):
    out, _ = mobile_export
    manifest = json.loads((out / "mobile_manifest.json").read_text())
    info = json.loads((tiny_run / "class_info.json").read_text())
    pre = info["preprocessing"]
    assert manifest["output"]["classes"] == info["class_names"]
    assert manifest["postprocessing"]["temperature"] == info["temperature"]
    assert manifest["postprocessing"]["tta"]["enabled"] == info["tta"]
    assert manifest["postprocessing"]["operating_points"] == info.get("operating_points", [])
    assert manifest["preprocessing"]["normalize"]["mean"] == pre["mean"]
    assert manifest["preprocessing"]["normalize"]["std"] == pre["std"]
    assert manifest["input"]["shape"] == [1, *pre["input_size"]]
    assert manifest["source_run"] == str(tiny_run)


@pytest.mark.slow
def test_benchmark_times_the_ort_files_beside_the_onnx_ones(mobile_export, tiny_run):
    out, _ = mobile_export
    rows = benchmark.main(benchmark.parse_args([
        "--model_path", str(tiny_run), "--onnx_model_dir", str(out), "--iterations", "2", "--warmup", "1",
        "--batch_sizes", "1", "--threads", "1", "--rounds", "1"]))
    by_name = {row["framework"]: row for row in rows}
    assert {"pytorch", "onnx_fp32", "onnx_int8", "ort_fp32", "ort_int8"} <= set(by_name)
    assert by_name["ort_fp32"]["test_accuracy"] == by_name["onnx_fp32"]["test_accuracy"]
    assert by_name["ort_int8"]["test_accuracy"] == by_name["onnx_int8"]["test_accuracy"]


@pytest.mark.slow
def test_an_ort_file_that_answers_differently_is_refused_and_removed(tiny_run, tmp_path, monkeypatch):
    from deploy import mobile
    from prediction import predictors

    real = predictors.onnx_probs

    def perturbed(path, images, n_class, batch_size=32):  # a runtime that answers differently for .ort files
        probs = real(path, images, n_class, batch_size)
        return probs[:, ::-1].copy() if str(path).endswith(".ort") else probs

    monkeypatch.setattr(predictors, "onnx_probs", perturbed)
    out = tmp_path / "mobile"
    with pytest.raises(UserError, match="does not reproduce clf_model.onnx.*no .ort file was written"):
        qom.main(qom.parse_args(["--model_path", str(tiny_run), "--output_dir", str(out), "--targets", "onnx,ort",
                                 "--quantize", "none"]))
    assert not list(out.glob("*.ort")) and not (out / "mobile_manifest.json").exists()
    assert not (out / "required_operators.config").exists() and not list(out.glob(".ort-*"))
    assert mobile.ORT_PROB_TOLERANCE <= 1e-4


@pytest.mark.slow
def test_inference_backend_ort_scores_a_labelled_folder_with_the_phone_model(mobile_export, tiny_run, lesion_dataset,
                                                                             tmp_path):
    out, report = mobile_export
    summary = inference.main(inference.parse_args([
        "--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset"), "--inference_output",
        str(tmp_path / "scored"), "--backend", "ort", "--model_file", str(out / "clf_model_int8.ort"),
        "--labels_from_folders", "--num_workers", "0"]))
    same_model = inference.main(inference.parse_args([
        "--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset"), "--inference_output",
        str(tmp_path / "onnx"), "--backend", "onnx", "--onnx_model", str(out / "clf_model_int8.onnx"),
        "--labels_from_folders", "--num_workers", "0"]))
    assert summary["predicted"] == 48 and summary["metrics"]["accuracy"] == same_model["metrics"]["accuracy"]
    phone, desktop = ({row["filename"]: row for row in csv.DictReader(open(tmp_path / name / "predictions.csv"))}
                      for name in ("scored", "onnx"))
    columns = [c for c in next(iter(phone.values())) if c.startswith("prob_")]
    # The same INT8 model: the ARM-optimised graph may round a little differently, never by a class.
    assert all(phone[f]["predicted_label"] == desktop[f]["predicted_label"] for f in phone)
    assert max(abs(float(phone[f][c]) - float(desktop[f][c])) for f in phone for c in columns) <= 5e-2
    assert report["ort_int8_top1_agreement"] >= 0.99
    with pytest.raises(UserError, match="--backend ort runs an ORT-format file"):
        inference.main(inference.parse_args([
            "--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset"),
            "--inference_output", str(tmp_path / "wrong"), "--backend", "ort", "--model_file",
            str(out / "clf_model_int8.onnx"), "--num_workers", "0"]))


# --- ExecuTorch (.pte, XNNPACK) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pte_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pte")
    # --min_agreement 0: the tiny GroupNorm model loses answers in INT8; the guard itself is tested below
    report = qom.main(qom.parse_args(["--model_path", str(tiny_run), "--output_dir", str(out), "--targets",
                                      "onnx,executorch", "--calib_images", "16", "--min_agreement", "0"]))
    return out, report


@pytest.mark.slow
def test_executorch_programs_are_verified_and_named_in_the_manifest(pte_export, tiny_run):
    out, report = pte_export
    assert report["pte_fp32_max_prob_diff"] <= 1e-4 and report["pte_fp32_accuracy"] == report["torch_accuracy"]
    assert report["pte_int8_written"] and 0 <= report["pte_int8_top1_agreement"] <= 1
    manifest = json.loads((out / "mobile_manifest.json").read_text())
    assert manifest["runtime"] == "ExecuTorch (XNNPACK delegate)" and manifest["models"] == {}
    for precision, name in (("fp32", "clf_model.pte"), ("int8", "clf_model_int8.pte")):
        entry = manifest["executorch_models"][precision]
        assert entry["file"] == name and (out / name).stat().st_size == entry["bytes"]
    assert (out / "clf_model_int8.pte").stat().st_size < (out / "clf_model.pte").stat().st_size
    assert manifest["output"]["classes"] == json.loads((tiny_run / "class_info.json").read_text())["class_names"]
    assert not list(out.glob(".pte-*")) and not list(out.glob("*.ort"))


@pytest.mark.slow
def test_inference_backend_executorch_answers_as_pytorch(pte_export, tiny_run, lesion_dataset, tmp_path):
    out, _ = pte_export
    scored = {}
    for backend, extra in (("executorch", ["--model_file", str(out / "clf_model.pte")]), ("torch", [])):
        summary = inference.main(inference.parse_args([
            "--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset"),
            "--inference_output", str(tmp_path / backend), "--backend", backend, *extra, "--labels_from_folders",
            "--num_workers", "0"]))
        assert summary["predicted"] == 48
        scored[backend] = {row["filename"]: row for row in csv.DictReader(open(tmp_path / backend / "predictions.csv"))}
    columns = [c for c in next(iter(scored["torch"].values())) if c.startswith("prob_")]
    assert max(abs(float(scored["executorch"][f][c]) - float(row[c]))
               for f, row in scored["torch"].items() for c in columns) <= 1e-4
    with pytest.raises(UserError, match="--backend executorch runs an ExecuTorch program"):
        inference.main(inference.parse_args([
            "--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset"),
            "--inference_output", str(tmp_path / "wrong"), "--backend", "executorch", "--model_file",
            str(out / "clf_model.onnx"), "--num_workers", "0"]))


@pytest.mark.slow
def test_benchmark_times_the_executorch_programs(pte_export, tiny_run):
    out, _ = pte_export
    rows = benchmark.main(benchmark.parse_args([
        "--model_path", str(tiny_run), "--onnx_model_dir", str(out), "--iterations", "2", "--warmup", "1",
        "--batch_sizes", "1", "--threads", "1", "--rounds", "1"]))
    by_name = {row["framework"]: row for row in rows}
    assert {"pytorch", "onnx_fp32", "onnx_int8", "executorch_fp32", "executorch_int8"} <= set(by_name)
    assert by_name["executorch_fp32"]["top1_agreement_with_pytorch"] == 1.0
    assert by_name["executorch_int8"]["size_mb"] < by_name["executorch_fp32"]["size_mb"]


@pytest.mark.slow
def test_an_executorch_program_that_answers_differently_is_refused(tiny_run, tmp_path, monkeypatch, caplog):
    from prediction import predictors

    real = predictors.ExecuTorchPredictor.logits
    monkeypatch.setattr(predictors.ExecuTorchPredictor, "logits", lambda self, images: real(self, images)[:, ::-1])
    out = tmp_path / "refused"
    with pytest.raises(UserError, match="clf_model.pte disagrees with PyTorch.*no .pte file was written"):
        qom.main(qom.parse_args(["--model_path", str(tiny_run), "--output_dir", str(out), "--targets",
                                 "onnx,executorch", "--quantize", "none"]))
    assert not list(out.glob("*.pte")) and not list(out.glob(".pte-*"))
    monkeypatch.undo()
    # INT8 below --min_agreement: more leading stages stay FP32 until it holds, else the file is not written
    report = qom.main(qom.parse_args(["--model_path", str(tiny_run), "--output_dir", str(tmp_path / "strict"),
                                      "--targets", "onnx,executorch", "--calib_images", "4", "--min_agreement", "1",
                                      "--calib_sampling", "random"]))
    if report["pte_int8_written"]:
        assert report["pte_int8_check_agreement"] == 1.0
    else:
        assert not (tmp_path / "strict" / "clf_model_int8.pte").exists()
        assert "clf_model_int8.pte not written" in caplog.text and report["pte_int8_float_stages"] >= 1
    assert (tmp_path / "strict" / "clf_model.pte").is_file()


def test_leading_stages_are_the_modules_before_and_in_a_stage_without_their_containers():
    import timm

    from deploy.executorch_export import leading_modules

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    stages = [level["module"] for level in model.feature_info]
    kept = leading_modules(model, stages[1])
    assert stages[:2] == ["blocks.0", "blocks.1"] and kept[:2] == ["conv_stem", "bn1"]
    assert "blocks.0" in kept and "blocks.1" in kept and "blocks" not in kept and "blocks.2" not in kept
    assert not any(name.startswith(("blocks.2", "conv_head", "classifier")) for name in kept)


@pytest.mark.slow
def test_a_pte_from_another_run_is_named_by_its_manifest(pte_export, tiny_run, lesion_dataset, tmp_path, caplog):
    import shutil

    out, _ = pte_export
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(out / "clf_model.pte", elsewhere / "clf_model.pte")
    manifest = json.loads((out / "mobile_manifest.json").read_text())
    (elsewhere / "mobile_manifest.json").write_text(json.dumps({**manifest, "source_run": str(tmp_path / "other")}))
    inference.main(inference.parse_args([
        "--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset" / "benign"),
        "--inference_output", str(tmp_path / "scored"), "--backend", "executorch", "--model_file",
        str(elsewhere / "clf_model.pte"), "--num_workers", "0"]))
    assert "was exported from" in caplog.text and str(tmp_path / "other") in caplog.text
    caplog.clear()
    inference.main(inference.parse_args([
        "--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset" / "benign"),
        "--inference_output", str(tmp_path / "own"), "--backend", "executorch", "--model_file",
        str(out / "clf_model.pte"), "--num_workers", "0"]))
    assert "was exported from" not in caplog.text  # its own manifest names this run
