"""Configure logging once per script: console plus, for training, ``train.log`` in the run folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_skinclf_console", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler._skinclf_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def add_file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")  # names that are not UTF-8
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def remove_handler(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
