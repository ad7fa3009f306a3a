"""One training phase of a run: the selection phase (train split, best epoch picked on validation) or the refit
(train + validation, no held-out data, as many epochs as the selection phase found best).

Both phases share everything else: loaders, loss, optimizer, schedule (always spanning ``cfg.epochs``, so a refit that
stops after the best epoch replays the selected model's learning-rate trajectory), EMA, mixup, checkpoints and resume.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DistributedSampler

from configs import TrainConfig
from dataloaders.build import balanced_sampler, make_loader
from dataloaders.discovery import Sample
from dataloaders.transforms import build_train_transform
from torch_trainer import run_folder as rf
from torch_trainer.checkpoint import load_checkpoint, save_checkpoint
from torch_trainer.optim import build_optimizer, build_scheduler
from torch_trainer.trainer import EarlyStopping, FitState, Precision, fit
from utils.distributed import DistInfo, gather_evaluation, reduce_train_stats
from utils.losses import build_criterion
from utils.metrics import macro_auc
from utils.seed import seed_everything

logger = logging.getLogger(__name__)

# A training set whose largest class has this many times the images of its smallest gets the balanced sampler
# under --sampler auto.
AUTO_BALANCE_RATIO = 1.5


@dataclass(frozen=True)
class PhaseFiles:
    """Where a phase keeps its checkpoints and log, relative to the run folder."""
    name: str
    last: str                   # checkpoint after every epoch (resume)
    log: str
    best: Optional[str] = None  # phases with validation: the best epoch's checkpoint
    required_on_resume: bool = False  # --resume fails without its checkpoint (the selection phase of a one-split run)


SELECT = PhaseFiles("select", rf.LAST_CKPT, rf.LOG_CSV, rf.BEST_CKPT, required_on_resume=True)
REFIT = PhaseFiles("refit", rf.REFIT_CKPT, rf.REFIT_LOG_CSV)


def fold_files(fold: int) -> PhaseFiles:
    """Fold ``fold`` (0-based) of --folds K, in its own sub-folder ``fold_<fold+1>/``."""
    folder = rf.fold_dir_name(fold)
    return PhaseFiles(f"fold {fold + 1}", f"{folder}/{rf.LAST_CKPT}", f"{folder}/{rf.LOG_CSV}",
                      f"{folder}/{rf.BEST_CKPT}")


def resolve_sampler(cfg: TrainConfig, labels: list[int], n_class: int, distributed: bool) -> str:
    """``random`` or ``balanced``: ``auto`` balances an imbalanced training set (not yet under torchrun)."""
    if cfg.sampler != "auto":
        return cfg.sampler
    counts = [labels.count(k) for k in range(n_class)]
    ratio = max(counts) / max(min(counts), 1)
    choice = "balanced" if ratio >= AUTO_BALANCE_RATIO else "random"
    if choice == "balanced" and distributed:
        logger.warning("--sampler auto: classes are imbalanced (%.1fx) but the balanced sampler is not supported "
                       "under torchrun; training with random batches (consider --class_weights auto)", ratio)
        return "random"
    logger.info("--sampler auto: largest/smallest training class %.2fx -> %s batches", ratio, choice)
    return choice


def build_ema(cfg: TrainConfig, model: torch.nn.Module):
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3

    # Warm-up (decay = 1 - (1 + step)^-2/3, capped at --model_ema_decay) makes the average meaningful after the few
    # hundred steps of a short fine-tune; a fixed 0.9998 would still be mostly the pretrained start.
    return ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True)


def build_mixup(cfg: TrainConfig, n_class: int):
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=n_class)


def delivered_state(model: torch.nn.Module, ema) -> dict[str, torch.Tensor]:
    """The weights that get evaluated, saved as ``model`` and exported: the EMA's when there is one."""
    return (ema.module if ema is not None else model).state_dict()


