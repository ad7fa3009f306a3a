"""The dataset audit: duplicates, label conflicts and train/test leakage, per-class image statistics, and a warning
when image size or file format alone predicts the class.

main.py runs it before training (``--audit``, ``--on_leak``) and writes data_audit.json + duplicates.csv into the run
folder; audit_dataset.py runs it on any folder. Copies are grouped into clusters (connected pairs), so a photo saved
three times is one finding, and ``--on_leak drop`` decides per cluster:
  - a cluster whose members carry more than one class label (a label conflict): every copy is removed, test included,
    because nobody knows which label is right;
  - a cluster with members in trainset and testset (leakage): the trainset copies are removed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from configs import TINY_SIDE as TINY_SIDE_FLAG
from dataloaders.discovery import DatasetIndex, discover_split
from dataloaders.fingerprints import (
    CROP_VIEWS,
    HASH_SIZE,
    NEAR_DUPLICATE_BITS,
    Fingerprint,
    exact_pairs,
    fingerprint_all,
    near_pairs,
)
from utils.atomic import atomic_write_json
from utils.csv_cells import save_frame_for_people
from utils.errors import UserError

logger = logging.getLogger(__name__)

AUDIT_JSON = "data_audit.json"
DUPLICATES_CSV = "duplicates.csv"
PAIRS_PNG = "duplicate_pairs.png"
PAIRS_SHOWN = 8  # pairs drawn in PAIRS_PNG: label conflicts and leaks first
DUPLICATE_COLUMNS = ["cluster", "relation", "kind", "distance", "path_a", "split_a", "class_a", "path_b", "split_b",
                     "class_b"]
TINY_SIDE = TINY_SIDE_FLAG.default  # standalone default for "tiny"; main.py uses --img_size
SHORTCUT_MARGIN = 0.25  # warn when a size/format-only classifier's balanced accuracy beats chance by this much


@dataclass(frozen=True)
class AuditItem:
    path: Path
    split: str  # trainset / testset, or the folder's own name for a single labelled folder
    class_name: str


@dataclass
class DatasetAudit:
    root: Path
    summary: dict[str, Any]
    pairs: pd.DataFrame  # DUPLICATE_COLUMNS, one row per duplicate pair
    removals: dict[Path, str] = field(default_factory=dict)  # filled by apply_leak_policy (drop)

    @property
    def n_leaks(self) -> int:
        return int(self.summary["duplicates"]["train_test_clusters"])

    @property
    def n_conflicts(self) -> int:
        return int(self.summary["duplicates"]["label_conflict_clusters"])


def items_from_index(index: DatasetIndex) -> list[AuditItem]:
    return ([AuditItem(s.path, "trainset", index.class_names[s.label]) for s in index.train]
            + [AuditItem(s.path, "testset", index.class_names[s.label]) for s in index.test])


def discover_for_audit(root: Path) -> list[AuditItem]:
    """Every labelled image under ``root``: its trainset/ and testset/ where present (either alone is fine), else
    ``root`` itself as one folder of class folders."""
    if not root.is_dir():
        raise UserError(f"folder not found: {root}; pass a dataset root (trainset/, testset/) or a folder of class "
                        f"folders")
    splits = [name for name in ("trainset", "testset") if (root / name).is_dir()]
    by_split = {name: discover_split(root / name) for name in splits} if splits else {root.name: discover_split(root)}
    return [AuditItem(path, split, class_name) for split, by_class in by_split.items()
            for class_name, paths in by_class.items() for path in paths]


class _Clusters:
    """Union-find over item indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _relation(a: AuditItem, b: AuditItem) -> str:
    if a.class_name != b.class_name:
        return "label_conflict"
    return "train_test_leak" if a.split != b.split else "duplicate"


