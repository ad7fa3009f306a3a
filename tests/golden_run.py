"""A golden run: the whole user path (audit, train with the full default recipe, infer with Grad-CAM on a labelled
folder, export FP32 + INT8) on seed-fixed synthetic data with a tiny model, through the scripts' command lines.

``snapshot(work)`` describes every file the commands wrote: its SHA-256 and, for CSV/JSON, its structure (CSV
header, JSON key paths). A code move that keeps behaviour identical keeps every hash; the test keeps the structure,
which holds on any CPU. Used by tests/test_golden_run.py, and by hand around a refactoring:

    python -m tests.golden_run --work /tmp/golden --manifest before.json   # before the change
    python -m tests.golden_run --work /tmp/golden --manifest after.json    # after it
    python -m tests.golden_run --compare before.json after.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "test_efficientnet_gn"
# Files whose bytes hold wall-clock times, dates or machine facts: only their structure is compared.
TIMED = re.compile(r"(^|/)(train\.log|run_status\.json|log\.csv|refit_log\.csv|export_report\.json|report\.html"
                   r"|learning_curves\.png|configs\.json)$")
WALL_CLOCK_KEYS = {"data_audit.json": "seconds", "test_metrics.json": "training_seconds"}
STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(_\d+)?")


def _run(script: str, *argv: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_golden_run(work: Path) -> Path:
    """Run every command into ``work`` (emptied first); returns ``work``."""
    from data.synthetic_lesions import generate_dataset

    shutil.rmtree(work, ignore_errors=True)
    data = generate_dataset(work / "data", n_train=64, n_test=16, img_size=64, seed=0)
    _run("audit_dataset.py", "--data_dir", str(data), "--output", str(work / "audit"))
    _run("main.py", "--data_dir", str(data), "--data_name", "golden", "--model_name", TINY_MODEL,
         "--pre_trained", "False", "--epochs", "2", "--img_size", "64", "--batch_size", "16", "--lr_ae", "0.005",
         "--num_workers", "0", "--save_dir", str(work / "runs"), "--device", "cpu",
         "--operating_point", "malignant:sensitivity=0.9", "--abstain", "coverage=0.8")
    (run,) = (work / "runs" / "dataset+golden" / f"model+{TINY_MODEL}").iterdir()
    _run("inference.py", "--model_path", str(run), "--inference_folder", str(data / "testset"),
         "--inference_output", str(work / "inference"), "--generate_gradcam", "--labels_from_folders",
         "--num_workers", "0", "--device", "cpu")
    _run("quantize_onnx_models.py", "--model_path", str(run), "--output_dir", str(work / "onnx"),
         "--skip_segmentation")
    return work


def _structure(path: Path):
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return {"header": next(csv.reader(fh), [])}
    if path.suffix == ".json":
        return {"keys": sorted(_key_paths(json.loads(path.read_text(encoding="utf-8"))))}
    return None


def _key_paths(value, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        paths = set()
        for key, item in value.items():
            paths.add(f"{prefix}{key}")
            paths |= _key_paths(item, f"{prefix}{key}.")
        return paths
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _key_paths(value[0], f"{prefix}[].")
    return set()


def _canonical(value, digest) -> None:
    """Feed a loaded checkpoint into ``digest`` in a fixed order (torch.save's zip bytes vary between saves)."""
    import torch

    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in value:
            digest.update(f"K{key!r}".encode())
            _canonical(value[key], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _canonical(item, digest)
    else:
        digest.update(f"V{value!r}".encode())


def _content_hash(path: Path) -> str:
    """SHA-256 of what the file says: checkpoints by content, ONNX without the run folder's (timestamped) path,
    JSON reports without their wall-clock times; every other file byte for byte."""
    digest = hashlib.sha256()
    if path.suffix == ".pth":
        import torch

        _canonical(torch.load(path, map_location="cpu", weights_only=True), digest)
    elif path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path))
        for prop in model.metadata_props:
            if prop.key == "source_run":
                prop.value = STAMP.sub("RUN", prop.value)
        digest.update(model.SerializeToString(deterministic=True))
    elif path.name in WALL_CLOCK_KEYS:
        values = json.loads(path.read_text(encoding="utf-8"))
        values.pop(WALL_CLOCK_KEYS[path.name], None)
        digest.update(json.dumps(values, sort_keys=True).encode())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def snapshot(work: Path) -> dict[str, dict]:
    """{relative path with the run's timestamp as RUN: {sha256 or None for timed files, structure}}."""
    files = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file() and "data" not in p.relative_to(work).parts[:1]):
        relative = STAMP.sub("RUN", path.relative_to(work).as_posix())
        timed = bool(TIMED.search(relative))
        files[relative] = {"sha256": None if timed else _content_hash(path), "structure": _structure(path)}
    return files


def compare(before: dict, after: dict) -> list[str]:
    """Differences between two snapshots, one line each (empty: identical)."""
    lines = [f"only before: {name}" for name in sorted(set(before) - set(after))]
    lines += [f"only after: {name}" for name in sorted(set(after) - set(before))]
    for name in sorted(set(before) & set(after)):
        for key in ("structure", "sha256"):
            if before[name][key] != after[name][key]:
                lines.append(f"{key} differs: {name}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/skinclf-golden"))
    parser.add_argument("--manifest", type=Path, help="write the snapshot here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differences = compare(before, after)
        print("\n".join(differences) or f"identical: {len(before)} files")
        return 1 if differences else 0
    manifest = snapshot(make_golden_run(args.work))
    if args.manifest:
        args.manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    print(f"{len(manifest)} files, {sum(v['sha256'] is not None for v in manifest.values())} hashed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
