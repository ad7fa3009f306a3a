import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils.device import select_device
from torch_trainer.trainer import EarlyStopping, Precision, evaluate, train_one_epoch
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
    stats = {}
    for epoch in range(3):
        stats = train_one_epoch(model, loader, criterion, optimizer, precision, epoch=epoch, show_progress=False,
                                num_updates=stats.get("num_updates", 0))
    after = evaluate(model, loader, criterion, precision, show_progress=False)
    assert stats["num_updates"] == 12 and stats["images"] == 32
    assert after["loss"] < before["loss"] and after["acc"] >= 0.9
    assert after["probs"].shape == (32, 2) and abs(after["probs"].sum(1) - 1).max() < 1e-5
    assert sorted(after["indices"].tolist()) == list(range(32))


def test_precision_is_full_fp32_on_cpu_even_with_amp():
    assert Precision.for_device(torch.device("cpu"), amp=True).dtype is None


def test_early_stopping_prefers_balanced_accuracy_then_loss():
    stopper = EarlyStopping("val_balanced_acc", patience=2)
    assert stopper.update({"balanced_acc": 0.7, "loss": 0.5}, 0)
    assert stopper.update({"balanced_acc": 0.7, "loss": 0.4}, 1)  # tie on accuracy, lower loss wins
    assert not stopper.update({"balanced_acc": 0.6, "loss": 0.1}, 2)
    assert not stopper.should_stop
    assert not stopper.update({"balanced_acc": 0.7, "loss": 0.45}, 3)
    assert stopper.should_stop and stopper.best_epoch == 1
    restored = EarlyStopping("val_balanced_acc", patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best_key == stopper.best_key and restored.should_stop


def test_early_stopping_on_loss_and_disabled_patience():
    stopper = EarlyStopping("val_loss", patience=0)
    for epoch, loss in enumerate([0.5, 0.6, 0.7, 0.8]):
        stopper.update({"balanced_acc": 1.0, "loss": loss}, epoch)
    assert stopper.best_epoch == 0 and not stopper.should_stop


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU, like CI")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match="--device cpu"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"
