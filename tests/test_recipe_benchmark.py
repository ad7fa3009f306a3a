"""The recipe judge's tables: main minus plain is paired by seed, and the ablation table says what each step bought."""

import pandas as pd
import pytest

from benchmarks import recipe_vs_plain_timm as judge


def _row(dataset: str, method: str, seed: int, balanced: float, **variants: float) -> dict:
    row = {"dataset": dataset, "method": method, "seed": seed, "accuracy": balanced, "balanced_accuracy": balanced,
           "macro_auc": 0.9, "ece": 0.05, "ece_uncalibrated": 0.05, "train_images_per_s": 10.0,
           "select_seconds": 1.0, "refit_seconds": 1.0, "wall_seconds": 2.0}
    for name in judge.VARIANTS:
        row[f"{name}_balanced_accuracy"] = variants.get(name, float("nan"))
    return row


def test_differences_are_paired_by_seed_and_ablation_counts_wins():
    results = pd.DataFrame([
        _row("set_a", "plain", 0, 0.70), _row("set_a", "plain", 1, 0.60),
        _row("set_a", "main", 0, 0.74, no_refit=0.72, no_tta=0.74, no_ema=0.75),
        _row("set_a", "main", 1, 0.66, no_refit=0.63, no_tta=0.65, no_ema=0.67),
        _row("set_a", "main", 2, 0.90, no_refit=0.80, no_tta=0.90, no_ema=0.91),  # no plain seed 2: not paired
    ])
    summary, markdown = judge.summarise(results)

    main = summary.set_index("method").loc["main"]
    assert main["seeds"] == 3
    assert main["balanced_accuracy_mean"] == pytest.approx((0.74 + 0.66 + 0.90) / 3)
    # main − plain on seeds 0 and 1 only: +4 and +6 points
    assert "| set_a | main (2 seeds) | +5.00 ± 1.41 | +5.00 ± 1.41 |" in markdown
    assert "averaged over 1 dataset(s): +5.00 points" in markdown
    ablation = next(line for line in markdown.splitlines() if "helped" in line)
    cells = [cell.strip() for cell in ablation.strip("|").split("|")]
    assert cells[4] == "+5.00 ± 4.36 (3/3 helped)"  # refit: +2, +3, +10 points
    assert cells[5].startswith("+0.33") and cells[5].endswith("(1/3 helped)")  # TTA: 0, +1, 0
    assert cells[6] == "-1.00 ± 0.00 (0/3 helped)"  # EMA cost a point every time


def test_ablation_table_is_left_out_for_results_written_before_variants_were_recorded():
    results = pd.DataFrame([_row("set_a", "plain", 0, 0.7), _row("set_a", "main", 0, 0.8)])
    results = results.drop(columns=[f"{name}_balanced_accuracy" for name in judge.VARIANTS])
    _, markdown = judge.summarise(results)
    assert "Δ vs no_ema" not in markdown
    assert "| set_a | main (1 seeds) |" in markdown


def test_tagged_ablation_is_paired_with_the_same_seeds_default_run_before_refit_when_it_turns_refit_off():
    # the default main runs come from an earlier comparison (--baseline_results); they refit, so their
    # no_refit variant is the model an ablation trained with --refit False must be compared with
    baseline = pd.DataFrame([_row("set_a", "main", 0, 0.80, no_refit=0.75),
                             _row("set_a", "main", 1, 0.70, no_refit=0.72), _row("set_a", "plain", 0, 0.10)])
    ablation = pd.DataFrame([
        {**_row("set_a", "main[mixup]", 0, 0.77), "main_args": "--refit False --mixup 0.2"},  # +2 vs no_refit 0.75
        {**_row("set_a", "main[mixup]", 1, 0.69), "main_args": "--refit False --mixup 0.2"},  # -3 vs no_refit 0.72
        {**_row("set_a", "main[mixup]", 2, 0.99), "main_args": "--refit False --mixup 0.2"},  # no default seed 2
        {**_row("set_a", "main[ld]", 0, 0.81), "main_args": "--layer_decay 0.75"},  # refit kept: +1 vs 0.80
    ])
    _, markdown = judge.summarise(ablation, baseline)

    rows = {cells[1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in markdown.splitlines() if "| set_a | main[" in line
                                          and "s0 " in line)}
    assert rows["main[mixup]"][2:] == ["2", "-0.50 ± 3.54", "1/2", "s0 +2.00, s1 -3.00"]
    assert rows["main[ld]"][2:] == ["1", "+1.00 ± 0.00", "1/1", "s0 +1.00"]
    assert "main[mixup] minus default main: raised balanced accuracy on 0 of 1 dataset(s), mean -0.50" in markdown
    assert "main[ld] minus default main: raised balanced accuracy on 1 of 1 dataset(s)" in markdown


def test_eval_crop_policies_are_scored_like_main_py_scores_its_testset(tiny_run):
    """The policy comparison is only the policy's if the run's own policy gives exactly main.py's test result."""
    import argparse

    from benchmarks import eval_crop_policy

    runs = eval_crop_policy.runs_from(argparse.Namespace(results=None, run_dirs=[str(tiny_run)]))
    scores = eval_crop_policy.score_runs(runs, batch_size=8)

    assert list(scores["policy"]) == ["center@run", "center@1.0", "squash@1.0", "letterbox@1.0"]
    assert scores["crop_pct"].iloc[1:].eq(1.0).all()
    eval_crop_policy.check_reproduced(scores)  # raises SystemExit when the run's own policy misses test_metrics.json
    own = scores.iloc[0]
    assert own["balanced_accuracy"] == pytest.approx(own["recorded_balanced_accuracy"], abs=1e-9)
    assert "| center@1.0 | 1 |" in eval_crop_policy.summary_markdown(scores)

    scores.loc[0, "recorded_balanced_accuracy"] += 0.01
    with pytest.raises(SystemExit, match="did not reproduce"):
        eval_crop_policy.check_reproduced(scores)
