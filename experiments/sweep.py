"""An experiment sweep (run_experiments.py): a template of BASE options, a GRID and RUNS becomes validated training
configs; each is trained in-process (resumed if interrupted) and the finished runs are ranked."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import runpy
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch

from configs import TrainConfig
from evaluation.bootstrap import paired_difference
from runs.run_folder import RunDir
from torch_trainer.models import resolve_model_name
from torch_trainer.training import resume_config
from utils.atomic import atomic_save, atomic_write_json, atomic_write_text
from utils.errors import UserError
from utils.timing import call_latencies_ms

logger = logging.getLogger(__name__)

STATE = "experiments_state.json"
# Options that never belong in a run's identity or in a template: they pick the run, not the experiment.
NOT_SWEEPABLE = ("resume", "config")


def read_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_template(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"template {path} not found; start from run_experiments_template.py")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise UserError(f"cannot parse template {path}: {str(err).splitlines()[0]}") from err
        if not isinstance(raw, dict):
            raise UserError(f"template {path} must be a mapping with base:, grid: and/or runs:")
        raw = {key.upper(): value for key, value in raw.items()}
    elif path.suffix == ".py":
        try:
            # The template is the user's own experiment file (like a config.py), run as Python on purpose.
            raw = runpy.run_path(str(path))
        except Exception as err:  # noqa: BLE001 - any error in the user's file becomes one line
            raise UserError(f"template {path} failed to load: {type(err).__name__}: {err}") from err
    else:
        raise UserError(f"template {path} must be a .py or .yaml file")
    template = {"BASE": raw.get("BASE") or {}, "GRID": raw.get("GRID") or {}, "RUNS": raw.get("RUNS") or [{}]}
    if not isinstance(template["BASE"], dict):
        raise UserError(f"{path}: BASE must be a mapping of main.py options to values")
    if not isinstance(template["GRID"], dict) or not all(isinstance(v, list) and v for v in template["GRID"].values()):
        raise UserError(f"{path}: GRID must map each main.py option to a non-empty list of values")
    if not isinstance(template["RUNS"], list) or not all(isinstance(r, dict) for r in template["RUNS"]):
        raise UserError(f"{path}: RUNS must be a list of mappings of main.py options to values")
    return template


def expand(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Every RUNS entry combined with every GRID combination: the options that vary, per run."""
    names = list(template["GRID"])
    combos = [dict(zip(names, values)) for values in itertools.product(*template["GRID"].values())] or [{}]
    return [{**run, **combo} for run in template["RUNS"] for combo in combos]


def run_key(varying: dict[str, Any]) -> str:
    return ",".join(f"{k}={varying[k]}" for k in sorted(varying)) or "base"


def build_configs(args: argparse.Namespace, template: dict[str, Any]) -> list[tuple[str, dict[str, Any], TrainConfig]]:
    """Validate every run before any starts: unknown options, bad values, unknown models, missing data folders.
    ``args`` is the sweep's parsed command line: flags typed there (``args.given_flags``) override BASE."""
    # main.py's flags are generated from TrainConfig, so its defaults are the parser's.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    known = {f for f in TrainConfig.__dataclass_fields__}
    for where, options in [("BASE", template["BASE"]), ("GRID", template["GRID"])] + [
            (f"RUNS[{i}]", run) for i, run in enumerate(template["RUNS"])]:
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"template {where}: unknown option(s) {', '.join(unknown)}; use main.py's flag names "
                            f"without '--' (python main.py --help)")
        fixed = sorted(set(options) & set(NOT_SWEEPABLE))
        if fixed:
            raise UserError(f"template {where}: {', '.join(fixed)} cannot be set in a sweep template")
    given = getattr(args, "given_flags", frozenset())
    explicit = {k: v for k, v in vars(args).items() if k in known and k in given and k not in NOT_SWEEPABLE}
    configs = []
    seen: set[str] = set()
    for varying in expand(template):
        key = run_key(varying)
        if key in seen:
            raise UserError(f"template: run {key} appears twice")
        seen.add(key)
        values = {**template["BASE"], **explicit, **varying}
        try:
            cfg = TrainConfig.from_dict({**{k: v for k, v in defaults.items() if k in known}, **values})
        except (TypeError, ValueError, UserError) as err:
            raise UserError(f"template run {key}: {err}") from err
        resolve_model_name(cfg.model_name)
        if not cfg.resolved_data_dir.is_dir():
            raise UserError(f"template run {key}: dataset folder {cfg.resolved_data_dir} not found; set data_dir "
                            f"or data_name")
        configs.append((key, varying, cfg))
    return configs


def to_argv(cfg: TrainConfig) -> list[str]:
    """main.py's command line that reproduces ``cfg`` (options that differ from main.py's defaults): what a dry run
    lists."""
    argv = []
    defaults = TrainConfig().to_dict()
    for name, value in cfg.to_dict().items():
        if value is None or name in NOT_SWEEPABLE or value == defaults[name]:
            continue
        argv += [f"--{name}", str(value)]
    return argv


