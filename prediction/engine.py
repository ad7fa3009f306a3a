"""The prediction engine behind inference.py and inference_with_segmentation.py: preprocessed batches in, prediction
rows, Grad-CAM overlays and the output files (predictions.csv/.json, skipped.csv, labelled-folder metrics) out."""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from configs import AnswerOptions, PredictionOptions
from dataloaders.image_io import load_rgb
from dataloaders.inference_data import collect_inference_images, make_inference_loader
from dataloaders.transforms import build_eval_transform, decode_min_side
from evaluation.decisions import (
    choose_decisions,
    decision_columns,
    flags_and_decision,
    parse_abstain,
    parse_operating_points,
    read_held_out_predictions,
)
from prediction.gradcam import GRADCAM_SUFFIX, GradCamExplainer, explained_overlay, overlay_caption
from prediction.labelled_scoring import ReferenceLabels, score_labelled_folder
from prediction.predictors import ExecuTorchPredictor, OnnxPredictor, TorchPredictor, predict_proba
from runs.checkpoint import load_run_model
from runs.export_dir import DEFAULT_EXPORT, ExportDir, other_source_run
from runs.run_folder import RunDir
from runs.run_info import RunInfo, read_run_info
from utils.atomic import atomic_path, atomic_write_json
from utils.csv_cells import neutralise, open_for_people
from utils.device import select_device
from utils.errors import UserError
from utils.paths import check_only_ours, check_output_folder, safe_output_path
from utils.progress import Progress

logger = logging.getLogger(__name__)

DEFAULT_ONNX_MODEL = DEFAULT_EXPORT.fp32


