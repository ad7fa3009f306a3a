"""Face parsing backends, the skin-region input, and the segmentation scripts, with a tiny SegFormer built here."""

import csv
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import face_segmentation
import inference
import inference_with_segmentation as iws
import main
import quantize_onnx_models as qom
from data.synthetic_faces import generate_dataset as generate_faces
from data.synthetic_faces import make_face_image
from data.synthetic_lesions import make_lesion_image
from deploy.onnx_export import export_segmentation
from runs.run_info import read_run_info
from segmentation.face_parsing import OnnxParser, OpenCVSkinParser, SegformerParser, build_face_parser
from segmentation.skin_region import (
    MASK_CACHE_DIR,
    MaskCache,
    SkinRegionDecoder,
    cache_settings,
    classifier_input,
    fill_colour,
    load_for_parsing,
    make_skin_region,
    select_parts,
    skin_mask,
)
from tests.conftest import train_args
from utils.errors import UserError

# jonathandinu/face-parsing's order; BiSeNet's CelebAMask-HQ order differs (nose is 10 there), which is why label
# names, never indices, decide what counts as skin.
SEGFORMER_LABELS = ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth"]
BISENET_LABELS = ["background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
                  "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat"]


def _id2label(names):
    return dict(enumerate(names))


@pytest.fixture(scope="module")
def tiny_segformer(tmp_path_factory) -> Path:
    """A random 19-label SegFormer with a face-parsing id2label, saved like a Hugging Face download."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                             decoder_hidden_size=32, num_labels=len(SEGFORMER_LABELS),
                             id2label=_id2label(SEGFORMER_LABELS),
                             label2id={n: i for i, n in enumerate(SEGFORMER_LABELS)})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_segformer")
    SegformerForSemanticSegmentation(config).eval().save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


class StubSegformer(torch.nn.Module):
    """Known output: left half skin, top-right hair, bottom-right nose (at SegFormer's 1/4 resolution)."""

    def __init__(self, names):
        super().__init__()
        self.config = SimpleNamespace(id2label={str(i): n for i, n in enumerate(names)})
        self.names = names

    def forward(self, pixel_values):
        batch, _, height, width = pixel_values.shape
        logits = torch.zeros(batch, len(self.names), height // 4, width // 4)
        h, w = height // 4, width // 4
        logits[:, self.names.index("skin"), :, : w // 2] = 10
        logits[:, self.names.index("hair"), : h // 2, w // 2:] = 10
        logits[:, self.names.index("nose"), h // 2:, w // 2:] = 10
        return SimpleNamespace(logits=logits)


def _processor():
    from transformers import SegformerImageProcessor

    return SegformerImageProcessor(size={"height": 64, "width": 64})


@pytest.mark.parametrize("names, expected", [(SEGFORMER_LABELS, [1, 2]), (BISENET_LABELS, [1, 10])])
def test_default_parts_are_matched_by_name(names, expected):
    assert select_parts(_id2label(names), None) == expected


def test_unknown_part_names_the_available_labels():
    with pytest.raises(UserError, match="choose from .*nose"):
        select_parts(_id2label(SEGFORMER_LABELS), ["cheek"])
    with pytest.raises(UserError, match="no 'skin' or 'nose'"):
        select_parts({0: "background", 1: "road"}, None)
    assert select_parts(_id2label(SEGFORMER_LABELS), ["Skin", "neck"]) == [1, 17]


@pytest.mark.parametrize("names", [SEGFORMER_LABELS, BISENET_LABELS])
def test_stub_parser_mask_and_skin_region(names):
    parser = SegformerParser("stub", model=StubSegformer(names), processor=_processor())
    image = np.full((80, 120, 3), 200, np.uint8)
    label_map = parser.parse(image)
    assert label_map.shape == (80, 120)
    # away from the borders, where bilinear upsampling blends neighbours, the labels are exact
    assert (label_map[5:-5, 5:55] == names.index("skin")).all()
    assert (label_map[5:35, 65:-5] == names.index("hair")).all()
    assert (label_map[45:-5, 65:-5] == names.index("nose")).all()

    mask = skin_mask(label_map, select_parts(parser.id2label, None))
    assert mask[:, :55].all() and mask[45:, 65:].all() and not mask[5:35, 65:].any()
    region = make_skin_region(image, mask, (1, 2, 3))
    assert region.face_found and 0.6 < region.skin_ratio < 0.8
    assert region.image.shape[:2] == (80, 120)  # skin spans the whole image: the crop keeps all of it
    assert (region.image[5:35, 65:-5] == (1, 2, 3)).all()  # the hair is filled
    assert (region.image[45:, :55] == 200).all()  # the skin is kept


def test_skin_region_crops_to_the_skin_box_with_a_margin():
    image = np.arange(100 * 100 * 3, dtype=np.uint32).reshape(100, 100, 3).astype(np.uint8)
    mask = np.zeros((100, 100), bool)
    mask[20:60, 30:50] = True
    region = make_skin_region(image, mask, (0, 0, 0))
    assert region.image.shape[:2] == (40 + 2 * 2, 20 + 2 * 1)  # 5% of 40 rows / 20 columns on each side
    assert (region.image[2:-2, 1:-1] == image[20:60, 30:50]).all()
    empty = make_skin_region(image, np.zeros((100, 100), bool), (0, 0, 0))
    assert not empty.face_found and empty.image is image


def test_local_folder_segformer_and_label_names(tiny_segformer):
    parser = SegformerParser(str(tiny_segformer))
    assert parser.id2label == _id2label(SEGFORMER_LABELS)
    image, _ = make_face_image(np.random.default_rng(0), 96)
    label_map = parser.parse(image)
    assert label_map.shape == (96, 96) and set(np.unique(label_map)) <= set(range(len(SEGFORMER_LABELS)))


def test_unavailable_segformer_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="download it once while online") as err:
        SegformerParser("no-such-org/no-such-face-parser")
    assert "--seg_backend" not in str(err.value)  # quantize_onnx_models.py builds this parser and has no such flag
    with pytest.raises(UserError, match="--seg_model PATH .* --seg_backend opencv"):  # scripts that choose backends
        build_face_parser("segformer", "no-such-org/no-such-face-parser")
    with pytest.raises(UserError, match="folder not found"):
        SegformerParser(str(tmp_path / "missing"))


def test_local_segformer_without_its_processor_file_says_so(tiny_segformer, tmp_path):
    """A folder with the weights but no preprocessor_config.json is not 'offline and not cached'."""
    copy = tmp_path / "no_processor"
    shutil.copytree(tiny_segformer, copy)
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="no preprocessor_config.json") as err:
        SegformerParser(str(copy))
    assert "offline" not in str(err.value) and "save_pretrained" in str(err.value)


def test_segformer_onnx_export_is_dynamic_and_matches(tiny_segformer, tmp_path):
    report = export_segmentation(str(tiny_segformer), None, tmp_path, 17)
    assert report["seg_verified_shape"][0] == 3 and report["seg_label_agreement"] >= 0.999
    onnx_parser = OnnxParser(tmp_path / "seg_model.onnx")
    assert onnx_parser.id2label == _id2label(SEGFORMER_LABELS)
    logits = onnx_parser.session.run(None, {"pixel_values": np.random.rand(2, 3, 96, 64).astype(np.float32)})[0]
    assert logits.shape == (2, len(SEGFORMER_LABELS), 24, 16)
    torch_parser = SegformerParser(str(tiny_segformer))
    image, _ = make_face_image(np.random.default_rng(1), 120)
    assert (onnx_parser.parse(image) == torch_parser.parse(image)).mean() > 0.99


def test_corrupt_segmentation_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "seg_model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="cannot load segmentation model"):
        OnnxParser(bad)
    with pytest.raises(UserError, match="not found"):
        OnnxParser(tmp_path / "missing.onnx")


def test_opencv_backend_finds_a_drawn_face_and_its_skin():
    parser = OpenCVSkinParser()
    rng = np.random.default_rng(3)
    parts = select_parts(parser.id2label, None)
    for size in (128, 200):
        image, truth = make_face_image(rng, size, acne=True)
        label_map = parser.parse(image)
        assert parser.face_detected(label_map)
        mask = skin_mask(label_map, parts)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.8
    lesion, _ = make_lesion_image(rng, 128, "benign")
    label_map = parser.parse(np.clip(lesion, 0, 255).astype(np.uint8))
    assert parser.face_detected(label_map) is False


def test_face_segmentation_script_outputs(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(make_face_image(rng, 128)[0]).save(folder / "sub" / "face one.png")
    Image.fromarray(np.clip(make_lesion_image(rng, 96, "benign")[0], 0, 255).astype(np.uint8)).save(
        folder / "lesion.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    result = face_segmentation.main(face_segmentation.get_args_parser().parse_args(
        ["--input", str(folder), "--output", str(out), "--seg_backend", "opencv"]))
    assert result["no_face"] == ["lesion.jpg"] and result["skipped"] == 1
    for suffix in (".labels.png", ".overlay.jpg", ".mask.png", ".skin.png"):
        assert (out / "sub" / f"face one.png{suffix}").is_file()
    assert not (out / "lesion.jpg.skin.png").exists()
    with open(out / "segmentation_summary.csv", newline="") as fh:
        rows = {r["filename"]: r for r in csv.DictReader(fh)}
    assert rows["sub/face one.png"]["face_found"] == "True" and float(rows["sub/face one.png"]["share_skin"]) > 0.2
    assert rows["lesion.jpg"]["face_found"] == "False"
    assert list(rows["lesion.jpg"]) == ["filename", "face_found", "skin_ratio", "output_scale", "share_background",
                                        "share_skin", "share_face_other"]
    assert rows["lesion.jpg"]["output_scale"] == "1.0"  # small photos are parsed at their full size
    labels = np.asarray(Image.open(out / "sub" / "face one.png.labels.png"))
    assert labels.shape == (128, 128) and set(np.unique(labels)) <= {0, 1, 2}


@pytest.fixture(scope="module")
def face_dataset(tmp_path_factory) -> Path:
    return generate_faces(tmp_path_factory.mktemp("faces") / "faces_dataset", n_train=10, n_test=4, img_size=96)


@pytest.fixture(scope="module")
def skin_region_run(face_dataset, tmp_path_factory) -> Path:
    argv = train_args(face_dataset, tmp_path_factory.mktemp("skin_run"), "--epochs", "1", "--img_size", "48",
                      "--input_kind", "skin_region", "--seg_backend", "opencv")
    return Path(main.main(main.parse_args(argv))["run_dir"])


def test_training_on_skin_regions_records_it_and_caches_masks(skin_region_run, face_dataset):
    info = read_run_info(skin_region_run)
    assert info.input_kind == "skin_region"
    assert info.skin_region["seg_backend"] == "opencv" and info.skin_region["parts"] == ["skin"]
    cache = MaskCache(face_dataset, cache_settings(info.skin_region))
    masks = sorted(cache.folder.rglob("*.png"))
    assert len(masks) == 2 * (10 + 4) and cache.folder.parent.name == MASK_CACHE_DIR
    # the training loader and segmented inference make the same classifier input from the same photo
    photo = sorted((face_dataset / "testset" / "acne").glob("*.png"))[0]
    trained_on = np.asarray(SkinRegionDecoder(cache, fill_colour(info.preprocessing))(photo))
    image = np.asarray(Image.open(photo).convert("RGB"))
    parser = OpenCVSkinParser()
    label_map = parser.parse(image)
    at_inference = make_skin_region(image, skin_mask(label_map, [1]), fill_colour(info.preprocessing),
                                    parser.face_detected(label_map)).image
    assert trained_on.shape == at_inference.shape and (trained_on == at_inference).all()


def _segmented_inference(run_dir, folder, out, *extra):
    return iws.main(iws.get_args_parser().parse_args(
        ["--model_path", str(run_dir), "--inference_folder", str(folder), "--inference_output", str(out),
         "--seg_backend", "opencv", "--num_workers", "0", *extra]))


@pytest.fixture
def mixed_folder(face_dataset, tmp_path) -> Path:
    folder = tmp_path / "to_classify"
    folder.mkdir()
    for photo in sorted((face_dataset / "testset").rglob("*.png"))[:3]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    lesion = make_lesion_image(np.random.default_rng(5), 96, "malignant")[0]
    Image.fromarray(np.clip(lesion, 0, 255).astype(np.uint8)).save(folder / "no_face.jpg")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_segmented_inference_columns_and_no_face_policies(skin_region_run, mixed_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = _segmented_inference(skin_region_run, mixed_folder, tmp_path / "full", "--generate_gradcam")
    assert "trained on whole images" not in caplog.text
    assert summary["predicted"] == 4 and summary["skipped"] == 1 and summary["no_face"] == 1
    info = read_run_info(skin_region_run)
    with open(tmp_path / "full" / "predictions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = {r["filename"]: r for r in reader}
    expected = (["filename", "predicted_class", "predicted_label", "confidence"]
                + [f"prob_{n}" for n in info.class_names] + ["face_found", "skin_ratio"])
    assert reader.fieldnames == expected
    assert rows["no_face.jpg"]["face_found"] == "False" and float(rows["no_face.jpg"]["skin_ratio"]) < 0.01
    assert all(rows[n]["face_found"] == "True" for n in rows if n != "no_face.jpg")
    assert (tmp_path / "full" / "segmented" / "no_face.jpg.skin.png").is_file()
    assert len(list((tmp_path / "full" / "gradcam").glob("*.gradcam.jpg"))) == 4

    summary = _segmented_inference(skin_region_run, mixed_folder, tmp_path / "skip", "--no_face_policy", "skip")
    assert summary["predicted"] == 3 and summary["skipped"] == 2
    with open(tmp_path / "skip" / "skipped.csv", newline="") as fh:
        reasons = {r["filename"]: r["reason"] for r in csv.DictReader(fh)}
    assert reasons["no_face.jpg"].startswith("no face found") and reasons["empty.png"] == "empty file"


def test_segmented_inference_matches_inference_for_the_same_input(skin_region_run, tmp_path):
    """A photo whose skin region is the classifier input gives the same probabilities through both scripts."""
    seg_out = tmp_path / "seg"
    folder = tmp_path / "one"
    folder.mkdir()
    image, _ = make_face_image(np.random.default_rng(9), 96, acne=True)
    Image.fromarray(image).save(folder / "face.png")
    _segmented_inference(skin_region_run, folder, seg_out)
    plain_out = tmp_path / "plain"
    inference.main(inference.parse_args(["--model_path", str(skin_region_run), "--inference_folder",
                                         str(seg_out / "segmented"), "--inference_output", str(plain_out),
                                         "--num_workers", "0"]))
    with open(seg_out / "predictions.csv", newline="") as a, open(plain_out / "predictions.csv", newline="") as b:
        seg_row, plain_row = next(csv.DictReader(a)), next(csv.DictReader(b))
    assert seg_row["predicted_label"] == plain_row["predicted_label"]
    assert abs(float(seg_row["confidence"]) - float(plain_row["confidence"])) < 1e-5


def test_whole_image_model_fed_skin_regions_warns(tiny_run, mixed_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _segmented_inference(tiny_run, mixed_folder, tmp_path / "out")
    assert "trained on whole images" in caplog.text


def test_export_with_segmentation_and_benchmark_it(skin_region_run, tiny_segformer, tmp_path):
    import benchmark

    out = tmp_path / "onnx"
    report = qom.main(qom.get_args_parser().parse_args(
        ["--model_path", str(skin_region_run), "--output_dir", str(out), "--seg_model", str(tiny_segformer),
         "--quantize", "none"]))
    assert (out / "seg_model.onnx").is_file() and report["seg_label_agreement"] >= 0.999
    rows = benchmark.main(benchmark.get_args_parser().parse_args(
        ["--pytorch_model_path", str(skin_region_run), "--onnx_model_dir", str(out), "--iterations", "2",
         "--warmup", "1", "--batch_sizes", "1", "--threads", "1", "--rounds", "1"]))
    seg = [r for r in rows if r["model"].startswith("face parser")]
    assert len(seg) == 1 and seg[0]["mean_ms"] > 0 and (out / "benchmark_segmentation.csv").is_file()


def test_export_without_a_reachable_parser_fails_before_writing(tiny_run, tmp_path):
    with pytest.raises(UserError, match="--skip_segmentation"):
        qom.main(qom.get_args_parser().parse_args(["--model_path", str(tiny_run), "--output_dir",
                                                   str(tmp_path / "o"), "--seg_model", "no-org/no-model"]))
    assert not (tmp_path / "o").exists()


def test_scripts_run_on_the_tiny_segformer_and_its_onnx_export(tiny_segformer, skin_region_run, mixed_folder,
                                                               tmp_path):
    """face_segmentation.py and inference_with_segmentation.py with --seg_backend segformer and onnx."""
    import json

    out = tmp_path / "seg"
    face_segmentation.main(face_segmentation.get_args_parser().parse_args(
        ["--input", str(mixed_folder), "--output", str(out), "--seg_model", str(tiny_segformer),
         "--parts", "skin,nose,neck"]))
    labels = json.loads((out / "labels.json").read_text())
    assert labels["id2label"]["2"] == "nose" and labels["skin_parts"] == ["skin", "nose", "neck"]
    with open(out / "segmentation_summary.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[4:] == [f"share_{n}" for n in SEGFORMER_LABELS]

    export_segmentation(str(tiny_segformer), None, tmp_path / "onnx", 17)
    for backend, model in (("segformer", tiny_segformer), ("onnx", tmp_path / "onnx" / "seg_model.onnx")):
        result = iws.main(iws.get_args_parser().parse_args(
            ["--model_path", str(skin_region_run), "--inference_folder", str(mixed_folder), "--inference_output",
             str(tmp_path / backend), "--seg_backend", backend, "--seg_model", str(model), "--num_workers", "0"]))
        assert result["predicted"] + result["skipped"] == 5
        with open(tmp_path / backend / "predictions.csv", newline="") as fh:
            assert next(csv.reader(fh))[-2:] == ["face_found", "skin_ratio"]


def _large_face_photo(path: Path, seed: int = 3, size=(3000, 2000), face_side: int = 1500) -> Path:
    """A synthetic face scaled up and centred on a camera-size JPEG canvas."""
    drawn = make_face_image(np.random.default_rng(seed), 128, acne=True)[0]
    face = Image.fromarray(drawn)
    canvas = Image.new("RGB", size, tuple(int(v) for v in drawn[0, 0]))  # the drawing's own background
    canvas.paste(face.resize((face_side, face_side), Image.Resampling.BICUBIC),
                 ((size[0] - face_side) // 2, (size[1] - face_side) // 2))
    canvas.save(path, quality=92)
    return path


def test_large_photo_segmentation_outputs_keep_its_aspect_ratio(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _large_face_photo(folder / "big.jpg")
    out = tmp_path / "out"
    face_segmentation.main(face_segmentation.get_args_parser().parse_args(
        ["--input", str(folder), "--output", str(out), "--seg_backend", "opencv"]))
    with open(out / "segmentation_summary.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["face_found"] == "True"
    # 3000x2000 parsed at the 1/2 DCT scale (the 1/4 scale would leave 500 < 512 px on the shorter side)
    assert float(row["output_scale"]) == pytest.approx(0.5)
    for suffix in (".labels.png", ".overlay.jpg", ".mask.png"):
        width, height = Image.open(out / f"big.jpg{suffix}").size
        assert (width, height) == (1500, 1000), suffix
    mask = np.asarray(Image.open(out / "big.jpg.mask.png")) > 127
    rows, cols = np.nonzero(mask)
    # the skin lies inside the pasted face (750 px at this scale, centred), so the mask maps back onto the photo
    assert 375 - 5 <= cols.min() and cols.max() <= 1125 + 5 and 125 - 5 <= rows.min() and rows.max() <= 875 + 5


def test_skin_region_decodes_finer_when_the_skin_box_is_small(tmp_path):
    photo = _large_face_photo(tmp_path / "big.jpg")
    parse_view = load_for_parsing(photo)
    assert parse_view.size == (1500, 1000)
    fill = (128, 128, 128)
    whole = np.ones((1000, 1500), bool)
    # a box covering the photo: the parser's decode already has enough pixels and is used as it is
    assert classifier_input(photo, whole, fill, 440, parse_view).size == (1500, 1000)
    # a 100x100 box at the parser's scale holds 200x200 px of the photo: 180 px needs the full decode
    small = np.zeros((1000, 1500), bool)
    small[450:550, 700:800] = True
    region = classifier_input(photo, small, fill, 180, parse_view)
    assert min(region.size) >= 180 and region.size == (220, 220)  # 200 px + 5 % margin a side
    # and at 90 px the 1/2 scale is enough
    assert classifier_input(photo, small, fill, 90, parse_view).size == (110, 110)
    # no face: the whole photo, decoded as the classifier needs
    assert classifier_input(photo, None, fill, 440, None).size == (750, 500)
    assert classifier_input(photo, None, fill, 0, None).size == (3000, 2000)


def test_large_photo_skin_region_gives_the_same_answer_reduced_or_full(skin_region_run, face_dataset, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    for seed in (3, 4):
        _large_face_photo(folder / f"face{seed}.jpg", seed=seed)
    runs = {}
    for reduced in ("True", "False"):
        out = tmp_path / f"out_{reduced}"
        _segmented_inference(skin_region_run, folder, out, "--reduced_decode", reduced)
        with open(out / "predictions.csv", newline="") as fh:
            runs[reduced] = {r["filename"]: r for r in csv.DictReader(fh)}
        runs[reduced]["shapes"] = [Image.open(p).size for p in sorted((out / "segmented").glob("*.skin.png"))]
    # the skin crop is the same part of the photo, at the scale the classifier needs (never below its 2x resize)
    for (w_reduced, h_reduced), (w_full, h_full) in zip(runs["True"]["shapes"], runs["False"]["shapes"], strict=True):
        assert w_reduced / h_reduced == pytest.approx(w_full / h_full, rel=0.03)
        assert w_reduced < w_full and min(w_reduced, h_reduced) >= 2 * 48
    for name in ("face3.jpg", "face4.jpg"):
        reduced, full = runs["True"][name], runs["False"][name]
        assert reduced["face_found"] == full["face_found"] == "True"
        assert reduced["predicted_label"] == full["predicted_label"]
        assert abs(float(reduced["confidence"]) - float(full["confidence"])) < 0.05
    # the training loader cuts a cached mask out of a reduced decode the same way
    info = read_run_info(skin_region_run)
    cache = MaskCache(face_dataset, cache_settings(info.skin_region))
    photo = _large_face_photo(face_dataset / "testset" / "acne" / "zz_big.jpg")
    try:
        cache.fill_missing([photo], OpenCVSkinParser(), [1])
        mask = cache.read(photo)
        assert mask.shape == (1000, 1500)  # stored at the parser's decode
        picture = SkinRegionDecoder(cache, fill_colour(info.preprocessing), 100)(photo)
        assert min(picture.size) >= 100 and max(picture.size) < 1500  # the skin box, not the whole photo
    finally:
        photo.unlink()
        cache.path_for(photo).unlink(missing_ok=True)


@pytest.mark.parametrize("key,value,problem", [
    ("id2label", '{"0": "background", "1": "../../etc"}', "id2label"),
    ("id2label", '["skin"]', "id2label"),
    ("parser_preprocessing", '{"size": [60000, 60000], "resample": 2, "rescale_factor": 0.0039, '
                             '"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}', "size"),
    ("parser_preprocessing", '{"size": [64, 64], "resample": 2, "rescale_factor": 0.0039, '
                             '"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.0, 0.5]}', "std"),
    ("parser_preprocessing", "not json", "not JSON")])
def test_hostile_parser_metadata_is_a_one_line_error(tiny_segformer, tmp_path, key, value, problem):
    from utils.onnx_runtime import read_onnx_metadata, write_onnx_metadata

    export_segmentation(str(tiny_segformer), None, tmp_path, 17)
    path = tmp_path / "seg_model.onnx"
    write_onnx_metadata(path, {**read_onnx_metadata(path), key: value})
    with pytest.raises(UserError, match=problem):
        OnnxParser(path)
