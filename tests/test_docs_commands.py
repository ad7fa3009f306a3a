"""Every command in README.md, REPRODUCIBILITY.md and docs/*.md runs as written.

Each fenced ``bash``/``sh`` command is checked: a ``make`` target exists, ``source`` opens the venv the Makefile
makes, and every ``python`` script or ``python -m`` module parses its flags with its own parser and passes its
options schema (the same validation that runs before any folder is created). Placeholders a reader replaces
(``<run folder>``, ``DATA/isic_binary``, ``$D``) become tiny generated stand-ins. The blocks marked
``<!-- docs-test: run -->`` are run for real, in order, in an empty folder, on the tiny data the first of them makes:
the same commands with small overrides appended (a tiny model, one or two epochs, a few timing iterations).
"""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import configs
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "REPRODUCIBILITY.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- docs-test: run -->"
WALKTHROUGH_MARK = "<!-- docs-test: walkthrough -->"

# The options schema each script validates its flags with (main.py: TrainConfig, through resolve_config).
SCHEMAS = {"main": configs.TrainConfig, "inference": configs.InferenceConfig,
           "inference_with_segmentation": configs.SegmentedInferenceConfig,
           "face_segmentation": configs.FaceSegmentationConfig, "quantize_onnx_models": configs.ExportConfig,
           "benchmark": configs.BenchmarkConfig, "audit_dataset": configs.AuditConfig,
           "run_experiments": configs.SweepOptions, "serve": configs.ServeConfig}

# Appended when a command really runs: the tests' tiny model and sizes (argparse keeps the last value of a flag).
TINY = {
    "data.synthetic_lesions": ["--n_train", "24", "--n_test", "8", "--img_size", "64"],
    "data.synthetic_faces": ["--n_train", "6", "--n_test", "3", "--img_size", "96"],
    "main": ["--pre_trained", "False", "--epochs", "1", "--img_size", "64", "--batch_size", "16", "--num_workers",
             "0", "--refit", "False", "--wandb", "disabled"],
    "inference": ["--num_workers", "0", "--batch_size", "8"],
    "inference_with_segmentation": ["--num_workers", "0", "--batch_size", "8"],
    "audit_dataset": ["--num_workers", "1"],
    "quantize_onnx_models": ["--calib_images", "16"],
    "benchmark": ["--iterations", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--batch_sizes", "1"],
}
# serve.py's routes by method, read from its source (a documented curl command must name one)
SERVED_ROUTES = {"get": set(), "post": set()}
for _method, _path in re.findall(r'@app\.(get|post)\("([^"]+)"', (ROOT / "serving" / "app.py").read_text()):
    SERVED_ROUTES[_method].add(_path)
SERVED_ROUTES["get"].add("/openapi.json")
# A model the tests can build offline in seconds, unless the command names an own one (custom_models/).
TINY_MODEL = "test_efficientnet_gn"
PLACEHOLDER = "__placeholder__"


@dataclass
class DocCommand:
    doc: Path
    line: int
    text: str
    mark: str  # "", "run" or "walkthrough"

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def doc_commands(doc: Path) -> list[DocCommand]:
    """The shell commands of ``doc``'s bash/sh blocks, continuation lines joined, comments and prompts removed."""
    commands, lines = [], doc.read_text(encoding="utf-8").splitlines()
    in_block, mark, pending, start = False, "", "", 0
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not in_block:
            if stripped.startswith("```"):
                language = stripped[3:].strip()
                in_block = language in ("bash", "sh", "shell", "console")
                previous = next((lines[i].strip() for i in range(number - 2, -1, -1) if lines[i].strip()), "")
                mark = {RUN_MARK: "run", WALKTHROUGH_MARK: "walkthrough"}.get(previous, "") if in_block else ""
                if language and not in_block:
                    in_block = None  # a block in another language: skip to its end
            continue
        if stripped.startswith("```"):
            in_block = False
            continue
        if in_block is None:
            continue
        if not pending:
            start = number
        text = stripped.removeprefix("$ ")
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text = pending + text
        pending = ""
        if shlex.split(text, comments=True):
            commands.append(DocCommand(doc, start, text, mark))
    return commands


ALL_COMMANDS = [command for doc in DOCS for command in doc_commands(doc)]


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def split_command(command: DocCommand) -> tuple[str, list[str]]:
    """(module name, argv) of a python/torchrun command; ("make", [target]) and ("source", [path]) otherwise."""
    words = shlex.split(re.sub(r"<[^<>]+>", PLACEHOLDER, command.text), comments=True)  # "<run folder>" is one word
    while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]) or words[0] == "time"):  # VAR=1, time
        words = words[1:]
    program = words[0]
    if program in ("make", "source", ".", "curl", "docker"):
        return ("source" if program == "." else program), words[1:]
    if program == "torchrun":
        script = next(i for i, word in enumerate(words) if word.endswith(".py"))
        return words[script][:-3], words[script + 1:]
    if program in ("python", "python3", ".venv/bin/python"):
        if words[1] == "-m":
            return words[2], words[3:]
        assert words[1].endswith(".py"), f"{command.where}: {command.text}"
        return words[1][:-3].replace("/", "."), words[2:]
    raise AssertionError(f"{command.where}: the docs test does not know how to check {program!r}: {command.text}")


