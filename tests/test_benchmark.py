"""benchmark.py runs each framework in its own process and writes a table a user can trust."""

import json
import logging

import onnxruntime as ort
import pandas as pd
import pytest
import torch

import benchmark
import quantize_onnx_models as qom
from deploy.benchmarking import BenchmarkResult, format_benchmark, keep_fastest_rounds, spread_warnings
from utils.errors import UserError

pytestmark = pytest.mark.slow


def test_benchmark_writes_results_for_every_framework(tiny_run, tmp_path, capsys):
    onnx_dir = tmp_path / "onnx"
    qom.main(qom.get_args_parser().parse_args(["--skip_segmentation", "--model_path", str(tiny_run), "--output_dir", str(onnx_dir),
                                               "--calib_images", "32"]))
    rows = benchmark.main(benchmark.get_args_parser().parse_args([
        "--pytorch_model_path", str(tiny_run), "--onnx_model_dir", str(onnx_dir), "--iterations", "3",
        "--warmup", "1", "--batch_sizes", "1,4", "--threads", "1", "--rounds", "2"]))
    frame = pd.read_csv(onnx_dir / "benchmark_results.csv")
    assert set(frame["framework"]) == {"pytorch", "onnx_fp32", "onnx_int8"}
    assert (frame["runs_on"] == "cpu").all()
    assert sorted(frame["batch_size"].unique()) == [1, 4] and len(frame) == 6
    assert {"size_mb", "mean_ms", "std_ms", "p50_ms", "p95_ms", "images_per_s", "speedup_vs_pytorch",
            "size_reduction_vs_pytorch", "test_accuracy", "top1_agreement_with_pytorch"} <= set(frame.columns)
    assert (frame["mean_ms"] > 0).all() and (frame["p95_ms"] >= frame["p50_ms"]).all()
    pytorch = frame[frame.framework == "pytorch"]
    assert (pytorch["speedup_vs_pytorch"] == 1.0).all() and (pytorch["top1_agreement_with_pytorch"] == 1.0).all()
    fp32 = frame[frame.framework == "onnx_fp32"]
    assert (fp32["top1_agreement_with_pytorch"] == 1.0).all()
    assert (fp32["test_accuracy"].to_numpy() == pytorch["test_accuracy"].to_numpy()).all()
    assert all(len(row["round_p50_ms"]) == 2 and min(row["round_p50_ms"]) == row["p50_ms"] for row in rows)
    assert json.loads((onnx_dir / "benchmark_results.json").read_text()) == rows
    assert (onnx_dir / "benchmark_results.png").stat().st_size > 0
    # Which machine the figures hold for: INT8 gains depend on the instruction set.
    assert {"cpu_model", "cpu_isa", "torch_cpu_capability", "usable_cpus", "torch", "onnxruntime"} <= set(frame.columns)
    assert frame["cpu_model"].nunique() == 1 and str(frame["cpu_model"].iloc[0]).strip()
    assert "machine: " in capsys.readouterr().out


def test_benchmark_without_onnx_models_says_how_to_make_them(tiny_run, tmp_path):
    with pytest.raises(UserError, match="quantize_onnx_models.py"):
        benchmark.main(benchmark.get_args_parser().parse_args([
            "--pytorch_model_path", str(tiny_run), "--onnx_model_dir", str(tmp_path / "none")]))


def test_each_framework_keeps_its_fastest_round_per_batch_size():
    rounds = [{"framework": "onnx_fp32", "size_bytes": 10, "predictions": [1, 0], "timings_ms": {1: [5, 6, 7], 4: [9, 9, 9]}},
              {"framework": "onnx_fp32", "size_bytes": 10, "timings_ms": {1: [3, 3, 30], 4: [12, 12, 1]}}]
    kept = keep_fastest_rounds(rounds)
    assert kept["timings_ms"] == {1: [3, 3, 30], 4: [9, 9, 9]}
    assert kept["round_p50_ms"] == {1: [6.0, 3.0], 4: [9.0, 12.0]}
    assert kept["predictions"] == [1, 0] and kept["size_bytes"] == 10


def test_rounds_must_be_positive(tiny_run, tmp_path):
    with pytest.raises(UserError, match="--rounds"):
        benchmark.main(benchmark.get_args_parser().parse_args([
            "--pytorch_model_path", str(tiny_run), "--onnx_model_dir", str(tmp_path), "--rounds", "0"]))


def test_cuda_without_a_gpu_is_a_clear_error_before_anything_is_timed(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda"):
        benchmark.main(benchmark.get_args_parser().parse_args([
            "--pytorch_model_path", str(tiny_run), "--onnx_model_dir", str(tmp_path), "--device", "cuda"]))


def test_onnx_on_cuda_needs_the_gpu_wheel_and_says_so_once_when_it_falls_back_to_cpu(monkeypatch, caplog):
    from utils import device

    device._warn_no_onnx_cuda.cache_clear()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING):
        assert device.onnx_providers("cuda") == ["CPUExecutionProvider"]
        assert device.onnx_providers("cuda") == ["CPUExecutionProvider"]
    assert caplog.text.count("install onnxruntime-gpu") == 1
    assert device.onnx_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert device.onnx_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert device.onnx_providers("cpu") == ["CPUExecutionProvider"]
    device._warn_no_onnx_cuda.cache_clear()


def _row(framework, p50, p95, medians):
    return {"model": "m", "framework": framework, "runs_on": "cpu", "batch_size": 1, "threads": 2, "size_mb": 1.0,
            "mean_ms": p50, "std_ms": 0.0, "p50_ms": p50, "p95_ms": p95, "images_per_s": 1000 / p50,
            "speedup_vs_pytorch": 1.0, "size_reduction_vs_pytorch": 1.0, "test_accuracy": 1.0, "test_balanced_accuracy": 1.0,
            "top1_agreement_with_pytorch": 1.0, "round_p50_ms": medians}


def test_rounds_that_disagree_are_reported_beside_the_table():
    from configs import BenchmarkOptions

    # An idle 2-core VM: millisecond rounds still differ up to ~1.6x (make demo: 1.61 / 1.56 / 2.451 ms).
    steady = [_row("pytorch", 10.0, 11.0, [10.0, 10.4, 10.9]), _row("onnx_fp32", 1.56, 1.9, [1.61, 1.56, 2.451])]
    assert spread_warnings(steady) == []
    # The demo on a busy 2-core machine: PyTorch's rounds gave 2071.94 / 2029.93 / 53.407 ms.
    busy = [_row("pytorch", 53.407, 60.0, [2071.94, 2029.93, 53.407]), steady[1]]
    warned = spread_warnings(busy)
    assert len(warned) == 1 and "pytorch batch 1" in warned[0] and "38.8x" in warned[0]
    bursty = [_row("onnx_int8", 2.0, 9.0, [2.0])]  # one round, but its tail is 4.5x its median
    assert "p95 is 4.5x" in spread_warnings(bursty)[0]
    machine = {"cpu_model": "test cpu", "cpu_isa": "AVX2", "torch_cpu_capability": "AVX2", "usable_cpus": 2,
               "threads": 2, "torch": "2", "onnxruntime": "1", "timm": "1", "python": "3"}
    text = format_benchmark(BenchmarkResult(busy, [], machine, "cpu", 10),
                            BenchmarkOptions(batch_sizes="1", rounds=3))
    assert "!!! timings unsteady" in text and "2071.94" in text
    assert "!!!" not in format_benchmark(BenchmarkResult(steady, [], machine, "cpu", 10),
                                         BenchmarkOptions(batch_sizes="1", rounds=3))
