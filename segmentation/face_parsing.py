"""Face parsers behind one interface: an RGB image in, a per-pixel label map plus the parser's label names out.

Backends:
    segformer  a SegFormer face parser through transformers (Hugging Face id or a local save_pretrained folder)
    onnx       the same parser exported by quantize_onnx_models.py, run with ONNX Runtime
    opencv     OpenCV's bundled Haar face detector + skin-colour thresholds: a heuristic fallback, no weights

Label names always come from the parser itself (``config.id2label`` or the ONNX metadata), never from a
hard-coded index list, so parsers with another label order (BiSeNet vs. SegFormer) cannot be mixed up.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
from PIL import Image

from configs import SEG_BACKENDS
from runs.export_dir import DEFAULT_EXPORT, ExportDir
from utils.errors import UserError
from utils.onnx_runtime import create_session

logger = logging.getLogger(__name__)

DEFAULT_SEGFORMER = "jonathandinu/face-parsing"
PROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_SEG_ONNX = DEFAULT_EXPORT.seg


class FaceParser(ABC):
    """``parse(rgb uint8 HxWx3) -> label map (HxW, uint8)``; ``id2label`` names each label value."""

    backend: str = ""
    id2label: dict[int, str] = {}

    @abstractmethod
    def parse(self, image: np.ndarray) -> np.ndarray:
        """The label map of ``image``."""

    def describe(self) -> dict[str, Any]:
        """What produced the masks; recorded in run folders so training and inference can be compared."""
        return {"seg_backend": self.backend}

    def face_detected(self, label_map: np.ndarray) -> Optional[bool]:
        """A detector's own verdict, or None where only the skin share decides (the parsers)."""
        return None


def _argmax_labels(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample (C, h, w) logits bilinearly to the image size, then take the arg-max (SegFormer's 1/4 output)."""
    channels_last = np.ascontiguousarray(np.transpose(logits, (1, 2, 0)), dtype=np.float32)
    if channels_last.shape[2] > 512:  # cv2.resize's channel limit
        raise UserError(f"face parser has {channels_last.shape[2]} labels; at most 512 are supported")
    resized = cv2.resize(channels_last, (width, height), interpolation=cv2.INTER_LINEAR)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    return resized.argmax(axis=2).astype(np.uint8)


def parser_preprocessing(processor: Any) -> dict[str, Any]:
    """The image processor's settings, stored in the ONNX file so the ONNX backend needs no transformers."""
    size = processor.size
    height = size["height"] if "height" in size else size.get("shortest_edge")
    width = size["width"] if "width" in size else size.get("shortest_edge")
    resample = getattr(processor, "resample", Image.Resampling.BILINEAR)
    return {"size": [int(height), int(width)], "resample": int(resample),
            "rescale_factor": float(processor.rescale_factor) if processor.do_rescale else 1.0,
            "mean": [float(v) for v in processor.image_mean] if processor.do_normalize else [0.0, 0.0, 0.0],
            "std": [float(v) for v in processor.image_std] if processor.do_normalize else [1.0, 1.0, 1.0]}


MAX_LABELS = 256
MAX_PARSER_SIDE = 2048


def _numbers(values: Any, count: int) -> bool:
    return (isinstance(values, list) and len(values) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values))


def parser_metadata(meta: dict[str, str], path: Path) -> tuple[dict[int, str], dict[str, Any]]:
    """``id2label`` and ``parser_preprocessing`` from a seg_model.onnx's metadata, checked: a hostile or damaged
    file (labels that are not names, a 60000x60000 input, std 0) is a one-line error, not a crash or a huge
    allocation."""
    def refuse(problem: str) -> UserError:
        return UserError(f"{path}: {problem}; export the face parser again with quantize_onnx_models.py")

    try:
        labels, pre = json.loads(meta["id2label"]), json.loads(meta["parser_preprocessing"])
    except ValueError as err:
        raise refuse(f"metadata is not JSON ({err})") from err
    if not isinstance(labels, dict) or not 0 < len(labels) <= MAX_LABELS:
        raise refuse(f"id2label must map up to {MAX_LABELS} label numbers to names")
    id2label = {}
    for key, name in labels.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(name, str) and 0 < len(name) <= 64
                and name.isprintable() and not any(ch in name for ch in "/\\")):
            raise refuse(f"id2label entry {key!r}: {name!r} is not a label number and a printable name without "
                         f"path separators")
        id2label[int(key)] = name
    if not isinstance(pre, dict):
        raise refuse("parser_preprocessing must be an object")
    size = pre.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 16 <= v <= MAX_PARSER_SIDE
                                                              for v in size)):
        raise refuse(f"parser_preprocessing size {size!r} must be [height, width] within 16..{MAX_PARSER_SIDE}")
    if pre.get("resample") not in {int(r) for r in Image.Resampling}:
        raise refuse(f"parser_preprocessing resample {pre.get('resample')!r} is not a Pillow resampling filter")
    if not (_numbers([pre.get("rescale_factor")], 1) and _numbers(pre.get("mean"), 3) and _numbers(pre.get("std"), 3)
            and all(v > 0 for v in pre["std"])):
        raise refuse("parser_preprocessing rescale_factor, mean and std must be numbers (three, std above 0)")
    return id2label, pre


