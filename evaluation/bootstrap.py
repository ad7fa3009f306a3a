"""95% percentile-bootstrap intervals for the test metrics, and a paired bootstrap of two models on one test set.

A resample is a vector of multiplicities (how often each image is drawn), so every metric is computed for all
resamples at once from weighted counts instead of re-running scikit-learn a thousand times. With groups (patients,
lesions) whole groups are drawn, because photos of one patient are not independent evidence.

The metric definitions match ``evaluation.metrics.classification_metrics``: balanced accuracy and macro AUC average over
the classes present in the (resampled) test set, ECE uses the same equal-width confidence bins.

ECE is the one metric whose plug-in value is biased upward by resampling (a resample repeats images, so its bins are
noisier and their gaps larger): on dermnet_a's 213 test images 98% of the resamples' ECE lay above the test ECE, and
the plain percentile interval excluded it. Its interval is therefore the percentile interval moved down by the
bootstrap's own bias estimate (mean of the resamples minus the test value), floored at 0.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from evaluation.metrics import ECE_BINS

N_RESAMPLES = 1000
CONFIDENCE = 0.95
CHUNK = 200  # resamples computed together: bounds memory at CHUNK x n_images weights
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")


def resample_weights(n_items: int, n_resamples: int, seed: int,
                     groups: Optional[Sequence[Any]] = None) -> np.ndarray:
    """(n_resamples, n_items) multiplicities of a seeded bootstrap; with ``groups``, whole groups are drawn."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_resamples).astype(np.float64)
    _, group_of_item = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(group_of_item.max()) + 1
    drawn = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)
    return drawn[:, group_of_item].astype(np.float64)


def _weighted_confusion(weights: np.ndarray, targets: np.ndarray, preds: np.ndarray, n_class: int) -> np.ndarray:
    cell = np.zeros((len(targets), n_class * n_class))
    cell[np.arange(len(targets)), targets * n_class + preds] = 1.0
    return (weights @ cell).reshape(-1, n_class, n_class)  # (resamples, true, predicted)


def _weighted_auc(weights: np.ndarray, positives: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per resample (Mann-Whitney with tied scores counted half), NaN where a resample lacks
    positives or negatives."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = np.add.reduceat(w * positives[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positives[order], starts, axis=1)
    negatives_below = np.cumsum(neg, axis=1) - neg
    denominator = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (pos * (negatives_below + 0.5 * neg)).sum(1) / denominator, np.nan)


def _weighted_ece(weights: np.ndarray, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    confidence = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, ECE_BINS - 1)
    member = np.zeros((len(targets), ECE_BINS))
    member[np.arange(len(targets)), which] = 1.0
    gap = weights @ (member * (confidence - correct)[:, None])  # per bin: sum(conf) - sum(correct)
    return np.abs(gap).sum(1) / weights.sum(1)


def resampled_metrics(weights: np.ndarray, targets: np.ndarray, probs: Optional[np.ndarray],
                      preds: np.ndarray, n_class: int) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights``: headline metrics (resamples,) and per-class recall/specificity
    (resamples, classes)."""
    cm = _weighted_confusion(weights, targets, preds, n_class)
    total = cm.sum((1, 2))
    true_count = cm.sum(2)
    pred_count = cm.sum(1)
    hits = np.diagonal(cm, axis1=1, axis2=2)
    present = true_count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / true_count, np.nan)
        negatives = total[:, None] - true_count
        specificity = np.where(negatives > 0, (negatives - (pred_count - hits)) / negatives, np.nan)
        f1_denominator = true_count + pred_count
        f1 = np.where(f1_denominator > 0, 2 * hits / f1_denominator, 0.0)
    out = {"accuracy": hits.sum(1) / total, "balanced_accuracy": np.nanmean(recall, axis=1),
           "macro_f1": f1.mean(1), "recall": recall, "specificity": specificity}
    if probs is not None:
        aucs = np.stack([_weighted_auc(weights, targets == k, probs[:, k]) for k in range(n_class)], axis=1)
        with np.errstate(invalid="ignore"):
            out["macro_auc"] = np.where(np.isnan(aucs).all(1), np.nan,
                                        np.nanmean(np.where(np.isnan(aucs), np.nan, aucs), axis=1))
        out["ece"] = _weighted_ece(weights, targets, probs)
    return out


def _chunks(n_items: int, n_resamples: int, seed: int, groups: Optional[Sequence[Any]]):
    weights = resample_weights(n_items, n_resamples, seed, groups)
    for start in range(0, n_resamples, CHUNK):
        yield weights[start:start + CHUNK]


def _interval(values: np.ndarray, confidence: float) -> Optional[list[float]]:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def bootstrap_intervals(targets: np.ndarray, probs: np.ndarray, class_names: list[str], *,
                        groups: Optional[Sequence[Any]] = None, n_resamples: int = N_RESAMPLES, seed: int = 0,
                        confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Percentile-bootstrap intervals of accuracy, balanced accuracy, macro F1, macro AUC, ECE and per-class
    recall/specificity, as ``{"accuracy": [low, high], ..., "per_class": {name: {"recall": [..], ...}}}``."""
    targets = np.asarray(targets, dtype=np.int64)
    preds = probs.argmax(1)
    parts = [resampled_metrics(w, targets, probs, preds, len(class_names))
             for w in _chunks(len(targets), n_resamples, seed, groups)]
    stacked = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    result: dict[str, Any] = {name: _interval(stacked[name], confidence) for name in HEADLINE if name in stacked}
    if result.get("ece"):
        point = resampled_metrics(np.ones((1, len(targets))), targets, probs, preds, len(class_names))["ece"][0]
        bias = float(np.mean(stacked["ece"]) - point)
        result["ece"] = [max(0.0, bound - bias) for bound in result["ece"]]
    result["per_class"] = {name: {"recall": _interval(stacked["recall"][:, k], confidence),
                                  "specificity": _interval(stacked["specificity"][:, k], confidence)}
                           for k, name in enumerate(class_names)}
    result["method"] = {"kind": "percentile bootstrap (ECE: bias-corrected)", "confidence": confidence,
                        "n_resamples": n_resamples,
                        "seed": seed, "resampled_unit": "group" if groups is not None else "image",
                        "n_units": int(len(set(map(str, groups)))) if groups is not None else int(len(targets))}
    return result


