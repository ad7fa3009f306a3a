"""One options schema (configs.py): every flag declared once, every script's flags generated from it, values checked
before anything is created, --config for every script, resume overrides that mean what the user typed."""

import ast
import dataclasses
import json
import subprocess

import pytest

import audit_dataset
import benchmark
import configs
import face_segmentation
import inference
import inference_with_segmentation
import main
import quantize_onnx_models
import run_experiments
from configs import TrainConfig, flag_fields
from experiments.sweep import run_sweep
from tests.conftest import ROOT
from torch_trainer.training import resolve_config
from utils.errors import UserError

SCRIPTS = [main, inference, inference_with_segmentation, face_segmentation, quantize_onnx_models, benchmark,
           audit_dataset, run_experiments]
CONFIGS = [TrainConfig, configs.InferenceConfig, configs.SegmentedInferenceConfig, configs.FaceSegmentationConfig,
           configs.ExportConfig, configs.BenchmarkConfig, configs.AuditConfig, configs.SweepOptions]


def test_a_flag_name_is_one_declaration_in_every_config_that_takes_it():
    declarations: dict[str, set[int]] = {}
    for cls in CONFIGS:
        for f, flag, _ in flag_fields(cls):
            declarations.setdefault(f.name, set()).add(id(flag))
    twice = sorted(name for name, flags in declarations.items() if len(flags) > 1)
    assert not twice, f"declared more than once: {twice}"
    shared = [name for name in declarations if sum(name in {f.name for f, _, _ in flag_fields(c)} for c in CONFIGS) > 1]
    assert {"device", "num_workers", "data_dir", "labels_csv", "seg_model", "operating_point", "abstain",
            "weights", "tta", "config"} <= set(shared)


def test_shared_flags_have_one_help_and_one_default_in_every_script():
    seen: dict[str, tuple] = {}
    for script in SCRIPTS:
        for action in script.get_args_parser()._actions:
            if not action.option_strings or action.dest == "help":
                continue
            entry = (action.help, action.default, tuple(action.choices or ()))
            assert seen.setdefault(action.dest, entry) == entry, f"--{action.dest} differs in {script.__name__}"


@pytest.mark.parametrize("script,extra,dest,value", [
    (main, [], "epochs", 3), (inference, ["--model_path", "run"], "topk", 3),
    (inference_with_segmentation, ["--model_path", "run"], "parts", "skin"),
    (face_segmentation, ["--input", "photos"], "seg_backend", "opencv"),
    (quantize_onnx_models, ["--model_path", "run"], "opset", 13),
    (benchmark, ["--model_path", "run"], "iterations", 3), (audit_dataset, ["--data_dir", "d"], "tiny_side", 64),
    (run_experiments, [], "latency_iterations", 3)])
def test_every_script_takes_a_config_file_and_the_command_line_wins(tmp_path, script, extra, dest, value):
    path = tmp_path / "options.yaml"
    has_workers = any(a.dest == "num_workers" for a in script.get_args_parser()._actions)
    path.write_text(f"{dest}: {json.dumps(value)}\n" + ("num_workers: 1\n" if has_workers else ""))
    args = script.parse_args(["--config", str(path), *extra])
    assert getattr(args, dest) == value
    if has_workers:
        assert args.num_workers == 1
        assert script.parse_args(["--config", str(path), *extra, "--num_workers", "0"]).num_workers == 0


@pytest.mark.parametrize("text,flag", [("epochs: [1, 2]", "--epochs"), ("epochs: null", "--epochs"),
                                       ("epochs: 1.7", "--epochs"), ("batch_size: 8.5", "--batch_size"),
                                       ("data_dir: 123", "--data_dir"), ("tta: [true]", "--tta"),
                                       ("weight_decay: -1", "--weight_decay"), ("drop_rate: 1.5", "--drop_rate"),
                                       ("color_jitter: -1", "--color_jitter"), ("step_size: 0", "--step_size")])
def test_config_file_values_of_the_wrong_type_or_range_are_one_line_errors(tmp_path, text, flag):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError, match=flag):
        TrainConfig.from_args(main.parse_args(["--config", str(path)]))


@pytest.mark.parametrize("script,argv,flag", [
    (inference, ["--model_path", "r", "--overlay_max_side", "-1"], "--overlay_max_side"),
    (inference, ["--model_path", "r", "--topk", "0"], "--topk"),
    (quantize_onnx_models, ["--model_path", "r", "--min_agreement", "1.5"], "--min_agreement"),
    (quantize_onnx_models, ["--model_path", "r", "--keep_float_stages", "-2"], "--keep_float_stages"),
    (benchmark, ["--model_path", "r", "--batch_sizes", "1,x"], "--batch_sizes"),
    (audit_dataset, [], "--data_dir")])
def test_other_scripts_check_their_values_before_doing_anything(tmp_path, monkeypatch, script, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=flag):
        script.main(script.parse_args(argv))
    assert not any(tmp_path.iterdir())  # no output folder was created


def _saved_run(tmp_path, **values):
    run = tmp_path / "run"
    run.mkdir()
    (run / "configs.json").write_text(json.dumps(TrainConfig(**values).to_dict()))
    return run