def preprocess_for_parser(image: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """(1, 3, H, W) float32 the way SegformerImageProcessor does it: PIL resize, rescale, normalise."""
    height, width = pre["size"]
    resized = np.asarray(Image.fromarray(image).resize((width, height), resample=pre["resample"]), dtype=np.float32)
    scaled = resized * pre["rescale_factor"]
    normalised = (scaled - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None], dtype=np.float32)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or Path(ref).exists() or ref.count("/") > 1


def load_segformer(model_ref: str, revision: Optional[str] = None):
    """``(model, processor)`` from a local folder or a Hugging Face id; one-line error with the fixes otherwise."""
    from transformers import AutoImageProcessor, SegformerForSemanticSegmentation

    if _looks_like_path(model_ref) and not Path(model_ref).expanduser().is_dir():
        raise UserError(f"--seg_model {model_ref}: folder not found; pass a folder saved with save_pretrained() "
                        f"or a Hugging Face id such as {DEFAULT_SEGFORMER}")
    local = Path(model_ref).expanduser()
    ref = str(local) if local.is_dir() else model_ref
    if local.is_dir() and (local / "config.json").is_file() and not (local / PROCESSOR_FILE).is_file():
        # Without this check the processor's OSError reads like a missing download.
        raise UserError(f"--seg_model {model_ref}: the folder has the model but no {PROCESSOR_FILE} (the image "
                        f"processor's settings); save it beside the model with "
                        f"AutoImageProcessor.from_pretrained('{DEFAULT_SEGFORMER}').save_pretrained('{model_ref}') "
                        f"or copy the file from where the model came from")
    try:
        model = SegformerForSemanticSegmentation.from_pretrained(ref, revision=revision)
        processor = AutoImageProcessor.from_pretrained(ref, revision=revision)
    except OSError as err:
        raise UserError(
            f"cannot load the SegFormer face parser {model_ref!r} (offline and not in the Hugging Face cache?): "
            f"download it once while online, or pass --seg_model PATH to a local copy") from err
    except ValueError as err:  # a folder that holds another kind of model
        raise UserError(f"--seg_model {model_ref} is not a SegFormer semantic-segmentation model: "
                        f"{str(err).splitlines()[0]}") from err
    return model.eval(), processor


class _LogitParser(FaceParser):
    """A semantic-segmentation network: per-label logits at reduced resolution, arg-max at the image's size."""

    @abstractmethod
    def logits(self, image: np.ndarray) -> np.ndarray:
        """(labels, h, w) logits for ``image``."""

    def parse(self, image: np.ndarray) -> np.ndarray:
        return _argmax_labels(self.logits(image), image.shape[0], image.shape[1])


class SegformerParser(_LogitParser):
    backend = "segformer"

    def __init__(self, model_ref: str = DEFAULT_SEGFORMER, revision: Optional[str] = None, device: str = "cpu",
                 model: Any = None, processor: Any = None):
        import torch

        if model is None or processor is None:
            model, processor = load_segformer(model_ref, revision)
        self.torch = torch
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.model_ref = model_ref
        # from_pretrained records the commit it resolved, so a run can be traced to exact parser weights.
        self.revision = revision or getattr(model.config, "_commit_hash", None)
        self.id2label = {int(k): str(v) for k, v in model.config.id2label.items()}

    def logits(self, image: np.ndarray) -> np.ndarray:
        inputs = self.processor(images=image, return_tensors="pt")
        with self.torch.inference_mode():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        return out.logits[0].float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"seg_backend": self.backend, "seg_model": self.model_ref, "seg_revision": self.revision}


class OnnxParser(_LogitParser):
    backend = "onnx"

    def __init__(self, path: str | Path = DEFAULT_SEG_ONNX, device: str = "cpu", threads: int = 0):
        path = Path(path)
        self.session = create_session(path, device, threads, what="segmentation model",
                                      missing_hint="export it with quantize_onnx_models.py --skip_segmentation False, "
                                                   "or pass --seg_model FILE")
        meta = self.session.get_modelmeta().custom_metadata_map
        if "id2label" not in meta or "parser_preprocessing" not in meta:
            raise UserError(f"{path} has no id2label/parser_preprocessing metadata; export it with "
                            f"quantize_onnx_models.py")
        self.id2label, self.preprocessing = parser_metadata(meta, path)
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        self.source = meta.get("seg_model", "")
        self.revision = meta.get("seg_revision") or None

    def logits(self, image: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: preprocess_for_parser(image, self.preprocessing)})[0][0]

    def describe(self) -> dict[str, Any]:
        return {"seg_backend": self.backend, "seg_model": self.source or str(self.path),
                "seg_revision": self.revision}


