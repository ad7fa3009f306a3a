"""Output paths derived from input file names, kept inside their output folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from utils.errors import UserError

NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def fit_file_name(name: str, suffix: str = "") -> str:
    """``name + suffix``, or, when that is longer than a file system allows, ``name`` cut short plus a hash of the
    whole name (so two long names that share a beginning stay apart) and ``suffix``."""
    full = name + suffix
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    budget = NAME_MAX - len(os.fsencode(suffix)) - len(digest) - 1
    short = name
    while len(os.fsencode(short)) > budget:
        short = short[:-1]
    return f"{short}~{digest}{suffix}"


def safe_output_path(output_dir: Path, relative: Path, suffix: str = "") -> Path:
    """``output_dir / relative`` plus ``suffix``, refusing anything that would land outside ``output_dir``.

    ``relative`` comes from walking an input folder, so it should never hold ``..`` or an absolute part; a path
    that does (a crafted listing, a future caller) is an error rather than a write somewhere else on disk.
    """
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise UserError(f"refusing to write {relative}: the name would place the file outside {output_dir}")
    target = output_dir / relative.with_name(fit_file_name(relative.name, suffix))
    base = os.path.abspath(output_dir)
    if os.path.commonpath([base, os.path.abspath(target)]) != base:
        raise UserError(f"refusing to write {target}: outside {output_dir}")
    return target


def check_output_folder(output: Path, flag: str, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, lies inside or contains one of ``inputs`` (flag -> folder or file): the
    outputs would land among the inputs, and a later run would read them back as inputs."""
    out = Path(output).resolve()
    for name, path in inputs.items():
        given = Path(path).resolve()
        relation = ("is" if out == given else "lies inside" if given in out.parents
                    else "contains" if out in given.parents else None)
        if relation:
            raise UserError(f"{flag} {output} {relation} {name} {path}; choose an output folder apart from the "
                            f"inputs, so that nothing is written over or among them")


def check_only_ours(folder: Path, suffix: str, flag: str) -> None:
    """Before ``folder`` is replaced: refuse if it holds a file the suite did not write (the suite's files there all
    end with ``suffix``), so a user's own files are never deleted."""
    if not folder.exists():
        return
    foreign = [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(suffix)]
    if foreign:
        raise UserError(f"{folder} holds files this program did not write (e.g. {foreign[0].name}); choose another "
                        f"{flag} or move them")
