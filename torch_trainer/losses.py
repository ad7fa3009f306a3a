"""Training losses for imbalanced skin-disease data: weighted cross-entropy and focal loss, both with smoothing, and
the logit adjustment that wraps either."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def inverse_frequency_weights(counts: Sequence[int]) -> torch.Tensor:
    """``n / (K * count_k)`` (scikit-learn's "balanced"): 1 for every class of a balanced set."""
    counts_t = torch.as_tensor(counts, dtype=torch.float32).clamp(min=1)
    return counts_t.sum() / (len(counts_t) * counts_t)


class FocalLoss(nn.Module):
    """Lin et al. (2017) focal loss with per-class ``alpha``, generalised to smoothed (soft) targets.

    ``loss = -sum_k q_k * alpha_k * (1 - p_k) ** gamma * log p_k`` where ``q`` is the (smoothed) one-hot target;
    with ``gamma = 0`` and no alpha it is exactly cross-entropy with the same label smoothing.
    """

    def __init__(self, alpha: Optional[torch.Tensor] = None, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("alpha", alpha if alpha is not None else None, persistent=False)
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        n_class = logits.size(1)
        q = F.one_hot(targets, n_class).float()
        if self.label_smoothing:
            q = q * (1 - self.label_smoothing) + self.label_smoothing / n_class
        per_class = -q * (1 - log_p.exp()).pow(self.gamma) * log_p
        if self.alpha is not None:
            per_class = per_class * self.alpha.to(per_class.device)
        return per_class.sum(1).mean()


class LogitAdjustedLoss(nn.Module):
    """Menon et al. (2021), "Long-tail learning via logit adjustment": the wrapped loss sees ``logits + tau * log
    prior``. A frequent class gets its head start added during training only, so the model's own logits (what
    evaluation, calibration and export use) learn to do without it: their argmax approximates the balanced-error
    optimum instead of favouring frequent classes. Works with hard and soft (mixup) targets alike."""

    def __init__(self, base: nn.Module, class_counts: Sequence[int], tau: float):
        super().__init__()
        self.base = base
        counts = torch.as_tensor(class_counts, dtype=torch.float32).clamp(min=1)
        self.register_buffer("offsets", tau * torch.log(counts / counts.sum()), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base(logits + self.offsets.to(logits.device, logits.dtype), targets)


def build_criterion(loss: str, class_weights: str, class_counts: Sequence[int], label_smoothing: float,
                    focal_gamma: float, logit_adjustment: float = 0.0) -> nn.Module:
    weights = inverse_frequency_weights(class_counts) if class_weights == "auto" else None
    if loss == "focal":
        criterion: nn.Module = FocalLoss(weights, focal_gamma, label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    return adjust_logits(criterion, class_counts, logit_adjustment)


def adjust_logits(criterion: nn.Module, class_counts: Sequence[int], tau: float) -> nn.Module:
    """``criterion`` itself for ``tau`` 0, else wrapped in the logit adjustment."""
    return LogitAdjustedLoss(criterion, class_counts, tau) if tau else criterion
