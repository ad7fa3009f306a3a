"""The served model: a run folder (or an export folder) opened once, answering uploaded image bytes exactly as
inference.py answers files: the run's preprocessing and reduced JPEG decode, TTA, temperature, operating points and
abstention, and the same refusal of files that are not photos."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from configs import AnswerOptions
from dataloaders.image_io import load_rgb
from dataloaders.transforms import build_eval_transform, decode_min_side
from evaluation.decisions import flags_and_decision
from prediction.engine import build_predictor, open_run, prediction_row
from prediction.gradcam import GradCamExplainer, explained_overlay, overlay_caption
from prediction.predictors import ExecuTorchPredictor, OnnxPredictor, predict_proba
from runs.export_dir import ExportDir
from runs.run_folder import RunDir, resolve_model_path
from utils.device import select_device
from utils.errors import UserError

logger = logging.getLogger(__name__)

API_SCHEMA_VERSION = 1  # of the JSON the service answers; raised when a field changes meaning or goes away


class ImageRejected(ValueError):
    """An upload that is not a usable photo; its message is the reason given back to the client."""


@dataclass
class Decoded:
    tensor: torch.Tensor  # the classifier input, preprocessed as the run's eval transform does it
    data: bytes  # the upload, decoded again at overlay size for Grad-CAM


def _export_folder_model(folder: Path) -> Optional[Path]:
    """The classifier an export folder serves (INT8 when there is one), or None when ``folder`` is a run folder."""
    if (folder / RunDir.STATUS).is_file():
        return None
    export = ExportDir(folder)
    return next((path for path in (export.int8, export.fp32) if path.is_file()), None)


class ServedModel:
    """Decodes uploads, classifies batches of them and draws Grad-CAM overlays; not thread-safe: the service calls
    ``predict`` and ``explain`` from its one model thread."""

    def __init__(self, model_path: str | Path, options: AnswerOptions, explain: Optional[bool] = None,
                 threads: int = 0):
        folder = resolve_model_path(model_path)
        export_model = _export_folder_model(folder) if folder.is_dir() else None
        if export_model is not None and options.backend == "torch":
            logger.info("%s is an export folder (no PyTorch weights): serving %s with ONNX Runtime", folder,
                        export_model.name)
            options = dataclasses.replace(options, backend="onnx")
        if export_model is not None and (options.operating_point or options.abstain):
            raise UserError(f"--operating_point and --abstain choose thresholds on the run's held-out predictions, "
                            f"which the export folder {folder} does not hold (it serves the run's own thresholds); "
                            f"pass the run folder as --model_path, with --backend onnx --onnx_model FILE")
        if explain and export_model is not None:
            raise UserError(f"--explain needs the run's PyTorch weights, which the export folder {folder} does not "
                            f"hold; pass the run folder as --model_path (with --backend onnx --onnx_model FILE to "
                            f"classify with the exported file)")
        self.explains = export_model is None if explain is None else explain
        self.run_dir, self.info = open_run(folder, 1, options.topk, options)
        self.options = options
        self.device = select_device(options.device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.predictor, model = build_predictor(options, self.run_dir, self.info, self.device,
                                                torch_model=self.explains, default_onnx=export_model,
                                                threads=threads)
        self.model_file = (self.predictor.path if isinstance(self.predictor, (OnnxPredictor, ExecuTorchPredictor))
                           else RunDir(self.run_dir).checkpoint(options.weights, self.info.weights))
        self.tta = self.info.tta if options.tta is None else options.tta
        self.transform = build_eval_transform(self.info.preprocessing)
        self.min_side = decode_min_side(self.info.preprocessing) if options.reduced_decode else 0
        # Grad-CAM hooks record every forward pass of the model they sit on; a copy of its own keeps the prediction
        # forwards free of them (and of the memory they would hold between explanations).
        self.explainer = (GradCamExplainer(copy.deepcopy(model).eval(), options.cam_method,
                                           self.info.preprocessing.input_size) if self.explains else None)

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def decode(self, data: bytes) -> Decoded:
        """The classifier input of an uploaded file; raises ImageRejected with the reason for anything else."""
        if not data:
            raise ImageRejected("empty file")
        try:  # the transform too: an image that decodes but cannot be resized is refused like any other
            picture = load_rgb(io.BytesIO(data), min_side=self.min_side)
            return Decoded(self.transform(picture), data)
        except Exception as err:  # noqa: BLE001 - Pillow raises many types; each means "not a usable image"
            message = str(err).splitlines()[0] if str(err) else ""
            raise ImageRejected(f"{type(err).__name__}: {message}".rstrip(": ")) from err

    def predict(self, tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
        """One answer per input, in order: inference.py's prediction row (less the file name) with ``flag_<class>``
        and ``decision`` (the top class, or ``uncertain`` below the run's abstention threshold)."""
        probs = predict_proba(self.predictor, torch.stack(tensors), tta=self.tta, temperature=self.info.temperature)
        answers = []
        for p in probs:
            row = prediction_row("", p, self.class_names, self.options.topk)
            del row["filename"]
            row.update(flags_and_decision(p, self.class_names, self.info.operating_points, self.info.abstain))
            row.setdefault("decision", row["predicted_label"])
            answers.append(row)
        return answers

    def explain(self, decoded: Decoded, class_index: int, probability: float) -> bytes:
        """A PNG of the Grad-CAM of ``class_index`` over the photo (the model's crop marked), as inference.py draws it
        with --generate_gradcam."""
        if self.explainer is None:
            raise RuntimeError("this service was started without Grad-CAM")
        cam = self.explainer.explain(decoded.tensor[None].to(self.device), [class_index])[0]
        max_side = self.options.overlay_max_side
        picture = load_rgb(io.BytesIO(decoded.data), max_side=max_side)  # as inference.py's overlays are decoded
        overlay = explained_overlay(np.asarray(picture), cam, self.info.preprocessing,
                                    overlay_caption(self.class_names, class_index, probability), max_side or None)
        buffer = io.BytesIO()
        Image.fromarray(overlay).save(buffer, format="PNG")
        return buffer.getvalue()

    def describe(self) -> dict[str, Any]:
        """GET /v1/model: what a client needs to read the answers."""
        contract = self.info.to_dict()
        return {"schema_version": API_SCHEMA_VERSION, "model_name": self.info.model_name,
                "run_id": self.run_dir.name, "source_run": str(self.run_dir),
                "backend": self.options.backend, "model_file": str(self.model_file),
                "classes": self.class_names, "preprocessing": contract["preprocessing"], "tta": self.tta,
                "temperature": self.info.temperature, "operating_points": self.info.operating_points,
                "abstain": self.info.abstain, "explain": self.explains, "topk": self.options.topk}

    def close(self) -> None:
        if self.explainer is not None:
            self.explainer.close()
