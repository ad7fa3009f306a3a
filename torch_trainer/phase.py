"""One training phase of a run: the selection phase (train split, the epoch to keep picked on validation) or the
refit (train + validation, no held-out data, as many epochs as the selection phase chose).

Both phases share everything else: loaders, loss, optimizer, schedule kind, EMA, mixup, checkpoints and resume. The
schedule spans ``cfg.epochs`` in the selection phase; the refit's spans its own epochs (``--refit_schedule
compressed``) or replays the selection phase's (``replay``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DistributedSampler

from configs import TrainConfig
from dataloaders.build import class_frequency_sampler, make_loader
from dataloaders.discovery import Sample
from dataloaders.transforms import build_train_transform
from evaluation.metrics import EvalResult, macro_auc
from runs.checkpoint import load_checkpoint, save_checkpoint
from runs.run_folder import RunDir, append_log_row, truncate_log
from runs.run_info import RunInfo
from torch_trainer.distributed import DistInfo, gather_evaluation, reduce_train_stats
from torch_trainer.losses import adjust_logits, build_criterion
from torch_trainer.optim import build_optimizer, build_scheduler
from torch_trainer.trainer import EarlyStopping, FitHooks, FitState, Precision, Trainee, TrainStats, fit
from utils.device import prefers_channels_last
from utils.seed import seed_epoch

logger = logging.getLogger(__name__)

# --sampler auto reads the class counts of every labelled training image (docs/recipe_comparison.md, "불균형 대응"):
# below AUTO_CORRECT_RATIO (largest/smallest) nothing is corrected. An imbalanced set whose smallest class has fewer
# than AUTO_FEW_IMAGES images is trained on random batches with the logit-adjusted loss (tau AUTO_LOGIT_ADJUSTMENT):
# balanced batches would show those few photos again and again (measured against balanced batches: +2.6 points on 12
# DermNet diagnoses of 34-76 photos, +1.4 on 8 ISIC diagnoses of 42-382). A set whose classes all have more images
# keeps balanced batches, which measured better there (6 DermNet diagnoses of 102-238 photos: -1.1 for the loss).
AUTO_CORRECT_RATIO = 1.5
AUTO_FEW_IMAGES = 80
AUTO_LOGIT_ADJUSTMENT = 1.0


@dataclass(frozen=True)
class ImbalanceHandling:
    """How one phase corrects for class imbalance: its batches and its loss's logit adjustment."""
    sampler: str  # random | balanced | softened
    sampler_power: Optional[float]  # the class-frequency power of a weighted sampler; None for random batches
    logit_adjustment: float  # tau; 0 = plain loss
    class_ratio: float  # largest / smallest training class

    def to_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "sampler_power": self.sampler_power,
                "logit_adjustment": self.logit_adjustment, "class_ratio": round(self.class_ratio, 3)}


@dataclass(frozen=True)
class PhaseFiles:
    """Where a phase keeps its checkpoints and log."""
    name: str
    last: Path                   # checkpoint after every epoch (resume)
    log: Path
    best: Optional[Path] = None  # phases with validation: the best epoch's checkpoint
    required_on_resume: bool = False  # --resume fails without its checkpoint (the selection phase of a one-split run)


SELECT_NAME, REFIT_NAME = "select", "refit"


@dataclass(frozen=True)
class PhaseOutcome:
    """What one training phase did. Epochs here are 1-based, as in log.csv: the loop counts from 0, and this is the
    one place where that turns into the numbers a person reads."""

    name: str
    epochs_run: int
    planned_epochs: int  # the stop_after asked for (a refit runs exactly these)
    selected_epoch: Optional[int]  # the epoch kept (model_best.pth); None for a phase without validation
    best_epoch: Optional[int]  # the highest validation score; None without validation
    seconds: float
    images: int
    imbalance: Optional[ImbalanceHandling] = None  # the sampler and logit adjustment it trained with


def select_files(run: RunDir) -> PhaseFiles:
    return PhaseFiles(SELECT_NAME, run.last_ckpt, run.log_csv, run.best_ckpt, required_on_resume=True)


