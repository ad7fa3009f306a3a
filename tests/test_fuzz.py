"""Property-based fuzzing (hypothesis): random bytes and random valid images through the image loaders, random
argument combinations through every script's parser. Never an unhandled exception."""

import argparse
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import benchmark
import configs
import face_segmentation
import inference
import inference_with_segmentation
import main
import quantize_onnx_models
import run_experiments
import serve
from configs import TrainConfig, from_namespace
from dataloaders.datasets import ImageSamples
from dataloaders.discovery import Sample
from dataloaders.image_io import check_image, load_rgb
from dataloaders.inference_data import InferenceImages
from dataloaders.transforms import Preprocessing, build_eval_transform
from utils.errors import UserError

PREPROCESSING = Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                              crop_pct=0.875, crop_mode="center")
TRANSFORM = build_eval_transform(PREPROCESSING)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MAGIC = [b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00"]


def _valid_image_bytes(width, height, mode, fmt, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@SETTINGS
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=2048),
       suffix=st.sampled_from([".jpg", ".png", ".webp", ".bmp", ".tif"]))
def test_random_bytes_never_escape_the_loaders(tmp_path, magic, body, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(magic + body)
    reason = check_image(path)
    assert reason is None or isinstance(reason, str)
    tensor, index, detail = InferenceImages([path], TRANSFORM)[0]
    assert (tensor is None and isinstance(detail, str)) or tuple(tensor.shape) == (3, 32, 32)
    item = ImageSamples([Sample(path, 0)], TRANSFORM)[0]
    assert item is None or tuple(item[0].shape) == (3, 32, 32)


@SETTINGS
@given(width=st.integers(1, 48), height=st.integers(1, 48), seed=st.integers(0, 2**16),
       mode_format=st.sampled_from([("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("L", "PNG"),
                                    ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("LA", "PNG"), ("RGB", "WEBP"),
                                    ("RGB", "BMP"), ("RGB", "TIFF")]),
       corrupt_at=st.one_of(st.none(), st.floats(0.05, 0.95)))
def test_random_valid_images_load_as_rgb_and_mutations_never_crash(tmp_path, width, height, seed, mode_format,
                                                                   corrupt_at):
    data = _valid_image_bytes(width, height, *mode_format, seed)
    path = tmp_path / "image.img"
    if corrupt_at is None:
        path.write_bytes(data)
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (width, height)
        assert check_image(path) is None
    else:  # a flipped byte somewhere in a real file
        position = int(corrupt_at * len(data))
        path.write_bytes(data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:])
        tensor, _, detail = InferenceImages([path], TRANSFORM)[0]
        assert tensor is not None or isinstance(detail, str)


CONFIG_OF = {"main": [TrainConfig], "run_experiments": [TrainConfig, configs.SweepOptions],
             "inference": [configs.InferenceConfig], "inference_with_segmentation": [configs.SegmentedInferenceConfig],
             "face_segmentation": [configs.FaceSegmentationConfig], "quantize_onnx_models": [configs.ExportConfig],
             "benchmark": [configs.BenchmarkConfig], "serve": [configs.ServeConfig]}

PARSERS = {
    "main": main.parse_args,
    "inference": inference.parse_args,
    "inference_with_segmentation": inference_with_segmentation.parse_args,
    "face_segmentation": face_segmentation.parse_args,
    "quantize_onnx_models": lambda argv: quantize_onnx_models.get_args_parser().parse_args(argv),
    "benchmark": lambda argv: benchmark.get_args_parser().parse_args(argv),
    "run_experiments": run_experiments.parse_args,
    "serve": serve.parse_args,
}


def _flags(name):
    parser = {"main": main.get_args_parser, "inference": inference.get_args_parser,
              "inference_with_segmentation": inference_with_segmentation.get_args_parser,
              "face_segmentation": face_segmentation.get_args_parser,
              "quantize_onnx_models": quantize_onnx_models.get_args_parser,
              "benchmark": benchmark.get_args_parser, "run_experiments": run_experiments.get_args_parser,
              "serve": serve.get_args_parser}[name]()
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


VALUES = st.one_of(st.sampled_from(["True", "false", "0", "1", "-3", "1e-3", "nan", "inf", "", "adamW", "cpu",
                                    "efficientnet_b0", "none", "../x", "한글", "--", "=", "focal", "auto"]),
                   st.integers(-5, 500).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                   st.text(max_size=12))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_random_argument_combinations_parse_or_fail_cleanly(name, capsys):
    flags = _flags(name)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(flags), VALUES, st.booleans()), max_size=6))
    def check(pairs):
        argv = []
        for flag, value, with_value in pairs:
            argv += [flag, value] if with_value else [flag]
        try:
            args = PARSERS[name](argv)
        except SystemExit as exit_:  # --help (0) or argparse's usage error (2): a message, no traceback
            assert exit_.code in (0, 2)
            return
        except UserError:  # e.g. a --config file that does not exist
            return
        assert isinstance(args, argparse.Namespace)
        try:  # building the script's config checks every value: a UserError is the only way it may fail
            for config_cls in CONFIG_OF[name]:
                from_namespace(config_cls, args)
        except UserError as err:
            assert str(err).startswith("--") or "give " in str(err), str(err)

    check()
    capsys.readouterr()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name,data,reason", [
    ("empty.jpg", b"", "empty file"),
    ("notes.png", b"hello world", "cannot identify image"),
    ("page.jpg", b"<html></html>", "cannot identify image"),
    ("cut.png", _png(40, 40)[:60], "truncated"),
])
def test_known_bad_files_are_skipped_with_the_reason_a_user_can_act_on(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    assert reason in check_image(path)
    tensor, _, detail = InferenceImages([path], TRANSFORM)[0]
    assert tensor is None and reason in detail
    assert ImageSamples([Sample(path, 0)], TRANSFORM)[0] is None


def test_a_strip_of_twenty_million_pixels_is_skipped_not_a_memory_error(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (20_000_000, 1)).save(path, optimize=True)
    assert path.stat().st_size < 100_000  # small on disk: only its shape gives it away
    assert "not a photo" in check_image(path)
    tensor, _, detail = InferenceImages([path], TRANSFORM)[0]
    assert tensor is None and "not a photo" in detail
    assert ImageSamples([Sample(path, 0)], TRANSFORM)[0] is None
