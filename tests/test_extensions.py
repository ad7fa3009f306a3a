"""The README's two extension examples work end to end: an own nn.Module registered with timm (custom_models/) and a
new dataset reader (--data_format list_files)."""

import shutil

import pytest
import timm
import torch

import inference
import main
import quantize_onnx_models
from configs import DATA_FORMATS, TrainConfig
from dataloaders.list_files import index_from_list_files
from dataloaders.prepare import DATASET_READERS
from tests.conftest import train_args
from torch_trainer.models import build_model, resolve_model_name
from utils.errors import UserError


def _list_dataset(lesion_dataset, tmp_path):
    """The lesion photos in one flat folder, their classes in trainset.txt / testset.txt."""
    root = tmp_path / "listed"
    (root / "images").mkdir(parents=True)
    for split in ("trainset", "testset"):
        lines = ["# image class"]
        for path in sorted((lesion_dataset / split).glob("*/*.jpg")):
            name = f"{split}_{path.parent.name}_{path.name}".replace("_", " ", 1)  # a space in a name is fine
            shutil.copy(path, root / "images" / name)
            lines.append(f"images/{name} {path.parent.name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_every_data_format_has_a_reader():
    assert set(DATA_FORMATS) == set(DATASET_READERS)


def test_the_list_file_reader_reads_classes_and_names_bad_lines(lesion_dataset, tmp_path):
    root = _list_dataset(lesion_dataset, tmp_path)
    index = index_from_list_files(root)
    assert index.class_names == ["benign", "malignant", "normal"]
    assert len(index.train) == 64 * 3 and len(index.test) == 16 * 3
    assert all(s.path.is_file() and s.path.parent.name == "images" for s in index.train)
    train = (root / "trainset.txt").read_text().splitlines()
    (root / "trainset.txt").write_text("\n".join(train + ["images/missing.jpg benign"]))
    with pytest.raises(UserError, match=r"trainset.txt:\d+: image 'images/missing.jpg' not found"):
        index_from_list_files(root)
    (root / "trainset.txt").write_text("\n".join(train + ["../outside.jpg benign"]))
    with pytest.raises(UserError, match="outside the data folder"):
        index_from_list_files(root)
    (root / "trainset.txt").unlink()
    with pytest.raises(UserError, match="trainset.txt not found.*--data_format list_files"):
        index_from_list_files(root)


def test_labels_csv_and_another_format_are_refused_together():
    with pytest.raises(UserError, match="--data_format"):
        TrainConfig(data_format="list_files", labels_csv="labels.csv")


def test_an_own_model_is_built_by_name_and_has_no_silent_imagenet_weights():
    assert resolve_model_name("small_cnn") == "small_cnn" and timm.is_model("small_cnn")
    model, _ = build_model("small_cnn", n_class=3, pre_trained=False)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(UserError, match="--pre_trained False"):
        build_model("small_cnn", n_class=3, pre_trained=True)


@pytest.mark.slow
def test_an_own_model_trained_on_list_files_goes_through_every_script(lesion_dataset, tmp_path):
    root = _list_dataset(lesion_dataset, tmp_path)
    argv = train_args(root, tmp_path / "runs", "--data_format", "list_files", "--epochs", "1")
    argv[argv.index("--model_name") + 1] = "small_cnn"
    run_dir = main.main(main.parse_args(argv))["run_dir"]
    summary = inference.main(inference.parse_args([
        "--model_path", run_dir, "--inference_folder", str(root / "images"), "--inference_output",
        str(tmp_path / "out"), "--generate_gradcam", "--num_workers", "0"]))
    assert summary["predicted"] == 64 * 3 + 16 * 3
    assert len(list((tmp_path / "out" / "gradcam").glob("*.gradcam.jpg"))) == summary["predicted"]
    report = quantize_onnx_models.main(quantize_onnx_models.parse_args([
        "--model_path", run_dir, "--output_dir", str(tmp_path / "onnx"), "--calib_images", "16"]))
    assert (tmp_path / "onnx" / "clf_model.onnx").is_file() and report
