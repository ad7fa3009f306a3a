"""INT8 bias correction: the mean shift that rounding a layer's weights causes is measured and taken out of its bias,
for the nodes that run in INT8 only."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from configs import QuantOptions
from deploy import onnx_quant
from deploy.bias_correction import dequantized_weights, weight_rounding_shifts, write_corrected
from deploy.onnx_export import export_fp32
from utils.onnx_runtime import read_onnx_metadata

N_CLASS = 4
SIDE = 16


class _DriftNet(nn.Module):
    """A stem whose weights all round the same way: in each output channel one large weight sets the int8 step and
    the others sit at 0.4 of a step, so INT8 drops them all and every output channel's mean moves; then pooling and
    a classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_stem = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Linear(8, N_CLASS)
        with torch.no_grad():
            self.conv_stem.weight.fill_(0.4 / 127)
            for channel in range(8):
                self.conv_stem.weight[channel, channel % 3, channel % 3, (channel + 1) % 3] = 1.0

    def forward(self, x):
        return self.classifier(self.conv_stem(x).mean((2, 3)))


class _StridedDepthwise(nn.Module):
    """Asymmetric padding before a strided depthwise convolution (as timm's TF-"same" models export), then a
    pointwise one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv_dw = nn.Conv2d(6, 6, 3, stride=2, groups=6)
        self.conv_pw = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.conv_pw(self.conv_dw(self.pad(x)))


def _positive_images(n: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(n, channels, SIDE, SIDE, generator=generator)


def _data(train: torch.Tensor) -> onnx_quant.CalibrationData:
    return onnx_quant.CalibrationData(list(range(len(train))), torch.empty(0), lambda rows: train[list(rows)],
                                      [i % N_CLASS for i in range(len(train))])


def _logits(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def _all_int8(model: nn.Module, images: torch.Tensor, work: Path) -> tuple[Path, Path]:
    """The model's FP32 graph prepared for quantization, and its every-node INT8 file calibrated on ``images``."""
    export_fp32(model, list(images.shape[1:]), work / "fp32.onnx", 17)
    prepped, int8 = work / "prepped.onnx", work / "int8.onnx"
    onnx_quant.prepare_for_quantization(work / "fp32.onnx", prepped)
    reader = onnx_quant.CalibrationReader(list(range(len(images))), lambda rows: images[rows].numpy())
    onnx_quant.quantize_int8(prepped, int8, reader, "minmax")
    return prepped, int8


@pytest.fixture(autouse=True)
def no_latency_timing(monkeypatch):
    monkeypatch.setattr(onnx_quant, "compare_latency", lambda paths, *args, **kwargs: [1.0] * len(paths))


def test_bias_correction_takes_out_the_mean_shift_that_rounding_the_weights_causes(tmp_path):
    model = _DriftNet().eval()
    export_fp32(model, [3, SIDE, SIDE], tmp_path / "fp32.onnx", 17)
    train, test = _positive_images(32, 3, 0), _positive_images(24, 3, 1)
    with torch.no_grad():
        probs = model(test).softmax(1).numpy()
    reference = onnx_quant.ReferenceSet(test, probs.argmax(1), probs)
    drift = {}
    for corrected in (False, True):
        settings = QuantOptions(calib_images=32, keep_float_stages=0, min_agreement=0.0, bias_correction=corrected)
        target = tmp_path / f"int8-{corrected}.onnx"
        report = onnx_quant.quantize_verified(tmp_path / "fp32.onnx", target, [], {}, settings, reference,
                                              _data(train))
        # the stem and the classifier (a Gemm) are corrected; nothing without the option
        assert report["int8_bias_corrected"] == (2 if corrected else 0)
        assert read_onnx_metadata(target)["bias_corrected_nodes"] == str(report["int8_bias_corrected"])
        drift[corrected] = np.abs((_logits(target, test) - _logits(tmp_path / "fp32.onnx", test)).mean(0)).max()
    assert drift[False] > 0.02  # the rounding moves the logits' mean
    assert drift[True] < drift[False] / 5


def test_the_measured_shift_is_the_mean_output_change_of_the_rounded_weights(tmp_path):
    # Padding, stride and groups as ONNX Runtime runs them: the shift equals the mean change of each layer's output
    # when only its weights are replaced by the rounded ones (the layers are linear in their weights).
    model = _StridedDepthwise().eval()
    images = _positive_images(20, 6, 2)
    prepped, int8 = _all_int8(model, images, tmp_path)
    shifts = weight_rounding_shifts(prepped, int8, (images[i:i + 8].numpy() for i in range(0, 20, 8)))
    rounded = dequantized_weights(int8)
    assert len(shifts) == 2
    for name, shift in shifts.items():
        layer = model.conv_dw if "conv_dw" in name else model.conv_pw
        inputs = model.pad(images) if layer is model.conv_dw else model.conv_dw(model.pad(images))
        with torch.no_grad():
            change = nn.functional.conv2d(inputs.double(), torch.from_numpy(rounded[name]) - layer.weight.double(),
                                          None, layer.stride, 0, layer.dilation, layer.groups)
        np.testing.assert_allclose(shift, change.mean((0, 2, 3)).numpy(), rtol=1e-6, atol=1e-9)
        assert np.abs(shift).max() > 0


def test_a_node_kept_in_fp32_keeps_its_own_bias(tmp_path):
    images = _positive_images(16, 3, 3)
    prepped, int8 = _all_int8(_DriftNet().eval(), images, tmp_path)
    shifts = weight_rounding_shifts(prepped, int8, [images.numpy()])
    stem = next(name for name in shifts if "conv_stem" in name)
    classifier = next(name for name in shifts if name != stem)

    def biases(path: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(path)).graph
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        return {node.name: constants[node.input[2]] for node in graph.node if node.name in shifts}

    original = biases(prepped)
    assert write_corrected(prepped, tmp_path / "corrected.onnx", shifts, keep_float=[stem]) == 1
    corrected = biases(tmp_path / "corrected.onnx")
    np.testing.assert_array_equal(corrected[stem], original[stem])
    np.testing.assert_allclose(corrected[classifier], original[classifier] - shifts[classifier], rtol=1e-6)
    # the stem's 26 dropped weights per channel at 0.4 of a step, on inputs of mean 1: about -0.08 per channel
    assert np.all(shifts[stem] < -0.05)
