"""The run folder: ``RunDir`` names every file in it and reads or writes each one; no other module spells a run-folder
file name. Files that other commands also write elsewhere are named by their writer and reached through RunDir:
the classification report (``evaluation.reports``: also beside a labelled inference), ``report.html``
(``evaluation.html_report``) and the data audit (``dataloaders.audit``: also ``audit_dataset.py``'s output).

save_results/dataset+<data>/model+<model>/<YYYY-MM-DD_HH-MM-SS>/
    class_info.json      classes + model name + preprocessing: all that inference/export need to rebuild
                         (read and written only through runs.run_info.RunInfo)
    configs.json         the resolved training config
    model_last.pth / model_best.pth   checkpoints (model, optimizer, scheduler, epoch, metric, config)
    model_refit.pth, refit_log.csv    the refit on train + validation (--refit), the delivered model when present
    log.csv, learning_curves.png, train.log, run_status.json
    val_metrics.json     the selected model on the held-out validation split (before the refit saw it)
    heldout_predictions.csv   the calibrated held-out predictions the thresholds were chosen on
    --folds K: folds.csv, fold_<k>/ (log.csv, model_best.pth, model_last.pth), oof_metrics.json,
               oof_predictions.csv (every training image predicted by the fold model that did not train on it)
    split_train.csv / split_val.csv / split_test.csv, skipped_files.csv
    data_audit.json, duplicates.csv, duplicate_pairs.png   the data audit
    test_metrics.json (with 95% bootstrap intervals), per_class_metrics.csv, roc_curves.png,
    reliability_diagram.png, risk_coverage.png, confusion_matrix_test.csv/.png, subgroup_metrics.csv (--metadata),
    test_predictions.csv (each test image's label and calibrated probabilities; paired comparisons resample it)
    report.html, report_gallery/, gradcam_examples/, wandb/
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from dataloaders import audit as audit_files
from dataloaders.discovery import Sample
from dataloaders.splits import (
    SPLIT_NAMES,
    DataSplits,
    read_folds_csv,
    read_split_csv,
    write_folds_csv,
    write_skipped_csv,
    write_split_csv,
)
from evaluation import html_report, reports
from evaluation.plots import plot_learning_curves
from utils.atomic import atomic_save, atomic_write_json
from utils.errors import UserError

logger = logging.getLogger(__name__)

LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "val_macro_auc", "lr",
               "epoch_seconds", "train_images_per_s", "data_loading_fraction"]
REFIT_LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "lr", "epoch_seconds", "train_images_per_s",
                     "data_loading_fraction"]
# Columns that must be identical between two CPU runs with the same seed (timings are not).
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "val_macro_auc", "lr"]


@dataclass(frozen=True)
class RunDir:
    """One run folder (or one fold's sub-folder of it): every file's path, and typed reading and writing."""

    root: Path

    CLASS_INFO = "class_info.json"
    CONFIGS = "configs.json"
    LAST_CKPT = "model_last.pth"
    BEST_CKPT = "model_best.pth"
    REFIT_CKPT = "model_refit.pth"
    LOG_CSV = "log.csv"
    REFIT_LOG_CSV = "refit_log.csv"
    LEARNING_CURVES = "learning_curves.png"
    TRAIN_LOG = "train.log"
    STATUS = "run_status.json"
    VAL_METRICS = "val_metrics.json"
    OOF_METRICS = "oof_metrics.json"
    OOF_PREDICTIONS = "oof_predictions.csv"
    HELD_OUT_PREDICTIONS = "heldout_predictions.csv"
    TEST_METRICS = "test_metrics.json"
    TEST_CONFUSION = "confusion_matrix_test"  # .csv and .png
    TEST_PREDICTIONS = "test_predictions.csv"
    SPLIT_CSV = "split_{split}.csv"
    SKIPPED_CSV = "skipped_files.csv"
    FOLDS_CSV = "folds.csv"
    FOLD_DIR = "fold_{fold}"  # 1-based
    REPORT_GALLERY = "report_gallery"
    GRADCAM_EXAMPLES = "gradcam_examples"
    WANDB_DIR = "wandb"  # W&B's own name for its records (it appends it to the folder it is given)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def file_names(cls) -> dict[str, str]:
        """Every name a run folder uses ({} where a split or fold number goes), with the module that spells it."""
        own = {value: __name__ for key, value in vars(cls).items()
               if key.isupper() and isinstance(value, str) and key != "WANDB_DIR"}
        borrowed = {html_report.REPORT_HTML: html_report.__name__}
        report_files = (reports.PER_CLASS_CSV, reports.SUBGROUP_CSV, reports.ROC_PNG, reports.RELIABILITY_PNG,
                        reports.RISK_COVERAGE_PNG)
        borrowed.update({name: reports.__name__ for name in report_files})
        borrowed.update({name: audit_files.__name__ for name in (audit_files.AUDIT_JSON, audit_files.DUPLICATES_CSV,
                                                                 audit_files.PAIRS_PNG)})
        return {**own, **borrowed}

    # --- finding and creating ---
    @classmethod
    def create(cls, save_dir: str | Path, data_name: str, model_name: str) -> "RunDir":
        """A new, empty ``<save_dir>/dataset+<data>/model+<model>/<timestamp>[_n]/``."""
        parent = Path(save_dir) / f"dataset+{data_name}" / f"model+{model_name}"
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        for n in itertools.count():
            run_dir = parent / (stamp if n == 0 else f"{stamp}_{n}")
            try:
                # mkdir without exist_ok is atomic: of two runs started in the same second (sweeps, parallel jobs),
                # exactly one creates a given name and the other moves on to the next suffix.
                run_dir.mkdir(parents=True, exist_ok=False)
                return cls(run_dir)
            except FileExistsError:
                continue

    @property
    def name(self) -> str:
        return self.root.name

    def fold(self, fold: int) -> "RunDir":
        """Fold ``fold`` (0-based) of --folds K: its own sub-folder ``fold_<fold+1>/`` with the same file names."""
        return RunDir(self.root / self.FOLD_DIR.format(fold=fold + 1))

    # --- paths ---
    def _path(self, name: str) -> Path:
        return self.root / name

    class_info = property(lambda self: self._path(self.CLASS_INFO))
    configs = property(lambda self: self._path(self.CONFIGS))
    last_ckpt = property(lambda self: self._path(self.LAST_CKPT))
    best_ckpt = property(lambda self: self._path(self.BEST_CKPT))
    refit_ckpt = property(lambda self: self._path(self.REFIT_CKPT))
    log_csv = property(lambda self: self._path(self.LOG_CSV))
    refit_log_csv = property(lambda self: self._path(self.REFIT_LOG_CSV))
    train_log = property(lambda self: self._path(self.TRAIN_LOG))
    status = property(lambda self: self._path(self.STATUS))
    val_metrics = property(lambda self: self._path(self.VAL_METRICS))
    oof_metrics = property(lambda self: self._path(self.OOF_METRICS))
    oof_predictions = property(lambda self: self._path(self.OOF_PREDICTIONS))
    held_out_predictions = property(lambda self: self._path(self.HELD_OUT_PREDICTIONS))
    test_metrics = property(lambda self: self._path(self.TEST_METRICS))
    test_confusion_png = property(lambda self: self._path(f"{self.TEST_CONFUSION}.png"))
    test_predictions = property(lambda self: self._path(self.TEST_PREDICTIONS))
    skipped_csv = property(lambda self: self._path(self.SKIPPED_CSV))
    folds_csv = property(lambda self: self._path(self.FOLDS_CSV))
    report_gallery = property(lambda self: self._path(self.REPORT_GALLERY))
    gradcam_examples = property(lambda self: self._path(self.GRADCAM_EXAMPLES))
    wandb_dir = property(lambda self: self._path(self.WANDB_DIR))
    report_html = property(lambda self: self._path(html_report.REPORT_HTML))
    audit_json = property(lambda self: self._path(audit_files.AUDIT_JSON))
    audit_pairs_png = property(lambda self: self._path(audit_files.PAIRS_PNG))

    def split_csv(self, split: str) -> Path:
        return self._path(self.SPLIT_CSV.format(split=split))

    def checkpoint(self, weights: str, delivered: str) -> Path:
        """``final`` (``delivered``: the file class_info.json names), ``best`` or ``last``."""
        return self._path({"final": delivered, "best": self.BEST_CKPT, "last": self.LAST_CKPT}[weights])

    def report_figures(self) -> list[tuple[Path, str]]:
        """The figures report.html shows for this run, in order."""
        return [(self._path(self.LEARNING_CURVES), "Learning curves")] + reports.report_figures(
            self.root, self.TEST_CONFUSION)

    # --- typed reading and writing ---
    def read_configs(self) -> dict[str, Any]:
        if not self.configs.is_file():
            raise UserError(f"{self.configs} not found; pass a run folder written by main.py")
        values = json.loads(self.configs.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise UserError(f"{self.configs} is not a configs.json written by main.py")
        return values

    def write_configs(self, values: dict[str, Any]) -> None:
        atomic_write_json(self.configs, values)

    def dataset_root(self, data_dir: Optional[str] = None) -> Path:
        """The run's dataset folder as recorded in configs.json, or ``data_dir`` where it moved."""
        configs = self.read_configs()
        root = Path(data_dir or configs.get("data_dir") or Path("data") / f"{configs['data_name']}_dataset")
        if not root.is_dir():
            raise UserError(f"dataset folder {root} (recorded in {self.configs}) not found; pass --data_dir with "
                            f"its new location")
        return root

    def split(self, split: str, data_dir: Optional[str] = None) -> list[Sample]:
        """The run's saved ``split`` ("train", "val", "test") resolved against its dataset folder (or ``data_dir``)."""
        return read_split_csv(self.split_csv(split), self.dataset_root(data_dir))

    def write_splits(self, splits: DataSplits) -> None:
        for split in SPLIT_NAMES:
            write_split_csv(self.split_csv(split), getattr(splits, split), splits.root, splits.class_names,
                            splits.groups)
        write_skipped_csv(self.skipped_csv, splits.skipped)
        if splits.folds is not None:
            write_folds_csv(self.folds_csv, splits)

    def read_splits(self, root: Path, class_names: list[str]) -> DataSplits:
        groups: dict[Path, str] = {}
        lists = {split: read_split_csv(self.split_csv(split), root, groups) for split in SPLIT_NAMES}
        folds = read_folds_csv(self.folds_csv, root, lists["train"]) if self.folds_csv.is_file() else None
        return DataSplits(root, class_names, lists["train"], lists["val"], lists["test"], skipped=[], folds=folds,
                          groups=groups or None)

    def read_status(self) -> dict[str, Any]:
        """run_status.json (``{"state": running|interrupted|failed|finished, ...}``); {} when there is none."""
        try:
            values = json.loads(self.status.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return values if isinstance(values, dict) else {}

    def write_status(self, state: str, **details: Any) -> None:
        atomic_write_json(self.status, {"state": state, "updated": dt.datetime.now().isoformat(timespec="seconds"),
                                        **details})


LATEST = "latest"
DEFAULT_SAVE_DIR = Path("save_results")  # main.py's --save_dir default


def resolve_model_path(model_path: str | Path, save_dir: str | Path = DEFAULT_SAVE_DIR) -> Path:
    """``--model_path latest`` is the newest finished run under ``save_dir`` (by its timestamp name); any other value is
    the run folder itself. A user pastes the same command after every training run without copying a timestamp."""
    if str(model_path).strip().lower() != LATEST:
        return Path(model_path)
    finished = [RunDir(status.parent) for status in Path(save_dir).glob(f"dataset+*/model+*/*/{RunDir.STATUS}")]
    finished = [run for run in finished if run.read_status().get("state") == "finished"]
    if not finished:
        raise UserError(f"--model_path latest: no finished run under {save_dir}/; train one with main.py "
                        f"(or pass a run folder)")
    newest = max(finished, key=lambda run: (run.name, str(run.root)))
    logger.info("--model_path latest: %s", newest.root)
    return newest.root


def append_log_row(path: Path, row: dict[str, Any], with_validation: bool = True) -> pd.DataFrame:
    """Add an epoch's row to a phase's log (``log.csv``, ``fold_<k>/log.csv``: and redraw the learning curves beside
    it) or, without validation columns, to ``refit_log.csv``."""
    columns = LOG_COLUMNS if with_validation else REFIT_LOG_COLUMNS
    log = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=columns)
    log = log[log["epoch"] < row["epoch"]]  # a resumed run replaces rows past its checkpoint
    new_row = pd.DataFrame([row], columns=columns)
    log = pd.concat([log, new_row], ignore_index=True) if len(log) else new_row
    atomic_save(path, lambda tmp: log.to_csv(tmp, index=False))
    # One picture per run folder: the selection phase, and the refit beside it once it runs.
    selection_log = path if with_validation else path.parent / RunDir.LOG_CSV
    refit_log = path.parent / RunDir.REFIT_LOG_CSV
    if selection_log.is_file():
        plot_learning_curves(log if with_validation else pd.read_csv(selection_log),
                             path.parent / RunDir.LEARNING_CURVES,
                             log if not with_validation else pd.read_csv(refit_log) if refit_log.is_file() else None)
    return log


def truncate_log(path: Path, last_epoch: int) -> None:
    """Keep a phase log's rows up to ``last_epoch`` (1-based), the epoch a resumed checkpoint finished."""
    if path.is_file():
        log = pd.read_csv(path)
        log = log[log["epoch"] <= last_epoch]
        atomic_save(path, lambda tmp: log.to_csv(tmp, index=False))
