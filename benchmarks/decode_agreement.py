"""Does reduced-size JPEG decoding give the answers full decoding gives? Measured on camera-size copies of real photos.

For each trained model (run folder) it scores camera-size copies of a real folder (default 4032 x 3024, JPEG quality 92,
the copies ``camera_resolution`` makes) decoded four ways, each through the run's eval transform, TTA and temperature
(what inference.py does):
  full       every pixel decoded (``--reduced_decode False``): the reference;
  reduced    the default: the smallest JPEG DCT scale that keeps the transform's resize target twice over;
  shifted    the full decode with its first row and column dropped: a change of framing of 1/4000 of the photo that
             nobody would call a different picture, to show how far this model's answers move for nothing;
  original   the source photo at its own size (e.g. 640 x 480): the same picture from a smaller camera.
and compares each with ``full``: top-1 agreement (and the full decode's top-2 probability margin on every image whose
answer changed), and per image the largest difference of any class probability (median, 95th percentile, maximum,
share within 0.02). Per model and pooled over models; several models (seeds) give a steadier figure than one.

Example (docs/measurements_speed.md):
    python -m benchmarks.decode_agreement --run_dirs RUN_SEED0 RUN_SEED1 RUN_SEED2 \
        --folder ../shared/data/dermnet_a/testset --work_dir /tmp/camera
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from benchmarks.camera_resolution import make_camera_copies
from dataloaders.image_io import load_rgb
from dataloaders.transforms import build_eval_transform, decode_min_side
from deploy.machine import describe_machine, machine_info
from prediction.predictors import TorchPredictor, predict_proba
from runs.checkpoint import load_run_model

DECODES = ["full", "reduced", "shifted", "original"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("reduced vs full JPEG decoding: do the answers agree?", add_help=add_help)
    parser.add_argument("--run_dirs", nargs="+", required=True, help="run folders written by main.py (same "
                                                                     "preprocessing, e.g. the seeds of one recipe)")
    parser.add_argument("--folder", required=True, help="real photos (searched recursively)")
    parser.add_argument("--work_dir", required=True, help="where the camera-size copies and the tables go")
    parser.add_argument("--size", default="4032x3024", help="camera size, WIDTHxHEIGHT (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N photos (default: all)")
    parser.add_argument("--batch_size", type=int, default=64)
    return parser


def decoded_inputs(pairs: list[tuple[Path, Path]], transform, min_side: int) -> tuple[dict[str, torch.Tensor], str]:
    """The model inputs of every photo under each decode, and the size the reduced decode of the first copy had."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in DECODES}
    reduced_size = ""
    for source, copy in tqdm(pairs, desc="decode"):
        full, reduced = load_rgb(copy), load_rgb(copy, min_side=min_side)
        reduced_size = reduced_size or "x".join(map(str, reduced.size))
        inputs["full"].append(transform(full))
        inputs["reduced"].append(transform(reduced))
        inputs["shifted"].append(transform(full.crop((1, 1, full.width, full.height))))
        inputs["original"].append(transform(load_rgb(source)))
    return {name: torch.stack(tensors) for name, tensors in inputs.items()}, reduced_size


def compare(probs: dict[str, np.ndarray]) -> list[dict]:
    """Each decode against the full decode, one row per decode."""
    full = probs["full"]
    ranked = np.sort(full, axis=1)
    margin = ranked[:, -1] - ranked[:, -2]
    rows = []
    for name in DECODES[1:]:
        changed = probs[name].argmax(1) != full.argmax(1)
        difference = np.abs(probs[name] - full).max(axis=1)
        rows.append({"decode": name, "images": len(full), "top1_agreement": float(1 - changed.mean()),
                     "changed": int(changed.sum()),
                     "full_margin_of_changed": " ".join(f"{m:.3f}" for m in np.sort(margin[changed])),
                     "prob_diff_median": float(np.median(difference)),
                     "prob_diff_p95": float(np.percentile(difference, 95)), "prob_diff_max": float(difference.max()),
                     "share_within_0.02": float((difference <= 0.02).mean())})
    return rows


def markdown(table: pd.DataFrame, reduced_size: str) -> str:
    lines = [f"reduced decode of the first copy: {reduced_size}", "",
             "| model | decode vs full | images | top-1 agreement (changed) | full-decode margin of changed | "
             "prob diff median / p95 / max | within 0.02 |", "|---|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        lines.append(f"| {row['model']} | {row['decode']} | {row['images']} | {row['top1_agreement']:.4f} "
                     f"({row['changed']}) | {row['full_margin_of_changed'] or '–'} | {row['prob_diff_median']:.4f} / "
                     f"{row['prob_diff_p95']:.4f} / {row['prob_diff_max']:.4f} | {row['share_within_0.02']:.3f} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> pd.DataFrame:
    print(f"machine: {describe_machine(machine_info())}", flush=True)
    work = Path(args.work_dir)
    width, height = (int(v) for v in args.size.lower().split("x"))
    models = []
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "class_info.json").is_file():
            raise SystemExit(f"{run_dir} is not a run folder (no class_info.json); pass folders written by main.py")
        models.append((Path(run_dir), *load_run_model(run_dir)))
    preprocessing = models[0][2].preprocessing
    for run_dir, _, info in models[1:]:
        if info.preprocessing != preprocessing:
            raise SystemExit(f"{run_dir} was trained with other preprocessing than {models[0][0]}; compare it "
                             "separately")
    pairs = make_camera_copies(Path(args.folder), work / "camera", (width, height), args.limit)
    if not pairs:
        raise SystemExit(f"{args.folder} has no images; pass a folder of real photos")
    inputs, reduced_size = decoded_inputs(pairs, build_eval_transform(preprocessing), decode_min_side(preprocessing))
    rows, pooled, per_image = [], {name: [] for name in DECODES}, []
    names = [str(pair[1].relative_to(work / "camera")) for pair in pairs]
    for run_dir, model, info in models:
        predictor = TorchPredictor(model, torch.device("cpu"))
        probs = {name: predict_proba(predictor, images, info.tta, info.temperature, args.batch_size)
                 for name, images in inputs.items()}
        rows += [{"model": run_dir.name, **row} for row in compare(probs)]
        for name in DECODES:
            pooled[name].append(probs[name])
            per_image += [{"model": run_dir.name, "filename": file, "decode": name, "predicted": int(p.argmax()),
                           **{f"prob_{info.class_names[k]}": float(v) for k, v in enumerate(p)}}
                          for file, p in zip(names, probs[name])]
    if len(models) > 1:
        rows += [{"model": f"pooled ({len(models)} models)", **row}
                 for row in compare({name: np.concatenate(parts) for name, parts in pooled.items()})]
    table = pd.DataFrame(rows)
    work.mkdir(parents=True, exist_ok=True)
    table.to_csv(work / "decode_agreement.csv", index=False)
    pd.DataFrame(per_image).to_csv(work / "decode_agreement_per_image.csv", index=False)
    text = markdown(table, reduced_size)
    (work / "decode_agreement.md").write_text(text, encoding="utf-8")
    print(text)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