def paired_difference(targets: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, n_class: int,
                      metric: str = "balanced_accuracy", *, groups: Optional[Sequence[Any]] = None,
                      n_resamples: int = N_RESAMPLES, seed: int = 0,
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Model A minus model B on the same test images, with the interval of the difference over shared resamples:
    an interval that contains 0 means the test set cannot tell the two apart."""
    targets = np.asarray(targets, dtype=np.int64)
    diffs = []
    for w in _chunks(len(targets), n_resamples, seed, groups):
        a = resampled_metrics(w, targets, probs_a, probs_a.argmax(1), n_class)[metric]
        b = resampled_metrics(w, targets, probs_b, probs_b.argmax(1), n_class)[metric]
        diffs.append(a - b)
    full = np.ones((1, len(targets)))
    point = float(resampled_metrics(full, targets, probs_a, probs_a.argmax(1), n_class)[metric][0]
                  - resampled_metrics(full, targets, probs_b, probs_b.argmax(1), n_class)[metric][0])
    return {"metric": metric, "difference": point, "interval": _interval(np.concatenate(diffs), confidence)}


def format_interval(value: Optional[float], interval: Optional[list[float]], digits: int = 3) -> str:
    """``0.812 [0.771, 0.850]`` for logs and Markdown."""
    if value is None:
        return "n/a"
    if not interval:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def binary_intervals(positive: np.ndarray, flagged: np.ndarray, *, groups: Optional[Sequence[Any]] = None,
                     n_resamples: int = N_RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> dict[str, Optional[list[float]]]:
    """Intervals of the sensitivity and specificity of a yes/no flag (an operating point)."""
    targets, preds = np.asarray(positive, dtype=np.int64), np.asarray(flagged, dtype=np.int64)
    recall = np.concatenate([resampled_metrics(w, targets, None, preds, 2)["recall"]
                             for w in _chunks(len(targets), n_resamples, seed, groups)])
    return {"sensitivity": _interval(recall[:, 1], confidence), "specificity": _interval(recall[:, 0], confidence)}


def selective_accuracy_interval(correct: np.ndarray, answered: np.ndarray, *, groups: Optional[Sequence[Any]] = None,
                                n_resamples: int = N_RESAMPLES, seed: int = 0,
                                confidence: float = CONFIDENCE) -> dict[str, Optional[list[float]]]:
    """Intervals of the coverage and the accuracy among the answered images of an abstention threshold."""
    coverage, accuracy = [], []
    for w in _chunks(len(correct), n_resamples, seed, groups):
        answered_weight = w @ answered.astype(np.float64)
        coverage.append(answered_weight / w.sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy.append((w @ (answered & correct).astype(np.float64)) / answered_weight)
    return {"coverage": _interval(np.concatenate(coverage), confidence),
            "selective_accuracy": _interval(np.concatenate(accuracy), confidence)}
