"""Camera-size photos: JPEGs decoded at a reduced DCT scale give the model the same answer, never fewer pixels than
its resize needs, come out upright, and Grad-CAM overlays keep the photo's shape at a capped size."""

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import inference
from dataloaders.image_io import load_rgb
from dataloaders.transforms import Preprocessing, decode_min_side


def _big_copy(source, target, size=(3000, 2000), **save):
    Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=92, **save)
    return target


def test_reduced_decode_keeps_enough_pixels_and_only_touches_jpegs(lesion_dataset, tmp_path):
    photo = _big_copy(next((lesion_dataset / "testset" / "benign").glob("*.jpg")), tmp_path / "big.jpg")
    assert load_rgb(photo).size == (3000, 2000)
    for min_side in (74, 250, 251, 700, 1999, 2000, 2500):
        width, height = load_rgb(photo, min_side=min_side).size
        assert min(width, height) >= min(min_side, 2000), min_side  # never below what the resize needs
        assert width / height == pytest.approx(1.5, abs=0.01)
    assert load_rgb(photo, min_side=250).size == (375, 250)  # 1/8 is exactly enough
    assert load_rgb(photo, min_side=251).size == (750, 500)  # one pixel more needs 1/4
    png = tmp_path / "big.png"
    Image.open(photo).save(png)
    assert load_rgb(png, min_side=74).size == (3000, 2000)  # other formats decode as before


def test_decode_sizes_follow_the_transform():
    pre = Preprocessing((3, 192, 192), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875, "center")
    # timm resizes the shorter side to floor(192 / 0.875) = 219; the decode keeps twice that
    assert decode_min_side(pre) == 440
    # the smallest random-resized crop (25 % of the area, aspect 4/3) must still have 192 px on its smaller side
    assert decode_min_side(pre, train_min_crop_scale=0.25) == 444
    assert 192 <= np.sqrt(0.25 * 444 * 444 / (4 / 3))


