"""The run-folder contract: ``class_info.json`` as a typed object, the only way code reads or writes that file.

Everything a consumer needs to rebuild the delivered model and its input lives here: the classes, the timm
architecture, the preprocessing, what kind of input it was trained on, and what the run decided after training
(which checkpoint is delivered, the calibration temperature, flip TTA). The ONNX metadata is produced from the same
object, so an exported file carries exactly what the run folder says.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from configs import INPUT_KINDS
from dataloaders.discovery import check_class_name
from dataloaders.transforms import EVAL_CROP_MODES, Preprocessing
from runs.run_folder import RunDir
from utils.atomic import atomic_write_json
from utils.errors import UserError

# Bump when a change would make an older reader misread the file; readers refuse files from a newer schema.
# Files without the key were written before it existed and are read as version 1.
SCHEMA_VERSION = 1
_REQUIRED = ("class_names", "model_name", "timm_model_name", "preprocessing")


@dataclass(frozen=True)
class RunInfo:
    class_names: list[str]
    model_name: str  # as the user asked for it (--model_name)
    timm_model_name: str  # what timm built
    preprocessing: Preprocessing
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_kind: str = "full_image"  # or "skin_region" (main.py --input_kind)
    skin_region: Optional[dict[str, Any]] = None  # the face parser and parts a skin-region run was trained with
    tta: bool = False  # the run was tested on the mean logits of the image and its mirror
    weights: str = RunDir.BEST_CKPT  # the delivered checkpoint: model_refit.pth after a refit
    temperature: float = 1.0  # divide logits by this before softmax (1.0 = not calibrated)
    calibration: Optional[dict[str, Any]] = None  # how the temperature was decided
    refit: Optional[dict[str, Any]] = None  # epochs and images of the refit on train + validation
    # Thresholds chosen on held-out predictions (evaluation.decisions): flag_<class> columns and the uncertain decision.
    operating_points: list[dict[str, Any]] = field(default_factory=list)
    abstain: Optional[dict[str, Any]] = None
    schema_version: int = SCHEMA_VERSION

    @property
    def n_class(self) -> int:
        return len(self.class_names)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def updated(self, **changes: Any) -> "RunInfo":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "schema_version": self.schema_version, "class_names": list(self.class_names),
            "class_to_idx": self.class_to_idx, "n_class": self.n_class, "model_name": self.model_name,
            "timm_model_name": self.timm_model_name, "model_kwargs": dict(self.model_kwargs),
            "preprocessing": self.preprocessing.to_dict(), "input_kind": self.input_kind, "tta": self.tta,
            "weights": self.weights, "temperature": self.temperature}
        for optional in ("skin_region", "calibration", "refit", "abstain"):
            if getattr(self, optional) is not None:
                values[optional] = getattr(self, optional)
        if self.operating_points:
            values["operating_points"] = list(self.operating_points)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = RunDir.CLASS_INFO) -> "RunInfo":
        """The contract, after checking every field's type and range (a hand-edited or damaged file is a one-line
        error naming the field, never a silently wrong answer)."""
        version = values.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UserError(f"{source} has schema_version {version!r}, newer than this skinclf reads "
                            f"({SCHEMA_VERSION}); update skinclf, or retrain the run with this version")
        missing = [key for key in _REQUIRED if key not in values]
        if missing:
            raise UserError(f"{source} has no {', '.join(map(repr, missing))}; it was not written by main.py "
                            f"(retrain with this version)")
        problem = contract_problem(values)
        if problem:
            raise UserError(f"{source}: {problem}; retrain the run or restore the file")
        try:
            return cls(class_names=[str(name) for name in values["class_names"]], model_name=values["model_name"],
                       timm_model_name=values["timm_model_name"],
                       preprocessing=Preprocessing.from_dict(values["preprocessing"]),
                       model_kwargs=dict(values.get("model_kwargs") or {}),
                       input_kind=values.get("input_kind", "full_image"), skin_region=values.get("skin_region"),
                       tta=bool(values.get("tta", False)), weights=values.get("weights", RunDir.BEST_CKPT),
                       temperature=float(values.get("temperature", 1.0)), calibration=values.get("calibration"),
                       refit=values.get("refit"), operating_points=list(values.get("operating_points") or []),
                       abstain=values.get("abstain"), schema_version=version)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source} is damaged ({type(err).__name__}: {err}); retrain or restore the file") from err

    def onnx_metadata(self, source_run: str | Path, precision: str) -> dict[str, str]:
        """The ONNX file's metadata_props: enough to preprocess, name the classes and calibrate without the run."""
        pre = self.preprocessing
        return {"class_names": json.dumps(self.class_names, ensure_ascii=False),
                "model_name": self.model_name, "timm_model_name": self.timm_model_name,
                "input_size": json.dumps(list(pre.input_size)), "mean": json.dumps(list(pre.mean)),
                "std": json.dumps(list(pre.std)), "interpolation": pre.interpolation, "crop_pct": str(pre.crop_pct),
                "crop_mode": pre.crop_mode, "source_run": str(source_run), "precision": precision,
                "output": "logits",
                # Divide the logits by this before softmax for calibrated probabilities (1.0 = not calibrated).
                "temperature": str(self.temperature),
                # "true": the run was tested on the mean logits of the image and its horizontal mirror
                # (inference.py's default for it); run the model on both and average before the temperature.
                "tta": str(self.tta).lower(), "schema_version": str(self.schema_version),
                # Clinical thresholds on the calibrated probabilities (see class_info.json): flag a class when its
                # probability >= "threshold"; answer "uncertain" when the top probability < abstain "threshold".
                "operating_points": json.dumps(self.operating_points, ensure_ascii=False),
                "abstain": json.dumps(self.abstain, ensure_ascii=False)}


