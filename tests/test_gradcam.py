"""Grad-CAM: the right layer for every supported model, and explanations that point at the lesion."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from data.synthetic_lesions import generate_dataset, mask_path_for
from dataloaders.image_io import load_rgb
from dataloaders.transforms import Preprocessing, build_eval_transform, eval_crop_box
from prediction.gradcam import GradCamExplainer, cam_on_original, find_target_layer
from runs.checkpoint import load_run_model
from torch_trainer.models import SUPPORTED_MODELS, build_model


@pytest.mark.parametrize("name", sorted(SUPPORTED_MODELS))
def test_target_layer_is_the_last_spatial_stage(name):
    model, _ = build_model(name, n_class=3, pre_trained=False)
    layer = find_target_layer(model.eval(), (3, 64, 64))
    if name.startswith("resnet"):
        assert layer is model.layer4
    elif name.startswith("mobilenet_v3"):
        assert layer is model.blocks[-1]  # MobileNetV3's conv_head comes after global pooling
    else:
        assert layer is model.conv_head
    with GradCamExplainer(model, "gradcam", (3, 64, 64)) as explainer:
        cams = explainer.explain(torch.randn(2, 3, 64, 64), [0, 2])
        assert explainer.cam.activations_and_grads.handles  # hooks are live while in use
    assert cams.shape == (2, 64, 64) and np.isfinite(cams).all()
    assert not explainer.cam.activations_and_grads.handles  # and released afterwards


def test_crop_box_matches_the_eval_transform():
    pre = Preprocessing(input_size=(3, 224, 224), crop_pct=0.875, crop_mode="center", interpolation="bilinear",
                        mean=(0.5,) * 3, std=(0.5,) * 3)
    # 224 / floor(224 / 0.875) = 224 / 256 of the shorter side is kept, centred
    assert eval_crop_box(512, 256, pre) == (144, 16, 368, 240)
    cam = np.ones((224, 224), np.float32)
    full = cam_on_original(cam, (512, 256), pre)
    assert full.shape == (256, 512) and full[:, :144].sum() == 0 and full[16:240, 144:368].min() == 1


@pytest.mark.slow
def test_gradcam_points_at_the_lesion(tmp_path):
    root = generate_dataset(tmp_path / "lesions", n_train=40, n_test=12, img_size=128, seed=1)
    result = main.main(main.parse_args([
        "--data_dir", str(root), "--data_name", "cam", "--model_name", "efficientnet_lite0", "--pre_trained", "True",
        "--epochs", "2", "--img_size", "128", "--batch_size", "16", "--lr_ae", "0.0005", "--optimizer", "adamw",
        "--num_workers", "0", "--save_dir", str(tmp_path / "runs")]))
    assert result["test_metrics"]["balanced_accuracy"] >= 0.8
    model, info = load_run_model(result["run_dir"])
    transform = build_eval_transform(info.preprocessing)
    lesion_images = sorted((root / "testset" / "benign").glob("*.jpg")) + \
        sorted((root / "testset" / "malignant").glob("*.jpg"))
    images = torch.stack([transform(load_rgb(p)) for p in lesion_images])
    with torch.inference_mode():
        predicted = model(images).argmax(1).tolist()
    with GradCamExplainer(model, "gradcam", info.preprocessing.input_size) as explainer:
        cams = explainer.explain(images, predicted)
    ratios = []
    for cam, path in zip(cams, lesion_images):
        heat = cam_on_original(cam, (128, 128), info.preprocessing)
        lesion = np.asarray(Image.open(mask_path_for(Path(path), root))) > 0
        ratios.append(heat[lesion].mean() / max(heat[~lesion].mean(), 1e-6))
    ratios = np.array(ratios)
    assert (ratios >= 1.5).mean() >= 0.75, np.round(ratios, 2)


def test_overlay_dims_what_the_crop_removed_outlines_the_crop_and_names_the_answer():
    from prediction.gradcam import explained_overlay, overlay_caption

    pre = Preprocessing(input_size=(3, 224, 224), crop_pct=0.875, crop_mode="center", interpolation="bilinear",
                        mean=(0.5,) * 3, std=(0.5,) * 3)
    photo = np.full((256, 512, 3), 200, np.uint8)  # a portrait-free wide photo: the crop keeps (144, 16)-(368, 240)
    cam = np.zeros((224, 224), np.float32)
    caption = overlay_caption(["benign", "malignant"], 1, 0.913)
    assert caption == "malignant 0.91"
    overlay = explained_overlay(photo, cam, pre, caption=None)
    outside, inside = overlay[128, 20], overlay[128, 256]
    # Outside the crop: the photo dimmed, not painted with the colour map's cold blue.
    assert abs(int(outside[0]) - int(outside[2])) <= 2 and outside.max() < 120
    assert inside[2] > inside[0]  # inside: the (zero) heat blended in, blue on JET
    assert (overlay[100, 144] >= 250).all() and (overlay[100, 140] < 120).all()  # the crop's white outline
    labelled = explained_overlay(photo, cam, pre, caption=caption)
    assert (labelled[2:6, 2:30] == 0).any() and (labelled[:30, :120] >= 250).any()  # a dark band with white text
    assert overlay_caption(["양성", "악성"], 1, 0.5) == "class 1 0.50"  # the bundled font has no Hangul
