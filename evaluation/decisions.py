"""Clinical decisions on top of the calibrated probabilities: operating points ("flag malignant at 95% sensitivity")
and abstention ("say uncertain unless the answer is 95% likely to be right").

Both are chosen on held-out predictions (the validation split, or out-of-fold predictions with --folds), never on
test, then reported on test and stored in the run folder (class_info.json) and the ONNX metadata, so every backend
applies the same thresholds. A flag is ``probability of the class >= threshold`` (one-vs-rest); a decision is the top
class when its probability is >= the abstention threshold, else ``uncertain``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from utils.errors import UserError

logger = logging.getLogger(__name__)

OPERATING_METRICS = ("sensitivity", "specificity")
ABSTAIN_KINDS = ("accuracy", "coverage")
UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class OperatingPointSpec:
    class_name: str
    metric: str  # sensitivity or specificity of "flag this class" against the rest
    target: float


def parse_operating_points(text: Optional[str], class_names: Optional[list[str]] = None) -> list[OperatingPointSpec]:
    """``"malignant:sensitivity=0.95,nevus:specificity=0.9"``; with ``class_names``, every class must exist."""
    if not text:
        return []
    specs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, goal = part.rpartition(":")
        metric, _, value = goal.partition("=")
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if not name or metric not in OPERATING_METRICS or not 0.0 < target <= 1.0:
            raise UserError(f"--operating_point {part!r}: write <class>:sensitivity=<0..1> or "
                            f"<class>:specificity=<0..1>, e.g. malignant:sensitivity=0.95")
        if class_names is not None and name not in class_names:
            raise UserError(f"--operating_point {part!r}: no class {name!r}; classes are {', '.join(class_names)}")
        specs.append(OperatingPointSpec(name, metric, target))
    return specs


@dataclass(frozen=True)
class AbstainSpec:
    kind: str  # accuracy: the selective accuracy to reach; coverage: the share of images to answer
    target: float


def parse_abstain(text: Optional[str]) -> Optional[AbstainSpec]:
    if not text:
        return None
    kind, _, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = math.nan
    if kind.strip() not in ABSTAIN_KINDS or not 0.0 < target <= 1.0:
        raise UserError(f"--abstain {text!r}: write accuracy=<0..1> (answer only where that accurate) or "
                        f"coverage=<0..1> (answer that share of images), e.g. accuracy=0.95")
    return AbstainSpec(kind.strip(), target)


def _needed(target: float) -> int:
    """Cases needed to measure ``target`` in steps fine enough to land on it rather than jump to 1.0."""
    return 1 if target >= 1.0 else math.ceil(1.0 / (1.0 - target) - 1e-9)


def choose_operating_point(spec: OperatingPointSpec, class_names: list[str], targets: np.ndarray,
                           probs: np.ndarray) -> dict[str, Any]:
    """The threshold on P(class) that reaches the target on these (held-out) predictions with the best other
    metric, or an ``unreachable`` record saying what these predictions can measure."""
    k = class_names.index(spec.class_name)
    scores, positive = probs[:, k], targets == k
    relevant = scores[positive] if spec.metric == "sensitivity" else scores[~positive]
    record: dict[str, Any] = {"class": spec.class_name, "metric": spec.metric, "target": spec.target,
                              "validation_cases": int(len(relevant))}
    if len(relevant) < _needed(spec.target):
        step = 1.0 / len(relevant) if len(relevant) else None
        record.update(status="unreachable", threshold=None,
                      reachable=None if step is None else round(1.0 - step, 4),
                      reason=f"held-out predictions have {len(relevant)} "
                             f"{'positive' if spec.metric == 'sensitivity' else 'negative'} case(s) of "
                             f"{spec.class_name!r}; a {spec.metric} of {spec.target} needs at least "
                             f"{_needed(spec.target)} to be measured")
        return record
    needed = math.ceil(spec.target * len(relevant) - 1e-9)
    others = scores[~positive] if spec.metric == "sensitivity" else scores[positive]
    if spec.metric == "sensitivity":
        edge = float(np.sort(relevant)[::-1][needed - 1])  # the needed-th highest positive score must still flag
        # Every threshold down to the highest negative score below it flags the same negatives (and perhaps more
        # positives); take the middle of that gap, not its edge: a well-separated, overconfident model puts its
        # positives at 0.9999, and a threshold at the edge would miss test positives at 0.999.
        below = others[others < edge]
        threshold = _logit_midpoint(float(below.max()), edge) if len(below) else edge
    else:
        edge = float(np.sort(relevant)[needed - 1])  # that many negatives must stay at or below it, unflagged
        above = others[others > edge]
        threshold = (_logit_midpoint(edge, float(above.min())) if len(above)
                     else float(np.nextafter(edge, np.inf)))
    flagged = scores >= threshold
    record.update(status="ok", threshold=threshold, **{f"validation_{m}": v for m, v in
                                                      binary_rates(positive, flagged).items()})
    return record


def _logit_midpoint(low: float, high: float) -> float:
    """The probability halfway between ``low`` and ``high`` in log-odds, where saturated probabilities spread out;
    strictly inside (low, high]."""
    eps = 1e-12
    to_logit = lambda p: math.log(max(p, eps) / max(1 - p, eps))  # noqa: E731
    middle = 1 / (1 + math.exp(-(to_logit(low) + to_logit(high)) / 2))
    return middle if low < middle <= high else high


def binary_rates(positive: np.ndarray, flagged: np.ndarray) -> dict[str, Optional[float]]:
    tp, fn = int((flagged & positive).sum()), int((~flagged & positive).sum())
    fp, tn = int((flagged & ~positive).sum()), int((~flagged & ~positive).sum())

    def ratio(a: int, b: int) -> Optional[float]:
        return a / (a + b) if a + b else None

    return {"sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}


def choose_abstention(spec: AbstainSpec, targets: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The confidence threshold that answers as many held-out images as the target allows."""
    confidence = probs.max(1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probs.argmax(1) == targets)[order]
    ranked = confidence[order]
    n = len(targets)
    record: dict[str, Any] = {"kind": spec.kind, "target": spec.target, "validation_images": n}
    if spec.kind == "coverage":
        keep = max(1, math.ceil(spec.target * n - 1e-9))
    else:
        selective = np.cumsum(correct) / np.arange(1, n + 1)
        reaching = np.flatnonzero(selective >= spec.target)
        if not len(reaching) or n < _needed(spec.target):
            record.update(status="unreachable", threshold=None, reachable=float(selective.max()) if n else None,
                          reason=f"no confidence threshold reaches a selective accuracy of {spec.target} on {n} "
                                 f"held-out images" + (f" (at least {_needed(spec.target)} needed)"
                                                       if n < _needed(spec.target) else ""))
            return record
        keep = int(reaching[-1]) + 1
    threshold = float(ranked[keep - 1])
    answered = confidence >= threshold
    record.update(status="ok", threshold=threshold, validation_coverage=float(answered.mean()),
                  validation_selective_accuracy=float((probs.argmax(1) == targets)[answered].mean()))
    return record


