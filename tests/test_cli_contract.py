"""The command lines, as a maintainer relies on them: scripts only parse flags and call library code, and the flags
they share mean the same thing everywhere."""

import ast
import subprocess
from pathlib import Path

import pytest

import audit_dataset
import benchmark
import face_segmentation
import inference
import inference_with_segmentation
import main
import quantize_onnx_models
import run_experiments
import serve

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"main": main, "inference": inference, "inference_with_segmentation": inference_with_segmentation,
           "face_segmentation": face_segmentation, "quantize_onnx_models": quantize_onnx_models,
           "benchmark": benchmark, "run_experiments": run_experiments, "audit_dataset": audit_dataset, "serve": serve}
RUN_FOLDER_SCRIPTS = ("inference", "inference_with_segmentation", "quantize_onnx_models", "benchmark", "serve")


def _tracked_python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in listed.stdout.split() if (ROOT / p).is_file()]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_or_benchmark_imports_a_script():
    scripts = set(SCRIPTS) | {"run_experiments_template"}
    offenders = []
    for path in _tracked_python_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "tests":
            continue  # tests drive the scripts' main() in-process
        imported = _imported_modules(path) & scripts
        if relative.as_posix() == "run_experiments.py":
            imported -= {"main"}  # main.get_args_parser(add_help=False) as a parent parser, and main.main
        if imported:
            offenders.append(f"{relative} imports {sorted(imported)}")
    assert not offenders


def test_nothing_edits_sys_path():
    assert not [p for p in _tracked_python_files() if "sys.path.insert" in p.read_text(encoding="utf-8")
                and p.name != Path(__file__).name]


def _actions(parser):
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("name", RUN_FOLDER_SCRIPTS)
def test_the_run_folder_is_model_path_everywhere(name):
    actions = _actions(SCRIPTS[name].get_args_parser())
    assert actions["--model_path"].dest == "model_path" and actions["--model_path"].required


def test_benchmark_keeps_its_old_spelling_as_an_alias():
    args = benchmark.get_args_parser().parse_args(["--pytorch_model_path", "runs/x"])
    assert args.model_path == "runs/x"


def test_device_and_num_workers_mean_the_same_everywhere():
    devices = {name: tuple(_actions(module.get_args_parser())["--device"].choices) for name, module in SCRIPTS.items()
               if "--device" in _actions(module.get_args_parser())}
    assert set(devices) >= {"main", "inference", "inference_with_segmentation", "face_segmentation", "benchmark"}
    assert len(set(devices.values())) == 1, devices
    helps = {name: _actions(module.get_args_parser())["--num_workers"].help.split(" (default")[0]
             for name, module in SCRIPTS.items() if "--num_workers" in _actions(module.get_args_parser())}
    assert len(helps) >= 3 and len(set(helps.values())) == 1, helps


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_names_each_default_once(name):
    parser = SCRIPTS[name].get_args_parser()
    for action in parser._actions:
        if action.help:
            assert action.help.count("(default:") <= 1, f"{name} {action.option_strings}: {action.help}"
    assert parser.format_help().count("(default: inferred) (default") == 0
