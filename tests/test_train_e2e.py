"""End-to-end: main.main trains a tiny model on the generated lesion photos and writes a complete run folder."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import main
from runs import run_folder as rf
from runs.run_folder import RunDir
from tests.conftest import ROOT, interrupt_after_checkpoint, train_args

pytestmark = pytest.mark.slow

RUN_FILES = ["model_last.pth", "model_best.pth", "class_info.json", "configs.json", "log.csv",
             "confusion_matrix_test.csv", "test_metrics.json", "learning_curves.png", "confusion_matrix_test.png",
             "train.log", "split_train.csv", "split_val.csv", "split_test.csv", "skipped_files.csv",
             "run_status.json"]


def train(argv):
    return main.main(main.parse_args(argv))


@pytest.fixture(scope="module")
def two_runs(lesion_dataset, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs")
    first = train(train_args(lesion_dataset, save_dir, "--epochs", "3"))
    second = train(train_args(lesion_dataset, save_dir, "--epochs", "3"))
    return Path(first["run_dir"]), Path(second["run_dir"]), first


def test_run_folder_has_every_file_with_the_right_columns(two_runs, lesion_dataset):
    run_dir, _, result = two_runs
    assert run_dir.parent.name == "model+test_efficientnet_gn" and run_dir.parent.parent.name == "dataset+demo"
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*tmp*")), "temporary files left behind"

    log = pd.read_csv(run_dir / "log.csv")
    assert list(log.columns) == rf.LOG_COLUMNS
    assert log["epoch"].tolist() == [1, 2, 3]
    assert log[["train_loss", "val_loss"]].notna().all().all()

    info = json.loads((run_dir / "class_info.json").read_text())
    assert info["class_names"] == ["benign", "malignant", "normal"]
    assert info["class_to_idx"] == {"benign": 0, "malignant": 1, "normal": 2}
    assert info["timm_model_name"] == "test_efficientnet_gn"
    pre = info["preprocessing"]
    assert pre["input_size"] == [3, 64, 64] and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert {"interpolation", "crop_pct", "crop_mode"} <= set(pre)

    configs = json.loads((run_dir / "configs.json").read_text())
    assert configs["epochs"] == 3 and configs["model_name"] == "test_efficientnet_gn"

    confusion = pd.read_csv(run_dir / "confusion_matrix_test.csv", index_col=0)
    assert list(confusion.index) == ["true_benign", "true_malignant", "true_normal"]
    assert list(confusion.columns) == ["pred_benign", "pred_malignant", "pred_normal"]
    assert confusion.to_numpy().sum() == 48

    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics == result["test_metrics"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "best_epoch"} <= set(metrics)
    assert json.loads((run_dir / "run_status.json").read_text())["state"] == "finished"

    splits = {name: pd.read_csv(run_dir / f"split_{name}.csv") for name in ("train", "val", "test")}
    assert list(splits["train"].columns) == ["filepath", "label", "class_name"]
    assert len(splits["train"]) + len(splits["val"]) == 192 and len(splits["test"]) == 48
    assert not set(splits["train"].filepath) & set(splits["val"].filepath)


def test_model_learns_the_synthetic_task(two_runs):
    metrics = two_runs[2]["test_metrics"]
    assert metrics["balanced_accuracy"] >= 0.75, metrics


def test_checkpoints_carry_everything_needed_to_resume(two_runs):
    ckpt = torch.load(two_runs[0] / "model_last.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "metric", "config", "class_info"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["config"]["model_name"] == "test_efficientnet_gn"


def test_same_seed_gives_the_same_log(two_runs):
    first, second, _ = two_runs
    log_a = pd.read_csv(first / "log.csv")[rf.METRIC_COLUMNS]
    log_b = pd.read_csv(second / "log.csv")[rf.METRIC_COLUMNS]
    pd.testing.assert_frame_equal(log_a, log_b)


def test_interrupted_run_resumes_to_the_same_result(lesion_dataset, tmp_path, monkeypatch, two_runs):
    straight = two_runs[0]
    interrupt_after_checkpoint(monkeypatch, lambda path, state: path.name == RunDir.LAST_CKPT and state["epoch"] == 1)
    with pytest.raises(KeyboardInterrupt):
        train(train_args(lesion_dataset, tmp_path, "--epochs", "3"))
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "dataset+demo" / "model+test_efficientnet_gn").iterdir()
    assert json.loads((run_dir / "run_status.json").read_text())["state"] == "interrupted"
    assert len(pd.read_csv(run_dir / "log.csv")) == 2

    train(["--resume", str(run_dir), "--num_workers", "0"])
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "log.csv")[rf.METRIC_COLUMNS],
                                  pd.read_csv(straight / "log.csv")[rf.METRIC_COLUMNS])
    resumed = torch.load(run_dir / "model_last.pth", weights_only=True)["model"]
    reference = torch.load(straight / "model_last.pth", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_user_mistake_is_one_line_and_leaves_no_run_folder(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--data_dir", str(tmp_path / "missing"),
                           "--save_dir", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: dataset folder not found")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_unreadable_training_image_is_skipped_and_listed(lesion_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(lesion_dataset, data)
    broken = data / "trainset" / "benign" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = train(train_args(data, tmp_path / "runs", "--epochs", "1"))
    skipped = pd.read_csv(Path(result["run_dir"]) / "skipped_files.csv")
    assert list(skipped.columns) == ["filepath", "reason"]
    assert skipped["filepath"].tolist() == [broken.as_posix()]
    split_files = pd.concat(pd.read_csv(Path(result["run_dir"]) / f"split_{s}.csv") for s in ("train", "val"))
    assert "trainset/benign/broken.jpg" not in set(split_files["filepath"])
