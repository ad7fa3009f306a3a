"""quantize_onnx_models.py: verified FP32 export, INT8 that keeps its answers, metadata, and clear errors."""

import json
import logging
import shutil

import numpy as np
import pytest

import inference
import quantize_onnx_models as qom
from deploy import onnx_export, onnx_quant
from utils.errors import UserError
from utils.onnx_runtime import read_onnx_metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("onnx")
    report = qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run), "--output_dir", str(output),
                                                        "--calib_images", "48"]))
    return output, report


def test_export_writes_verified_self_describing_models(exported, tiny_run):
    output, report = exported
    assert (output / "clf_model.onnx").is_file() and (output / "clf_model_int8.onnx").is_file()
    assert not [p for p in output.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert not list(output.glob("*.onnx.data")), "weights must live inside the .onnx file"
    info = json.loads((tiny_run / "class_info.json").read_text())
    assert json.loads((output / "class_info.json").read_text()) == info
    for name, precision in (("clf_model.onnx", "fp32"), ("clf_model_int8.onnx", "int8")):
        meta = read_onnx_metadata(output / name)
        assert json.loads(meta["class_names"]) == info["class_names"]
        assert json.loads(meta["mean"]) == info["preprocessing"]["mean"]
        assert json.loads(meta["std"]) == info["preprocessing"]["std"]
        assert json.loads(meta["input_size"]) == info["preprocessing"]["input_size"]
        assert meta["source_run"] == str(tiny_run) and meta["precision"] == precision
        assert float(meta["temperature"]) == info["temperature"] and meta["tta"] == "true"
    assert report["fp32_max_prob_diff"] <= onnx_export.FP32_PROB_TOLERANCE
    assert report["fp32_accuracy"] == report["torch_accuracy"]
    assert report["verify_images"] == 48  # the whole synthetic test split


def test_int8_model_is_smaller_and_keeps_top1(exported):
    output, report = exported
    assert (output / "clf_model_int8.onnx").stat().st_size < (output / "clf_model.onnx").stat().st_size
    assert report["int8_top1_agreement"] >= 0.9
    assert report["fp32_batch1_ms"] > 0 and report["int8_batch1_ms"] > 0  # the slower-INT8 warning has its numbers


def _quantized_convs(path):
    """Conv node name -> whether its weight comes through a DequantizeLinear (i.e. runs in INT8)."""
    import onnx

    graph = onnx.load(str(path)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return {node.name: node.input[1] in dequantized for node in graph.node if node.op_type == "Conv"}


def test_gated_model_starts_with_its_stride_8_stages_in_float(exported):
    output, report = exported
    # test_efficientnet has SiLU activations and feature levels blocks.0-4 at strides 2, 4, 8, 16, 32.
    assert report["gated_activations"] > 0
    assert report["float_selection"] == "prefix" and report["agreement_attempts"][0]["float_stages"] == 3
    stages = report["int8_float_stages"]
    assert stages >= 3 and report["int8_float_until"] == f"blocks.{stages - 1}"
    meta = read_onnx_metadata(output / "clf_model_int8.onnx")
    assert meta["float_stages"] == str(stages) and meta["float_nodes"] == str(report["int8_float_nodes"])
    convs = _quantized_convs(output / "clf_model_int8.onnx")
    float_prefixes = ("/conv_stem/",) + tuple(f"/blocks/blocks.{i}/" for i in range(stages))
    early = [q for name, q in convs.items() if name.startswith(float_prefixes)]
    late = [q for name, q in convs.items() if not name.startswith(float_prefixes)]
    assert early and not any(early)
    assert late and all(late)  # conv_head at least


def test_the_sensitivity_search_runs_through_the_script(tiny_run, tmp_path):
    report = qom.main(qom.get_args_parser().parse_args([
        "--skip_segmentation", "--model_path", str(tiny_run), "--output_dir", str(tmp_path), "--calib_images", "16",
        "--float_selection", "sensitivity", "--min_agreement", "1.0"]))
    assert report["float_selection"] == "sensitivity" and report["int8_float_stages"] == 3  # auto start kept
    assert report["agreement_attempts"][0]["float_units"] == []
    # a run without a refit is checked on its own validation answers (a refit run: tests/test_recipe.py)
    assert "int8_chosen_on" not in report and "seen_val_top1_agreement" not in report
    if report["agreement_attempts"][0]["val_top1_agreement"] < 1.0:  # the search ran: every block was measured
        assert report["sensitivity"] and all("kl_reduction" in entry for entry in report["sensitivity"])
    meta = read_onnx_metadata(tmp_path / "clf_model_int8.onnx")
    assert meta["float_units"] == ",".join(report["int8_float_units"])


def test_agreement_guard_adds_float_stages_until_int8_gives_fp32_answers(tiny_run, tmp_path, monkeypatch):
    # Scripted agreements: the guard must stop at the first attempt that reaches --min_agreement.
    real = onnx_quant.agreement_and_divergence
    measured = []

    def scripted(*args):
        measured.append(real(*args)[0])  # the real comparison still runs on the model
        return [0.90, 0.95, 0.995, 1.0][len(measured) - 1], 0.1

    monkeypatch.setattr(onnx_quant, "agreement_and_divergence", scripted)
    report = qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run),
                                                        "--output_dir", str(tmp_path), "--calib_images", "16",
                                                        "--keep_float_stages", "0", "--min_agreement", "0.99",
                                                        "--float_selection", "prefix"]))
    attempts = report["agreement_attempts"]
    assert [a["float_stages"] for a in attempts] == [0, 1, 2]
    assert [a["val_top1_agreement"] for a in attempts] == [0.90, 0.95, 0.995]
    assert report["int8_float_stages"] == 2
    assert read_onnx_metadata(tmp_path / "clf_model_int8.onnx")["float_stages"] == "2"
    assert all(0.0 <= m <= 1.0 for m in measured)


