"""Wall-clock latency of repeated calls: the one timing loop behind every latency figure the project prints."""

from __future__ import annotations

import time
from typing import Callable


def call_latencies_ms(call: Callable[[], object], runs: int, warmup: int = 3) -> list[float]:
    """Times (ms) of ``runs`` calls of ``call``, after ``warmup`` untimed ones (first calls allocate and prepack)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times
