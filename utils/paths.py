"""Output paths derived from input file names, kept inside their output folder."""

from __future__ import annotations

import os
from pathlib import Path

from utils.errors import UserError


def safe_output_path(output_dir: Path, relative: Path, suffix: str = "") -> Path:
    """``output_dir / relative`` plus ``suffix``, refusing anything that would land outside ``output_dir``.

    ``relative`` comes from walking an input folder, so it should never hold ``..`` or an absolute part; a path
    that does (a crafted listing, a future caller) is an error rather than a write somewhere else on disk.
    """
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise UserError(f"refusing to write {relative}: the name would place the file outside {output_dir}")
    target = output_dir / relative.with_name(relative.name + suffix)
    base = os.path.abspath(output_dir)
    if os.path.commonpath([base, os.path.abspath(target)]) != base:
        raise UserError(f"refusing to write {target}: outside {output_dir}")
    return target
