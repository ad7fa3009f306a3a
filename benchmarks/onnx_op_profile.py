"""Where an ONNX model spends its time: ONNX Runtime's profiler, kernel time summed per operator type.

Used to see why an INT8 model is slower than its FP32 original (e.g. EfficientNet's SiLU). Batch 1, random input of the
model's own input size, the same thread count for every file.

Example:
    python -m benchmarks.onnx_op_profile onnx_models/clf_model.onnx onnx_models/clf_model_int8.onnx
    # split convolutions by the timm module they come from (the README's EfficientNet-B0 table)
    python -m benchmarks.onnx_op_profile fp32.onnx int8.onnx --runs 40 --top 12 \
        --name_pattern "conv_pwl|conv_pw|conv_dw|conv_stem|conv_head|se"
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from deploy.machine import describe_machine, machine_info
from utils.onnx_runtime import create_session
from utils.timing import call_latencies_ms


def profile(path: Path, threads: int, runs: int, name_pattern: str | None = None
            ) -> tuple[float, dict[str, tuple[float, float]]]:
    """Median latency (ms) and, per operator type (suffixed with the node name's first ``name_pattern`` match),
    (share of kernel time in %, ms per run)."""
    session = create_session(path, "cpu", threads, profile_prefix=str(Path(tempfile.mkdtemp()) / path.stem))
    spec = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in spec.shape]
    feed = {spec.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    times = call_latencies_ms(lambda: session.run(None, feed), runs)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = event["args"]["op_name"]
            match = re.search(name_pattern, event["name"]) if name_pattern else None
            per_op[f"{key} {match.group(0)}" if match else key] += event["dur"]
    total = sum(per_op.values()) or 1
    # the profiler also saw the warm-up calls, so count the runs it recorded
    profiled_runs = sum(event.get("name") == "model_run" for event in events) or 1
    return float(np.median(times)), {op: (100 * t / total, t / 1000 / profiled_runs) for op, t in per_op.most_common()}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ONNX Runtime time per operator type", add_help=add_help)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--name_pattern", default=None,
                        help="regex; an operator's time is split by its first match in the node name (nodes "
                             "that ONNX Runtime fused or re-laid out are named after their output tensor, e.g. "
                             "the activation a convolution absorbed)")
    return parser


def main(args: argparse.Namespace) -> None:
    print(f"machine: {describe_machine(machine_info(args.threads))}")
    for path in args.models:
        median_ms, shares = profile(path, args.threads, args.runs, args.name_pattern)
        top = ", ".join(f"{op} {share:.1f}% ({ms:.2f} ms)" for op, (share, ms) in list(shares.items())[: args.top])
        print(f"{path}: {median_ms:.1f} ms (median of {args.runs}); {top}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
