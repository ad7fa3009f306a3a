"""What a finished run says about its test split besides the metrics file: the log lines, each test image's
calibrated probabilities (test_predictions.csv) and report.html with its Grad-CAM gallery."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dataloaders.splits import DataSplits
from evaluation.calibration import apply_temperature
from evaluation.html_report import THUMB_SIDE, GalleryItem, pick_gallery, write_html_report
from evaluation.metrics import EvalResult
from evaluation.reports import headline_summary
from prediction.gradcam import save_gradcam_examples
from runs.run_folder import RunDir
from torch_trainer.phase import PhaseContext
from utils.csv_cells import save_frame_for_people

logger = logging.getLogger(__name__)


def write_run_report(ctx: PhaseContext, model: torch.nn.Module, splits: DataSplits, tested: list, targets: np.ndarray,
                      probs: np.ndarray, metrics: dict[str, Any]) -> None:
    """report.html, with Grad-CAM overlays of the most confident errors and the least confident correct answers."""
    errors, unsure = pick_gallery(targets, probs)

    def gallery(indices: list[int], folder: Path) -> list[GalleryItem]:
        samples = [tested[i] for i in indices]
        # The delivered answer (TTA and temperature included) is what the card shows and the overlay explains.
        answers = [(int(probs[i].argmax()), float(probs[i].max())) for i in indices]
        overlays = save_gradcam_examples(model, samples, ctx.info, ctx.image_decoder, folder, max_side=THUMB_SIDE,
                                         answers=answers) or [s.path for s in samples]
        return [GalleryItem(image, s.path.name, splits.class_names[s.label],
                            splits.class_names[int(probs[i].argmax())], float(probs[i].max()))
                for image, s, i in zip(overlays, samples, indices)]

    cfg = ctx.cfg
    run = ctx.run
    write_html_report(run.root, metrics, splits.class_names, counts=splits.counts(), figures=run.report_figures(),
                      audit=(run.audit_json, run.audit_pairs_png),
                      title=f"{cfg.model_name} on {Path(cfg.resolved_data_dir).name}",
                      subtitle=f"Run {run.name}: test split, delivered model ({metrics['weights']}), "
                               f"temperature {metrics.get('temperature', 1.0):.3f}",
                      gallery_errors=gallery(errors, run.report_gallery / "errors"),
                      gallery_unsure=gallery(unsure, run.report_gallery / "least_confident_correct"),
                      gallery_note="Each card shows the run's answer (flip TTA and temperature included, as in "
                                   "test_predictions.csv); the overlay is the Grad-CAM of that class. The dimmed "
                                   "border lies outside the centre crop the model saw.")


def write_test_predictions(run: RunDir, splits: DataSplits, test: EvalResult, temperature: float) -> None:
    """Each test image's label and calibrated probabilities: what paired comparisons between runs resample."""
    samples = [splits.test[i] for i in test.indices]
    probs = apply_temperature(test.probs, temperature)
    frame = pd.DataFrame({"filepath": [s.path.relative_to(splits.root).as_posix() for s in samples],
                          "label": test.targets,
                          **{f"prob_{name}": probs[:, k] for k, name in enumerate(splits.class_names)}})
    save_frame_for_people(run.test_predictions, frame)


def log_test(metrics: dict[str, Any], variants: dict[str, dict[str, Any]], refit: bool, tta: bool) -> None:
    def auc(values: dict) -> str:
        return f"{values['macro_auc']:.4f}" if values.get("macro_auc") is not None else "n/a"

    logger.info("test (%s%s), %d images: %s%s", "refit on train + validation" if refit else
                f"best epoch {metrics['best_epoch']}", ", flip TTA" if tta else "", metrics["n_images"],
                headline_summary(metrics), f"; ECE before temperature scaling {metrics['ece_uncalibrated']:.4f}"
                if "ece_uncalibrated" in metrics else "")
    for name, values in variants.items():
        logger.info("  variant %-9s balanced accuracy %.4f, accuracy %.4f, macro AUC %s", name,
                    values["balanced_accuracy"], values["accuracy"], auc(values))
