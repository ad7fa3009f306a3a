"""Classification metrics from scikit-learn, shaped for JSON and CSV reports."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)


def balanced_accuracy(y_true, y_pred) -> float:
    with warnings.catch_warnings():
        # A validation split may miss a class that the model still predicts; sklearn warns, the score is still right.
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y_true, y_pred))


def classification_metrics(y_true, y_pred, class_names: list[str]) -> dict:
    labels = list(range(len(class_names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision for never-predicted classes is reported as 0
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0)
        macro_f1 = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "n_images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_f1": float(macro_f1),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
    }


def confusion_frame(y_true, y_pred, class_names: list[str]) -> pd.DataFrame:
    """Rows are true classes, columns predicted classes, both labelled."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(class_names))))
    frame = pd.DataFrame(matrix, index=[f"true_{n}" for n in class_names],
                         columns=[f"pred_{n}" for n in class_names])
    frame.index.name = "true\\pred"
    return frame


def accuracy_from_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((logits.argmax(1) == targets).mean()) if len(targets) else 0.0
