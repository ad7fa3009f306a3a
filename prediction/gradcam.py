"""Grad-CAM explanations through pytorch-grad-cam: target-layer choice for timm CNNs and overlays on the original.

The heat-map is computed on the model's input (the resized, centre-cropped view) and placed back onto the original
photo at its own aspect ratio, so the overlay shows where on the *original* the model looked; the border that the
centre crop removed is dimmed and the crop outlined, and the overlay names the class it explains.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from dataloaders.transforms import eval_crop_box
from utils.errors import UserError
from utils.paths import fit_file_name

if TYPE_CHECKING:
    from runs.run_info import RunInfo

logger = logging.getLogger(__name__)

GRADCAM_SUFFIX = ".gradcam.jpg"  # appended to the input's relative path, so names in sub-folders never collide

# The methods of pytorch-grad-cam that work on a CNN's last feature map.
# The pytorch-grad-cam class of each --cam_method (configs.CAM_METHODS).
CAM_CLASSES = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
}


def _spatial_output(model: torch.nn.Module, layer: torch.nn.Module, input_size: tuple[int, int, int]) -> bool:
    """Whether ``layer`` yields a feature map with height and width > 1 (not a pooled vector)."""
    shapes = []
    handle = layer.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        handle.remove()
    return bool(shapes) and len(shapes[-1]) == 4 and shapes[-1][2] > 1 and shapes[-1][3] > 1


def find_target_layer(model: torch.nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> torch.nn.Module:
    """The last feature stage of a timm CNN.

    ``conv_head`` for EfficientNet/MobileNetV2-style models, ``layer4`` for ResNets, and otherwise the last entry of
    timm's ``feature_info``. MobileNetV3's ``conv_head`` comes after global pooling (a 1x1 map), so every candidate
    is checked to still have spatial extent.
    """
    candidates: list[torch.nn.Module] = []
    if hasattr(model, "conv_head") and isinstance(model.conv_head, torch.nn.Conv2d):
        candidates.append(model.conv_head)
    if hasattr(model, "layer4"):
        candidates.append(model.layer4)
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        last = feature_info[-1] if isinstance(feature_info, list) else feature_info.info[-1]
        candidates.append(model.get_submodule(last["module"]))
    was_training = model.training
    model.eval()
    try:
        for layer in candidates:
            if _spatial_output(model, layer, input_size):
                return layer
    finally:
        model.train(was_training)
    raise UserError(f"cannot find a spatial feature layer for Grad-CAM in {type(model).__name__}; "
                    f"run without --generate_gradcam")


class GradCamExplainer:
    """Batched CAMs for given class indices; use as a context manager so the hooks are released."""

    def __init__(self, model: torch.nn.Module, method: str = "gradcam",
                 input_size: tuple[int, int, int] = (3, 224, 224)):
        if method not in CAM_CLASSES:
            raise UserError(f"--cam_method {method!r} is not one of {', '.join(CAM_CLASSES)}")
        self.target_layer = find_target_layer(model, input_size)
        self.target_name = next(name for name, module in model.named_modules() if module is self.target_layer)
        self.cam = CAM_CLASSES[method](model=model, target_layers=[self.target_layer])

    def __enter__(self) -> "GradCamExplainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the forward/backward hooks from the model."""
        self.cam.activations_and_grads.release()

    def explain(self, images: torch.Tensor, class_indices: list[int]) -> np.ndarray:
        """Return CAMs of shape (B, H, W) in [0, 1], at the input's resolution."""
        targets = [ClassifierOutputTarget(int(c)) for c in class_indices]
        with torch.enable_grad():
            return self.cam(input_tensor=images, targets=targets)


def cam_on_original(cam: np.ndarray, original_size: tuple[int, int], preprocessing: dict) -> np.ndarray:
    """Place a model-input CAM onto the original image grid (H, W); outside the centre crop it is 0."""
    width, height = original_size
    left, top, right, bottom = eval_crop_box(width, height, preprocessing)
    full = np.zeros((height, width), np.float32)
    box_w, box_h = max(right - left, 1), max(bottom - top, 1)
    resized = cv2.resize(cam.astype(np.float32), (box_w, box_h), interpolation=cv2.INTER_LINEAR)
    # The crop box may stick out of the image by rounding; copy the overlapping part only.
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(right, width), min(bottom, height)
    full[y0:y1, x0:x1] = resized[y0 - top:y1 - top, x0 - left:x1 - left]
    return full


