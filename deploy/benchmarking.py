"""Timing PyTorch eager against the exported ONNX models, fairly: each framework in a fresh process with the same
thread count and the same real preprocessed test images, over alternating rounds that each keep their fastest.
benchmark.py parses flags and calls ``benchmark_run``; benchmarks/model_zoo_speed.py reuses it."""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from configs import BenchmarkOptions
from deploy.machine import describe_machine, machine_info
from evaluation.metrics import balanced_accuracy
from runs.export_dir import ExportDir, other_source_run
from runs.run_folder import RunDir
from runs.run_info import RunInfo, read_run_info
from utils.device import onnx_cuda_available, select_device
from utils.errors import UserError
from utils.onnx_runtime import create_session
from utils.timing import call_latencies_ms, latency_summary

logger = logging.getLogger(__name__)

# Recorded in every CSV/JSON row, so a table always says which machine it holds for.
MACHINE_COLUMNS = ("cpu_model", "cpu_isa", "torch_cpu_capability", "usable_cpus", "torch", "onnxruntime")
TABLE_COLUMNS = ["batch_size", "size_mb", "mean_ms", "std_ms", "p50_ms", "p95_ms", "images_per_s",
                 "speedup_vs_pytorch", "size_reduction_vs_pytorch", "test_accuracy", "test_balanced_accuracy",
                 "top1_agreement_with_pytorch"]


@dataclass
class BenchmarkResult:
    rows: list[dict[str, Any]]  # classifier rows: framework x batch size
    segmentation_rows: list[dict[str, Any]]  # the exported face parser, when there is one
    machine: dict[str, Any]
    device: str
    test_images: int


def benchmark_run(run_dir: Path, export: ExportDir, settings: BenchmarkOptions) -> BenchmarkResult:
    """Time the run's PyTorch model and every classifier in ``export`` (and the face parser, if exported)."""
    info = read_run_info(run_dir)
    # A --device cuda without a GPU is a one-line error before anything is timed.
    device = select_device(settings.device).type
    if device == "cuda" and not onnx_cuda_available():
        logger.warning("!!! this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu in place of "
                       "onnxruntime): the ONNX rows run on the CPU while PyTorch runs on the GPU, so their speed-ups "
                       "compare different devices (see the runs_on column)")
    frameworks: dict[str, Optional[str]] = {"pytorch": None}
    for name, path in export.classifiers().items():
        frameworks[name] = str(path)
        source = other_source_run(path, run_dir)
        if source:
            logger.warning("!!! %s was exported from %s, not from %s; the comparison is between different "
                           "models", path.name, source, run_dir)
    if len(frameworks) == 1:
        raise UserError(f"no ONNX models in {export.root}; create them with quantize_onnx_models.py --model_path "
                        f"{run_dir} --output_dir {export.root}")
    machine = machine_info(settings.thread_count)
    logger.info("machine: %s", describe_machine(machine))
    images, labels, image_paths = load_test_images(run_dir, info, settings.data_dir, settings.eval_images)
    rows = time_frameworks(run_dir, frameworks, images, labels, info.model_name, settings, device)
    recorded = {key: machine[key] for key in MACHINE_COLUMNS}
    rows = [{**row, **recorded} for row in rows]
    seg_rows = []
    if export.seg.is_file():
        logger.info("timing the face parser %s in a fresh process", export.seg)
        with mp.get_context("spawn").Pool(1) as pool:
            seg_rows.append({**pool.apply(_segmentation_worker, (str(export.seg), image_paths, settings.iterations,
                                                                 settings.warmup, settings.thread_count, device)),
                             **recorded})
    return BenchmarkResult(rows, seg_rows, machine, device, len(labels))


