"""Labels (and optionally groups and the train/test split) from a metadata CSV, the way HAM10000/ISIC and most clinical
exports ship: one image folder plus ``image_id, lesion_id, dx``.

The file column is looked up among the images under the data folder by path, path under trainset/ or testset/, file
name, or name without extension (as ``dataloaders.groups`` does). The split comes from the split column
(train/trainset or test/testset) when one is named, else from the trainset/ or testset/ folder the image sits in.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from dataloaders.discovery import DatasetIndex, Sample, check_class_name, find_unreadable, list_images
from utils.errors import UserError

logger = logging.getLogger(__name__)

SPLIT_VALUES = {"train": "trainset", "trainset": "trainset", "test": "testset", "testset": "testset"}


@dataclass(frozen=True)
class CsvColumns:
    file: str = "filename"
    label: str = "label"
    group: Optional[str] = None
    split: Optional[str] = None


class ImageNames:
    """Looks a CSV's file name up among the dataset's images, by any of the spellings above."""

    def __init__(self, paths: Iterable[Path], root: Path) -> None:
        keys: dict[str, set[Path]] = {}
        for path in paths:
            relative = path.relative_to(root)
            # under the root, under the split folder, with the root's own name in front (a CSV written for the
            # dataset root used on its testset/), the file name, the name without extension
            for key in {relative.as_posix(), Path(*relative.parts[1:]).as_posix(),
                        (Path(root.name) / relative).as_posix(), path.name, path.stem}:
                keys.setdefault(key, set()).add(path)
        self.keys = keys

    def find(self, name: str) -> tuple[Optional[Path], str]:
        found = self.keys.get(name.strip().replace("\\", "/"), set())
        if len(found) == 1:
            return next(iter(found)), ""
        return None, "names several images; give the path under the dataset root" if found else "is not an image " \
                                                                                                 "of the dataset"


def _split_of(path: Path, root: Path, value: Optional[str], where: str) -> str:
    if value is not None:
        split = SPLIT_VALUES.get(value.strip().lower())
        if split is None:
            raise UserError(f"{where}: split {value!r} is not one of train, test")
        return split
    top = path.relative_to(root).parts[0]
    if top not in ("trainset", "testset"):
        raise UserError(f"{where}: {path.relative_to(root).as_posix()} is not under trainset/ or testset/; name a split "
                        f"column (--csv_split_column) or move the images")
    return top


# Korean Excel saves "CSV" as CP949 (a superset of EUC-KR) unless told otherwise; UTF-8 (with or without BOM) first.
CSV_ENCODINGS = ("utf-8-sig", "cp949")


def open_csv_text(csv_path: Path) -> io.StringIO:
    """The CSV's text for csv.reader: UTF-8 with or without BOM, else CP949/EUC-KR (said in the log); a file in
    neither is a one-line error naming it."""
    data = csv_path.read_bytes()
    for encoding in CSV_ENCODINGS:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding != CSV_ENCODINGS[0]:
            logger.info("%s is not UTF-8; read it as %s (Korean Excel's default)", csv_path, encoding.upper())
        return io.StringIO(text, newline="")
    raise UserError(f"{csv_path} is neither UTF-8 nor CP949/EUC-KR text; save it from Excel as "
                    f"'CSV UTF-8 (comma delimited)'")


def read_label_rows(csv_path: Path, paths: list[Path], root: Path, columns: CsvColumns
                    ) -> Iterator[tuple[str, Path, str, Optional[str], Optional[str]]]:
    """Each row as (where, image path, label, group, split value), validated: a missing column, an unknown file, an
    empty label or group, or an image listed twice is a one-line error naming the file and line."""
    if not csv_path.is_file():
        raise UserError(f"--labels_csv {csv_path}: file not found")
    names = ImageNames(paths, root)
    seen: set[Path] = set()
    with open_csv_text(csv_path) as handle:
        reader = csv.DictReader(handle)
        wanted = [c for c in (columns.file, columns.label, columns.group, columns.split) if c]
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{csv_path}: no column {', '.join(map(repr, missing))} (columns are {reader.fieldnames}); "
                            f"name the right ones with --csv_file_column/--csv_label_column/--csv_group_column/"
                            f"--csv_split_column")
        for line, row in enumerate(reader, start=2):
            where = f"{csv_path} line {line}"
            path, problem = names.find(row[columns.file] or "")
            if path is None:
                raise UserError(f"{where}: {columns.file} {row[columns.file]!r} {problem}")
            label = (row[columns.label] or "").strip()
            if not label:
                raise UserError(f"{where}: {row[columns.file]!r} has an empty {columns.label}")
            group = (row[columns.group] or "").strip() if columns.group else None
            if columns.group and not group:
                raise UserError(f"{where}: {row[columns.file]!r} has an empty {columns.group}; give every listed image "
                                f"a group")
            if path in seen:
                raise UserError(f"{where}: {row[columns.file]!r} is listed twice; one row per image")
            seen.add(path)
            yield where, path, label, group, row[columns.split] if columns.split else None


def _loose_split(path: Path, root: Path) -> str:
    return "testset" if path.relative_to(root).parts[0] == "testset" else "trainset"


def index_from_labels_csv(csv_path: Path, root: Path, columns: CsvColumns = CsvColumns(), num_threads: int = 2,
                          for_training: bool = True) -> tuple[DatasetIndex, Optional[dict[Path, str]]]:
    """The labelled images the CSV lists, as a DatasetIndex (classes sorted by name), and their groups when a group
    column is named. Images under ``root`` that the CSV does not list are left out. ``for_training``: insist on
    two training classes and a test split (the audit takes any labelled rows)."""
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (set --data_dir to the folder holding the CSV's images)")
    rows: list[tuple[Path, str, str, Optional[str]]] = []
    for where, path, label, group, split_value in read_label_rows(csv_path, list_images(root), root, columns):
        split = (_split_of(path, root, split_value, where) if for_training or columns.split
                 else _loose_split(path, root))
        check_class_name(label, where)
        rows.append((path, label, split, group))
    if not for_training:
        class_names = sorted({label for _, label, _, _ in rows})
        index_of = {name: i for i, name in enumerate(class_names)}
        return DatasetIndex(root, class_names, [Sample(p, index_of[label]) for p, label, s, _ in rows if s != "testset"],
                            [Sample(p, index_of[label]) for p, label, s, _ in rows if s == "testset"]), None
    class_names = sorted({label for _, label, split, _ in rows if split == "trainset"})
    if len(class_names) < 2:
        raise UserError(f"{csv_path}: the training rows hold {len(class_names)} class(es); a classifier needs at least 2")
    unknown = sorted({label for _, label, split, _ in rows if split == "testset"} - set(class_names))
    if unknown:
        raise UserError(f"{csv_path}: test rows have classes with no training row: {unknown}")
    unreadable = find_unreadable([p for p, *_ in rows], num_threads)
    for path, reason in sorted(unreadable.items()):
        logger.warning("skipping %s: %s", path, reason)
    rows = [r for r in rows if r[0] not in unreadable]
    index_of = {name: i for i, name in enumerate(class_names)}
    samples = {split: sorted((Sample(p, index_of[label]) for p, label, s, _ in rows if s == split),
                             key=lambda s: s.path.as_posix()) for split in ("trainset", "testset")}
    if not samples["testset"]:
        raise UserError(f"{csv_path}: no test rows; name a split column with test rows or put test images under "
                        f"testset/")
    groups = {p: g for p, _, _, g in rows if g} if columns.group else None
    return DatasetIndex(root, class_names, samples["trainset"], samples["testset"], sorted(unreadable.items())), groups
