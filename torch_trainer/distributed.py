"""DistributedDataParallel plumbing for ``torchrun --nproc_per_node=N main.py ...``.

Each process trains on its share of every epoch (DistributedSampler); validation predictions from all processes are
gathered so every rank computes the same metrics (and so takes the same early-stopping decision); only rank 0 writes
the run folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from evaluation.metrics import EvalResult
from torch_trainer.trainer import TrainStats
from utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_choice: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up: nccl on GPUs, gloo on CPU. Returns the rank's device too."""
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if device_choice == "cuda" and not use_cuda:
        raise UserError("--device cuda but no GPU is visible; use --device cpu (gloo) or run on a GPU machine")
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {info.local_rank} has no GPU ({torch.cuda.device_count()} visible); lower "
                            f"--nproc_per_node")
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    return info, device


def broadcast(value: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def reduce_train_stats(stats: TrainStats, info: DistInfo) -> TrainStats:
    """Image-weighted loss and accuracy over all ranks; throughput summed."""
    if not info.enabled:
        return stats
    totals = torch.tensor([stats.loss * stats.images, stats.accuracy * stats.images, stats.images,
                           stats.images_per_s], dtype=torch.float64)
    dist.all_reduce(totals)
    seen = max(totals[2].item(), 1.0)
    return replace(stats, loss=totals[0].item() / seen, accuracy=totals[1].item() / seen,
                   images=int(totals[2].item()), images_per_s=totals[3].item())


def gather_evaluation(result: EvalResult, info: DistInfo) -> EvalResult:
    """All ranks' predictions merged by dataset index (DistributedSampler pads with repeats: kept once)."""
    if not info.enabled:
        return result
    parts = [None] * info.world_size
    dist.all_gather_object(parts, {"targets": result.targets, "probs": result.probs, "indices": result.indices})
    indices = np.concatenate([p["indices"] for p in parts])
    targets = np.concatenate([p["targets"] for p in parts])
    probs = np.concatenate([p["probs"] for p in parts if len(p["probs"])])
    order = np.unique(indices, return_index=True)[1]
    indices, targets, probs = indices[order], targets[order], probs[order]
    # The plain cross-entropy of the merged predictions (validation uses unweighted, unsmoothed CE).
    loss = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())
    return EvalResult.from_predictions(loss, targets, probs, indices)
