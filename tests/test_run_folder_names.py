"""Each run-folder file name is spelled in one place (RunDir, or the writer RunDir borrows it from), so renaming a file
is a one-line change and no module builds a run-folder path from its own string."""

import ast
import re
import subprocess

from runs.run_folder import RunDir
from tests.conftest import ROOT

# Prose that mentions a file (help texts, messages, docstrings) is not a spelling: only a string that is the whole
# name (or an f-string whose fixed parts make it) counts.
OUTSIDE_THE_PRODUCT = ("tests/", "benchmarks/", "docs/", "data/")


def _library_and_script_files() -> list:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in listed.stdout.split() if not p.startswith(OUTSIDE_THE_PRODUCT)]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                                          ast.Constant):
            ids.add(id(body[0].value))
    return ids


def _spellings(path) -> list[str]:
    """Every whole string in ``path``: constants as they are, f-strings with {} for each value."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    inside_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip | inside_fstrings:
            found.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            found.append("".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values))
    return found


def _forms(name: str) -> set[str]:
    """How ``name`` can be spelled: as is, with its placeholder as {} (f-string), and a stem with its extensions."""
    plain = re.sub(r"\{\w+\}", "{}", name)
    forms = {name, plain}
    if "." not in name:  # a stem (confusion_matrix_test) or a folder
        forms |= {f"{name}.csv", f"{name}.png"}
    return forms


def test_every_run_folder_file_name_is_spelled_once_by_its_owner():
    names = RunDir.file_names()
    where: dict[str, list[str]] = {name: [] for name in names}
    for path in _library_and_script_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for text in _spellings(path):
            for name in names:
                if text in _forms(name):
                    where[name].append(module)
    wrong = {name: modules for name, modules in where.items() if modules != [names[name]]}
    assert not wrong, f"spelled outside its owner, twice, or not at all: {wrong}"


def test_the_check_sees_a_path_built_from_a_literal(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""The doc mentions model_best.pth."""\nbest = run_dir / "model_best.pth"\n'
                     'split = run_dir / f"split_{name}.csv"\nhelp_text = "see model_best.pth"\n', encoding="utf-8")
    spelled = _spellings(probe)
    assert "model_best.pth" in spelled and "split_{}.csv" in _forms(RunDir.SPLIT_CSV) & set(spelled)
    assert "see model_best.pth" in spelled and not _forms(RunDir.BEST_CKPT) & {"see model_best.pth"}
