"""PyTorch eager vs ONNX FP32 vs ONNX INT8: latency, throughput, size and accuracy, measured fairly.

Example:
    python benchmark.py --pytorch_model_path save_results/dataset+skin/model+efficientnet_b0/<run> \
        --onnx_model_dir onnx_models --batch_sizes 1,32 --iterations 100 --warmup 10

Fair means: every framework gets the same thread count, runs in its own fresh process (ONNX Runtime's spinning
worker threads slow PyTorch down when both live in one process), is warmed up first, and is fed the same real
preprocessed images from the run's test split. On a shared machine other tenants only ever add time, and they do
so in bursts that can land on one framework and not the next, so the frameworks are timed in ``--rounds``
alternating rounds and each keeps its fastest round (by median); every round's median is in the JSON.
Writes benchmark_results.csv/.json/.png into --output_dir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from utils.cli import run_cli
from utils.device import onnx_cuda_available, onnx_providers, select_device
from utils.errors import UserError
from utils.logging_setup import setup_logging
from utils.timing import call_latencies_ms, latency_summary

logger = logging.getLogger(__name__)

SEG_ONNX_NAME = "seg_model.onnx"
FRAMEWORKS = {"pytorch": None, "onnx_fp32": "clf_model.onnx", "onnx_int8": "clf_model_int8.onnx"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf PyTorch vs ONNX benchmark", add_help=add_help)
    parser.add_argument("--pytorch_model_path", required=True, help="run folder written by main.py")
    parser.add_argument("--onnx_model_dir", default="onnx_models",
                        help="folder written by quantize_onnx_models.py (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                        help="where PyTorch and ONNX Runtime run; auto = cuda if a GPU is visible "
                             "(default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=100, help="timed runs per batch size (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of fresh processes; each framework keeps its fastest round, so a "
                             "burst of load from other programs does not decide the comparison (default: %(default)s)")
    parser.add_argument("--batch_sizes", default="1,32", help="comma-separated (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads for every framework (default: all cores, %(default)s)")
    parser.add_argument("--eval_images", type=int, default=0,
                        help="test images for the accuracy columns; 0 = the whole test split (default)")
    parser.add_argument("--data_dir", default=None, help="dataset root if it moved since training")
    parser.add_argument("--output_dir", default=None, help="where results go (default: --onnx_model_dir)")
    return parser


def _test_images(run_dir: Path, class_info: dict, data_dir: Optional[str], limit: int):
    """Preprocessed test images and labels, decoded once in the parent and shared with every worker."""
    from dataloaders.skin_region import image_loader_for_run
    from dataloaders.transforms import build_eval_transform
    from torch_trainer import run_folder as rf

    transform = build_eval_transform(class_info["preprocessing"])
    samples = rf.run_split(run_dir, "test", data_dir)
    if limit:
        samples = samples[:limit]
    loader = image_loader_for_run(class_info, rf.dataset_root(run_dir, data_dir))
    images = np.stack([transform(loader(s.path)).numpy() for s in samples]).astype(np.float32)
    return images, np.array([s.label for s in samples]), [s.path for s in samples]


def _segmentation_worker(model_file: str, image_paths: list[Path], iterations: int, warmup: int, threads: int,
                         device: str) -> dict[str, Any]:
    """Batch-1 latency of the exported face parser on real test photos, resize + argmax included."""
    from dataloaders.image_io import load_rgb
    from utils.face_parsing import OnnxParser

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
        from torch_trainer.checkpoint import load_run_model

        model, _ = load_run_model(run_dir)
        model.to(device)
        size_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        runs_on = device

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = model(torch.from_numpy(batch).to(device))
                return out.float().cpu().numpy()
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # main() has already said it once if the CUDA provider is missing.
        session = ort.InferenceSession(model_file, options, providers=onnx_providers(device, warn=False))
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
    base = next(r for r in results if r["framework"] == "pytorch")
    base_pred = np.array(base["predictions"])
    rows = []
    for result in results:
        pred = np.array(result["predictions"])
        for batch_size, times in result["timings_ms"].items():
            base_mean = float(np.mean(base["timings_ms"][batch_size]))
            rows.append({
                "model": model_name, "framework": result["framework"], "runs_on": result["runs_on"],
                "batch_size": int(batch_size),
                "threads": threads, "size_mb": round(result["size_bytes"] / 2**20, 2),
                **latency_summary(times, int(batch_size)),
                "speedup_vs_pytorch": round(base_mean / float(np.mean(times)), 2),
                "size_reduction_vs_pytorch": round(base["size_bytes"] / result["size_bytes"], 2),
                "test_accuracy": round(float((pred == labels).mean()), 4),
                "top1_agreement_with_pytorch": round(float((pred == base_pred).mean()), 4),
                "round_p50_ms": result.get("round_p50_ms", {}).get(batch_size, []),
            })
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    from utils.plots import plt, save_figure

    batch_sizes = sorted({r["batch_size"] for r in rows})
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 * len(batch_sizes), 4), squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes):
        values = [next(r["mean_ms"] for r in rows if r["framework"] == f and r["batch_size"] == batch_size)
                  for f in frameworks]
        bars = ax.bar(frameworks, values, color=["#888888", "#1f77b4", "#2ca02c"][:len(frameworks)])
        ax.bar_label(bars, fmt="%.1f")
        ax.set(title=f"batch {batch_size}", ylabel="mean latency (ms)")
    fig.suptitle(f"{rows[0]['model']}: {rows[0]['threads']} threads")
    save_figure(fig, path)


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging()
    from quantize_onnx_models import read_onnx_metadata
    from torch_trainer import run_folder as rf
    from utils.atomic import atomic_save, atomic_write_json

    run_dir = Path(args.pytorch_model_path)
    class_info = rf.read_class_info(run_dir)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or min(args.iterations, args.threads, args.rounds) < 1:
        raise UserError("--batch_sizes, --iterations, --threads and --rounds must be positive")
    # A --device cuda without a GPU is a one-line error before anything is timed.
    device = select_device(args.device).type
    if device == "cuda" and not onnx_cuda_available():
        logger.warning("!!! this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu in place of "
                       "onnxruntime): the ONNX rows run on the CPU while PyTorch runs on the GPU, so their speed-ups "
                       "compare different devices (see the runs_on column)")
    onnx_dir = Path(args.onnx_model_dir)
    frameworks = {"pytorch": None}
    for name, file_name in FRAMEWORKS.items():
        if file_name and (onnx_dir / file_name).is_file():
            frameworks[name] = str(onnx_dir / file_name)
            source = read_onnx_metadata(onnx_dir / file_name).get("source_run")
            if source and Path(source).resolve() != run_dir.resolve():
                logger.warning("!!! %s was exported from %s, not from %s; the comparison is between different "
                               "models", file_name, source, run_dir)
    if len(frameworks) == 1:
        raise UserError(f"no ONNX models in {onnx_dir}; create them with quantize_onnx_models.py --model_path "
                        f"{run_dir} --output_dir {onnx_dir}")
    images, labels, image_paths = _test_images(run_dir, class_info, args.data_dir, args.eval_images)
    rounds = {framework: [] for framework in frameworks}
    spawn = mp.get_context("spawn")
    for round_index in range(args.rounds):
        for framework, model_file in frameworks.items():
            logger.info("round %d/%d: timing %s (%d threads, batch sizes %s) in a fresh process", round_index + 1,
                        args.rounds, framework, args.threads, batch_sizes)
            with spawn.Pool(1) as pool:
                rounds[framework].append(pool.apply(_worker, (
                    framework, model_file, str(run_dir), images, batch_sizes, args.iterations, args.warmup,
                    args.threads, device, round_index == 0)))
    results = [keep_fastest_rounds(framework_rounds) for framework_rounds in rounds.values()]
    rows = summarise(results, labels, class_info["model_name"], args.threads)
    seg_rows = []
    if (onnx_dir / SEG_ONNX_NAME).is_file():
        logger.info("timing the face parser %s in a fresh process", onnx_dir / SEG_ONNX_NAME)
        with spawn.Pool(1) as pool:
            seg_rows.append(pool.apply(_segmentation_worker, (str(onnx_dir / SEG_ONNX_NAME), image_paths,
                                                              args.iterations, args.warmup, args.threads,
                                                              device)))

    output_dir = Path(args.output_dir) if args.output_dir else onnx_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["round_p50_ms"] = frame["round_p50_ms"].map(lambda medians: " ".join(f"{m:g}" for m in medians))
    atomic_save(output_dir / "benchmark_results.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write_json(output_dir / "benchmark_results.json", rows)
    _plot(rows, output_dir / "benchmark_results.png")
    columns = ["framework"] + (["runs_on"] if device == "cuda" else []) + [
        "batch_size", "size_mb", "mean_ms", "std_ms", "p50_ms", "p95_ms", "images_per_s", "speedup_vs_pytorch",
        "size_reduction_vs_pytorch", "test_accuracy", "top1_agreement_with_pytorch"]
    print(f"\nmodel {class_info['model_name']} on {device}, {args.threads} threads, {args.iterations} iterations "
          f"after {args.warmup} warm-up, fastest of {args.rounds} alternating rounds, accuracy on {len(labels)} "
          f"test images")
    print(frame[columns].to_string(index=False))
    for batch_size in batch_sizes:
        summary = ", ".join(f"{r['framework']} {r['speedup_vs_pytorch']:.2f}x" for r in rows
                            if r["batch_size"] == batch_size and r["framework"] != "pytorch")
        print(f"batch {batch_size}: speed-up vs PyTorch eager: {summary}")
        if args.rounds > 1:
            spread = "; ".join(f"{r['framework']} " + " / ".join(f"{m:g}" for m in r["round_p50_ms"])
                               for r in rows if r["batch_size"] == batch_size)
            print(f"batch {batch_size}: p50 ms of each round (the fastest is in the table): {spread}")
    if seg_rows:
        seg_frame = pd.DataFrame(seg_rows)
        atomic_save(output_dir / "benchmark_segmentation.csv", lambda tmp: seg_frame.to_csv(tmp, index=False))
        print("\nface parser, one photo at a time (parser resize, inference, upsampling and arg-max):")
        print(seg_frame.to_string(index=False))
    print(f"results: {output_dir / 'benchmark_results.csv'}")
    return rows + seg_rows


if __name__ == "__main__":
    run_cli(main, lambda: get_args_parser().parse_args())
