"""A whole training run, as main.py starts it: data and model, the run folder, the selection phase (or K folds), the
refit on every labelled image, calibration, and the test report of the delivered model.

main.py parses flags and calls ``run_training``; run_experiments.py calls main.py's ``main`` in-process.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch

from configs import TrainConfig
from dataloaders.audit import write_audit
from dataloaders.build import effective_workers, make_loader
from dataloaders.metadata import read_metadata
from dataloaders.prepare import prepare_dataset
from dataloaders.splits import DataSplits
from dataloaders.transforms import build_eval_transform, resolve_preprocessing
from evaluation.calibration import CalibrationResult, apply_temperature, guarded_temperature, logits_from_probs
from evaluation.decisions import choose_decisions, decisions_on_test, log_decisions, write_held_out_predictions
from evaluation.metrics import EvalResult, classification_metrics
from evaluation.reports import write_classification_report
from evaluation.subgroups import columns_for
from prediction.gradcam import save_gradcam_examples
from runs.checkpoint import load_checkpoint
from runs.run_folder import RunDir
from runs.run_info import RunInfo, read_run_info, write_run_info
from segmentation.skin_region import prepare_skin_masks
from torch_trainer import phase
from torch_trainer.distributed import DistInfo, barrier, broadcast, init_distributed, launched_by_torchrun, shutdown
from torch_trainer.experiment_tracking import ExperimentTracker
from torch_trainer.inputs import training_image_decoders
from torch_trainer.models import build_model, count_parameters
from torch_trainer.phase import PhaseContext, PhaseOutcome, run_phase
from torch_trainer.run_report import log_test, write_run_report, write_test_predictions
from torch_trainer.trainer import Precision, evaluate
from utils.atomic import atomic_write_json
from utils.csv_cells import save_frame_for_people
from utils.device import prefers_channels_last, select_device
from utils.errors import UserError
from utils.logging_setup import add_file_handler, remove_handler
from utils.seed import seed_everything, set_deterministic

logger = logging.getLogger(__name__)

# Flags a resumed run may change; everything else comes from the run's configs.json so the run stays one run.
RESUME_OVERRIDABLE = ("epochs", "patience", "device", "num_workers", "amp", "wandb")
GRADCAM_EXAMPLES = 4


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The flags as a TrainConfig; with --resume, the run's own configs.json plus the flags typed on the command line
    that a resume may change (``args.given_flags``, from configs.parse_with_config_file). Any other flag typed with
    --resume is refused: the run continues with the settings it was started with."""
    cfg = TrainConfig.from_args(args)
    if not cfg.resume:
        return cfg
    given = getattr(args, "given_flags", None)
    if given is None:  # a namespace built by hand: a value other than the default counts as given
        defaults = TrainConfig.__dataclass_fields__
        given = {name for name in defaults if getattr(cfg, name) != defaults[name].default}
    fixed = sorted(set(given) - set(RESUME_OVERRIDABLE) - {"resume", "config"})
    if fixed:
        raise UserError(f"--resume continues {cfg.resume} with the settings it was started with; "
                        f"{', '.join('--' + name for name in fixed)} cannot change on resume (only "
                        f"{', '.join('--' + name for name in RESUME_OVERRIDABLE)} can); start a new run instead")
    return resume_config(cfg.resume, {name: getattr(cfg, name) for name in set(given) & set(RESUME_OVERRIDABLE)})


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config to continue ``run_dir`` with: its saved configs.json with ``overrides`` (RESUME_OVERRIDABLE only)."""
    unknown = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
    if unknown:
        raise UserError(f"{', '.join(unknown)} cannot change when resuming a run")
    run = RunDir(run_dir)
    if not run.configs.is_file():
        raise UserError(f"--resume {run.root}: {run.configs.name} not found; pass a run folder written by main.py")
    if run.read_status().get("state") == "finished":
        # A finished run's schedule has decayed and its record describes the delivered model: continuing it would
        # deliver a model the record does not describe. More epochs are a new run.
        raise UserError(f"--resume {run.root}: this run finished; --resume continues an interrupted or failed run. "
                        f"To train longer, start a new run with --epochs N")
    saved = run.read_configs()
    saved.update(overrides)
    saved["resume"] = str(run.root)
    return TrainConfig.from_dict(saved)


def run_training(cfg: TrainConfig, on_run_dir: Optional[Callable[[Path], None]] = None) -> dict[str, Any]:
    """Train one run (one process, or every rank under torchrun); ``on_run_dir`` hears the run folder as soon as it
    exists. Returns ``{"run_dir", "test_metrics", "epochs_run"}``."""
    if launched_by_torchrun():
        if cfg.sampler in ("balanced", "softened"):
            raise UserError(f"--sampler {cfg.sampler} is not supported under torchrun yet; use --class_weights auto "
                            "or --logit_adjustment 1.0")
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
    splits, model, timm_name, info, skin_region = load_data_and_model(
        cfg, RunDir(cfg.resume) if cfg.resume else None, device)
    if cfg.resume:
        run = RunDir(cfg.resume)
    else:
        run = RunDir(broadcast(str(RunDir.create(cfg.save_dir, cfg.data_name, cfg.model_name).root)
                               if dist_info.is_main else None, dist_info))
    if on_run_dir is not None and dist_info.is_main:
        on_run_dir(run.root)
    handler = add_file_handler(run.train_log) if dist_info.is_main else None
    logger.info("run folder: %s (device %s%s)", run.root, device,
                f", {dist_info.world_size} processes" if dist_info.enabled else "")
    try:
        if info is None:
            info = _start_run(cfg, run, splits, model, timm_name, skin_region, dist_info)
        result = train(cfg, run, device, splits, model, info, dist_info)
    except KeyboardInterrupt:
        if dist_info.is_main:
            run.write_status("interrupted")
        logger.warning("interrupted; the last finished epoch is in %s; continue with --resume %s",
                       run.last_ckpt, run.root)
        raise
    except BaseException as err:
        if dist_info.is_main:
            run.write_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if handler is not None:
            remove_handler(handler)
    if dist_info.is_main:
        run.write_status("finished", epochs_run=result["epochs_run"])
        logger.info("done: %s", run.root)
    return result


def load_data_and_model(cfg: TrainConfig, run: Optional[RunDir], device: torch.device
                        ) -> tuple[DataSplits, torch.nn.Module, str, Optional[RunInfo], Optional[dict]]:
    """Everything that can fail on a user mistake, done before a new run folder is created.

    Returns the splits, the model, its timm name, when resuming the run's RunInfo (None for a new run), and for
    skin-region runs the skin-region settings (masks computed and cached by then).
    """
    if run is not None:  # resuming: the split and the architecture come from the run folder
        info = read_run_info(run.root)
        splits = run.read_splits(cfg.resolved_data_dir, info.class_names)
        model, timm_name = build_model(cfg.model_name, len(splits.class_names), False, None, cfg.drop_rate)
        region = (prepare_skin_masks(cfg.segmentation(), cfg.resolved_data_dir, splits, device)
                  if cfg.input_kind == "skin_region" else None)
        return splits, model, timm_name, info, region
    splits = prepare_dataset(cfg.data_spec(), num_threads=max(2, effective_workers(cfg.num_workers)))
    model, timm_name = build_model(cfg.model_name, len(splits.class_names), cfg.pre_trained, cfg.pretrained_path,
                                   cfg.drop_rate)
    region = (prepare_skin_masks(cfg.segmentation(), cfg.resolved_data_dir, splits, device)
              if cfg.input_kind == "skin_region" else None)
    return splits, model, timm_name, None, region


def _start_run(cfg: TrainConfig, run: RunDir, splits: DataSplits, model: torch.nn.Module, timm_name: str,
               skin_region: Optional[dict[str, Any]], dist_info: DistInfo) -> RunInfo:
    """A new run's contract (classes, architecture, preprocessing), written with its config and splits."""
    info = RunInfo(class_names=splits.class_names, model_name=cfg.model_name, timm_model_name=timm_name,
                   preprocessing=resolve_preprocessing(model, cfg.img_size, cfg.eval_crop, cfg.crop_pct),
                   model_kwargs={"drop_rate": cfg.drop_rate},
                   input_kind="skin_region" if skin_region else "full_image", skin_region=skin_region, tta=cfg.tta)
    if dist_info.is_main:  # under torchrun only rank 0 touches the run folder
        run.write_splits(splits)
        if splits.audit is not None:
            write_audit(run.root, splits.audit)
        write_run_info(run.root, info)
        run.write_configs(cfg.to_dict())
    return info


