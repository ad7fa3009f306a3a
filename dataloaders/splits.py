"""Train/validation/test splits: a stratified, seeded hold-out from trainset, saved as CSV in the run folder."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dataloaders.discovery import DatasetIndex, Sample
from utils.atomic import atomic_path
from utils.errors import UserError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class DataSplits:
    root: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[Path, str]]

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: {name: sum(s.label == i for s in getattr(self, split)) for i, name in
                        enumerate(self.class_names)} for split in SPLIT_NAMES}


def stratified_split(samples: list[Sample], val_ratio: float, seed: int,
                     class_names: list[str]) -> tuple[list[Sample], list[Sample]]:
    from sklearn.model_selection import train_test_split

    labels = [s.label for s in samples]
    for label, name in enumerate(class_names):
        if labels.count(label) < 2:
            raise UserError(f"class {name!r} has {labels.count(label)} training image(s); at least 2 are needed "
                            f"to hold one out for validation")
    try:
        train, val = train_test_split(samples, test_size=val_ratio, random_state=seed, stratify=labels)
    except ValueError as err:
        raise UserError(f"cannot make a stratified validation split with --val_ratio {val_ratio}: {err}") from err
    order = lambda s: (s.label, s.path.as_posix())  # noqa: E731 - sorted lists make the saved splits diffable
    return sorted(train, key=order), sorted(val, key=order)


def split_dataset(index: DatasetIndex, val_ratio: float, seed: int) -> DataSplits:
    train, val = stratified_split(index.train, val_ratio, seed, index.class_names)
    return DataSplits(index.root, index.class_names, train, val, index.test, index.skipped)


def _write_split_csv(path: Path, samples: list[Sample], root: Path, class_names: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label", "class_name"])
        for s in samples:
            writer.writerow([s.path.relative_to(root).as_posix(), s.label, class_names[s.label]])


def read_split_csv(path: Path, root: Path) -> list[Sample]:
    if not path.is_file():
        raise UserError(f"{path} is missing; cannot rebuild the run's data split")
    with open(path, newline="", encoding="utf-8") as handle:
        return [Sample(root / row["filepath"], int(row["label"])) for row in csv.DictReader(handle)]


def save_splits(run_dir: Path, splits: DataSplits) -> None:
    for split in SPLIT_NAMES:
        _write_split_csv(run_dir / f"split_{split}.csv", getattr(splits, split), splits.root, splits.class_names)
    with atomic_path(run_dir / "skipped_files.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "reason"])
        writer.writerows([p.as_posix(), reason] for p, reason in splits.skipped)


def load_splits(run_dir: Path, root: Path, class_names: list[str]) -> DataSplits:
    lists = {split: read_split_csv(run_dir / f"split_{split}.csv", root) for split in SPLIT_NAMES}
    return DataSplits(root, class_names, lists["train"], lists["val"], lists["test"], skipped=[])
