"""Matplotlib figures for the run folder, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless machines and CI have no display
# Class and file names are text, never math: "$" in a name ("price $5", "$x^$") must not go to the mathtext parser.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from utils.atomic import atomic_save  # noqa: E402


def save_figure(fig, path: Path) -> None:
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix[1:]))
    plt.close(fig)


def plot_learning_curves(log: pd.DataFrame, path: Path, refit_log: Optional[pd.DataFrame] = None) -> None:
    """Loss and accuracy per epoch of the selection phase and, when there is one, of the refit on train + validation
    (no validation curve: the refit trains on it)."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(log["epoch"], log["train_loss"], "o-", label="train")
    ax_loss.plot(log["epoch"], log["val_loss"], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(log["epoch"], log["train_acc"], "o-", label="train accuracy")
    ax_acc.plot(log["epoch"], log["val_acc"], "o-", label="validation accuracy")
    ax_acc.plot(log["epoch"], log["val_balanced_acc"], "s--", label="validation balanced accuracy")
    if refit_log is not None and len(refit_log):
        ax_loss.plot(refit_log["epoch"], refit_log["train_loss"], "^:", color="black", label="refit (train + val)")
        ax_acc.plot(refit_log["epoch"], refit_log["train_acc"], "^:", color="black",
                    label="refit train accuracy (train + val)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    save_figure(fig, path)


def plot_confusion_matrix(matrix, class_names: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.9 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                    xticks_rotation=45)
    ax.set_title(title)
    save_figure(fig, path)


def plot_roc_curves(curves, aucs, class_names: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for name, curve, auc in zip(class_names, curves, aucs):
        if curve is not None:
            ax.plot(curve[0], curve[1], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           title="One-vs-rest ROC curves", xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def plot_reliability(bins_by_label: dict[str, pd.DataFrame], eces: dict[str, float], path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin (one line per calibration state)."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    for label, bins in bins_by_label.items():
        used = bins[bins["count"] > 0]
        ax.plot(used["confidence"], used["accuracy"], "o-", label=f"{label} (ECE {eces[label]:.3f})")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", title="Reliability diagram",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def plot_risk_coverage(coverage, risk, aurc: float, path: Path, threshold_point=None) -> None:
    """Selective risk (error rate among answered images) against coverage when the least confident images are left
    unanswered; ``threshold_point`` = (coverage, risk) of the chosen abstention threshold."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(coverage, risk, "-", label=f"model (AURC {aurc:.3f})")
    if threshold_point is not None:
        ax.plot(*threshold_point, "o", color="C3", label="abstention threshold")
    ax.set(xlabel="coverage (share of images answered)", ylabel="selective risk (error rate)", xlim=(0, 1),
           ylim=(0, max(0.05, float(max(risk)) * 1.1)), title="Risk-coverage")
    ax.legend(fontsize=8)
    save_figure(fig, path)