def train(cfg: TrainConfig, run: RunDir, device: torch.device, splits: DataSplits, model: torch.nn.Module,
          info: RunInfo, dist_info: DistInfo = DistInfo()) -> dict[str, Any]:
    """The selection phase (train split, best epoch on validation), then with ``--refit`` the refit on train +
    validation, then calibration and the test report of the delivered model."""
    for split, counts in splits.counts().items():
        logger.info("%-5s %5d images  %s", split, sum(counts.values()), counts)
    if splits.skipped:
        logger.warning("%d unreadable image(s) skipped; see %s", len(splits.skipped), run.skipped_csv)
    pre = info.preprocessing
    logger.info("model %s (%s): %.2fM parameters, input %s, mean %s, std %s, eval crop %s %.3f", cfg.model_name,
                info.timm_model_name, count_parameters(model) / 1e6, list(pre.input_size), list(pre.mean),
                list(pre.std), pre.crop_mode, pre.crop_pct)
    tracker = ExperimentTracker(cfg.wandb if dist_info.is_main else "disabled", run.wandb_dir,
                                {**cfg.to_dict(), "class_names": info.class_names,
                                 "timm_model_name": info.timm_model_name, "world_size": dist_info.world_size},
                                cfg.wandb_project, run.name)
    eval_decoder, train_decoder = training_image_decoders(info, cfg.resolved_data_dir, cfg.min_crop_scale,
                                                          cfg.cache_images, cfg.cache_dir)
    imbalance = phase.resolve_imbalance(cfg.sampler, cfg.sampler_power, cfg.logit_adjustment, cfg.class_weights,
                                        phase.class_counts(splits.train + splits.val, len(splits.class_names)),
                                        dist_info.enabled)
    ctx = PhaseContext(cfg, run, device, info, eval_decoder, build_eval_transform(pre), tracker, dist_info,
                       train_decoder, imbalance)
    try:
        selection, refit = _select_and_refit(ctx, splits, model)
        if not dist_info.is_main:
            return {"run_dir": str(run.root), "test_metrics": None, "epochs_run": _epochs_run(selection)}
        result = _finish_training(ctx, model, splits, selection, refit)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return {"run_dir": str(run.root), "test_metrics": result, "epochs_run": _epochs_run(selection)}


