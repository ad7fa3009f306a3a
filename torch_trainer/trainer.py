"""The training loop: ``train_one_epoch`` and ``evaluate`` return plain dicts; ``fit`` runs epochs with early stopping."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from configs import EPOCH_SELECTIONS, MONITORS
from evaluation.calibration import logits_from_probs
from evaluation.metrics import EvalResult, balanced_accuracy_standard_error, mean_standard_error
from utils.progress import Progress

logger = logging.getLogger(__name__)


@dataclass
class Precision:
    """One AMP code path: autocast (or a null context) plus a GradScaler that is only enabled for fp16."""

    device: torch.device
    dtype: Optional[torch.dtype] = None  # None: full fp32
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> "Precision":
        if not (amp and device.type == "cuda"):
            return cls(device)
        return cls(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (state-dict keys without ``module.``)."""
    return getattr(model, "module", model)


@dataclass(frozen=True)
class TrainStats:
    """One epoch's training pass (accuracy on the hard labels, also under Mixup)."""

    loss: float
    accuracy: float
    images: int
    seconds: float
    images_per_s: float
    data_fraction: float  # share of the epoch spent waiting for the DataLoader
    num_updates: int
    lr: float


def train_one_epoch(model: torch.nn.Module, loader, criterion: Callable, optimizer: torch.optim.Optimizer,
                    precision: Precision, *, scheduler=None, num_updates: int = 0, channels_last: bool = False,
                    epoch: int = 0, show_progress: bool = True, ema=None,
                    mixup_fn: Optional[Callable] = None) -> TrainStats:
    """One pass over ``loader``; ``ema`` (timm ModelEmaV3) follows every optimizer step, ``mixup_fn`` (timm Mixup)
    turns each batch into mixed images and soft targets (``criterion`` must then take soft targets)."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    data_seconds = 0.0
    start = tick = time.perf_counter()
    progress = Progress(loader, f"epoch {epoch + 1} train", leave=False, enabled=show_progress, unit="batch")
    for batch in progress:
        data_seconds += time.perf_counter() - tick
        if batch is None:  # every image of the batch failed to load
            tick = time.perf_counter()
            continue
        images, targets, _ = batch
        images, targets = _to_device(images, targets, precision.device, channels_last)
        hard_targets = targets
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with precision.autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}; lower --lr_ae or disable --amp")
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        num_updates += 1
        if ema is not None:
            ema.update(unwrap(model), step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)

        batch_size = targets.size(0)
        loss_sum += loss.item() * batch_size
        correct += (logits.argmax(1) == hard_targets).sum().item()
        seen += batch_size
        elapsed = time.perf_counter() - start
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / elapsed:.1f}")
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return TrainStats(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1), images=seen, seconds=seconds,
                      images_per_s=seen / seconds if seconds > 0 else 0.0,
                      data_fraction=data_seconds / seconds if seconds > 0 else 0.0, num_updates=num_updates,
                      lr=optimizer.param_groups[0]["lr"])


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, criterion: Callable, precision: Precision, *,
             channels_last: bool = False, desc: str = "eval", show_progress: bool = True,
             tta: bool = False) -> EvalResult:
    """Loss, accuracy and balanced accuracy, plus per-image targets, probabilities and dataset indices.

    With ``tta`` the logits are the mean of the image's and its horizontal mirror's (as inference.py --tta does).
    """
    model.eval()
    loss_sum, seen = 0.0, 0
    all_targets, all_probs, all_indices = [], [], []
    for batch in Progress(loader, desc, leave=False, enabled=show_progress, unit="batch"):
        if batch is None:
            continue
        images, targets, indices = batch
        images, targets = _to_device(images, targets, precision.device, channels_last)
        with precision.autocast():
            logits = model(images).float()
            if tta:
                logits = (logits + model(torch.flip(images, dims=[3])).float()) / 2
        loss_sum += criterion(logits, targets).item() * targets.size(0)
        seen += targets.size(0)
        all_targets.append(targets.cpu())
        all_probs.append(logits.softmax(1).cpu())
        all_indices.append(indices)
    return EvalResult.from_predictions(
        loss_sum / max(seen, 1), torch.cat(all_targets).numpy() if all_targets else np.zeros(0, dtype=np.int64),
        torch.cat(all_probs).numpy() if all_probs else np.zeros((0, 0), dtype=np.float32),
        torch.cat(all_indices).numpy() if all_indices else np.zeros(0, dtype=np.int64))


class EarlyStopping:
    """Picks the epoch to keep from validation, and stops training when it has not moved for ``patience`` epochs.

    ``rule="best"`` keeps the epoch with the highest validation score (higher balanced accuracy wins, validation loss
    breaks ties). ``rule="one_se"`` keeps the *latest* epoch whose score is within one standard error of that best
    (the one-standard-error rule of Breiman et al.): on a few hundred validation images two epochs a point apart are
    a tie, and the later epoch of a decaying schedule is the better-trained model to refit to. It is exact when
    applied epoch by epoch: the best only moves to a new epoch, which is then also the latest within noise.
    """

    def __init__(self, monitor: str, patience: int, rule: str = "best"):
        if rule not in EPOCH_SELECTIONS:
            raise ValueError(f"unknown epoch selection rule {rule!r}; one of {EPOCH_SELECTIONS}")
        if monitor not in MONITORS:  # anything but val_loss would otherwise be read as balanced accuracy
            raise ValueError(f"unknown monitor {monitor!r}; one of {MONITORS}")
        self.monitor = monitor
        self.patience = patience
        self.rule = rule
        self.best_key: Optional[tuple] = None
        self.best_epoch = -1       # highest validation score
        self.best_se = 0.0         # its standard error
        self.selected_epoch = -1   # the epoch kept (model_best.pth); == best_epoch under rule "best"
        self.bad_epochs = 0        # epochs since the selected one

    def key(self, val: EvalResult) -> tuple:
        if self.monitor == "val_loss":
            return (-val.loss,)
        return (val.balanced_accuracy, -val.loss)

    def standard_error(self, val: EvalResult) -> float:
        """Of the monitored score, from the per-image validation results."""
        targets, probs = val.targets, val.probs
        if len(targets) == 0:
            return 0.0
        if self.monitor == "val_loss":
            nll = -logits_from_probs(probs[np.arange(len(targets)), targets])
            return mean_standard_error(nll)
        return balanced_accuracy_standard_error(targets, probs.argmax(1))

    def update(self, val: EvalResult, epoch: int) -> bool:
        """Record an epoch; return True if it is the selected epoch so far (its weights become model_best.pth)."""
        key = self.key(val)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_epoch, self.best_se = key, epoch, self.standard_error(val)
            selected = True
        else:
            selected = self.rule == "one_se" and key[0] >= self.best_key[0] - self.best_se
        if selected:
            self.selected_epoch, self.bad_epochs = epoch, 0
        else:
            self.bad_epochs += 1
        return selected

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_key": list(self.best_key) if self.best_key else None, "best_epoch": self.best_epoch,
                "best_se": self.best_se, "selected_epoch": self.selected_epoch, "bad_epochs": self.bad_epochs,
                "rule": self.rule}

    def load_state_dict(self, state: dict) -> None:
        self.best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]
        # checkpoints from before the rule existed selected the best epoch
        self.best_se = state.get("best_se", 0.0)
        self.selected_epoch = state.get("selected_epoch", self.best_epoch)


@dataclass
class FitState:
    start_epoch: int = 0
    num_updates: int = 0
    epochs_done: int = 0


@dataclass
class Trainee:
    """What the epochs train and how: the model (DDP-wrapped under torchrun), its loss, optimizer and schedule,
    and the timm extras around them (EMA of the weights, Mixup/CutMix)."""

    model: torch.nn.Module
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    channels_last: bool = False
    ema: Any = None
    mixup_fn: Optional[Callable] = None
    # Validation loss without smoothing or class weights, so it stays comparable across runs.
    eval_criterion: Callable = field(default_factory=torch.nn.CrossEntropyLoss)


def _identity(value: Any) -> Any:
    return value


@dataclass
class FitHooks:
    """``on_epoch_end`` writes logs and checkpoints; ``reduce_train``/``gather_val`` combine the processes' results
    under DistributedDataParallel."""

    on_epoch_start: Callable[[int], None]
    on_epoch_end: Callable[[int, TrainStats, Optional[EvalResult], bool], None]
    reduce_train: Callable[[TrainStats], TrainStats] = _identity
    gather_val: Callable[[EvalResult], EvalResult] = _identity


def fit(trainee: Trainee, train_loader, val_loader, stopper: EarlyStopping, *, epochs: int, state: FitState,
        hooks: FitHooks, desc: str = "") -> None:
    """Run epochs ``state.start_epoch .. epochs-1``.

    Validation (of the EMA weights when there is an EMA) picks the best epoch; with ``val_loader=None`` (the refit
    on all labelled images) every epoch just trains.
    """
    if stopper.should_stop:  # resumed after early stopping had already ended the run
        return
    t = trainee
    for epoch in range(state.start_epoch, epochs):
        hooks.on_epoch_start(epoch)
        train = hooks.reduce_train(train_one_epoch(
            t.model, train_loader, t.criterion, t.optimizer, t.precision, scheduler=t.scheduler,
            num_updates=state.num_updates, channels_last=t.channels_last, epoch=epoch, ema=t.ema,
            mixup_fn=t.mixup_fn))
        state.num_updates = train.num_updates
        state.epochs_done = epoch + 1
        if val_loader is None:
            logger.info("%sepoch %d/%d  train loss %.4f acc %.3f | %.1f img/s, data %.0f%%", desc, epoch + 1, epochs,
                        train.loss, train.accuracy, train.images_per_s, 100 * train.data_fraction)
            hooks.on_epoch_end(epoch, train, None, False)
            continue
        scored = t.ema.module if t.ema is not None else t.model
        val = hooks.gather_val(evaluate(scored, val_loader, t.eval_criterion, t.precision,
                                        channels_last=t.channels_last, desc=f"epoch {epoch + 1} val"))
        selected = stopper.update(val, epoch)
        mark = ""
        if stopper.best_epoch == epoch:
            mark = "  *best*"
        elif selected:
            mark = "  *selected: within 1 SE of the best*"
        logger.info("%sepoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f bal.acc %.3f | %.1f img/s, "
                    "data %.0f%%%s", desc, epoch + 1, epochs, train.loss, train.accuracy, val.loss, val.accuracy,
                    val.balanced_accuracy, train.images_per_s, 100 * train.data_fraction,
                    mark)
        hooks.on_epoch_end(epoch, train, val, selected)
        if stopper.should_stop:
            logger.info("early stopping: %s did not improve for %d epochs (selected epoch %d)", stopper.monitor,
                        stopper.patience, stopper.selected_epoch + 1)
            break