def refit_files(run: RunDir) -> PhaseFiles:
    return PhaseFiles(REFIT_NAME, run.refit_ckpt, run.refit_log_csv)


def fold_files(run: RunDir, fold: int) -> PhaseFiles:
    """Fold ``fold`` (0-based) of --folds K, in its own sub-folder ``fold_<fold+1>/``."""
    folder = run.fold(fold)
    return PhaseFiles(f"fold {fold + 1}", folder.last_ckpt, folder.log_csv, folder.best_ckpt)


def resolve_imbalance(sampler: str, sampler_power: float, logit_adjustment: float, class_weights: str,
                      class_counts: list[int], distributed: bool) -> ImbalanceHandling:
    """What ``--sampler`` (``auto`` decides by the class ratio, see AUTO_*), ``--sampler_power`` and
    ``--logit_adjustment`` mean for a training set with these class counts. Under ``auto`` a correction the user
    chose (--logit_adjustment, --class_weights auto) keeps random batches and nothing is added to it, so two
    corrections never stack by accident. Weighted samplers are not supported under torchrun yet."""
    ratio = max(class_counts) / max(min(class_counts), 1)
    if sampler == "auto":
        if logit_adjustment or class_weights != "none":
            sampler = "random"
        elif ratio < AUTO_CORRECT_RATIO:
            sampler = "random"
        elif min(class_counts) < AUTO_FEW_IMAGES or distributed:
            sampler, logit_adjustment = "random", AUTO_LOGIT_ADJUSTMENT
        else:
            sampler = "balanced"
        logger.info("--sampler auto: largest/smallest class %.2fx, smallest %d images -> %s batches, logit "
                    "adjustment %g", ratio, min(class_counts), sampler, logit_adjustment)
    power = {"balanced": 0.0, "softened": sampler_power}.get(sampler)
    return ImbalanceHandling(sampler, power, logit_adjustment, ratio)


def class_counts(samples: list[Sample], n_class: int) -> list[int]:
    labels = [sample.label for sample in samples]
    return [labels.count(k) for k in range(n_class)]


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


@dataclass
class PhaseContext:
    """What every phase of one run shares."""

    cfg: TrainConfig
    run: RunDir
    device: torch.device
    info: RunInfo
    image_decoder: Callable
    eval_transform: Callable
    tracker: Any  # torch_trainer.experiment_tracking.ExperimentTracker
    dist_info: DistInfo = field(default_factory=DistInfo)
    # Training crops need more decoded pixels than evaluation (see transforms.decode_min_side); None: image_decoder.
    train_image_decoder: Optional[Callable] = None
    # The run's one imbalance choice, made from all labelled training images (None: each phase decides from its own).
    imbalance: Optional[ImbalanceHandling] = None