def risk_coverage(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Coverage and selective risk (error rate among the answered) when answering the k most confident images,
    k = 1..n, and the area under that curve (AURC; lower is better)."""
    confidence = probs.max(1)
    order = np.argsort(-confidence, kind="stable")
    wrong = (probs.argmax(1) != targets)[order]
    counts = np.arange(1, len(targets) + 1)
    risk = np.cumsum(wrong) / counts
    return counts / len(targets), risk, float(risk.mean())


def flags_and_decision(probs: np.ndarray, class_names: list[str], operating_points: list[dict[str, Any]],
                       abstain: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The extra prediction columns of one image: ``flag_<class>`` per usable operating point, and ``decision``
    (the top class, or ``uncertain``) when abstention is set."""
    columns: dict[str, Any] = {}
    for point in operating_points:
        if point.get("threshold") is not None:
            k = class_names.index(point["class"])
            columns[f"flag_{point['class']}"] = bool(probs[k] >= point["threshold"])
    if abstain and abstain.get("threshold") is not None:
        best = int(probs.argmax())
        columns["decision"] = class_names[best] if probs[best] >= abstain["threshold"] else UNCERTAIN
    return columns


def decision_columns(class_names: list[str], operating_points: list[dict[str, Any]],
                     abstain: Optional[dict[str, Any]]) -> tuple[str, ...]:
    """The names ``flags_and_decision`` fills, in order, for the CSV header."""
    names = [f"flag_{p['class']}" for p in operating_points if p.get("threshold") is not None]
    if abstain and abstain.get("threshold") is not None:
        names.append("decision")
    return tuple(names)


def decisions_on_test(targets: np.ndarray, probs: np.ndarray, class_names: list[str], operating_points: list[dict[str, Any]],
                abstain: Optional[dict[str, Any]], groups=None) -> dict[str, Any]:
    """What the chosen thresholds achieve on test: per operating point sensitivity and specificity with 95%
    intervals, PPV and NPV at the test prevalence; for abstention the coverage and selective accuracy with
    intervals, and the AURC of the whole risk-coverage curve."""
    from evaluation.bootstrap import binary_intervals, selective_accuracy_interval

    report: dict[str, Any] = {"operating_points": [], "abstention": None}
    for point in operating_points:
        entry = dict(point)
        if point.get("threshold") is not None:
            k = class_names.index(point["class"])
            positive, flagged = targets == k, probs[:, k] >= point["threshold"]
            entry["test"] = {**binary_rates(positive, flagged), "prevalence": float(positive.mean()),
                             "intervals": binary_intervals(positive, flagged, groups=groups)}
        report["operating_points"].append(entry)
    _, _, aurc = risk_coverage(targets, probs)
    report["aurc"] = aurc
    if abstain is not None:
        entry = dict(abstain)
        if abstain.get("threshold") is not None:
            answered = probs.max(1) >= abstain["threshold"]
            correct = probs.argmax(1) == targets
            entry["test"] = {"coverage": float(answered.mean()),
                             "selective_accuracy": float(correct[answered].mean()) if answered.any() else None,
                             "intervals": selective_accuracy_interval(correct, answered, groups=groups)}
        report["abstention"] = entry
    return report


def choose_decisions(operating_point: Optional[str], abstain: Optional[str], class_names: list[str],
                     targets: np.ndarray, probs: np.ndarray) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """Parse the flags and choose every threshold on the held-out (calibrated) predictions; unreachable targets are
    warned about and recorded, never moved."""
    points = [choose_operating_point(spec, class_names, targets, probs)
              for spec in parse_operating_points(operating_point, class_names)]
    abstain_spec = parse_abstain(abstain)
    chosen_abstain = choose_abstention(abstain_spec, targets, probs) if abstain_spec else None
    for record in points + ([chosen_abstain] if chosen_abstain else []):
        if record["status"] == "unreachable":
            logger.warning("%s: %s; recorded as unreachable (closest reachable value %s), no threshold is applied",
                           _describe(record), record["reason"], record["reachable"])
    return points, chosen_abstain


def _describe(record: dict[str, Any]) -> str:
    if "class" in record:
        return f"operating point {record['class']}:{record['metric']}={record['target']}"
    return f"abstention {record['kind']}={record['target']}"


def log_decisions(report: dict[str, Any]) -> None:
    from evaluation.bootstrap import format_interval

    for point in report["operating_points"]:
        test = point.get("test")
        if test is None:
            continue
        intervals = test["intervals"]
        logger.info("%s (threshold %.4f): test sensitivity %s, specificity %s, PPV %s, NPV %s at prevalence %.3f",
                    _describe(point), point["threshold"],
                    format_interval(test["sensitivity"], intervals["sensitivity"]),
                    format_interval(test["specificity"], intervals["specificity"]),
                    "n/a" if test["ppv"] is None else f"{test['ppv']:.3f}",
                    "n/a" if test["npv"] is None else f"{test['npv']:.3f}", test["prevalence"])
    abstention = report.get("abstention")
    if abstention and abstention.get("test"):
        test = abstention["test"]
        logger.info("%s (confidence >= %.4f): test coverage %s, selective accuracy %s; AURC %.4f",
                    _describe(abstention), abstention["threshold"],
                    format_interval(test["coverage"], test["intervals"]["coverage"]),
                    format_interval(test["selective_accuracy"], test["intervals"]["selective_accuracy"]),
                    report["aurc"])


def write_held_out_predictions(path: Path, targets: np.ndarray, probs: np.ndarray, class_names: list[str]) -> None:
    """The calibrated held-out predictions the thresholds were chosen on, so inference can choose new ones."""
    import pandas as pd

    from utils.atomic import atomic_save

    frame = pd.DataFrame({"label": targets, **{f"prob_{name}": probs[:, k] for k, name in enumerate(class_names)}})
    atomic_save(path, lambda tmp: frame.to_csv(tmp, index=False))


def read_held_out_predictions(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{path} is missing (the run predates operating points); retrain the run to choose "
                        f"thresholds at inference, or use the run's own")
    frame = pd.read_csv(path)
    return frame["label"].to_numpy(), frame[[f"prob_{name}" for name in class_names]].to_numpy()
