"""The evaluation report, the same for the test split of a run and for a labelled folder at inference.

Files: <metrics_name> (JSON), per_class_metrics.csv, roc_curves.png, reliability_diagram.png and the confusion
matrix (CSV + PNG), all written atomically. Every metric carries its 95% bootstrap interval (``intervals`` in the JSON,
``*_low``/``*_high`` columns in the per-class CSV): a 300-image test set is about +-4 points sure on accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from evaluation.bootstrap import bootstrap_intervals, format_interval
from evaluation.decisions import risk_coverage
from evaluation.metrics import (
    calibration_bins,
    classification_metrics,
    confusion_frame,
    expected_calibration_error,
    one_vs_rest_auc,
    per_class_frame,
    roc_curves,
)
from evaluation.plots import plot_confusion_matrix, plot_reliability, plot_risk_coverage, plot_roc_curves
from evaluation.subgroups import log_subgroups, subgroup_frame, subgroup_metrics
from utils.atomic import atomic_write_json
from utils.csv_cells import save_frame_for_people

# The files of a classification report, beside a run's test split and beside a labelled-folder inference.
PER_CLASS_CSV = "per_class_metrics.csv"
SUBGROUP_CSV = "subgroup_metrics.csv"
ROC_PNG = "roc_curves.png"
RELIABILITY_PNG = "reliability_diagram.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
CONFUSION = "confusion_matrix"  # .csv and .png


def report_figures(folder: Path, confusion_name: str = CONFUSION) -> list[tuple[Path, str]]:
    """The figures write_classification_report draws into ``folder``, with captions, in report order."""
    return [(folder / f"{confusion_name}.png", "Confusion matrix"), (folder / ROC_PNG, "ROC curves (one-vs-rest)"),
            (folder / RELIABILITY_PNG, "Reliability diagram"), (folder / RISK_COVERAGE_PNG, "Risk-coverage curve")]


def write_classification_report(output_dir: Path, targets: np.ndarray, probs: np.ndarray, class_names: list[str],
                                *, metrics_name: str, confusion_name: str = CONFUSION,
                                extra: Optional[dict[str, Any]] = None,
                                uncalibrated_probs: Optional[np.ndarray] = None,
                                groups: Optional[Sequence[Any]] = None, seed: int = 0,
                                subgroups: Optional[dict[str, list[str]]] = None) -> dict[str, Any]:
    """Compute every metric from ``probs`` (already temperature-scaled where a temperature exists), with bootstrap
    intervals (whole ``groups`` resampled when given, ``seed`` for reproducibility), and write it. ``subgroups``:
    per metadata column, each image's value; adds subgroup_metrics.csv and the ``subgroups`` entry."""
    preds = probs.argmax(1)
    metrics = {**(extra or {}), **classification_metrics(targets, preds, class_names, probs)}
    if len(targets):
        metrics["intervals"] = bootstrap_intervals(targets, probs, class_names, groups=groups, seed=seed)
        metrics["aurc"] = risk_coverage(targets, probs)[2]  # area under the risk-coverage curve (lower is better)
    if subgroups and len(targets):
        metrics["subgroups"] = subgroup_metrics(targets, probs, class_names, subgroups, metrics, groups)
        frame = subgroup_frame(metrics["subgroups"])
        save_frame_for_people(output_dir / SUBGROUP_CSV, frame)
        log_subgroups(metrics["subgroups"], metrics["balanced_accuracy"])
    reliability = {"calibrated" if uncalibrated_probs is not None else "model": calibration_bins(targets, probs)}
    eces = {next(iter(reliability)): metrics["ece"]}
    if uncalibrated_probs is not None:
        metrics["ece_uncalibrated"] = expected_calibration_error(targets, uncalibrated_probs)
        reliability = {"uncalibrated": calibration_bins(targets, uncalibrated_probs), **reliability}
        eces["uncalibrated"] = metrics["ece_uncalibrated"]
    atomic_write_json(output_dir / metrics_name, metrics)
    per_class = per_class_frame(metrics)
    for name, bounds in (metrics.get("intervals") or {}).get("per_class", {}).items():
        for metric, interval in bounds.items():
            per_class.loc[name, f"{metric}_low"], per_class.loc[name, f"{metric}_high"] = interval or (None, None)
    save_frame_for_people(output_dir / PER_CLASS_CSV, per_class, index=True)
    frame = confusion_frame(targets, preds, class_names)
    save_frame_for_people(output_dir / f"{confusion_name}.csv", frame, index=True)
    plot_confusion_matrix(frame.to_numpy(), class_names, output_dir / f"{confusion_name}.png",
                          title=f"Confusion matrix (balanced acc. {metrics['balanced_accuracy']:.3f})")
    plot_roc_curves(roc_curves(targets, probs, len(class_names)), one_vs_rest_auc(targets, probs, len(class_names)),
                    class_names, output_dir / ROC_PNG)
    plot_reliability(reliability, eces, output_dir / RELIABILITY_PNG)
    if len(targets):
        coverage, risk, _ = risk_coverage(targets, probs)
        abstention = (metrics.get("decisions") or {}).get("abstention") or {}
        chosen = abstention.get("test")
        plot_risk_coverage(coverage, risk, metrics["aurc"], output_dir / RISK_COVERAGE_PNG,
                           (chosen["coverage"], 1 - chosen["selective_accuracy"])
                           if chosen and chosen["selective_accuracy"] is not None else None)
    return metrics


def headline_summary(metrics: dict[str, Any]) -> str:
    """One line for logs: each headline metric with its 95% interval, e.g. ``balanced accuracy 0.812 [0.771, 0.850]``."""
    intervals = metrics.get("intervals") or {}
    names = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
             "macro_auc": "macro AUC", "ece": "ECE"}
    parts = [f"{label} {format_interval(metrics.get(key), intervals.get(key))}" for key, label in names.items()
             if key in metrics]
    return ", ".join(parts) + (" (95% bootstrap intervals)" if intervals else "")
