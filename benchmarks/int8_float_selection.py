"""INT8 per way of choosing what stays FP32, on one run, with every file timed in one benchmark run.

Exports the run as quantize_onnx_models.py does once per variant (each into its own folder under --work_dir):
  all_int8     every node INT8 (--min_agreement 0), the reference for speed
  prefix       whole leading stages in FP32 until the agreement holds (--float_selection prefix)
  sensitivity  the blocks whose FP32 copy brings INT8 closest to FP32, until the agreement holds
  divergence   the same search, blocks ordered by the divergence from FP32 alone (--float_selection divergence)
  auto         sensitivity with --calibrate_method auto (minmax, percentile, entropy: the fewest FP32 nodes)
  percentile, entropy
               sensitivity with that calibration alone (sensitivity itself calibrates by minmax), so each method's
               test agreement is in the table, not only the one auto keeps
  qat          sensitivity, then quantization-aware tuning (--qat_epochs) in every case (--max_float_share 0);
               the tuned file is kept only if it needs fewer FP32 nodes or agrees more
  qat_all_int8 the tuning's own effect: every node INT8 before and after tuning (both files' figures in the table)
  qat_all_int8_views_8, qat_views_8
               qat_all_int8 and qat with the best pass and the search judged on 8 views of every validation image
  all_int8_no_bc, prefix_no_bc, sensitivity_no_bc, views_8_no_bc
               those variants without bias correction (--bias_correction False)
  all_int8_no_grid, prefix_no_grid, sensitivity_no_grid
               those variants with the input on its calibrated grid (--pixel_exact_input False)
  all_int8_vnni, prefix_vnni, sensitivity_vnni
               those variants with 8-bit weights everywhere (--int8_target_cpu vnni; the others: matrix-kernel
               weights whose neighbouring pairs cannot saturate on x86 CPUs without VNNI)
  random_calib, calib_100, calib_400
               sensitivity with calibration images drawn in proportion to the classes, or 100 / 400 of them
  views_4, views_8, prefix_views_8, divergence_views_8
               that search with the agreement checked on 4 or 8 views of every validation image (--check_views)
then times PyTorch eager, ONNX FP32 and every INT8 file in alternating fresh processes (deploy.benchmarking) and
prints one table: share of nodes in FP32, validation and test agreement with FP32, how far INT8 moves FP32's lead of
the top-1 class over the runner-up on the test images (median, 90th percentile; beside the share of near ties),
agreement and KL divergence from FP32 on 8 views of every test image, with this CPU's INT8 kernels and with the
file's QDQ graph run operation by operation (what it computes on a CPU whose kernels do not saturate),
test accuracy and balanced accuracy, size, batch-1 and batch-32 p50 latency and speed-up over ONNX FP32, with the
CPU it ran on.

Example (docs/measurements_speed.md, "INT8: FP32로 남길 부분 고르기"):
    python -m benchmarks.int8_float_selection --model_path <run folder> --work_dir /tmp/int8_selection
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from configs import BenchmarkOptions, ExportOptions, QuantOptions
from deploy.benchmarking import load_test_images, time_frameworks
from deploy.machine import describe_machine, machine_info
from deploy.onnx_export import export_run
from deploy.onnx_quant import agreement_and_divergence, agreement_and_kl, check_views
from runs.export_dir import ExportDir
from runs.run_info import read_run_info
from utils.logging_setup import setup_logging

_SEARCH = {"float_selection": "sensitivity"}  # named, not left to QuantOptions' default (prefix)
VARIANTS = {
    "all_int8": {"min_agreement": 0.0},
    "prefix": {"float_selection": "prefix"},
    "sensitivity": _SEARCH,
    "divergence": {"float_selection": "divergence"},
    "auto": {**_SEARCH, "calibrate_method": "auto"},
    "percentile": {**_SEARCH, "calibrate_method": "percentile"},
    "entropy": {**_SEARCH, "calibrate_method": "entropy"},
    # --max_float_share 0: tune even where post-training INT8 already meets the share, to measure what tuning brings
    "qat": {**_SEARCH, "qat_epochs": 2, "max_float_share": 0.0},
    # the tuning's own effect: post-training and tuned files both all INT8, the one agreeing more is kept
    "qat_all_int8": {"qat_epochs": 2, "max_float_share": 0.0, "min_agreement": 0.0},
    # the same, its best pass chosen on 8 views of every validation image
    "qat_all_int8_views_8": {"qat_epochs": 2, "max_float_share": 0.0, "min_agreement": 0.0, "check_views": 8},
    # the sensitivity search on 8 views, then tuning in every case (the file needing fewer FP32 nodes is kept)
    "qat_views_8": {**_SEARCH, "qat_epochs": 2, "max_float_share": 0.0, "check_views": 8},
    # the same without bias correction (--bias_correction False): what the correction brings
    "all_int8_no_bc": {"min_agreement": 0.0, "bias_correction": False},
    "prefix_no_bc": {"float_selection": "prefix", "bias_correction": False},
    "sensitivity_no_bc": {**_SEARCH, "bias_correction": False},
    "views_8_no_bc": {**_SEARCH, "check_views": 8, "bias_correction": False},
    # the same with the input quantized on its calibrated grid (--pixel_exact_input False)
    "all_int8_no_grid": {"min_agreement": 0.0, "pixel_exact_input": False},
    "prefix_no_grid": {"float_selection": "prefix", "pixel_exact_input": False},
    "sensitivity_no_grid": {**_SEARCH, "pixel_exact_input": False},
    # the same with 8-bit weights everywhere (--int8_target_cpu vnni): saturates on x86 CPUs without VNNI
    "all_int8_vnni": {"min_agreement": 0.0, "int8_target_cpu": "vnni"},
    "prefix_vnni": {"float_selection": "prefix", "int8_target_cpu": "vnni"},
    "sensitivity_vnni": {**_SEARCH, "int8_target_cpu": "vnni"},
    # calibration images: drawn in proportion to the classes instead of balanced, and half / double the default count
    "random_calib": {**_SEARCH, "calib_sampling": "random"},
    "calib_100": {**_SEARCH, "calib_images": 100},
    "calib_400": {**_SEARCH, "calib_images": 400},
    # the agreement check and the search on 4 / 8 views of every validation image (--check_views)
    "views_4": {**_SEARCH, "check_views": 4},
    "views_8": {**_SEARCH, "check_views": 8},
    "prefix_views_8": {"float_selection": "prefix", "check_views": 8},
    "divergence_views_8": {"float_selection": "divergence", "check_views": 8},
}
DEFAULT_VARIANTS = ("all_int8", "prefix", "sensitivity", "auto", "qat")
TEST_VIEWS = 8
NEAR_TIE = 0.05  # a lead of the top-1 class over the runner-up under this (probability) counts as a near tie


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("INT8 per float-selection method, timed in one run", add_help=add_help)
    parser.add_argument("--model_path", required=True, help="run folder written by main.py")
    parser.add_argument("--work_dir", required=True, help="folder for one export per variant (created)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--qat_epochs", type=int, default=2, help="passes of quantization-aware tuning (qat)")
    parser.add_argument("--calib_images", type=int, default=200)
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = all cores")
    parser.add_argument("--skip_timing", action="store_true", help="export and score only")
    parser.add_argument("--reuse_exports", action="store_true",
                        help="time the exports an earlier call left in --work_dir instead of exporting again")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging()
    run, work = Path(args.model_path), Path(args.work_dir)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: --variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    reports = {}
    for name in names:
        saved = work / name / "selection_report.json"
        if args.reuse_exports and saved.is_file():
            reports[name] = json.loads(saved.read_text())
            continue
        options = {"calib_images": args.calib_images, **VARIANTS[name]}  # a variant's own count wins
        if name.startswith("qat"):
            options["qat_epochs"] = args.qat_epochs
        settings = ExportOptions(quant=QuantOptions(**options))
        reports[name] = export_run(run, ExportDir(work / name), settings)
        saved.write_text(json.dumps(reports[name], indent=1, default=str))
    timing: dict[str, dict] = {}
    machine = machine_info(args.threads)
    info = read_run_info(run)
    images, labels, _ = load_test_images(run, info, None, 0)
    near_tie_share, gap_shifts = _gap_shifts(work, names, images, info.n_class)
    if not args.skip_timing:
        bench = BenchmarkOptions(batch_sizes=args.batch_sizes, iterations=args.iterations, rounds=args.rounds,
                                 threads=args.threads, warmup=5)
        frameworks = {"pytorch": None, "onnx_fp32": str(ExportDir(work / names[0]).fp32),
                      **{name: str(ExportDir(work / name).int8) for name in names}}
        for row in time_frameworks(run, frameworks, images, labels, info.model_name, bench, "cpu"):
            timing.setdefault(row["framework"], {})[row["batch_size"]] = row
    rows = []
    fp32 = timing.get("onnx_fp32", {})
    for name in names:
        report, timed = reports[name], timing.get(name, {})
        row = {"variant": name, "calibrate_method": report["calibrate_method"],
               "float_nodes": report["int8_float_nodes"], "graph_nodes": report["graph_nodes"],
               "float_share": round(report["int8_float_share"], 3),
               "float_blocks": "+".join(report["int8_float_units"]) or (
                   f"{report['int8_float_stages']} stages" if report["int8_float_stages"] else "-"),
               "val_agreement_before_search": (report.get("agreement_attempts") or [{}])[0].get("val_top1_agreement"),
               "val_agreement": report["val_top1_agreement"], "test_agreement": report["int8_top1_agreement"],
               "test_accuracy": report["int8_accuracy"], "fp32_test_accuracy": report["fp32_accuracy"],
               "size_ratio": round(report["int8_size_ratio"], 3),
               "bias_corrected_nodes": report.get("int8_bias_corrected"),
               "input_on_pixel_grid": report.get("int8_input_on_pixel_grid"),
               "target_cpu": report.get("int8_target_cpu", "vnni"), "qat_kept": report.get("qat", {}).get("kept"),
               "qat_seconds": report.get("qat", {}).get("seconds"),
               "qat_best_pass": report.get("qat", {}).get("best_pass")}
        row.update(gap_shifts[name])
        for side in ("post_training", "tuned"):  # both files of a tuning, whichever was kept
            for key in ("int8_float_nodes", "val_top1_agreement", "int8_top1_agreement", "int8_accuracy"):
                if side in report.get("qat", {}):
                    row[f"qat_{side}_{key.removeprefix('int8_')}"] = report["qat"][side][key]
        for batch, timed_row in timed.items():
            row[f"b{batch}_p50_ms"] = timed_row["p50_ms"]
            row[f"b{batch}_vs_fp32"] = round(fp32[batch]["p50_ms"] / timed_row["p50_ms"], 2)
            row["test_balanced_accuracy"] = timed_row["test_balanced_accuracy"]
        rows.append(row)
    print(f"machine: {describe_machine(machine)}")
    print(f"test images whose FP32 top-1 leads the runner-up by less than {NEAR_TIE} probability: "
          f"{100 * near_tie_share:.1f}%")
    for batch, fp32_row in fp32.items():
        torch_row = timing["pytorch"][batch]
        print(f"batch {batch}: PyTorch eager p50 {torch_row['p50_ms']} ms, ONNX FP32 p50 {fp32_row['p50_ms']} ms; "
              f"FP32 test accuracy {fp32_row['test_accuracy']}, balanced {fp32_row['test_balanced_accuracy']}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(",".join(columns))
    for row in rows:
        print(",".join("" if row.get(c) is None else str(row.get(c)) for c in columns))
    return rows


def _gap_shifts(work: Path, names: list[str], images: np.ndarray, n_class: int
                ) -> tuple[float, dict[str, dict[str, float]]]:
    """How far each INT8 file moves FP32's lead of the top-1 class over the runner-up on the test images (median
    and 90th percentile, in probability), and the share of test images FP32 answers by a lead under NEAR_TIE: an
    answer flips where the first reaches the second, so the two together say how much smaller INT8's error must
    get to keep a given share of answers."""
    from prediction.predictors import onnx_probs

    batch = torch.from_numpy(images)
    fp32 = onnx_probs(ExportDir(work / names[0]).fp32, batch, n_class)
    rows = np.arange(len(fp32))
    ranked = np.argsort(fp32, 1)
    first, second = ranked[:, -1], ranked[:, -2]
    lead = fp32[rows, first] - fp32[rows, second]
    # 8 views of every test image: eight times the inputs for the agreement on photos no choice was made on.
    views = check_views(batch, TEST_VIEWS)
    fp32_views = onnx_probs(ExportDir(work / names[0]).fp32, views, n_class)
    shifts = {}
    for name in names:
        int8 = onnx_probs(ExportDir(work / name).int8, batch, n_class)
        shift = np.abs(int8[rows, first] - int8[rows, second] - lead)
        views_agreement, views_kl = agreement_and_divergence(ExportDir(work / name).int8, views, fp32_views)
        unfused_agreement, unfused_kl = _agreement_unfused(ExportDir(work / name).int8, views, fp32_views)
        shifts[name] = {"test_gap_shift_median": round(float(np.median(shift)), 4),
                        "test_gap_shift_p90": round(float(np.quantile(shift, 0.9)), 4),
                        f"test_views_{TEST_VIEWS}_agreement": round(views_agreement, 4),
                        f"test_views_{TEST_VIEWS}_kl": round(views_kl, 5),
                        f"test_views_{TEST_VIEWS}_agreement_unfused": round(unfused_agreement, 4),
                        f"test_views_{TEST_VIEWS}_kl_unfused": round(unfused_kl, 5)}
    return float(np.mean(lead < NEAR_TIE)), shifts



def _agreement_unfused(path: Path, images: torch.Tensor, reference_probs: np.ndarray) -> tuple[float, float]:
    """agreement_and_divergence of the file's QDQ graph run operation by operation (float convolutions of the
    dequantized integers): what the file computes on a CPU whose INT8 kernels do not saturate (VNNI, AMX, ARM)."""
    from prediction.predictors import softmax
    from utils.onnx_runtime import create_session

    session = create_session(path, optimize=False)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: images[i:i + 32].numpy()})[0]
                             for i in range(0, len(images), 32)])
    return agreement_and_kl(softmax(logits), reference_probs)

if __name__ == "__main__":
    logging.captureWarnings(True)
    main(get_args_parser().parse_args())
