"""Folder inference on camera-size photos: reduced-size JPEG decoding against full decoding, side by side.

It makes camera-resolution copies of a real folder's photos (default 4032 x 3024, 12 MP, JPEG quality 92), then runs
inference.py's engine on (a) the original photos, (b) the copies decoded in full (``--reduced_decode False``, what
every image cost before) and (c) the copies with reduced decoding (the default), for each backend. It reports
images/s, the speed-up of (c) over (b), what is left of the gap to (a), how close (c) is to the floor that JPEG
decoding itself sets (decoding every copy at 1/8 scale and nothing else: the decoder still reads every byte), and
whether (c) gives (b)'s answers: top-1 agreement and the largest probability difference.

Example (docs/measurements_speed.md):
    python -m benchmarks.camera_resolution --model_path <dermnet_a run folder> \
        --onnx_model onnx_dermnet/clf_model.onnx --folder ../shared/data/dermnet_a/testset --work_dir /tmp/camera
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dataloaders.discovery import list_images
from dataloaders.image_io import load_rgb
from torch_trainer.prediction import PredictionOptions, infer_folder
from utils.machine import describe_machine, machine_info


def make_camera_copies(folder: Path, target: Path, size: tuple[int, int], limit: int) -> list[Path]:
    """Upscaled JPEG copies under ``target`` with the same relative paths (made once, reused by later runs)."""
    copies = []
    for source in list_images(folder)[: limit or None]:
        copy = (target / source.relative_to(folder)).with_suffix(".jpg")
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            picture = load_rgb(source)
            # Keep the photo's orientation: a portrait photo becomes a portrait 12 MP photo.
            shape = size if picture.width >= picture.height else size[::-1]
            picture.resize(shape, Image.Resampling.BICUBIC).save(copy, quality=92)
        copies.append(copy)
    return copies


def decode_floor(paths: list[Path]) -> float:
    """Images/s of decoding each JPEG at 1/8 scale and nothing else."""
    start = time.perf_counter()
    for path in paths:
        load_rgb(path, min_side=1)
    return len(paths) / (time.perf_counter() - start)


def training_loader_speed(copies: list[Path], model_path: str, cache_root: Path, num_workers: int,
                          batch_size: int) -> dict[str, float]:
    """Images/s of main.py's training DataLoader (decode + random-resized crop + augmentation, no model) over the
    camera-size copies: decoding every epoch, and through --cache_images (first epoch fills it, later epochs read)."""
    from dataloaders.build import make_loader
    from dataloaders.discovery import Sample
    from dataloaders.image_cache import CachedLoader
    from dataloaders.image_io import reduced_loader
    from dataloaders.transforms import build_train_transform, decode_min_side
    from torch_trainer.run_info import read_run_info

    pre = read_run_info(model_path).preprocessing
    side = decode_min_side(pre, train_min_crop_scale=0.25)
    transform = build_train_transform(pre, min_crop_scale=0.25, vflip=0.0, color_jitter=0.2, randaugment=False)
    samples = [Sample(path, 0) for path in copies]

    def epoch(loader_fn) -> float:
        start = time.perf_counter()
        for _ in make_loader(samples, transform, batch_size, num_workers, train=True, loader=loader_fn):
            pass
        return len(samples) / (time.perf_counter() - start)

    shutil.rmtree(cache_root, ignore_errors=True)
    cache = CachedLoader(cache_root, side)
    return {"train_loader_no_cache_images_per_s": round(epoch(reduced_loader(side)), 2),
            "train_loader_cache_first_epoch_images_per_s": round(epoch(cache), 2),
            "train_loader_cache_later_epoch_images_per_s": round(epoch(cache), 2),
            "cache_mb": round(sum(f.stat().st_size for f in cache_root.rglob("*.npy")) / 2**20, 1)}


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
    parser.add_argument("--backends", nargs="+", default=["onnx", "torch"], choices=["onnx", "torch"])
    return parser


def main(args: argparse.Namespace) -> pd.DataFrame:
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    work = Path(args.work_dir)
    width, height = (int(v) for v in args.size.lower().split("x"))
    folder = Path(args.folder)
    copies = make_camera_copies(folder, work / "camera", (width, height), args.limit)
    originals = work / "originals"
    if not originals.exists():  # the same photos, at their own size, as a folder of their own
        for copy in copies:
            relative = copy.relative_to(work / "camera")
            source = next(p for p in list_images(folder / relative.parent) if p.stem == relative.stem)
            (originals / relative.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, originals / relative.parent / source.name)
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
                                        reduced_decode=reduced)
            summary = infer_folder(args.model_path, source, output, options, batch_size=args.batch_size,
                                   num_workers=args.num_workers)
            runs[name] = (summary["images_per_s"], output)
            print(f"{backend:5s} {name:28s} {summary['images_per_s']:7.2f} images/s", flush=True)
        full = read_predictions(runs["camera size, full decode"][1])
        reduced = read_predictions(runs["camera size, reduced decode"][1])
        prob_columns = [c for c in full.columns if c.startswith("prob_")]
        rows.append({
            "backend": backend, "images": len(full),
            "original_images_per_s": round(runs["original photos"][0], 2),
            "camera_full_decode_images_per_s": round(runs["camera size, full decode"][0], 2),
            "camera_reduced_decode_images_per_s": round(runs["camera size, reduced decode"][0], 2),
            "speedup_reduced_vs_full": round(runs["camera size, reduced decode"][0]
                                             / runs["camera size, full decode"][0], 2),
            "original_vs_reduced_ratio": round(runs["original photos"][0] / runs["camera size, reduced decode"][0], 2),
            "decode_floor_images_per_s": round(floor, 2),
            "top1_agreement_reduced_vs_full": round(float((full["predicted_label"]
                                                           == reduced["predicted_label"]).mean()), 4),
            "max_prob_diff_reduced_vs_full": round(float(np.abs(full[prob_columns].to_numpy()
                                                                - reduced[prob_columns].to_numpy()).max()), 4),
            **{k: machine[k] for k in ("cpu_model", "cpu_isa", "threads", "torch", "onnxruntime")}})
    loader_speed = training_loader_speed(copies, args.model_path, work / "image_cache", args.num_workers,
                                         args.batch_size)
    print("training DataLoader over the camera-size copies (decode + augmentation, no model): "
          + ", ".join(f"{k} {v}" for k, v in loader_speed.items()), flush=True)
    rows = [{**row, **loader_speed} for row in rows]
    table = pd.DataFrame(rows)
    print(table.drop(columns=["cpu_model", "cpu_isa", "threads", "torch", "onnxruntime"]).to_string(index=False))
    table.to_csv(work / "camera_resolution.csv", index=False)
    (work / "camera_resolution.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
