"""A worked example of a dataset reader: ``--data_format list_files`` reads ``trainset.txt`` and ``testset.txt`` in the
data folder, one ``<image path> <class>`` per line (paths relative to the data folder; the class is the last word, so
paths may hold spaces; ``#`` starts a comment), the layout of many academic benchmark lists.

A reader only turns a data folder into a ``DatasetIndex`` (class names, training and test ``Sample``s, skipped files);
the audit, groups, split, training, reports and export then work unchanged. To add another format, write a function
like ``index_from_list_files`` and add it to ``dataloaders.prepare.DATASET_READERS`` and its name to
``configs.DATA_FORMATS``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dataloaders.discovery import DatasetIndex, Sample, check_class_name, find_unreadable
from utils.errors import UserError

logger = logging.getLogger(__name__)

LIST_FILES = {"trainset": "trainset.txt", "testset": "testset.txt"}


def read_list_file(list_file: Path, root: Path) -> list[tuple[Path, str]]:
    """``(image path, class name)`` per line of ``list_file``; a wrong line is a one-line error naming file and line."""
    if not list_file.is_file():
        raise UserError(f"{list_file} not found: --data_format list_files needs trainset.txt and testset.txt in "
                        f"{root} with '<image path> <class>' lines")
    entries = []
    seen: dict[Path, int] = {}
    for number, line in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if " " not in line:
            raise UserError(f"{list_file}:{number}: expected '<image path> <class>', got {line!r}")
        relative, label = line.rsplit(" ", 1)
        path = Path(os.path.normpath(root / relative.strip()))
        if not path.is_relative_to(Path(os.path.normpath(root))):
            raise UserError(f"{list_file}:{number}: {relative!r} points outside the data folder {root}")
        if not path.is_file():
            raise UserError(f"{list_file}:{number}: image {relative!r} not found under {root}")
        if path in seen:
            raise UserError(f"{list_file}:{number}: {relative!r} is listed twice (first on line {seen[path]})")
        seen[path] = number
        check_class_name(label, f"{list_file}:{number}")
        entries.append((path, label))
    if not entries:
        raise UserError(f"{list_file} lists no images ('<image path> <class>' per line)")
    return entries


def index_from_list_files(root: Path, num_threads: int = 4) -> DatasetIndex:
    root = Path(os.path.normpath(root))
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root} (set --data_dir)")
    listed = {split: read_list_file(root / name, root) for split, name in LIST_FILES.items()}
    class_names = sorted({label for _, label in listed["trainset"]})
    if len(class_names) < 2:
        raise UserError(f"{root / LIST_FILES['trainset']} names a single class {class_names}; a classifier needs two")
    unknown = sorted({label for _, label in listed["testset"]} - set(class_names))
    if unknown:
        raise UserError(f"{root / LIST_FILES['testset']} has classes not in trainset.txt: {unknown}")
    index_of = {name: i for i, name in enumerate(class_names)}
    samples = {split: [Sample(path, index_of[label]) for path, label in entries] for split, entries in listed.items()}
    unreadable = find_unreadable([s.path for split in samples.values() for s in split], num_threads)
    for path, reason in unreadable.items():
        logger.warning("skipping %s: %s", path, reason)
    train, test = ([s for s in samples[split] if s.path not in unreadable] for split in LIST_FILES)
    if not test:
        raise UserError(f"{root / LIST_FILES['testset']} lists no readable images")
    return DatasetIndex(root, class_names, train, test, sorted(unreadable.items()))
