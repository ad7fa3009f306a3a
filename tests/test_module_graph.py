"""The packages keep one import direction (docs/module_map.md): a module imports its own package and the packages
below it, never one above; the picture in docs/module_map.md is the one the code draws."""

import importlib.util
import subprocess
import sys

from tests.conftest import ROOT


def _module_graph():
    spec = importlib.util.spec_from_file_location("module_graph", ROOT / "docs" / "module_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_points_down_the_layers_and_the_picture_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "module_graph.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_an_upward_import_is_caught_also_when_only_a_type_hint_needs_it(tmp_path):
    graph = _module_graph()
    (tmp_path / "dataloaders").mkdir()
    (tmp_path / "prediction").mkdir()
    upward = tmp_path / "dataloaders" / "reader.py"
    upward.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from runs.run_info import RunInfo\n",
                      encoding="utf-8")
    downward = tmp_path / "prediction" / "engine.py"
    downward.write_text("from dataloaders.reader import x\nfrom utils.errors import UserError\n", encoding="utf-8")
    edges, upwards = graph.package_edges([upward, downward], tmp_path)
    assert upwards == ["dataloaders/reader.py:4: dataloaders imports runs, which sits above it"]
    assert edges["prediction"] == {"dataloaders", "utils"}
