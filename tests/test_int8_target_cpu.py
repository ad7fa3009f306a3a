"""INT8 that answers the same on every x86 CPU (--int8_target_cpu any): x86 CPUs without VNNI multiply uint8
activations by int8 weights with VPMADDUBSW, which adds each pair of products in 16 bits and saturates; 7-bit weights
cannot overflow it. Depthwise convolutions run on a kernel that adds in 32 bits and keep 8 bits."""

import logging
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
from deploy.bias_correction import dequantized_weights
from deploy.onnx_export import export_fp32
from deploy.qat import SEVEN_BIT_WEIGHT_QMAX, WEIGHT_QMAX, simulated_int8
from prediction import predictors
from utils.cpu import int8_pairs_saturate
from utils.onnx_runtime import read_onnx_metadata

SIDE = 8


class _Blocks(nn.Module):
    """A stem, a depthwise and a pointwise convolution and a classifier: the layer kinds of an EfficientNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv_dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv_pw = nn.Conv2d(32, 32, 1)
        self.classifier = nn.Linear(32, 4)
        with torch.no_grad():  # every weight of the pointwise conv large: the pairs the kernel adds can overflow
            self.conv_pw.weight.copy_(0.5 + 0.5 * torch.rand_like(self.conv_pw.weight))

    def forward(self, x):
        x = torch.relu(self.conv_stem(x))
        x = torch.relu(self.conv_pw(torch.relu(self.conv_dw(x))))
        return self.classifier(x.mean((2, 3)))


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 3, SIDE, SIDE)).astype(np.float32)


def _quantized(tmp_path: Path, target_cpu: str) -> Path:
    export_fp32(_Blocks().eval(), [3, SIDE, SIDE], tmp_path / "fp32.onnx", 17)
    prepped, int8 = tmp_path / "prepped.onnx", tmp_path / f"int8-{target_cpu}.onnx"
    onnx_quant.prepare_for_quantization(tmp_path / "fp32.onnx", prepped)
    images = _images(16, 0)
    reader = onnx_quant.CalibrationReader(list(range(len(images))), lambda rows: images[rows])
    onnx_quant.quantize_int8(prepped, int8, reader, "minmax", target_cpu=target_cpu)
    return int8


def _weight_ranges(path: Path) -> dict[str, int]:
    """Largest |integer| of each Conv/Gemm weight in a QDQ file, by the layer's name."""
    model = onnx.load(str(path))
    ints = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    ranges = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dequantize = producers[node.input[1]]
            ranges[node.name] = int(np.abs(ints[dequantize.input[0]].astype(np.int32)).max())
    return ranges


def _run(path: Path, images: np.ndarray, fused: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not fused:  # QuantizeLinear / DequantizeLinear / float Conv one by one: what the file means, on any CPU
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def test_any_cpu_gives_the_matrix_kernels_seven_bit_weights_and_keeps_depthwise_at_eight(tmp_path):
    any_cpu, vnni = _weight_ranges(_quantized(tmp_path, "any")), _weight_ranges(_quantized(tmp_path, "vnni"))
    depthwise = [name for name in any_cpu if "conv_dw" in name]
    assert len(depthwise) == 1 and len(any_cpu) == 4
    for name, largest in any_cpu.items():
        # 255 x (64 + 64) = 32640 fits int16: no pair of products can overflow
        assert largest == (WEIGHT_QMAX if name in depthwise else SEVEN_BIT_WEIGHT_QMAX), name
    assert set(vnni.values()) == {WEIGHT_QMAX}


def test_the_any_cpu_file_computes_what_it_means_with_this_cpus_kernels(tmp_path):
    """On every CPU: its fused INT8 kernels give the answer of its QDQ graph read operation by operation. Bright
    inputs (uint8 near 255) against the large pointwise weights are where saturating kernels would differ."""
    path = _quantized(tmp_path, "any")
    bright = np.clip(_images(8, 1) + 0.6, 0, 1).astype(np.float32)
    fused, reference = _run(path, bright, True), _run(path, bright, False)
    assert np.abs(fused - reference).max() <= 1e-3 * np.abs(reference).max()


@pytest.mark.skipif(not int8_pairs_saturate(), reason="this CPU has VNNI (or is not x86): its kernels do not saturate")
def test_on_a_cpu_without_vnni_eight_bit_weights_saturate(tmp_path):
    """Why --int8_target_cpu any is the default: here the 8-bit file's fused kernels answer differently."""
    path = _quantized(tmp_path, "vnni")
    bright = np.clip(_images(8, 1) + 0.6, 0, 1).astype(np.float32)
    fused, reference = _run(path, bright, True), _run(path, bright, False)
    assert np.abs(fused - reference).max() > 0.05 * np.abs(reference).max()


def test_the_export_records_the_target_and_inference_warns_about_eight_bit_files_on_saturating_cpus(
        tmp_path, monkeypatch, caplog):
    model = _Blocks().eval()
    export_fp32(model, [3, SIDE, SIDE], tmp_path / "fp32.onnx", 17)
    train, test = torch.from_numpy(_images(24, 2)), torch.from_numpy(_images(8, 3))
    with torch.no_grad():
        probs = model(test).softmax(1).numpy()
    reference = onnx_quant.ReferenceSet(test, probs.argmax(1), probs)
    data = onnx_quant.CalibrationData(list(range(len(train))), torch.empty(0), lambda rows: train[list(rows)],
                                      [i % 4 for i in range(len(train))], None)
    monkeypatch.setattr(predictors, "int8_pairs_saturate", lambda: True)
    for target_cpu in ("any", "vnni"):
        target = tmp_path / f"int8-{target_cpu}.onnx"
        report = onnx_quant.quantize_verified(tmp_path / "fp32.onnx", target, [], {"precision": "fp32"},
                                              QuantOptions(calib_images=24, keep_float_stages=0, min_agreement=0.0,
                                                           int8_target_cpu=target_cpu), reference, data, timed=False)
        assert report["int8_target_cpu"] == target_cpu and report["int8_checked_on_cpu"]
        assert read_onnx_metadata(target)["int8_target_cpu"] == target_cpu
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prediction.predictors"):
            predictors.OnnxPredictor(target, 4, torch.device("cpu"))
        warned = [r.getMessage() for r in caplog.records if "--int8_target_cpu any" in r.getMessage()]
        assert len(warned) == (target_cpu == "vnni"), warned


def test_quantization_aware_tuning_rounds_each_layer_as_the_file_does(tmp_path):
    """The tuning's simulated weights are the INT8 file's: 7 bits for the matrix kernels, 8 for depthwise."""
    for target_cpu in ("any", "vnni"):
        in_file = dequantized_weights(_quantized(tmp_path, target_cpu))
        model = _Blocks().eval()  # the same seeded weights as the exported copy
        with simulated_int8(model, [], target_cpu):
            simulated = {"conv_stem": model.conv_stem.weight, "conv_dw": model.conv_dw.weight,
                         "conv_pw": model.conv_pw.weight, "classifier": model.classifier.weight}
            for layer, weight in simulated.items():
                node = next(name for name in in_file if layer in name)
                np.testing.assert_allclose(weight.detach().numpy(), in_file[node], rtol=0, atol=1e-6,
                                           err_msg=f"{target_cpu} {layer}")
