"""What this CPU can do, read once from /proc/cpuinfo: its model name and the instruction sets kernels pick by."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# /proc/cpuinfo flag -> the name people know, in rising order of what INT8/FP32 kernels can use.
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8"}
# Any of these gives ONNX Runtime's uint8 x int8 kernels a dot product that adds in 32 bits.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags (empty where /proc/cpuinfo is missing: not Linux)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    return model, flags


def isa_summary(flags: frozenset[str]) -> str:
    """'AVX2 AVX-512 AVX-512 VNNI' for the flags that matter to the kernels, 'unknown' when none is known."""
    return " ".join(name for flag, name in ISA_FLAGS.items() if flag in flags) or "unknown"


def int8_pairs_saturate() -> bool:
    """Whether ONNX Runtime's uint8 x int8 matrix kernels on this CPU add pairs of products in 16 bits and saturate
    (VPMADDUBSW): x86 with AVX2 but without VNNI or AMX. False where the flags cannot be read."""
    _, flags = cpu_model_and_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return x86 and "avx2" in flags and not flags & VNNI_FLAGS


def cpu_description() -> str:
    """'AMD EPYC (AVX2)': the model and the instruction sets that decide which kernels ran."""
    model, flags = cpu_model_and_flags()
    return f"{model} ({isa_summary(flags)})"
