"""The run folder: its layout, the files every later script reads back, and the reports written into it.

save_results/dataset+<data>/model+<model>/<YYYY-MM-DD_HH-MM-SS>/
    class_info.json      classes + model name + preprocessing: all that inference/export need to rebuild
                         (read and written only through runs.run_info.RunInfo)
    configs.json         the resolved training config
    model_last.pth / model_best.pth   checkpoints (model, optimizer, scheduler, epoch, metric, config)
    model_refit.pth, refit_log.csv    the refit on train + validation (--refit), the delivered model when present
    log.csv, learning_curves.png, train.log, run_status.json
    val_metrics.json     the selected model on the held-out validation split (before the refit saw it)
    --folds K: folds.csv, fold_<k>/ (log.csv, model_best.pth, model_last.pth), oof_metrics.json,
               oof_predictions.csv (every training image predicted by the fold model that did not train on it)
    split_train.csv / split_val.csv / split_test.csv, skipped_files.csv
    test_metrics.json (with 95% bootstrap intervals), per_class_metrics.csv, roc_curves.png,
    reliability_diagram.png, confusion_matrix_test.csv, confusion_matrix_test.png,
    test_predictions.csv (each test image's label and calibrated probabilities; paired comparisons resample it)
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd

from dataloaders.discovery import Sample
from dataloaders.splits import read_split_csv
from evaluation.plots import plot_learning_curves
from utils.atomic import atomic_save, atomic_write_json
from utils.errors import UserError

CLASS_INFO = "class_info.json"
CONFIGS = "configs.json"
LAST_CKPT = "model_last.pth"
BEST_CKPT = "model_best.pth"
REFIT_CKPT = "model_refit.pth"
LOG_CSV = "log.csv"
REFIT_LOG_CSV = "refit_log.csv"
VAL_METRICS = "val_metrics.json"
OOF_METRICS = "oof_metrics.json"
OOF_PREDICTIONS = "oof_predictions.csv"
TEST_PREDICTIONS = "test_predictions.csv"
STATUS = "run_status.json"
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "val_macro_auc", "lr",
               "epoch_seconds", "train_images_per_s", "data_loading_fraction"]
REFIT_LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "lr", "epoch_seconds", "train_images_per_s",
                     "data_loading_fraction"]
# Columns that must be identical between two CPU runs with the same seed (timings are not).
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "val_macro_auc", "lr"]


def create_run_dir(save_dir: str | Path, data_name: str, model_name: str) -> Path:
    parent = Path(save_dir) / f"dataset+{data_name}" / f"model+{model_name}"
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run_dir, n = parent / stamp, 1
    while run_dir.exists():  # two runs started in the same second (sweeps, tests)
        run_dir, n = parent / f"{stamp}_{n}", n + 1
    run_dir.mkdir(parents=True)
    return run_dir


def dataset_root(run_dir: str | Path, data_dir: str | None = None) -> Path:
    """The run's dataset folder as recorded in configs.json, or ``data_dir`` where it moved."""
    run_dir = Path(run_dir)
    configs = json.loads((run_dir / CONFIGS).read_text(encoding="utf-8"))
    root = Path(data_dir or configs.get("data_dir") or Path("data") / f"{configs['data_name']}_dataset")
    if not root.is_dir():
        raise UserError(f"dataset folder {root} (recorded in {run_dir / CONFIGS}) not found; pass --data_dir with "
                        f"its new location")
    return root


def run_split(run_dir: str | Path, split: str, data_dir: str | None = None) -> list[Sample]:
    """The run's saved ``split`` ("train", "val", "test") resolved against its dataset folder (or ``data_dir``)."""
    return read_split_csv(Path(run_dir) / f"split_{split}.csv", dataset_root(run_dir, data_dir))


def write_status(run_dir: Path, state: str, **details: Any) -> None:
    atomic_write_json(run_dir / STATUS, {"state": state, "updated": dt.datetime.now().isoformat(timespec="seconds"),
                                         **details})


def append_log_row(run_dir: Path, row: dict[str, Any], name: str = LOG_CSV,
                   with_validation: bool = True) -> pd.DataFrame:
    """Add an epoch's row to a phase's log (``log.csv``, ``fold_<k>/log.csv``: and redraw its learning curves) or,
    without validation columns, to ``refit_log.csv``."""
    columns = LOG_COLUMNS if with_validation else REFIT_LOG_COLUMNS
    path = run_dir / name
    log = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=columns)
    log = log[log["epoch"] < row["epoch"]]  # a resumed run replaces rows past its checkpoint
    new_row = pd.DataFrame([row], columns=columns)
    log = pd.concat([log, new_row], ignore_index=True) if len(log) else new_row
    atomic_save(path, lambda tmp: log.to_csv(tmp, index=False))
    if with_validation:
        plot_learning_curves(log, path.parent / "learning_curves.png")
    return log


def fold_dir_name(fold: int) -> str:
    return f"fold_{fold + 1}"


def truncate_log(run_dir: Path, last_epoch: int, name: str = LOG_CSV) -> None:
    """Keep log rows up to ``last_epoch`` (1-based), the epoch a resumed checkpoint finished."""
    path = run_dir / name
    if path.is_file():
        log = pd.read_csv(path)
        log = log[log["epoch"] <= last_epoch]
        atomic_save(path, lambda tmp: log.to_csv(tmp, index=False))
