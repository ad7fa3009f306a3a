"""Train a timm CNN on a folder of images and write a run folder that inference, export and benchmark read back.

Example:
    python main.py --data_name skin --model_name efficientnet_b0 --epochs 50 --pre_trained True
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DistributedSampler

from configs import TrainConfig, add_dataclass_arguments, parse_with_config_file
from dataloaders.build import balanced_sampler, effective_workers, make_loader
from dataloaders.discovery import discover_dataset
from dataloaders.skin_region import (MaskCache, cache_settings, image_loader_for_run, parse_parts_flag, part_names,
                                     region_settings, select_parts)
from dataloaders.splits import DataSplits, load_splits, save_splits, split_dataset
from dataloaders.transforms import build_eval_transform, build_train_transform, resolve_preprocessing
from torch_trainer import run_folder as rf
from torch_trainer.checkpoint import load_checkpoint, save_checkpoint
from torch_trainer.models import build_model, count_parameters
from torch_trainer.optim import build_optimizer, build_scheduler
from torch_trainer.trainer import EarlyStopping, FitState, Precision, evaluate, fit
from utils.atomic import atomic_save, atomic_write_json
from utils.cli import run_cli
from utils.device import select_device
from utils.errors import UserError
from utils.distributed import (DistInfo, barrier, broadcast, gather_evaluation, init_distributed,
                               launched_by_torchrun, reduce_train_stats, shutdown)
from utils.experiment_tracking import ExperimentTracker
from utils.face_parsing import build_face_parser
from utils.logging_setup import add_file_handler, remove_handler, setup_logging
from utils.calibration import apply_temperature, fit_temperature, logits_from_probs
from utils.losses import build_criterion
from utils.metrics import macro_auc
from utils.reports import write_classification_report
from utils.seed import seed_everything, set_deterministic

logger = logging.getLogger(__name__)

# Flags a resumed run may change; everything else comes from the run's configs.json so the run stays one run.
RESUME_OVERRIDABLE = ("epochs", "patience", "device", "num_workers", "amp", "wandb")
GRADCAM_EXAMPLES = 4


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf training", add_help=add_help,
                                     description="Train an image classifier on ROOT/trainset/<class>/ folders.")
    add_dataclass_arguments(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.from_args(args)
    if not cfg.resume:
        return cfg
    run_dir = Path(cfg.resume)
    configs_path = run_dir / rf.CONFIGS
    if not configs_path.is_file():
        raise UserError(f"--resume {run_dir}: {configs_path.name} not found; pass a run folder written by main.py")
    saved = json.loads(configs_path.read_text(encoding="utf-8"))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in RESUME_OVERRIDABLE:
        if getattr(cfg, name) != defaults[name]:
            saved[name] = getattr(cfg, name)
    saved["resume"] = str(run_dir)
    return TrainConfig.from_dict(saved)


def prepare_skin_masks(cfg: TrainConfig, splits: DataSplits, device: torch.device) -> dict[str, Any]:
    """Compute (or reuse) every image's skin mask; returns the settings class_info.json records."""
    parser = build_face_parser(cfg.seg_backend, cfg.seg_model, cfg.seg_revision, device.type)
    part_ids = select_parts(parser.id2label, parse_parts_flag(cfg.parts))
    settings = region_settings(parser.describe(), part_names(parser.id2label, part_ids))
    cache = MaskCache(cfg.resolved_data_dir, cache_settings(settings))
    paths = [s.path for s in splits.train + splits.val + splits.test]
    counts = cache.fill_missing(paths, parser, part_ids)
    logger.info("skin masks (%s, parts %s): %d cached, %d computed, %d without a face (whole image used), "
                "%d unreadable", settings["seg_backend"], ",".join(settings["parts"]), counts["cached"],
                counts["computed"], counts["no_face"], counts["failed"])
    return settings


def load_data_and_model(cfg: TrainConfig, run_dir: Optional[Path], device: torch.device
                        ) -> tuple[DataSplits, torch.nn.Module, str, Optional[dict[str, Any]], Optional[dict]]:
    """Everything that can fail on a user mistake, done before a new run folder is created.

    Returns the splits, the model, its timm name, when resuming the run's class_info (None for a new run), and for
    skin-region runs the skin-region settings (masks computed and cached by then).
    """
    if run_dir is not None:  # resuming: the split and the architecture come from the run folder
        class_info = rf.read_class_info(run_dir)
        splits = load_splits(run_dir, cfg.resolved_data_dir, class_info["class_names"])
        model, timm_name = build_model(cfg.model_name, len(splits.class_names), False, None, cfg.drop_rate)
        region = prepare_skin_masks(cfg, splits, device) if cfg.input_kind == "skin_region" else None
        return splits, model, timm_name, class_info, region
    index = discover_dataset(cfg.resolved_data_dir, n_class=cfg.n_class,
                             num_threads=max(2, effective_workers(cfg.num_workers)))
    splits = split_dataset(index, cfg.val_ratio, cfg.random_state)
    model, timm_name = build_model(cfg.model_name, len(splits.class_names), cfg.pre_trained, cfg.pretrained_path,
                                   cfg.drop_rate)
    region = prepare_skin_masks(cfg, splits, device) if cfg.input_kind == "skin_region" else None
    return splits, model, timm_name, None, region


