"""The run-folder contract (runs.run_info): typed, versioned, and still reading folders written before the
schema had a version."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

from dataloaders.transforms import Preprocessing
from runs.checkpoint import load_run_model, save_checkpoint
from runs.run_folder import RunDir
from runs.run_info import SCHEMA_VERSION, RunInfo, read_run_info, write_run_info
from utils.errors import UserError

# class_info.json exactly as main.py wrote it before schema_version existed (a refit run on isic_binary).
OLD_FIXTURE = Path(__file__).parent / "fixtures" / "class_info_before_schema_version.json"


def test_a_run_folder_from_before_the_schema_version_still_loads(tmp_path):
    run_dir = tmp_path / "old_run"
    run_dir.mkdir()
    shutil.copy(OLD_FIXTURE, run_dir / RunDir.CLASS_INFO)
    old = json.loads(OLD_FIXTURE.read_text())
    assert "schema_version" not in old
    info = read_run_info(run_dir)
    assert info.schema_version == 1 and info.class_names == old["class_names"] and info.n_class == old["n_class"]
    assert info.timm_model_name == "tf_efficientnet_lite0" and info.model_kwargs == {"drop_rate": 0.2}
    assert info.preprocessing == Preprocessing((3, 192, 192), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875, "center")
    assert info.weights == RunDir.REFIT_CKPT and info.tta is True and info.temperature == 1.0
    assert info.refit == old["refit"] and info.calibration == old["calibration"]
    # Weights the test builds (no weights file is committed): the old contract rebuilds the right architecture.
    model = timm.create_model(info.timm_model_name, num_classes=info.n_class, **info.model_kwargs)
    save_checkpoint(run_dir / RunDir.REFIT_CKPT, {"model": model.state_dict()})
    loaded, loaded_info = load_run_model(run_dir)
    assert loaded_info == info
    x = torch.randn(1, *info.preprocessing.input_size)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model.eval()(x))


def test_written_contract_round_trips_and_keeps_the_old_keys(tmp_path):
    info = RunInfo.from_dict(json.loads(OLD_FIXTURE.read_text()))
    write_run_info(tmp_path, info)
    written = json.loads((tmp_path / RunDir.CLASS_INFO).read_text())
    assert written["schema_version"] == SCHEMA_VERSION
    assert {k: v for k, v in written.items() if k != "schema_version"} == json.loads(OLD_FIXTURE.read_text())
    assert read_run_info(tmp_path) == info


def test_a_newer_or_damaged_contract_is_a_one_line_error(tmp_path):
    values = json.loads(OLD_FIXTURE.read_text())
    (tmp_path / RunDir.CLASS_INFO).write_text(json.dumps({**values, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="newer than this skinclf reads"):
        read_run_info(tmp_path)
    (tmp_path / RunDir.CLASS_INFO).write_text(json.dumps({k: v for k, v in values.items() if k != "preprocessing"}))
    with pytest.raises(UserError, match="has no 'preprocessing'"):
        read_run_info(tmp_path)
    (tmp_path / RunDir.CLASS_INFO).write_text(json.dumps({**values, "preprocessing": {"mean": [0.5]}}))
    with pytest.raises(UserError, match="preprocessing input_size None must be"):
        read_run_info(tmp_path)
    (tmp_path / RunDir.CLASS_INFO).write_text("[1, 2]")
    with pytest.raises(UserError, match="not a class_info.json"):
        read_run_info(tmp_path)


def test_onnx_metadata_comes_from_the_contract():
    info = RunInfo.from_dict(json.loads(OLD_FIXTURE.read_text()))
    meta = info.onnx_metadata("runs/x", "fp32")
    assert json.loads(meta["class_names"]) == info.class_names
    assert json.loads(meta["input_size"]) == [3, 192, 192] and json.loads(meta["mean"]) == [0.5] * 3
    assert meta["interpolation"] == "bicubic" and meta["crop_mode"] == "center" and float(meta["crop_pct"]) == 0.875
    assert meta["tta"] == "true" and float(meta["temperature"]) == 1.0 and meta["source_run"] == "runs/x"
    assert meta["schema_version"] == str(SCHEMA_VERSION) and all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize("edit,field", [
    ({"temperature": -1}, "temperature"), ({"temperature": 0}, "temperature"), ({"temperature": "nan"}, "temperature"),
    ({"tta": "false"}, "tta"), ({"class_names": "cd"}, "class_names"), ({"class_names": ["a", "a"]}, "class_names"),
    ({"class_names": ["x/../../outside", "b"]}, "path separator"),
    ({"weights": "../../../etc/passwd"}, "weights"), ({"weights": None}, "weights"),
    ({"abstain": [0.5]}, "abstain"), ({"abstain": {"threshold": 7}}, "abstain threshold"),
    ({"operating_points": {"class": "a"}}, "operating_points"),
    ({"operating_points": [{"class": "nope", "threshold": 0.5}]}, "operating_points"),
    ({"model_kwargs": {"drop_rate": [1]}}, "model_kwargs"), ({"timm_model_name": 5}, "timm_model_name"),
    ({"input_kind": "x"}, "input_kind")])
def test_a_hand_edited_contract_is_refused_with_the_field_named(tmp_path, edit, field):
    values = {**json.loads(OLD_FIXTURE.read_text()), **edit}
    (tmp_path / RunDir.CLASS_INFO).write_text(json.dumps(values))
    with pytest.raises(UserError, match=field):
        read_run_info(tmp_path)


@pytest.mark.parametrize("edit,field", [({"interpolation": "evil"}, "interpolation"),
                                        ({"input_size": [3, 0, 0]}, "input_size"),
                                        ({"input_size": [3, 60000, 60000]}, "input_size"),
                                        ({"std": [0.2, 0.0, 0.2]}, "std"), ({"crop_pct": 2}, "crop_pct")])
def test_hand_edited_preprocessing_is_refused(tmp_path, edit, field):
    values = json.loads(OLD_FIXTURE.read_text())
    values["preprocessing"] = {**values["preprocessing"], **edit}
    (tmp_path / RunDir.CLASS_INFO).write_text(json.dumps(values))
    with pytest.raises(UserError, match=f"preprocessing {field}"):
        read_run_info(tmp_path)


@pytest.mark.parametrize("edit,message", [({"timm_model_name": "no_such_net"}, "not a model this timm knows"),
                                          ({"model_kwargs": {"no_such_argument": 1}}, "do not build")])
def test_a_contract_naming_an_unknown_architecture_is_a_one_line_error(tiny_run, tmp_path, edit, message):
    import shutil

    from runs.checkpoint import load_run_model

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    values = {**json.loads((run_dir / RunDir.CLASS_INFO).read_text()), **edit}
    (run_dir / RunDir.CLASS_INFO).write_text(json.dumps(values))
    with pytest.raises(UserError, match=message):
        load_run_model(run_dir)
