"""report.html: one self-contained page a clinician opens offline (every image embedded as a data URI, no network,
no JavaScript), rendered with Jinja2 from the evaluation report that is already on disk.

Written into every run folder (the test split) and beside the predictions of a labelled-folder inference.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from evaluation.bootstrap import format_interval
from utils.atomic import atomic_write_text

REPORT_HTML = "report.html"
GALLERY_SIZE = 6
THUMB_SIDE = 320
HEADLINE = (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"), ("macro_f1", "Macro F1"),
            ("macro_auc", "Macro ROC AUC"), ("ece", "Expected calibration error"))


@dataclass(frozen=True)
class GalleryItem:
    image: Path  # the Grad-CAM overlay, or the photo itself
    name: str
    true: str
    predicted: str
    confidence: float


def data_uri(path: Path, max_side: Optional[int] = THUMB_SIDE) -> str:
    """The image as an embedded ``data:`` URI (PNG figures as PNG, photos as JPEG), shrunk to ``max_side``."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        kind = "png" if path.suffix.lower() == ".png" else "jpeg"
        img.save(buffer, format=kind.upper(), **({"quality": 85} if kind == "jpeg" else {"optimize": True}))
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pick_gallery(targets: np.ndarray, probs: np.ndarray, size: int = GALLERY_SIZE) -> tuple[list[int], list[int]]:
    """Indices of the most confident errors and of the least confident correct answers."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(predicted != targets)
    right = np.flatnonzero(predicted == targets)
    return (wrong[np.argsort(-confidence[wrong], kind="stable")][:size].tolist(),
            right[np.argsort(confidence[right], kind="stable")][:size].tolist())


def _is_wide(path: Path) -> bool:
    """A figure of side-by-side panels (the learning curves) gets the page's whole width, where its axes stay legible."""
    with Image.open(path) as img:
        return img.width > 1.8 * img.height


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _audit_context(files: Optional[tuple[Path, Path]]) -> Optional[dict[str, Any]]:
    if files is None or not files[0].is_file():
        return None
    path, pairs = files
    audit = json.loads(path.read_text(encoding="utf-8"))
    warnings = []
    shortcut = audit.get("shortcut") or {}
    if shortcut.get("warning"):
        warnings.append(f"Image size and file format alone predict the class (balanced accuracy "
                        f"{shortcut['balanced_accuracy']:.2f}, chance {shortcut['chance']:.2f}).")
    if audit["duplicates"]["train_test_clusters"] and not audit.get("removed"):
        warnings.append("Copies of test images are in the training set: test figures may be inflated.")
    return {**audit["duplicates"], "removed": len(audit.get("removed", [])), "warnings": warnings,
            "pairs_uri": data_uri(pairs, max_side=900) if pairs.is_file() else None}


def _decisions_context(metrics: dict[str, Any]) -> tuple[list[dict], Optional[dict]]:
    decisions = metrics.get("decisions") or {}
    points = []
    for p in decisions.get("operating_points", []):
        test = p.get("test") or {}
        intervals = test.get("intervals") or {}
        points.append({"name": f"flag {p['class']} at {p['metric']} {p['target']}",
                       "held_out": p["status"] if p["status"] != "ok" else
                       _fmt(p.get(f"validation_{p['metric']}")),
                       "threshold": _fmt(p.get("threshold"), 4),
                       "sensitivity": format_interval(test.get("sensitivity"), intervals.get("sensitivity")),
                       "specificity": format_interval(test.get("specificity"), intervals.get("specificity")),
                       "ppv": _fmt(test.get("ppv")), "npv": _fmt(test.get("npv")),
                       "prevalence": _fmt(test.get("prevalence"))})
    abstention = decisions.get("abstention")
    if abstention:
        test = abstention.get("test") or {}
        intervals = test.get("intervals") or {}
        abstention = {"name": f"{abstention['kind']} {abstention['target']}",
                      "threshold": _fmt(abstention.get("threshold"), 4),
                      "coverage": format_interval(test.get("coverage"), intervals.get("coverage")),
                      "selective_accuracy": format_interval(test.get("selective_accuracy"),
                                                            intervals.get("selective_accuracy"))}
    return points, abstention


def _subgroup_context(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in metrics.get("subgroups", []):
        verdict, css = ("too small to judge", "") if s["too_small"] else (
            ("clearly worse than the whole set", "bad") if s.get("warning") else ("no clear gap", "ok"))
        rows.append({"column": s["column"], "value": s["value"], "n": s["n"],
                     **{k: format_interval(s.get(k), [s[f"{k}_low"], s[f"{k}_high"]]
                                           if s.get(f"{k}_low") is not None else None)
                        for k in ("accuracy", "balanced_accuracy", "macro_auc", "ece")},
                     "verdict": verdict, "css": css})
    return rows


def write_html_report(folder: Path, metrics: dict[str, Any], class_names: list[str], *, title: str, subtitle: str,
                      figures: list[tuple[Path, str]], gallery_errors: list[GalleryItem],
                      gallery_unsure: list[GalleryItem], gallery_note: str,
                      counts: Optional[dict[str, dict[str, int]]] = None,
                      audit: Optional[tuple[Path, Path]] = None) -> Path:
    """Render report.html into ``folder`` from ``metrics`` (the report's JSON), the ``figures`` (path, caption) that
    exist and, for a run, the data audit (``audit``: its JSON and its pairs picture)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    intervals = metrics.get("intervals") or {}
    per_class_intervals = intervals.get("per_class", {})
    context = {
        "title": title, "subtitle": subtitle,
        "counts": None if counts is None else {
            "splits": list(counts), "rows": [{"name": name, "cells": [counts[s].get(name, 0) for s in counts]}
                                             for name in class_names]},
        "audit": _audit_context(audit),
        "metrics_note": f"{metrics.get('n_images', 0)} images; 95% bootstrap intervals "
                        f"({(intervals.get('method') or {}).get('n_resamples', 'n/a')} resamples of "
                        f"{(intervals.get('method') or {}).get('resampled_unit', 'image')}s).",
        "headline": [{"name": label, "value": _fmt(metrics.get(key)), "interval": format_interval(
            metrics.get(key), intervals.get(key)).partition(" ")[2] or "n/a"} for key, label in HEADLINE],
        "per_class": [{"name": name, "support": v.get("support"),
                       "recall": format_interval(v.get("recall"), per_class_intervals.get(name, {}).get("recall")),
                       "specificity": format_interval(v.get("specificity"),
                                                      per_class_intervals.get(name, {}).get("specificity")),
                       "precision": _fmt(v.get("precision")), "auc": _fmt(v.get("roc_auc"))}
                      for name, v in metrics.get("per_class", {}).items()],
        "figures": [{"uri": data_uri(path, max_side=None), "caption": caption, "wide": _is_wide(path)}
                    for path, caption in figures if path.is_file()],
        "aurc": _fmt(metrics.get("aurc"), 4),
        "subgroups": _subgroup_context(metrics),
        "errors": [_card(g) for g in gallery_errors], "unsure": [_card(g) for g in gallery_unsure],
        "gallery_note": gallery_note,
    }
    context["operating_points"], context["abstention"] = _decisions_context(metrics)
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(**context)
    atomic_write_text(folder / REPORT_HTML, html)
    return folder / REPORT_HTML


def _card(item: GalleryItem) -> dict[str, Any]:
    return {"uri": data_uri(item.image), "name": item.name, "true": item.true, "predicted": item.predicted,
            "confidence": f"{item.confidence:.2f}"}
