"""Clinical metrics, imbalance options, temperature scaling, and the reports that carry them."""

import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import inference
from configs import TrainConfig
from dataloaders.build import balanced_sampler
from dataloaders.discovery import Sample
from evaluation.calibration import apply_temperature, fit_temperature
from evaluation.metrics import classification_metrics, expected_calibration_error
from torch_trainer import phase
from torch_trainer.losses import FocalLoss, LogitAdjustedLoss, build_criterion, inverse_frequency_weights
from utils.errors import UserError


def test_per_class_specificity_auc_and_ece_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1],
                      [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]])
    m = classification_metrics(y_true, probs.argmax(1), ["a", "b", "c"], probs)
    # class b: predicted for rows 2, 3, 4 -> TP 2, FP 1; negatives are rows 0, 1, 2, 5 -> TN 3 of 4
    assert m["per_class"]["b"]["specificity"] == pytest.approx(0.75)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1.0)
    # class a scores: positives 0.8, 0.6, 0.2 vs negatives 0.1, 0.3, 0.1 -> 8 of 9 pairs ranked right
    assert m["per_class"]["a"]["roc_auc"] == pytest.approx(8 / 9)
    assert m["macro_auc"] == pytest.approx(np.mean([m["per_class"][c]["roc_auc"] for c in "abc"]))
    # ECE by hand (15 equal bins): one sample per confidence, correct except row 2 (0.7 -> b, true a)
    gaps = [abs(0.8 - 1), abs(0.6 - 1), abs(0.7 - 0.5), abs(0.8 - 1), abs(0.4 - 1)]
    # rows 2 (0.7, wrong) and 5 (0.7, right) share a bin: accuracy 0.5 at confidence 0.7
    expected = (gaps[0] + gaps[1] + 2 * gaps[2] + gaps[3] + gaps[4]) / 6
    assert m["ece"] == pytest.approx(expected)


def test_auc_is_none_for_a_class_missing_from_the_labels():
    m = classification_metrics([0, 0, 1], [0, 1, 1], ["a", "b", "c"], np.full((3, 3), 1 / 3))
    assert m["per_class"]["c"]["roc_auc"] is None and m["macro_auc"] is not None


def test_focal_loss_reduces_to_cross_entropy_and_weights_follow_frequency():
    logits, targets = torch.randn(16, 4), torch.randint(0, 4, (16,))
    for smoothing in (0.0, 0.1):
        plain = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=smoothing)
        assert FocalLoss(gamma=0.0, label_smoothing=smoothing)(logits, targets) == pytest.approx(plain.item(), rel=1e-5)
    assert FocalLoss(gamma=2.0)(logits, targets) < torch.nn.functional.cross_entropy(logits, targets)
    assert torch.allclose(inverse_frequency_weights([90, 10]), torch.tensor([100 / 180, 100 / 20]))
    assert torch.allclose(inverse_frequency_weights([5, 5, 5]), torch.ones(3))


def test_balanced_sampler_draws_classes_equally():
    labels = [0] * 95 + [1] * 5
    drawn = [labels[i] for i in balanced_sampler(labels, torch.Generator().manual_seed(0))]
    assert len(drawn) == 100 and 35 <= sum(drawn) <= 65


def _imbalanced_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.0, 1.0, (950, 2)), rng.normal(1.5, 1.0, (50, 2))]).astype(np.float32)
    y = np.array([0] * 950 + [1] * 50)
    return torch.from_numpy(x), torch.from_numpy(y)


