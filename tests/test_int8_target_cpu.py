"""INT8 that answers the same on every x86 CPU (--int8_target_cpu any): x86 CPUs without VNNI multiply uint8
activations by int8 weights with VPMADDUBSW, which adds the products of two neighbouring weights in 16 bits and
saturates; the export gives each output channel the finest scale at which no such pair can overflow. Depthwise
convolutions run on a kernel that adds in 32 bits and keep 8 bits."""

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
from deploy.int8_weights import SEVEN_BIT_WEIGHT_QMAX, WEIGHT_QMAX
from deploy.onnx_export import export_fp32
from deploy.qat import simulated_int8
from prediction import predictors
from utils.cpu import int8_pairs_saturate
from utils.onnx_runtime import read_onnx_metadata

SIDE = 8


class _Blocks(nn.Module):
    """A stem, a depthwise and two pointwise convolutions and a classifier: the layer kinds of an EfficientNet."""

    def __init__(self, mix: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv_stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv_dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv_pw = nn.Conv2d(32, 32, 1)
        # without it, the saturating sums of conv_pw move the logits far (the test of why "any" is the default)
        self.conv_mix = nn.Conv2d(32, 32, 1) if mix else nn.Identity()
        self.classifier = nn.Linear(32, 4)
        with torch.no_grad():
            # every weight of conv_pw large and positive: neighbours the kernel adds can overflow at 8 bits
            self.conv_pw.weight.copy_(0.5 + 0.5 * torch.rand_like(self.conv_pw.weight))
            # conv_mix: large weights whose neighbours (input channels 0-1, 2-3, ...) have the opposite sign, so
            # their pair sums stay within one weight: 8 bits are safe there, but only for that pairing
            if mix:
                signs = torch.tensor([1.0, -1.0]).repeat(16).view(1, 32, 1, 1)
                self.conv_mix.weight.copy_(signs * (0.5 + 0.5 * torch.rand_like(self.conv_mix.weight)))

    def forward(self, x):
        x = torch.relu(self.conv_stem(x))
        x = torch.relu(self.conv_pw(torch.relu(self.conv_dw(x))))
        x = torch.relu(self.conv_mix(x))
        return self.classifier(x.mean((2, 3)))


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 3, SIDE, SIDE)).astype(np.float32)


def _quantized(tmp_path: Path, target_cpu: str, mix: bool = True) -> Path:
    export_fp32(_Blocks(mix).eval(), [3, SIDE, SIDE], tmp_path / "fp32.onnx", 17)
    prepped, int8 = tmp_path / "prepped.onnx", tmp_path / f"int8-{target_cpu}.onnx"
    onnx_quant.prepare_for_quantization(tmp_path / "fp32.onnx", prepped)
    images = _images(16, 0)
    reader = onnx_quant.CalibrationReader(list(range(len(images))), lambda rows: images[rows])
    onnx_quant.quantize_int8(prepped, int8, reader, "minmax", target_cpu=target_cpu)
    return int8


def _integer_weights(path: Path) -> dict[str, np.ndarray]:
    """Each Conv/Gemm's integer weights in a QDQ file, by the layer's name, flattened per output channel."""
    model = onnx.load(str(path))
    ints = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight = ints[producers[node.input[1]].input[0]].astype(np.int32)
            found[node.name] = weight.reshape(len(weight), -1)
    return found


def _largest_pair_sum(weights: np.ndarray, adjacent: bool) -> int:
    """The largest same-sign sum of two integers the matrix kernel may add in one 16-bit sum."""
    positive, negative = np.clip(weights, 0, None), np.clip(-weights, 0, None)
    if adjacent:  # input channels 0-1, 2-3, ...
        return int(max((positive[:, 0::2] + positive[:, 1::2]).max(), (negative[:, 0::2] + negative[:, 1::2]).max()))
    top_two = lambda t: np.sort(t, axis=1)[:, -2:].sum(1).max()  # noqa: E731
    return int(max(top_two(positive), top_two(negative)))


def _run(path: Path, images: np.ndarray, fused: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not fused:  # QuantizeLinear / DequantizeLinear / float Conv one by one: what the file means, on any CPU
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def test_any_cpu_keeps_every_pair_of_matrix_weights_within_16_bits_and_8_bits_where_that_is_safe(tmp_path):
    any_cpu, vnni = _integer_weights(_quantized(tmp_path, "any")), _integer_weights(_quantized(tmp_path, "vnni"))
    assert len(any_cpu) == 5
    layer = {kind: next(name for name in any_cpu if kind in name)
             for kind in ("conv_stem", "conv_dw", "conv_pw", "conv_mix", "Gemm")}
    for kind in ("conv_pw", "conv_mix", "Gemm"):  # 1x1 and linear: the kernel adds neighbouring input channels
        # 255 x 128 = 32,640 fits int16's 32,767: no pair of products can overflow
        assert _largest_pair_sum(any_cpu[layer[kind]], adjacent=True) <= 128, kind
    assert _largest_pair_sum(any_cpu[layer["conv_stem"]], adjacent=False) <= 128  # 3x3: any two weights
    assert np.abs(any_cpu[layer["conv_dw"]]).max() == WEIGHT_QMAX  # depthwise: its own 32-bit kernel
    # Opposite-sign neighbours: 8 bits (ONNX Runtime's reduce_range would have given every weight 7)
    assert np.abs(any_cpu[layer["conv_mix"]]).max() == WEIGHT_QMAX
    # Large same-sign neighbours: between 7 and 8 bits, as fine as their pair sums allow
    assert SEVEN_BIT_WEIGHT_QMAX < np.abs(any_cpu[layer["conv_pw"]]).max() < WEIGHT_QMAX
    assert {int(np.abs(w).max()) for w in vnni.values()} == {WEIGHT_QMAX}
    assert _largest_pair_sum(vnni[layer["conv_pw"]], adjacent=True) > 128  # what saturates without VNNI


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
    path = _quantized(tmp_path, "vnni", mix=False)
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
    """The tuning's simulated weights are the INT8 file's, layer by layer, for both targets."""
    for target_cpu in ("any", "vnni"):
        in_file = dequantized_weights(_quantized(tmp_path, target_cpu))
        model = _Blocks().eval()  # the same seeded weights as the exported copy
        with simulated_int8(model, [], target_cpu):
            simulated = {"conv_stem": model.conv_stem.weight, "conv_dw": model.conv_dw.weight,
                         "conv_pw": model.conv_pw.weight, "conv_mix": model.conv_mix.weight,
                         "classifier": model.classifier.weight}
            for layer, weight in simulated.items():
                node = next(name for name in in_file if layer in name)
                np.testing.assert_allclose(weight.detach().numpy(), in_file[node], rtol=0, atol=1e-6,
                                           err_msg=f"{target_cpu} {layer}")
