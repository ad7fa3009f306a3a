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

import numpy as np
import pandas as pd
import torch

from configs import TrainConfig, add_dataclass_arguments, parse_with_config_file
from dataloaders.build import effective_workers, make_loader
from dataloaders.discovery import discover_dataset
from dataloaders.skin_region import (MaskCache, cache_settings, image_loader_for_run, parse_parts_flag, part_names,
                                     region_settings, select_parts)
from dataloaders.splits import DataSplits, load_splits, save_splits, split_dataset
from dataloaders.transforms import build_eval_transform, build_train_transform, resolve_preprocessing
from torch_trainer import run_folder as rf
from torch_trainer import phase
from torch_trainer.checkpoint import load_checkpoint
from torch_trainer.models import build_model, count_parameters
from torch_trainer.phase import run_phase
from torch_trainer.trainer import Precision, evaluate
from utils.atomic import atomic_save, atomic_write_json
from utils.cli import run_cli
from utils.device import select_device
from utils.errors import UserError
from utils.distributed import DistInfo, barrier, broadcast, init_distributed, launched_by_torchrun, shutdown
from utils.experiment_tracking import ExperimentTracker
from utils.face_parsing import build_face_parser
from utils.logging_setup import add_file_handler, remove_handler, setup_logging
from utils.calibration import apply_temperature, guarded_temperature, logits_from_probs
from utils.metrics import classification_metrics
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
    splits = split_dataset(index, cfg.val_ratio, cfg.random_state, cfg.folds)
    model, timm_name = build_model(cfg.model_name, len(splits.class_names), cfg.pre_trained, cfg.pretrained_path,
                                   cfg.drop_rate)
    region = prepare_skin_masks(cfg, splits, device) if cfg.input_kind == "skin_region" else None
    return splits, model, timm_name, None, region


def train(cfg: TrainConfig, run_dir: Path, device: torch.device, splits: DataSplits, model: torch.nn.Module,
          timm_name: str, class_info: Optional[dict[str, Any]], skin_region: Optional[dict[str, Any]] = None,
          dist_info: DistInfo = DistInfo()) -> dict[str, Any]:
    """The selection phase (train split, best epoch on validation), then with ``--refit`` the refit on train +
    validation, then calibration and the test report of the delivered model."""
    resuming = cfg.resume is not None
    writes = dist_info.is_main  # under torchrun only rank 0 touches the run folder
    class_names = splits.class_names
    for split, counts in splits.counts().items():
        logger.info("%-5s %5d images  %s", split, sum(counts.values()), counts)
    if splits.skipped:
        logger.warning("%d unreadable image(s) skipped; see %s", len(splits.skipped), run_dir / "skipped_files.csv")

    if not resuming:
        preprocessing = resolve_preprocessing(model, cfg.img_size, cfg.eval_crop, cfg.crop_pct)
        class_info = {**rf.build_class_info(class_names, cfg.model_name, timm_name, preprocessing, cfg.drop_rate,
                                            skin_region), "tta": cfg.tta}
        if writes:
            save_splits(run_dir, splits)
            atomic_write_json(run_dir / rf.CLASS_INFO, class_info)
            atomic_write_json(run_dir / rf.CONFIGS, cfg.to_dict())
    preprocessing = class_info["preprocessing"]
    image_loader = image_loader_for_run(class_info, cfg.resolved_data_dir)
    logger.info("model %s (%s): %.2fM parameters, input %s, mean %s, std %s, eval crop %s %.3f", cfg.model_name,
                timm_name, count_parameters(model) / 1e6, preprocessing["input_size"], preprocessing["mean"],
                preprocessing["std"], preprocessing["crop_mode"], preprocessing["crop_pct"])
    eval_tf = build_eval_transform(preprocessing)
    tracker = ExperimentTracker(cfg.wandb if writes else "disabled", run_dir,
                                {**cfg.to_dict(), "class_names": class_names, "timm_model_name": timm_name,
                                 "world_size": dist_info.world_size}, cfg.wandb_project, run_dir.name)
    common = dict(preprocessing=preprocessing, image_loader=image_loader, class_names=class_names,
                  class_info=class_info, eval_transform=eval_tf, tracker=tracker, dist_info=dist_info)
    try:
        if splits.folds is not None:
            selection = _cross_validate(cfg, run_dir, device, splits, resuming, common)
            refit_epochs = int(np.ceil(np.median(selection["best_epochs"])))
        else:
            selection = run_phase(phase.SELECT, cfg, run_dir, model, device, splits.train, splits.val,
                                  stop_after=cfg.epochs, resume=resuming, **common)
            barrier(dist_info)  # rank 0 has written the last checkpoint; the other ranks are done
            refit_epochs = (int(broadcast(load_checkpoint(run_dir / rf.BEST_CKPT)["epoch"] + 1 if writes else None,
                                          dist_info)) if cfg.refit else 0)
        refit = None
        if refit_epochs:
            refit_model = _fresh_model(cfg, len(class_names))
            everything = splits.train + splits.val
            logger.info("refit: training on every labelled training image (%d) for the %d epoch(s) validation chose",
                        len(everything), refit_epochs)
            refit = run_phase(phase.REFIT, cfg, run_dir, refit_model, device, everything, None,
                              stop_after=refit_epochs, resume=resuming, **common)
            refit["epochs"] = refit_epochs
            barrier(dist_info)
        if not writes:
            return {"run_dir": str(run_dir), "test_metrics": None, "epochs_run": selection["epochs_run"]}
        result = _finish_training(cfg, run_dir, model, class_info, splits, device, tracker, image_loader, eval_tf,
                                  selection, refit)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return {"run_dir": str(run_dir), "test_metrics": result, "epochs_run": selection["epochs_run"]}


