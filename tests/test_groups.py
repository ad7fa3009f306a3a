"""Grouped splits: the validation split and the folds never split a group, groups come from a CSV or a file-name
pattern, bad group files are one-line errors, and shared train/test groups are reported or dropped."""

import logging
from pathlib import Path

import pandas as pd
import pytest

import main
from configs import TrainConfig
from data.synthetic_lesions import generate_dataset
from dataloaders.discovery import discover_dataset
from dataloaders.groups import groups_from_pattern, merge_copies, read_groups_csv
from dataloaders.prepare import prepare_dataset
from dataloaders.splits import split_dataset
from runs.run_folder import RunDir
from tests.conftest import train_args
from utils.errors import UserError


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """Synthetic lesions renamed P<patient>_<n>.jpg: four photos per patient, patients of one class."""
    root = generate_dataset(tmp_path_factory.mktemp("groups") / "data", n_train=24, n_test=8, img_size=48, seed=5)
    for split in ("trainset", "testset"):
        for class_dir in sorted((root / split).iterdir()):
            for i, path in enumerate(sorted(class_dir.glob("*.jpg"))):
                path.rename(class_dir / f"P{split[:2]}{class_dir.name[:3]}{i // 4:02d}_{i % 4}.jpg")
    return root


def _by_patient(samples):
    return {s.path.name.split("_")[0] for s in samples}


def test_validation_split_and_folds_never_split_a_group(patients):
    index = discover_dataset(patients)
    groups = groups_from_pattern(r"^(P\w+?)_", [s.path for s in index.train + index.test])
    assert len(set(groups.values())) == 3 * 6 + 3 * 2
    for seed in range(3):
        splits = split_dataset(index, val_ratio=0.25, seed=seed, groups=groups)
        assert not _by_patient(splits.train) & _by_patient(splits.val)
        assert 0.15 < len(splits.val) / len(index.train) < 0.35
        assert {s.label for s in splits.val} == {0, 1, 2}  # still stratified
    folds = split_dataset(index, val_ratio=0.2, seed=0, folds=3, groups=groups)
    for k in range(3):
        train, held_out = folds.fold(k)
        assert not _by_patient(train) & _by_patient(held_out)


def test_groups_are_saved_in_the_split_csvs_and_read_back(patients, tmp_path):
    index = discover_dataset(patients)
    groups = groups_from_pattern(r"^(P\w+?)_", [s.path for s in index.train + index.test])
    splits = split_dataset(index, val_ratio=0.25, seed=0, groups=groups)
    RunDir(tmp_path).write_splits(splits)
    frame = pd.read_csv(tmp_path / "split_val.csv")
    assert list(frame.columns) == ["filepath", "label", "class_name", "group"]
    assert (frame["group"] == frame["filepath"].str.extract(r"/(P\w+?)_")[0]).all()
    again = RunDir(tmp_path).read_splits(patients, index.class_names)
    assert again.groups == {s.path: groups[s.path] for s in splits.train + splits.val + splits.test}


def test_groups_csv_accepts_paths_names_and_ids_and_rejects_bad_rows(patients, tmp_path):
    paths = [s.path for s in discover_dataset(patients).train]
    first, second = paths[0], paths[1]
    good = tmp_path / "groups.csv"
    good.write_text(f"filename,group\n{first.relative_to(patients).as_posix()},A\n{second.stem},B\n")
    assert read_groups_csv(good, paths, patients) == {first: "A", second: "B"}

    cases = [("name,patient\nx.jpg,A\n", "no column 'filename', 'group'"),
             ("filename,group\nnot_there.jpg,A\n", "line 2: filename 'not_there.jpg' is not an image"),
             (f"filename,group\n{first.name},A\n{second.name},\n", "line 3: .* has an empty group")]
    for text, message in cases:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            read_groups_csv(bad, paths, patients)
    with pytest.raises(UserError, match="no capture group"):
        groups_from_pattern("P.*", paths)


def test_images_absent_from_the_groups_csv_are_warned_about_and_kept_apart(patients, tmp_path, caplog):
    index = discover_dataset(patients)
    listed = index.train[:8]
    csv = tmp_path / "groups.csv"
    csv.write_text("filename,group\n" + "".join(f"{s.path.name},patient{i // 4}\n" for i, s in enumerate(listed)))
    cfg = TrainConfig(data_dir=str(patients), groups=str(csv), audit=False)
    with caplog.at_level(logging.WARNING):
        splits = prepare_dataset(cfg.data_spec(), num_threads=1)
    assert any("have no group in" in r.message and str(len(index.train) + len(index.test) - 8) in r.message
               for r in caplog.records)
    assert splits.groups[listed[0].path] == splits.groups[listed[3].path] == "patient0"
    assert len({splits.groups[s.path] for s in index.train[8:]}) == len(index.train) - 8


def test_groups_shared_by_trainset_and_testset_are_reported_or_dropped(patients, tmp_path, caplog):
    index = discover_dataset(patients)
    test_photo, train_photo = index.test[0].path, index.train[0].path
    csv = tmp_path / "groups.csv"
    csv.write_text(f"filename,group\n{test_photo.name},same\n{train_photo.name},same\n")
    with caplog.at_level(logging.WARNING):
        prepare_dataset(TrainConfig(data_dir=str(patients), groups=str(csv), audit=False).data_spec(), num_threads=1)
    assert any("both trainset and testset" in r.message for r in caplog.records)
    dropped = prepare_dataset(TrainConfig(data_dir=str(patients), groups=str(csv), audit=False,
                                          on_leak="drop").data_spec(), num_threads=1)
    assert train_photo not in {s.path for s in dropped.train + dropped.val}
    assert test_photo in {s.path for s in dropped.test}
    with pytest.raises(UserError, match="both trainset and testset"):
        prepare_dataset(TrainConfig(data_dir=str(patients), groups=str(csv), audit=False,
                                    on_leak="error").data_spec(), num_threads=1)


def test_copies_join_groups():
    a, b, c = Path("a.jpg"), Path("b.jpg"), Path("c.jpg")
    merged = merge_copies({a: "p1", b: "p2", c: "p3"}, [[a, b]])
    assert merged[a] == merged[b] != merged[c]


def test_main_with_group_pattern_trains_and_resamples_groups(patients, tmp_path):
    result = main.main(main.parse_args(train_args(patients, tmp_path, "--group_pattern", r"^(P\w+?)_", "--epochs",
                                                  "1")))
    run_dir = Path(result["run_dir"])
    train, val = (pd.read_csv(run_dir / f"split_{s}.csv") for s in ("train", "val"))
    assert not set(train["group"]) & set(val["group"])
    method = result["test_metrics"]["intervals"]["method"]
    assert method["resampled_unit"] == "group" and method["n_units"] == 3 * 2
