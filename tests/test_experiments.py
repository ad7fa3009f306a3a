"""run_experiments.py sweeps, offline W&B logging, and 2-process DDP training under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import main
import run_experiments as rx
from experiments.sweep import build_configs, load_template, paired_against_best
from tests.conftest import ROOT, TINY_MODEL
from tests.wandb_records import read_history
from utils.errors import UserError


def _sweep_args(template, sweep_dir, data, save_dir, *extra):
    argv = ["--template", str(template), "--sweep_dir", str(sweep_dir), "--data_dir", str(data),
            "--save_dir", str(save_dir), "--num_workers", "0", "--latency_iterations", "2", *extra]
    return rx.parse_args(argv), argv


def _write_template(path, grid):
    path.write_text(
        "BASE = {'model_name': '%s', 'pre_trained': False, 'epochs': 1, 'img_size': 48, 'batch_size': 16,\n"
        "        'lr_ae': 0.005, 'data_name': 'demo'}\nGRID = %r\n" % (TINY_MODEL, grid))
    return path


@pytest.mark.slow
def test_sweep_runs_ranks_and_skips_finished_runs(lesion_dataset, tmp_path):
    template = _write_template(tmp_path / "t.py", {"loss": ["ce", "focal"]})
    args, argv = _sweep_args(template, tmp_path / "sweep", lesion_dataset, tmp_path / "runs")
    frame = rx.main(args)
    assert len(frame) == 2 and list(frame["rank"]) == [1, 2]
    assert frame["val_balanced_acc"].is_monotonic_decreasing
    for column in ("run", "loss", "val_balanced_acc", "test_balanced_acc", "test_macro_auc", "test_ece",
                   "test_ece_uncalibrated", "params_m", "size_mb", "cpu_latency_ms", "run_dir", "test_balanced_acc_low",
                   "test_balanced_acc_high", "vs_best_diff", "vs_best_low", "vs_best_high", "vs_best"):
        assert column in frame.columns, column
    summary = pd.read_csv(tmp_path / "sweep" / "experiments_summary.csv")
    assert set(summary["loss"]) == {"ce", "focal"}
    assert "| rank |" in (tmp_path / "sweep" / "experiments_summary.md").read_text()
    assert (tmp_path / "sweep" / "experiments_comparison.png").is_file()
    for run_dir in frame["run_dir"]:  # the template's values reached the run's own config
        assert json.loads((Path(run_dir) / "configs.json").read_text())["img_size"] == 48

    run_folders = sorted((tmp_path / "runs").rglob("model_best.pth"))
    again = rx.main(args)  # an interrupted or repeated sweep continues: nothing finished is retrained
    assert sorted((tmp_path / "runs").rglob("model_best.pth")) == run_folders
    assert list(again["run_dir"]) == list(frame["run_dir"])


def _fake_run(folder: Path, targets, wrong: range) -> Path:
    """A run folder holding only test_predictions.csv, wrong on the images numbered in ``wrong``."""
    folder.mkdir(parents=True)
    n = len(targets)
    right = [i not in wrong for i in range(n)]
    preds = [t if ok else 1 - t for t, ok in zip(targets, right)]
    pd.DataFrame({"filepath": [f"testset/x/{i:03d}.png" for i in range(n)], "label": targets,
                  "prob_a": [0.9 if p == 0 else 0.1 for p in preds],
                  "prob_b": [0.1 if p == 0 else 0.9 for p in preds]}).to_csv(folder / "test_predictions.csv",
                                                                               index=False)
    return folder


def test_summary_says_which_runs_the_test_set_cannot_tell_apart(tmp_path):
    targets = [i % 2 for i in range(300)]
    runs = [_fake_run(tmp_path / name, targets, wrong)  # close: as many errors, on other images; weak: 90 more
            for name, wrong in (("best", range(270, 300)), ("close", range(0, 33)), ("weak", range(180, 300)))]
    frame = paired_against_best(pd.DataFrame({"rank": [1, 2, 3], "run_dir": [str(r) for r in runs]}))
    assert list(frame["vs_best"]) == ["best", "indistinguishable", "worse"]
    assert frame["vs_best_diff"].iloc[2] == pytest.approx(-0.30, abs=0.01)
    assert frame["vs_best_low"].iloc[1] < 0 < frame["vs_best_high"].iloc[1]


def test_sweep_validates_every_run_before_training(lesion_dataset, tmp_path):
    cases = [({"lr": [0.1]}, "unknown option"), ({"loss": ["ce", "dice"]}, "not one of"),
             ({"model_name": ["resnet18", "resnet_nine"]}, "unknown model"), ({"epochs": []}, "non-empty list"),
             ({"resume": ["x"]}, "cannot be set")]
    for grid, message in cases:
        template = _write_template(tmp_path / "t.py", grid)
        args, argv = _sweep_args(template, tmp_path / "sweep", lesion_dataset, tmp_path / "runs")
        with pytest.raises(UserError, match=message):
            rx.main(args)
    assert not (tmp_path / "runs").exists()  # nothing started
    args, argv = _sweep_args(tmp_path / "missing.py", tmp_path / "sweep", lesion_dataset, tmp_path / "runs")
    with pytest.raises(UserError, match="not found"):
        rx.main(args)


def test_yaml_template_and_command_line_precedence(lesion_dataset, tmp_path):
    template = tmp_path / "t.yaml"
    template.write_text("base: {epochs: 7, batch_size: 8}\nruns:\n  - {sampler: balanced}\n  - {sampler: random, "
                        "epochs: 3}\n")
    args, argv = _sweep_args(template, tmp_path / "sweep", lesion_dataset, tmp_path / "runs", "--batch_size", "4",
                             "--epochs", "5")
    configs = {key: cfg for key, _, cfg in build_configs(args, load_template(template))}
    assert configs["sampler=balanced"].epochs == 5 and configs["sampler=balanced"].batch_size == 4
    assert configs["epochs=3,sampler=random"].epochs == 3  # the run's own value beats the command line


def test_wandb_offline_logs_epochs_into_the_run_folder(lesion_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    from tests.conftest import train_args

    result = main.main(main.parse_args(train_args(lesion_dataset, tmp_path, "--wandb", "offline", "--epochs", "2",
                                                  "--img_size", "48")))
    run_dir = Path(result["run_dir"])
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = [row for row in read_history(files[0]) if "epoch" in row]
    log = pd.read_csv(run_dir / "log.csv")
    assert [row["epoch"] for row in history] == list(log["epoch"])
    for row, (_, expected) in zip(history, log.iterrows()):
        assert row["val_balanced_acc"] == pytest.approx(expected["val_balanced_acc"])
        assert row["train_loss"] == pytest.approx(expected["train_loss"])
    assert len(list((run_dir / "gradcam_examples").glob("*.jpg"))) == 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_one_run_folder(lesion_dataset, tmp_path):
    from tests.conftest import train_args

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "main.py"),
           *train_args(lesion_dataset, tmp_path / "runs", "--epochs", "2", "--img_size", "48", "--batch_size", "8",
                       "--refit", "True")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "runs").glob("dataset+demo/model+*/*"))
    assert len(runs) == 1
    run = runs[0]
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2]
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["n_images"] == 16 * 3  # the whole test split, evaluated once
    # the refit ran on both processes and rank 0 delivered it
    assert metrics["weights"] == "model_refit.pth" and (run / "model_refit.pth").is_file()
    assert list(pd.read_csv(run / "refit_log.csv")["epoch"]) == list(range(1, metrics["best_epoch"] + 1))
    assert json.loads((run / "run_status.json").read_text())["state"] == "finished"
    assert done.stderr.count("done: ") + done.stdout.count("done: ") == 1  # rank 0 alone reports
