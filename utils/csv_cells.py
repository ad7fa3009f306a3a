"""CSV cells that a spreadsheet will not run: OWASP's rule for CSV injection. A text cell that starts with =, +, -, @,
a tab or a carriage return is written with a leading apostrophe, so Excel shows it as text instead of evaluating a
file name like ``=HYPERLINK(...).jpg`` or a class named ``=1+2``. JSON outputs keep the raw value; the suite's own
readers take the apostrophe off again (``restore``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from utils.atomic import atomic_save

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """``value`` as a CSV cell that a spreadsheet shows as text."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def restore(value: Any) -> Any:
    """The original of a cell ``neutralise`` wrote."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(FORMULA_STARTS):
        return value[1:]
    return value


def neutralise_frame(frame):
    """A copy of a pandas DataFrame whose text cells, text index and column names are neutralised."""
    from pandas.api.types import is_numeric_dtype

    frame = frame.copy()
    for column in frame.columns:
        if not is_numeric_dtype(frame[column]):  # text (object or string dtype): numbers are never touched
            frame[column] = frame[column].map(neutralise)
    names = frame.index.names
    frame.index = frame.index.map(neutralise)
    frame.index.names = names
    frame.columns = [neutralise(c) for c in frame.columns]
    return frame


# File names that are not UTF-8 (CP949 bytes from a Korean Windows zip) reach Python as lone surrogates; in a CSV for
# people they are written escaped (\\udcNN) rather than failing at the end of the work.
PEOPLE_ERRORS = "backslashreplace"


def save_frame_for_people(path: Path, frame, index: bool = False) -> None:
    """A pandas DataFrame as a CSV a person opens in a spreadsheet: neutralised cells, escaped non-UTF-8 names,
    written atomically."""
    atomic_save(path, lambda tmp: neutralise_frame(frame).to_csv(tmp, index=index, errors=PEOPLE_ERRORS))


def open_for_people(tmp: Path) -> TextIO:
    """A text file for csv.writer rows a person reads (cells neutralised by the caller)."""
    return open(tmp, "w", newline="", encoding="utf-8", errors=PEOPLE_ERRORS)
