"""Find the images and classes of a dataset folder, and hold out a stratified validation split.

Layouts understood:
  ROOT/trainset/<class>/**/<image>      (class folders, sub-folders allowed)
  ROOT/trainset/<class>.<n>.<ext>       (the original project's flat dogcat layout: class from the file name)
and the same under ROOT/testset/.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dataloaders.image_io import check_image, is_hidden, looks_like_image
from utils.errors import UserError

logger = logging.getLogger(__name__)

EXPECTED_LAYOUT = "expected ROOT/trainset/<class>/*.jpg and ROOT/testset/<class>/*.jpg"


@dataclass
class Sample:
    path: Path
    label: int


@dataclass
class DatasetIndex:
    root: Path
    class_names: list[str]
    train: list[Sample]
    test: list[Sample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders are ignored.

    Symlinked folders are not followed (os.walk's default), so a symlink loop cannot hang discovery.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found.extend(Path(dirpath) / name for name in filenames if looks_like_image(Path(name)))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def check_class_name(name: str, where: str) -> None:
    """Class names become folder and file names (Grad-CAM galleries, reports): refuse those that would leave the
    output folder or break a file system, with a one-line error naming where the name came from."""
    encoded = name.encode("utf-8", "surrogateescape")  # bytes that are not UTF-8 reach Python as lone surrogates
    problem = None
    if encoded.decode("utf-8", "replace") != name:
        problem = "is not UTF-8 text (a folder from a Korean Windows zip? unzip it with -O cp949)"
    elif name in (".", ".."):
        problem = "is a relative path"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problem = "holds a control character"
    elif len(encoded) > 100:
        problem = "is longer than 100 bytes"
    if problem:
        raise UserError(f"{where}: class name {name!r} {problem}; class names become folder and file names, so "
                        f"rename it (letters, digits, spaces, '-', '_')")


def discover_split(split_dir: Path) -> dict[str, list[Path]]:
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not is_hidden(d.name))
    if class_dirs:
        by_class = {}
        for class_dir in class_dirs:
            images = list_images(class_dir)
            if not images:
                raise UserError(f"class folder {class_dir} holds no images (jpg, jpeg, png, bmp, webp, tif); "
                                f"add images or remove the folder ({EXPECTED_LAYOUT})")
            check_class_name(class_dir.name, str(class_dir))
            by_class[class_dir.name] = images
        loose = [p for p in split_dir.iterdir() if p.is_file() and looks_like_image(p)]
        if loose:
            logger.warning("%d image(s) directly in %s are ignored: images must sit in class folders",
                           len(loose), split_dir)
        return by_class

    flat = sorted(p for p in split_dir.iterdir() if p.is_file() and looks_like_image(p))
    if not flat:
        raise UserError(f"no class folders or images in {split_dir} ({EXPECTED_LAYOUT})")
    unnamed = [p.name for p in flat if p.name.count(".") < 2]
    if unnamed:
        raise UserError(f"{split_dir} has images but no class folders, and {unnamed[0]!r} is not named "
                        f"<class>.<n>.<ext>; put images in class folders ({EXPECTED_LAYOUT})")
    by_class = {}
    for path in flat:
        check_class_name(path.name.split(".")[0], str(path))
        by_class.setdefault(path.name.split(".")[0], []).append(path)
    return dict(sorted(by_class.items()))


def find_unreadable(paths: list[Path], num_threads: int) -> dict[Path, str]:
    # Decoding releases the GIL, so threads give a real speed-up on the up-front check.
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        reasons = list(pool.map(check_image, paths))
    return {path: reason for path, reason in zip(paths, reasons) if reason is not None}


def discover_dataset(root: str | os.PathLike, n_class: Optional[int] = None, check_images: bool = True,
                     num_threads: int = 4) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root} ({EXPECTED_LAYOUT}; set --data_dir or --data_name)")
    splits = {}
    for split in ("trainset", "testset"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise UserError(f"missing {split_dir} ({EXPECTED_LAYOUT})")
        splits[split] = discover_split(split_dir)

    class_names = list(splits["trainset"])
    if len(class_names) < 2:
        raise UserError(f"{root / 'trainset'} has a single class {class_names}; a classifier needs at least two "
                        f"class folders ({EXPECTED_LAYOUT})")
    unknown = sorted(set(splits["testset"]) - set(class_names))
    if unknown:
        raise UserError(f"{root / 'testset'} has classes not in trainset: {unknown}; trainset classes are "
                        f"{class_names}")
    if n_class is not None and n_class != len(class_names):
        raise UserError(f"--n_class {n_class} does not match the {len(class_names)} class folders in "
                        f"{root / 'trainset'}: {class_names}")

    class_to_idx = {name: i for i, name in enumerate(class_names)}
    samples = {split: [Sample(p, class_to_idx[c]) for c, paths in by_class.items() for p in paths]
               for split, by_class in splits.items()}
    skipped: list[tuple[Path, str]] = []
    if check_images:
        all_paths = [s.path for split in samples.values() for s in split]
        unreadable = find_unreadable(all_paths, num_threads)
        for path, reason in unreadable.items():
            logger.warning("skipping %s: %s", path, reason)
        skipped = sorted(unreadable.items())
        samples = {split: [s for s in items if s.path not in unreadable] for split, items in samples.items()}
    index = DatasetIndex(root, class_names, samples["trainset"], samples["testset"], skipped)
    for name in class_names:
        if not any(s.label == class_to_idx[name] for s in index.train):
            raise UserError(f"class {name!r} has no readable images in {root / 'trainset'}")
    if not index.test:
        raise UserError(f"{root / 'testset'} has no readable images")
    return index
