"""Error messages and warnings name only flags that exist, and only flags of the script the user ran.

The per-script check runs around every test (conftest.py records each message raised under a script's ``main``);
this file holds the static check over the messages' text and a direct test of the recorder itself.
"""

import ast
import subprocess

import pytest

from tests import error_hints
from tests.conftest import ROOT

MESSAGE_CALLS = {"UserError", "warning", "error", "info", "exception", "critical"}


def message_flags(path):
    """(line, flag) for every --flag in a string of a UserError(...) or logger call in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in MESSAGE_CALLS:
            found += [(node.lineno, flag) for sub in ast.walk(node)
                      if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
                      for flag in error_hints.flags_named(sub.value)]
    return found


def test_every_flag_a_message_names_exists_in_some_script():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [ROOT / name for name in listed.stdout.split() if not name.startswith("tests/")]
    assert len(files) > 50
    known = error_hints.every_script_flag() | error_hints.OTHER_PROGRAMS
    unknown = [f"{path.relative_to(ROOT)}:{line} {flag}" for path in files for line, flag in message_flags(path)
               if flag not in known]
    assert not unknown, f"messages name flags no script accepts: {unknown}"


def test_a_hint_naming_another_scripts_flag_is_caught():
    # face_segmentation.py takes --seg_backend; quantize_onnx_models.py does not: advising it there is a dead end.
    assert "--seg_backend" in error_hints.accepted_flags("face_segmentation")
    assert error_hints.foreign_flags("quantize_onnx_models", "pass --seg_backend opencv") == {"--seg_backend"}
    assert error_hints.foreign_flags("quantize_onnx_models", "pass --skip_segmentation") == set()
    assert error_hints.foreign_flags("inference", "file --x--y.jpg is broken") == set()
    # Advice for another script, named as such, is advice the user can follow.
    assert error_hints.foreign_flags("inference", "retrain with main.py --input_kind skin_region") == set()
    assert error_hints.foreign_flags("inference", "retrain with main.py; or pass --input_kind x") == {"--input_kind"}
    assert error_hints.foreign_flags("inference", "export one with quantize_onnx_models.py or pass --onnx_model F") \
        == set()
    assert error_hints.foreign_flags("inference", "export with quantize_onnx_models.py or pass --calib_images 9") \
        == {"--calib_images"}


def test_the_recorder_sees_errors_raised_under_a_scripts_main(tmp_path):
    import quantize_onnx_models
    from tests import conftest

    with pytest.raises(Exception):
        quantize_onnx_models.main(quantize_onnx_models.parse_args(["--model_path", str(tmp_path / "missing")]))
    assert any(script == "quantize_onnx_models" and "missing" in message for script, message in conftest._hints_said)
    conftest._hints_said.clear()