def cpu_latency_ms(run_dir: Path, iterations: int) -> float:
    from runs.checkpoint import load_run_model

    model, info = load_run_model(run_dir)
    x = torch.randn(1, *info.preprocessing.input_size)
    with torch.inference_mode():
        return float(np.median(call_latencies_ms(lambda: model(x), iterations, warmup=3)))


def summary_row(key: str, varying: dict[str, Any], run_dir: Path, latency_iterations: int) -> dict[str, Any]:
    run = RunDir(run_dir)
    metrics = json.loads(run.test_metrics.read_text(encoding="utf-8"))
    if run.oof_metrics.is_file():  # --folds: the out-of-fold predictions are the validation figures
        oof = json.loads(run.oof_metrics.read_text(encoding="utf-8"))
        val_balanced_acc, val_macro_auc = oof["balanced_accuracy"], oof.get("macro_auc")
    else:
        log = pd.read_csv(run.log_csv)
        best = log[log["epoch"] == metrics["best_epoch"]].iloc[0]
        val_balanced_acc = best["val_balanced_acc"]
        val_macro_auc = best["val_macro_auc"] if pd.notna(best.get("val_macro_auc")) else None
    state = torch.load(run.checkpoint("final", metrics.get("weights", RunDir.BEST_CKPT)), map_location="cpu",
                       weights_only=True)["model"]
    n_params = sum(t.numel() for name, t in state.items() if t.is_floating_point())
    return {"run": key, **varying, "val_balanced_acc": round(float(val_balanced_acc), 4),
            "val_macro_auc": round(float(val_macro_auc), 4) if val_macro_auc is not None else None,
            "test_accuracy": round(metrics["accuracy"], 4), "test_balanced_acc": round(metrics["balanced_accuracy"], 4),
            **_interval_columns("test_balanced_acc", metrics.get("intervals", {}).get("balanced_accuracy")),
            "test_macro_f1": round(metrics["macro_f1"], 4),
            "test_macro_auc": round(metrics["macro_auc"], 4) if metrics.get("macro_auc") is not None else None,
            "test_ece": round(metrics["ece"], 4),
            "test_ece_uncalibrated": round(metrics["ece_uncalibrated"], 4) if "ece_uncalibrated" in metrics else None,
            "temperature": round(metrics.get("temperature", 1.0), 3), "best_epoch": int(metrics["best_epoch"]),
            "params_m": round(n_params / 1e6, 2), "size_mb": round(n_params * 4 / 2**20, 1),
            "cpu_latency_ms": round(cpu_latency_ms(run_dir, latency_iterations), 2), "run_dir": str(run_dir)}


def _interval_columns(name: str, interval: Optional[list[float]]) -> dict[str, Optional[float]]:
    low, high = interval if interval else (None, None)
    return {f"{name}_low": None if low is None else round(low, 4), f"{name}_high": None if high is None else round(high, 4)}


def _test_predictions(run_dir: Path) -> Optional[pd.DataFrame]:
    path = RunDir(run_dir).test_predictions
    return pd.read_csv(path).set_index("filepath") if path.is_file() else None


def paired_against_best(frame: pd.DataFrame) -> pd.DataFrame:
    """Each run's test balanced accuracy minus the best run's (rank 1, chosen on validation), with a paired bootstrap
    interval on the same test images; ``vs_best`` says whether the test set can tell them apart."""
    best = _test_predictions(Path(frame.iloc[0]["run_dir"]))
    columns: dict[str, list] = {"vs_best_diff": [], "vs_best_low": [], "vs_best_high": [], "vs_best": []}
    for rank, run_dir in zip(frame["rank"], frame["run_dir"]):
        other = _test_predictions(Path(run_dir))
        shared = best.index.intersection(other.index) if best is not None and other is not None else []
        if rank == 1 or not len(shared):
            verdict = "best" if rank == 1 else "no shared test predictions"
            for name, value in zip(columns, (None, None, None, verdict)):
                columns[name].append(value)
            continue
        a, b = other.loc[shared], best.loc[shared]
        probs_a, probs_b = a.filter(like="prob_").to_numpy(), b.filter(like="prob_").to_numpy()
        result = paired_difference(a["label"].to_numpy(), probs_a, probs_b, probs_a.shape[1])
        low, high = result["interval"]
        columns["vs_best_diff"].append(round(result["difference"], 4))
        columns["vs_best_low"].append(round(low, 4))
        columns["vs_best_high"].append(round(high, 4))
        columns["vs_best"].append("worse" if high < 0 else "better" if low > 0 else "indistinguishable")
    return frame.assign(**columns)


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows).sort_values("val_balanced_acc", ascending=False, kind="stable")
    frame.insert(0, "rank", range(1, len(frame) + 1))
    frame = paired_against_best(frame)
    atomic_save(sweep_dir / "experiments_summary.csv", lambda tmp: frame.to_csv(tmp, index=False))
    shown = frame.drop(columns=["run_dir"])
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join("| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |\n"
                   for row in shown.itertuples(index=False))
    atomic_write_text(sweep_dir / "experiments_summary.md",
                      "# Experiments ranked by validation balanced accuracy\n\n" + header + body +
                      "\ntest_balanced_acc_low/high: 95% bootstrap interval. vs_best_*: test balanced accuracy minus "
                      "rank 1's on the same test images, with a paired bootstrap interval; 'indistinguishable' means "
                      "the interval contains 0, so the test set cannot tell the two runs apart.\n")
    from evaluation.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(frame) + 1.5))
    positions = np.arange(len(frame))
    ax.barh(positions - 0.2, frame["val_balanced_acc"], height=0.4, label="validation balanced acc.")
    ax.barh(positions + 0.2, frame["test_balanced_acc"], height=0.4, label="test balanced acc.")
    ax.set_yticks(positions, frame["run"], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="balanced accuracy", xlim=(0, 1), title="Sweep comparison (best validation first)")
    ax.legend(fontsize=8)
    save_figure(fig, sweep_dir / "experiments_comparison.png")
    return frame