def run_phase(files: PhaseFiles, ctx: PhaseContext, model: torch.nn.Module, train_samples: list[Sample],
              val_samples: Optional[list[Sample]], *, stop_after: int, schedule_epochs: Optional[int] = None,
              resume: bool = False) -> PhaseOutcome:
    """Train ``model`` in place for epochs ``0 .. stop_after-1`` of a ``schedule_epochs`` (default ``cfg.epochs``)
    schedule (early stopping may end the selection phase sooner); returns the phase's outcome (epochs run, the
    selected and the highest-scoring epoch, seconds, images)."""
    cfg, dist_info = ctx.cfg, ctx.dist_info
    channels_last = prefers_channels_last(ctx.device)
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # ``net`` trains (DDP-wrapped under torchrun); ``model`` is what checkpoints and the final evaluation use.
    net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index]
                                                     if ctx.device.type == "cuda" else None)
           if dist_info.enabled else model)
    generator = torch.Generator()
    # The run's choice holds for every phase, so the refit trains like the selection phase; the sampler's weights and
    # the loss's prior come from each phase's own images.
    imbalance = ctx.imbalance or resolve_imbalance(cfg.sampler, cfg.sampler_power, cfg.logit_adjustment,
                                                   cfg.class_weights, class_counts(train_samples, ctx.info.n_class),
                                                   dist_info.enabled)
    train_loader, sampler = _train_loader(ctx, train_samples, generator, imbalance)
    val_loader = _val_loader(ctx, val_samples) if val_samples is not None else None
    trainee = Trainee(net, _train_criterion(cfg, train_samples, ctx.info.n_class, imbalance.logit_adjustment),
                      build_optimizer(model, cfg.optimizer_spec()), None,
                      Precision.for_device(ctx.device, cfg.amp), channels_last, build_ema(cfg, model),
                      build_mixup(cfg, ctx.info.n_class))
    trainee.scheduler = build_scheduler(trainee.optimizer, cfg.schedule_spec(), len(train_loader), schedule_epochs)
    stopper = EarlyStopping(cfg.monitor, cfg.patience if val_loader is not None else 0, cfg.epoch_selection)
    state = _resume(files, ctx, model, trainee, stopper, stop_after) if resume else FitState()

    def on_epoch_start(epoch: int) -> None:
        seed_epoch(cfg.random_state, epoch, generator)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if dist_info.is_main:
            ctx.run.write_status("running", phase=files.name, epoch=epoch + 1, epochs=stop_after)

    def on_epoch_end(epoch: int, train_stats: dict, val: Optional[dict], selected: bool) -> None:
        if dist_info.is_main:
            _record_epoch(_PhaseState(files, ctx, model, trainee, stopper, state), epoch, train_stats, val, selected)

    start = time.perf_counter()
    fit(trainee, train_loader, val_loader, stopper, epochs=stop_after, state=state,
        hooks=FitHooks(on_epoch_start, on_epoch_end, lambda stats: reduce_train_stats(stats, dist_info),
                       lambda result: gather_evaluation(result, dist_info)),
        desc="" if files.name == SELECT_NAME else f"{files.name}: ")
    validated = val_loader is not None
    return PhaseOutcome(files.name, state.epochs_done, stop_after,
                        stopper.selected_epoch + 1 if validated else None,
                        stopper.best_epoch + 1 if validated else None, time.perf_counter() - start,
                        len(train_samples), imbalance)


def _train_loader(ctx: PhaseContext, samples: list[Sample], generator: torch.Generator,
                  imbalance: ImbalanceHandling):
    cfg, dist_info = ctx.cfg, ctx.dist_info
    transform = build_train_transform(ctx.info.preprocessing, min_crop_scale=cfg.min_crop_scale, vflip=cfg.vflip,
                                      color_jitter=cfg.color_jitter, randaugment=cfg.randaugment)
    if dist_info.enabled:  # torchrun: always random (main() refuses an explicit weighted sampler there)
        sampler = DistributedSampler(samples, dist_info.world_size, dist_info.rank, shuffle=True,
                                     seed=cfg.random_state)
    elif imbalance.sampler_power is not None:
        sampler = class_frequency_sampler([sample.label for sample in samples], generator, imbalance.sampler_power)
    else:
        sampler = None
    loader = make_loader(samples, transform, cfg.batch_size, cfg.num_workers, train=True, generator=generator,
                         pin_memory=ctx.device.type == "cuda", decoder=ctx.train_image_decoder or ctx.image_decoder,
                         sampler=sampler)
    return loader, sampler


def _val_loader(ctx: PhaseContext, samples: list[Sample]):
    dist_info = ctx.dist_info
    sampler = (DistributedSampler(samples, dist_info.world_size, dist_info.rank, shuffle=False)
               if dist_info.enabled else None)
    return make_loader(samples, ctx.eval_transform, ctx.cfg.batch_size, ctx.cfg.num_workers, train=False,
                       pin_memory=ctx.device.type == "cuda", decoder=ctx.image_decoder, sampler=sampler)


def _train_criterion(cfg: TrainConfig, samples: list[Sample], n_class: int, logit_adjustment: float):
    counts = class_counts(samples, n_class)
    if cfg.mixup or cfg.cutmix:
        from timm.loss import SoftTargetCrossEntropy

        # Mixup already smoothed the labels
        return adjust_logits(SoftTargetCrossEntropy(), counts, logit_adjustment)
    return build_criterion(cfg.loss, cfg.class_weights, counts, cfg.label_smoothing, cfg.focal_gamma,
                           logit_adjustment)