def _epochs_run(selection: list[PhaseOutcome]) -> int:
    return sum(outcome.epochs_run for outcome in selection)


def _select_and_refit(ctx: PhaseContext, splits: DataSplits, model: torch.nn.Module
                      ) -> tuple[list[PhaseOutcome], Optional[PhaseOutcome]]:
    """The selection phase (or the K folds), then the refit on every labelled training image for the epochs that
    validation chose. Returns the selection phases' outcomes (one, or one per fold) and the refit's (None without
    --refit)."""
    cfg, resuming = ctx.cfg, ctx.cfg.resume is not None
    if splits.folds is not None:
        selection = _cross_validate(ctx, splits, resuming)
        refit_epochs = int(np.ceil(np.median([o.selected_epoch for o in selection])))
    else:
        selection = [run_phase(phase.select_files(ctx.run), ctx, model, splits.train, splits.val,
                               stop_after=cfg.epochs, resume=resuming)]
        barrier(ctx.dist_info)  # rank 0 has written the last checkpoint; the other ranks are done
        # Every rank's stopper saw the same gathered validation, so the selected epoch is the same everywhere.
        refit_epochs = selection[0].selected_epoch if cfg.refit else 0
    if not refit_epochs:
        return selection, None
    everything = splits.train + splits.val
    # A compressed schedule warms up and decays within the refit's epochs, so a refit for fewer epochs than
    # --epochs still ends at the low learning rate instead of stopping mid-schedule.
    schedule_epochs = refit_epochs if cfg.refit_schedule == "compressed" else cfg.epochs
    logger.info("refit: training on every labelled training image (%d) for the %d epoch(s) validation chose "
                "(learning-rate schedule over %d epochs)", len(everything), refit_epochs, schedule_epochs)
    refit = run_phase(phase.refit_files(ctx.run), ctx, _fresh_model(cfg, len(splits.class_names)), everything, None,
                      stop_after=refit_epochs, schedule_epochs=schedule_epochs, resume=resuming)
    barrier(ctx.dist_info)
    return selection, refit


