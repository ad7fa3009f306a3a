"""Progress a person can follow: a tqdm bar on a terminal; without one (nohup, CI, a log file) a log line with the
count, the rate and the time left, at a steady interval, so a long epoch is never silent."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator, Optional

from tqdm import tqdm

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # without a terminal: one progress line this often


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Iterate ``iterable`` showing progress; ``set_postfix`` adds values (loss, images/s) to the bar or log line."""

    def __init__(self, iterable: Iterable, desc: str, total: Optional[int] = None, *, leave: bool = True,
                 enabled: bool = True, unit: str = "it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.enabled = enabled
        self.postfix: dict[str, Any] = {}
        self.bar = (tqdm(iterable, desc=desc, total=self.total, leave=leave, unit=unit)
                    if enabled and sys.stderr.isatty() else None)

    def set_postfix(self, **values: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        else:
            self.postfix = values

    def __iter__(self) -> Iterator:
        if self.bar is not None:
            yield from self.bar
            return
        start = last = time.monotonic()
        for done, item in enumerate(self.iterable, start=1):
            yield item
            now = time.monotonic()
            if self.enabled and now - last >= LOG_EVERY_S:
                last = now
                rate = done / max(now - start, 1e-9)
                left = f", {_clock((self.total - done) / rate)} left" if self.total else ""
                extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
                logger.info("%s: %d/%s %s (%.1f %s/s%s%s)", self.desc, done, self.total or "?", self.unit, rate,
                            self.unit, left, extra)
