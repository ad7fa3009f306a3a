"""Subgroup metrics equal the metrics of the subgroup alone; a clearly worse subgroup is warned about, small ones are
reported as too small; bad metadata files are one-line errors."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataloaders.metadata import read_metadata
from evaluation.bootstrap import bootstrap_intervals
from evaluation.metrics import classification_metrics
from evaluation.subgroups import MIN_SUBGROUP, columns_for, log_subgroups, subgroup_metrics
from utils.errors import UserError

CLASSES = ["a", "b", "c"]


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    skin = np.where(np.arange(n) < n // 2, "I-II", "V-VI")
    skill = np.where(skin == "I-II", 3.0, 0.3)  # the model is far worse on darker skin
    logits = rng.normal(size=(n, 3)) + skill[:, None] * np.eye(3)[targets]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    site = np.array(["face"] * (n - 10) + ["palm"] * 10)
    return targets, probs, {"fitzpatrick": list(skin), "site": list(site)}


def test_subgroup_metrics_equal_the_metrics_of_the_subgroup_alone(caplog):
    targets, probs, columns = _data()
    overall = classification_metrics(targets, probs.argmax(1), CLASSES, probs)
    overall["intervals"] = bootstrap_intervals(targets, probs, CLASSES)
    rows = {(r["column"], r["value"]): r for r in subgroup_metrics(targets, probs, CLASSES, columns, overall)}
    dark = np.array(columns["fitzpatrick"]) == "V-VI"
    alone = classification_metrics(targets[dark], probs[dark].argmax(1), CLASSES, probs[dark])
    row = rows[("fitzpatrick", "V-VI")]
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "ece"):
        assert row[key] == pytest.approx(alone[key])
    assert row["recall_b"] == pytest.approx(alone["per_class"]["b"]["recall"])
    assert row["n"] == dark.sum() and row["warning"] is True
    assert rows[("fitzpatrick", "I-II")]["warning"] is False
    palm = rows[("site", "palm")]
    assert palm["too_small"] is True and palm["n"] == 10 < MIN_SUBGROUP and palm["warning"] is False
    with caplog.at_level(logging.INFO):
        log_subgroups(list(rows.values()), overall["balanced_accuracy"])
    assert "fitzpatrick=V-VI" in caplog.text and "too small" in caplog.text and "site=palm (10)" in caplog.text


def test_metadata_csv_is_read_by_any_file_spelling_and_checked(tmp_path):
    root = tmp_path / "data"
    paths = [root / "testset" / "a" / f"img{i}.jpg" for i in range(3)]
    good = tmp_path / "meta.csv"
    good.write_text("filename,sex,fitzpatrick\ntestset/a/img0.jpg,F,II\nimg1,M,\n")
    values = read_metadata(good, paths, root)
    assert values[paths[0]] == {"sex": "F", "fitzpatrick": "II"}
    assert columns_for(paths, values) == {"fitzpatrick": ["II", "(missing)", "(missing)"],
                                          "sex": ["F", "M", "(missing)"]}
    for text, message in (("name,sex\nimg0,F\n", "no column 'filename'"), ("filename\nimg0\n", "only a"),
                          ("filename,sex\nimg9,F\n", "line 2: filename 'img9' is not an image")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            read_metadata(bad, paths, root)


@pytest.mark.slow
def test_main_and_inference_report_subgroups(lesion_dataset, tmp_path):
    import inference
    import main
    from tests.conftest import train_args

    images = sorted((lesion_dataset / "testset").rglob("*.jpg"))
    meta = tmp_path / "meta.csv"
    meta.write_text("filename,device\n" + "".join(f"{p.relative_to(lesion_dataset).as_posix()},"
                                                   f"{'phone' if i % 2 else 'dslr'}\n" for i, p in enumerate(images)))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,device\nx,phone\n")
    with pytest.raises(UserError, match="no column 'filename'"):
        main.main(main.parse_args(train_args(lesion_dataset, tmp_path / "none", "--metadata", str(bad))))
    assert not (tmp_path / "none").exists()
    result = main.main(main.parse_args(train_args(lesion_dataset, tmp_path / "runs", "--metadata", str(meta),
                                                  "--epochs", "1")))
    frame = pd.read_csv(Path(result["run_dir"]) / "subgroup_metrics.csv")
    assert set(frame["value"]) == {"phone", "dslr"} and frame["n"].sum() == len(images)
    assert {"balanced_accuracy_low", "balanced_accuracy_high", "too_small", "warning"} <= set(frame.columns)

    out = tmp_path / "scored"
    summary = inference.main(inference.parse_args(
        ["--model_path", result["run_dir"], "--inference_folder", str(lesion_dataset / "testset"),
         "--inference_output", str(out), "--labels_from_folders", "--metadata", str(meta), "--num_workers", "0"]))
    scored = pd.read_csv(out / "subgroup_metrics.csv")
    assert scored["n"].sum() == summary["metrics"]["n_images"]
    pd.testing.assert_series_equal(scored.set_index("value")["accuracy"].sort_index(),
                                   frame.set_index("value")["accuracy"].sort_index(), atol=1e-4)
