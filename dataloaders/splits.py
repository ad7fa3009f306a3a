"""Train/validation/test splits: a stratified, seeded hold-out from trainset, saved as CSV in the run folder.

With groups (patients, lesions, copies of one photo), the hold-out and the folds never split a group and stay
stratified as far as the groups allow (scikit-learn's StratifiedGroupKFold); each image's group is saved in the CSVs.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dataloaders.discovery import DatasetIndex, Sample
from utils.atomic import atomic_path
from utils.csv_cells import neutralise, restore
from utils.errors import UserError

SPLIT_NAMES = ("train", "val", "test")
logger = logging.getLogger(__name__)



@dataclass
class DataSplits:
    root: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[Path, str]]
    folds: Optional[list[int]] = None  # --folds K: each train sample's fold (0..K-1); val is then empty
    groups: Optional[dict[Path, str]] = None  # each image's group, where groups are known
    audit: Any = None  # the dataset audit (dataloaders.audit.DatasetAudit) of a new run, written into its folder

    def group_of(self, samples: list[Sample]) -> Optional[list[str]]:
        return [self.groups[s.path] for s in samples] if self.groups is not None else None

    def fold(self, k: int) -> tuple[list[Sample], list[Sample]]:
        """Fold ``k``'s training images (every other fold) and held-out images."""
        assert self.folds is not None
        train = [s for s, f in zip(self.train, self.folds) if f != k]
        held_out = [s for s, f in zip(self.train, self.folds) if f == k]
        return train, held_out

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: {name: sum(s.label == i for s in getattr(self, split)) for i, name in
                        enumerate(self.class_names)} for split in SPLIT_NAMES}


# A file name that is not UTF-8 (CP949 bytes from a Korean Windows zip) is written as its own bytes and read back
# as the same name: these CSVs are the run's record of which files it used.
NAME_BYTES = "surrogateescape"


def stratified_split(samples: list[Sample], val_ratio: float, seed: int, class_names: list[str],
                     groups: Optional[dict[Path, str]] = None) -> tuple[list[Sample], list[Sample]]:
    from sklearn.model_selection import train_test_split

    labels = [s.label for s in samples]
    for label, name in enumerate(class_names):
        if labels.count(label) < 2:
            raise UserError(f"class {name!r} has {labels.count(label)} training image(s); at least 2 are needed "
                            f"to hold one out for validation")
    if groups is not None:
        train, val = _grouped_holdout(samples, labels, val_ratio, seed, class_names, groups)
    else:
        try:
            train, val = train_test_split(samples, test_size=val_ratio, random_state=seed, stratify=labels)
        except ValueError as err:
            raise UserError(f"cannot make a stratified validation split with --val_ratio {val_ratio}: {err}") from err
    order = lambda s: (s.label, s.path.as_posix())  # noqa: E731 - sorted lists make the saved splits diffable
    return sorted(train, key=order), sorted(val, key=order)


def _grouped_holdout(samples: list[Sample], labels: list[int], val_ratio: float, seed: int, class_names: list[str],
                     groups: dict[Path, str]) -> tuple[list[Sample], list[Sample]]:
    """One fold of a StratifiedGroupKFold with about 1/val_ratio folds as the validation split."""
    from sklearn.model_selection import StratifiedGroupKFold

    group_ids = [groups[s.path] for s in samples]
    n_splits = max(2, round(1 / val_ratio))
    if len(set(group_ids)) < n_splits:
        raise UserError(f"{len(set(group_ids))} group(s) cannot make a grouped validation split of --val_ratio "
                        f"{val_ratio}; give more groups or a larger --val_ratio")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(samples, labels, group_ids))
    train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    for label, name in enumerate(class_names):
        if not any(s.label == label for s in train):
            raise UserError(f"every group holding class {name!r} fell into validation; the class needs images in "
                            f"more groups")
        if not any(s.label == label for s in val):
            logger.warning("grouped validation split: class %r has no validation image (its images sit in too few "
                           "groups)", name)
    return train, val