def time_frameworks(run_dir: Path, frameworks: dict[str, Optional[str]], images: np.ndarray, labels: np.ndarray,
                    model_name: str, settings: BenchmarkOptions, device: str) -> list[dict]:
    """Time each framework ("pytorch": the run's model; any other name: that ONNX/ORT file) in a fresh process per
    round, alternating over ``settings.rounds`` rounds; one row per framework and batch size (``summarise``)."""
    rounds: dict[str, list[dict]] = {framework: [] for framework in frameworks}
    spawn = mp.get_context("spawn")
    for round_index in range(settings.rounds):
        for framework, model_file in frameworks.items():
            logger.info("round %d/%d: timing %s (%d threads, batch sizes %s) in a fresh process", round_index + 1,
                        settings.rounds, framework, settings.thread_count, list(settings.batch_size_list))
            with spawn.Pool(1) as pool:
                rounds[framework].append(pool.apply(_worker, (
                    framework, model_file, str(run_dir), images, list(settings.batch_size_list), settings.iterations,
                    settings.warmup, settings.thread_count, device, round_index == 0)))
    results = [keep_fastest_rounds(framework_rounds) for framework_rounds in rounds.values()]
    return summarise(results, labels, model_name, settings.thread_count)


def write_benchmark(result: BenchmarkResult, export: ExportDir) -> None:
    """benchmark_results.csv/.json/.png (and benchmark_segmentation.csv) under ``export.root``, atomically."""
    import pandas as pd

    from utils.atomic import atomic_save, atomic_write_json

    export.root.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(result.rows)
    frame["round_p50_ms"] = frame["round_p50_ms"].map(lambda medians: " ".join(f"{m:g}" for m in medians))
    atomic_save(export.benchmark_file("results.csv"), lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_json(export.benchmark_file("results.json"), result.rows)
    _plot(result.rows, export.benchmark_file("results.png"))
    if result.segmentation_rows:
        seg_frame = pd.DataFrame(result.segmentation_rows)
        atomic_save(export.benchmark_file("segmentation.csv"), lambda tmp: seg_frame.to_csv(tmp, index=False))


def format_benchmark(result: BenchmarkResult, settings: BenchmarkOptions) -> str:
    """The printed report: machine, settings, the table, the speed-ups and every round's medians."""
    import pandas as pd

    rows = result.rows
    frame = pd.DataFrame(rows)
    columns = ["framework"] + (["runs_on"] if result.device == "cuda" else []) + TABLE_COLUMNS
    lines = [f"machine: {describe_machine(result.machine)}",
             f"model {rows[0]['model']} on {result.device}, {settings.thread_count} threads, {settings.iterations} "
             f"iterations after {settings.warmup} warm-up, fastest of {settings.rounds} alternating rounds, accuracy "
             f"on {result.test_images} test images", frame[columns].to_string(index=False)]
    for batch_size in settings.batch_size_list:
        summary = ", ".join(f"{r['framework']} {r['speedup_vs_pytorch']:.2f}x" for r in rows
                            if r["batch_size"] == batch_size and r["framework"] != "pytorch")
        lines.append(f"batch {batch_size}: speed-up vs PyTorch eager (p50): {summary}")
        if settings.rounds > 1:
            spread = "; ".join(f"{r['framework']} " + " / ".join(f"{m:g}" for m in r["round_p50_ms"])
                               for r in rows if r["batch_size"] == batch_size)
            lines.append(f"batch {batch_size}: p50 ms of each round (the fastest is in the table): {spread}")
    unsteady = spread_warnings(rows)
    if unsteady:
        lines += [f"!!! timings unsteady (limit {ROUND_SPREAD_LIMIT}x): the machine was probably busy; the table keeps "
                  f"each framework's fastest round, but compare ratios only from a rerun on an idle machine "
                  f"(or with more --rounds):"] + [f"!!!   {line}" for line in unsteady]
    if result.segmentation_rows:
        seg_columns = [c for c in result.segmentation_rows[0] if c not in MACHINE_COLUMNS]
        lines += ["", "face parser, one photo at a time (parser resize, inference, upsampling and arg-max):",
                  pd.DataFrame(result.segmentation_rows)[seg_columns].to_string(index=False)]
    return "\n".join(lines)


def load_test_images(run_dir: Path, info: RunInfo, data_dir: Optional[str], limit: int):
    """Preprocessed test images and labels, decoded once in the parent and shared with every worker."""
    from dataloaders.inference_data import load_preprocessed
    from dataloaders.transforms import build_eval_transform, decode_min_side
    from segmentation.skin_region import image_decoder_for_run

    transform = build_eval_transform(info.preprocessing)
    samples = RunDir(run_dir).split("test", data_dir)
    if limit:
        samples = samples[:limit]
    decoder = image_decoder_for_run(info, RunDir(run_dir).dataset_root(data_dir), decode_min_side(info.preprocessing))
    images = load_preprocessed([s.path for s in samples], transform, decoder).numpy().astype(np.float32)
    return images, np.array([s.label for s in samples]), [s.path for s in samples]


def _segmentation_worker(model_file: str, image_paths: list[Path], iterations: int, warmup: int, threads: int,
                         device: str) -> dict[str, Any]:
    """Batch-1 latency of the exported face parser on real test photos, resize + argmax included."""
    from dataloaders.image_io import load_rgb
    from segmentation.face_parsing import OnnxParser

    parser = OnnxParser(model_file, device, threads=threads)
    pictures = [np.asarray(load_rgb(p)) for p in image_paths[:8]]
    next_picture = itertools.cycle(pictures).__next__
    times = call_latencies_ms(lambda: parser.parse(next_picture()), iterations, warmup)
    return {"model": "face parser (" + (parser.source or Path(model_file).name) + ")", "framework": "onnx_fp32",
            "batch_size": 1, "threads": threads, "size_mb": round(Path(model_file).stat().st_size / 2**20, 2),
            "input_size": "x".join(str(v) for v in parser.preprocessing["size"]), **latency_summary(times)}


def _worker(framework: str, model_file: Optional[str], run_dir: str, images: np.ndarray, batch_sizes: list[int],
            iterations: int, warmup: int, threads: int, device: str, predict: bool = True) -> dict[str, Any]:
    """Runs in a fresh process: load one framework's model, time it, and (if asked) predict the test images."""
    import torch

    torch.set_num_threads(threads)
    if framework == "pytorch":
        from prediction.predictors import TorchPredictor
        from runs.checkpoint import load_run_model

        model, _ = load_run_model(run_dir)
        size_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        predictor = TorchPredictor(model, torch.device(device))  # exactly what inference.py --backend torch runs
        runs_on = device

        def run(batch: np.ndarray) -> np.ndarray:
            return predictor.logits(torch.from_numpy(batch))
    elif framework.startswith("executorch"):
        from prediction.predictors import ExecuTorchPredictor
        from runs.run_info import read_run_info

        predictor = ExecuTorchPredictor(model_file, read_run_info(run_dir).n_class)  # one image per call, on the CPU
        size_bytes = Path(model_file).stat().st_size
        runs_on = "cpu"

        def run(batch: np.ndarray) -> np.ndarray:
            return predictor.logits(torch.from_numpy(batch))
    else:
        # benchmark_run() has already said it once if the CUDA provider is missing.
        session = create_session(model_file, device, threads, inter_op_threads=1, warn_no_cuda=False)
        input_name = session.get_inputs()[0].name
        size_bytes = Path(model_file).stat().st_size
        runs_on = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: batch})[0]

    timings = {}
    for batch_size in batch_sizes:
        batch = np.resize(images, (batch_size, *images.shape[1:]))  # repeats test images if there are fewer
        timings[batch_size] = call_latencies_ms(lambda: run(batch), iterations, warmup)
    result = {"framework": framework, "runs_on": runs_on, "size_bytes": int(size_bytes), "timings_ms": timings}
    if predict:
        result["predictions"] = np.concatenate(
            [run(images[i:i + 32]).argmax(1) for i in range(0, len(images), 32)]).tolist()
    return result