def _checkpoint_state(model, optimizer, scheduler, precision, stopper, state, epoch, val, cfg, class_info):
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": precision.scaler.state_dict(),
        "early_stopping": stopper.state_dict(),
        "epoch": epoch,
        "num_updates": state.num_updates,
        "metric": {"monitor": cfg.monitor, "val_loss": val["loss"], "val_balanced_acc": val["balanced_acc"],
                   "val_acc": val["acc"]},
        "config": cfg.to_dict(),
        "class_info": class_info,
    }


def train(cfg: TrainConfig, run_dir: Path, device: torch.device, splits: DataSplits, model: torch.nn.Module,
          timm_name: str, class_info: Optional[dict[str, Any]], skin_region: Optional[dict[str, Any]] = None,
          dist_info: DistInfo = DistInfo()) -> dict[str, Any]:
    resuming = cfg.resume is not None
    writes = dist_info.is_main  # under torchrun only rank 0 touches the run folder
    class_names = splits.class_names
    for split, counts in splits.counts().items():
        logger.info("%-5s %5d images  %s", split, sum(counts.values()), counts)
    if splits.skipped:
        logger.warning("%d unreadable image(s) skipped; see %s", len(splits.skipped), run_dir / "skipped_files.csv")

    if not resuming:
        class_info = rf.build_class_info(class_names, cfg.model_name, timm_name,
                                         resolve_preprocessing(model, cfg.img_size), cfg.drop_rate, skin_region)
        if writes:
            save_splits(run_dir, splits)
            atomic_write_json(run_dir / rf.CLASS_INFO, class_info)
            atomic_write_json(run_dir / rf.CONFIGS, cfg.to_dict())
    preprocessing = class_info["preprocessing"]
    image_loader = image_loader_for_run(class_info, cfg.resolved_data_dir)
    logger.info("model %s (%s): %.2fM parameters, input %s, mean %s, std %s", cfg.model_name, timm_name,
                count_parameters(model) / 1e6, preprocessing["input_size"], preprocessing["mean"],
                preprocessing["std"])

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
    eval_tf = build_eval_transform(preprocessing)
    train_labels = [sample.label for sample in splits.train]
    if dist_info.enabled:
        sampler = DistributedSampler(splits.train, dist_info.world_size, dist_info.rank, shuffle=True,
                                     seed=cfg.random_state)
        val_sampler = DistributedSampler(splits.val, dist_info.world_size, dist_info.rank, shuffle=False)
    else:
        sampler = balanced_sampler(train_labels, generator) if cfg.sampler == "balanced" else None
        val_sampler = None
    train_loader = make_loader(splits.train, train_tf, cfg.batch_size, cfg.num_workers, train=True,
                               generator=generator, pin_memory=pin, loader=image_loader, sampler=sampler)
    val_loader = make_loader(splits.val, eval_tf, cfg.batch_size, cfg.num_workers, train=False, pin_memory=pin,
                             loader=image_loader, sampler=val_sampler)
    full_val_loader = (make_loader(splits.val, eval_tf, cfg.batch_size, cfg.num_workers, train=False,
                                   pin_memory=pin, loader=image_loader) if dist_info.enabled else val_loader)
    test_loader = make_loader(splits.test, eval_tf, cfg.batch_size, cfg.num_workers, train=False, pin_memory=pin,
                              loader=image_loader)

    class_counts = [train_labels.count(k) for k in range(len(class_names))]
    train_criterion = build_criterion(cfg.loss, cfg.class_weights, class_counts, cfg.label_smoothing, cfg.focal_gamma)
    # Validation and test loss without smoothing, so they stay comparable across --label_smoothing values.
    eval_criterion = torch.nn.CrossEntropyLoss()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    precision = Precision.for_device(device, cfg.amp)
    stopper = EarlyStopping(cfg.monitor, cfg.patience)
    state = FitState()

    if resuming:
        ckpt = load_checkpoint(run_dir / rf.LAST_CKPT)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        precision.scaler.load_state_dict(ckpt["scaler"])
        stopper.load_state_dict(ckpt["early_stopping"])
        state = FitState(start_epoch=ckpt["epoch"] + 1, num_updates=ckpt["num_updates"],
                         epochs_done=ckpt["epoch"] + 1)
        rf.truncate_log(run_dir, last_epoch=ckpt["epoch"] + 1)
        logger.info("resuming %s after epoch %d of %d", run_dir, ckpt["epoch"] + 1, cfg.epochs)

    def on_epoch_start(epoch: int) -> None:
        # Reseeding per epoch makes epoch N identical whether the run went straight through or was resumed.
        seed_everything(cfg.random_state + epoch)
        generator.manual_seed(cfg.random_state * 1_000_003 + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if writes:
            rf.write_status(run_dir, "running", epoch=epoch + 1, epochs=cfg.epochs)

    tracker = ExperimentTracker(cfg.wandb if writes else "disabled", run_dir,
                                {**cfg.to_dict(), "class_names": class_names, "timm_model_name": timm_name,
                                 "world_size": dist_info.world_size}, cfg.wandb_project, run_dir.name)

    def on_epoch_end(epoch: int, train_stats: dict, val: dict, is_best: bool) -> None:
        row = {
            "epoch": epoch + 1, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
            "val_loss": val["loss"], "val_acc": val["acc"], "val_balanced_acc": val["balanced_acc"],
            "val_macro_auc": macro_auc(val["targets"], val["probs"], len(class_names)), "lr": train_stats["lr"],
            "epoch_seconds": round(train_stats["seconds"], 3),
            "train_images_per_s": round(train_stats["images_per_s"], 2),
            "data_loading_fraction": round(train_stats["data_fraction"], 4)}
        if not writes:
            return
        # The log row first: if the process stops before the checkpoint, --resume restarts from the previous
        # checkpoint and drops the rows after it; the other way round the row would be lost.
        rf.append_log_row(run_dir, row)
        tracker.log(row, step=epoch + 1)
        ckpt_state = _checkpoint_state(model, optimizer, scheduler, precision, stopper, state, epoch, val, cfg,
                                       class_info)
        if is_best:
            save_checkpoint(run_dir / rf.BEST_CKPT, ckpt_state)
        save_checkpoint(run_dir / rf.LAST_CKPT, ckpt_state)

    try:
        fit(net, train_loader, val_loader, train_criterion, optimizer, scheduler, precision, stopper,
            epochs=cfg.epochs, state=state, on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end,
            channels_last=channels_last, eval_criterion=eval_criterion,
            reduce_train=lambda stats: reduce_train_stats(stats, dist_info),
            gather_val=lambda result: gather_evaluation(result, dist_info))
        barrier(dist_info)  # rank 0 has written the last checkpoint; the other ranks are done
        if not writes:
            return {"run_dir": str(run_dir), "test_metrics": None, "epochs_run": state.epochs_done}
        result = _finish_training(cfg, run_dir, model, class_info, splits, full_val_loader, test_loader,
                                  eval_criterion, precision, channels_last, tracker, image_loader)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return {"run_dir": str(run_dir), "test_metrics": result, "epochs_run": state.epochs_done}


def _finish_training(cfg: TrainConfig, run_dir: Path, model, class_info: dict[str, Any], splits: DataSplits,
                     val_loader, test_loader, eval_criterion, precision, channels_last: bool, tracker,
                     image_loader) -> dict[str, Any]:
    """Best weights back, temperature scaling, the test report, and what W&B gets at the end."""
    class_names = splits.class_names

    best = load_checkpoint(run_dir / rf.BEST_CKPT)
    model.load_state_dict(best["model"])
    temperature = 1.0
    if cfg.calibrate:
        val = evaluate(model, val_loader, eval_criterion, precision, channels_last=channels_last, desc="calibrate")
        temperature = fit_temperature(logits_from_probs(val["probs"]), val["targets"])
        class_info = {**class_info, "temperature": temperature}
        atomic_write_json(run_dir / rf.CLASS_INFO, class_info)
        logger.info("temperature scaling fitted on %d validation images: T = %.3f", len(val["targets"]),
                    temperature)
    test = evaluate(model, test_loader, eval_criterion, precision, channels_last=channels_last, desc="test")
    metrics = write_classification_report(
        run_dir, test["targets"], apply_temperature(test["probs"], temperature), class_names,
        confusion_name="confusion_matrix_test",
        extra={"weights": rf.BEST_CKPT, "best_epoch": best["epoch"] + 1, "monitor": cfg.monitor,
               "loss": test["loss"], "temperature": temperature},
        uncalibrated_probs=test["probs"] if cfg.calibrate else None)
    logger.info("test (best epoch %d): accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f, macro AUC %s, ECE %.4f%s "
                "on %d images", metrics["best_epoch"], metrics["accuracy"], metrics["balanced_accuracy"],
                metrics["macro_f1"], f"{metrics['macro_auc']:.4f}" if metrics.get("macro_auc") is not None else "n/a",
                metrics["ece"], f" (before temperature scaling {metrics['ece_uncalibrated']:.4f})"
                if "ece_uncalibrated" in metrics else "", metrics["n_images"])
    if tracker.run is not None:
        tracker.summary({f"test_{k}": v for k, v in metrics.items()})
        tracker.log_images("confusion_matrix", [run_dir / "confusion_matrix_test.png"])
        tracker.log_images("gradcam", save_gradcam_examples(model, splits.test[:GRADCAM_EXAMPLES], class_info,
                                                            image_loader, run_dir / "gradcam_examples"))
    return metrics


def save_gradcam_examples(model: torch.nn.Module, samples, class_info: dict[str, Any], image_loader,
                          folder: Path) -> list[Path]:
    """Grad-CAM overlays of a few test images (for W&B); a model without a usable layer just gets none."""
    import numpy as np
    from PIL import Image

    from utils.gradcam import GradCamExplainer, cam_on_original, render_overlay

    preprocessing = class_info["preprocessing"]
    transform = build_eval_transform(preprocessing)
    device = next(model.parameters()).device
    try:
        explainer = GradCamExplainer(model, "gradcam", tuple(preprocessing["input_size"]))
    except Exception as err:  # noqa: BLE001 - an explanation is a nice-to-have at the end of training
        logger.warning("no Grad-CAM examples: %s", err)
        return []
    paths = []
    try:
        for sample in samples:
            picture = image_loader(sample.path)
            batch = transform(picture).unsqueeze(0).to(device)
            with torch.no_grad():
                predicted = int(model(batch).argmax(1))
            cam = explainer.explain(batch, [predicted])[0]
            original = np.asarray(picture)
            overlay = render_overlay(original, cam_on_original(cam, (original.shape[1], original.shape[0]),
                                                               preprocessing))
            target = folder / f"{sample.path.stem}_true-{class_info['class_names'][sample.label]}_pred-" \
                              f"{class_info['class_names'][predicted]}.jpg"
            atomic_save(target, lambda tmp: Image.fromarray(overlay).save(tmp, format="JPEG", quality=90))
            paths.append(target)
    finally:
        explainer.close()
    return paths


def main(args: argparse.Namespace, on_run_dir: Optional[Callable[[Path], None]] = None) -> dict[str, Any]:
    """Train one run; ``on_run_dir`` hears the run folder as soon as it exists (run_experiments.py records it)."""
    setup_logging()
    cfg = resolve_config(args)
    if launched_by_torchrun():
        if cfg.sampler == "balanced":
            raise UserError("--sampler balanced is not supported under torchrun yet; use --class_weights auto")
        dist_info, device = init_distributed(cfg.device)
    else:
        dist_info, device = DistInfo(), select_device(cfg.device)
    try:
        return _train_process(cfg, device, dist_info, on_run_dir)
    finally:
        shutdown(dist_info)


def _train_process(cfg: TrainConfig, device: torch.device, dist_info: DistInfo,
                   on_run_dir: Optional[Callable[[Path], None]]) -> dict[str, Any]:
    set_deterministic(cfg.deterministic)
    seed_everything(cfg.random_state)
    splits, model, timm_name, class_info, skin_region = load_data_and_model(
        cfg, Path(cfg.resume) if cfg.resume else None, device)
    if cfg.resume:
        run_dir = Path(cfg.resume)
    else:
        run_dir = broadcast(str(rf.create_run_dir(cfg.save_dir, cfg.data_name, cfg.model_name))
                            if dist_info.is_main else None, dist_info)
        run_dir = Path(run_dir)
    if on_run_dir is not None and dist_info.is_main:
        on_run_dir(run_dir)
    handler = add_file_handler(run_dir / "train.log") if dist_info.is_main else None
    logger.info("run folder: %s (device %s%s)", run_dir, device,
                f", {dist_info.world_size} processes" if dist_info.enabled else "")
    try:
        result = train(cfg, run_dir, device, splits, model, timm_name, class_info, skin_region, dist_info)
    except KeyboardInterrupt:
        if dist_info.is_main:
            rf.write_status(run_dir, "interrupted")
        logger.warning("interrupted; the last finished epoch is in %s; continue with --resume %s",
                       run_dir / rf.LAST_CKPT, run_dir)
        raise
    except BaseException as err:
        if dist_info.is_main:
            rf.write_status(run_dir, "failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if handler is not None:
            remove_handler(handler)
    if dist_info.is_main:
        rf.write_status(run_dir, "finished", epochs_run=result["epochs_run"])
        logger.info("done: %s", run_dir)
    return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
