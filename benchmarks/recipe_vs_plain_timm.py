"""The judge of the training recipe: main.py's defaults against a plain timm fine-tune, same data, same weights.

For every dataset and seed it trains
  plain  a plain timm fine-tune written out below (ImageFolder, timm ``create_transform``, AdamW, one-cycle,
         label smoothing 0.1, the whole trainset, no validation split): the obvious alternative a user would write;
  main   ``python main.py`` with its defaults and only --data_dir --model_name --img_size --epochs --random_state
         (plus --save_dir for where the run folder goes, and whatever --main_args adds, for ablations);
both from the same pretrained weights, evaluates both on the dataset's testset, and writes
  results.csv   one row per (dataset, method, seed): accuracy, balanced accuracy, macro AUC, ECE (before/after
                temperature scaling for main), training images/s, wall seconds (main: selection and refit phases);
  summary.csv / summary.md   mean ± sd over seeds per dataset and method, and main minus plain; for a tagged
                ablation (--tag), the tagged run minus the default main run of the same dataset and seed.
Finished (dataset, method, seed) rows are kept, so an interrupted comparison continues where it stopped.

An ablation is a tagged main run with extra flags; it is paired with the default main run of the same seed, read from
this --output_dir or from --baseline_results (another comparison's results.csv). An ablation run with --refit False
is compared with the default run's no_refit variant (the same run's validation-chosen model before refit), so the
pair differs only in the option, not in refit:
    python -m benchmarks.recipe_vs_plain_timm --data_dir ../shared/data/dermnet_a --methods main --seeds 0 1 2 \
        --tag mixup --main_args "--refit False --mixup 0.2 --cutmix 1.0" --output_dir /tmp/ablate \
        --baseline_results docs/recipe_runs/results.csv

Example (the README's comparison):
    python -m benchmarks.recipe_vs_plain_timm --data_dir ../shared/data/dermnet_a ../shared/data/isic_binary \
        ../shared/data/isic_9class --model_name efficientnet_lite0 --img_size 192 --epochs 6 --seeds 0 1 2 \
        --output_dir docs/recipe_runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]

from deploy.machine import describe_machine, machine_info
from evaluation.metrics import classification_metrics
from torch_trainer.models import build_model

METRICS = ["accuracy", "balanced_accuracy", "macro_auc", "ece", "ece_uncalibrated", "train_images_per_s",
           "select_seconds", "refit_seconds", "wall_seconds"]
# main.py's test_metrics.json "variants": the delivered model with one recipe step taken away, on the same test images
VARIANTS = ["no_refit", "no_tta", "no_ema"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("main.py recipe vs a plain timm fine-tune", add_help=add_help)
    parser.add_argument("--data_dir", nargs="+", required=True, help="dataset roots with trainset/ and testset/")
    parser.add_argument("--model_name", default="efficientnet_lite0")
    parser.add_argument("--img_size", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["plain", "main"], choices=["plain", "main"])
    parser.add_argument("--main_args", default="", help="extra main.py flags (ablations), e.g. \"--model_ema False\"")
    parser.add_argument("--tag", default="", help="name suffix of the main method in the tables (ablations)")
    parser.add_argument("--baseline_results", default=None,
                        help="results.csv of an earlier comparison whose default main rows the tagged ablations "
                             "are paired with (same dataset and seed); default: this --output_dir's own main rows")
    parser.add_argument("--batch_size", type=int, default=32, help="plain loop only; main.py uses its default")
    parser.add_argument("--plain_lr", type=float, default=1e-3)
    parser.add_argument("--output_dir", default="recipe_comparison")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# (a) the control: a plain timm fine-tune, written the way a user would write it
# --------------------------------------------------------------------------------------------------------------------
def train_plain(data_dir: Path, model_name: str, img_size: int, epochs: int, seed: int, batch_size: int,
                lr: float) -> dict:
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    torch.manual_seed(seed)
    np.random.seed(seed)
    train_set = ImageFolder(data_dir / "trainset")
    test_set = ImageFolder(data_dir / "testset")
    model, _ = build_model(model_name, len(train_set.classes), pre_trained=True)  # the same weights main.py gets
    data_config = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    train_set.transform = create_transform(**data_config, is_training=True)
    test_set.transform = create_transform(**data_config)
    workers = min(4, os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True, drop_last=True,
                                               num_workers=workers, generator=generator)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size * 2, num_workers=workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(train_loader))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    seen, train_seconds = 0, 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        tick = time.perf_counter()
        for images, targets in train_loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(targets)
        train_seconds += time.perf_counter() - tick
    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for images, targets in test_loader:
            probs.append(model(images).softmax(1))
            labels.append(targets)
    probs_np, labels_np = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    metrics = classification_metrics(labels_np, probs_np.argmax(1), test_set.classes, probs_np)
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "macro_auc": metrics["macro_auc"], "ece": metrics["ece"], "ece_uncalibrated": metrics["ece"],
            "train_images_per_s": seen / train_seconds, "select_seconds": 0.0, "refit_seconds": 0.0,
            "wall_seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------------------------
# (b) main.py with its defaults, as a user runs it
# --------------------------------------------------------------------------------------------------------------------
def train_main(data_dir: Path, model_name: str, img_size: int, epochs: int, seed: int, save_dir: Path,
               main_args: str) -> dict:
    command = [sys.executable, str(ROOT / "main.py"), "--data_dir", str(data_dir), "--model_name", model_name,
               "--img_size", str(img_size), "--epochs", str(epochs), "--random_state", str(seed),
               "--save_dir", str(save_dir), *shlex.split(main_args)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"main.py failed ({' '.join(command)}):\n{done.stdout[-3000:]}")
    run_dir = max((p.parent for p in save_dir.rglob("run_status.json")), key=lambda p: p.stat().st_mtime)
    test = json.loads((run_dir / "test_metrics.json").read_text())
    log = pd.read_csv(run_dir / "log.csv")
    timings, variants = test.get("training_seconds", {}), test.get("variants", {})
    return {"accuracy": test["accuracy"], "balanced_accuracy": test["balanced_accuracy"],
            "macro_auc": test.get("macro_auc"), "ece": test["ece"],
            "ece_uncalibrated": test.get("ece_uncalibrated", test["ece"]),
            "train_images_per_s": float(log["train_images_per_s"].mean()),
            "select_seconds": timings.get("select", float("nan")), "refit_seconds": timings.get("refit", 0.0),
            "wall_seconds": wall, "run_dir": str(run_dir),
            # the epoch kept (and refit for) and the one with the highest validation score: where they differ,
            # --epoch_selection one_se chose a later epoch within the validation noise
            "selected_epoch": test.get("best_epoch"), "highest_score_epoch": test.get("highest_score_epoch"),
            **{f"{name}_balanced_accuracy": variants.get(name, {}).get("balanced_accuracy", float("nan"))
               for name in VARIANTS}}


def source_commit() -> str:
    """The commit of the code that trains (with ``+dirty`` when it has uncommitted changes), for the results table."""
    def git(*arguments: str) -> str:
        done = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# --------------------------------------------------------------------------------------------------------------------
def points(differences: pd.Series) -> str:
    """Per-seed differences (fractions) as 'mean ± sd' in points; the sd of a single seed is shown as 0."""
    sd = differences.std(ddof=1) if len(differences) > 1 else 0.0
    return f"{100 * differences.mean():+.2f} ± {100 * sd:.2f}"


def summarise(results: pd.DataFrame, baseline: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str]:
    rows, lines = [], []
    header = ("| dataset | method | seeds | accuracy | balanced acc | macro AUC | ECE (before → after T) | train img/s "
              "| wall s (select + refit) |")
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    for (dataset, method), group in results.groupby(["dataset", "method"], sort=True):
        row = {"dataset": dataset, "method": method, "seeds": len(group)}
        for name in METRICS:
            values = pd.to_numeric(group[name], errors="coerce")
            row[f"{name}_mean"], row[f"{name}_sd"] = values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0
        rows.append(row)
        fmt = lambda n, d=3: f"{row[n + '_mean']:.{d}f} ± {row[n + '_sd']:.{d}f}"  # noqa: E731
        lines.append(f"| {dataset} | {method} | {len(group)} | {fmt('accuracy')} | {fmt('balanced_accuracy')} | "
                     f"{fmt('macro_auc')} | {row['ece_uncalibrated_mean']:.3f} → {row['ece_mean']:.3f} | "
                     f"{row['train_images_per_s_mean']:.1f} | {row['wall_seconds_mean']:.0f} "
                     f"({row['select_seconds_mean']:.0f} + {row['refit_seconds_mean']:.0f}) |")
    summary = pd.DataFrame(rows)
    # main minus plain on the seeds both have (paired by seed)
    lines += ["", "| dataset | method − plain | Δ accuracy | Δ balanced acc | Δ macro AUC | Δ ECE | img/s ratio |",
              "|---|---|---|---|---|---|---|"]
    averages: dict[str, list[float]] = {}
    for dataset, group in results.groupby("dataset", sort=True):
        plain = group[group["method"] == "plain"].set_index("seed")
        for method in sorted(set(group["method"]) - {"plain"}):
            other = group[group["method"] == method].set_index("seed")
            seeds = sorted(set(plain.index) & set(other.index))
            if not seeds:
                continue
            delta = {n: (pd.to_numeric(other.loc[seeds, n]) - pd.to_numeric(plain.loc[seeds, n])) for n in
                     ("accuracy", "balanced_accuracy", "macro_auc", "ece")}
            ratio = (other.loc[seeds, "train_images_per_s"] / plain.loc[seeds, "train_images_per_s"]).mean()
            averages.setdefault(method, []).append(delta["balanced_accuracy"].mean())
            lines.append(f"| {dataset} | {method} ({len(seeds)} seeds) | {points(delta['accuracy'])} | "
                         f"{points(delta['balanced_accuracy'])} | {points(delta['macro_auc'])} | "
                         f"{points(delta['ece'])} | {ratio:.2f} |")
    for method, values in averages.items():
        lines.append(f"\n{method}: balanced accuracy minus plain, averaged over {len(values)} dataset(s): "
                     f"{100 * float(np.mean(values)):+.2f} points (Δ in points; ± is the sd over seeds)")
    return summary, "\n".join(lines + ablation_lines(results) + tagged_vs_default_lines(results, baseline)) + "\n"


def ablation_lines(results: pd.DataFrame) -> list[str]:
    """What each recipe step bought: the delivered model's balanced accuracy minus that of the same run with the step
    taken away (main.py's test variants), mean ± sd over seeds; positive means the step helped."""
    columns = [f"{name}_balanced_accuracy" for name in VARIANTS]
    if not set(columns) <= set(results.columns):
        return []
    lines = ["", "| dataset | method | seeds | balanced acc | " + " | ".join(f"Δ vs {name}" for name in VARIANTS)
             + " |", "|---|---|---|---|" + "---|" * len(VARIANTS)]
    for (dataset, method), group in results[results["method"] != "plain"].groupby(["dataset", "method"], sort=True):
        delivered = pd.to_numeric(group["balanced_accuracy"])
        cells = []
        for column in columns:
            delta = (delivered - pd.to_numeric(group[column], errors="coerce")).dropna()
            cells.append(f"{points(delta)} ({int((delta > 0).sum())}/{len(delta)} helped)" if len(delta) else "–")
        lines.append(f"| {dataset} | {method} | {len(group)} | {delivered.mean():.3f} | " + " | ".join(cells) + " |")
    return lines


def refit_turned_off(main_args: object) -> bool:
    tokens = [part for token in (shlex.split(main_args) if isinstance(main_args, str) else [])
              for part in token.split("=", 1)]  # "--refit=False" as well as "--refit False"
    return any(token == "--refit" and value.lower() in ("false", "0", "no")
               for token, value in zip(tokens, tokens[1:]))


def tagged_vs_default_lines(results: pd.DataFrame, baseline: pd.DataFrame | None = None) -> list[str]:
    """Each tagged ablation (method "main[tag]") minus the default main run of the same dataset and seed, in points.

    The default rows come from ``results`` and ``baseline``. A tagged run trained with --refit False is compared with
    the default run's no_refit variant when the default run refit (that variant is its model before refit), so
    the pair differs only in the ablated option."""
    frames = [frame[frame["method"] == "main"] for frame in (results, baseline)
              if frame is not None and "method" in frame.columns]
    default = pd.concat(frames) if frames else pd.DataFrame()
    tagged = results[results["method"].astype(str).str.startswith("main[")] if "method" in results.columns else results
    if not len(default) or not len(tagged):
        return []
    default = default.drop_duplicates(["dataset", "seed"], keep="first").set_index(["dataset", "seed"])
    lines = ["", "| dataset | ablation − default main (same seed) | seeds | Δ balanced acc | raised | per seed |",
             "|---|---|---|---|---|---|"]
    per_method: dict[str, list[float]] = {}
    for (dataset, method), group in tagged.groupby(["dataset", "method"], sort=True):
        deltas = []
        for row in group.sort_values("seed").itertuples():
            if (dataset, row.seed) not in default.index:
                continue
            base = default.loc[(dataset, row.seed)]
            reference = base["balanced_accuracy"]
            if refit_turned_off(row.main_args) and not pd.isna(base.get("no_refit_balanced_accuracy", float("nan"))):
                reference = base["no_refit_balanced_accuracy"]
            deltas.append((row.seed, float(row.balanced_accuracy) - float(reference)))
        if not deltas:
            continue
        values = pd.Series([d for _, d in deltas])
        per_method.setdefault(method, []).append(values.mean())
        lines.append(f"| {dataset} | {method} | {len(values)} | {points(values)} | {int((values > 0).sum())}/"
                     f"{len(values)} | " + ", ".join(f"s{seed} {100 * d:+.2f}" for seed, d in deltas) + " |")
    for method, means in per_method.items():
        lines.append(f"\n{method} minus default main: raised balanced accuracy on {sum(m > 0 for m in means)} of "
                     f"{len(means)} dataset(s), mean {100 * float(np.mean(means)):+.2f} points")
    return lines


def main(args: argparse.Namespace) -> None:
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / "results.csv"
    results = pd.read_csv(results_path) if results_path.is_file() else pd.DataFrame()
    if args.baseline_results and not Path(args.baseline_results).is_file():
        raise SystemExit(f"--baseline_results {args.baseline_results}: no such file; give the results.csv of a "
                         "comparison that ran the default main method (or leave the flag out)")
    baseline = pd.read_csv(args.baseline_results) if args.baseline_results else None
    main_name = "main" + (f"[{args.tag}]" if args.tag else "")
    machine = machine_info()
    commit = source_commit()
    print(f"machine: {describe_machine(machine)}; code {commit}", flush=True)
    for data_dir in map(Path, args.data_dir):
        for seed in args.seeds:
            for method in args.methods:
                name = main_name if method == "main" else "plain"
                if len(results) and ((results["dataset"] == data_dir.name) & (results["method"] == name)
                                     & (results["seed"] == seed)).any():
                    continue
                print(f"== {data_dir.name} {name} seed {seed}", flush=True)
                if method == "plain":
                    row = train_plain(data_dir, args.model_name, args.img_size, args.epochs, seed, args.batch_size,
                                      args.plain_lr)
                else:
                    row = train_main(data_dir, args.model_name, args.img_size, args.epochs, seed,
                                     output / "runs" / (args.tag or "default"), args.main_args)
                row = {"dataset": data_dir.name, "method": name, "seed": seed, "model": args.model_name,
                       "img_size": args.img_size, "epochs": args.epochs, "main_args": args.main_args
                       if method == "main" else "", **row, "cpu_model": machine["cpu_model"],
                       "cpu_isa": machine["cpu_isa"], "threads": machine["threads"], "torch": machine["torch"],
                       "commit": commit}
                print("   " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                        if isinstance(v, float) and not math.isnan(v)), flush=True)
                results = pd.concat([results, pd.DataFrame([row])], ignore_index=True)
                results.to_csv(results_path.with_suffix(".tmp"), index=False)
                os.replace(results_path.with_suffix(".tmp"), results_path)
    summary, markdown = summarise(results, baseline)
    summary.to_csv(output / "summary.csv", index=False)
    (output / "summary.md").write_text(markdown, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