def substitute(argv: list[str], stand_ins: dict[str, str]) -> list[str]:
    """Replace what a reader replaces: <placeholders>, $VARIABLES and the DATA/ folder of the measurement logs."""
    out = []
    for i, word in enumerate(argv):
        flag = argv[i - 1] if i else ""
        if PLACEHOLDER in word or word.startswith("$"):
            word = stand_ins.get(flag, stand_ins["other"])
        elif word.startswith("DATA/"):
            word = stand_ins["--data_dir"]
        out.append(word)
    return out


def parse(module_name: str, argv: list[str]):
    module = importlib.import_module(module_name)
    parse_args = getattr(module, "parse_args", None) or module.get_args_parser().parse_args
    return module, parse_args(argv)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, lesion_dataset):
    folder = tmp_path_factory.mktemp("docs")
    (folder / "exp.yaml").write_text("epochs: 2\nlr_ae: 0.001\n", encoding="utf-8")
    return {"--data_dir": str(lesion_dataset), "--config": str(folder / "exp.yaml"), "--seeds": "0",
            "--model_path": str(folder / "run"), "other": str(folder / "x")}


def test_the_docs_hold_commands_and_the_walkthrough_is_marked():
    assert len(ALL_COMMANDS) > 60
    readme = [c for c in ALL_COMMANDS if c.doc.name == "README.md"]
    assert [split_command(c)[1] for c in readme[:2]] == [["demo"], ["test"]]  # the two set-up commands come first
    walkthrough = [split_command(c)[0] for c in readme if c.mark == "walkthrough"]
    assert walkthrough == ["data.synthetic_lesions", "main", "inference", "quantize_onnx_models", "benchmark"]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.where)
def test_every_documented_command_parses_and_validates(command, stand_ins, monkeypatch):
    name, argv = split_command(command)
    if name == "make":
        assert set(argv) <= _makefile_targets(), f"{command.where}: no such make target: {argv}"
        return
    if name == "source":
        assert argv == [".venv/bin/activate"] and "-m venv $(VENV)" in (ROOT / "Makefile").read_text()
        return
    if name == "curl":  # a request to serve.py: the route must exist with that method
        url = next(word for word in argv if word.startswith("http"))
        method = "post" if any(word in ("-F", "--form") for word in argv) else "get"
        path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
        assert path in SERVED_ROUTES[method], f"{command.where}: serve.py has no {method.upper()} {path}"
        return
    if name == "docker":
        assert argv[0] in ("build", "run") and (ROOT / "Dockerfile").is_file(), command.where
        return
    argv = substitute(argv, stand_ins)
    monkeypatch.chdir(ROOT)  # commands are written for the repository root
    try:
        _, args = parse(name, argv)
    except SystemExit as stop:
        pytest.fail(f"{command.where}: argparse rejects `{command.text}` (exit {stop.code})")
    schema = SCHEMAS.get(name)
    if schema is not None:
        configs.from_namespace(schema, args)  # ranges, choices and cross-flag rules, as before a run starts


@pytest.mark.slow
def test_the_runnable_blocks_run_in_order_on_tiny_data(tmp_path, monkeypatch):
    """README's walk-through and the blocks marked to run, as a user pastes them, in a fresh folder."""
    import logging

    monkeypatch.chdir(tmp_path)
    ran = []
    for command in [c for c in ALL_COMMANDS if c.doc.name == "README.md" and c.mark]:
        name, argv = split_command(command)
        argv = argv + TINY.get(name, [])
        if name == "main" and "small_cnn" not in argv:
            argv += ["--model_name", TINY_MODEL]
        module, args = parse(name, argv)
        result = module.main(args)
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers  # the generators' basicConfig
                                        if not isinstance(h, logging.StreamHandler) or getattr(h, "_skinclf_console", 0)]
        ran.append(name)
        assert result is not None, command.where
    assert ran[:5] == ["data.synthetic_lesions", "main", "inference", "quantize_onnx_models", "benchmark"]
    assert (tmp_path / "inference_results" / "demo" / "predictions.csv").is_file()
    assert (tmp_path / "onnx_models" / "clf_model_int8.onnx").is_file()
    assert len(ran) >= 10, ran