def test_resume_applies_a_typed_override_even_when_it_equals_the_default(tmp_path):
    run = _saved_run(tmp_path, epochs=30, patience=3)
    cfg = resolve_config(main.parse_args(["--resume", str(run), "--epochs", "12"]))
    assert cfg.epochs == 12 and cfg.patience == 3 and cfg.resume == str(run)
    assert resolve_config(main.parse_args(["--resume", str(run)])).epochs == 30
    assert resolve_config(main.parse_args(["--resume", str(run), "--patience", "10"])).patience == 10


def test_resume_refuses_a_flag_it_cannot_change(tmp_path):
    run = _saved_run(tmp_path, epochs=30)
    with pytest.raises(UserError, match="--lr_ae cannot change on resume"):
        resolve_config(main.parse_args(["--resume", str(run), "--lr_ae", "0.1"]))
    with pytest.raises(UserError, match="--data_dir"):
        resolve_config(main.parse_args(["--resume", str(run), "--data_dir", "elsewhere"]))


def test_an_abbreviated_flag_counts_as_typed(tmp_path):
    run = _saved_run(tmp_path, epochs=30)
    assert resolve_config(main.parse_args(["--resume", str(run), "--patien", "4"])).patience == 4


def test_a_sweep_hands_configs_to_training_without_a_command_line(tmp_path):
    cfg = TrainConfig(epochs=2, data_dir=str(tmp_path))
    received = []

    def train(run_cfg, on_run_dir):
        received.append(run_cfg)
        return {"run_dir": str(tmp_path)}

    run_sweep([("epochs=2", {"epochs": 2}, cfg)], tmp_path / "sweep", {}, train)
    assert received == [cfg]


def test_enumerations_are_declared_only_in_configs():
    enumerations = {value for name, value in vars(configs).items()
                    if name.isupper() and isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)}
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    again = []
    for relative in listed.stdout.split():
        if relative == "configs.py" or relative.startswith(("tests/", "benchmarks/", "docs/")):
            continue
        for node in ast.walk(ast.parse((ROOT / relative).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
                if tuple(e.value for e in node.elts) in enumerations:
                    again.append(f"{relative}:{node.lineno}")
    assert not again


def test_every_field_of_a_script_config_is_a_flag_or_a_group():
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert "flag" in f.metadata or "group" in f.metadata, f"{cls.__name__}.{f.name}"


# The training run (training.py and its phases) reads TrainConfig and hands each layer below only what it uses.
TRAINING_RUN = {"torch_trainer/training.py", "torch_trainer/phase.py"}
ABOVE_TRAINING = ("experiments/",)


def test_nothing_below_the_training_run_takes_the_whole_training_config():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    packages = ("utils/", "evaluation/", "dataloaders/", "runs/", "segmentation/", "prediction/", "torch_trainer/",
                "deploy/")
    offenders = []
    for relative in listed.stdout.split():
        if not relative.startswith(packages) or relative in TRAINING_RUN or relative.startswith(ABOVE_TRAINING):
            continue
        if "TrainConfig" in (ROOT / relative).read_text(encoding="utf-8"):
            offenders.append(relative)
    assert not offenders


@pytest.mark.parametrize("script,argv,flag", [
    (main, ["--save_dir", "{file}"], "--save_dir"),
    (inference, ["--model_path", "r", "--inference_output", "{file}"], "--inference_output"),
    (quantize_onnx_models, ["--model_path", "r", "--output_dir", "{file}"], "--output_dir"),
    (benchmark, ["--model_path", "r", "--output_dir", "{file}"], "--output_dir"),
    (audit_dataset, ["--data_dir", "d", "--output", "{file}"], "--output"),
    (face_segmentation, ["--input", "p", "--output", "{file}"], "--output")])
def test_an_output_flag_that_names_a_file_is_a_one_line_error_before_anything_runs(tmp_path, script, argv, flag):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    args = script.parse_args([a.format(file=existing) for a in argv])
    with pytest.raises(UserError, match=f"{flag} .* is a file"):
        script.main(args)
    assert existing.read_text() == "mine"


def test_resuming_a_finished_run_is_refused_and_its_record_is_untouched(tmp_path):
    run = _saved_run(tmp_path, epochs=6)
    status = run / "run_status.json"
    status.write_text(json.dumps({"state": "finished", "epochs_run": 6}))
    before = status.read_text()
    with pytest.raises(UserError, match="this run finished; --resume continues an interrupted or failed run"):
        resolve_config(main.parse_args(["--resume", str(run), "--epochs", "12"]))
    assert status.read_text() == before
    status.write_text(json.dumps({"state": "interrupted"}))
    assert resolve_config(main.parse_args(["--resume", str(run), "--epochs", "12"])).epochs == 12


def test_a_sweep_does_not_retrain_a_run_whose_folder_says_it_finished(tmp_path):
    run = _saved_run(tmp_path, epochs=2)
    (run / "run_status.json").write_text(json.dumps({"state": "finished"}))
    (run / "model_last.pth").write_bytes(b"")
    trained = []
    state = {"epochs=2": {"status": "running", "run_dir": str(run)}}
    run_sweep([("epochs=2", {"epochs": 2}, TrainConfig(epochs=2))], tmp_path / "sweep", state,
              lambda cfg, on_run_dir: trained.append(cfg))
    assert trained == [] and state["epochs=2"]["status"] == "finished"
