"""ASH-S activation shaping (Djurisic et al., ICLR 2023), then energy; higher = more OOD.

Per box, the ``percentile`` percent smallest penultimate activations are set to zero (``k =
D - round(D * percentile / 100)`` largest are kept) and the kept ones are scaled by
``exp(s1 / s2)``, ``s1`` and ``s2`` the activation sums before and after pruning. The score is
the energy of the classifier on the shaped features. Meant for non-negative (post-ReLU)
features; a box whose kept activations sum to 0 (an all-zero box) keeps scale ``exp(0)``
where pytorch-ood 0.4.0 gives NaN. Otherwise equal to its ``ASH(variant="ash-s")`` with
``percentile = ours / 100`` on ``[N, D, 1, 1]`` maps (tested). Nothing is learned from data.

>>> x = torch.tensor([[1.0, 3.0]])
>>> ash_s(x, 50.0)  # keep 1 of 2: 3 * exp(4 / 3)
tensor([[ 0.0000, 11.3810]])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import CertoodError
from certood.scores.base import Score, check_number, check_state_shapes
from certood.scores.energy import energy_score


def kept_count(dim: int, percentile: float) -> int:
    """How many activations ASH keeps of ``dim`` (as pytorch-ood: ``round`` half to even)."""
    return dim - int(round(dim * (percentile / 100)))


def ash_s(features: Tensor, percentile: float) -> Tensor:
    """Keep the top ``kept_count`` activations per row, scaled by ``exp(s1 / s2)``."""
    k = kept_count(features.shape[1], percentile)
    if k < 1:
        raise CertoodError(f"ash: expected percentile to keep at least one of "
                           f"{features.shape[1]} activations, found {percentile} (keeps 0)")
    s1 = features.sum(dim=1)
    values, index = features.topk(k, dim=1)
    s2 = values.sum(dim=1)
    scale = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1), 0)
    return torch.zeros_like(features).scatter_(1, index, values * scale.exp()[:, None])


def ash_score(features: Tensor, weight: Tensor, bias: Tensor, percentile: float) -> Tensor:
    """Energy ``-logsumexp(W ash_s(x) + b)`` of the shaped features, ``[N]``."""
    shaped = ash_s(features, percentile)
    return energy_score(shaped @ weight.to(features.dtype).T + bias.to(features.dtype))


class ASH(Score):
    """ASH-S then energy. ``fit(features, classifier=(W, b))`` only records the classifier."""

    kind = "ash"
    needs_fit = False
    needs_classifier = True
    _STATE = ("weight", "bias")

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = check_number("ash.percentile", percentile, ge=0, lt=100)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        if kept_count(features.shape[1], self.percentile) < 1:
            raise CertoodError(f"ash.percentile: expected to keep at least one of "
                               f"{features.shape[1]} activations, found {self.percentile}")
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        return ash_score(features, self.weight.to(dev), self.bias.to(dev), self.percentile)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("ash", state, {"weight": ("C", "D"), "bias": ("C",)})
        self.weight, self.bias = state["weight"], state["bias"]
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"percentile": self.percentile}
