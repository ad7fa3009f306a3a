import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from configs import TrainConfig
from evaluation.metrics import EvalResult, balanced_accuracy_standard_error
from torch_trainer.optim import build_scheduler
from torch_trainer.trainer import EarlyStopping, Precision, evaluate, train_one_epoch
from utils.device import select_device
from utils.errors import UserError


def _loader(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, 8, 8, generator=g) + labels.view(-1, 1, 1, 1) * 2.0  # separable by brightness
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=8)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_one_amp_code_path_trains_and_evaluates(dtype):
    # bf16 autocast runs on CPU too, so the AMP branch is exercised without a GPU.
    precision = Precision(torch.device("cpu"), dtype)
    assert not precision.scaler.is_enabled()  # only fp16 needs loss scaling
    model, loader, criterion = _model(), _loader(), torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = evaluate(model, loader, criterion, precision, show_progress=False)
    stats = None
    for epoch in range(3):
        stats = train_one_epoch(model, loader, criterion, optimizer, precision, epoch=epoch, show_progress=False,
                                num_updates=stats.num_updates if stats else 0)
    after = evaluate(model, loader, criterion, precision, show_progress=False)
    assert stats.num_updates == 12 and stats.images == 32
    assert after.loss < before.loss and after.accuracy >= 0.9 and after.balanced_accuracy >= 0.9
    assert after.probs.shape == (32, 2) and abs(after.probs.sum(1) - 1).max() < 1e-5
    assert sorted(after.indices.tolist()) == list(range(32))


def test_precision_is_full_fp32_on_cpu_even_with_amp():
    assert Precision.for_device(torch.device("cpu"), amp=True).dtype is None