def test_check_views_multiply_the_images_the_guard_scores(tiny_run, tmp_path, monkeypatch):
    # --check_views 3: every validation image is scored as itself, mirrored and shifted, so the guard and the search
    # count three times the near ties; switched off, the scored count would be the split's size.
    from runs.run_folder import RunDir

    scored = []
    real = onnx_quant.agreement_and_divergence

    def counting(path, images, reference_probs):
        scored.append(len(images))
        return real(path, images, reference_probs)

    monkeypatch.setattr(onnx_quant, "agreement_and_divergence", counting)
    report = qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run),
                                                        "--output_dir", str(tmp_path), "--calib_images", "16",
                                                        "--keep_float_stages", "0", "--min_agreement", "0.5",
                                                        "--check_views", "3"]))
    n_val = len(RunDir(tiny_run).split("val"))
    assert n_val > 0 and report["check_views"] == 3
    assert report["check_images"] == 3 * n_val and scored and set(scored) == {3 * n_val}


def test_agreement_guard_keeps_the_best_attempt_when_none_passes(tiny_run, tmp_path, monkeypatch):
    # Scripted agreements, so the "none passed" path runs whatever the tiny model's real numbers are.
    # The last is the written file measured again.
    scripted = iter([0.90, 0.97, 0.95, 0.96, 0.93, 0.97, 0.97])
    monkeypatch.setattr(onnx_quant, "agreement_and_divergence", lambda *_: (next(scripted), 0.1))
    report = qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run),
                                                        "--output_dir", str(tmp_path), "--calib_images", "16",
                                                        "--keep_float_stages", "0", "--min_agreement", "0.99",
                                                        "--float_selection", "prefix"]))
    assert [a["float_stages"] for a in report["agreement_attempts"]] == [0, 1, 2, 3, 4, 5]
    assert report["int8_float_stages"] == 1 and report["int8_float_until"] == "blocks.0"  # first of the two 0.97s
    assert report["val_top1_agreement"] == 0.97 and next(scripted, None) is None
    assert read_onnx_metadata(tmp_path / "clf_model_int8.onnx")["float_stages"] == "1"
    convs = _quantized_convs(tmp_path / "clf_model_int8.onnx")
    assert not any(q for name, q in convs.items() if name.startswith(("/conv_stem/", "/blocks/blocks.0/")))
    assert all(q for name, q in convs.items() if name.startswith("/blocks/blocks.1/"))