def _pair_rows(items: list[AuditItem], prints: list[Fingerprint], threshold: int, root: Path) -> list[dict]:
    found: dict[tuple[int, int], tuple[str, int]] = {(i, j): ("exact", 0) for i, j in exact_pairs(prints)}
    for i, j, distance in near_pairs(prints, threshold):
        found.setdefault((i, j), ("near", distance))
    rows = []
    for (i, j), (kind, distance) in sorted(found.items()):
        a, b = items[i], items[j]
        rows.append({"i": i, "j": j, "relation": _relation(a, b), "kind": kind, "distance": distance,
                     "path_a": _shown(a.path, root), "split_a": a.split, "class_a": a.class_name,
                     "path_b": _shown(b.path, root), "split_b": b.split, "class_b": b.class_name})
    return rows


def _shown(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _absolute(shown: str, root: Path) -> Path:
    path = Path(shown)
    return path if path.is_absolute() else root / path


def _class_stats(items: list[AuditItem], prints: list[Optional[Fingerprint]], tiny_side: int) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for split in sorted({it.split for it in items}):
        per_class: dict[str, Any] = {}
        for name in sorted({it.class_name for it in items if it.split == split}):
            fps = [fp for it, fp in zip(items, prints) if it.split == split and it.class_name == name and fp]
            if not fps:
                per_class[name] = {"count": 0}
                continue
            widths, heights = np.array([f.width for f in fps]), np.array([f.height for f in fps])
            per_class[name] = {
                "count": len(fps), "width": [int(widths.min()), int(widths.max())],
                "height": [int(heights.min()), int(heights.max())],
                "tiny_share": round(float((np.minimum(widths, heights) < tiny_side).mean()), 4),
                "formats": dict(Counter(f.file_format for f in fps).most_common())}
        stats[split] = per_class
    return stats


def shortcut_check(labels: list[str], prints: list[Fingerprint], seed: int = 0) -> Optional[dict[str, Any]]:
    """Cross-validated balanced accuracy of a depth-3 decision tree that sees only width, height, aspect ratio and
    file format: a wide margin over chance means the classes differ in how they were saved, and a CNN can learn that
    instead of the disease."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    from evaluation.metrics import balanced_accuracy

    counts = Counter(labels)
    if len(counts) < 2 or min(counts.values()) < 2:
        return None
    folds = min(5, min(counts.values()))
    formats = sorted({fp.file_format for fp in prints})
    features = np.array([[fp.width, fp.height, fp.width / fp.height, formats.index(fp.file_format)] for fp in prints])
    target = np.array(labels)
    predicted = cross_val_predict(DecisionTreeClassifier(max_depth=3, random_state=seed), features, target,
                                  cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    score = balanced_accuracy(target, predicted)
    chance = 1.0 / len(counts)
    return {"balanced_accuracy": round(score, 4), "chance": round(chance, 4), "margin": SHORTCUT_MARGIN,
            "warning": bool(score >= chance + SHORTCUT_MARGIN),
            "features": "width, height, aspect ratio, file format (depth-3 tree, cross-validated)"}


def run_audit(items: list[AuditItem], root: Path, *, threshold: int = NEAR_DUPLICATE_BITS,
              tiny_side: int = TINY_SIDE, num_threads: int = 2) -> DatasetAudit:
    """Fingerprint every image (unreadable ones are listed, never fatal) and collect the findings."""
    started = time.perf_counter()
    prints, unreadable = fingerprint_all([it.path for it in items], num_threads)
    readable = [i for i, fp in enumerate(prints) if fp is not None]
    kept_items, kept_prints = [items[i] for i in readable], [prints[i] for i in readable]
    rows = _pair_rows(kept_items, kept_prints, threshold, root)
    clusters = _Clusters(len(kept_items))
    for row in rows:
        clusters.union(row["i"], row["j"])
    members: dict[int, list[int]] = {}
    for i in sorted({i for row in rows for i in (row["i"], row["j"])}):
        members.setdefault(clusters.find(i), []).append(i)
    cluster_ids = {root_i: n + 1 for n, root_i in enumerate(sorted(members, key=lambda r: min(members[r])))}
    for row in rows:
        row["cluster"] = cluster_ids[clusters.find(row["i"])]
    pairs = pd.DataFrame(rows, columns=["i", "j", *DUPLICATE_COLUMNS])

    groups = [[kept_items[i] for i in m] for m in members.values()]
    conflict = [g for g in groups if len({it.class_name for it in g}) > 1]
    leak = [g for g in groups if len({it.split for it in g}) > 1]
    # The shortcut check looks at what a model would train on: trainset where there is one, else the whole folder.
    train_labels = ([(it.class_name, fp) for it, fp in zip(kept_items, kept_prints) if it.split != "testset"]
                    or [(it.class_name, fp) for it, fp in zip(kept_items, kept_prints)])
    summary = {
        "root": str(root), "images": len(items), "readable": len(kept_items),
        "unreadable": [{"path": _shown(p, root), "reason": r} for p, r in sorted(unreadable.items())],
        "near_duplicate_threshold_bits": threshold,
        "near_duplicate_method": f"{HASH_SIZE ** 2}-bit pHash (imagehash) of the whole image and of central views keeping "
                                 f"{', '.join(f'{v:.0%}' for v in CROP_VIEWS)} of each side",
        "tiny_side": tiny_side,
        "duplicates": {
            "exact_pairs": int((pairs["kind"] == "exact").sum()), "near_pairs": int((pairs["kind"] == "near").sum()),
            "clusters": len(groups), "images_in_clusters": sum(len(g) for g in groups),
            "label_conflict_clusters": len(conflict), "train_test_clusters": len(leak),
            "pairs_by_relation": {k: int(v) for k, v in pairs["relation"].value_counts().sort_index().items()}},
        "per_class": _class_stats(items, prints, tiny_side),
        "shortcut": shortcut_check([c for c, _ in train_labels], [fp for _, fp in train_labels]),
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return DatasetAudit(root, summary, pairs.drop(columns=["i", "j"]))


def copy_clusters(audit: DatasetAudit) -> list[list[Path]]:
    """The images of each cluster of copies, as paths."""
    clusters: dict[int, set[str]] = {}
    for row in audit.pairs.itertuples(index=False):
        clusters.setdefault(row.cluster, set()).update((row.path_a, row.path_b))
    return [[_absolute(shown, audit.root) for shown in sorted(members)] for _, members in sorted(clusters.items())]


def leak_removals(audit: DatasetAudit, items: list[AuditItem]) -> dict[Path, str]:
    """What ``--on_leak drop`` removes: every copy in a label-conflict cluster, the trainset copies in a cluster that
    also has testset images."""
    by_path = {it.path: it for it in items}
    removals: dict[Path, str] = {}
    for cluster, paths in enumerate(copy_clusters(audit), start=1):  # copy_clusters lists clusters 1, 2, ... in order
        group = [by_path[path] for path in paths]
        if len({it.class_name for it in group}) > 1:
            classes = ", ".join(sorted({it.class_name for it in group}))
            removals.update({it.path: f"label conflict (cluster {cluster}: {classes})" for it in group})
        elif len({it.split for it in group}) > 1:
            removals.update({it.path: f"copy of a testset image (cluster {cluster})" for it in group
                             if it.split == "trainset"})
    return removals


def apply_leak_policy(index: DatasetIndex, audit: DatasetAudit, policy: str) -> DatasetIndex:
    """``warn``: log the findings; ``error``: stop before training; ``drop``: remove the leaked and conflicting copies
    from the index (listed in the audit)."""
    if not (audit.n_leaks or audit.n_conflicts):
        return index
    found = (f"{audit.n_leaks} cluster(s) of copies shared by trainset and testset and {audit.n_conflicts} "
             f"cluster(s) of copies filed under different classes")
    if policy == "error":
        worst = audit.pairs[audit.pairs["relation"] != "duplicate"].iloc[0]
        raise UserError(f"dataset audit of {index.root}: {found}, e.g. {worst.path_a} = {worst.path_b}; list them "
                        f"with python audit_dataset.py --data_dir {index.root}, fix the folders, or pass --on_leak "
                        f"drop to remove them (or warn to train anyway)")
    if policy == "warn":
        logger.warning("dataset audit: %s; test figures may be inflated; --on_leak drop removes them", found)
        return index
    audit.removals = leak_removals(audit, items_from_index(index))
    removed = set(audit.removals)
    logger.warning("dataset audit: %s; --on_leak drop removed %d image(s): %d from trainset, %d from testset",
                   found, len(removed), sum(s.path in removed for s in index.train),
                   sum(s.path in removed for s in index.test))
    return DatasetIndex(index.root, index.class_names, [s for s in index.train if s.path not in removed],
                        [s for s in index.test if s.path not in removed], index.skipped)


def write_audit(output_dir: Path, audit: DatasetAudit) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {**audit.summary,
              "removed": [{"path": _shown(p, audit.root), "reason": r} for p, r in sorted(audit.removals.items())]}
    atomic_write_json(output_dir / AUDIT_JSON, report)
    save_frame_for_people(output_dir / DUPLICATES_CSV, audit.pairs)
    if len(audit.pairs):
        order = {"label_conflict": 0, "train_test_leak": 1, "duplicate": 2}
        shown = audit.pairs.sort_values(["relation", "distance"], key=lambda c: c.map(order) if c.name == "relation"
                                        else c, kind="stable").drop_duplicates("cluster").head(PAIRS_SHOWN)
        plot_image_pairs([(_absolute(r.path_a, audit.root), _absolute(r.path_b, audit.root),
                           f"{r.relation}, {r.kind} (distance {r.distance}): {r.class_a} / {r.class_b}")
                          for r in shown.itertuples(index=False)], output_dir / PAIRS_PNG)


def plot_image_pairs(pairs: list[tuple[Path, Path, str]], path: Path, thumb_side: int = 160) -> None:
    """Side-by-side thumbnails of image pairs, one row per pair, each titled with its caption (the audit's
    duplicate pairs, so a person can check by eye that they are the same photo)."""
    from dataloaders.image_io import load_rgb
    from evaluation.plots import plt, save_figure

    fig, axes = plt.subplots(len(pairs), 2, figsize=(5, 2.4 * len(pairs)), squeeze=False)
    for row, (first, second, caption) in zip(axes, pairs):
        for ax, image_path in zip(row, (first, second)):
            ax.imshow(load_rgb(image_path, min_side=thumb_side, max_side=thumb_side * 2))
            ax.set_title(image_path.name, fontsize=6)
            ax.axis("off")
        row[0].text(0, -0.25, caption, transform=row[0].transAxes, fontsize=7, va="top")
    fig.tight_layout()
    save_figure(fig, path)


def log_audit(audit: DatasetAudit) -> None:
    s, d = audit.summary, audit.summary["duplicates"]
    logger.info("dataset audit (%.1f s, %d images): %d exact and %d near-duplicate pair(s) in %d cluster(s); "
                "%d label-conflict cluster(s), %d cluster(s) across trainset/testset; %d unreadable",
                s["seconds"], s["images"], d["exact_pairs"], d["near_pairs"], d["clusters"],
                d["label_conflict_clusters"], d["train_test_clusters"], len(s["unreadable"]))
    tiny = [f"{split}/{name} {c['tiny_share']:.0%}" for split, per_class in s["per_class"].items()
            for name, c in per_class.items() if c.get("tiny_share", 0) > 0.1]
    if tiny:
        logger.warning("dataset audit: images smaller than %d px on the shorter side (upscaled for the model): %s",
                       s["tiny_side"], ", ".join(tiny))
    if d["images_in_clusters"] > 0.2 * max(1, s["readable"]):
        logger.warning("dataset audit: %d of %d images look like copies of another; if these are different photos "
                       "taken the same way, lower --near_dup_threshold (see duplicate_pairs.png)",
                       d["images_in_clusters"], s["readable"])
    shortcut = s.get("shortcut")
    if shortcut and shortcut["warning"]:
        logger.warning("dataset audit: image size and file format alone predict the class (balanced accuracy %.2f, "
                       "chance %.2f): the classes were saved differently and a model can learn that instead of the "
                       "disease; make the images alike (same size and format) per class", shortcut["balanced_accuracy"],
                       shortcut["chance"])
