"""The training recipe: refit on every labelled image, EMA weights delivered, guarded calibration, sampler auto."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
from configs import TrainConfig
from dataloaders.transforms import build_eval_transform, resolve_preprocessing
from evaluation.calibration import guarded_temperature
from prediction.predictors import softmax
from runs.checkpoint import load_run_model
from runs.run_folder import RunDir
from tests.conftest import TINY_MODEL, interrupt_after_checkpoint, train_args
from torch_trainer import phase, training
from torch_trainer.losses import LogitAdjustedLoss
from utils.errors import UserError


def train(argv):
    return main.main(main.parse_args(argv))


def split_paths(run_dir: Path, split: str) -> set[str]:
    return set(pd.read_csv(run_dir / f"split_{split}.csv")["filepath"])


def relative(samples, root: Path) -> set[str]:
    return {s.path.relative_to(root).as_posix() for s in samples}


@pytest.fixture(scope="module")
def refit_run(lesion_dataset, tmp_path_factory):
    """A run with the refit, recording which images each phase trained and validated on."""
    seen = {}
    real_run_phase = phase.run_phase

    def spy(files, ctx, model, train_samples, val_samples, **kwargs):
        seen[files.name] = (list(train_samples), val_samples, kwargs)
        return real_run_phase(files, ctx, model, train_samples, val_samples, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "run_phase", spy)
        result = train(train_args(lesion_dataset, tmp_path_factory.mktemp("refit"), "--refit", "True"))
    return Path(result["run_dir"]), seen


@pytest.mark.slow
def test_refit_trains_on_train_plus_validation_and_is_the_delivered_model(refit_run, lesion_dataset):
    run_dir, seen = refit_run
    train_files, val_files = split_paths(run_dir, "train"), split_paths(run_dir, "val")
    assert relative(seen["select"][0], lesion_dataset) == train_files
    assert relative(seen["select"][1], lesion_dataset) == val_files
    assert relative(seen["refit"][0], lesion_dataset) == train_files | val_files and seen["refit"][1] is None

    info = json.loads((run_dir / RunDir.CLASS_INFO).read_text())
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert info["weights"] == metrics["weights"] == RunDir.REFIT_CKPT
    assert info["refit"] == {"epochs": metrics["best_epoch"], "images": len(train_files | val_files)}
    assert len(pd.read_csv(run_dir / RunDir.REFIT_LOG_CSV)) == metrics["best_epoch"]
    assert set(metrics["variants"]) == {"no_refit", "no_tta", "no_ema"}
    assert json.loads((run_dir / RunDir.VAL_METRICS).read_text())["n_images"] == len(val_files)

    # the defaults: the latest epoch within noise of the best is kept, and the refit's learning-rate schedule spans
    # its own epochs, so it ends at the low rate however early the selected epoch was
    assert (metrics["epoch_selection"], metrics["refit_schedule"]) == ("one_se", "compressed")
    assert 1 <= metrics["highest_score_epoch"] <= metrics["best_epoch"]
    assert seen["refit"][2]["schedule_epochs"] == seen["refit"][2]["stop_after"] == metrics["best_epoch"]
    refit_rates = pd.read_csv(run_dir / RunDir.REFIT_LOG_CSV)["lr"]
    assert refit_rates.iloc[-1] < 0.2 * refit_rates.max() or len(refit_rates) == 1

    model, _ = load_run_model(run_dir)
    delivered = torch.load(run_dir / RunDir.REFIT_CKPT, weights_only=True)["model"]
    selected = torch.load(run_dir / RunDir.BEST_CKPT, weights_only=True)["model"]
    state = model.state_dict()
    assert all(torch.equal(state[k], delivered[k]) for k in delivered)
    assert not all(torch.equal(selected[k], delivered[k]) for k in delivered)
    best_model, _ = load_run_model(run_dir, "best")
    assert all(torch.equal(best_model.state_dict()[k], selected[k]) for k in selected)


@pytest.mark.slow
def test_int8_of_a_refit_run_is_chosen_on_the_checkpoint_that_never_saw_the_validation_images(refit_run, tmp_path,
                                                                                              monkeypatch):
    import quantize_onnx_models as qom
    from deploy import onnx_export, onnx_quant

    run_dir, _ = refit_run
    calls = []
    real = onnx_quant.quantize_verified

    def spy(fp32_path, *args, **kwargs):
        calls.append((Path(fp32_path).name, kwargs.get("chosen_on")))
        report = real(fp32_path, *args, **kwargs)
        calls[-1] += (report,)
        return report

    monkeypatch.setattr(onnx_export, "quantize_verified", spy)
    report = qom.main(qom.parse_args(["--model_path", str(run_dir), "--output_dir", str(tmp_path / "export"),
                                      "--calib_images", "16", "--min_agreement", "0.9"]))
    (held_out_file, held_out_given, held_out), (delivered_file, given, _) = calls
    assert held_out_file == "held_out_fp32.onnx" and held_out_given is None
    assert given is held_out and report["int8_chosen_on"] == RunDir.BEST_CKPT
    assert report["int8_float_node_names"] == held_out["int8_float_node_names"]
    assert report["val_top1_agreement"] == held_out["val_top1_agreement"] and "seen_val_top1_agreement" in report
    assert not list((tmp_path / "export").glob(".held-out-*"))
    # the held-out file's agreement is with model_best.pth's own answers, which differ from the delivered model's
    best, _ = load_run_model(run_dir, "best")
    delivered, _ = load_run_model(run_dir)
    assert any(not torch.equal(a, b) for a, b in zip(best.state_dict().values(), delivered.state_dict().values()))


@pytest.mark.slow
def test_ema_weights_are_what_gets_saved_evaluated_and_exported(refit_run):
    run_dir, _ = refit_run
    for name in (RunDir.BEST_CKPT, RunDir.REFIT_CKPT):
        ckpt = torch.load(run_dir / name, weights_only=True)
        assert not all(torch.equal(ckpt["model"][k], ckpt["model_train"][k]) for k in ckpt["model"]), name
    # inference.py, quantize_onnx_models.py and benchmark.py all rebuild the model through load_run_model
    model, info = load_run_model(run_dir)
    ema = torch.load(run_dir / info.weights, weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)


@pytest.mark.slow
def test_run_interrupted_during_the_refit_resumes_to_the_same_model(refit_run, lesion_dataset, tmp_path,
                                                                     monkeypatch):
    straight, _ = refit_run
    interrupt_after_checkpoint(monkeypatch, lambda path, state: path.name == RunDir.REFIT_CKPT and state["epoch"] == 0)
    with pytest.raises(KeyboardInterrupt):
        train(train_args(lesion_dataset, tmp_path, "--refit", "True"))
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "dataset+demo" / f"model+{TINY_MODEL}").iterdir()
    assert len(pd.read_csv(run_dir / RunDir.REFIT_LOG_CSV)) == 1
    train(["--resume", str(run_dir), "--num_workers", "0"])
    resumed = torch.load(run_dir / RunDir.REFIT_CKPT, weights_only=True)["model"]
    reference = torch.load(straight / RunDir.REFIT_CKPT, weights_only=True)["model"]
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert json.loads((run_dir / RunDir.CLASS_INFO).read_text())["weights"] == RunDir.REFIT_CKPT


def _sampled_labels(logits: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(logits.shape[1], p=row) for row in softmax(logits)])


def test_calibration_guard_keeps_t_1_when_fitting_does_not_help():
    logits = np.random.default_rng(0).normal(size=(600, 3)) * 2
    targets = _sampled_labels(logits, 1)  # labels drawn from the model's own probabilities: calibrated at T = 1
    result = guarded_temperature(logits, targets)
    assert result.temperature == 1.0 and not result.accepted
    assert result.fitted != 1.0  # the plain fit would still have moved it
    # The same labels with 4x sharper logits: over-confident, and the guard lets the fitted T through.
    result = guarded_temperature(logits * 4, targets)
    assert result.accepted and 3.0 < result.temperature < 5.5
    assert result.cv_nll_fitted < result.cv_nll_identity


def test_calibration_guard_sharpens_only_on_strong_evidence():
    logits = np.random.default_rng(0).normal(size=(600, 3)) * 2
    targets = _sampled_labels(logits, 1)
    # Logits at 0.85x: mildly under-confident; the fit sharpens (T < 1) for a gain below the 10% bar.
    mild = guarded_temperature(logits * 0.85, targets)
    assert mild.fitted < 1.0 and mild.cv_nll_fitted < mild.cv_nll_identity
    assert mild.temperature == 1.0 and "sharpening needs 10.0%" in mild.reason
    # Logits at 0.25x: strongly under-confident; the gain clears the bar and T goes well below 1.
    strong = guarded_temperature(logits * 0.25, targets)
    assert strong.accepted and strong.temperature < 0.5


def test_calibration_guard_warns_about_a_small_calibration_set(caplog):
    logits = np.random.default_rng(0).normal(size=(60, 3)) * 8
    guarded_temperature(logits, _sampled_labels(logits / 8, 2))
    assert "only 60 calibration images" in caplog.text


LA = phase.AUTO_LOGIT_ADJUSTMENT


@pytest.mark.parametrize("counts, flags, distributed, expected", [
    # --sampler auto: the rule, by the class counts of all labelled training images
    ([100, 100], {}, False, ("random", None, 0.0)),
    ([140, 100], {}, False, ("random", None, 0.0)),  # 1.4x: not corrected
    ([40, 30], {}, False, ("random", None, 0.0)),  # few images, but balanced
    ([238, 145, 130, 126, 112, 102], {}, False, ("balanced", 0.0, 0.0)),  # dermnet_a: 2.3x, >= 80 a class
    ([150, 100], {}, False, ("balanced", 0.0, 0.0)),
    ([150, 79], {}, False, ("random", None, LA)),  # a class under 80 images
    ([76, 34, 63, 75, 52, 66, 58, 74, 74, 66, 58, 49], {}, False, ("random", None, LA)),  # dermnet_c: 2.2x
    ([42, 314, 89, 300, 236, 382, 158, 114], {}, False, ("random", None, LA)),  # isic_9class: 9.1x
    ([80, 800], {}, False, ("balanced", 0.0, 0.0)),  # 10x, but 80 images or more a class
    ([821, 772], {}, False, ("random", None, 0.0)),  # isic_binary: 1.06x
    ([150, 100], {}, True, ("random", None, LA)),  # torchrun has no weighted sampler yet
    ([300, 100], {"logit_adjustment": 0.5}, False, ("random", None, 0.5)),  # the user's tau, no stacking
    ([300, 50], {"class_weights": "auto"}, False, ("random", None, 0.0)),  # the user's weights, no stacking
    # a named sampler is used as named, with or without imbalance
    ([300, 50], {"sampler": "random"}, False, ("random", None, 0.0)),
    ([100, 100], {"sampler": "balanced"}, False, ("balanced", 0.0, 0.0)),
    ([300, 100], {"sampler": "softened", "sampler_power": 0.3}, False, ("softened", 0.3, 0.0)),
    ([300, 100], {"sampler": "balanced", "logit_adjustment": 1.0}, False, ("balanced", 0.0, 1.0)),
])
def test_sampler_auto_rule_by_class_counts(counts, flags, distributed, expected):
    options = {"sampler": "auto", "sampler_power": 0.5, "logit_adjustment": 0.0, "class_weights": "none", **flags}
    chosen = phase.resolve_imbalance(options["sampler"], options["sampler_power"], options["logit_adjustment"],
                                     options["class_weights"], counts, distributed)
    assert (chosen.sampler, chosen.sampler_power, chosen.logit_adjustment) == expected


@pytest.mark.slow
def test_sampler_auto_trains_an_imbalanced_set_with_the_logit_adjusted_loss(lesion_dataset, tmp_path, monkeypatch):
    data = tmp_path / "imbalanced"
    shutil.copytree(lesion_dataset, data)
    for path in sorted((data / "trainset" / "normal").iterdir())[::2]:  # half of one class: 2x imbalance
        path.unlink()
    losses = []
    real_criterion = phase._train_criterion

    def spying_criterion(cfg, samples, n_class, logit_adjustment):
        losses.append(real_criterion(cfg, samples, n_class, logit_adjustment))
        return losses[-1]

    monkeypatch.setattr(phase, "_train_criterion", spying_criterion)
    result = train(train_args(data, tmp_path / "runs", "--epochs", "1"))
    recorded = result["test_metrics"]["imbalance"]
    assert recorded["sampler"] == "random" and recorded["class_ratio"] >= 1.5
    assert recorded["logit_adjustment"] == phase.AUTO_LOGIT_ADJUSTMENT
    assert isinstance(losses[0], LogitAdjustedLoss) and float(losses[0].offsets.max()) > float(losses[0].offsets.min())


@pytest.mark.parametrize("argv,message", [
    (["--mixup", "0.2", "--batch_size", "15"], "even --batch_size"),
    (["--cutmix", "1.0", "--loss", "focal"], "--loss ce --class_weights none"),
    (["--layer_decay", "1.5"], "--layer_decay"),
    (["--crop_pct", "0"], "--crop_pct"),
])
def test_bad_recipe_flags_are_one_line_errors(argv, message):
    with pytest.raises(UserError, match=message):
        TrainConfig.from_args(main.parse_args(argv))


def test_eval_crop_policy_is_recorded_and_rebuilt_from_the_run_folder():
    import timm
    from PIL import Image

    model = timm.create_model(TINY_MODEL)
    letterbox = resolve_preprocessing(model, 64, "letterbox", 1.0)
    assert (letterbox.crop_mode, letterbox.crop_pct) == ("border", 1.0)
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    x = build_eval_transform(letterbox)(wide)
    # The whole red photo fits, padded above and below: the top row is padding, the centre is red.
    assert x.shape == (3, 64, 64) and x[0, 0, 32] < x[0, 32, 32]
    center = build_eval_transform(resolve_preprocessing(model, 64, "center"))(wide)
    assert torch.allclose(center[:, 0, 32], center[:, 32, 32])  # cropped inside the photo: red everywhere


@pytest.mark.slow
def test_mixup_cutmix_and_layer_decay_change_what_training_does(lesion_dataset, tmp_path, monkeypatch):
    targets_seen, rates_seen = [], []
    real_criterion, real_optimizer = phase._train_criterion, phase.build_optimizer

    def spying_criterion(cfg, samples, n_class, logit_adjustment):
        criterion = real_criterion(cfg, samples, n_class, logit_adjustment)

        def loss(logits, targets):
            targets_seen.append(targets.detach().clone())
            return criterion(logits, targets)
        return loss

    def spying_optimizer(model, spec):
        optimizer = real_optimizer(model, spec)
        rates_seen.append(optimizer)
        return optimizer

    monkeypatch.setattr(phase, "_train_criterion", spying_criterion)
    monkeypatch.setattr(phase, "build_optimizer", spying_optimizer)
    result = train(train_args(lesion_dataset, tmp_path, "--epochs", "1", "--mixup", "0.2", "--cutmix", "1.0",
                              "--layer_decay", "0.8"))
    assert result["test_metrics"]["n_images"] == 48
    # Mixup/CutMix: the loss saw soft targets (one row per image, rows sum to 1, mixed rather than one-hot).
    soft = torch.cat(targets_seen)
    assert soft.dim() == 2 and soft.is_floating_point()
    assert torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-5)
    assert (soft.max(1).values < 0.99).any()
    # Layer decay: earlier blocks learned at a smaller rate than the head (0.8 per block of depth).
    groups = rates_seen[0].param_groups
    scales = sorted({round(g["lr_scale"], 4) for g in groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[-2] == pytest.approx(0.8)
    assert len({g["lr"] for g in groups}) == len(scales)


def test_without_mixup_the_loss_sees_class_indices_and_one_learning_rate():
    import timm

    from torch_trainer.optim import build_optimizer

    cfg = TrainConfig(model_name=TINY_MODEL)
    criterion = phase._train_criterion(cfg, [], 3, 0.0)
    assert isinstance(criterion, torch.nn.Module) and phase.build_mixup(cfg, 3) is None
    optimizer = build_optimizer(timm.create_model(TINY_MODEL, num_classes=3), cfg.optimizer_spec())
    assert {g.get("lr_scale", 1.0) for g in optimizer.param_groups} == {1.0}


@pytest.fixture(scope="module")
def folds_run(lesion_dataset, tmp_path_factory):
    seen = {}
    real_run_phase = phase.run_phase

    def spy(files, ctx, model, train_samples, val_samples, **kwargs):
        seen[files.name] = (list(train_samples), list(val_samples) if val_samples is not None else None)
        return real_run_phase(files, ctx, model, train_samples, val_samples, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "run_phase", spy)
        result = train(train_args(lesion_dataset, tmp_path_factory.mktemp("folds"), "--folds", "3", "--epochs", "1"))
    return Path(result["run_dir"]), seen


@pytest.mark.slow
def test_folds_never_share_an_image_and_the_refit_uses_all_of_them(folds_run, lesion_dataset):
    run_dir, seen = folds_run
    folds = pd.read_csv(run_dir / "folds.csv")
    trainset = {p.relative_to(lesion_dataset).as_posix() for p in (lesion_dataset / "trainset").rglob("*.jpg")}
    assert set(folds["filepath"]) == trainset and folds["filepath"].is_unique
    assert sorted(folds["fold"].unique()) == [1, 2, 3]
    assert folds.groupby("fold")["label"].nunique().eq(3).all()  # stratified: every class in every fold
    held_outs = []
    for k in (1, 2, 3):
        fold_train, held_out = (relative(samples, lesion_dataset) for samples in seen[f"fold {k}"])
        assert not fold_train & held_out
        assert held_out == set(folds.loc[folds["fold"] == k, "filepath"])
        assert fold_train | held_out == trainset
        held_outs.append(held_out)
        assert (run_dir / f"fold_{k}" / RunDir.BEST_CKPT).is_file()
    assert sum(map(len, held_outs)) == len(trainset)
    assert relative(seen["refit"][0], lesion_dataset) == trainset

    oof = pd.read_csv(run_dir / RunDir.OOF_PREDICTIONS)
    assert set(oof["filepath"]) == trainset
    assert {"label", "fold", "prob_benign", "prob_malignant", "prob_normal"} <= set(oof.columns)
    info = json.loads((run_dir / RunDir.CLASS_INFO).read_text())
    assert info["weights"] == RunDir.REFIT_CKPT and info["calibration"]["n_images"] == len(trainset)
    assert json.loads((run_dir / RunDir.OOF_METRICS).read_text())["n_images"] == len(trainset)


@pytest.mark.slow
def test_folds_run_resumes_after_an_interruption(folds_run, lesion_dataset, tmp_path, monkeypatch):
    straight, _ = folds_run
    interrupt_after_checkpoint(monkeypatch, lambda path, state: path.parent.name == "fold_2")
    with pytest.raises(KeyboardInterrupt):
        train(train_args(lesion_dataset, tmp_path, "--folds", "3", "--epochs", "1"))
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "dataset+demo" / f"model+{TINY_MODEL}").iterdir()
    assert not (run_dir / "fold_3").exists()
    train(["--resume", str(run_dir), "--num_workers", "0"])
    resumed = torch.load(run_dir / RunDir.REFIT_CKPT, weights_only=True)["model"]
    reference = torch.load(straight / RunDir.REFIT_CKPT, weights_only=True)["model"]
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("folds,message", [("1", "use at least 2 folds"), ("99", "more than class")])
def test_bad_folds_value_is_a_one_line_error(lesion_dataset, tmp_path, folds, message):
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "main.py"),
                           *train_args(lesion_dataset, tmp_path / "runs", "--folds", folds)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
