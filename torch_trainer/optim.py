"""Optimizer and learning-rate schedule from the config, through timm's factories."""

from __future__ import annotations

from typing import Optional

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from configs import OptimizerSpec, ScheduleSpec


def build_optimizer(model: torch.nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    # timm skips weight decay on biases and norm layers, which plain torch.optim would decay too.
    extra = {"momentum": spec.momentum} if spec.name == "sgd" else {}
    if spec.layer_decay is not None:
        # timm groups the model's blocks (its group_matcher) and scales each group's rate by layer_decay ** depth
        extra["layer_decay"] = spec.layer_decay
    return create_optimizer_v2(model, opt=spec.name, lr=spec.lr, weight_decay=spec.weight_decay, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, updates_per_epoch: int,
                    num_epochs: Optional[int] = None):
    """A per-step schedule (warm-up then cosine or step decay) spanning ``num_epochs`` (default ``spec.epochs``), or
    None for a constant learning rate."""
    if spec.name == "none":
        return None
    num_epochs = num_epochs or spec.epochs
    warmup = min(spec.warmup_epochs, max(num_epochs - 1, 0))
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=spec.name,
        num_epochs=num_epochs,
        decay_epochs=spec.step_size,
        decay_rate=spec.step_gamma,
        min_lr=spec.lr * 0.01,
        warmup_lr=spec.lr * 0.01,
        warmup_epochs=warmup,
        step_on_epochs=False,
        updates_per_epoch=max(updates_per_epoch, 1),
    )
    return scheduler