def check_fold_count(labels: list[int], k: int, class_names: list[str]) -> None:
    """--folds K needs K training images in every class (a one-line error, before any slow work)."""
    smallest = min(range(len(class_names)), key=labels.count)
    if labels.count(smallest) < k:
        raise UserError(f"--folds {k} is more than class {class_names[smallest]!r} has training images "
                        f"({labels.count(smallest)}); use --folds {max(labels.count(smallest), 2)} or fewer, or 0 "
                        f"for one validation split")


def assign_folds(samples: list[Sample], k: int, seed: int, class_names: list[str],
                 groups: Optional[dict[Path, str]] = None) -> list[int]:
    """Stratified K-fold assignment (scikit-learn, seeded): every image in exactly one fold, a group's images in
    one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = [s.label for s in samples]
    check_fold_count(labels, k, class_names)
    folds = [0] * len(samples)
    group_ids = [groups[s.path] for s in samples] if groups is not None else None
    if group_ids is not None and len(set(group_ids)) < k:
        raise UserError(f"--folds {k} needs at least {k} groups; the training images form {len(set(group_ids))}")
    splitter = (StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed) if group_ids is not None
                else StratifiedKFold(n_splits=k, shuffle=True, random_state=seed))
    for fold, (_, held_out) in enumerate(splitter.split(samples, labels, group_ids)):
        for i in held_out:
            folds[i] = fold
    return folds


def split_dataset(index: DatasetIndex, val_ratio: float, seed: int, folds: int = 0,
                  groups: Optional[dict[Path, str]] = None) -> DataSplits:
    if folds:
        order = lambda s: (s.label, s.path.as_posix())  # noqa: E731
        train = sorted(index.train, key=order)
        return DataSplits(index.root, index.class_names, train, [], index.test, index.skipped,
                          folds=assign_folds(train, folds, seed, index.class_names, groups), groups=groups)
    train, val = stratified_split(index.train, val_ratio, seed, index.class_names, groups)
    return DataSplits(index.root, index.class_names, train, val, index.test, index.skipped, groups=groups)


def write_split_csv(path: Path, samples: list[Sample], root: Path, class_names: list[str],
                     groups: Optional[dict[Path, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=NAME_BYTES) as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label", "class_name"] + (["group"] if groups is not None else []))
        for s in samples:
            writer.writerow([neutralise(s.path.relative_to(root).as_posix()), s.label, neutralise(class_names[s.label])]
                            + ([neutralise(groups[s.path])] if groups is not None else []))


def read_split_csv(path: Path, root: Path, groups: Optional[dict[Path, str]] = None) -> list[Sample]:
    """The split's samples; with ``groups`` (a dict to fill), also each image's group where the CSV has one."""
    if not path.is_file():
        raise UserError(f"{path} is missing; cannot rebuild the run's data split")
    samples = []
    with open(path, newline="", encoding="utf-8", errors=NAME_BYTES) as handle:
        for row in csv.DictReader(handle):
            samples.append(Sample(root / restore(row["filepath"]), int(row["label"])))
            if groups is not None and row.get("group"):
                groups[samples[-1].path] = restore(row["group"])
    return samples


def write_skipped_csv(path: Path, skipped: list[tuple[Path, str]]) -> None:
    """The unreadable files left out of the split, with the reason."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=NAME_BYTES) as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "reason"])
        writer.writerows([neutralise(p.as_posix()), neutralise(reason)] for p, reason in skipped)


def write_folds_csv(path: Path, splits: DataSplits) -> None:
    """--folds K: each training image's fold (1..K)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=NAME_BYTES) as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label", "class_name", "fold"])
        for s, fold in zip(splits.train, splits.folds):
            writer.writerow([neutralise(s.path.relative_to(splits.root).as_posix()), s.label,
                             neutralise(splits.class_names[s.label]), fold + 1])


def read_folds_csv(path: Path, root: Path, train: list[Sample]) -> list[int]:
    """Each of ``train``'s images' fold (0-based), as write_folds_csv recorded it."""
    with open(path, newline="", encoding="utf-8", errors=NAME_BYTES) as handle:
        by_path = {restore(row["filepath"]): int(row["fold"]) - 1 for row in csv.DictReader(handle)}
    return [by_path[s.path.relative_to(root).as_posix()] for s in train]