def run_phase(files: PhaseFiles, cfg: TrainConfig, run_dir: Path, model: torch.nn.Module, device: torch.device,
              train_samples: list[Sample], val_samples: Optional[list[Sample]], *, preprocessing: dict[str, Any],
              image_loader, class_names: list[str], class_info: dict[str, Any], stop_after: int,
              eval_transform, tracker, dist_info: DistInfo = DistInfo(), resume: bool = False) -> dict[str, Any]:
    """Train ``model`` in place for epochs ``0 .. stop_after-1`` of a ``cfg.epochs`` schedule (early stopping may end
    the selection phase sooner); returns the phase's outcome (epochs run, best epoch, seconds)."""
    writes = dist_info.is_main
    channels_last = device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # ``net`` trains (DDP-wrapped under torchrun); ``model`` is what checkpoints and the final evaluation use.
    net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None) if dist_info.enabled else model)
    generator = torch.Generator()
    pin = device.type == "cuda"
    train_tf = build_train_transform(preprocessing, min_crop_scale=cfg.min_crop_scale, vflip=cfg.vflip,
                                     color_jitter=cfg.color_jitter, randaugment=cfg.randaugment)
    labels = [sample.label for sample in train_samples]
    choice = resolve_sampler(cfg, labels, len(class_names), dist_info.enabled)
    if dist_info.enabled:  # torchrun: always random (main() refuses an explicit --sampler balanced there)
        sampler = DistributedSampler(train_samples, dist_info.world_size, dist_info.rank, shuffle=True,
                                     seed=cfg.random_state)
    else:
        sampler = balanced_sampler(labels, generator) if choice == "balanced" else None
    train_loader = make_loader(train_samples, train_tf, cfg.batch_size, cfg.num_workers, train=True,
                               generator=generator, pin_memory=pin, loader=image_loader, sampler=sampler)
    val_loader = None
    if val_samples is not None:
        val_sampler = (DistributedSampler(val_samples, dist_info.world_size, dist_info.rank, shuffle=False)
                       if dist_info.enabled else None)
        val_loader = make_loader(val_samples, eval_transform, cfg.batch_size, cfg.num_workers, train=False,
                                 pin_memory=pin, loader=image_loader, sampler=val_sampler)

    mixup_fn = build_mixup(cfg, len(class_names))
    if mixup_fn is not None:
        from timm.loss import SoftTargetCrossEntropy

        train_criterion = SoftTargetCrossEntropy()  # Mixup already smoothed the labels
    else:
        class_counts = [labels.count(k) for k in range(len(class_names))]
        train_criterion = build_criterion(cfg.loss, cfg.class_weights, class_counts, cfg.label_smoothing,
                                          cfg.focal_gamma)
    # Validation loss without smoothing or weights, so it stays comparable across --label_smoothing values.
    eval_criterion = torch.nn.CrossEntropyLoss()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    precision = Precision.for_device(device, cfg.amp)
    stopper = EarlyStopping(cfg.monitor, cfg.patience if val_loader is not None else 0)
    ema = build_ema(cfg, model)
    state = FitState()

    last_path = run_dir / files.last
    last_path.parent.mkdir(parents=True, exist_ok=True)
    if resume and (last_path.is_file() or files.required_on_resume):
        ckpt = load_checkpoint(last_path)  # a one-line error when the selection phase never saved an epoch
        model.load_state_dict(ckpt.get("model_train", ckpt["model"]))
        if ema is not None:
            ema.module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        precision.scaler.load_state_dict(ckpt["scaler"])
        stopper.load_state_dict(ckpt["early_stopping"])
        state = FitState(start_epoch=ckpt["epoch"] + 1, num_updates=ckpt["num_updates"],
                         epochs_done=ckpt["epoch"] + 1)
        rf.truncate_log(run_dir, last_epoch=ckpt["epoch"] + 1, name=files.log)
        logger.info("resuming the %s phase of %s after epoch %d of %d", files.name, run_dir, ckpt["epoch"] + 1,
                    stop_after)

    def on_epoch_start(epoch: int) -> None:
        # Reseeding per epoch makes epoch N identical whether the run went straight through or was resumed.
        seed_everything(cfg.random_state + epoch)
        generator.manual_seed(cfg.random_state * 1_000_003 + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if writes:
            rf.write_status(run_dir, "running", phase=files.name, epoch=epoch + 1, epochs=stop_after)

    def on_epoch_end(epoch: int, train_stats: dict, val: Optional[dict], is_best: bool) -> None:
        row = {"epoch": epoch + 1, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
               "lr": train_stats["lr"], "epoch_seconds": round(train_stats["seconds"], 3),
               "train_images_per_s": round(train_stats["images_per_s"], 2),
               "data_loading_fraction": round(train_stats["data_fraction"], 4)}
        if val is not None:
            row.update({"val_loss": val["loss"], "val_acc": val["acc"], "val_balanced_acc": val["balanced_acc"],
                        "val_macro_auc": macro_auc(val["targets"], val["probs"], len(class_names))})
        if not writes:
            return
        # The log row first: if the process stops before the checkpoint, --resume restarts from the previous
        # checkpoint and drops the rows after it; the other way round the row would be lost.
        rf.append_log_row(run_dir, row, name=files.log, with_validation=val is not None)
        tracker.log({f"{files.name}/{k}" if files.name != "select" else k: v for k, v in row.items()},
                    step=epoch + 1 if files.name == "select" else None)
        metric = ({"monitor": cfg.monitor, "val_loss": val["loss"], "val_balanced_acc": val["balanced_acc"],
                   "val_acc": val["acc"]} if val is not None else None)
        ckpt_state = {
            "model": delivered_state(model, ema),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": precision.scaler.state_dict(),
            "early_stopping": stopper.state_dict(),
            "epoch": epoch,
            "num_updates": state.num_updates,
            "phase": files.name,
            "metric": metric,
            "config": cfg.to_dict(),
            "class_info": class_info,
        }
        if ema is not None:
            ckpt_state["model_train"] = model.state_dict()  # the raw weights, to resume training from
        if is_best and files.best:
            save_checkpoint(run_dir / files.best, ckpt_state)
        save_checkpoint(last_path, ckpt_state)

    start = time.perf_counter()
    fit(net, train_loader, val_loader, train_criterion, optimizer, scheduler, precision, stopper,
        epochs=stop_after, state=state, on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end,
        channels_last=channels_last, eval_criterion=eval_criterion,
        reduce_train=lambda stats: reduce_train_stats(stats, dist_info),
        gather_val=lambda result: gather_evaluation(result, dist_info), ema=ema, mixup_fn=mixup_fn,
        desc="" if files.name == "select" else f"{files.name}: ")
    return {"epochs_run": state.epochs_done, "best_epoch": stopper.best_epoch, "seconds": time.perf_counter() - start,
            "images": len(train_samples)}