class GradcamWriter:
    """Writes overlays into a staging folder that replaces ``gradcam/`` only once every overlay is written."""

    def __init__(self, output_dir: Path, model, method: str, preprocessing, max_side: int = 1024):
        self.final_dir = output_dir / "gradcam"
        check_only_ours(self.final_dir, GRADCAM_SUFFIX, "--inference_output")  # publish() replaces gradcam/
        self.staging = output_dir / ".gradcam.partial"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.preprocessing = preprocessing
        self.max_side = max_side
        self.explainer = GradCamExplainer(model, method, preprocessing.input_size)
        logger.info("Grad-CAM (%s) on layer %s", method, self.explainer.target_name)

    def write(self, images, class_indices: list[int], captions: list[str], originals: list[np.ndarray],
              relatives: list[Path]) -> None:
        """``originals``: the pictures the eval transform was applied to, at their own size."""
        cams = self.explainer.explain(images, class_indices)
        for cam, caption, original, relative in zip(cams, captions, originals, relatives):
            overlay = explained_overlay(original, cam, self.preprocessing, caption, self.max_side or None)
            target = safe_output_path(self.staging, relative, GRADCAM_SUFFIX)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay).save(target, quality=90)

    def publish(self) -> None:
        self.explainer.close()
        self.staging.mkdir(parents=True, exist_ok=True)
        old = self.final_dir.with_name(".gradcam.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.final_dir.exists():
            self.final_dir.rename(old)
        self.staging.rename(self.final_dir)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        self.explainer.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def build_predictor(options: AnswerOptions, run_dir: Path, info: RunInfo, device, torch_model: bool = False,
                    default_onnx: Optional[Path] = None, threads: int = 0):
    """The classifier (PyTorch or ONNX Runtime) and, where the torch backend or ``torch_model`` (Grad-CAM) needs it,
    the PyTorch model. ``default_onnx``: the file for --backend onnx when --onnx_model is not given."""
    model = None
    if options.backend == "torch" or torch_model:
        model, _ = load_run_model(run_dir, options.weights)
        model.to(device)
    if options.backend == "executorch":
        path = Path(options.onnx_model) if options.onnx_model else DEFAULT_EXPORT.int8_pte
        if path.suffix.lower() != ".pte":
            raise UserError(f"--backend executorch runs an ExecuTorch program (.pte, written by "
                            f"quantize_onnx_models.py --targets onnx,executorch), not {path}")
        if path.is_file() and path.parent.resolve() != run_dir.resolve():  # an export folder's own file
            warn_if_other_run(path, run_dir)
        return ExecuTorchPredictor(path, info.n_class), model
    if options.backend != "torch":  # onnx or ort: ONNX Runtime runs both file formats
        default = ((default_onnx or DEFAULT_ONNX_MODEL) if options.backend == "onnx"
                   else DEFAULT_EXPORT.root / ExportDir.INT8_ORT_NAME)
        onnx_path = Path(options.onnx_model) if options.onnx_model else default
        if options.backend == "ort" and onnx_path.suffix.lower() != ".ort":
            raise UserError(f"--backend ort runs an ORT-format file (.ort, written by quantize_onnx_models.py "
                            f"--targets onnx,ort), not {onnx_path}; for an .onnx file use --backend onnx")
        if onnx_path.is_file() and onnx_path.parent.resolve() != run_dir.resolve():  # an export folder's own file
            warn_if_other_run(onnx_path, run_dir)  # first: it explains a mismatch the predictor then refuses
        predictor = OnnxPredictor(onnx_path, info.n_class, device, threads, input_size=info.preprocessing.input_size)
        return predictor, model
    return TorchPredictor(model, device), model


def warn_if_other_run(model_path: Path, run_dir: Path) -> None:
    """An exported file from another run folder gives that run's answers under this run's class names."""
    source = other_source_run(model_path, run_dir)
    if source:
        logger.warning("!!! %s was exported from %s, not from --model_path %s; its answers are that run's",
                       model_path, source, run_dir)


def prediction_row(relative: str, probs: np.ndarray, class_names: list[str], topk: int) -> dict[str, Any]:
    best = int(probs.argmax())
    row = {"filename": relative, "predicted_class": best, "predicted_label": class_names[best],
           "confidence": float(probs[best]),
           "probabilities": {name: float(p) for name, p in zip(class_names, probs)}}
    if topk > 1:
        order = np.argsort(-probs)[:topk]
        row["topk"] = [{"label": class_names[i], "probability": float(probs[i])} for i in order]
    return row


def _csv_value(value: Any) -> Any:
    # booleans stay True/False, as face_found always was
    return f"{value:.6f}" if isinstance(value, float) else neutralise(value)


def write_outputs(output_dir: Path, rows: list[dict], skipped: list[dict], class_names: list[str],
                  extra_columns: tuple[str, ...] = ()) -> None:
    """predictions.csv (inference.py's columns, then ``extra_columns``), skipped.csv and predictions.json."""
    header = (["filename", "predicted_class", "predicted_label", "confidence"] + [f"prob_{n}" for n in class_names]
              + list(extra_columns))
    with atomic_path(output_dir / "predictions.csv") as tmp, open_for_people(tmp) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([neutralise(row["filename"]), row["predicted_class"], neutralise(row["predicted_label"]),
                             f"{row['confidence']:.6f}"] + [f"{row['probabilities'][n]:.6f}" for n in class_names]
                            + [_csv_value(row[c]) for c in extra_columns])
    with atomic_path(output_dir / "skipped.csv") as tmp, open_for_people(tmp) as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "reason"])
        writer.writerows([neutralise(s["filename"]), neutralise(s["reason"])] for s in skipped)
    skipped_entries = [{"predicted_class": None, "predicted_label": None, "confidence": None, "probabilities": None,
                        **s, "skipped": True} for s in skipped]
    atomic_write_json(output_dir / "predictions.json", [{**row, "skipped": False} for row in rows] + skipped_entries)


def open_run(model_path: str | Path, batch_size: int, topk: int,
             options: Optional[AnswerOptions] = None) -> tuple[Path, RunInfo]:
    """The run folder and its contract; ``options``' --operating_point/--abstain replace the run's thresholds, chosen
    on the run's held-out predictions."""
    if batch_size < 1 or topk < 1:
        raise UserError("--batch_size and --topk must be at least 1")
    run_dir = Path(model_path)
    if not run_dir.is_dir():
        raise UserError(f"--model_path {run_dir} not found; pass a run folder written by main.py")
    info = read_run_info(run_dir)
    if options is not None and (options.operating_point or options.abstain):
        parse_operating_points(options.operating_point, info.class_names)
        parse_abstain(options.abstain)
        targets, probs = read_held_out_predictions(RunDir(run_dir).held_out_predictions, info.class_names)
        points, abstain = choose_decisions(options.operating_point, options.abstain, info.class_names, targets, probs)
        info = info.updated(operating_points=points if options.operating_point else info.operating_points,
                            abstain=abstain if options.abstain else info.abstain)
    return run_dir, info