def _minority_recall(loss: str, class_weights: str, sampler: str, logit_adjustment: float = 0.0) -> float:
    """Train a logistic regression with the project's loss/sampler builders; recall of the 5% class."""
    x, y = _imbalanced_problem()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = build_criterion(loss, class_weights, [950, 50], 0.0, 2.0, logit_adjustment)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        order = (torch.tensor(list(balanced_sampler(y.tolist(), generator))) if sampler == "balanced"
                 else torch.randperm(len(y), generator=generator))
        for batch in order.split(100):
            optimizer.zero_grad()
            criterion(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    return float((predicted[y == 1] == 1).float().mean())


def test_balanced_options_raise_minority_recall():
    plain = _minority_recall("ce", "none", "random")
    assert plain < 0.4  # plain cross-entropy mostly ignores the 5% class
    for options in [("ce", "auto", "random"), ("ce", "none", "balanced"), ("focal", "auto", "random"),
                    ("ce", "none", "random", 1.0)]:
        assert _minority_recall(*options) > plain + 0.3, options


def _training_draws(monkeypatch, counts: list[int], *flags: str) -> np.ndarray:
    """Class frequencies of the batches main.py's training phase draws for a set with these class counts."""
    monkeypatch.setattr(phase, "build_train_transform", lambda *a, **k: None)
    cfg = TrainConfig.from_dict({"num_workers": 0, **dict(zip(flags[::2], flags[1::2]))})
    ctx = types.SimpleNamespace(cfg=cfg, dist_info=phase.DistInfo(), device=torch.device("cpu"),
                                info=types.SimpleNamespace(preprocessing=None, n_class=len(counts)),
                                image_decoder=None, train_image_decoder=None)
    samples = [Sample(Path(f"{k}_{i}.jpg"), k) for k, count in enumerate(counts) for i in range(count)]
    imbalance = phase.resolve_imbalance(cfg.sampler, cfg.sampler_power, cfg.logit_adjustment, cfg.class_weights,
                                        counts, distributed=False)
    loader, _ = phase._train_loader(ctx, samples, torch.Generator().manual_seed(0), imbalance)
    drawn = [samples[i].label for _ in range(20) for i in iter(loader.sampler or range(len(samples)))]
    return np.bincount(drawn, minlength=len(counts)) / len(drawn)


@pytest.mark.parametrize("flags, expected_share", [
    (("sampler", "random"), [400 / 500, 100 / 500]),
    (("sampler", "balanced"), [0.5, 0.5]),
    (("sampler", "softened", "sampler_power", 0.5), [20 / 30, 10 / 30]),  # sqrt(400) : sqrt(100)
    (("sampler", "softened", "sampler_power", 0.0), [0.5, 0.5]),
])
def test_training_batches_draw_classes_as_the_sampler_says(monkeypatch, flags, expected_share):
    assert _training_draws(monkeypatch, [400, 100], *flags) == pytest.approx(expected_share, abs=0.02)


def test_logit_adjustment_shifts_the_training_logits_by_the_log_prior():
    counts, tau = [300, 100, 50, 50], 1.0
    samples = [Sample(Path(f"{k}_{i}.jpg"), k) for k, count in enumerate(counts) for i in range(count)]
    logits, targets = torch.randn(8, 4), torch.randint(0, 4, (8,))
    prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    expected = torch.nn.functional.cross_entropy(logits + tau * prior.log(), targets, label_smoothing=0.1)
    config = TrainConfig.from_dict({"logit_adjustment": tau, "sampler": "random"})
    chosen = phase.resolve_imbalance("random", 0.5, tau, "none", counts, distributed=False)
    adjusted = phase._train_criterion(config, samples, 4, chosen.logit_adjustment)
    plain = phase._train_criterion(TrainConfig.from_dict({"sampler": "random"}), samples, 4, 0.0)
    assert isinstance(adjusted, LogitAdjustedLoss)
    assert adjusted(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)
    assert plain(logits, targets).item() != pytest.approx(expected.item(), rel=1e-3)
    # with mixup's soft targets the same offsets apply
    soft = torch.nn.functional.one_hot(targets, 4).float()
    mixed = phase._train_criterion(TrainConfig.from_dict({"mixup": 0.2}), samples, 4, tau)
    assert mixed(logits, soft).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits + tau * prior.log(), targets).item(), rel=1e-5)


def test_temperature_scaling_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 5))
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(5, p=p) for p in probs])
    overconfident = true_logits * 3.0
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(3.0, rel=0.1)
    raw = np.exp(overconfident) / np.exp(overconfident).sum(1, keepdims=True)
    scaled = apply_temperature(raw, temperature)
    assert (scaled.argmax(1) == raw.argmax(1)).all()
    assert expected_calibration_error(targets, scaled) < expected_calibration_error(targets, raw) / 3


def test_temperature_is_left_at_one_when_validation_has_no_errors():
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    assert fit_temperature(logits, np.array([0, 1, 0])) == 1.0


