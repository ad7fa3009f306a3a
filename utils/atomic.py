"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; rename it over ``final_path`` only if the block succeeds.

    The temporary file lives in the same folder so ``os.replace`` is a same-filesystem atomic rename. The suffix
    is kept so libraries that pick a format from the extension (matplotlib, pandas) still work.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name only has to be unique: a short prefix keeps it legal next to a final name of 255 bytes.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.stem[:64]}.", suffix=f".tmp{final_path.suffix[:16]}",
                                    dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    # mkstemp creates 0600 files; give the final file the permissions a plain open() would have.
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8; a file name that is not UTF-8 (it reaches Python as lone surrogates) is written escaped (\\udcNN),
    which JSON reads back as the same name, instead of failing at the end of the work."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: JSON has no NaN, and most parsers reject Python's."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and infinity become null)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` (e.g. ``torch.save``, ``df.to_csv``, ``fig.savefig``) and publish the result atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
