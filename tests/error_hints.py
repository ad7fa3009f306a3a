"""Which flags an error or warning may name: every flag it names must be one the user's script accepts.

conftest.py records each UserError and each logged warning or error raised under a script's ``main`` during the whole
test suite, and fails the test that produced one naming a flag of another script (quantize_onnx_models.py once
advised --seg_backend, a face_segmentation.py flag). test_error_hints.py checks the messages' text statically: every
flag named anywhere exists in some script.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from types import FrameType
from typing import Optional

SCRIPTS = ("main", "inference", "inference_with_segmentation", "face_segmentation", "quantize_onnx_models",
           "benchmark", "audit_dataset", "run_experiments", "serve")
# Flags of other programs that a message may name: torchrun's.
OTHER_PROGRAMS = {"--nproc_per_node"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")


@functools.lru_cache(maxsize=None)
def accepted_flags(script: str) -> frozenset[str]:
    parser = importlib.import_module(script).get_args_parser()
    return frozenset(parser._option_string_actions)


@functools.lru_cache(maxsize=None)
def every_script_flag() -> frozenset[str]:
    return frozenset().union(*(accepted_flags(script) for script in SCRIPTS))


def flags_named(message: str) -> set[str]:
    return set(FLAG.findall(message))


def outermost_script(frame: Optional[FrameType]) -> Optional[str]:
    """The script whose ``main`` the user ran (run_experiments.py runs main.py's main: the outer one speaks)."""
    found = None
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if name in SCRIPTS and frame.f_code.co_name == "main":
            found = name
        frame = frame.f_back
    return found


# A flag belongs to the script the message names just before it in the same clause ("retrain with main.py
# --input_kind skin_region"), else to the script the user ran ("export one with quantize_onnx_models.py or pass
# --onnx_model FILE": the second clause is for the script that said it).
MENTION = re.compile(r"(?P<script>\b[a-z_]+)\.py\b|(?P<flag>(?<![\w-])--[a-z][a-z0-9_]*)|(?P<stop>[;,]|\.\s|\n|\s(?:or|and|then)\s)")


def foreign_flags(script: str, message: str) -> set[str]:
    """Flags in ``message`` that another script accepts and the script they are advised for rejects: advice the user
    cannot follow."""
    wrong, speaking = set(), script
    for match in MENTION.finditer(message):
        if match["stop"]:
            speaking = script
        elif match["script"]:
            speaking = match["script"] if match["script"] in SCRIPTS else script
        elif match["flag"] in every_script_flag() and match["flag"] not in accepted_flags(speaking):
            wrong.add(match["flag"])
    return wrong


def caller_script() -> Optional[str]:
    return outermost_script(sys._getframe(2))
