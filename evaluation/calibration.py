"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits, ``softmax(logits / T)``.

``guarded_temperature`` only moves T away from 1.0 when that lowers the NLL of predictions the fit has not seen
(K-fold cross-validation over the calibration set): a T fitted on a few hundred images can otherwise sharpen an
already over-confident model. Sharpening (T < 1) needs far stronger evidence than softening: the calibration
predictions come from the split that also chose the best epoch, so the model looks better there than on new photos
and a fitted T is biased towards sharpening.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

T_MIN, T_MAX = 0.05, 20.0
CV_FOLDS = 5
# Below these a fitted temperature is a guess: too few images, or too few errors to tell confidence from luck.
MIN_CALIBRATION_IMAGES = 200
MIN_CALIBRATION_ERRORS = 20
# The held-out NLL must fall by at least this share before T moves: smaller gains are within fitting noise, and a
# sharpening T (< 1) must clear a much higher bar (selection bias, see above).
MIN_NLL_GAIN_SOFTEN = 0.005
MIN_NLL_GAIN_SHARPEN = 0.10


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T that minimises validation NLL (LBFGS on log T, so T stays positive).

    1.0 without data, and 1.0 when every validation image is classified correctly: the NLL then keeps falling as
    T goes to 0, so the "fit" would only make the model more confident than any evidence supports.
    """
    if len(targets) == 0 or (np.asarray(logits).argmax(1) == np.asarray(targets)).all():
        return 1.0
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits_t / log_t.exp(), targets_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), T_MIN, T_MAX))


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities: logits up to a per-row constant, which softmax ignores."""
    return np.log(np.clip(probs, 1e-12, None))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return probs
    scaled = logits_from_probs(probs) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    logits_t = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(F.cross_entropy(logits_t, torch.as_tensor(targets, dtype=torch.long)))


@dataclass
class CalibrationResult:
    temperature: float      # what gets applied: the fitted T, or 1.0 when the guard refused it
    fitted: float           # T fitted on the whole calibration set
    accepted: bool
    n_images: int
    n_errors: int
    cv_nll_fitted: float    # mean held-out NLL with T fitted on the other folds
    cv_nll_identity: float  # mean held-out NLL with T = 1
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def guarded_temperature(logits: np.ndarray, targets: np.ndarray, folds: int = CV_FOLDS,
                        seed: int = 0) -> CalibrationResult:
    """Temperature scaling that holds on unseen data: the T fitted on all of ``logits`` is used only when, in
    ``folds``-fold cross-validation, temperatures fitted on the other folds lower the held-out folds' NLL below
    T = 1 by at least 0.5% (softening, T > 1) or 10% (sharpening, T < 1); otherwise T stays 1.0. Warns when the calibration set is too small to trust."""
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    n_images = len(targets)
    n_errors = int((logits.argmax(1) != targets).sum()) if n_images else 0
    fitted = fit_temperature(logits, targets)
    if n_images < folds * 2 or n_errors == 0:
        return CalibrationResult(1.0, fitted, False, n_images, n_errors, float("nan"), float("nan"),
                                 "too few images or no errors to calibrate on")
    order = np.random.default_rng(seed).permutation(n_images)
    held_fitted, held_identity = [], []
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        t_fold = fit_temperature(logits[rest], targets[rest])
        held_fitted.append(nll(logits[fold], targets[fold], t_fold) * len(fold))
        held_identity.append(nll(logits[fold], targets[fold]) * len(fold))
    cv_fitted, cv_identity = sum(held_fitted) / n_images, sum(held_identity) / n_images
    needed = MIN_NLL_GAIN_SHARPEN if fitted < 1.0 else MIN_NLL_GAIN_SOFTEN
    gain = 1 - cv_fitted / cv_identity
    accepted = gain >= needed
    reason = (f"cross-validated NLL {cv_fitted:.4f} vs {cv_identity:.4f} at T = 1 ({100 * gain:+.1f}%; "
              f"{'sharpening' if fitted < 1.0 else 'softening'} needs {100 * needed:.1f}%)"
              + ("" if accepted else ", so T stays 1.0"))
    if n_images < MIN_CALIBRATION_IMAGES or n_errors < MIN_CALIBRATION_ERRORS:
        logger.warning("temperature scaling: only %d calibration images with %d errors (want >= %d and >= %d); "
                       "treat the calibrated probabilities with caution", n_images, n_errors,
                       MIN_CALIBRATION_IMAGES, MIN_CALIBRATION_ERRORS)
    return CalibrationResult(fitted if accepted else 1.0, fitted, accepted, n_images, n_errors, cv_fitted,
                             cv_identity, reason)
