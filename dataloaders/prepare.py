"""A new run's data, from folder to split: discovery, the dataset audit and its leak policy, groups, then the
(grouped) validation split or folds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from configs import DataSpec
from dataloaders.audit import DatasetAudit, apply_leak_policy, copy_clusters, items_from_index, log_audit, run_audit
from dataloaders.discovery import DatasetIndex, discover_dataset
from dataloaders.groups import complete_groups, groups_from_pattern, merge_copies, read_groups_csv
from dataloaders.labels_csv import CsvColumns, index_from_labels_csv
from dataloaders.list_files import index_from_list_files
from dataloaders.metadata import read_metadata
from dataloaders.splits import DataSplits, check_fold_count, split_dataset
from evaluation.decisions import parse_operating_points
from utils.errors import UserError

logger = logging.getLogger(__name__)

# --data_format: each reader turns a data folder into a DatasetIndex; everything after it is format-independent.
DATASET_READERS: dict[str, Callable[[Path, int], DatasetIndex]] = {
    "folders": lambda root, num_threads: discover_dataset(root, num_threads=num_threads),
    "list_files": index_from_list_files,
}

MAX_COPY_CLUSTER = 10  # copies of one photo in one dataset; the real sets' largest cluster held 3


def prepare_dataset(spec: DataSpec, num_threads: int) -> DataSplits:
    """Find the images (class folders or a labels CSV), check the flags that name classes or files, audit, apply the
    leak policy and the groups, and split."""
    csv_groups = None
    if spec.labels_csv:
        index, csv_groups = index_from_labels_csv(
            Path(spec.labels_csv), spec.root, CsvColumns(*spec.csv_columns), num_threads)
        if spec.n_class is not None and spec.n_class != len(index.class_names):
            raise UserError(f"--n_class {spec.n_class} does not match the {len(index.class_names)} classes in "
                            f"{spec.labels_csv}: {index.class_names}")
    else:
        index = DATASET_READERS[spec.data_format](spec.root, num_threads)
        if spec.n_class is not None and spec.n_class != len(index.class_names):
            found = "class folders" if spec.data_format == "folders" else f"classes ({spec.data_format})"
            raise UserError(f"--n_class {spec.n_class} does not match the {len(index.class_names)} {found} in "
                            f"{spec.root}: {index.class_names}; fix the data or leave out --n_class (it is counted)")
    _check_against_data(spec, index)
    audit: Optional[DatasetAudit] = None
    if spec.audit:
        audit = run_audit(items_from_index(index), index.root, threshold=spec.near_dup_threshold,
                          tiny_side=spec.tiny_side, num_threads=num_threads)
        log_audit(audit)
        index = apply_leak_policy(index, audit, spec.on_leak)
    groups = image_groups(spec, index, audit, csv_groups)
    user_groups = (spec.groups or (f"--group_pattern {spec.group_pattern!r}" if spec.group_pattern else None)
                   or (spec.labels_csv if csv_groups else None))
    if groups is not None and user_groups:
        index = _shared_group_policy(index, groups, user_groups, spec.on_leak)
    splits = split_dataset(index, spec.val_ratio, spec.random_state, spec.folds, groups)
    splits.audit = audit
    return splits


def _check_against_data(spec: DataSpec, index: DatasetIndex) -> None:
    """Flags that name classes or files of the data, checked before the audit and training (one-line errors)."""
    if spec.folds:
        check_fold_count([s.label for s in index.train], spec.folds, index.class_names)
    parse_operating_points(spec.operating_point, index.class_names)
    if spec.metadata:
        read_metadata(Path(spec.metadata), [s.path for s in index.train + index.test], index.root)


def image_groups(spec: DataSpec, index: DatasetIndex, audit: Optional[DatasetAudit],
                 csv_groups: Optional[dict[Path, str]] = None) -> Optional[dict[Path, str]]:
    """Each image's group: the user's (--groups / --group_pattern), joined wherever the audit found copies of one
    photo, so that copies never sit on both sides of the validation split. None when neither exists."""
    paths = [s.path for s in index.train + index.test]
    clusters = _plausible_copy_clusters(audit) if audit is not None else []
    if spec.groups:
        source = spec.groups
        groups = read_groups_csv(Path(spec.groups), paths, index.root)
    elif spec.group_pattern:
        source = f"--group_pattern {spec.group_pattern!r}"
        groups = groups_from_pattern(spec.group_pattern, paths)
    elif csv_groups is not None:
        source, groups = str(spec.labels_csv), csv_groups
    elif clusters:
        source, groups = "", {}
    else:
        return None
    groups = complete_groups(groups, paths, source) if source else {p: f"image:{p.as_posix()}" for p in paths}
    return merge_copies(groups, clusters)


def _plausible_copy_clusters(audit: DatasetAudit) -> list[list[Path]]:
    """The audit's clusters of copies, except implausibly large ones: many different photos taken the same way (same
    pose, framing and background) can look alike to a perceptual hash, and joining them would make one giant group."""
    clusters = copy_clusters(audit)
    large = [c for c in clusters if len(c) > MAX_COPY_CLUSTER]
    if large:
        logger.warning("dataset audit: %d cluster(s) of more than %d look-alike images (largest %d) are not treated as "
                       "copies of one photo when splitting; check duplicate_pairs.png and lower --near_dup_threshold "
                       "if they are different photos", len(large), MAX_COPY_CLUSTER, max(map(len, large)))
    return [c for c in clusters if len(c) <= MAX_COPY_CLUSTER]


def _shared_group_policy(index: DatasetIndex, groups: dict[Path, str], source: str, policy: str) -> DatasetIndex:
    """A group (patient, lesion) with images in both trainset and testset: reported; with --on_leak drop its
    trainset images are removed, with error training stops."""
    shared = sorted({groups[s.path] for s in index.train} & {groups[s.path] for s in index.test})
    if not shared:
        return index
    found = (f"{len(shared)} group(s) from {source} have images in both trainset and testset "
             f"(e.g. {', '.join(shared[:3])})")
    if policy == "error":
        raise UserError(f"{found}; move each group's images to one side, or pass --on_leak drop to remove their "
                        f"trainset images (or warn to train anyway)")
    if policy == "warn":
        logger.warning("%s: the test set is not independent of training for them; --on_leak drop removes their "
                       "trainset images", found)
        return index
    shared_set = set(shared)
    kept = [s for s in index.train if groups[s.path] not in shared_set]
    logger.warning("%s: --on_leak drop removed their %d trainset image(s)", found, len(index.train) - len(kept))
    return DatasetIndex(index.root, index.class_names, kept, index.test, index.skipped)
