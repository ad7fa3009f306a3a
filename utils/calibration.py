"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits, ``softmax(logits / T)``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

T_MIN, T_MAX = 0.05, 20.0


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
