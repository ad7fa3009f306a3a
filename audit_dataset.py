"""Audit a dataset folder before trusting a model trained or tested on it.

Example:
    python audit_dataset.py --data_dir data/skin_dataset --output audit_results/skin

Finds exact and near-duplicate images (within a class, across classes = label conflicts, across trainset/testset =
leakage), per-class counts and image sizes, and whether image size or file format alone predicts the class. Works on a
dataset root (trainset/ and testset/, either alone is fine) or on one folder of class folders. Writes
data_audit.json, duplicates.csv and duplicate_pairs.png into --output. main.py runs the same audit before training.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from dataloaders.audit import TINY_SIDE, discover_for_audit, items_from_index, log_audit, run_audit, write_audit
from dataloaders.fingerprints import NEAR_DUPLICATE_BITS
from dataloaders.labels_csv import CsvColumns, index_from_labels_csv
from utils.cli import num_workers_flags, run_cli
from utils.logging_setup import setup_logging


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf dataset audit", add_help=add_help, parents=[num_workers_flags(2)],
                                     description="Find duplicates, label conflicts, train/test leakage and shortcut "
                                                 "cues in an image folder.")
    parser.add_argument("--data_dir", required=True, help="dataset root (trainset/, testset/) or a folder of class "
                                                          "folders")
    parser.add_argument("--output", default=None, help="folder for the report (default audit_results/<data_dir name>)")
    parser.add_argument("--near_dup_threshold", type=int, default=NEAR_DUPLICATE_BITS,
                        help="perceptual-hash distance (bits of 64) at or below which two images count as copies")
    parser.add_argument("--labels_csv", default=None, help="CSV of labels instead of class folders (images under "
                                                           "--data_dir); columns as main.py's --csv_* flags")
    parser.add_argument("--csv_file_column", default="filename")
    parser.add_argument("--csv_label_column", default="label")
    parser.add_argument("--csv_split_column", default=None)
    parser.add_argument("--tiny_side", type=int, default=TINY_SIDE,
                        help="images whose shorter side is below this many pixels count as tiny")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    root = Path(args.data_dir)
    if args.labels_csv:
        index, _ = index_from_labels_csv(Path(args.labels_csv), root, CsvColumns(
            args.csv_file_column, args.csv_label_column, None, args.csv_split_column), for_training=False)
        items = items_from_index(index)
    else:
        items = discover_for_audit(root)
    audit = run_audit(items, root, threshold=args.near_dup_threshold, tiny_side=args.tiny_side,
                      num_threads=max(1, args.num_workers))
    output = Path(args.output) if args.output else Path("audit_results") / root.resolve().name
    write_audit(output, audit)
    log_audit(audit)
    print(f"audit written to {output}")
    return audit.summary


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
