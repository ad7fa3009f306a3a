"""The two further INT8 corrections benchmarks/int8_rounding_alternatives.py measures: learned weight rounding keeps a
layer's output closer to FP32 than rounding to nearest, and the layer-by-layer mean correction removes a drift."""

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from benchmarks.int8_rounding_alternatives import _quantized_nodes, adaround, sequential_mean
from deploy import onnx_quant
from deploy.onnx_export import export_fp32
from tests.test_bias_correction import _DriftNet  # a stem whose weights all round the same way
from utils.onnx_runtime import session_with_outputs

SIDE = 12


class _OutlierStem(nn.Module):
    """A stem whose every output channel has one large weight that sets its int8 step, the others a few steps or
    fractions of one (so their rounding error outweighs the input's), then pooling and a classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_stem = nn.Conv2d(4, 16, 3, padding=1)
        self.classifier = nn.Linear(16, 3)
        with torch.no_grad():
            self.conv_stem.weight.normal_(0, 2.0 / 127)
            self.conv_stem.weight[:, 0, 1, 1] = 1.0

    def forward(self, x):
        return self.classifier(self.conv_stem(x).mean((2, 3)))


def _images(n: int, channels: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(n, channels, SIDE, SIDE, generator=generator)).numpy()


def _quantized(model: nn.Module, images: np.ndarray, work):
    export_fp32(model.eval(), list(images.shape[1:]), work / "fp32.onnx", 17)
    prepped, int8 = work / "prepped.onnx", work / "int8.onnx"
    onnx_quant.prepare_for_quantization(work / "fp32.onnx", prepped)
    reader = onnx_quant.CalibrationReader(list(range(len(images))), lambda rows: images[rows])
    onnx_quant.quantize_int8(prepped, int8, reader, "minmax")
    return onnx.load(str(prepped)), onnx.load(str(int8))


def _logits(model, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _tensor(model, name: str, images: np.ndarray) -> np.ndarray:
    session = session_with_outputs(model, [name])
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(None, {session.get_inputs()[0].name: images})))[name]


def test_learned_rounding_moves_weights_by_at_most_one_step_and_brings_the_output_closer_to_fp32(tmp_path):
    calib = _images(24, 4, 0)
    fp32, int8 = _quantized(_OutlierStem(), calib, tmp_path)
    tuned, layer_errors = adaround(fp32, int8, calib, positions=16, steps=150, rounding_weight=0.01)
    assert layer_errors["layer_error_learned"] < 0.5 * layer_errors["layer_error_nearest"]
    nodes = _quantized_nodes(fp32, int8)
    assert len(nodes) == 2  # the stem and the classifier's Gemm run in INT8
    before = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    changed = 0
    for node in nodes:
        name = node.weight_dq.input[0]
        step = np.abs(after[name].astype(int) - before[name].astype(int))
        assert step.max() <= 1  # each weight is rounded down or up, never further
        changed += int(step.sum())
    assert changed > 0
    # In the file itself, the stem's output (before its own rounding) is closer to FP32's. Its error is compared
    # around each channel's mean: the mean is what bias correction takes out (the benchmark starts from corrected
    # files), and here it is the same drift in both files.
    stem = nodes[0]
    reference = _tensor(fp32, stem.fp32.output[0], calib)
    errors = {}
    for name, model in (("learned", tuned), ("nearest", int8)):
        error = _tensor(model, stem.int8.output[0], calib) - reference
        errors[name] = float(((error - error.mean((0, 2, 3), keepdims=True)) ** 2).mean())
    assert errors["learned"] < 0.8 * errors["nearest"]  # (0.7 here: the input's rounding stays)


def test_the_layer_by_layer_mean_correction_removes_the_drift_of_the_logits(tmp_path):
    calib = _images(32, 3, 1)
    fp32, int8 = _quantized(_DriftNet(), calib, tmp_path)
    reference = _logits(fp32, calib)
    drift = np.abs((_logits(int8, calib) - reference).mean(0)).max()
    corrected = sequential_mean(fp32, int8, calib, linear_only=False)
    assert drift > 0.02
    assert np.abs((_logits(corrected, calib) - reference).mean(0)).max() < drift / 5
    # only biases change: the int8 weights are the file's own
    weights = {node.weight_dq.input[0] for node in _quantized_nodes(fp32, int8)}
    for original, new in zip(int8.graph.initializer, corrected.graph.initializer):
        if original.name in weights:
            np.testing.assert_array_equal(numpy_helper.to_array(original), numpy_helper.to_array(new))
