"""Subgroup metrics: is the model worse for some patients (skin type, sex, age group, body site, camera)?

``--metadata FILE.csv`` has a ``filename`` column (matched like the labels CSV: path, file name or name without
extension) and any other columns; every other column is a way to split the test set. For each column and value the
report gives n, accuracy, balanced accuracy, macro AUC, per-class recall and ECE with 95% bootstrap intervals. Groups
under ``MIN_SUBGROUP`` images are listed as too small rather than hidden; a subgroup whose balanced accuracy is more
than ``WARN_GAP`` below the whole set's, with intervals that do not overlap, is warned about.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MIN_SUBGROUP = 20
WARN_GAP = 0.05
MISSING = "(missing)"


def columns_for(images: Sequence[Any], metadata: dict[Any, dict[str, str]]) -> dict[str, list[str]]:
    """Per metadata column, each image's value (``(missing)`` where the CSV has none)."""
    names = sorted({k for row in metadata.values() for k in row})
    return {name: [(metadata.get(p, {}).get(name) or MISSING) for p in images] for name in names}


def subgroup_metrics(targets: np.ndarray, probs: np.ndarray, class_names: list[str],
                     columns: dict[str, list[str]], overall: dict[str, Any],
                     groups: Optional[Sequence[Any]] = None) -> list[dict[str, Any]]:
    """One row per (column, value): the metrics of that subgroup alone, with intervals, and the warning verdict."""
    from evaluation.bootstrap import bootstrap_intervals
    from evaluation.metrics import classification_metrics

    rows = []
    whole = overall["balanced_accuracy"]
    whole_interval = (overall.get("intervals") or {}).get("balanced_accuracy")
    for column, values in columns.items():
        values_arr = np.asarray(values, dtype=object)
        for value in sorted(set(values)):
            members = values_arr == value
            n = int(members.sum())
            row: dict[str, Any] = {"column": column, "value": value, "n": n, "too_small": n < MIN_SUBGROUP}
            if n:
                t, p = targets[members], probs[members]
                metrics = classification_metrics(t, p.argmax(1), class_names, p)
                intervals = bootstrap_intervals(t, p, class_names, groups=None if groups is None else
                                                [g for g, m in zip(groups, members) if m])
                row.update({k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_auc", "ece")})
                row.update({f"recall_{name}": metrics["per_class"][name]["recall"]
                            if metrics["per_class"][name]["support"] else None for name in class_names})
                for key in ("accuracy", "balanced_accuracy", "macro_auc", "ece"):
                    low, high = intervals.get(key) or (None, None)
                    row[f"{key}_low"], row[f"{key}_high"] = low, high
                row["warning"] = bool(not row["too_small"] and whole_interval and row["balanced_accuracy_high"]
                                      is not None and row["balanced_accuracy"] < whole - WARN_GAP
                                      and row["balanced_accuracy_high"] < whole_interval[0])
            rows.append(row)
    return rows


def log_subgroups(rows: list[dict[str, Any]], overall_balanced_accuracy: float) -> None:
    for row in rows:
        if row.get("warning"):
            logger.warning("subgroup %s=%s (%d images): balanced accuracy %.3f [%.3f, %.3f] is more than %d points "
                           "below the whole set's %.3f, and the intervals do not overlap", row["column"],
                           row["value"], row["n"], row["balanced_accuracy"], row["balanced_accuracy_low"],
                           row["balanced_accuracy_high"], round(WARN_GAP * 100), overall_balanced_accuracy)
    small = [f"{r['column']}={r['value']} ({r['n']})" for r in rows if r["too_small"]]
    if small:
        logger.info("subgroups under %d images (reported, too small to judge): %s", MIN_SUBGROUP, ", ".join(small))


def subgroup_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows)