def _fresh_model(cfg: TrainConfig, n_class: int) -> torch.nn.Module:
    """The start every phase shares: the same pretrained weights and the same seeded head."""
    seed_everything(cfg.random_state)
    model, _ = build_model(cfg.model_name, n_class, cfg.pre_trained, cfg.pretrained_path, cfg.drop_rate)
    return model


def _cross_validate(ctx: PhaseContext, splits: DataSplits, resuming: bool) -> list[PhaseOutcome]:
    """--folds K: one selection phase per fold (in fold_<k>/), each from the same pretrained start."""
    cfg = ctx.cfg
    outcomes = []
    for fold in range(cfg.folds):
        train_samples, held_out = splits.fold(fold)
        logger.info("fold %d/%d: %d training, %d held-out images", fold + 1, cfg.folds, len(train_samples),
                    len(held_out))
        fold_model = _fresh_model(cfg, len(splits.class_names))
        outcomes.append(run_phase(phase.fold_files(ctx.run, fold), ctx, fold_model, train_samples, held_out,
                                  stop_after=cfg.epochs, resume=resuming))
        barrier(ctx.dist_info)
    logger.info("cross-validation: selected epochs per fold %s (highest validation score: %s)",
                [o.selected_epoch for o in outcomes], [o.best_epoch for o in outcomes])
    return outcomes


@dataclass
class _Scorer:
    """Evaluates a model on a list of samples with the run's eval transform and image loader."""

    ctx: PhaseContext

    def __call__(self, model: torch.nn.Module, samples, tta: bool, desc: str) -> EvalResult:
        cfg, device = self.ctx.cfg, self.ctx.device
        loader = make_loader(samples, self.ctx.eval_transform, cfg.batch_size, cfg.num_workers, train=False,
                             pin_memory=device.type == "cuda", decoder=self.ctx.image_decoder)
        return evaluate(model, loader, torch.nn.CrossEntropyLoss(), Precision.for_device(device, cfg.amp),
                        channels_last=prefers_channels_last(device), desc=desc, tta=tta)


def _out_of_fold(ctx: PhaseContext, model: torch.nn.Module, splits: DataSplits, score: _Scorer) -> EvalResult:
    """Every training image predicted by the fold model that held it out: the OOF report and calibration set."""
    cfg, run = ctx.cfg, ctx.run
    n_class = len(splits.class_names)
    probs = np.zeros((len(splits.train), n_class), dtype=np.float32)
    for fold in range(cfg.folds):
        model.load_state_dict(load_checkpoint(phase.fold_files(run, fold).best)["model"])
        positions = [i for i, f in enumerate(splits.folds) if f == fold]
        result = score(model, [splits.train[i] for i in positions], cfg.tta, f"fold {fold + 1} held-out")
        probs[[positions[i] for i in result.indices]] = result.probs
    targets = np.array([s.label for s in splits.train])
    frame = pd.DataFrame({"filepath": [s.path.relative_to(splits.root).as_posix() for s in splits.train],
                          "label": targets, "fold": np.array(splits.folds) + 1,
                          **{f"prob_{name}": probs[:, k] for k, name in enumerate(splits.class_names)}})
    save_frame_for_people(run.oof_predictions, frame)
    metrics = classification_metrics(targets, probs.argmax(1), splits.class_names, probs)
    atomic_write_json(run.oof_metrics, {
        "folds": cfg.folds, "tta": cfg.tta, "per_fold_balanced_accuracy": [
            float(classification_metrics(targets[frame["fold"] == k + 1], probs[frame["fold"] == k + 1].argmax(1),
                                         splits.class_names)["balanced_accuracy"]) for k in range(cfg.folds)],
        "note": "out-of-fold predictions of every training image, before temperature scaling", **metrics})
    logger.info("out-of-fold (%d folds, %d images): accuracy %.4f, balanced accuracy %.4f, macro AUC %s",
                cfg.folds, len(targets), metrics["accuracy"], metrics["balanced_accuracy"],
                f"{metrics['macro_auc']:.4f}" if metrics.get("macro_auc") is not None else "n/a")
    # The plain cross-entropy of the out-of-fold probabilities, as validation reports it.
    loss = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())
    return EvalResult.from_predictions(loss, targets, probs, np.arange(len(targets)))


