"""The ``--metadata FILE.csv`` of subgroup reports: a ``filename`` column (matched like the labels CSV: path, file
name or name without extension) and any other columns, each a way to split the test set (evaluation.subgroups)."""

from __future__ import annotations

import csv
from pathlib import Path

from dataloaders.labels_csv import ImageNames, open_csv_text
from utils.errors import UserError

METADATA_KEY = "filename"


def read_metadata(csv_path: Path, paths: list[Path], root: Path) -> dict[Path, dict[str, str]]:
    """Each listed image's metadata values; a missing ``filename`` column, no other column, or an unknown file name
    is a one-line error naming the file (and the line)."""
    if not csv_path.is_file():
        raise UserError(f"--metadata {csv_path}: file not found")
    names = ImageNames(paths, root)
    values: dict[Path, dict[str, str]] = {}
    with open_csv_text(csv_path) as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if METADATA_KEY not in fields:
            raise UserError(f"{csv_path}: no column {METADATA_KEY!r} (columns are {fields}); the file needs "
                            f"{METADATA_KEY} plus the columns to split by, e.g. fitzpatrick,sex,site")
        if len(fields) < 2:
            raise UserError(f"{csv_path}: only a {METADATA_KEY!r} column; add the columns to split by")
        for line, row in enumerate(reader, start=2):
            path, problem = names.find(row[METADATA_KEY] or "")
            if path is None:
                raise UserError(f"{csv_path} line {line}: {METADATA_KEY} {row[METADATA_KEY]!r} {problem}")
            values[path] = {k: (v or "").strip() for k, v in row.items() if k != METADATA_KEY}
    return values
