import json

import pytest

import main
from configs import TrainConfig, parse_with_config_file
from utils.errors import UserError


def parse(*argv):
    return TrainConfig.from_args(main.parse_args(list(argv)))


def test_defaults_are_the_recipe():
    cfg = parse()
    assert (cfg.data_name, cfg.model_name, cfg.epochs, cfg.batch_size, cfg.img_size) == \
        ("skin", "efficientnet_b0", 12, 32, 224)
    assert cfg.lr_ae == 0.001 and cfg.optimizer == "adamw" and cfg.pre_trained is True and cfg.random_state == 42
    assert cfg.refit and cfg.model_ema and cfg.tta and cfg.calibrate and cfg.sampler == "auto"
    assert cfg.label_smoothing == 0.1
    assert cfg.n_class is None
    assert str(cfg.resolved_data_dir) == "data/skin_dataset"


def test_the_original_readme_command_still_parses_to_its_values():
    cfg = parse("--data_name", "skin", "--model_name", "efficientnet_b0", "--n_class", "6", "--epochs", "50",
                "--batch_size", "32", "--img_size", "224", "--lr_ae", "0.001", "--optimizer", "adam",
                "--pre_trained", "True", "--random_state", "42")
    assert (cfg.n_class, cfg.epochs, cfg.optimizer, cfg.lr_ae, cfg.pre_trained) == (6, 50, "adam", 0.001, True)


@pytest.mark.parametrize("text,expected", [("True", True), ("False", False), ("false", False), ("0", False),
                                           ("yes", True)])
def test_pre_trained_parses_as_written_in_the_original_readme(text, expected):
    assert parse("--pre_trained", text).pre_trained is expected


def test_bare_boolean_flag_means_true():
    assert parse("--amp", "--deterministic").deterministic is True


def test_optimizer_accepts_original_spelling():
    assert parse("--optimizer", "adamW").optimizer == "adamw"


@pytest.mark.parametrize("argv", [["--optimizer", "rmsprop"], ["--scheduler", "linear"], ["--pre_trained", "maybe"],
                                  ["--epochs", "ten"], ["--device", "tpu"]])
def test_invalid_flags_are_rejected_by_argparse(argv, capsys):
    with pytest.raises(SystemExit):
        main.parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--val_ratio", "1.5"], "--val_ratio"), (["--epochs", "0"], "--epochs"),
                                          (["--n_class", "1"], "--n_class")])
def test_out_of_range_values_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse(*argv)


def test_yaml_config_gives_defaults_and_flags_win(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model_name: resnet18\nepochs: 7\noptimizer: adamW\npre_trained: false\n")
    cfg = parse("--config", str(path), "--epochs", "3")
    assert (cfg.model_name, cfg.epochs, cfg.optimizer, cfg.pre_trained) == ("resnet18", 3, "adamw", False)


def test_json_config(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"batch_size": 8, "scheduler": "step"}))
    cfg = parse("--config", str(path))
    assert (cfg.batch_size, cfg.scheduler) == (8, "step")


def test_config_file_with_unknown_key_is_a_user_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("modle_name: resnet18\n")
    with pytest.raises(UserError, match="modle_name"):
        parse_with_config_file(main.get_args_parser(), ["--config", str(path)])


def test_config_file_with_invalid_choice_is_a_user_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("scheduler: linear\n")
    with pytest.raises(UserError, match="--scheduler"):
        parse("--config", str(path))


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse("--config", str(tmp_path / "nope.yaml"))


def test_every_config_field_is_a_flag():
    flags = {a.dest for a in main.get_args_parser()._actions}
    assert set(TrainConfig.__dataclass_fields__) <= flags


def test_config_round_trips_through_dict():
    cfg = parse("--model_name", "resnet18", "--epochs", "3")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("argv,name", [(["--data_dir", "/data/photos/dogcat"], "dogcat"),
                                       (["--data_dir", "data/demo_dataset/"], "demo"),
                                       (["--data_dir", "/x/dogcat", "--data_name", "pets"], "pets"),
                                       ([], "skin")])
def test_the_run_is_named_after_the_data_folder_unless_named(argv, name):
    cfg = parse(*argv)
    assert cfg.data_name == name
    assert TrainConfig.from_dict(cfg.to_dict()).data_name == name