# Interpolations timm's transforms accept, and the eval crop modes of dataloaders.transforms.EVAL_CROP_MODES.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "hamming", "box")
CROP_MODES = tuple(EVAL_CROP_MODES.values())
MAX_INPUT_SIDE = 4096
DELIVERABLE = (RunDir.BEST_CKPT, RunDir.REFIT_CKPT, RunDir.LAST_CKPT)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _threshold_problem(entries: Any, what: str) -> Optional[str]:
    for entry in entries:
        if not isinstance(entry, dict):
            return f"{what} entries must be objects"
        if "threshold" in entry and entry["threshold"] is not None and not (
                _is_number(entry["threshold"]) and 0 <= entry["threshold"] <= 1):
            return f"{what} threshold {entry['threshold']!r} must be a number in [0, 1]"
    return None


def contract_problem(values: dict[str, Any]) -> Optional[str]:
    """What is wrong with a class_info.json's values (the first problem), or None."""
    names = values.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        return f"class_names {names!r} must be a list of at least two names"
    if len(set(names)) != len(names):
        return "class_names has a name twice"
    for name in names:
        try:
            check_class_name(name, "class_names")
        except UserError as err:
            return str(err).split("; ")[0]
    for key in ("model_name", "timm_model_name"):
        if not isinstance(values.get(key), str) or not values[key]:
            return f"{key} {values.get(key)!r} must be a model name"
    kwargs = values.get("model_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, (int, float, str)))
                                               for k, v in kwargs.items()):
        return f"model_kwargs {kwargs!r} must map argument names to numbers or text"
    pre = values.get("preprocessing")
    if not isinstance(pre, dict):
        return "preprocessing must be an object"
    size = pre.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in size)
            and size[0] == 3 and all(16 <= v <= MAX_INPUT_SIDE for v in size[1:])):
        return f"preprocessing input_size {size!r} must be [3, height, width] with sides 16..{MAX_INPUT_SIDE}"
    for key, low in (("mean", None), ("std", 0.0)):
        vector = pre.get(key)
        if not (isinstance(vector, list) and len(vector) == 3 and all(_is_number(v) for v in vector)
                and (low is None or all(v > low for v in vector))):
            return f"preprocessing {key} {vector!r} must be three numbers" + (" above 0" if low is not None else "")
    if pre.get("interpolation") not in INTERPOLATIONS:
        return f"preprocessing interpolation {pre.get('interpolation')!r} is not one of {', '.join(INTERPOLATIONS)}"
    crop_pct = pre.get("crop_pct", 0.875)
    if crop_pct is not None and not (_is_number(crop_pct) and 0 < crop_pct <= 1):
        return f"preprocessing crop_pct {crop_pct!r} must be in (0, 1]"
    if pre.get("crop_mode", "center") not in CROP_MODES:
        return f"preprocessing crop_mode {pre.get('crop_mode')!r} is not one of {', '.join(CROP_MODES)}"
    if values.get("input_kind", "full_image") not in INPUT_KINDS:
        return f"input_kind {values.get('input_kind')!r} is not one of {', '.join(INPUT_KINDS)}"
    if not isinstance(values.get("tta", False), bool):
        return f"tta {values.get('tta')!r} must be true or false"
    if values.get("weights", RunDir.BEST_CKPT) not in DELIVERABLE:
        return f"weights {values.get('weights')!r} must name a checkpoint of the run ({', '.join(DELIVERABLE)})"
    temperature = values.get("temperature", 1.0)
    if not (_is_number(temperature) and 0.01 <= temperature <= 100):
        return f"temperature {temperature!r} must be a number in [0.01, 100]"
    points = values.get("operating_points") or []
    if not isinstance(points, list):
        return "operating_points must be a list"
    problem = _threshold_problem(points, "operating_points")
    if problem:
        return problem
    if any(p.get("class") not in names for p in points):
        return "operating_points name a class that is not in class_names"
    abstain = values.get("abstain")
    if abstain is not None and not isinstance(abstain, dict):
        return "abstain must be an object"
    if abstain is not None:
        return _threshold_problem([abstain], "abstain")
    return None


def read_run_info(folder: str | Path) -> RunInfo:
    """The ``class_info.json`` of a run folder (or of an export folder, which keeps a copy)."""
    path = Path(folder) / RunDir.CLASS_INFO
    if not path.is_file():
        raise UserError(f"{path} is missing; --model_path must be a run folder written by main.py")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a class_info.json written by main.py")
    return RunInfo.from_dict(values, str(path))


def write_run_info(folder: str | Path, info: RunInfo) -> None:
    atomic_write_json(Path(folder) / RunDir.CLASS_INFO, info.to_dict())
