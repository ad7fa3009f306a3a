"""Memory and speed of inference.py on a large folder: RSS must stay flat however many images there are.

Generates --n_images synthetic photos (unless --folder is given), runs inference.py's engine (prediction.engine.infer_folder) in-process while a thread
samples the resident memory of this process and its DataLoader workers, and prints images/s and RSS (the maximum
over each tenth of the run). Without --model_path it builds a throwaway run folder (random weights; speed and
memory do not depend on the weight values) for --model_name at --img_size.

Example (the figures in the README):
    python -m benchmarks.inference_memory --n_images 5000 --model_name efficientnet_b0 --img_size 224
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from configs import PredictionOptions
from data.synthetic_lesions import CLASSES, make_lesion_image
from dataloaders.transforms import resolve_preprocessing
from deploy.machine import RssSampler, describe_machine, machine_info
from prediction.engine import infer_folder
from runs.checkpoint import save_checkpoint
from runs.run_folder import RunDir
from runs.run_info import RunInfo, write_run_info
from torch_trainer.models import build_model


def make_folder(folder: Path, n_images: int, size: int) -> None:
    import cv2

    for i in range(n_images):
        rng = np.random.default_rng(i)
        image, _ = make_lesion_image(rng, size, CLASSES[i % len(CLASSES)])
        sub = folder / f"batch_{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"img_{i:05d}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])


def make_run_folder(run_dir: Path, model_name: str, img_size: int) -> Path:
    model, timm_name = build_model(model_name, len(CLASSES), False)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(run_dir, RunInfo(list(CLASSES), model_name, timm_name, resolve_preprocessing(model, img_size),
                                    {"drop_rate": 0.0}))
    save_checkpoint(run_dir / RunDir.BEST_CKPT, {"model": model.state_dict()})
    return run_dir


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("inference memory/speed benchmark", add_help=add_help)
    parser.add_argument("--model_path", default=None, help="run folder (default: a throwaway one)")
    parser.add_argument("--model_name", default="efficientnet_b0")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--folder", default=None, help="images to classify (default: generate --n_images)")
    parser.add_argument("--n_images", type=int, default=5000)
    parser.add_argument("--photo_size", type=int, default=320, help="side of the generated photos")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--onnx_model", default=None)
    parser.add_argument("--generate_gradcam", action="store_true")
    return parser


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="skinclf-bench-") as tmp:
        tmp = Path(tmp)
        folder = Path(args.folder) if args.folder else tmp / "photos"
        if not args.folder:
            make_folder(folder, args.n_images, args.photo_size)
        run_dir = Path(args.model_path) if args.model_path else make_run_folder(tmp / "run", args.model_name,
                                                                                 args.img_size)
        options = PredictionOptions(backend=args.backend, onnx_model=args.onnx_model, device="cpu",
                                    generate_gradcam=args.generate_gradcam)
        with RssSampler() as sampler:
            summary = infer_folder(run_dir, folder, tmp / "out", options, batch_size=args.batch_size,
                                   num_workers=args.num_workers)
        samples = sampler.samples
    rss = np.array([mb for _, mb in samples])
    tenths = [round(float(np.max(chunk)), 1) for chunk in np.array_split(rss, 10) if len(chunk)]
    result = {"images": summary["predicted"], "images_per_s": round(summary["images_per_s"], 2),
              "rss_peak_mb": round(float(rss.max()), 1), "rss_max_per_tenth_mb": tenths,
              "backend": args.backend, "batch_size": args.batch_size, "num_workers": args.num_workers,
              **machine_info()}
    print(f"machine: {describe_machine(result)}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
