"""Pixel-exact INT8 input: with one mean and std for all channels, every 8-bit pixel value is quantized exactly, the
first convolution's output is what it was, and the export reports and records it."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from configs import QuantOptions
from deploy import onnx_quant
from deploy.input_grid import align_input_grid, pixel_step
from deploy.onnx_export import export_fp32
from utils.onnx_runtime import read_onnx_metadata, session_with_outputs

SIDE = 12
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # EfficientNet-Lite's normalisation


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        return self.classifier(torch.relu(self.conv_stem(x)).mean((2, 3)))


def _photos(n: int, seed: int, mean=MEAN, std=STD) -> np.ndarray:
    """8-bit pixels normalised as the eval transform does; every batch holds a black and a white pixel, so the
    calibrated input range is the full pixel range."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 3, SIDE, SIDE))
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0, 255
    return ((pixels / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]).astype(np.float32)


def _int8(tmp_path: Path, images: np.ndarray) -> tuple[Path, Path]:
    """The stem model's FP32 graph prepared for quantization, and its every-node INT8 file."""
    export_fp32(_Stem().eval(), [3, SIDE, SIDE], tmp_path / "fp32.onnx", 17)
    prepped, int8 = tmp_path / "prepped.onnx", tmp_path / "int8.onnx"
    onnx_quant.prepare_for_quantization(tmp_path / "fp32.onnx", prepped)
    reader = onnx_quant.CalibrationReader(list(range(len(images))), lambda rows: images[rows])
    # 8-bit weights: the input's rounding, not the weights', is what these tests look at
    onnx_quant.quantize_int8(prepped, int8, reader, "minmax", target_cpu="vnni")
    return prepped, int8


def _dequantized_input_and_stem(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = onnx.load(str(path))
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    session = session_with_outputs(model, [stem.input[0], stem.output[0]])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images})))
    return values[stem.input[0]], values[stem.output[0]]


def test_every_pixel_value_is_quantized_exactly_and_the_stem_sees_what_fp32_sees(tmp_path):
    images = _photos(16, 0)
    prepped, int8 = _int8(tmp_path, images)
    aligned = tmp_path / "aligned.onnx"
    aligned.write_bytes(int8.read_bytes())
    assert align_input_grid(aligned, MEAN, STD)
    before, stem_before = _dequantized_input_and_stem(int8, images)
    after, stem_after = _dequantized_input_and_stem(aligned, images)
    step = pixel_step(MEAN, STD)
    # as calibrated, the grid rounds every pixel by half a step; moved, the input is the pixels plus the offset
    assert np.allclose(np.abs(before - images), step / 2, atol=1e-4 * step)
    np.testing.assert_allclose(after - images, step / 2, atol=1e-4 * step)
    # the bias takes the offset back: inside the borders the stem's output is FP32's on the same weights
    conv = _Stem().eval().conv_stem
    with torch.no_grad():
        fp32_stem = conv(torch.from_numpy(images)).numpy()
        offset_effect = np.abs(step / 2 * conv.weight.sum((1, 2, 3)).numpy()).max()
    inside = (slice(None), slice(None), slice(1, None), slice(1, None))  # no padded taps (top and left pad)
    error = stem_after - fp32_stem
    assert np.abs(error[inside].mean((0, 2, 3))).max() < 0.1 * offset_effect  # no drift left by the offset
    assert np.abs(error[inside]).mean() < 0.7 * np.abs(stem_before - fp32_stem)[inside].mean()


def test_nothing_changes_where_the_channels_are_normalised_differently(tmp_path):
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert pixel_step(*imagenet) is None
    _, int8 = _int8(tmp_path, _photos(8, 1, *imagenet))
    original = int8.read_bytes()
    assert not align_input_grid(int8, *imagenet)
    assert int8.read_bytes() == original


def test_the_export_reports_and_records_the_pixel_exact_input(tmp_path):
    model = _Stem().eval()
    export_fp32(model, [3, SIDE, SIDE], tmp_path / "fp32.onnx", 17)
    train, test = torch.from_numpy(_photos(24, 2)), torch.from_numpy(_photos(8, 3))
    with torch.no_grad():
        probs = model(test).softmax(1).numpy()
    reference = onnx_quant.ReferenceSet(test, probs.argmax(1), probs)
    data = onnx_quant.CalibrationData(list(range(len(train))), torch.empty(0), lambda rows: train[list(rows)],
                                      [i % 4 for i in range(len(train))], (MEAN, STD))
    for exact in (True, False):
        settings = QuantOptions(calib_images=24, keep_float_stages=0, min_agreement=0.0, pixel_exact_input=exact)
        target = tmp_path / f"int8-{exact}.onnx"
        report = onnx_quant.quantize_verified(tmp_path / "fp32.onnx", target, [], {}, settings, reference, data,
                                              timed=False)
        assert report["int8_input_on_pixel_grid"] is exact
        assert read_onnx_metadata(target)["input_on_pixel_grid"] == str(exact).lower()
        has_offset = any(n.op_type == "Add" for n in onnx.load(str(target)).graph.node)
        assert has_offset is exact
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        assert session.run(None, {session.get_inputs()[0].name: test.numpy()})[0].shape == (8, 4)
