"""Hostile names, generated: file and class names with separators, '..', control characters, bytes that are not
UTF-8, 250-byte names, spreadsheet formula prefixes and '$' go through the audit, inference (Grad-CAM, labelled
folder), face segmentation, training and export. Each command either finishes or stops with a one-line error; nothing
is written outside the chosen output folder; no input file changes (checksums before and after).

``SKINCLF_HOSTILE_MATRIX=FILE`` writes the tally (cases, one-line errors, skipped-and-listed, files outside the output,
inputs changed, tracebacks) to FILE.
"""

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import audit_dataset
import face_segmentation
import inference
import main
import quantize_onnx_models
from data.synthetic_lesions import generate_dataset
from tests.conftest import train_args
from utils.errors import UserError

pytestmark = pytest.mark.slow

# Fragments a real folder can hold in a file name (no '/' and no NUL: the file system refuses those).
NAME_PARTS = ["..", "$x^$", "=HYPERLINK(1)", "+1", "-2", "@SUM", "\t", "\r", "\x07", "한글", " ", "a" * 120,
              "\\..\\evil", "%s%n", "'quote", '"dq', ";", ","]
RAW_BYTES = [b"\xc7\xd1\xb1\xdb", b"\xff", b""]  # CP949 '한글', a lone 0xff, nothing
TALLY: Counter = Counter()


def _checksums(root: Path, skip: Path) -> dict[bytes, str]:
    found = {}
    for dirpath, _, filenames in os.walk(os.fsencode(root)):
        if os.fsencode(skip) in (dirpath, *[dirpath[:len(os.fsencode(skip))]]):
            continue
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                found[path] = hashlib.sha256(handle.read()).hexdigest()
    return found


def _hostile_name(parts: list[str], raw: bytes, stem_limit: int = 240) -> bytes:
    stem = os.fsencode("".join(parts) or "x")[:stem_limit] + raw
    return stem.replace(b"/", b"_").replace(b"\x00", b"_") + b".jpg"


def _run(command, argv) -> str:
    """'ok', 'error' (a one-line UserError) or 'traceback' (anything else)."""
    try:
        command.main(command.parse_args(argv))
        return "ok"
    except UserError as err:
        assert "\n" not in str(err), str(err)
        return "error"
    except Exception:  # noqa: BLE001 - tallied: the goal is none
        return "traceback"


@pytest.fixture(scope="module")
def benign_run(tmp_path_factory):
    data = generate_dataset(tmp_path_factory.mktemp("benign") / "d", n_train=16, n_test=4, img_size=48, seed=2)
    result = main.main(main.parse_args(train_args(data, tmp_path_factory.mktemp("runs"), "--epochs", "1")))
    return Path(result["run_dir"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=4), raw=st.sampled_from(RAW_BYTES))
def test_generated_hostile_file_names_through_audit_inference_and_segmentation(benign_run, parts, raw):
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        data = generate_dataset(work / "data", n_train=4, n_test=4, img_size=48, seed=5)
        source = next((data / "testset" / "benign").glob("*.jpg"))
        name = _hostile_name(parts, raw)
        os.rename(os.fsencode(source), os.fsencode(source.parent) + b"/" + name)
        broken = os.fsencode(source.parent) + b"/" + name[:-4] + b"_broken.jpg"  # same name, a damaged file
        with open(broken, "wb") as handle:
            handle.write(b"\xff\xd8\xff\xe0 not a whole JPEG")
        out = work / "out"
        before = _checksums(work, out)
        outcomes = [
            _run(audit_dataset, ["--data_dir", str(data), "--output", str(out / "audit")]),
            _run(inference, ["--model_path", str(benign_run), "--inference_folder", str(data / "testset"),
                             "--inference_output", str(out / "inference"), "--generate_gradcam",
                             "--labels_from_folders", "--num_workers", "0"]),
            _run(face_segmentation, ["--input", str(data / "testset"), "--output", str(out / "seg"),
                                     "--seg_backend", "opencv"])]
        after = _checksums(work, out)
        TALLY["cases"] += len(outcomes)
        TALLY.update(outcomes)
        TALLY["inputs_changed"] += sum(before[p] != after.get(p) for p in before)
        TALLY["written_outside_output"] += len(set(after) - set(before))
        if (out / "inference" / "skipped.csv").is_file():
            with open(out / "inference" / "skipped.csv", newline="", encoding="utf-8") as handle:
                TALLY["skipped_and_listed"] += len(list(csv.reader(handle))) - 1
        assert "traceback" not in outcomes
        assert after == before  # no input changed, nothing new outside the output folder
        assert outcomes[1] == "ok"  # a hostile file name is data, not an error
        if not name.startswith(b"."):  # the damaged file is skipped and listed, under its own (escaped) name
            with open(out / "inference" / "skipped.csv", newline="", encoding="utf-8") as handle:
                assert len(list(csv.reader(handle))) == 2  # a header and the damaged file
        entries = json.loads((out / "inference" / "predictions.json").read_text(encoding="utf-8"))
        # Hidden files (a name starting with '.', such as '..x.jpg') are ignored by design, like .DS_Store.
        photos = sum(not f.startswith(b".") for _, _, files in os.walk(os.fsencode(data / "testset")) for f in files)
        assert len(entries) == photos  # every photo answered (or listed as skipped)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("label,expect", [("=1+2", "ok"), ("$x^$", "ok"), ("한글 진단", "ok"), ("+a", "ok"),
                                          ("x/../../../../outside", "error"), ("..", "error"),
                                          ("tab\there", "error"), ("n" * 150, "error")])
def test_hostile_class_names_through_training_and_export(tmp_path, label, expect):
    data = generate_dataset(tmp_path / "data", n_train=8, n_test=4, img_size=48, seed=7)
    for photo in (data / "testset").rglob("*_0000.jpg"):  # 245-byte names: the report gallery's names must fit
        photo.rename(photo.with_name("가" * 60 + "_" + photo.stem[:59].ljust(59, "y") + ".jpg"))
    images = sorted(data.rglob("*.jpg"))
    rows = [(p.relative_to(data).as_posix(), label if p.parts[-2] == "benign" else p.parts[-2]) for p in images]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)
    out = tmp_path / "out"
    before = _checksums(tmp_path, out)
    outcome = _run(main, train_args(data, out / "runs", "--epochs", "1", "--labels_csv", str(labels),
                                    "--refit", "True"))
    TALLY["cases"] += 1
    TALLY[outcome] += 1
    if outcome == "ok":
        (run,) = (out / "runs").glob("*/*/*")
        export = _run(quantize_onnx_models, ["--model_path", str(run), "--output_dir", str(out / "onnx"),
                                             "--skip_segmentation", "--calib_images", "8"])
        TALLY["cases"] += 1
        TALLY[export] += 1
        assert export == "ok"
        assert label in json.loads((run / "class_info.json").read_text(encoding="utf-8"))["class_names"]
    after = _checksums(tmp_path, out)
    TALLY["inputs_changed"] += sum(before[p] != after.get(p) for p in before)
    TALLY["written_outside_output"] += len(set(after) - set(before))
    assert outcome == expect and after == before


def teardown_module(module):
    target = os.environ.get("SKINCLF_HOSTILE_MATRIX")
    if target:
        Path(target).write_text(json.dumps(dict(TALLY), indent=1, sort_keys=True))
