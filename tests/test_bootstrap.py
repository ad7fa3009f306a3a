"""Bootstrap intervals: the vectorised metrics equal scikit-learn's, intervals cover the estimate, narrow with n, are
reproducible with the seed, and grouped resampling draws whole groups."""

import numpy as np
import pytest

from evaluation.bootstrap import bootstrap_intervals, paired_difference, resample_weights, resampled_metrics
from evaluation.metrics import classification_metrics

CLASSES = ["a", "b", "c"]


def _predictions(n: int, seed: int = 0, skill: float = 1.5):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES))) + skill * np.eye(len(CLASSES))[targets]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return targets, np.round(probs, 2) / np.round(probs, 2).sum(1, keepdims=True)  # rounding makes tied scores


def test_unweighted_resample_equals_the_reported_metrics():
    targets, probs = _predictions(200)
    reported = classification_metrics(targets, probs.argmax(1), CLASSES, probs)
    once = resampled_metrics(np.ones((1, len(targets))), targets, probs, probs.argmax(1), len(CLASSES))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        assert once[key][0] == pytest.approx(reported[key]), key
    for k, name in enumerate(CLASSES):
        assert once["recall"][0, k] == pytest.approx(reported["per_class"][name]["recall"])
        assert once["specificity"][0, k] == pytest.approx(reported["per_class"][name]["specificity"])


def test_a_resample_equals_the_metrics_of_the_resampled_set():
    targets, probs = _predictions(120, seed=3)
    weights = resample_weights(len(targets), 1, seed=5)
    drawn = np.repeat(np.arange(len(targets)), weights[0].astype(int))
    expected = classification_metrics(targets[drawn], probs[drawn].argmax(1), CLASSES, probs[drawn])
    got = resampled_metrics(weights, targets, probs, probs.argmax(1), len(CLASSES))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        assert got[key][0] == pytest.approx(expected[key]), key


def test_interval_covers_the_estimate_narrows_with_n_and_is_seeded():
    widths = []
    for n in (100, 1600):
        targets, probs = _predictions(n)
        point = classification_metrics(targets, probs.argmax(1), CLASSES, probs)
        intervals = bootstrap_intervals(targets, probs, CLASSES, seed=1)
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
            low, high = intervals[key]
            assert low <= point[key] <= high, key
        widths.append(intervals["accuracy"][1] - intervals["accuracy"][0])
        assert intervals == bootstrap_intervals(targets, probs, CLASSES, seed=1)
        assert intervals != bootstrap_intervals(targets, probs, CLASSES, seed=2)
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(16) = 1/4 of the width


def test_grouped_resampling_draws_whole_groups_and_widens_correlated_data():
    groups = np.repeat(np.arange(30), 5)
    weights = resample_weights(len(groups), 50, seed=0, groups=groups)
    for row in weights:
        for g in range(30):
            assert len(set(row[groups == g])) == 1  # a group is in or out as a whole
    # Five identical photos per patient: per-image resampling believes there are 150 independent cases.
    targets, probs = _predictions(30, seed=4, skill=1.0)
    targets, probs = np.repeat(targets, 5), np.repeat(probs, 5, axis=0)
    per_image = bootstrap_intervals(targets, probs, CLASSES)
    per_group = bootstrap_intervals(targets, probs, CLASSES, groups=groups)
    assert per_group["method"]["resampled_unit"] == "group" and per_group["method"]["n_units"] == 30
    assert np.diff(per_group["accuracy"]) > 1.5 * np.diff(per_image["accuracy"])


def test_paired_difference_separates_a_real_gain_from_noise():
    targets, good = _predictions(400, skill=2.5)
    _, weak = _predictions(400, seed=9, skill=0.0)
    real = paired_difference(targets, good, weak, len(CLASSES))
    assert real["interval"][0] > 0 < real["difference"]
    same = paired_difference(targets, good, good, len(CLASSES))
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]


def test_ece_interval_covers_a_well_calibrated_model_on_a_small_test_set():
    """Resampling inflates ECE: for this calibrated model the plain percentile interval lies above the test ECE; the
    bias-corrected interval covers it."""
    six = list("abcdef")
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.full(len(six), 0.7), size=200)
    targets = np.array([rng.choice(len(six), p=p) for p in probs])  # labels drawn from the model: calibrated
    point = classification_metrics(targets, probs.argmax(1), six, probs)["ece"]
    plain = resampled_metrics(resample_weights(200, 1000, seed=0), targets, probs, probs.argmax(1), len(six))["ece"]
    assert np.percentile(plain, 2.5) > point
    low, high = bootstrap_intervals(targets, probs, six)["ece"]
    assert low <= point <= high