class BatchClassifier:
    """Preprocessed batches in, prediction rows (and Grad-CAM overlays) out; shared by both inference scripts."""

    def __init__(self, options: PredictionOptions, run_dir: Path, info: RunInfo, output_dir: Path):
        self.device = select_device(options.device)
        self.predictor, model = build_predictor(options, run_dir, info, self.device, options.generate_gradcam)
        self.class_names = info.class_names
        self.topk = options.topk
        self.tta = info.tta if options.tta is None else options.tta
        self.temperature = info.temperature
        self.probs: list[np.ndarray] = []
        self.cams = (GradcamWriter(output_dir, model, options.cam_method, info.preprocessing, options.overlay_max_side)
                     if options.generate_gradcam else None)
        self.rows: list[dict[str, Any]] = []
        self.operating_points, self.abstain = info.operating_points, info.abstain
        self.decision_columns = decision_columns(info.class_names, info.operating_points, info.abstain)

    @property
    def wants_originals(self) -> bool:
        return self.cams is not None

    def classify(self, images, relatives: list[Path], originals: Optional[list[np.ndarray]] = None,
                 extras: Optional[list[dict[str, Any]]] = None) -> None:
        probs = predict_proba(self.predictor, images, tta=self.tta, temperature=self.temperature)
        self.probs.extend(probs)
        for i, (relative, p) in enumerate(zip(relatives, probs)):
            self.rows.append({**prediction_row(relative.as_posix(), p, self.class_names, self.topk),
                              **(extras[i] if extras else {}),
                              **flags_and_decision(p, self.class_names, self.operating_points, self.abstain)})
        if self.cams is not None:
            answers = [int(p.argmax()) for p in probs]
            self.cams.write(images.to(self.device), answers,
                            [overlay_caption(self.class_names, k, float(p[k])) for k, p in zip(answers, probs)],
                            originals, relatives)

    def finish(self) -> None:
        if self.cams is not None:
            self.cams.publish()

    def abandon(self) -> None:
        if self.cams is not None:
            self.cams.abandon()


def summarise(found: int, rows: list[dict], skipped: list[dict], class_names: list[str], seconds: float,
              output_dir: Path, gradcam: bool) -> dict[str, Any]:
    counts = Counter(row["predicted_label"] for row in rows)
    summary = {"images_found": found, "predicted": len(rows), "skipped": len(skipped),
               "per_class": {name: counts.get(name, 0) for name in class_names},
               "images_per_s": len(rows) / seconds if seconds > 0 else 0.0, "output": str(output_dir)}
    logger.info("%d images: %d classified, %d skipped (see skipped.csv) in %.1fs, %.1f images/s", found,
                len(rows), len(skipped), seconds, summary["images_per_s"])
    logger.info("predicted per class: %s", ", ".join(f"{k} {v}" for k, v in summary["per_class"].items()))
    logger.info("results: %s%s", output_dir / "predictions.csv", f" and {output_dir / 'gradcam'}/" if gradcam else "")
    return summary


Batch = tuple[Any, list[Path], Optional[list[np.ndarray]], Optional[list[dict[str, Any]]]]


