"""Wall-clock latency of repeated calls: the one timing loop behind every latency figure the project prints."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


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


def latency_summary(times_ms: list[float], batch_size: int = 1) -> dict[str, float]:
    """The latency columns of every benchmark table: mean, std, p50, p95 (ms) and images per second."""
    times = np.asarray(times_ms, dtype=float)
    return {"mean_ms": round(float(times.mean()), 3), "std_ms": round(float(times.std()), 3),
            "p50_ms": round(float(np.percentile(times, 50)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3),
            "images_per_s": round(batch_size / (float(times.mean()) / 1000), 1)}
