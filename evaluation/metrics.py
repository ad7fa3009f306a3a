"""Classification metrics from scikit-learn, shaped for JSON and CSV reports."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

ECE_BINS = 15


def balanced_accuracy(y_true, y_pred) -> float:
    with warnings.catch_warnings():
        # A validation split may miss a class that the model still predicts; sklearn warns, the score is still right.
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y_true, y_pred))


def balanced_accuracy_standard_error(y_true, y_pred) -> float:
    """Binomial standard error of balanced accuracy: sqrt(sum_k r_k (1 - r_k) / n_k) / K over the K classes present,
    with r_k the recall of class k on its n_k images (the classes are independent samples)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    if len(classes) == 0:
        return 0.0
    variance = 0.0
    for k in classes:
        hits = y_pred[y_true == k] == k
        recall = hits.mean()
        variance += recall * (1.0 - recall) / len(hits)
    return float(np.sqrt(variance) / len(classes))


def mean_standard_error(values) -> float:
    """Standard error of a mean (e.g. of per-image losses)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def classification_metrics(y_true, y_pred, class_names: list[str], probs: np.ndarray | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1 and per-class precision/recall/specificity/F1/support; with ``probs``
    also one-vs-rest ROC AUC (macro and per class) and the expected calibration error."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(class_names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision for never-predicted classes is reported as 0
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0)
        macro_f1 = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    true_negatives = matrix.sum() - matrix.sum(0) - matrix.sum(1) + np.diag(matrix)
    negatives = matrix.sum() - matrix.sum(1)
    specificity = np.divide(true_negatives, negatives, out=np.zeros(len(labels)), where=negatives > 0)
    metrics = {
        "n_images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_f1": float(macro_f1),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "specificity": float(specificity[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
    }
    if probs is not None and len(y_true):
        per_class_auc = one_vs_rest_auc(y_true, probs, len(class_names))
        for name, auc in zip(class_names, per_class_auc):
            metrics["per_class"][name]["roc_auc"] = auc
        defined = [a for a in per_class_auc if a is not None]
        metrics["macro_auc"] = float(np.mean(defined)) if defined else None  # macro over classes present
        metrics["ece"] = expected_calibration_error(y_true, probs)
    return metrics


def one_vs_rest_auc(y_true, probs: np.ndarray, n_class: int) -> list[float | None]:
    """ROC AUC of each class against the rest; None where a class is absent (or alone) in ``y_true``."""
    aucs: list[float | None] = []
    for k in range(n_class):
        positives = np.asarray(y_true) == k
        aucs.append(float(roc_auc_score(positives, probs[:, k])) if 0 < positives.sum() < len(positives) else None)
    return aucs


def macro_auc(y_true, probs: np.ndarray, n_class: int) -> float | None:
    defined = [a for a in one_vs_rest_auc(y_true, probs, n_class) if a is not None]
    return float(np.mean(defined)) if defined else None


def roc_curves(y_true, probs: np.ndarray, n_class: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
    curves = []
    for k in range(n_class):
        positives = np.asarray(y_true) == k
        if 0 < positives.sum() < len(positives):
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            curves.append((fpr, tpr))
        else:
            curves.append(None)
    return curves


def calibration_bins(y_true, probs: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Top-label confidence bins (equal width): count, mean confidence and accuracy per bin."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        members = which == b
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "count": int(members.sum()),
                     "confidence": float(confidence[members].mean()) if members.any() else np.nan,
                     "accuracy": float(correct[members].mean()) if members.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(y_true, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Guo et al. (2017): the count-weighted gap between confidence and accuracy over equal-width bins."""
    bins = calibration_bins(y_true, probs, n_bins)
    used = bins[bins["count"] > 0]
    return float((used["count"] * (used["confidence"] - used["accuracy"]).abs()).sum() / max(1, len(y_true)))


def per_class_frame(metrics: dict) -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(metrics["per_class"], orient="index")
    frame.index.name = "class"
    return frame


def confusion_frame(y_true, y_pred, class_names: list[str]) -> pd.DataFrame:
    """Rows are true classes, columns predicted classes, both labelled."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(class_names))))
    frame = pd.DataFrame(matrix, index=[f"true_{n}" for n in class_names],
                         columns=[f"pred_{n}" for n in class_names])
    frame.index.name = "true\\pred"
    return frame


@dataclass(frozen=True)
class EvalResult:
    """One model's predictions on one list of images, with the project's metric names (as test_metrics.json)."""

    loss: float
    accuracy: float
    balanced_accuracy: float
    targets: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    indices: np.ndarray  # each prediction's dataset index

    @classmethod
    def from_predictions(cls, loss: float, targets: np.ndarray, probs: np.ndarray,
                         indices: np.ndarray) -> "EvalResult":
        preds = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
        seen = len(targets)
        return cls(loss=loss, accuracy=float((preds == targets).mean()) if seen else 0.0,
                   balanced_accuracy=balanced_accuracy(targets, preds) if seen else 0.0,
                   targets=targets, preds=preds, probs=probs, indices=indices)