def _held_out_predictions(ctx: PhaseContext, model: torch.nn.Module, splits: DataSplits, score: _Scorer,
                          selected: PhaseOutcome) -> tuple[EvalResult, Optional[dict[str, Any]]]:
    """The calibration set (validation predictions of the selected model, or out-of-fold predictions) and, for a
    one-split run, the selected checkpoint (whose weights are then left in ``model``)."""
    if splits.folds is not None:
        return _out_of_fold(ctx, model, splits, score), None
    best = load_checkpoint(ctx.run.best_ckpt)
    model.load_state_dict(best["model"])
    val = score(model, splits.val, ctx.cfg.tta, "validation")
    atomic_write_json(ctx.run.val_metrics, {
        "weights": RunDir.BEST_CKPT, "best_epoch": selected.selected_epoch, "epoch_selection": ctx.cfg.epoch_selection,
        "highest_score_epoch": selected.best_epoch, "tta": ctx.cfg.tta,
        "note": "the selected model on the held-out validation split, before temperature scaling",
        **classification_metrics(val.targets, val.preds, splits.class_names, val.probs)})
    return val, best


def _calibrate(cfg: TrainConfig, held_out: EvalResult) -> Optional[CalibrationResult]:
    if not cfg.calibrate:
        return None
    calibration = guarded_temperature(logits_from_probs(held_out.probs), held_out.targets,
                                      seed=cfg.random_state)
    logger.info("temperature scaling on %d held-out images: fitted T = %.3f, %s; using T = %.3f",
                calibration.n_images, calibration.fitted, calibration.reason, calibration.temperature)
    return calibration