class WholeImages:
    """inference.py's inputs: each photo decoded (reduced-size for large JPEGs) and put through the eval transform.
    Other inputs (prediction.segmented.SkinRegions) plug into ``infer_folder`` with the same four methods."""

    desc = "inference"
    extra_columns: tuple[str, ...] = ()

    def check(self, info: RunInfo, options: PredictionOptions) -> None:
        """Everything that can fail or warn before the output folder is touched."""
        if info.input_kind != "full_image":
            logger.warning("this model was trained on %s inputs but inference.py feeds whole images; use "
                           "inference_with_segmentation.py", info.input_kind)

    def start(self, output_dir: Path) -> None:
        """Prepare the output folder's own sub-folders."""

    def batches(self, root: Path, paths: list[Path], info: RunInfo, options: PredictionOptions, batch_size: int,
                num_workers: int, wants_originals: bool, skipped: list[dict]) -> Iterator[Batch]:
        """(images, relative paths, the pictures the transform saw when Grad-CAM needs them, extra columns) per
        batch; unreadable files go into ``skipped``."""
        min_side = decode_min_side(info.preprocessing) if options.reduced_decode else 0
        loader = make_inference_loader(paths, build_eval_transform(info.preprocessing), batch_size, num_workers,
                                       min_side)
        if options.generate_gradcam and options.overlay_max_side:
            logger.info("Grad-CAM overlays of photos larger than %d px are written with the longer side at %d px "
                        "(--overlay_max_side 0 for full size)", options.overlay_max_side, options.overlay_max_side)
        relative = [p.relative_to(root) for p in paths]
        for images, indices, _sizes, failed in Progress(loader, self.desc, unit="batch"):
            for index, reason in failed:
                logger.warning("skipping %s: %s", paths[index], reason)
                skipped.append({"filename": relative[index].as_posix(), "reason": reason})
            if images is None:
                continue
            originals = ([np.asarray(load_rgb(paths[i], max_side=options.overlay_max_side)) for i in indices]
                         if wants_originals else None)
            yield images, [relative[i] for i in indices], originals, None

    def finish(self, summary: dict[str, Any], rows: list[dict], skipped: list[dict]) -> None:
        """Add this input's own counts to the summary."""


def _hint_labelled_folder(root: Path, paths: list[Path], class_names: list[str]) -> None:
    """A folder whose sub-folders are named like the run's classes is probably labelled: say how to score it."""
    folders = {p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1}
    if len(folders) >= 2 and folders <= set(class_names):
        logger.info("the sub-folders of %s are named like the run's classes (%s): add --labels_from_folders to also "
                    "get accuracy, per-class metrics and report.html", root, ", ".join(sorted(folders)))


def _run_folders_around(output_dir: Path) -> dict[str, Path]:
    """A run or export folder (it holds a class_info.json) that ``output_dir`` is or lies inside."""
    for folder in (output_dir.resolve(), *output_dir.resolve().parents):
        if (folder / RunDir.CLASS_INFO).is_file():
            return {"a run or export folder": folder}
    return {}


def infer_folder(model_path: str | Path, folder: str | Path, output_dir: Path, options: PredictionOptions, *,
                 batch_size: int = 32, num_workers: int = 2, reference: ReferenceLabels = ReferenceLabels(),
                 inputs: Optional[WholeImages] = None) -> dict[str, Any]:
    """Classify every image under ``folder`` (or one image file) with a run folder, write the outputs into
    ``output_dir`` and return the summary (counts, images/s, metrics for a labelled folder). ``inputs`` turns the
    photos into classifier inputs: whole images (inference.py) unless given."""
    inputs = inputs or WholeImages()
    run_dir, info = open_run(model_path, batch_size, options.topk, options)
    root, paths = collect_inference_images(folder)
    labels = reference.lookup(root, paths) if reference.active else None  # a bad labels CSV fails before the work
    metadata = reference.subgroup_values(root, paths)
    if not reference.active:
        _hint_labelled_folder(root, paths, info.class_names)
    check_output_folder(output_dir, "--inference_output", {"--inference_folder": Path(folder), "--model_path": run_dir,
                                                           **_run_folders_around(output_dir)})
    inputs.check(info, options)
    output_dir.mkdir(parents=True, exist_ok=True)
    inputs.start(output_dir)
    classifier = BatchClassifier(options, run_dir, info, output_dir)
    skipped: list[dict] = []
    start = time.perf_counter()
    try:
        for images, relatives, originals, extras in inputs.batches(root, paths, info, options, batch_size,
                                                                   num_workers, classifier.wants_originals, skipped):
            classifier.classify(images, relatives, originals, extras)
    except BaseException:
        classifier.abandon()
        raise
    seconds = time.perf_counter() - start
    classifier.finish()
    write_outputs(output_dir, classifier.rows, skipped, info.class_names,
                  inputs.extra_columns + classifier.decision_columns)
    summary = summarise(len(paths), classifier.rows, skipped, info.class_names, seconds, output_dir,
                        options.generate_gradcam)
    summary["run_dir"] = str(run_dir)
    if labels is not None:
        summary["metrics"] = score_labelled_folder(output_dir, classifier.rows, classifier.probs, info.class_names,
                                                   labels, reference.source, metadata, root)
    inputs.finish(summary, classifier.rows, skipped)
    return summary
