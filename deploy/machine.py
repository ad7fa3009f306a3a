"""What machine a timing came from: CPU model, the instruction sets the kernels can use, cores, threads, versions.

INT8 and FP32 speed-ups depend on the instruction set (AVX2 vs AVX-512 vs VNNI vs AMX), so every benchmark records
this beside its figures and prints it in its header.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any

from utils.cpu import cpu_model_and_flags, isa_summary


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """A flat dict (CSV-friendly) describing this machine and the libraries that ran the benchmark."""
    import numpy as np
    import torch

    model, flags = cpu_model_and_flags()
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpu_isa": isa_summary(flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count() or 1,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # a training-only install
        info["onnxruntime"] = "not installed"
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One header line: 'AMD EPYC (AVX2 AVX-512 AVX-512 VNNI), torch AVX512 kernels, 2 CPUs, 2 threads, ...'."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info['cpu_model']} ({info['cpu_isa']}), torch kernels {info['torch_cpu_capability']}, "
            f"{info['usable_cpus']} CPUs, {info['threads']} threads{gpu}; torch {info['torch']}, onnxruntime "
            f"{info['onnxruntime']}, timm {info['timm']}, Python {info['python']}")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (DataLoader workers), in MiB (Linux /proc). Pages a forked
    worker shares with its parent count in both; PSS (smaps_rollup) would not, but reading it every quarter second
    stalled the workers' allocations and slowed a training DataLoader six-fold."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total / 1024


class RssSampler:
    """Samples this process tree's resident memory (``tree_rss_mb``) every ``interval`` s while the ``with`` block
    runs; ``samples`` holds (seconds, MiB) pairs and ``peak_mb`` the largest."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while True:
            self.samples.append((time.perf_counter() - start, tree_rss_mb(os.getpid())))
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)