def test_int8_file_that_stays_mostly_float_says_so_and_names_the_all_int8_agreement(tiny_run, tmp_path,
                                                                                     monkeypatch, caplog):
    # A model with many close calls (seen on 8-class ISIC): only every stage in FP32 reaches the agreement asked for.
    scripted = iter([0.90, 0.92, 0.93, 0.94, 0.95, 0.995, 0.995])  # the last: the written file measured again
    monkeypatch.setattr(onnx_quant, "agreement_and_divergence", lambda *_: (next(scripted), 0.1))
    with caplog.at_level(logging.WARNING):
        report = qom.main(qom.get_args_parser().parse_args([
            "--skip_segmentation", "--model_path", str(tiny_run), "--output_dir", str(tmp_path), "--calib_images",
            "16", "--keep_float_stages", "0", "--min_agreement", "0.99",
                                                        "--float_selection", "prefix"]))
    assert report["int8_float_stages"] == 5 and report["int8_size_ratio"] > onnx_export.INT8_SIZE_RATIO_WARNING
    warning = next(r.getMessage() for r in caplog.records if "of the FP32 file" in r.getMessage())
    assert f"{100 * report['int8_size_ratio']:.0f}% of the FP32 file" in warning
    assert "first 5 of 5 stages" in warning and "with 0 float nodes INT8 gave FP32's answer on 0.9000" in warning


def _scripted_tuning_checks(monkeypatch) -> list[tuple[float, float]]:
    """The tuning's simulated-INT8 check before tuning and after each of 3 passes answers (agreement, KL) from a
    script in which pass 2 is best, so the tuned path runs whatever the tiny model's numbers are (39 check images:
    one photo moves the agreement by 0.026, and the tiny run's training differs with the CPU and the thread count).
    The real check still runs on the model; its results are returned for the test to look at."""
    from deploy import qat

    real, measured = qat._simulated_check, []
    scripted = iter([(0.90, 0.020), (0.92, 0.015), (0.95, 0.010), (0.93, 0.012)])

    def check(student, images, fp32_log_probs):
        measured.append(real(student, images, fp32_log_probs))
        return next(scripted)

    monkeypatch.setattr(qat, "_simulated_check", check)
    return measured


def test_quantization_aware_tuning_runs_when_too_much_stays_float_and_its_file_passes_the_same_guard(tiny_run,
                                                                                                    tmp_path,
                                                                                                    monkeypatch):
    measured = _scripted_tuning_checks(monkeypatch)
    # The tiny SiLU model starts with three stages in FP32, over --max_float_share 0: tuning must run.
    report = qom.main(qom.get_args_parser().parse_args([
        "--skip_segmentation", "--model_path", str(tiny_run), "--output_dir", str(tmp_path), "--calib_images", "16",
        "--qat_epochs", "3", "--max_float_share", "0"]))
    qat = report["qat"]
    assert qat["epochs"] == 3 and qat["steps"] > 0 and qat["seconds"] > 0
    assert qat["simulated_activations"] > 10  # the rounded activations of the all-INT8 file, found in the model
    # Every pass was judged on the run's validation images under simulated INT8, and the best one handed back.
    assert len(measured) == 4 and all(0.0 <= agreement <= 1.0 and kl >= 0.0 for agreement, kl in measured)
    assert [p["pass"] for p in qat["passes"]] == [0, 1, 2, 3] and qat["best_pass"] == 2
    assert [p["val_agreement"] for p in qat["passes"]] == [0.90, 0.92, 0.95, 0.93]
    for side in ("post_training", "tuned"):  # both files went through the agreement guard on validation images
        assert 0.0 <= qat[side]["val_top1_agreement"] <= 1.0 and qat[side]["int8_float_nodes"] >= 0
    meta = read_onnx_metadata(tmp_path / "clf_model_int8.onnx")
    assert qat["kept"] in ("tuned", "post_training")  # decided by the real files' guard results (int8_rank)
    assert meta.get("qat_epochs") == ("2" if qat["kept"] == "tuned" else None)
    assert report["int8_float_nodes"] == qat[qat["kept"]]["int8_float_nodes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the tuning's scratch files are gone


def test_with_the_guard_off_the_tuned_file_is_kept_when_its_simulated_check_beat_the_delivered_weights(tiny_run,
                                                                                                       tmp_path,
                                                                                                       monkeypatch):
    _scripted_tuning_checks(monkeypatch)
    # --min_agreement 0 scores neither file on the validation images: the pass the tuning chose there decides.
    report = qom.main(qom.get_args_parser().parse_args([
        "--skip_segmentation", "--model_path", str(tiny_run), "--output_dir", str(tmp_path), "--calib_images", "16",
        "--qat_epochs", "3", "--max_float_share", "0", "--min_agreement", "0", "--keep_float_stages", "0"]))
    qat = report["qat"]
    assert qat["best_pass"] == 2 and qat["post_training"]["val_top1_agreement"] is None
    assert qat["kept"] == "tuned"
    assert read_onnx_metadata(tmp_path / "clf_model_int8.onnx")["qat_epochs"] == "2"
    assert report["int8_top1_agreement"] == qat["tuned"]["int8_top1_agreement"]


def test_keep_float_stages_zero_quantizes_every_conv_and_too_many_is_a_clear_error(tiny_run, tmp_path):
    report = qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run),
                                                        "--output_dir", str(tmp_path / "all"), "--calib_images", "16",
                                                        "--keep_float_stages", "0", "--min_agreement", "0"]))
    assert report["int8_float_stages"] == 0 and report["int8_float_nodes"] == 0
    assert report["agreement_attempts"] == []
    assert all(_quantized_convs(tmp_path / "all" / "clf_model_int8.onnx").values())
    assert report["int8_top1_agreement"] >= 0.8
    with pytest.raises(UserError, match="has 5 stages"):
        qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run),
                                                   "--output_dir", str(tmp_path / "x"), "--keep_float_stages", "6"]))
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="--keep_float_stages 'some': must be 'auto' or a stage count"):
        qom.main(qom.parse_args(["--model_path", "r", "--keep_float_stages", "some"]))
    with pytest.raises(UserError, match="--min_agreement 99.0: must be in"):
        qom.main(qom.parse_args(["--model_path", "r", "--min_agreement", "99"]))