def _resume(files: PhaseFiles, ctx: PhaseContext, model: torch.nn.Module, trainee: Trainee, stopper: EarlyStopping,
            stop_after: int) -> FitState:
    """Restore the phase from its last checkpoint (a fresh start when a later phase has not begun yet)."""
    last_path = files.last
    if not (last_path.is_file() or files.required_on_resume):
        return FitState()
    ckpt = load_checkpoint(last_path)  # a one-line error when the selection phase never saved an epoch
    model.load_state_dict(ckpt.get("model_train", ckpt["model"]))
    if trainee.ema is not None:
        trainee.ema.module.load_state_dict(ckpt["model"])
    trainee.optimizer.load_state_dict(ckpt["optimizer"])
    if trainee.scheduler is not None and ckpt["scheduler"] is not None:
        trainee.scheduler.load_state_dict(ckpt["scheduler"])
    trainee.precision.scaler.load_state_dict(ckpt["scaler"])
    stopper.load_state_dict(ckpt["early_stopping"])
    truncate_log(files.log, last_epoch=ckpt["epoch"] + 1)
    logger.info("resuming the %s phase of %s after epoch %d of %d", files.name, ctx.run.root, ckpt["epoch"] + 1,
                stop_after)
    return FitState(start_epoch=ckpt["epoch"] + 1, num_updates=ckpt["num_updates"], epochs_done=ckpt["epoch"] + 1)


@dataclass
class _PhaseState:
    """Everything an epoch's checkpoint is made of."""

    files: PhaseFiles
    ctx: PhaseContext
    model: torch.nn.Module  # unwrapped (no DDP)
    trainee: Trainee
    stopper: EarlyStopping
    state: FitState


def _record_epoch(phase_state: _PhaseState, epoch: int, train_stats: TrainStats, val: Optional[EvalResult],
                  selected: bool) -> None:
    """The epoch's log row, tracker entry and checkpoints (rank 0 only)."""
    files, ctx, model, trainee = phase_state.files, phase_state.ctx, phase_state.model, phase_state.trainee
    stopper, state = phase_state.stopper, phase_state.state
    # log.csv's column names are the run folder's contract (runs.run_folder.LOG_COLUMNS).
    row = {"epoch": epoch + 1, "train_loss": train_stats.loss, "train_acc": train_stats.accuracy,
           "lr": train_stats.lr, "epoch_seconds": round(train_stats.seconds, 3),
           "train_images_per_s": round(train_stats.images_per_s, 2),
           "data_loading_fraction": round(train_stats.data_fraction, 4)}
    if val is not None:
        row.update({"val_loss": val.loss, "val_acc": val.accuracy, "val_balanced_acc": val.balanced_accuracy,
                    "val_macro_auc": macro_auc(val.targets, val.probs, ctx.info.n_class)})
    last_path = files.last
    last_path.parent.mkdir(parents=True, exist_ok=True)  # fold_<k>/
    # The log row first: if the process stops before the checkpoint, --resume restarts from the previous
    # checkpoint and drops the rows after it; the other way round the row would be lost.
    append_log_row(files.log, row, with_validation=val is not None)
    ctx.tracker.log({f"{files.name}/{k}" if files.name != SELECT_NAME else k: v for k, v in row.items()},
                    step=epoch + 1 if files.name == SELECT_NAME else None)
    metric = ({"monitor": ctx.cfg.monitor, "val_loss": val.loss, "val_balanced_acc": val.balanced_accuracy,
               "val_acc": val.accuracy} if val is not None else None)
    ckpt_state = {
        "model": delivered_state(model, trainee.ema),
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict() if trainee.scheduler is not None else None,
        "scaler": trainee.precision.scaler.state_dict(),
        "early_stopping": stopper.state_dict(),
        "epoch": epoch,
        "num_updates": state.num_updates,
        "phase": files.name,
        "metric": metric,
        "config": ctx.cfg.to_dict(),
        "class_info": ctx.info.to_dict(),
    }
    if trainee.ema is not None:
        ckpt_state["model_train"] = model.state_dict()  # the raw weights, to resume training from
    if selected and files.best:
        save_checkpoint(files.best, ckpt_state)
    save_checkpoint(last_path, ckpt_state)
