"""Groups of images that must stay on one side of a split: one patient's or one lesion's photos, and copies of one
photo found by the dataset audit.

A group comes from ``--groups FILE.csv`` (columns ``filename,group``) or ``--group_pattern REGEX`` (the first capture
group of a regular expression searched in the file name, e.g. ``^(P\\d+)_`` for ``P0123_left.jpg``). A CSV's
``filename`` may be the path under the dataset root (``trainset/acne/a.jpg``), under the split folder
(``acne/a.jpg``), the bare file name or the name without extension (HAM10000's ``image_id``), as long as it names
one image.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

from dataloaders.labels_csv import CsvColumns, read_label_rows
from utils.errors import UserError

logger = logging.getLogger(__name__)

GROUP_COLUMNS = ("filename", "group")


def read_groups_csv(csv_path: Path, paths: list[Path], root: Path, *, columns: tuple[str, str] = GROUP_COLUMNS
                    ) -> dict[Path, str]:
    """Each listed image's group; a missing column, an unknown file name or an empty group is a one-line error
    naming the file and the row."""
    if not csv_path.is_file():
        raise UserError(f"--groups {csv_path}: file not found")
    return {path: group for _, path, group, _, _ in read_label_rows(csv_path, paths, root, CsvColumns(*columns))}


def groups_from_pattern(pattern: str, paths: list[Path]) -> dict[Path, str]:
    """The first capture group of ``pattern`` searched in each file name; names it does not match are left out."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise UserError(f"--group_pattern {pattern!r} is not a regular expression: {err}") from err
    if regex.groups < 1:
        raise UserError(f"--group_pattern {pattern!r} has no capture group; put the group id in parentheses, "
                        f"e.g. '^(P\\d+)_'")
    groups = {}
    for path in paths:
        match = regex.search(path.name)
        if match and match.group(1):
            groups[path] = match.group(1)
    return groups


def complete_groups(groups: dict[Path, str], paths: list[Path], source: str) -> dict[Path, str]:
    """Every image gets a group: those without one are warned about (count and examples) and become their own."""
    ungrouped = [p for p in paths if p not in groups]
    if ungrouped:
        logger.warning("%d image(s) have no group in %s and each become a group of their own, e.g. %s",
                       len(ungrouped), source, ", ".join(p.name for p in ungrouped[:3]))
    return {p: groups.get(p, f"image:{p.as_posix()}") for p in paths}


def merge_copies(groups: dict[Path, str], clusters: Iterable[Iterable[Path]]) -> dict[Path, str]:
    """Groups joined wherever the audit found copies of one photo in both, so copies never straddle a split."""
    parent = {g: g for g in set(groups.values())}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for cluster in clusters:
        members = [groups[p] for p in cluster if p in groups]
        for other in members[1:]:
            a, b = sorted((find(members[0]), find(other)))
            parent[b] = a
    return {p: find(g) for p, g in groups.items()}