def render_overlay(original_rgb: np.ndarray, cam_full: np.ndarray, alpha: float = 0.45,
                   max_side: Optional[int] = 1024, crop_box: Optional[tuple[int, int, int, int]] = None,
                   caption: Optional[str] = None) -> np.ndarray:
    """JET heat-map blended onto the original (uint8 RGB); very large photos are scaled down for the file.

    With ``crop_box`` (what the eval transform kept) the heat is painted inside it only, the rest of the photo is
    dimmed and the box is outlined: the model never saw that part, and a cold-blue border would read as a finding.
    ``caption`` ("malignant 0.91") is written in a band at the top left."""
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(cam_full, 0, 1)), cv2.COLORMAP_JET)[..., ::-1]
    photo = original_rgb.astype(np.float32)
    overlay = photo * (1 - alpha) + heat.astype(np.float32) * alpha
    if crop_box is not None:
        height, width = original_rgb.shape[:2]
        left, top, right, bottom = max(crop_box[0], 0), max(crop_box[1], 0), min(crop_box[2], width), \
            min(crop_box[3], height)
        seen = overlay[top:bottom, left:right].copy()
        overlay = photo * 0.45
        overlay[top:bottom, left:right] = seen
    overlay = overlay.astype(np.uint8)
    scale = 1.0
    if max_side and max(overlay.shape[:2]) > max_side:
        scale = max_side / max(overlay.shape[:2])
        overlay = cv2.resize(overlay, (round(overlay.shape[1] * scale), round(overlay.shape[0] * scale)),
                             interpolation=cv2.INTER_AREA)
    if crop_box is None and caption is None:
        return overlay
    side = max(overlay.shape[:2])
    picture = Image.fromarray(overlay)
    draw = ImageDraw.Draw(picture)
    if crop_box is not None and (left, top, right, bottom) != (0, 0, width, height):
        line = max(1, round(side / 300))
        draw.rectangle([round(left * scale), round(top * scale), round(right * scale) - 1, round(bottom * scale) - 1],
                       outline=(255, 255, 255), width=line)
    if caption:
        font = ImageFont.load_default(size=max(10, round(side / 22)))
        x0, y0, x1, y1 = draw.textbbox((0, 0), caption, font=font)
        pad = max(2, round(side / 120))
        draw.rectangle([0, 0, x1 + 2 * pad, y1 + 2 * pad], fill=(0, 0, 0))
        draw.text((pad, pad), caption, fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def overlay_caption(class_names: list[str], class_index: int, probability: float) -> str:
    """"malignant 0.91": what the overlay explains. The bundled font has Latin letters only, so a class name in
    another script is written as its index (the file name and predictions.csv carry the name)."""
    name = class_names[class_index]
    return f"{name if name.isascii() and name.isprintable() else f'class {class_index}'} {probability:.2f}"


def explained_overlay(original_rgb: np.ndarray, cam: np.ndarray, preprocessing, caption: Optional[str],
                      max_side: Optional[int] = 1024) -> np.ndarray:
    """The overlay every writer saves: the model-input CAM put back on the photo, the crop marked, the answer written."""
    size = (original_rgb.shape[1], original_rgb.shape[0])
    return render_overlay(original_rgb, cam_on_original(cam, size, preprocessing), max_side=max_side,
                          crop_box=eval_crop_box(*size, preprocessing), caption=caption)


def save_gradcam_examples(model: torch.nn.Module, samples, info: "RunInfo", image_decoder, folder: Path,
                          max_side: Optional[int] = 1024,
                          answers: Optional[list[tuple[int, float]]] = None) -> list[Path]:
    """Grad-CAM overlays of a few test images (for W&B and report.html), longer side at most ``max_side``; a model
    without a usable layer just gets none. ``answers`` (class, probability) per sample: the run's delivered answer
    (TTA and temperature included), which the overlay explains and names; without it, the model's plain answer."""
    from dataloaders.transforms import build_eval_transform
    from utils.atomic import atomic_save

    transform = build_eval_transform(info.preprocessing)
    device = next(model.parameters()).device
    try:
        explainer = GradCamExplainer(model, "gradcam", info.preprocessing.input_size)
    except Exception as err:  # noqa: BLE001 - an explanation is a nice-to-have at the end of training
        logger.warning("no Grad-CAM examples: %s", err)
        return []
    paths = []
    try:
        for sample, answer in zip(samples, answers or [None] * len(samples)):
            picture = image_decoder(sample.path)
            batch = transform(picture).unsqueeze(0).to(device)
            if answer is None:
                with torch.no_grad():
                    probs = torch.softmax(model(batch).float(), 1)[0]
                predicted, probability = int(probs.argmax()), float(probs.max())
            else:
                predicted, probability = answer
            cam = explainer.explain(batch, [predicted])[0]
            overlay = explained_overlay(np.asarray(picture), cam, info.preprocessing,
                                        overlay_caption(info.class_names, predicted, probability), max_side)
            target = folder / fit_file_name(f"{sample.path.stem}_true-{info.class_names[sample.label]}_pred-"
                                            f"{info.class_names[predicted]}", ".jpg")
            atomic_save(target, lambda tmp: Image.fromarray(overlay).save(tmp, format="JPEG", quality=90))
            paths.append(target)
    finally:
        explainer.close()
    return paths
