"""Training throughput and the share of each step spent waiting for data.

Runs real training steps (forward, backward, optimizer) over a dataset's training images with the exact loaders and
augmentation main.py uses, and reports, for each --num_workers value:
  images/s of the full loop, the share of wall time spent waiting for the next batch,
  images/s of the loader alone (decode + augment, no model) and of the model alone (same batch, no loading).
Data loading is the bottleneck when the loader alone is slower than the model alone.

Example (the figures in the README):
    python -m benchmarks.train_throughput --data_dir ../shared/data/dogcat --model_name efficientnet_b0 \
        --img_size 224 --batch_size 32 --num_workers 0 1 2 --steps 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from configs import TrainConfig
from dataloaders.build import make_loader
from dataloaders.discovery import discover_dataset
from dataloaders.transforms import build_train_transform, resolve_preprocessing
from deploy.machine import describe_machine, machine_info
from torch_trainer.models import build_model
from torch_trainer.optim import build_optimizer


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("training throughput benchmark", add_help=add_help)
    parser.add_argument("--data_dir", required=True, help="dataset root with trainset/<class>/ folders")
    parser.add_argument("--model_name", default="efficientnet_b0")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default=None, help="optional JSON file for the results")
    return parser


def _loader(samples, transform, batch_size, workers):
    return make_loader(samples, transform, batch_size, workers, train=True, generator=torch.Generator())


def _loop(loader, steps, warmup, step_fn=None):
    """Time ``steps`` batches after ``warmup``; return (images/s, share of time waiting for data)."""
    batches = itertools.cycle(loader) if len(loader) < steps + warmup else iter(loader)
    waited = images = 0.0
    for i in range(steps + warmup):
        if i == warmup:
            start, waited, images = time.perf_counter(), 0.0, 0
        tick = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - tick
        if step_fn is not None:
            step_fn(batch)
        images += batch[0].shape[0]
    seconds = time.perf_counter() - start
    return images / seconds, waited / seconds


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(model_name=args.model_name, img_size=args.img_size, pre_trained=False)
    index = discover_dataset(args.data_dir, check_images=False)
    model, timm_name = build_model(cfg.model_name, len(index.class_names), False)
    preprocessing = resolve_preprocessing(model, args.img_size)
    transform = build_train_transform(preprocessing, min_crop_scale=cfg.min_crop_scale, vflip=cfg.vflip,
                                      color_jitter=cfg.color_jitter, randaugment=cfg.randaugment)
    optimizer = build_optimizer(model, cfg.optimizer_spec())
    criterion = torch.nn.CrossEntropyLoss()
    model.train()

    def train_step(batch):
        images, targets, _ = batch
        loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    fixed = next(iter(_loader(index.train, transform, args.batch_size, 0)))
    model_only, _ = _loop([fixed], args.steps, args.warmup, train_step)
    results = []
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    for workers in args.num_workers:
        loader_only, _ = _loop(_loader(index.train, transform, args.batch_size, workers), args.steps, args.warmup)
        full, waiting = _loop(_loader(index.train, transform, args.batch_size, workers), args.steps, args.warmup,
                              train_step)
        row = {"model": timm_name, "img_size": args.img_size, "batch_size": args.batch_size, "num_workers": workers,
               "threads": torch.get_num_threads(), "train_images_per_s": round(full, 2),
               "data_wait_share": round(waiting, 3), "loader_only_images_per_s": round(loader_only, 1),
               "model_only_images_per_s": round(model_only, 2), **machine}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