# Rounds of one framework whose medians differ more than ROUND_SPREAD_LIMIT, or a round whose p95 is TAIL_LIMIT times
# its p50, mean the machine was busy while timing: the fastest round is still the best estimate, but the user should
# know. On an idle 2-core VM, millisecond-scale rounds of 20 iterations still differ up to about 1.6x.
ROUND_SPREAD_LIMIT = 2.0
TAIL_LIMIT = 3.0


def spread_warnings(rows: list[dict]) -> list[str]:
    """One line per framework and batch size whose timings disagree beyond ROUND_SPREAD_LIMIT."""
    lines = []
    for row in rows:
        where = f"{row['framework']} batch {row['batch_size']}"
        medians = row.get("round_p50_ms") or []
        if len(medians) > 1 and min(medians) > 0 and max(medians) / min(medians) > ROUND_SPREAD_LIMIT:
            lines.append(f"{where}: the rounds' p50 differ {max(medians) / min(medians):.1f}x "
                         f"({' / '.join(f'{m:g}' for m in medians)} ms)")
        elif row["p50_ms"] > 0 and row["p95_ms"] / row["p50_ms"] > TAIL_LIMIT:
            lines.append(f"{where}: p95 is {row['p95_ms'] / row['p50_ms']:.1f}x the p50 within the kept round")
    return lines