def run_sweep(runs: list[tuple[str, dict[str, Any], TrainConfig]], sweep_dir: Path, state: dict[str, Any],
              train: Callable[[TrainConfig, Callable[[Path], None]], dict[str, Any]]) -> None:
    """Train every run not finished yet (resuming one that was interrupted), recording each in the state file.
    ``train(cfg, on_run_dir)`` trains one config in-process (torch_trainer.training.run_training)."""
    state_path = sweep_dir / STATE
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for number, (key, varying, cfg) in enumerate(runs, 1):
        entry = state.get(key, {})
        if entry.get("status") == "finished" and Path(entry.get("run_dir", "")).is_dir():
            logger.info("[%d/%d] %s: finished earlier, skipped", number, len(runs), key)
            continue
        run_cfg = cfg
        previous = Path(entry["run_dir"]) if entry.get("run_dir") else None
        if previous is not None and RunDir(previous).read_status().get("state") == "finished":
            # Stopped after the training finished but before the state file said so: nothing to train again.
            state[key] = {"params": varying, "status": "finished", "run_dir": str(previous)}
            atomic_write_json(state_path, state)
            logger.info("[%d/%d] %s: finished earlier (%s), skipped", number, len(runs), key, previous)
            continue
        if previous is not None and RunDir(previous).last_ckpt.is_file():
            run_cfg = resume_config(previous, {"epochs": cfg.epochs})
            logger.info("[%d/%d] %s: resuming %s", number, len(runs), key, previous)
        else:
            logger.info("[%d/%d] %s", number, len(runs), key)
        state[key] = {"params": varying, "status": "running", "run_dir": entry.get("run_dir")}
        atomic_write_json(state_path, state)

        def remember_run_dir(run_dir: Path, key: str = key) -> None:
            state[key]["run_dir"] = str(run_dir)
            atomic_write_json(state_path, state)

        try:
            result = train(run_cfg, remember_run_dir)
        except KeyboardInterrupt:
            logger.warning("sweep interrupted during %s; run the same command again to continue", key)
            raise
        except Exception as err:  # noqa: BLE001 - one failed run must not end the sweep
            state[key]["status"] = "failed"
            state[key]["error"] = f"{type(err).__name__}: {err}"
            atomic_write_json(state_path, state)
            logger.error("run %s failed: %s", key, state[key]["error"])
            continue
        state[key].update(status="finished", run_dir=result["run_dir"])
        atomic_write_json(state_path, state)


def summarise_sweep(runs: list[tuple[str, dict[str, Any], TrainConfig]], sweep_dir: Path, state: dict[str, Any],
                    latency_iterations: int) -> pd.DataFrame:
    """Rank the finished runs by validation balanced accuracy and write the summary files."""
    state_path = sweep_dir / STATE
    rows = [summary_row(key, varying, Path(state[key]["run_dir"]), latency_iterations)
            for key, varying, _ in runs if state.get(key, {}).get("status") == "finished"]
    if not rows:
        raise UserError(f"no run finished; see the errors above and {state_path}")
    frame = write_summary(sweep_dir, rows)
    logger.info("ranking by validation balanced accuracy:\n%s", frame.drop(columns=["run_dir"]).to_string(index=False))
    failed = [key for key, _, _ in runs if state.get(key, {}).get("status") == "failed"]
    if failed:
        logger.warning("%d run(s) failed: %s (details in %s)", len(failed), ", ".join(failed), state_path)
    logger.info("summary: %s, %s", sweep_dir / "experiments_summary.csv", sweep_dir / "experiments_summary.md")
    return frame