def _fresh_model(cfg: TrainConfig, n_class: int) -> torch.nn.Module:
    """The start every phase shares: the same pretrained weights and the same seeded head."""
    seed_everything(cfg.random_state)
    model, _ = build_model(cfg.model_name, n_class, cfg.pre_trained, cfg.pretrained_path, cfg.drop_rate)
    return model


def _cross_validate(cfg: TrainConfig, run_dir: Path, device: torch.device, splits: DataSplits, resuming: bool,
                    common: dict[str, Any]) -> dict[str, Any]:
    """--folds K: one selection phase per fold (in fold_<k>/), each from the same pretrained start."""
    outcomes = []
    for fold in range(cfg.folds):
        train_samples, held_out = splits.fold(fold)
        logger.info("fold %d/%d: %d training, %d held-out images", fold + 1, cfg.folds, len(train_samples),
                    len(held_out))
        fold_model = _fresh_model(cfg, len(splits.class_names))
        outcomes.append(run_phase(phase.fold_files(fold), cfg, run_dir, fold_model, device, train_samples, held_out,
                                  stop_after=cfg.epochs, resume=resuming, **common))
        barrier(common["dist_info"])
    best_epochs = [o["best_epoch"] + 1 for o in outcomes]
    logger.info("cross-validation: best epochs per fold %s", best_epochs)
    return {"epochs_run": sum(o["epochs_run"] for o in outcomes), "seconds": sum(o["seconds"] for o in outcomes),
            "best_epochs": best_epochs}


def _out_of_fold(cfg: TrainConfig, run_dir: Path, model, splits: DataSplits, score, loader) -> dict[str, Any]:
    """Every training image predicted by the fold model that held it out: the OOF report and calibration set."""
    n_class = len(splits.class_names)
    probs = np.zeros((len(splits.train), n_class), dtype=np.float32)
    for fold in range(cfg.folds):
        model.load_state_dict(load_checkpoint(run_dir / phase.fold_files(fold).best)["model"])
        positions = [i for i, f in enumerate(splits.folds) if f == fold]
        result = score(model, loader([splits.train[i] for i in positions]), cfg.tta, f"fold {fold + 1} held-out")
        probs[[positions[i] for i in result["indices"]]] = result["probs"]
    targets = np.array([s.label for s in splits.train])
    frame = pd.DataFrame({"filepath": [s.path.relative_to(splits.root).as_posix() for s in splits.train],
                          "label": targets, "fold": np.array(splits.folds) + 1,
                          **{f"prob_{name}": probs[:, k] for k, name in enumerate(splits.class_names)}})
    atomic_save(run_dir / rf.OOF_PREDICTIONS, lambda tmp: frame.to_csv(tmp, index=False))
    metrics = classification_metrics(targets, probs.argmax(1), splits.class_names, probs)
    atomic_write_json(run_dir / rf.OOF_METRICS, {
        "folds": cfg.folds, "tta": cfg.tta, "per_fold_balanced_accuracy": [
            float(classification_metrics(targets[frame["fold"] == k + 1], probs[frame["fold"] == k + 1].argmax(1),
                                         splits.class_names)["balanced_accuracy"]) for k in range(cfg.folds)],
        "note": "out-of-fold predictions of every training image, before temperature scaling", **metrics})
    logger.info("out-of-fold (%d folds, %d images): accuracy %.4f, balanced accuracy %.4f, macro AUC %s",
                cfg.folds, len(targets), metrics["accuracy"], metrics["balanced_accuracy"],
                f"{metrics['macro_auc']:.4f}" if metrics.get("macro_auc") is not None else "n/a")
    return {"targets": targets, "probs": probs}