def _test_with_variants(ctx: PhaseContext, model: torch.nn.Module, splits: DataSplits, score: _Scorer,
                        delivered: dict[str, Any], temperature: float
                        ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The delivered model on the test split, and the variants the recipe chose between (the selected model
    without the refit, without test-time flips, the raw weights without EMA), so a run shows what each step bought
    on this data. ``model`` holds the selected weights on entry and the delivered ones on return."""
    cfg, class_names = ctx.cfg, splits.class_names

    def headline(result: EvalResult) -> dict[str, Any]:
        probs = apply_temperature(result.probs, temperature)
        return {k: v for k, v in classification_metrics(result.targets, probs.argmax(1), class_names,
                                                        probs).items() if k != "per_class"}

    variants: dict[str, dict[str, Any]] = {}
    if delivered.get("phase") == phase.REFIT_NAME and splits.folds is None:  # the selected model without the refit
        variants["no_refit"] = headline(score(model, splits.test, cfg.tta, "test (no refit)"))
    model.load_state_dict(delivered["model"])
    test = score(model, splits.test, cfg.tta, "test")
    if cfg.tta:
        variants["no_tta"] = headline(score(model, splits.test, False, "test (no TTA)"))
    if "model_train" in delivered:
        model.load_state_dict(delivered["model_train"])
        variants["no_ema"] = headline(score(model, splits.test, cfg.tta, "test (no EMA)"))
        model.load_state_dict(delivered["model"])
    return test, variants


def _finish_training(ctx: PhaseContext, model: torch.nn.Module, splits: DataSplits, selection: list[PhaseOutcome],
                     refit: Optional[PhaseOutcome]) -> dict[str, Any]:
    """Calibrate on held-out predictions of the selected model, then test the delivered model and write the report
    and the final run contract."""
    cfg, run = ctx.cfg, ctx.run
    score = _Scorer(ctx)
    held_out, best = _held_out_predictions(ctx, model, splits, score, selection[0])
    best_epoch = refit.planned_epochs if splits.folds is not None else selection[0].selected_epoch
    calibration = _calibrate(cfg, held_out)
    temperature = calibration.temperature if calibration is not None else 1.0
    held_out_probs = apply_temperature(held_out.probs, temperature)
    write_held_out_predictions(run.held_out_predictions, held_out.targets, held_out_probs, splits.class_names)
    points, abstain = choose_decisions(cfg.operating_point, cfg.abstain, splits.class_names, held_out.targets,
                                       held_out_probs)
    delivered = load_checkpoint(run.refit_ckpt) if refit is not None else best
    test, variants = _test_with_variants(ctx, model, splits, score, delivered, temperature)
    weights_name = RunDir.REFIT_CKPT if refit is not None else RunDir.BEST_CKPT
    trained = refit or selection[0]  # the phase whose weights are delivered
    info = ctx.info.updated(weights=weights_name, temperature=temperature, tta=cfg.tta,
                            calibration=calibration.to_dict() if calibration else None,
                            refit={"epochs": refit.planned_epochs, "images": refit.images} if refit else None,
                            operating_points=points, abstain=abstain)
    write_run_info(run.root, info)
    seconds = {"select": round(sum(o.seconds for o in selection), 1),
               "refit": round(refit.seconds, 1) if refit else 0.0}
    tested = [splits.test[i] for i in test.indices]
    test_groups = splits.group_of(tested)
    every_image = [s.path for s in splits.train + splits.val + splits.test]
    subgroups = (columns_for([s.path for s in tested], read_metadata(Path(cfg.metadata), every_image, splits.root))
                 if cfg.metadata else None)
    test_probs = apply_temperature(test.probs, temperature)
    decisions = (decisions_on_test(test.targets, test_probs, splits.class_names, points, abstain, test_groups)
                 if points or abstain else None)
    metrics = write_classification_report(
        run.root, test.targets, test_probs, splits.class_names, metrics_name=RunDir.TEST_METRICS,
        confusion_name=RunDir.TEST_CONFUSION,
        extra={"weights": weights_name, "best_epoch": best_epoch, "folds": cfg.folds or None, "monitor": cfg.monitor,
               "epoch_selection": cfg.epoch_selection,
               "highest_score_epoch": selection[0].best_epoch if best is not None else None,
               "refit_epochs": refit.planned_epochs if refit else None,
               "refit_schedule": cfg.refit_schedule if refit else None, "tta": cfg.tta, "loss": test.loss,
               "temperature": temperature, "calibration": calibration.to_dict() if calibration else None,
               "training_seconds": seconds, "variants": variants,
               "imbalance": trained.imbalance.to_dict() if trained.imbalance else None,
               **({"decisions": decisions} if decisions else {})},
        uncalibrated_probs=test.probs if cfg.calibrate else None, groups=test_groups, subgroups=subgroups)
    write_test_predictions(run, splits, test, temperature)
    write_run_report(ctx, model, splits, tested, test.targets, test_probs, metrics)
    log_test(metrics, variants, refit is not None, cfg.tta)
    if decisions:
        log_decisions(decisions)
    if ctx.tracker.run is not None:
        ctx.tracker.summary({f"test_{k}": v for k, v in metrics.items() if not isinstance(v, dict)})
        ctx.tracker.log_images("confusion_matrix", [run.test_confusion_png])
        ctx.tracker.log_images("gradcam", save_gradcam_examples(model, splits.test[:GRADCAM_EXAMPLES], info,
                                                                ctx.image_decoder, run.gradcam_examples))
    return metrics
