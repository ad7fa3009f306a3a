"""Run folders and JSON files that survive the real world: two runs started in the same second get two folders, and
every JSON the suite writes is strict JSON."""

import json
import math
from pathlib import Path

import pytest

from runs.run_folder import RunDir, resolve_model_path
from utils.atomic import atomic_write_json
from utils.errors import UserError


def test_a_run_started_in_the_same_second_gets_its_own_folder_even_when_it_loses_the_race(tmp_path, monkeypatch):
    first = RunDir.create(tmp_path, "demo", "m")
    # Another process creates the next name between any check and our mkdir: exists() says no, mkdir finds it.
    racing = first.root.with_name(first.root.name + "_1")
    racing.mkdir()
    monkeypatch.setattr(Path, "exists", lambda self: False)
    with monkeypatch.context() as frozen:
        stamp = first.root.name
        frozen.setattr("runs.run_folder.dt.datetime", type("Clock", (), {
            "now": staticmethod(lambda: type("T", (), {"strftime": lambda self, fmt: stamp})())}))
        second = RunDir.create(tmp_path, "demo", "m")
    assert second.root.name == f"{stamp}_2" and second.root.is_dir()
    assert len({first.root, racing, second.root}) == 3


def test_json_files_never_hold_a_bare_nan(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"temperature": float("nan"), "intervals": [0.5, float("inf")], "n": 3,
                             "nested": {"auc": -math.inf}})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    values = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    assert values == {"temperature": None, "intervals": [0.5, None], "n": 3, "nested": {"auc": None}}


def test_model_path_latest_is_the_newest_finished_run_and_skips_unfinished_ones(tmp_path):
    def run(data, model, stamp, state):
        folder = RunDir(tmp_path / f"dataset+{data}" / f"model+{model}" / stamp)
        folder.root.mkdir(parents=True)
        folder.write_status(state)
        return folder.root

    with pytest.raises(UserError, match="no finished run under .*main.py"):
        resolve_model_path("latest", tmp_path)
    run("skin", "resnet18", "2026-01-02_10-00-00", "finished")
    newest = run("demo", "efficientnet_lite0", "2026-01-03_09-00-00", "finished")
    run("demo", "efficientnet_lite0", "2026-01-03_09-00-00_1", "running")  # still training: not a model yet
    run("demo", "efficientnet_lite0", "2026-01-04_09-00-00", "failed")
    assert resolve_model_path("latest", tmp_path) == newest
    assert resolve_model_path("LATEST", tmp_path) == newest
    same_second = run("demo", "efficientnet_lite0", "2026-01-03_09-00-00_2", "finished")
    assert resolve_model_path("latest", tmp_path) == same_second
    assert resolve_model_path("save_results/x/y", tmp_path) == Path("save_results/x/y")
