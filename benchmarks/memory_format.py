"""PyTorch on CPU: NCHW (contiguous) against NHWC (channels_last) tensors, for inference and for training steps.

main.py and inference.py's torch backend use channels_last on CPU as well as CUDA (utils.device.prefers_channels_last)
because of what this measures: same model, same random batch, images/s of a forward pass under inference_mode and of
a training step (forward, backward, AdamW), alternating the two layouts so drift on a shared machine hits both.

Example (docs/measurements_speed.md):
    python -m benchmarks.memory_format --model_name efficientnet_lite0 --img_size 192 --batch_size 32
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from deploy.machine import describe_machine, machine_info


def images_per_s(step, batch_size: int, repeats: int) -> float:
    step()  # warm-up: oneDNN picks and caches its kernels on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * batch_size / (time.perf_counter() - start)


def measure(model_name: str, img_size: int, batch_size: int, repeats: int, channels_last: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=6)
    images = torch.randn(batch_size, 3, img_size, img_size)
    targets = torch.randint(0, 6, (batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer() -> None:
        with torch.inference_mode():
            model.eval()(images)

    def train() -> None:
        loss = torch.nn.functional.cross_entropy(model.train()(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return {"inference": images_per_s(infer, batch_size, repeats), "training": images_per_s(train, batch_size, repeats)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("NCHW vs channels_last on CPU")
    parser.add_argument("--model_name", default="efficientnet_lite0")
    parser.add_argument("--img_size", type=int, default=192)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both layouts")
    return parser


def main(args: argparse.Namespace) -> dict:
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    results: dict[str, list[dict[str, float]]] = {"contiguous": [], "channels_last": []}
    for _ in range(args.rounds):
        for layout in results:
            results[layout].append(measure(args.model_name, args.img_size, args.batch_size, args.repeats,
                                           layout == "channels_last"))
    summary = {"model": args.model_name, "img_size": args.img_size, "batch_size": args.batch_size,
               **{f"{layout}_{kind}_images_per_s": round(max(r[kind] for r in runs), 2)
                  for layout, runs in results.items() for kind in ("inference", "training")}}
    for kind in ("inference", "training"):
        summary[f"{kind}_speedup"] = round(summary[f"channels_last_{kind}_images_per_s"]
                                           / summary[f"contiguous_{kind}_images_per_s"], 2)
    print(json.dumps({**summary, **{k: machine[k] for k in ("cpu_model", "cpu_isa", "threads", "torch")}}, indent=1))
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
