"""Operating points and abstention on scripted probabilities: thresholds reach their targets on held-out
predictions, unreachable targets are recorded as such, and flags/decisions follow the stored thresholds."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.decisions import (
    UNCERTAIN,
    AbstainSpec,
    OperatingPointSpec,
    choose_abstention,
    choose_operating_point,
    decision_columns,
    decisions_on_test,
    flags_and_decision,
    parse_abstain,
    parse_operating_points,
    risk_coverage,
)
from runs.run_folder import RunDir
from utils.errors import UserError

CLASSES = ["benign", "malignant"]


def _scores(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, n)
    malignant = np.clip(rng.normal(0.35 + 0.3 * targets, 0.2), 0.001, 0.999)
    return targets, np.stack([1 - malignant, malignant], axis=1)


def test_sensitivity_and_specificity_targets_are_reached_on_the_held_out_predictions():
    targets, probs = _scores(400)
    for target in (0.8, 0.9, 0.95):
        point = choose_operating_point(OperatingPointSpec("malignant", "sensitivity", target), CLASSES, targets, probs)
        flagged = probs[:, 1] >= point["threshold"]
        sensitivity = flagged[targets == 1].mean()
        assert point["status"] == "ok" and target <= sensitivity == pytest.approx(point["validation_sensitivity"])
        # no other threshold that reaches the target has a better specificity
        best = max((probs[targets == 0, 1] < t).mean() for t in probs[targets == 1, 1]
                   if (probs[targets == 1, 1] >= t).mean() >= target)
        assert (probs[targets == 0, 1] < point["threshold"]).mean() == pytest.approx(best)
        spec = choose_operating_point(OperatingPointSpec("malignant", "specificity", target), CLASSES, targets, probs)
        specificity = (probs[targets == 0, 1] < spec["threshold"]).mean()
        assert target <= specificity
        best = max((probs[targets == 1, 1] >= t).mean() for t in np.nextafter(probs[targets == 0, 1], 1)
                   if (probs[targets == 0, 1] < t).mean() >= target)
        assert (probs[targets == 1, 1] >= spec["threshold"]).mean() == pytest.approx(best)


def test_a_separable_validation_set_gets_a_threshold_in_the_middle_of_the_gap():
    """Positives at 0.9999 and negatives at 0.001: the threshold sits between, not at the positives' edge, so a test
    positive at 0.99 is still flagged."""
    targets = np.array([1] * 30 + [0] * 30)
    malignant = np.r_[np.full(30, 0.9999), np.full(30, 0.001)]
    probs = np.stack([1 - malignant, malignant], axis=1)
    point = choose_operating_point(OperatingPointSpec("malignant", "sensitivity", 0.95), CLASSES, targets, probs)
    assert 0.001 < point["threshold"] < 0.99 and point["validation_specificity"] == 1.0
    spec = choose_operating_point(OperatingPointSpec("malignant", "specificity", 0.95), CLASSES, targets, probs)
    assert 0.01 < spec["threshold"] < 0.9999 and spec["validation_sensitivity"] == 1.0


def test_a_target_too_fine_for_the_positives_is_recorded_unreachable():
    targets, probs = np.array([1] * 8 + [0] * 40), _scores(48)[1]
    point = choose_operating_point(OperatingPointSpec("malignant", "sensitivity", 0.95), CLASSES, targets, probs)
    assert point["status"] == "unreachable" and point["threshold"] is None
    assert point["reachable"] == pytest.approx(7 / 8) and "needs at least 20" in point["reason"]
    assert "flag_malignant" not in flags_and_decision(probs[0], CLASSES, [point], None)


def test_bad_operating_points_and_abstention_targets_are_one_line_errors():
    assert parse_operating_points("malignant:sensitivity=0.95,benign:specificity=0.9", CLASSES) == [
        OperatingPointSpec("malignant", "sensitivity", 0.95), OperatingPointSpec("benign", "specificity", 0.9)]
    for text, message in (("malignant:sensitivity=1.2", "sensitivity=<0..1>"), ("malignant:recall=0.9", "write"),
                          ("melanoma:sensitivity=0.9", "no class 'melanoma'"), ("malignant", "write")):
        with pytest.raises(UserError, match=message):
            parse_operating_points(text, CLASSES)
    assert parse_abstain("accuracy=0.95") == AbstainSpec("accuracy", 0.95)
    for text in ("accuracy=95", "precision=0.9", "coverage"):
        with pytest.raises(UserError, match="--abstain"):
            parse_abstain(text)


def test_abstention_answers_as_many_images_as_the_accuracy_target_allows():
    targets, probs = _scores(500, seed=1)
    chosen = choose_abstention(AbstainSpec("accuracy", 0.9), targets, probs)
    answered = probs.max(1) >= chosen["threshold"]
    assert (probs.argmax(1) == targets)[answered].mean() >= 0.9
    assert chosen["validation_coverage"] == pytest.approx(answered.mean())
    assert answered.mean() < 1.0
    lower = probs.max(1) >= np.sort(probs.max(1))[::-1][answered.sum()]  # one more image answered
    assert (probs.argmax(1) == targets)[lower].mean() < 0.9 or lower.sum() == answered.sum()
    coverage = choose_abstention(AbstainSpec("coverage", 0.8), targets, probs)
    assert coverage["validation_coverage"] == pytest.approx(0.8, abs=0.01)
    impossible = choose_abstention(AbstainSpec("accuracy", 0.999), targets, probs)
    assert impossible["status"] == "unreachable" and impossible["threshold"] is None


def test_flags_and_decisions_follow_the_stored_thresholds():
    points = [{"class": "malignant", "metric": "sensitivity", "target": 0.9, "threshold": 0.3}]
    abstain = {"kind": "accuracy", "target": 0.9, "threshold": 0.8}
    assert decision_columns(CLASSES, points, abstain) == ("flag_malignant", "decision")
    assert flags_and_decision(np.array([0.65, 0.35]), CLASSES, points, abstain) == {
        "flag_malignant": True, "decision": UNCERTAIN}
    assert flags_and_decision(np.array([0.85, 0.15]), CLASSES, points, abstain) == {
        "flag_malignant": False, "decision": "benign"}


def test_risk_coverage_and_the_test_report():
    targets = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.55, 0.45]])  # confidences .9 .6 .7 .55; 2 wrong
    coverage, risk, aurc = risk_coverage(targets, probs)
    assert list(coverage) == [0.25, 0.5, 0.75, 1.0] and list(risk) == [0, 0, 1 / 3, 0.5]
    assert aurc == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)
    report = decisions_on_test(targets, probs, CLASSES,
                               [{"class": "malignant", "metric": "sensitivity", "target": 0.5, "threshold": 0.5}],
                               {"kind": "coverage", "target": 0.5, "threshold": 0.7})
    test = report["operating_points"][0]["test"]
    assert (test["sensitivity"], test["specificity"], test["ppv"], test["prevalence"]) == (0.5, 0.5, 0.5, 0.5)
    assert report["abstention"]["test"]["coverage"] == 0.5 and report["abstention"]["test"]["selective_accuracy"] == 1.0


@pytest.fixture(scope="module")
def decision_run(lesion_dataset, tmp_path_factory):
    import main
    from tests.conftest import train_args

    result = main.main(main.parse_args(train_args(
        lesion_dataset, tmp_path_factory.mktemp("decisions"), "--operating_point", "malignant:sensitivity=0.9",
        "--abstain", "coverage=0.8")))
    return Path(result["run_dir"])


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_run_stores_reports_and_applies_its_thresholds_in_torch_and_onnx(decision_run, lesion_dataset, tmp_path):
    import inference
    from deploy.onnx_export import export_fp32
    from runs.checkpoint import load_run_model
    from runs.run_info import read_run_info
    from utils.onnx_runtime import read_onnx_metadata, write_onnx_metadata

    info = read_run_info(decision_run)
    point, abstain = info.operating_points[0], info.abstain
    assert point["status"] == "ok" and point["validation_sensitivity"] >= 0.9
    assert abstain["status"] == "ok" and abstain["validation_coverage"] >= 0.8
    metrics = json.loads((decision_run / "test_metrics.json").read_text())
    test = metrics["decisions"]["operating_points"][0]["test"]
    low, high = test["intervals"]["sensitivity"]
    assert low <= test["sensitivity"] <= high and test["ppv"] is not None
    assert (decision_run / "risk_coverage.png").stat().st_size > 1000 and 0 <= metrics["aurc"] <= 1

    model, _ = load_run_model(decision_run)
    onnx_path = tmp_path / "clf.onnx"
    export_fp32(model, list(info.preprocessing.input_size), onnx_path, 17)
    write_onnx_metadata(onnx_path, info.onnx_metadata(decision_run, "fp32"))
    assert json.loads(read_onnx_metadata(onnx_path)["operating_points"])[0]["threshold"] == point["threshold"]
    base = ["--model_path", str(decision_run), "--inference_folder", str(lesion_dataset / "testset"),
            "--num_workers", "0"]
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        inference.main(inference.parse_args(base + ["--inference_output", str(out), "--backend", backend,
                                                    "--onnx_model", str(onnx_path)]))
        rows = _rows(out / "predictions.csv")
        assert list(rows[0])[-2:] == ["flag_malignant", "decision"]
        for row in rows:
            assert row["flag_malignant"] == str(float(row["prob_malignant"]) >= point["threshold"])
            confident = float(row["confidence"]) >= abstain["threshold"]
            assert row["decision"] == (row["predicted_label"] if confident else UNCERTAIN)
        assert any(r["decision"] == UNCERTAIN for r in rows)

    out = tmp_path / "override"
    inference.main(inference.parse_args(base + ["--inference_output", str(out), "--operating_point",
                                                "malignant:specificity=0.9"]))
    from evaluation.decisions import read_held_out_predictions
    targets, probs = read_held_out_predictions(RunDir(decision_run).held_out_predictions, info.class_names)
    threshold = choose_operating_point(OperatingPointSpec("malignant", "specificity", 0.9), info.class_names,
                                       targets, probs)["threshold"]
    for row in _rows(out / "predictions.csv"):
        assert row["flag_malignant"] == str(float(row["prob_malignant"]) >= threshold)
        assert "decision" in row  # the run's abstention stays


def test_impossible_targets_stop_before_training(lesion_dataset, tmp_path):
    import main
    from tests.conftest import train_args

    for flags, message in ((["--operating_point", "melanoma:sensitivity=0.9"], "no class 'melanoma'"),
                           (["--operating_point", "malignant:sensitivity=1.2"], "sensitivity=<0..1>"),
                           (["--abstain", "accuracy=2"], "--abstain")):
        with pytest.raises(UserError, match=message):
            main.main(main.parse_args(train_args(lesion_dataset, tmp_path / "runs", *flags)))
    assert not (tmp_path / "runs").exists()
