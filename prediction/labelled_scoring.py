"""Scoring a labelled folder at inference: where the true labels come from (folder names or a labels CSV), the
metrics report with intervals and subgroups, and report.html beside the predictions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from configs import ReferenceOptions
from dataloaders.labels_csv import CsvColumns, read_label_rows
from dataloaders.metadata import read_metadata
from evaluation.html_report import GalleryItem, pick_gallery, write_html_report
from evaluation.reports import headline_summary, report_figures, write_classification_report
from evaluation.subgroups import columns_for
from prediction.gradcam import GRADCAM_SUFFIX
from utils.errors import UserError
from utils.paths import safe_output_path

logger = logging.getLogger(__name__)

LABELLED_METRICS_JSON = "metrics.json"  # beside predictions.csv: the labelled folder's classification report

@dataclass(frozen=True)
class ReferenceLabels:
    """Where a scored folder's true labels come from: its <class>/ sub-folders, or a labels CSV."""

    from_folders: bool = False
    csv: Optional[Path] = None
    columns: CsvColumns = CsvColumns()
    metadata: Optional[Path] = None  # subgroup columns (evaluation.subgroups)

    @classmethod
    def from_options(cls, options: ReferenceOptions) -> "ReferenceLabels":
        return cls(options.labels_from_folders, Path(options.labels_csv) if options.labels_csv else None,
                   CsvColumns(options.csv_file_column, options.csv_label_column, options.csv_group_column),
                   Path(options.metadata) if options.metadata else None)

    @property
    def active(self) -> bool:
        return self.from_folders or self.csv is not None

    @property
    def source(self) -> str:
        return str(self.csv) if self.csv is not None else "--labels_from_folders (the <class>/ sub-folder)"

    def subgroup_values(self, root: Path, paths: list[Path]) -> Optional[dict[str, dict[str, str]]]:
        """Relative file name -> metadata values, with --metadata."""
        if self.metadata is None:
            return None
        return {p.relative_to(root).as_posix(): v for p, v in read_metadata(self.metadata, paths, root).items()}

    def lookup(self, root: Path, paths: list[Path]) -> dict[str, tuple[str, Optional[str]]]:
        """Relative file name -> (label, group) for every image that has a label."""
        if self.csv is not None:
            return {path.relative_to(root).as_posix(): (label, group)
                    for _, path, label, group, _ in read_label_rows(self.csv, paths, root, self.columns)}
        relative = [p.relative_to(root) for p in paths]
        return {r.as_posix(): (r.parts[0], None) for r in relative if len(r.parts) > 1}



def score_labelled_folder(output_dir: Path, rows: list[dict], probs: list[np.ndarray], class_names: list[str],
                          labels: dict[str, tuple[str, Optional[str]]], source: str,
                          metadata: Optional[dict[str, dict[str, str]]] = None,
                          root: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """Metrics of the predictions whose image has a label (``labels``: relative file name -> (label, group)) naming a
    training class; the other files are listed."""
    index = {name: i for i, name in enumerate(class_names)}
    targets, kept, groups, unlabelled, names = [], [], [], [], []
    for row, p in zip(rows, probs):
        label, group = labels.get(row["filename"], (None, None))
        if label in index:
            targets.append(index[label])
            kept.append(p)
            names.append(row["filename"])
            groups.append(group if group is not None else f"image:{row['filename']}")
        else:
            unlabelled.append(row["filename"])
    if unlabelled:
        logger.warning("%d image(s) have no label from %s naming a class (%s), left out of the metrics: %s",
                       len(unlabelled), source, ", ".join(class_names), ", ".join(unlabelled[:5]))
    if not targets:
        raise UserError(f"{source}: no image has a label naming a class ({', '.join(class_names)})")
    grouped = any(not g.startswith("image:") for g in groups)
    metrics = write_classification_report(output_dir, np.array(targets), np.stack(kept), class_names,
                                          metrics_name=LABELLED_METRICS_JSON, extra={"unlabelled_images": unlabelled},
                                          groups=groups if grouped else None,
                                          subgroups=columns_for(names, metadata) if metadata is not None else None)
    logger.info("labelled folder, %d images: %s (see %s)", metrics["n_images"], headline_summary(metrics),
                output_dir / LABELLED_METRICS_JSON)
    if root is not None:
        _write_folder_report(output_dir, root, names, np.array(targets), np.stack(kept), class_names, metrics, source)
    return metrics


def _write_folder_report(output_dir: Path, root: Path, names: list[str], targets: np.ndarray, probs: np.ndarray,
                         class_names: list[str], metrics: dict[str, Any], source: str) -> None:
    """report.html beside the predictions: the gallery shows the Grad-CAM overlays when --generate_gradcam wrote
    them, else the photos."""
    errors, unsure = pick_gallery(targets, probs)

    def item(i: int) -> GalleryItem:
        overlay = safe_output_path(output_dir / "gradcam", Path(names[i]), GRADCAM_SUFFIX)
        return GalleryItem(overlay if overlay.is_file() else root / names[i], names[i], class_names[targets[i]],
                           class_names[int(probs[i].argmax())], float(probs[i].max()))

    write_html_report(output_dir, metrics, class_names, title=f"Labelled folder {root.name}",
                      figures=report_figures(output_dir),
                      subtitle=f"{len(names)} labelled images, labels from {source}",
                      gallery_errors=[item(i) for i in errors], gallery_unsure=[item(i) for i in unsure],
                      gallery_note="Overlays: Grad-CAM of the predicted class (inference.py --generate_gradcam); "
                                   "photos as they are otherwise.")