def test_inference_onnx_backend_uses_the_exported_models(exported, tiny_run, lesion_dataset, tmp_path):
    output, _ = exported
    folder = lesion_dataset / "testset" / "malignant"
    common = ["--model_path", str(tiny_run), "--inference_folder", str(folder), "--num_workers", "0"]
    torch_summary = inference.main(inference.parse_args(common + ["--inference_output", str(tmp_path / "t")]))
    onnx_summary = inference.main(inference.parse_args(common + ["--inference_output", str(tmp_path / "o"),
                                                                 "--backend", "onnx", "--onnx_model",
                                                                 str(output / "clf_model.onnx")]))
    assert onnx_summary["per_class"] == torch_summary["per_class"]
    torch_json = json.loads((tmp_path / "t" / "predictions.json").read_text())
    onnx_json = json.loads((tmp_path / "o" / "predictions.json").read_text())
    for a, b in zip(torch_json, onnx_json):
        assert a["filename"] == b["filename"]
        assert np.allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-4)


def test_corrupted_onnx_file_is_a_clear_error(exported, tiny_run, lesion_dataset, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((exported[0] / "clf_model.onnx").read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot load ONNX model"):
        inference.main(inference.parse_args(["--model_path", str(tiny_run), "--inference_folder",
                                             str(lesion_dataset / "testset"), "--inference_output",
                                             str(tmp_path / "o"), "--backend", "onnx", "--onnx_model", str(broken)]))


def test_missing_dataset_for_verification_is_a_clear_error(tiny_run, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(tiny_run, moved)
    configs = json.loads((moved / "configs.json").read_text())
    configs["data_dir"] = str(tmp_path / "gone")
    (moved / "configs.json").write_text(json.dumps(configs))
    with pytest.raises(UserError, match="--data_dir"):
        qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(moved), "--output_dir", str(tmp_path / "x")]))
    assert not (tmp_path / "x" / "clf_model.onnx").exists()


def test_quantize_none_removes_an_older_int8_model(tiny_run, tmp_path):
    output = tmp_path / "onnx"
    output.mkdir()
    (output / "clf_model_int8.onnx").write_bytes(b"stale model from an earlier export")
    report = qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run), "--output_dir", str(output),
                                                        "--quantize", "none"]))
    assert (output / "clf_model.onnx").is_file() and not (output / "clf_model_int8.onnx").exists()
    assert "int8_accuracy" not in report


def test_a_whole_image_run_exports_only_its_classifier_by_default_offline(tiny_run, tmp_path):
    # The face parser is exported for skin-region runs (or when asked); a whole-photo run needs no SegFormer download.
    report = qom.main(qom.parse_args(["--model_path", str(tiny_run), "--output_dir", str(tmp_path),
                                      "--calib_images", "8", "--quantize", "none"]))
    assert (tmp_path / "clf_model.onnx").is_file() and not (tmp_path / "seg_model.onnx").exists()
    assert not any(key.startswith("seg_") for key in report)
    with pytest.raises(UserError, match="skip_segmentation"):  # asked for, offline: the parser cannot load
        qom.main(qom.parse_args(["--model_path", str(tiny_run), "--output_dir", str(tmp_path / "x"),
                                 "--skip_segmentation", "False"]))
