"""Killed and interrupted processes: a clean SIGTERM exit that --resume continues exactly, and files that are
always complete under their final names however abruptly a process dies."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import main
from runs import run_folder as rf
from runs.run_folder import RunDir
from tests.conftest import ROOT, train_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _checkpointed_epochs(save_dir: Path) -> int:
    checkpoints = list(save_dir.rglob(RunDir.LAST_CKPT))
    return torch.load(checkpoints[0], weights_only=True)["epoch"] + 1 if checkpoints else 0


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_cleanly_and_resume_matches_a_straight_run(lesion_dataset, tmp_path):
    args = ["--epochs", "4", "--deterministic", "True", "--img_size", "48"]
    # All three runs in fresh processes with the same thread count: CPU float sums depend on it.
    subprocess.run([sys.executable, str(ROOT / "main.py"), *train_args(lesion_dataset, tmp_path / "straight", *args)],
                   cwd=ROOT, env=ENV, check=True, capture_output=True)
    straight_dir = next((tmp_path / "straight").glob("dataset+demo/model+*/*"))

    killed_dir = tmp_path / "killed"
    process = _start([str(ROOT / "main.py"), *train_args(lesion_dataset, killed_dir, *args)])
    deadline = time.time() + 300
    while _checkpointed_epochs(killed_dir) < 1 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # during epoch 2 (epoch 1 just finished)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    run_dir = next(killed_dir.glob("dataset+demo/model+*/*"))
    assert json.loads((run_dir / RunDir.STATUS).read_text())["state"] == "interrupted"
    finished = torch.load(run_dir / RunDir.LAST_CKPT, weights_only=True)["epoch"] + 1
    assert 1 <= finished < 4

    subprocess.run([sys.executable, str(ROOT / "main.py"), "--resume", str(run_dir), "--num_workers", "0"],
                   cwd=ROOT, env=ENV, check=True, capture_output=True)
    a = torch.load(straight_dir / RunDir.LAST_CKPT, weights_only=True)["model"]
    b = torch.load(run_dir / RunDir.LAST_CKPT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = pd.read_csv(straight_dir / RunDir.LOG_CSV)[rf.METRIC_COLUMNS]
    log_b = pd.read_csv(run_dir / RunDir.LOG_CSV)[rf.METRIC_COLUMNS]
    pd.testing.assert_frame_equal(log_a, log_b)


def check_every_file_parses(root: Path) -> int:
    """Every non-temporary file must be complete: parse it by type. Returns how many were checked."""
    import onnx

    checked = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or "wandb" in path.parts:
            continue  # temporary files (".name.tmp.ext"), staging folders and W&B's own files
        suffix = path.suffix.lower()
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".csv":
            assert pd.read_csv(path).columns.size >= 1, path
        elif suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image.verify()
        elif suffix == ".pth":
            torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
        elif suffix == ".log":
            path.read_text(encoding="utf-8", errors="strict")
        checked += 1
    return checked


@pytest.mark.slow
def test_killing_at_random_moments_leaves_only_complete_files(lesion_dataset, tmp_path):
    rng = random.Random(1234)
    save_dir = tmp_path / "runs"
    base = train_args(lesion_dataset, save_dir, "--epochs", "3", "--img_size", "48")
    checked = 0
    for trial in range(4):  # kill -9 (no clean-up at all) at a random moment of a training run
        process = _start([str(ROOT / "main.py"), *base])
        time.sleep(rng.uniform(1.0, 8.0))
        process.kill()
        process.wait()
        checked += check_every_file_parses(save_dir)
    finished = main.main(main.parse_args(base))
    run_dir = Path(finished["run_dir"])
    for script, argv in (
            ("inference.py", ["--model_path", str(run_dir), "--inference_folder", str(lesion_dataset / "testset"),
                              "--inference_output", str(tmp_path / "inference"), "--generate_gradcam"]),
            ("quantize_onnx_models.py", ["--model_path", str(run_dir), "--output_dir", str(tmp_path / "onnx"),
                                         "--skip_segmentation"])):
        for trial in range(2):
            process = _start([str(ROOT / script), *argv])
            time.sleep(rng.uniform(2.0, 10.0))
            process.kill()
            process.wait()
            checked += check_every_file_parses(tmp_path)
    assert checked > 20
