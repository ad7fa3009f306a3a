"""How a trained model should fit a photo into its square input: the eval crop policies side by side on a testset.

``main.py --eval_crop {center,squash,letterbox}`` and ``--crop_pct`` decide how validation, test, inference and ONNX
export turn a (non-square) photo into the square input; training's random-resized crop does not depend on them. This
script takes finished run folders (default: every ``main`` run listed in a ``recipe_vs_plain_timm`` results.csv),
and scores each delivered model on its dataset's testset under each policy, the way main.py's test does (the run's
TTA and temperature). The run's own policy must reproduce its ``test_metrics.json``; the script checks that first,
so a difference between policies is the policy's and nothing else's. What it does not measure: with another policy
the validation scores, and so the selected epoch, could differ too (the refit, which delivers the model, never looks
at validation).

Example (docs/recipe_comparison.md):
    python -m benchmarks.eval_crop_policy --results /tmp/recipe_new/results.csv --output_dir /tmp/eval_crop
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataloaders.discovery import discover_split
from dataloaders.image_io import load_rgb
from dataloaders.transforms import EVAL_CROP_MODES, Preprocessing, build_eval_transform, decode_min_side
from deploy.machine import describe_machine, machine_info
from evaluation.metrics import balanced_accuracy, expected_calibration_error, macro_auc
from prediction.predictors import TorchPredictor, predict_proba
from runs.checkpoint import load_run_model

# (--eval_crop, crop_pct): the default (centre crop at the model's crop_pct) and the whole-photo alternatives.
POLICIES = [("center", None), ("center", 1.0), ("squash", 1.0), ("letterbox", 1.0)]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("eval crop policies on finished runs", add_help=add_help)
    parser.add_argument("--results", help="a recipe_vs_plain_timm results.csv: its main runs are scored")
    parser.add_argument("--run_dirs", nargs="*", default=[], help="run folders written by main.py")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output_dir", default="eval_crop_policy")
    return parser


def policy_name(mode: str, crop_pct: float | None) -> str:
    return f"{mode}@{'run' if crop_pct is None else crop_pct}"


def testset(data_dir: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    by_class = discover_split(data_dir / "testset")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise SystemExit(f"{data_dir / 'testset'} has class folders the run does not know ({', '.join(unknown)}); "
                         f"score a testset with the run's classes {class_names}")
    paths = [p for name in sorted(by_class) for p in by_class[name]]
    targets = np.array([index[name] for name in sorted(by_class) for _ in by_class[name]])
    return paths, targets


def score_runs(runs: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """One row per (run, policy). Each model is loaded and each photo decoded once per dataset, and each policy's
    tensors are built once per dataset."""
    rows, cpu = [], torch.device("cpu")
    for data_dir, group in runs.groupby("data_dir", sort=True):
        loaded = [(run, *load_run_model(run.run_dir)) for run in group.itertuples()]
        base: Preprocessing = loaded[0][2].preprocessing
        for run, _, info in loaded:
            if info.preprocessing != base:
                raise SystemExit(f"{run.run_dir} was trained with other preprocessing than {loaded[0][0].run_dir}; "
                                 "score it separately")
        predictors = [(run, TorchPredictor(model, cpu), info) for run, model, info in loaded]
        paths, targets = testset(Path(data_dir), loaded[0][2].class_names)
        # decode at the largest size any policy needs (crop_pct 1.0 needs less than the run's 0.875)
        min_side = max(decode_min_side(replace(base, crop_pct=pct or base.crop_pct)) for _, pct in POLICIES)
        photos = [load_rgb(p, min_side=min_side) for p in tqdm(paths, desc=f"decode {Path(data_dir).name}")]
        for mode, pct in POLICIES:
            pre = replace(base, crop_mode=EVAL_CROP_MODES[mode], crop_pct=pct or base.crop_pct)
            transform = build_eval_transform(pre)
            images = torch.stack([transform(photo) for photo in photos])
            for run, predictor, info in predictors:
                probs = predict_proba(predictor, images, info.tta, info.temperature, batch_size)
                preds = probs.argmax(1)
                rows.append({"dataset": Path(data_dir).name, "seed": run.seed, "run_dir": run.run_dir,
                             "policy": policy_name(mode, pct), "crop_mode": mode, "crop_pct": pre.crop_pct,
                             "accuracy": float((preds == targets).mean()),
                             "balanced_accuracy": balanced_accuracy(targets, preds),
                             "macro_auc": macro_auc(targets, probs, info.n_class),
                             "ece": expected_calibration_error(targets, probs),
                             "recorded_balanced_accuracy": run.recorded})
    return pd.DataFrame(rows)


def check_reproduced(scores: pd.DataFrame) -> None:
    """The run's own policy must give the balanced accuracy main.py recorded, else the comparison is not the
    policy's."""
    own = scores[scores["policy"] == policy_name("center", None)]
    off = own[(own["balanced_accuracy"] - own["recorded_balanced_accuracy"]).abs() > 1e-6]
    if len(off):
        raise SystemExit("the run's own policy did not reproduce test_metrics.json for "
                         + ", ".join(f"{r.run_dir} ({r.balanced_accuracy:.4f} vs {r.recorded_balanced_accuracy:.4f})"
                                     for r in off.itertuples()))


def summary_markdown(scores: pd.DataFrame) -> str:
    default = policy_name("center", None)
    lines = ["| dataset | policy | seeds | balanced acc | Δ vs center@run (points, per seed) | macro AUC | ECE |",
             "|---|---|---|---|---|---|---|"]
    for dataset, group in scores.groupby("dataset", sort=True):
        reference = group[group["policy"] == default].set_index("seed")["balanced_accuracy"]
        for policy in [policy_name(m, p) for m, p in POLICIES]:
            rows = group[group["policy"] == policy].set_index("seed").sort_index()
            delta = 100 * (rows["balanced_accuracy"] - reference.loc[rows.index])
            per_seed = " / ".join(f"{d:+.2f}" for d in delta)
            lines.append(f"| {dataset} | {policy} | {len(rows)} | {rows['balanced_accuracy'].mean():.4f} | "
                         f"{delta.mean():+.2f} ({per_seed}) | {rows['macro_auc'].mean():.4f} | "
                         f"{rows['ece'].mean():.3f} |")
    return "\n".join(lines) + "\n"


def runs_from(args: argparse.Namespace) -> pd.DataFrame:
    records = []
    if args.results:
        results = pd.read_csv(args.results)
        for row in results[results["method"] == "main"].itertuples():
            records.append({"run_dir": row.run_dir, "seed": int(row.seed)})
    records += [{"run_dir": d, "seed": None} for d in args.run_dirs]
    if not records:
        raise SystemExit("give --results or --run_dirs")
    for record in records:
        run_dir = Path(record["run_dir"])
        if not (run_dir / "test_metrics.json").is_file():
            raise SystemExit(f"{run_dir} has no test_metrics.json; pass run folders of finished main.py runs")
        config = json.loads((run_dir / "configs.json").read_text())
        test = json.loads((run_dir / "test_metrics.json").read_text())
        record.update(data_dir=config["data_dir"], recorded=test["balanced_accuracy"],
                      seed=record["seed"] if record["seed"] is not None else config["random_state"])
    return pd.DataFrame(records)


def main(args: argparse.Namespace) -> None:
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    scores = score_runs(runs_from(args), args.batch_size)
    scores.to_csv(output / "scores.csv", index=False)
    check_reproduced(scores)
    text = f"machine: {describe_machine(machine_info())}\n\n" + summary_markdown(scores)
    (output / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