def test_exif_rotated_large_jpeg_comes_out_upright(tmp_path):
    # A landscape sensor image tagged "rotate 90° clockwise to view": viewers show it as portrait.
    pixels = np.zeros((2000, 3000, 3), np.uint8)
    pixels[:1000] = (255, 0, 0)  # top half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, quality=92, exif=exif)
    for min_side in (0, 200):
        upright = np.asarray(load_rgb(path, min_side=min_side))
        height, width = upright.shape[:2]
        assert height > width  # portrait, as the photo is meant to be seen
        # rotating 90° clockwise puts the stored top (red) on the right
        assert upright[height // 2, -5, 0] > 200 and upright[height // 2, 5, 0] < 60


@pytest.mark.slow
def test_large_photo_gives_the_same_answer_and_a_capped_overlay_of_its_shape(tiny_run, lesion_dataset, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    sources = sorted((lesion_dataset / "testset").rglob("*.jpg"))[::8][:6]
    for i, source in enumerate(sources):
        _big_copy(source, folder / f"photo_{i}.jpg")

    def predictions(output, *extra):
        inference.main(inference.parse_args(["--model_path", str(tiny_run), "--inference_folder", str(folder),
                                              "--inference_output", str(output), "--num_workers", "0", *extra]))
        with open(output / "predictions.csv", newline="") as fh:
            return {row["filename"]: row for row in csv.DictReader(fh)}

    reduced = predictions(tmp_path / "reduced", "--generate_gradcam")
    full = predictions(tmp_path / "full", "--reduced_decode", "False")
    assert reduced.keys() == full.keys() and len(reduced) == len(sources)
    for name in reduced:
        assert reduced[name]["predicted_label"] == full[name]["predicted_label"], name
        probs = [(float(reduced[name][k]), float(full[name][k])) for k in reduced[name] if k.startswith("prob_")]
        assert max(abs(a - b) for a, b in probs) <= 0.02, name
    overlay = Image.open(tmp_path / "reduced" / "gradcam" / "photo_0.jpg.gradcam.jpg")
    assert overlay.size == (1024, 683)  # the 3000 x 2000 photo's shape, longer side capped at 1024 (the default)


def _first_batch(samples, decoder_fn, pre):
    import torch

    from dataloaders.build import make_loader
    from dataloaders.transforms import build_train_transform
    from utils.seed import seed_everything

    generator = torch.Generator().manual_seed(0)
    seed_everything(0)  # the random crop draws from Python's RNG, the colour jitter from torch's
    transform = build_train_transform(pre, min_crop_scale=0.25, vflip=0.0, color_jitter=0.2, randaugment=False)
    loader = make_loader(samples, transform, 4, 0, train=True, generator=generator, decoder=decoder_fn)
    return next(iter(loader))[0]


def test_decoded_image_cache_gives_the_same_batches_and_rebuilds_damaged_entries(lesion_dataset, tmp_path):
    from dataloaders.discovery import Sample
    from dataloaders.image_cache import CachedDecoder
    from dataloaders.image_io import reduced_decoder

    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((lesion_dataset / "trainset").rglob("*.jpg"))[:4]
    samples = [Sample(_big_copy(s, folder / f"p{i}.jpg", size=(1200, 900)), i % 2) for i, s in enumerate(sources)]
    pre = Preprocessing((3, 64, 64), (0.5,) * 3, (0.5,) * 3, "bilinear", 0.875, "center")
    side = decode_min_side(pre, train_min_crop_scale=0.25)
    cache = CachedDecoder(tmp_path / "cache", side)
    plain = _first_batch(samples, reduced_decoder(side), pre)
    assert (_first_batch(samples, cache, pre) == plain).all()  # first epoch: decoded and written
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 4
    assert (_first_batch(samples, cache, pre) == plain).all()  # later epochs: read from the cache
    # A truncated entry is decoded again, not trusted.
    damaged = cache.entry(samples[0].path)
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert (_first_batch(samples, cache, pre) == plain).all()
    assert np.load(damaged).shape[2] == 3
    # An edited photo gets a new entry (the key is its content), never the old pixels.
    Image.new("RGB", (1200, 900), (0, 255, 0)).save(samples[1].path, quality=92)
    green = np.asarray(cache(samples[1].path))
    assert green[green.shape[0] // 2, green.shape[1] // 2, 1] > 200
    assert len(sorted((tmp_path / "cache").rglob("*.npy"))) == 5


@pytest.mark.slow
def test_training_with_the_image_cache_matches_training_without(lesion_dataset, tmp_path):
    import pandas as pd

    import main
    from runs import run_folder as rf
    from runs.run_folder import RunDir
    from tests.conftest import train_args

    def run(name, *extra):
        argv = train_args(lesion_dataset, tmp_path / name, "--epochs", "1", "--deterministic", "True", *extra)
        return Path(main.main(main.parse_args(argv))["run_dir"])

    cache = tmp_path / "cache"
    cached = run("cached", "--cache_images", "True", "--cache_dir", str(cache))
    plain = run("plain")
    assert len(list(cache.rglob("*.npy"))) > 0
    pd.testing.assert_frame_equal(pd.read_csv(cached / RunDir.LOG_CSV)[rf.METRIC_COLUMNS],
                                  pd.read_csv(plain / RunDir.LOG_CSV)[rf.METRIC_COLUMNS])


@pytest.mark.slow
def test_decode_agreement_scores_camera_copies_as_inference_py_does(tiny_run, lesion_dataset, tmp_path):
    from benchmarks import decode_agreement

    work = tmp_path / "agreement"
    table = decode_agreement.main(decode_agreement.get_args_parser().parse_args(
        ["--run_dirs", str(tiny_run), "--folder", str(lesion_dataset / "testset"), "--work_dir", str(work),
         "--size", "1200x900", "--limit", "3"]))
    assert list(table["decode"]) == ["reduced", "shifted", "original"] and set(table["images"]) == {3}
    # the reduced decode really is reduced: 1200 x 900 at the 1/4 scale keeps twice the resize target (148)
    assert (work / "decode_agreement.md").read_text().startswith("reduced decode of the first copy: 300x225")
    per_image = pd.read_csv(work / "decode_agreement_per_image.csv")
    for decode, flags in (("full", ["--reduced_decode", "False"]), ("reduced", [])):
        output = tmp_path / decode
        inference.main(inference.parse_args(["--model_path", str(tiny_run), "--inference_folder", str(work / "camera"),
                                              "--inference_output", str(output), "--num_workers", "0", *flags]))
        expected = pd.read_csv(output / "predictions.csv")
        scored = per_image[per_image["decode"] == decode]
        probs = [c for c in expected.columns if c.startswith("prob_")]
        assert len(expected) == len(scored) == 3
        for filename, row in expected.set_index("filename").iterrows():
            mine = scored[scored["filename"].map(lambda f: Path(f).name) == Path(filename).name].iloc[0]
            np.testing.assert_allclose(mine[probs].to_numpy(float), row[probs].to_numpy(float), atol=1e-4)
