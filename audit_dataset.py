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

from configs import AuditConfig, add_dataclass_arguments, from_namespace, parse_with_config_file
from dataloaders.audit import discover_for_audit, items_from_index, log_audit, run_audit, write_audit
from dataloaders.labels_csv import CsvColumns, index_from_labels_csv
from utils.cli import run_cli
from utils.logging_setup import setup_logging
from utils.paths import check_output_folder


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf dataset audit", add_help=add_help,
                                     description="Find duplicates, label conflicts, train/test leakage and shortcut "
                                                 "cues in an image folder.")
    add_dataclass_arguments(parser, AuditConfig)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    cfg = from_namespace(AuditConfig, args)
    root = Path(cfg.data_dir)
    if cfg.labels_csv:
        index, _ = index_from_labels_csv(Path(cfg.labels_csv), root, CsvColumns(
            cfg.csv_file_column, cfg.csv_label_column, cfg.csv_group_column, cfg.csv_split_column),
            for_training=False)
        items = items_from_index(index)
    else:
        items = discover_for_audit(root)
    output = cfg.output_folder
    check_output_folder(output, "--output", {"--data_dir": root})
    audit = run_audit(items, root, threshold=cfg.near_dup_threshold, tiny_side=cfg.tiny_side,
                      num_threads=max(1, cfg.num_workers))
    write_audit(output, audit)
    log_audit(audit)
    print(f"audit written to {output}")
    return audit.summary


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