def _finish_training(cfg: TrainConfig, run_dir: Path, model, class_info: dict[str, Any], splits: DataSplits,
                     device: torch.device, tracker, image_loader, eval_tf, selection: dict[str, Any],
                     refit: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Calibrate on the selected model's held-out validation predictions, then test the delivered model.

    The test report also holds the variants the recipe chose between (the selected model without refit, without
    test-time flips, the raw weights without EMA), so a run shows what each step bought on this data.
    """
    class_names = splits.class_names
    precision = Precision.for_device(device, cfg.amp)
    channels_last = device.type == "cuda"
    loader = lambda samples: make_loader(samples, eval_tf, cfg.batch_size, cfg.num_workers, train=False,  # noqa
                                         pin_memory=device.type == "cuda", loader=image_loader)
    val_loader, test_loader = (loader(splits.val) if splits.val else None), loader(splits.test)
    criterion = torch.nn.CrossEntropyLoss()
    score = lambda net, data, tta, desc: evaluate(net, data, criterion, precision,  # noqa: E731
                                                  channels_last=channels_last, desc=desc, tta=tta)

    if splits.folds is not None:
        val = _out_of_fold(cfg, run_dir, model, splits, score, loader)
        best_epoch = refit["epochs"]
    else:
        best = load_checkpoint(run_dir / rf.BEST_CKPT)
        best_epoch = best["epoch"] + 1
        model.load_state_dict(best["model"])
        val = score(model, val_loader, cfg.tta, "validation")
        atomic_write_json(run_dir / rf.VAL_METRICS, {
            "weights": rf.BEST_CKPT, "best_epoch": best_epoch, "tta": cfg.tta,
            "note": "the selected model on the held-out validation split, before temperature scaling",
            **classification_metrics(val["targets"], val["probs"].argmax(1), class_names, val["probs"])})
    calibration = None
    temperature = 1.0
    if cfg.calibrate:
        calibration = guarded_temperature(logits_from_probs(val["probs"]), val["targets"], seed=cfg.random_state)
        temperature = calibration.temperature
        logger.info("temperature scaling on %d held-out images: fitted T = %.3f, %s; using T = %.3f",
                    calibration.n_images, calibration.fitted, calibration.reason, temperature)

    weights_name = rf.REFIT_CKPT if refit is not None else rf.BEST_CKPT
    delivered = load_checkpoint(run_dir / rf.REFIT_CKPT) if refit is not None else best
    variants: dict[str, dict[str, Any]] = {}

    def headline(result: dict) -> dict[str, Any]:
        probs = apply_temperature(result["probs"], temperature)
        return {k: v for k, v in classification_metrics(result["targets"], probs.argmax(1), class_names,
                                                        probs).items() if k != "per_class"}

    if refit is not None and splits.folds is None:  # the selected model as delivered without the refit
        variants["no_refit"] = headline(score(model, test_loader, cfg.tta, "test (no refit)"))
    model.load_state_dict(delivered["model"])
    test = score(model, test_loader, cfg.tta, "test")
    if cfg.tta:
        variants["no_tta"] = headline(score(model, test_loader, False, "test (no TTA)"))
    if "model_train" in delivered:
        model.load_state_dict(delivered["model_train"])
        variants["no_ema"] = headline(score(model, test_loader, cfg.tta, "test (no EMA)"))
        model.load_state_dict(delivered["model"])

    class_info = {**class_info, "weights": weights_name, "temperature": temperature, "tta": cfg.tta}
    if calibration is not None:
        class_info["calibration"] = calibration.to_dict()
    if refit is not None:
        class_info["refit"] = {"epochs": refit["epochs"], "images": refit["images"]}
    atomic_write_json(run_dir / rf.CLASS_INFO, class_info)
    seconds = {"select": round(selection["seconds"], 1), "refit": round(refit["seconds"], 1) if refit else 0.0}
    metrics = write_classification_report(
        run_dir, test["targets"], apply_temperature(test["probs"], temperature), class_names,
        confusion_name="confusion_matrix_test",
        extra={"weights": weights_name, "best_epoch": best_epoch, "folds": cfg.folds or None, "monitor": cfg.monitor,
               "refit_epochs": refit["epochs"] if refit else None, "tta": cfg.tta, "loss": test["loss"],
               "temperature": temperature, "calibration": calibration.to_dict() if calibration else None,
               "training_seconds": seconds, "variants": variants},
        uncalibrated_probs=test["probs"] if cfg.calibrate else None)
    logger.info("test (%s%s): accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f, macro AUC %s, ECE %.4f%s "
                "on %d images", "refit on train + validation" if refit else f"best epoch {metrics['best_epoch']}",
                ", flip TTA" if cfg.tta else "", metrics["accuracy"], metrics["balanced_accuracy"],
                metrics["macro_f1"], f"{metrics['macro_auc']:.4f}" if metrics.get("macro_auc") is not None else "n/a",
                metrics["ece"], f" (before temperature scaling {metrics['ece_uncalibrated']:.4f})"
                if "ece_uncalibrated" in metrics else "", metrics["n_images"])
    for name, values in variants.items():
        logger.info("  variant %-9s balanced accuracy %.4f, accuracy %.4f, macro AUC %s", name,
                    values["balanced_accuracy"], values["accuracy"],
                    f"{values['macro_auc']:.4f}" if values.get("macro_auc") is not None else "n/a")
    if tracker.run is not None:
        tracker.summary({f"test_{k}": v for k, v in metrics.items() if not isinstance(v, dict)})
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
