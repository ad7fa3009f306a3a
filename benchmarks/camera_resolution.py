"""Folder inference on camera-size photos: reduced-size JPEG decoding against full decoding, side by side.

It makes camera-resolution copies of a real folder's photos (default 4032 x 3024, 12 MP, JPEG quality 92), then runs
inference.py's engine on (a) the original photos, (b) the copies decoded in full (``--reduced_decode False``, what
every image cost before) and (c) the copies with reduced decoding (the default), for each backend. It reports
images/s, the speed-up of (c) over (b), what is left of the gap to (a), how close (c) is to the floor that JPEG
decoding itself sets (decoding every copy at 1/8 scale and nothing else: the decoder still reads every byte), and
whether (c) gives (b)'s answers: top-1 agreement and the per-image largest probability difference (maximum, median,
share within 0.02). Then it times main.py's training DataLoader over the copies (alone, and with a training step of
the run's architecture per batch) decoding every pixel, decoding at the reduced scale, and through --cache_images,
with each pass's peak memory.

Example (docs/measurements_speed.md):
    python -m benchmarks.camera_resolution --model_path <dermnet_a run folder> \
        --onnx_model onnx_dermnet/clf_model.onnx --folder ../shared/data/dermnet_a/testset --work_dir /tmp/camera
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from configs import PredictionOptions
from dataloaders.discovery import list_images
from dataloaders.image_io import load_rgb
from deploy.machine import RssSampler, describe_machine, machine_info
from prediction.engine import infer_folder
from utils.cli import add_bool_flag


def make_camera_copies(folder: Path, target: Path, size: tuple[int, int], limit: int) -> list[tuple[Path, Path]]:
    """(source, copy) pairs: upscaled JPEG copies under ``target`` with the same relative paths (made once, reused by
    later runs)."""
    copies = []
    for source in list_images(folder)[: limit or None]:
        copy = (target / source.relative_to(folder)).with_suffix(".jpg")
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            picture = load_rgb(source)
            # Keep the photo's orientation: a portrait photo becomes a portrait 12 MP photo.
            shape = size if picture.width >= picture.height else size[::-1]
            picture.resize(shape, Image.Resampling.BICUBIC).save(copy, quality=92)
        copies.append((source, copy))
    return copies


def decode_floor(paths: list[Path]) -> float:
    """Images/s of decoding each JPEG at 1/8 scale and nothing else."""
    start = time.perf_counter()
    for path in paths:
        load_rgb(path, min_side=1)
    return len(paths) / (time.perf_counter() - start)


def _training_epochs(copies: list[Path], model_path: str, decode: str, cache_root: Path, num_workers: int,
                     batch_size: int, with_model: bool, epochs: int) -> list[tuple[float, float]]:
    """(images/s, peak memory MiB) of each of ``epochs`` epochs of main.py's training DataLoader with one ``decode``
    (full, reduced or cache), in the calling process; ``with_model`` adds a training step per batch."""
    import timm
    import torch

    from dataloaders.build import make_loader
    from dataloaders.discovery import Sample
    from dataloaders.image_cache import CachedDecoder
    from dataloaders.image_io import reduced_decoder
    from dataloaders.transforms import build_train_transform, decode_min_side
    from runs.run_info import read_run_info

    # A spawned process inherits "spawn" as its start method; DataLoader workers must fork, as in main.py, or each
    # epoch pays the workers' interpreter start-up.
    multiprocessing.set_start_method("fork", force=True)
    info = read_run_info(model_path)
    pre = info.preprocessing
    side = decode_min_side(pre, train_min_crop_scale=0.25)
    transform = build_train_transform(pre, min_crop_scale=0.25, vflip=0.0, color_jitter=0.2, randaugment=False)
    samples = [Sample(path, 0) for path in copies]
    decoder_fn = {"full": reduced_decoder(0), "reduced": reduced_decoder(side)}.get(decode) or CachedDecoder(cache_root,
                                                                                                          side)
    model = timm.create_model(info.model_name, num_classes=len(info.class_names)) if with_model else None
    if model is not None:  # as main.py trains on CPU and CUDA (utils.device.prefers_channels_last)
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if model is not None else None
    results = []
    for _ in range(epochs):
        with RssSampler() as memory:
            start, seen = time.perf_counter(), 0
            for images, targets, _ in make_loader(samples, transform, batch_size, num_workers, train=True,
                                                  decoder=decoder_fn):
                seen += len(images)
                if model is not None:
                    images = images.contiguous(memory_format=torch.channels_last)
                    loss = torch.nn.functional.cross_entropy(model(images), targets)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            seconds = time.perf_counter() - start
        results.append((round(seen / seconds, 2), round(memory.peak_mb, 1)))
    return results


def training_epoch_speed(copies: list[Path], model_path: str, cache_root: Path, num_workers: int, batch_size: int,
                         with_model: bool) -> dict[str, float]:
    """Images/s and peak resident memory (the process and its DataLoader workers) of
    main.py's training DataLoader over the camera-size copies (decode + random-resized crop + augmentation), with
    ``with_model`` also a training step of the run's architecture per batch: decoding every pixel (before reduced
    decoding), decoding at the reduced scale, and through --cache_images (the first epoch fills the cache, the
    second reads it). Each decode runs two epochs in a fresh process, so one's memory never counts against
    another's; the second epoch is the steady state compared (and the cache's first epoch is reported too)."""
    shutil.rmtree(cache_root, ignore_errors=True)
    prefix = "train_epoch" if with_model else "train_loader"
    results: dict[str, float] = {}
    context = multiprocessing.get_context("spawn")
    for decode, names in (("full", [None, "full_decode"]), ("reduced", [None, "reduced_decode"]),
                          ("cache", ["cache_first_epoch", "cache_later_epoch"])):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            epochs = pool.submit(_training_epochs, copies, model_path, decode, cache_root, num_workers, batch_size,
                                 with_model, len(names)).result()
        for name, (speed, peak) in zip(names, epochs):
            if name is None:
                continue
            results[f"{prefix}_{name}_images_per_s"] = speed
            results[f"{prefix}_{name}_peak_mb"] = peak
            print(f"{prefix} {name:18s} {speed:7.2f} images/s, peak memory {peak:.0f} MiB", flush=True)
    results["cache_mb"] = round(sum(f.stat().st_size for f in cache_root.rglob("*.npy")) / 2**20, 1)
    return results


def read_predictions(output: Path) -> pd.DataFrame:
    return pd.read_csv(output / "predictions.csv").set_index("filename").sort_index()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("camera-size photos: reduced vs full JPEG decoding")
    parser.add_argument("--model_path", required=True, help="run folder written by main.py")
    parser.add_argument("--onnx_model", default=None, help="its exported clf_model.onnx (omit to time torch only)")
    parser.add_argument("--folder", required=True, help="real photos (searched recursively)")
    parser.add_argument("--work_dir", required=True, help="where the camera-size copies and outputs go")
    parser.add_argument("--size", default="4032x3024", help="camera size, WIDTHxHEIGHT (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N photos (default: all)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--backends", nargs="*", default=["onnx", "torch"], choices=["onnx", "torch"],
                        help="inference backends to time; none (the flag alone) times training only")
    add_bool_flag(parser, "--tta", None, "inference with/without the mirrored view (default: what the run was "
                                         "tested with)")
    add_bool_flag(parser, "--train_with_model", True,
                  "time training epochs with a training step of the run's architecture per batch, not only the "
                  "DataLoader (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> pd.DataFrame:
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    work = Path(args.work_dir)
    width, height = (int(v) for v in args.size.lower().split("x"))
    folder = Path(args.folder)
    pairs = make_camera_copies(folder, work / "camera", (width, height), args.limit)
    copies = [copy for _, copy in pairs]
    originals = work / "originals"
    if not originals.exists():  # the same photos, at their own size, as a folder of their own
        for source, _ in pairs:
            original = originals / source.relative_to(folder)
            original.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, original)
    rows = []
    floor = decode_floor(copies)
    for backend in args.backends:
        if backend == "onnx" and not args.onnx_model:
            continue
        runs = {}
        for name, source, reduced in (("original photos", originals, True), ("camera size, full decode",
                                       work / "camera", False), ("camera size, reduced decode", work / "camera", True)):
            output = work / f"out_{backend}_{name.replace(' ', '_').replace(',', '')}"
            options = PredictionOptions(backend=backend, onnx_model=args.onnx_model, device="cpu",
                                        reduced_decode=reduced, tta=args.tta)
            summary = infer_folder(args.model_path, source, output, options, batch_size=args.batch_size,
                                   num_workers=args.num_workers)
            runs[name] = (summary["images_per_s"], output)
            print(f"{backend:5s} {name:28s} {summary['images_per_s']:7.2f} images/s", flush=True)
        full = read_predictions(runs["camera size, full decode"][1])
        reduced = read_predictions(runs["camera size, reduced decode"][1])
        prob_columns = [c for c in full.columns if c.startswith("prob_")]
        prob_diff = np.abs(full[prob_columns].to_numpy() - reduced[prob_columns].to_numpy()).max(axis=1)
        rows.append({
            "backend": backend, "tta": args.tta, "images": len(full),
            "original_images_per_s": round(runs["original photos"][0], 2),
            "camera_full_decode_images_per_s": round(runs["camera size, full decode"][0], 2),
            "camera_reduced_decode_images_per_s": round(runs["camera size, reduced decode"][0], 2),
            "speedup_reduced_vs_full": round(runs["camera size, reduced decode"][0]
                                             / runs["camera size, full decode"][0], 2),
            "original_vs_reduced_ratio": round(runs["original photos"][0] / runs["camera size, reduced decode"][0], 2),
            "decode_floor_images_per_s": round(floor, 2),
            "top1_agreement_reduced_vs_full": round(float((full["predicted_label"]
                                                           == reduced["predicted_label"]).mean()), 4),
            "max_prob_diff_reduced_vs_full": round(float(prob_diff.max()), 4),
            "median_prob_diff_reduced_vs_full": round(float(np.median(prob_diff)), 4),
            "share_prob_diff_within_0.02": round(float((prob_diff <= 0.02).mean()), 4),
            **{k: machine[k] for k in ("cpu_model", "cpu_isa", "threads", "torch", "onnxruntime")}})
    training = training_epoch_speed(copies, args.model_path, work / "image_cache", args.num_workers,
                                    args.batch_size, with_model=False)
    if args.train_with_model:
        training.update(training_epoch_speed(copies, args.model_path, work / "image_cache", args.num_workers,
                                             args.batch_size, with_model=True))
    rows = [{**row, **training} for row in rows] or [training]
    table = pd.DataFrame(rows)
    print(table.drop(columns=["cpu_model", "cpu_isa", "threads", "torch", "onnxruntime"], errors="ignore")
          .T.to_string(header=False))
    table.to_csv(work / "camera_resolution.csv", index=False)
    (work / "camera_resolution.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