class OpenCVSkinParser(FaceParser):
    """Heuristic: the largest Haar-detected face, widened to an ellipse, and YCrCb skin colour inside it.

    Labels: 0 background, 1 skin (skin-coloured pixels in the face ellipse), 2 face_other (the rest of the ellipse:
    eyes, brows, lips, hair, shadows). Needs no weights and works offline, but it misses profile faces and is fooled
    by skin-coloured backgrounds; prefer the SegFormer parser when it is available.
    """

    backend = "opencv"
    id2label = {0: "background", 1: "skin", 2: "face_other"}
    # Chai & Ngan's YCrCb skin box; wide enough for light and dark skin under indoor light.
    CR_RANGE = (133, 173)
    CB_RANGE = (77, 127)
    MAX_SPOT_SHARE = 0.005  # non-skin islands below this share of the face are lesions, not eyes or lips

    def __init__(self, device: str = "cpu"):
        cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if cascade_dir is None or not hasattr(cv2, "CascadeClassifier"):
            raise UserError("this OpenCV build has no Haar cascades (OpenCV 5 wheels dropped them); install "
                            "opencv-python-headless<5")
        self.cascade = cv2.CascadeClassifier(str(Path(cascade_dir) / "haarcascade_frontalface_default.xml"))
        if self.cascade.empty():
            raise UserError(f"cannot load haarcascade_frontalface_default.xml from {cascade_dir}; reinstall "
                            f"opencv-python-headless<5")

    def largest_face(self, image: np.ndarray) -> Optional[tuple[int, int, int, int]]:
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        side = max(24, int(0.15 * min(gray.shape)))
        faces = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
        return int(x), int(y), int(w), int(h)

    def parse(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        labels = np.zeros((height, width), np.uint8)
        face = self.largest_face(image)
        if face is None:
            return labels
        x, y, w, h = face
        # The Haar box runs from the brows to the mouth; the ellipse adds forehead and chin.
        ellipse = np.zeros_like(labels)
        center = (x + w // 2, y + int(0.45 * h))
        cv2.ellipse(ellipse, center, (int(0.55 * w), int(0.75 * h)), 0, 0, 360, 1, thickness=-1)
        ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
        skin = cv2.inRange(ycrcb, (0, self.CR_RANGE[0], self.CB_RANGE[0]), (255, self.CR_RANGE[1], self.CB_RANGE[1]))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        skin = cv2.morphologyEx(cv2.morphologyEx(skin, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel) > 0
        inside = ellipse > 0
        skin &= inside
        # Red papules and dark spots fall outside the skin-colour box, yet they are what the classifier must see:
        # small non-skin islands inside the face count as skin; eyes, brows and lips are larger and stay out.
        count, components, stats, _ = cv2.connectedComponentsWithStats((inside & ~skin).astype(np.uint8), 8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < self.MAX_SPOT_SHARE * inside.sum())
        small = small[small > 0]
        skin |= np.isin(components, small) & inside
        labels[inside] = 2
        labels[skin] = 1
        return labels

    def face_detected(self, label_map: np.ndarray) -> Optional[bool]:
        return bool(label_map.any())

    def describe(self) -> dict[str, Any]:
        return {"seg_backend": self.backend, "seg_model": "haarcascade_frontalface_default+ycrcb",
                "seg_revision": cv2.__version__}


def build_face_parser(backend: str, seg_model: Optional[str] = None, revision: Optional[str] = None,
                      device: str = "cpu") -> FaceParser:
    if backend == "segformer":
        try:
            return SegformerParser(seg_model or DEFAULT_SEGFORMER, revision, device)
        except UserError as err:  # the scripts that build parsers by backend also take the other backends
            raise UserError(f"{err}, or use --seg_backend onnx with an exported {ExportDir.SEG_NAME}, or "
                            f"--seg_backend opencv (heuristic, needs no weights)") from err
    if backend == "onnx":
        return OnnxParser(seg_model or DEFAULT_SEG_ONNX, device)
    if backend == "opencv":
        return OpenCVSkinParser()
    raise UserError(f"--seg_backend {backend!r} is not one of {', '.join(SEG_BACKENDS)}")


def label_palette(n_labels: int) -> np.ndarray:
    """Distinct colours per label (label 0, the background, black) for overlays."""
    rng = np.random.default_rng(7)
    palette = rng.integers(40, 256, size=(max(n_labels, 1), 3), dtype=np.uint8)
    palette[0] = 0
    return palette


def colour_overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    palette = label_palette(int(label_map.max()) + 1)
    coloured = palette[label_map]
    blended = image.astype(np.float32) * (1 - alpha) + coloured.astype(np.float32) * alpha
    keep = label_map == 0
    blended[keep] = image[keep]
    return blended.clip(0, 255).astype(np.uint8)
