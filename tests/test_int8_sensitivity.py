"""INT8 that stays INT8: the parts kept in FP32 are chosen by measured sensitivity, calibration choices change the
ranges written, and the agreement guard still holds a model to its target."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from configs import QuantOptions
from deploy import onnx_quant
from deploy.executorch_export import executorch_missing
from deploy.onnx_export import export_fp32
from utils.onnx_runtime import read_onnx_metadata

N_CLASS = 4


class _NearIdentityBlock(nn.Module):
    """Two convolutions that together pass their input on almost unchanged (identity kernels plus a little noise)."""

    def __init__(self, channels: int, outlier: float = 0.0):
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_b = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            for conv in (self.conv_a, self.conv_b):
                nn.init.dirac_(conv.weight)
                conv.weight.add_(0.05 * torch.randn_like(conv.weight))
                conv.bias.zero_()
            if outlier:
                # The tensor between the two convolutions carries channel 0 `outlier` times larger and conv_b scales
                # it back: FP32 answers do not change, but in INT8 that one channel sets the tensor's range and the
                # other channels round to nothing (an outlier-heavy activation).
                self.conv_a.weight[0] *= outlier
                self.conv_b.weight[:, 0] /= outlier

    def forward(self, x):
        return self.conv_b(self.conv_a(x))


class FragileNet(nn.Module):
    """Stem, four blocks and a classifier, named like a timm model; block ``fragile`` has the outlier activation."""

    def __init__(self, fragile: int = 2, outlier: float = 1e4, channels: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.conv_stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[_NearIdentityBlock(channels, outlier if i == fragile else 0.0)
                                      for i in range(4)])
        self.classifier = nn.Linear(channels, N_CLASS)
        self.feature_info = [{"module": f"blocks.{i}", "reduction": 2, "num_chs": channels} for i in range(4)]

    def forward(self, x):
        return self.classifier(self.blocks(self.conv_stem(x)).mean((2, 3)))


def _images(n: int, generator: torch.Generator) -> torch.Tensor:
    # A colour cast per image plus texture: the pooled features, and so the answers, differ between images.
    return torch.randn(n, 3, 1, 1, generator=generator) + 0.3 * torch.randn(n, 3, 32, 32, generator=generator)


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """The exported FP32 file of a FragileNet and the data quantize_verified checks it on."""
    model = FragileNet().eval()
    work = tmp_path_factory.mktemp("fragile")
    export_fp32(model, [3, 32, 32], work / "fp32.onnx", 17)
    generator = torch.Generator().manual_seed(1)
    train, val, test = _images(64, generator), _images(100, generator), _images(50, generator)
    with torch.no_grad():
        test_probs = model(test).softmax(1).numpy()
    assert len(set(test_probs.argmax(1))) > 1, "the test images must not all get one answer"
    data = onnx_quant.CalibrationData(list(range(len(train))), val, lambda rows: train[list(rows)],
                                      [i % N_CLASS for i in range(len(train))])
    return model, work / "fp32.onnx", data, onnx_quant.ReferenceSet(test, test_probs.argmax(1), test_probs)


@pytest.fixture(autouse=True)
def no_latency_timing(monkeypatch):
    # The timing runs in fresh processes (seconds each); these tests check the choice of FP32 nodes, not speed.
    monkeypatch.setattr(onnx_quant, "compare_latency", lambda paths, *args, **kwargs: [1.0] * len(paths))


def _quantize(fragile, target: Path, **options):
    model, fp32, data, test = fragile
    # 8-bit weights: with --int8_target_cpu any the near-identity kernels' same-sign neighbours get about 7 bits,
    # whose rounding alone costs answers in other blocks too, and these tests look at what the search does with
    # one fragile activation.
    settings = QuantOptions(**{"calib_images": 64, "keep_float_stages": 0, "float_selection": "sensitivity",
                               "int8_target_cpu": "vnni", **options})
    return onnx_quant.quantize_verified(fp32, target, model.feature_info, {}, settings, test, data)


def _int8_convs(path: Path) -> dict[str, bool]:
    graph = onnx.load(str(path)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return {node.name: node.input[1] in dequantized for node in graph.node if node.op_type == "Conv"}


def test_units_are_the_blocks_named_in_the_graph():
    assert onnx_quant.unit_of("/blocks/blocks.2/blocks.2.0/conv_pw/Conv") == "blocks.2.0"
    assert onnx_quant.unit_of("/layer1/layer1.0/conv1/Conv") == "layer1.0"
    assert onnx_quant.unit_of("/conv_head/Conv") == "conv_head"
    # A strided convolution wrapped with its constant padding (Sequential(pad, conv)) stays in its own block.
    assert onnx_quant.unit_of("/blocks/blocks.3/blocks.3.0/conv_dw/conv_dw.1/Conv") == "blocks.3.0"
    assert onnx_quant.unit_of("/blocks/blocks.3/blocks.3.1/conv_dw/Conv") == "blocks.3.1"
    assert onnx_quant.unit_of("Conv_17") == "Conv_17"


def test_the_fragile_block_stays_fp32_and_nothing_else(fragile, tmp_path):
    report = _quantize(fragile, tmp_path / "int8.onnx")
    assert report["agreement_attempts"][0]["val_top1_agreement"] < 0.99  # fully INT8 loses answers
    assert report["int8_float_units"] == ["blocks.2"]
    assert report["sensitivity"][0]["unit"] == "blocks.2" and report["sensitivity"][0]["kl_reduction"] > 0
    assert report["int8_float_nodes"] == 2 and report["int8_float_stages"] == 0
    assert report["val_top1_agreement"] >= 0.99 and report["int8_top1_agreement"] >= 0.96
    # The reported validation agreement is the written file's own, not the best the search saw.
    model, fp32, data, _ = fragile
    with torch.no_grad():
        val_fp32 = model(data.val_images).softmax(1).numpy()
    own = onnx_quant.agreement_and_divergence(tmp_path / "int8.onnx", data.val_images, val_fp32)[0]
    assert report["val_top1_agreement"] == own
    convs = _int8_convs(tmp_path / "int8.onnx")
    assert not any(q for name, q in convs.items() if name.startswith("/blocks/blocks.2/"))
    assert all(q for name, q in convs.items() if not name.startswith("/blocks/blocks.2/"))
    # the biases of the INT8 convolutions and the classifier are corrected, those of the FP32 block are not
    assert report["int8_bias_corrected"] == sum(convs.values()) + 1


def test_a_choice_made_on_another_checkpoint_is_used_as_it_is(fragile, tmp_path):
    # The run's checkpoint selected before a refit chooses (here the fragile block 2 net); the delivered model, whose
    # own fragile block is 1, gets exactly that choice and calibration, with no search of its own.
    chosen = _quantize(fragile, tmp_path / "held_out.onnx", calibrate_method="percentile")
    assert chosen["int8_float_units"] == ["blocks.2"]
    _, _, data, test = fragile
    delivered = FragileNet(fragile=1).eval()
    export_fp32(delivered, [3, 32, 32], tmp_path / "delivered_fp32.onnx", 17)
    with torch.no_grad():
        probs = delivered(test.images).softmax(1).numpy()
    settings = QuantOptions(calib_images=64, keep_float_stages=0, float_selection="sensitivity")
    report = onnx_quant.quantize_verified(tmp_path / "delivered_fp32.onnx", tmp_path / "int8.onnx",
                                          delivered.feature_info, {}, settings,
                                          onnx_quant.ReferenceSet(test.images, test.labels, probs), data,
                                          chosen_on=chosen)
    assert report["int8_float_node_names"] == chosen["int8_float_node_names"]
    assert report["calibrate_method"] == "percentile" and report["int8_float_units"] == ["blocks.2"]
    assert report["val_top1_agreement"] == chosen["val_top1_agreement"]
    assert report["agreement_attempts"] == chosen["agreement_attempts"]
    # its own block 1 stays INT8 and loses answers: measured and reported, not searched away
    assert report["seen_val_top1_agreement"] < 0.99
    convs = _int8_convs(tmp_path / "int8.onnx")
    assert not any(q for name, q in convs.items() if name.startswith("/blocks/blocks.2/"))
    assert all(q for name, q in convs.items() if name.startswith("/blocks/blocks.1/"))


def test_blocks_the_agreement_does_not_need_go_back_to_int8(fragile, tmp_path, monkeypatch):
    # Scripted: no block alone brings answers back; blocks.2 and blocks.3 together do. blocks.0 lowers the divergence
    # most, so it is kept first, and turns out not to be needed.
    model, fp32, _, _ = fragile
    prepped = tmp_path / "prepped.onnx"
    onnx_quant.prepare_for_quantization(fp32, prepped)
    units = {u.name: set(u.nodes) for u in onnx_quant.quantization_units(onnx.load(str(prepped)).graph)}
    real_score = onnx_quant._Trials.score

    def scripted(self, float_nodes):
        real_score(self, float_nodes)  # the file is still written and scored
        kept = {name for name, nodes in units.items() if nodes <= set(float_nodes)}
        agreement = 0.995 if {"blocks.2", "blocks.3"} <= kept else 0.9
        return agreement, 0.1 - 0.05 * ("blocks.0" in kept) - 0.02 * ("blocks.2" in kept) - 0.01 * ("blocks.3" in kept)

    monkeypatch.setattr(onnx_quant._Trials, "score", scripted)
    report = _quantize(fragile, tmp_path / "int8.onnx")
    assert [s["unit"] for s in report["sensitivity"][:3]] == ["blocks.0", "blocks.2", "blocks.3"]
    attempts = report["agreement_attempts"]
    assert [a["float_units"] for a in attempts[:6]] == [
        [], ["blocks.0"], ["blocks.0", "blocks.2"], ["blocks.0", "blocks.2", "blocks.3"],
        ["blocks.0", "blocks.3"], ["blocks.2", "blocks.3"]]
    assert [a.get("pruned") for a in attempts[4:6]] == ["blocks.2", "blocks.0"]
    # Then each of the kept blocks' nodes is tried back in INT8; here every one of them is needed.
    assert sorted(a["pruned"] for a in attempts[6:]) == sorted(units["blocks.2"] | units["blocks.3"])
    assert report["int8_float_units"] == ["blocks.2", "blocks.3"] and report["int8_float_nodes"] == 4
    convs = _int8_convs(tmp_path / "int8.onnx")  # the file holds the pruned choice, not the last trial
    assert sorted(name for name, q in convs.items() if not q) == [
        f"/blocks/blocks.{i}/conv_{c}/Conv" for i in (2, 3) for c in "ab"]


def test_a_block_that_alone_brings_the_answers_back_is_chosen_over_bigger_divergence_gains(fragile, tmp_path,
                                                                                          monkeypatch):
    model, fp32, _, _ = fragile
    prepped = tmp_path / "prepped.onnx"
    onnx_quant.prepare_for_quantization(fp32, prepped)
    units = {u.name: set(u.nodes) for u in onnx_quant.quantization_units(onnx.load(str(prepped)).graph)}

    def scripted(self, float_nodes):
        self.write(float_nodes)
        kept = {name for name, nodes in units.items() if nodes <= set(float_nodes)}
        return (0.995 if "blocks.3" in kept else 0.9), 0.1 - 0.05 * ("blocks.0" in kept) - 0.001 * ("blocks.3" in kept)

    monkeypatch.setattr(onnx_quant._Trials, "score", scripted)
    report = _quantize(fragile, tmp_path / "int8.onnx")
    assert report["int8_float_units"] == ["blocks.3"] and report["int8_float_nodes"] == 2
    assert [a["float_units"] for a in report["agreement_attempts"][:2]] == [[], ["blocks.3"]]
    # --float_selection divergence ranks by the divergence alone: blocks.0 first, then blocks.3 crosses the target,
    # and blocks.0, not needed for the agreement, goes back to INT8
    report = _quantize(fragile, tmp_path / "int8_divergence.onnx", float_selection="divergence")
    assert [s["unit"] for s in report["sensitivity"][:2]] == ["blocks.0", "blocks.3"]
    assert [a["float_units"] for a in report["agreement_attempts"][:4]] == [
        [], ["blocks.0"], ["blocks.0", "blocks.3"], ["blocks.3"]]
    assert report["int8_float_units"] == ["blocks.3"]


def test_a_node_the_agreement_does_not_need_goes_back_to_int8_even_inside_a_kept_block(fragile, tmp_path,
                                                                                        monkeypatch):
    model, fp32, _, _ = fragile
    prepped = tmp_path / "prepped.onnx"
    onnx_quant.prepare_for_quantization(fp32, prepped)
    conv_a = next(n.name for n in onnx.load(str(prepped)).graph.node if n.name.startswith("/blocks/blocks.3/conv_a"))

    def scripted(self, float_nodes):  # only blocks.3's first convolution matters
        self.write(float_nodes)
        return (0.995 if conv_a in float_nodes else 0.9), 0.1 - 0.05 * (conv_a in float_nodes)

    monkeypatch.setattr(onnx_quant._Trials, "score", scripted)
    report = _quantize(fragile, tmp_path / "int8.onnx")
    assert report["int8_float_node_names"] == [conv_a] and report["int8_float_units"] == ["blocks.3"]
    convs = _int8_convs(tmp_path / "int8.onnx")
    assert [name for name, q in convs.items() if not q] == [conv_a]


def test_the_prefix_rule_would_keep_every_stage_before_it(fragile, tmp_path):
    report = _quantize(fragile, tmp_path / "int8.onnx", float_selection="prefix")
    assert report["int8_float_stages"] == 3 and report["int8_float_nodes"] > 2  # stem and blocks 0-2


@pytest.mark.skipif(executorch_missing() is not None, reason="executorch is not installed")
def test_the_phone_int8_program_keeps_in_fp32_the_block_the_onnx_file_keeps(fragile, tmp_path):
    from deploy.executorch_export import export_executorch, onnx_float_modules
    from runs.export_dir import ExportDir

    model, _, data, test = fragile
    onnx_report = _quantize(fragile, tmp_path / "int8.onnx")
    assert onnx_float_modules(model, onnx_report["int8_float_node_names"]) == ["blocks.2"]
    quant = QuantOptions(calib_images=64, min_agreement=0.99)
    stages = [level["module"] for level in model.feature_info]
    (tmp_path / "pte").mkdir()
    report = export_executorch(model, [3, 32, 32], ExportDir(tmp_path / "pte"), test, data, quant, stages,
                               onnx_report["int8_float_node_names"])
    # XNNPACK's quantizer rounds the outlier activation as ONNX Runtime does, and the ONNX file's one FP32 block is
    # enough; without that choice the program would fall back to whole leading stages (stem and blocks 0-2, as
    # test_the_prefix_rule_would_keep_every_stage_before_it shows for the ONNX file).
    assert report["pte_int8_onnx_float_modules"] == ["blocks.2"]
    assert report["pte_int8_written"] and report["pte_int8_check_agreement"] >= 0.99
    assert report["pte_int8_float_modules"] == ["blocks.2"] and report["pte_int8_float_stages"] == 0
    assert report["pte_int8_top1_agreement"] >= 0.96


def _activation_scales(path: Path) -> dict[str, float]:
    """Scale of every QuantizeLinear that quantizes an activation (not a weight) in a QDQ model."""
    graph = onnx.load(str(path)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return {node.input[0]: float(initializers[node.input[1]]) for node in graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in initializers}


def test_each_calibration_method_writes_its_own_ranges(fragile, tmp_path):
    scales = {method: _activation_scales(_quantize_only(fragile, tmp_path / f"{method}.onnx", method))
              for method in ("minmax", "percentile", "entropy")}
    assert scales["minmax"].keys() == scales["percentile"].keys() == scales["entropy"].keys()
    for a, b in (("minmax", "percentile"), ("minmax", "entropy"), ("percentile", "entropy")):
        assert any(not np.isclose(scales[a][t], scales[b][t]) for t in scales[a]), (a, b)
    # Percentile and entropy clip the outlier tensor's range: a finer step there than minmax's. Entropy with
    # TensorRT's 2048 bins clips hard (ONNX Runtime's default 128 bins would give minmax's range back).
    outlier = max(scales["minmax"], key=scales["minmax"].get)
    assert scales["percentile"][outlier] < scales["minmax"][outlier]
    assert scales["entropy"][outlier] < scales["minmax"][outlier] / 2


def _quantize_only(fragile, target: Path, method: str) -> Path:
    _, fp32, data, _ = fragile
    prepped = target.with_suffix(".prepped.onnx")
    onnx_quant.prepare_for_quantization(fp32, prepped)
    reader = onnx_quant.CalibrationReader(data.train_paths, lambda rows: data.load_batch(rows).numpy())
    onnx_quant.quantize_int8(prepped, target, reader, method)
    return target


def test_auto_calibration_compares_the_methods_and_keeps_the_fewest_float_nodes(fragile, tmp_path):
    report = _quantize(fragile, tmp_path / "int8.onnx", calibrate_method="auto")
    compared = {row["calibrate_method"]: row for row in report["calibration_comparison"]}
    assert set(compared) == {"minmax", "percentile", "entropy"}
    reaching = [row for row in compared.values() if row["val_top1_agreement"] >= 0.99]
    assert reaching and report["int8_float_nodes"] == min(row["float_nodes"] for row in reaching)
    assert read_onnx_metadata(tmp_path / "int8.onnx")["calibrate_method"] == report["calibrate_method"]


def test_check_views_are_the_image_mirrored_shifted_and_zoomed():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    assert onnx_quant.check_views(images, 1) is images
    views = onnx_quant.check_views(images, 8).reshape(8, 2, 3, 32, 32)
    assert torch.equal(views[0], images) and torch.equal(views[1], images.flip(-1))
    shift = round(0.04 * 32)  # view 2: moved down and right by 4% of the side, the edge filled by reflection
    assert torch.equal(views[2][..., shift:, shift:], images[..., :-shift, :-shift])
    assert not torch.equal(views[4], images)  # zoomed in
    assert all(v.shape == images.shape for v in views)
    assert len({v.sum().item() + v[..., 0, 0].sum().item() for v in views}) == 8  # eight different views


def test_balanced_calibration_takes_every_class_alike():
    paths = [Path(f"{i}.jpg") for i in range(100)]
    labels = [0] * 90 + [1] * 6 + [2] * 4
    chosen = onnx_quant.calibration_images(paths, labels, 12, "balanced")
    counts = np.bincount([labels[paths.index(p)] for p in chosen], minlength=3)
    assert counts.tolist() == [4, 4, 4]
    assert chosen == onnx_quant.calibration_images(paths, labels, 12, "balanced")  # seeded
    assert len(set(onnx_quant.calibration_images(paths, labels, 12, "random"))) == 12
    # A class with fewer photos than its share gives all it has; the others fill the rest.
    chosen = onnx_quant.calibration_images(paths, labels, 30, "balanced")
    assert np.bincount([labels[paths.index(p)] for p in chosen], minlength=3).tolist() == [20, 6, 4]


def test_the_guard_keeps_the_best_attempt_and_says_so_when_no_choice_reaches_the_target(fragile, tmp_path,
                                                                                       monkeypatch, caplog):
    monkeypatch.setattr(onnx_quant, "agreement_and_divergence", lambda *args: (0.5, 1.0))
    report = _quantize(fragile, tmp_path / "int8.onnx")
    assert report["val_top1_agreement"] == 0.5 and report["int8_float_nodes"] == 0  # the fewest among equals
    assert any("!!! INT8 agrees with FP32 on at most 0.5000" in r.getMessage() for r in caplog.records)


def _qat_setup(tmp_path):
    """A FragileNet with a milder outlier (INT8 changes some answers but not all), its FP32 export, images, and the
    grids of its all-INT8 ONNX Runtime file located in the PyTorch model."""
    from deploy.qat import ort_activation_grids

    model = FragileNet(outlier=100).eval()
    generator = torch.Generator().manual_seed(1)
    train, val = _images(256, generator), _images(100, generator)
    export_fp32(model, [3, 32, 32], tmp_path / "delivered.onnx", 17)
    grids = ort_activation_grids(model, tmp_path / "delivered.onnx", list(range(64)), lambda rows: train[list(rows)],
                                 "minmax", tmp_path)
    return model, train, val, grids


def test_the_tuning_rounds_what_the_int8_file_rounds_on_its_grids(tmp_path):
    from deploy.qat import int8_activation_grids, simulated_int8
    from prediction.predictors import onnx_probs

    model, _, val, grids = _qat_setup(tmp_path)
    reference = tmp_path / "qat-reference-int8.onnx"
    in_file = int8_activation_grids(reference)
    # Every rounded activation of the file is found: the input, each convolution's output, the pooled features
    # (a module's input here) and the logits (the model's own output).
    assert {g.tensor for g in grids} == set(in_file) and len(grids) == 12
    assert {("", "input"), ("", "output"), ("classifier", "input")} <= {(g.module, g.position) for g in grids}
    assert all((g.scale, g.zero_point) == in_file[g.tensor] for g in grids)
    ort_int8 = onnx_probs(reference, val, N_CLASS)
    with torch.no_grad():
        fp32 = model(val).softmax(1).numpy()
        with simulated_int8(model, grids):
            simulated = model(val).softmax(1).numpy()
        after = model(val).softmax(1).numpy()
    # The simulation gives ONNX Runtime's INT8 answers, not FP32's: its error is a small part of INT8's own.
    int8_error = np.abs(fp32 - ort_int8).mean()
    assert (fp32.argmax(1) != ort_int8.argmax(1)).any()
    assert np.abs(simulated - ort_int8).mean() < 0.05 * int8_error, (np.abs(simulated - ort_int8).mean(), int8_error)
    assert (simulated.argmax(1) == ort_int8.argmax(1)).all()
    np.testing.assert_array_equal(after, fp32)  # leaving the simulation leaves plain float layers


def test_quantization_aware_tuning_brings_the_int8_answers_closer_to_fp32(tmp_path):
    from deploy.qat import finetune_for_int8

    model, train, val, grids = _qat_setup(tmp_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        fp32_probs = model(val).softmax(1).numpy()
    calibration = onnx_quant.CalibrationReader(list(range(64)), lambda rows: train[list(rows)].numpy())

    def all_int8_kl(net: nn.Module, name: str) -> float:
        export_fp32(net, [3, 32, 32], tmp_path / f"{name}.onnx", 17)
        onnx_quant.prepare_for_quantization(tmp_path / f"{name}.onnx", tmp_path / f"{name}_prepped.onnx")
        calibration.batches = iter([list(range(i, i + 8)) for i in range(0, 64, 8)])
        onnx_quant.quantize_int8(tmp_path / f"{name}_prepped.onnx", tmp_path / f"{name}_int8.onnx", calibration,
                                 "minmax")
        return onnx_quant.agreement_and_divergence(tmp_path / f"{name}_int8.onnx", val, fp32_probs)[1]

    before = all_int8_kl(model, "delivered")
    tuned = finetune_for_int8(model, list(range(256)), lambda rows: train[list(rows)], 3, grids, lr=1e-3)
    after = all_int8_kl(tuned.model, "tuned")  # still measured against the delivered model's FP32 answers
    assert after < 0.75 * before, (before, after)
    assert tuned.steps == 3 * 16 and tuned.seconds > 0 and tuned.simulated_activations == len(grids)
    assert tuned.best_pass == 3 and tuned.passes == []  # no check images: every pass, nothing to choose by
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # the delivered model is intact
    assert not any(parametrize.is_parametrized(m) for m in tuned.model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tuned.model.modules())  # ready to export


def test_the_tuning_hands_back_its_best_pass_on_the_check_images_or_the_delivered_weights(tmp_path):
    from deploy.qat import finetune_for_int8, simulated_int8

    model, train, _, grids = _qat_setup(tmp_path)
    check = _images(600, torch.Generator().manual_seed(5))
    delivered = {k: v.clone() for k, v in model.state_dict().items()}
    load = lambda rows: train[list(rows)]  # noqa: E731

    def simulated(net: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            fp32 = model(check).log_softmax(1)
            with simulated_int8(net, grids):
                out = net(check).log_softmax(1)
        return ((out.argmax(1) == fp32.argmax(1)).double().mean().item(),
                nn.functional.kl_div(out, fp32, log_target=True, reduction="batchmean").item())

    tuned = finetune_for_int8(model, list(range(256)), load, 4, grids, lr=1e-3, check_images=check)
    assert [p["pass"] for p in tuned.passes] == [0, 1, 2, 3, 4] and tuned.steps == 4 * 16
    best = tuned.passes[tuned.best_pass]
    assert tuned.best_pass >= 1 and best["val_agreement"] > tuned.passes[0]["val_agreement"]
    assert all((best["val_agreement"], -best["val_kl"]) >= (p["val_agreement"], -p["val_kl"]) for p in tuned.passes)
    # The model handed back is the best pass's: its simulated INT8 gives that pass's figures.
    agreement, kl = simulated(tuned.model)
    assert agreement == best["val_agreement"] and kl == pytest.approx(best["val_kl"], rel=1e-4)
    assert not any(parametrize.is_parametrized(m) for m in tuned.model.modules())

    # A step size that wrecks the model: no pass beats the delivered weights, which come back unchanged.
    wrecked = finetune_for_int8(model, list(range(256)), load, 2, grids, lr=1.0, check_images=check)
    assert wrecked.best_pass == 0 and len(wrecked.passes) == 3
    assert all(p["val_agreement"] < wrecked.passes[0]["val_agreement"] for p in wrecked.passes[1:])
    assert all(torch.equal(delivered[k], v) for k, v in wrecked.model.state_dict().items())
    assert all(torch.equal(delivered[k], v) for k, v in model.state_dict().items())


def test_the_tuning_trains_on_mirrored_shifted_and_zoomed_views():
    from deploy.qat import TRAIN_VIEW_SHIFT, random_views

    # Smooth images, so a view shifted by a pixel or two still looks like its image and a mirrored one does not.
    coarse = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    images = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    views = random_views(images, torch.Generator().manual_seed(0))
    assert views.shape == images.shape
    assert torch.equal(views, random_views(images, torch.Generator().manual_seed(0)))  # seeded
    # Every image gets its own view, none the image itself, yet each stays mostly the image (a small shift or zoom).
    assert all(not torch.equal(v, i) for v, i in zip(views, images))
    same = [torch.corrcoef(torch.stack([v.flatten(), i.flatten()]))[0, 1] for v, i in zip(views, images)]
    mirrored = [torch.corrcoef(torch.stack([v.flatten(), i.flip(-1).flatten()]))[0, 1] for v, i in zip(views, images)]
    assert 0 < sum(a > b for a, b in zip(same, mirrored)) < 32  # some mirrored, some not
    assert 0 < TRAIN_VIEW_SHIFT <= 0.1


class _SiluNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU(inplace=True)
        self.head = nn.Linear(8, N_CLASS)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def test_a_silu_is_rounded_between_its_sigmoid_and_its_product_as_in_the_int8_file(tmp_path):
    # ONNX computes SiLU as Sigmoid then Mul and the INT8 file rounds the sigmoid: no PyTorch module returns it.
    from deploy.qat import ort_activation_grids, simulated_int8
    from prediction.predictors import onnx_probs

    model = _SiluNet().eval()
    images = _images(80, torch.Generator().manual_seed(2))
    export_fp32(model, [3, 32, 32], tmp_path / "silu.onnx", 17)
    grids = ort_activation_grids(model, tmp_path / "silu.onnx", list(range(40)), lambda rows: images[list(rows)],
                                 "minmax", tmp_path)
    assert [(g.module, g.position) for g in grids if g.position == "gate"] == [("act", "gate")]
    ort_int8 = onnx_probs(tmp_path / "qat-reference-int8.onnx", images[40:], N_CLASS)
    with torch.no_grad():
        fp32 = model(images[40:]).softmax(1).numpy()
        with simulated_int8(model, grids):
            simulated = model(images[40:]).softmax(1).numpy()
            without_gate = [g for g in grids if g.position != "gate"]
        with simulated_int8(model, without_gate):
            ungated = model(images[40:]).softmax(1).numpy()
    assert "forward" not in vars(model.act)  # SiLU's own forward is back
    assert np.abs(simulated - ort_int8).mean() < 0.5 * np.abs(ungated - ort_int8).mean()
    assert np.abs(simulated - ort_int8).mean() < 0.1 * np.abs(fp32 - ort_int8).mean()
