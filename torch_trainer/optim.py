"""Optimizer and learning-rate schedule from the config, through timm's factories."""

from __future__ import annotations

from typing import Optional

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from configs import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # timm skips weight decay on biases and norm layers, which plain torch.optim would decay too.
    extra = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    if cfg.layer_decay is not None:
        # timm groups the model's blocks (its group_matcher) and scales each group's rate by layer_decay ** depth
        extra["layer_decay"] = cfg.layer_decay
    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr_ae, weight_decay=cfg.weight_decay, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int,
                    num_epochs: Optional[int] = None):
    """A per-step schedule (warm-up then cosine or step decay) spanning ``num_epochs`` (default ``cfg.epochs``), or
    None for a constant learning rate."""
    if cfg.scheduler == "none":
        return None
    num_epochs = num_epochs or cfg.epochs
    warmup = min(cfg.warmup_epochs, max(num_epochs - 1, 0))
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.scheduler,
        num_epochs=num_epochs,
        decay_epochs=cfg.step_size,
        decay_rate=cfg.step_gamma,
        min_lr=cfg.lr_ae * 0.01,
        warmup_lr=cfg.lr_ae * 0.01,
        warmup_epochs=warmup,
        step_on_epochs=False,
        updates_per_epoch=max(updates_per_epoch, 1),
    )
    return scheduler
