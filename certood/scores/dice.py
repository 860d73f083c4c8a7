"""DICE weight sparsification (Sun & Li, ECCV 2022), then energy; higher = more OOD.

At fit, each weight's contribution is ``mean_activation_j * W_cj`` (mean over the fit boxes);
weights whose contribution is not above the ``percentile``-th percentile (in percent, default
90, linear interpolation) of all ``C x D`` contributions are set to zero. The score is the
energy of the masked classifier, ``-logsumexp(W_masked x + b)``. Equal to pytorch-ood 0.4.0's
``DICE`` with ``p = ours / 100`` (tested).

>>> x, w, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0], [-1.0, 3.0]]), torch.zeros(2)
>>> DICE(percentile=50.0).fit(x, classifier=(w, b)).masked_weight  # contributions 1 2 -1 6
tensor([[0., 1.],
        [0., 3.]])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.scores.base import Score, check_number, check_state_shapes, drop_unmatched
from certood.scores.energy import energy_score
from certood.scores.react import percentile as percentile_of


def dice_mask(features: Tensor, weight: Tensor, percentile: float) -> Tensor:
    """``W`` with the weights of contribution at or below the percentile set to zero."""
    contribution = features.to(torch.float64).mean(dim=0)[None, :] * weight.to(torch.float64)
    threshold = percentile_of(contribution, percentile)
    return torch.where(contribution > threshold, weight, torch.zeros_like(weight))


def dice_score(features: Tensor, masked_weight: Tensor, bias: Tensor) -> Tensor:
    """Energy of the masked classifier, ``-logsumexp(W_masked x + b)``; ``[N]``."""
    return energy_score(features @ masked_weight.to(features.dtype).T + bias.to(features.dtype))


class DICE(Score):
    """Energy through a classifier sparsified by fit contributions.

    ``fit(features, labels=None, classifier=(W, b))``; rows labelled -1 are left out.
    """

    kind = "dice"
    needs_classifier = True
    _STATE = ("weight", "bias", "masked_weight")

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = check_number("dice.percentile", percentile, ge=0, lt=100)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        features, _ = drop_unmatched(features, labels, "dice.fit")
        self.masked_weight = dice_mask(features, self.weight, self.percentile)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        return dice_score(features, self.masked_weight.to(dev), self.bias.to(dev))

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("dice", state, {"weight": ("C", "D"), "bias": ("C",),
                                                   "masked_weight": ("C", "D")})
        self.weight, self.bias = state["weight"], state["bias"]
        self.masked_weight = state["masked_weight"]
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"percentile": self.percentile}