def keep_fastest_rounds(rounds: list[dict]) -> dict:
    """One framework's results over several rounds -> the first round's predictions with, per batch size, the
    timings of the round whose median was lowest, plus every round's median for the record."""
    kept = {key: value for key, value in rounds[0].items() if key != "timings_ms"}
    kept["timings_ms"], kept["round_p50_ms"] = {}, {}
    for batch_size in rounds[0]["timings_ms"]:
        medians = [float(np.median(r["timings_ms"][batch_size])) for r in rounds]
        kept["timings_ms"][batch_size] = rounds[int(np.argmin(medians))]["timings_ms"][batch_size]
        kept["round_p50_ms"][batch_size] = [round(m, 3) for m in medians]
    return kept


def summarise(results: list[dict], labels: np.ndarray, model_name: str, threads: int) -> list[dict]:
    """One row per framework and batch size, speed-ups and agreement relative to PyTorch eager."""
    base = next(r for r in results if r["framework"] == "pytorch")
    base_pred = np.array(base["predictions"])
    rows = []
    for result in results:
        pred = np.array(result["predictions"])
        for batch_size, times in result["timings_ms"].items():
            base_p50 = float(np.median(base["timings_ms"][batch_size]))
            rows.append({
                "model": model_name, "framework": result["framework"], "runs_on": result["runs_on"],
                "batch_size": int(batch_size),
                "threads": threads, "size_mb": round(result["size_bytes"] / 2**20, 2),
                **latency_summary(times, int(batch_size)),
                "speedup_vs_pytorch": round(base_p50 / float(np.median(times)), 2),
                "size_reduction_vs_pytorch": round(base["size_bytes"] / result["size_bytes"], 2),
                "test_accuracy": round(float((pred == labels).mean()), 4),
                "test_balanced_accuracy": round(balanced_accuracy(labels, pred), 4),
                "top1_agreement_with_pytorch": round(float((pred == base_pred).mean()), 4),
                "round_p50_ms": result.get("round_p50_ms", {}).get(batch_size, []),
            })
            medians = rows[-1]["round_p50_ms"]
            rows[-1]["round_spread"] = round(max(medians) / min(medians), 2) if medians and min(medians) > 0 else 1.0
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    from evaluation.plots import plt, save_figure

    batch_sizes = sorted({r["batch_size"] for r in rows})
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 * len(batch_sizes), 4), squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes):
        chosen = [next(r for r in rows if r["framework"] == f and r["batch_size"] == batch_size) for f in frameworks]
        p50 = [r["p50_ms"] for r in chosen]
        # The same statistic as the table's p50_ms and the speed-ups; the whisker reaches the table's p95_ms.
        bars = ax.bar(frameworks, p50, yerr=[[0] * len(chosen), [r["p95_ms"] - r["p50_ms"] for r in chosen]],
                      capsize=4, color=["#888888", "#1f77b4", "#2ca02c", "#9ecae1", "#98df8a"][:len(frameworks)])
        ax.bar_label(bars, fmt="%.1f", label_type="center")
        ax.set(title=f"batch {batch_size}", ylabel="p50 latency (ms), whisker to p95")
    fig.suptitle(f"{rows[0]['model']}: {rows[0]['threads']} threads, fastest round per framework")
    save_figure(fig, path)