def test_run_folder_has_the_clinical_report(tiny_run):
    metrics = json.loads((tiny_run / "test_metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece", "ece_uncalibrated", "temperature"):
        assert key in metrics
    per_class = pd.read_csv(tiny_run / "per_class_metrics.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "specificity", "f1", "support", "roc_auc",
                                       "recall_low", "recall_high", "specificity_low", "specificity_high"]
    assert per_class["support"].sum() == metrics["n_images"]
    assert (per_class["recall_low"] <= per_class["recall"] + 1e-9).all()
    assert (per_class["recall"] <= per_class["recall_high"] + 1e-9).all()
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        low, high = metrics["intervals"][key]
        assert low <= metrics[key] + 1e-9 and metrics[key] <= high + 1e-9, key
    predictions = pd.read_csv(tiny_run / "test_predictions.csv")
    assert len(predictions) == metrics["n_images"]
    probs = predictions.filter(like="prob_").to_numpy()
    assert (probs.argmax(1) == predictions["label"]).mean() == pytest.approx(metrics["accuracy"])
    for name in ("roc_curves.png", "reliability_diagram.png", "confusion_matrix_test.png"):
        assert (tiny_run / name).stat().st_size > 1000
    log = pd.read_csv(tiny_run / "log.csv")
    assert log["val_macro_auc"].between(0, 1).all()
    assert json.loads((tiny_run / "class_info.json").read_text())["temperature"] == metrics["temperature"]


def test_labelled_folder_inference_reproduces_the_test_report(tiny_run, lesion_dataset, tmp_path):
    """The testset scored by inference.py --labels_from_folders gives the run's own test metrics."""
    out = tmp_path / "scored"
    summary = inference.main(inference.parse_args(
        ["--model_path", str(tiny_run), "--inference_folder", str(lesion_dataset / "testset"), "--inference_output",
         str(out), "--labels_from_folders", "--num_workers", "0"]))
    run_metrics = json.loads((tiny_run / "test_metrics.json").read_text())
    scored = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"]["n_images"] == run_metrics["n_images"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        assert scored[key] == pytest.approx(run_metrics[key], abs=1e-4), key
    assert (out / "per_class_metrics.csv").is_file() and (out / "roc_curves.png").is_file()


def test_labels_csv_scoring_equals_folder_scoring_and_resamples_groups(tiny_run, lesion_dataset, tmp_path):
    """The same testset scored against a metadata CSV (bare file names, a patient column, one image unlisted)."""
    testset = lesion_dataset / "testset"
    images = sorted(testset.rglob("*.jpg"))
    listed = images[1:]
    csv = tmp_path / "labels.csv"
    csv.write_text("image,dx,patient\n" + "".join(f"{p.stem},{p.parent.name},P{i // 3}\n"
                                                   for i, p in enumerate(listed)))
    args = ["--model_path", str(tiny_run), "--inference_folder", str(testset), "--num_workers", "0"]
    by_folder = inference.main(inference.parse_args(args + ["--inference_output", str(tmp_path / "a"),
                                                            "--labels_from_folders"]))["metrics"]
    by_csv = inference.main(inference.parse_args(args + [
        "--inference_output", str(tmp_path / "b"), "--labels_csv", str(csv), "--csv_file_column", "image",
        "--csv_label_column", "dx", "--csv_group_column", "patient"]))["metrics"]
    assert by_csv["n_images"] == by_folder["n_images"] - 1
    assert by_csv["unlabelled_images"] == [images[0].relative_to(testset).as_posix()]
    assert by_csv["intervals"]["method"]["resampled_unit"] == "group"
    assert by_csv["intervals"]["method"]["n_units"] == (len(listed) + 2) // 3
    with pytest.raises(UserError, match="not both"):
        inference.main(inference.parse_args(args + ["--inference_output", str(tmp_path / "c"), "--labels_csv",
                                                    str(csv), "--labels_from_folders"]))


def test_learning_curves_show_whole_epochs_and_the_refit(monkeypatch, tmp_path):
    import pandas as pd

    from evaluation import plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.append(fig))
    log = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.9],
                        "train_acc": [0.5, 0.6, 0.7], "val_acc": [0.5, 0.55, 0.6], "val_balanced_acc": [0.5, 0.5, 0.6]})
    refit = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.75], "train_acc": [0.5, 0.65]})
    plots.plot_learning_curves(log, tmp_path / "curves.png", refit)
    for ax in drawn[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # never "epoch 1.5"
        assert any("refit" in text.get_text() for text in ax.get_legend().get_texts())
