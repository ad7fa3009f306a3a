"""serve.py under load, beside inference.py's offline throughput on the same photos, model and CPU.

1. Offline: the folder-inference engine (inference.py's) classifies --images once to warm up, then again timed:
   images per second without model loading.
2. Online: serve.py starts in its own process; for each --clients level (default 1, 8, 32) that many asyncio clients
   send one photo per request for --seconds (after --warmup_s untimed), each waiting for its answer before sending the
   next. Throughput, p50/p95/p99 latency, 503 answers (queue full, counted apart) and every other failure.
3. Memory: the server's resident memory (VmRSS) after 100 requests and after --memory_requests (default 10,000).

The clients share the CPU with the server, as on a one-box deployment; the table says which CPU.

Example (docs/measurements_serving.md):
    python -m benchmarks.serve_load --model_path onnx_models --images DATA/dermnet_a/testset --output serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np

from configs import AnswerOptions, PredictionOptions
from dataloaders.discovery import list_images
from deploy.machine import describe_machine, machine_info
from prediction.engine import infer_folder
from utils.logging_setup import setup_logging

logger = logging.getLogger("serve_load")
ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("serve.py load test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="run folder or export folder, as serve.py takes it")
    parser.add_argument("--images", required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--backend", default=None, choices=("torch", "onnx"),
                        help="passed to serve.py and to the offline run (default: serve.py's for --model_path)")
    parser.add_argument("--onnx_model", default=None, help="passed to serve.py and to the offline run")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per client level")
    parser.add_argument("--warmup_s", type=float, default=3.0, help="untimed seconds before each level")
    parser.add_argument("--memory_requests", type=int, default=10000,
                        help="requests sent before the second memory reading (0: skip the memory check)")
    parser.add_argument("--max_images", type=int, default=400, help="photos used at most (the first, sorted)")
    parser.add_argument("--serve_args", default="", help="extra serve.py flags, e.g. '--max_batch_size 32'")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    return parser


def offline_throughput(model_path: str, images: Path, options: PredictionOptions) -> dict[str, Any]:
    """inference.py's engine on the photos (batch 32, its default workers), after one untimed warm-up pass."""
    with tempfile.TemporaryDirectory() as work:
        infer_folder(model_path, images, Path(work) / "warm", options)
        summary = infer_folder(model_path, images, Path(work) / "timed", options)
    return {"images": summary["predicted"], "images_per_s": summary["images_per_s"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def _load(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float,
                count: Optional[int] = None) -> dict[str, Any]:
    """``clients`` loops each sending one photo per request until ``seconds`` pass (or ``count`` requests in all)."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    cycle = itertools.cycle(photos)
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.perf_counter() < deadline and (count is None or sent < count):
            sent += 1
            name, data = next(cycle)
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/predict", files=[("files", (name, data, "image/jpeg"))])
                key = str(response.status_code)
                if response.status_code == 200 and not response.json()["results"][0]["ok"]:
                    key = "200_image_refused"
            except httpx.HTTPError as err:
                key = type(err).__name__
            latencies.append(time.perf_counter() - start)
            statuses[key] = statuses.get(key, 0) + 1
            if key == "503":
                await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ok = statuses.get("200", 0)
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"clients": clients, "seconds": elapsed, "requests": len(latencies), "ok": ok,
            "throughput_per_s": ok / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "refused_503": statuses.get("503", 0),
            "failed_other": sum(v for k, v in statuses.items() if k not in ("200", "503")), "statuses": statuses}


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would drown the results
    photo_paths = list_images(Path(args.images))[: args.max_images]
    photos = [(f"photo_{i}.jpg", p.read_bytes()) for i, p in enumerate(photo_paths)]
    answer_flags = {k: v for k, v in (("backend", args.backend), ("onnx_model", args.onnx_model)) if v}
    logger.info("offline: inference.py's engine on %d photos", len(photos))
    from serving.model_service import ServedModel  # resolves an export folder as serve.py does

    served = ServedModel(args.model_path, AnswerOptions(**answer_flags), explain=False)
    backend = served.options.backend
    options = PredictionOptions(backend=backend, onnx_model=None if backend == "torch" else str(served.model_file))
    offline = offline_throughput(str(served.run_dir), Path(args.images), options)
    served.close()
    logger.info("offline: %.1f images/s", offline["images_per_s"])

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "serve.py", "--model_path", args.model_path, "--port", str(port), "--explain", "False",
               *[f"--{k}={v}" for k, v in answer_flags.items()], *args.serve_args.split()]
    log_file = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen(command, cwd=ROOT, stderr=log_file, stdout=log_file, text=True)
    results: dict[str, Any] = {"machine": machine_info(), "model_path": args.model_path, "serve_command": command[1:],
                               "photos": len(photos), "offline": offline, "levels": []}
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve.py did not start: {Path(log_file.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        for clients in (int(c) for c in args.clients.split(",")):
            asyncio.run(_load(url, photos, clients, args.warmup_s))
            level = asyncio.run(_load(url, photos, clients, args.seconds))
            level["vs_offline"] = level["throughput_per_s"] / offline["images_per_s"]
            results["levels"].append(level)
            logger.info("%d clients: %.1f requests/s (%.2fx offline), p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, "
                        "503: %d, other failures: %d", clients, level["throughput_per_s"], level["vs_offline"],
                        level["p50_ms"], level["p95_ms"], level["p99_ms"], level["refused_503"],
                        level["failed_other"])
        if args.memory_requests:
            memory = asyncio.run(_load(url, photos, 8, 10 ** 6, count=100))
            rss_100 = _rss_mb(server.pid)
            rest = asyncio.run(_load(url, photos, 8, 10 ** 6, count=args.memory_requests - 100))
            rss_n = _rss_mb(server.pid)
            results["memory"] = {"rss_mb_after_100": rss_100, "requests": args.memory_requests,
                                 f"rss_mb_after_{args.memory_requests}": rss_n, "growth_mb": rss_n - rss_100,
                                 "failed_other": memory["failed_other"] + rest["failed_other"],
                                 "refused_503": memory["refused_503"] + rest["refused_503"]}
            logger.info("server memory: %.0f MB after 100 requests, %.0f MB after %d", rss_100, rss_n,
                        args.memory_requests)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    log = Path(log_file.name).read_text()
    os.unlink(log_file.name)
    batching = re.search(r"stopped after (\d+) images in (\d+) batches \(mean batch ([\d.]+), largest (\d+)", log)
    if batching:
        results["batching"] = {"images": int(batching[1]), "batches": int(batching[2]),
                               "mean_batch": float(batching[3]), "largest_batch": int(batching[4])}
    single = results["levels"][0]["p50_ms"] if results["levels"] else float("nan")
    print(f"\n{describe_machine(results['machine'])}; offline {offline['images_per_s']:.1f} images/s "
          f"({offline['images']} photos)")
    print("| clients | requests/s | vs offline | p50 ms | p95 ms | p99 ms | p95 / 1-client p50 | 503 "
          "| other failures |")
    print("|---|---|---|---|---|---|---|---|---|")
    for level in results["levels"]:
        print(f"| {level['clients']} | {level['throughput_per_s']:.1f} | {level['vs_offline']:.2f}x | "
              f"{level['p50_ms']:.1f} | {level['p95_ms']:.1f} | {level['p99_ms']:.1f} | "
              f"{level['p95_ms'] / single:.1f}x | {level['refused_503']} | {level['failed_other']} |")
    if "memory" in results:
        m = results["memory"]
        print(f"memory: {m['rss_mb_after_100']:.0f} MB after 100 requests, "
              f"{m[f'rss_mb_after_{args.memory_requests}']:.0f} MB after {args.memory_requests} "
              f"({m['growth_mb']:+.0f} MB); failures other than 503: {m['failed_other']}")
    if "batching" in results:
        print(f"batching: {results['batching']}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