def test_early_stopping_prefers_balanced_accuracy_then_loss():
    stopper = EarlyStopping("val_balanced_acc", patience=2)
    assert stopper.update(_scores(0.7, 0.5), 0)
    assert stopper.update(_scores(0.7, 0.4), 1)  # tie on accuracy, lower loss wins
    assert not stopper.update(_scores(0.6, 0.1), 2)
    assert not stopper.should_stop
    assert not stopper.update(_scores(0.7, 0.45), 3)
    assert stopper.should_stop and stopper.best_epoch == 1
    restored = EarlyStopping("val_balanced_acc", patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best_key == stopper.best_key and restored.should_stop


def test_early_stopping_on_loss_and_disabled_patience():
    stopper = EarlyStopping("val_loss", patience=0)
    for epoch, loss in enumerate([0.5, 0.6, 0.7, 0.8]):
        stopper.update(_scores(1.0, loss), epoch)
    assert stopper.best_epoch == 0 and not stopper.should_stop


def _scores(balanced_accuracy: float, loss: float) -> EvalResult:
    """A validation result that carries only its scores (no per-image predictions: standard error 0)."""
    empty = np.zeros(0, dtype=np.int64)
    return EvalResult(loss, balanced_accuracy, balanced_accuracy, empty, empty, np.zeros((0, 2)), empty)


def _validation(correct_per_class: list[int], n_per_class: int, loss: float = 0.5) -> EvalResult:
    """A validation result on ``n_per_class`` images of each class with ``correct_per_class[k]`` of class k right."""
    targets, preds = [], []
    for k, correct in enumerate(correct_per_class):
        targets += [k] * n_per_class
        preds += [k] * correct + [(k + 1) % len(correct_per_class)] * (n_per_class - correct)
    probs = np.eye(len(correct_per_class), dtype=np.float32)[preds] * 0.8 + 0.1
    recall = np.array(correct_per_class) / n_per_class
    return EvalResult(loss, float(np.mean(np.array(preds) == np.array(targets))), float(recall.mean()),
                      np.array(targets), np.array(preds), probs, np.arange(len(targets)))


def test_balanced_accuracy_standard_error_is_the_binomial_one():
    val = _validation([40, 30], 50)  # recalls 0.8 and 0.6
    expected = np.sqrt(0.8 * 0.2 / 50 + 0.6 * 0.4 / 50) / 2
    assert balanced_accuracy_standard_error(val.targets, val.probs.argmax(1)) == pytest.approx(expected)
    assert balanced_accuracy_standard_error([0, 0, 1, 1], [0, 0, 1, 1]) == 0.0


def test_one_se_rule_keeps_the_latest_epoch_within_noise_of_the_best():
    # 50 images a class: the standard error of balanced accuracy near 0.8 is about 4 points
    history = [_validation([35, 35], 50), _validation([42, 41], 50), _validation([36, 37], 50),
               _validation([40, 41], 50), _validation([41, 40], 50)]
    scores = [v.balanced_accuracy for v in history]  # 0.70, 0.83, 0.73, 0.81, 0.81
    one_se, best = EarlyStopping("val_balanced_acc", patience=0, rule="one_se"), EarlyStopping(
        "val_balanced_acc", patience=0, rule="best")
    kept = [epoch for epoch, val in enumerate(history) if one_se.update(val, epoch)]
    for epoch, val in enumerate(history):
        best.update(val, epoch)
    assert best.best_epoch == best.selected_epoch == 1
    # epoch 3 (0.73) is more than one SE below the best and is not kept; epochs 4 and 5 (0.81) are within it
    se = one_se.best_se
    assert scores[1] - scores[2] > se > scores[1] - scores[4]
    assert kept == [0, 1, 3, 4] and one_se.selected_epoch == 4 and one_se.best_epoch == 1
    restored = EarlyStopping("val_balanced_acc", patience=0, rule="one_se")
    restored.load_state_dict(one_se.state_dict())
    assert (restored.selected_epoch, restored.best_epoch, restored.best_se) == (4, 1, se)


def test_one_se_rule_patience_counts_epochs_since_the_selected_one():
    stopper = EarlyStopping("val_balanced_acc", patience=2, rule="one_se")
    stopper.update(_validation([45, 45], 50), 0)   # 0.90
    stopper.update(_validation([30, 30], 50), 1)   # 0.60: out of noise
    assert not stopper.should_stop
    stopper.update(_validation([30, 31], 50), 2)
    assert stopper.should_stop and stopper.selected_epoch == 0


def test_checkpoints_from_before_the_rule_select_their_best_epoch():
    stopper = EarlyStopping("val_balanced_acc", patience=3, rule="one_se")
    stopper.load_state_dict({"best_key": [0.8, -0.4], "best_epoch": 2, "bad_epochs": 1})
    assert (stopper.selected_epoch, stopper.best_se) == (2, 0.0)


def _learning_rates(cfg: TrainConfig, stop_after: int, schedule_epochs=None) -> list[float]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr_ae)
    scheduler = build_scheduler(optimizer, cfg.schedule_spec(), updates_per_epoch=10, num_epochs=schedule_epochs)
    rates = []
    for update in range(stop_after * 10):
        scheduler.step_update(update)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_compressed_refit_schedule_ends_at_the_low_rate_replay_stops_midway():
    cfg = TrainConfig(epochs=6, lr_ae=1e-3, warmup_epochs=1)
    replay = _learning_rates(cfg, stop_after=2)
    compressed = _learning_rates(cfg, stop_after=2, schedule_epochs=2)
    full = _learning_rates(cfg, stop_after=6)
    assert replay == full[:20]                  # the 6-epoch schedule, stopped after epoch 2
    assert replay[-1] > 0.7 * cfg.lr_ae         # ... still near the peak rate
    assert compressed[-1] < 0.05 * cfg.lr_ae    # warm-up and cosine within the 2 epochs: ends low
    assert max(compressed) == pytest.approx(max(full), rel=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU, like CI")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match="--device cpu"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"


def test_early_stopping_refuses_a_monitor_it_does_not_know():
    # Any monitor but val_loss was once read as balanced accuracy: a typo must not silently pick epochs.
    with pytest.raises(ValueError, match="val_auc"):
        EarlyStopping("val_auc", patience=2)


def test_without_a_terminal_an_epoch_logs_its_progress_with_the_time_left(monkeypatch, caplog):
    # Under nohup, CI or a log file tqdm draws nothing; a long epoch must still say how far along it is.
    import logging

    from utils import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    model, loader = _model(), _loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="utils.progress"):
        train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), optimizer, Precision(torch.device("cpu"), None))
    lines = [r.getMessage() for r in caplog.records if r.name == "utils.progress"]
    assert lines[0].startswith(f"epoch 1 train: 1/{len(loader)} batch") and "left" in lines[0] and "loss" in lines[1]
    assert len(lines) == len(loader)
