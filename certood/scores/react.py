"""ReAct (Sun et al., NeurIPS 2021): clipped penultimate activations, then energy; higher = OOD.

The clipping threshold ``c`` is the ``percentile``-th percentile (in percent, default 90) of
all fit activations taken together, linearly interpolated as ``numpy.percentile``. The score is
the energy of the classifier on the clipped features:

    -logsumexp(W min(x, c) + b)

Equal to pytorch-ood 0.4.0's ``ReAct`` with ``percentile = ours / 100`` and the classifier as
head (tested).

>>> x, w, b = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]]), torch.ones(2, 1), torch.zeros(2)
>>> react = ReAct(percentile=50.0).fit(x, classifier=(w, b))
>>> react.threshold.item()
2.0
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.scores.base import Score, check_number, check_state_shapes, drop_unmatched
from certood.scores.energy import energy_score


def percentile(values: Tensor, q: float) -> Tensor:
    """The ``q``-th percentile (0-100) of all entries, linear interpolation between order
    statistics (``numpy.percentile``'s default); float64 0-d. Works on any size (unlike
    ``torch.quantile``, which refuses inputs over 16M entries)."""
    flat = values.reshape(-1).to(torch.float64)
    position = q / 100 * (flat.numel() - 1)
    lo = int(position)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values if hi != lo else v_lo
    t = position - lo
    # numpy's lerp: exact at both ends, monotone in t
    return v_hi - (v_hi - v_lo) * (1 - t) if t >= 0.5 else v_lo + (v_hi - v_lo) * t


def react_score(features: Tensor, weight: Tensor, bias: Tensor, threshold: Tensor) -> Tensor:
    """``-logsumexp(W min(x, c) + b)``: energy of the clipped features' logits, ``[N]``."""
    clipped = features.clamp(max=threshold.to(features.dtype))
    return energy_score(clipped @ weight.to(features.dtype).T + bias.to(features.dtype))


class ReAct(Score):
    """Energy of the classifier on activations clipped at a fit percentile.

    ``fit(features, labels=None, classifier=(W, b))``; rows labelled -1 are left out.
    """

    kind = "react"
    needs_classifier = True
    _STATE = ("weight", "bias", "threshold")

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = check_number("react.percentile", percentile, ge=0, le=100)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        features, _ = drop_unmatched(features, labels, "react.fit")
        self.threshold = percentile(features, self.percentile).reshape(1)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        return react_score(features, self.weight.to(dev), self.bias.to(dev),
                           self.threshold.to(dev))

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("react", state, {"weight": ("C", "D"), "bias": ("C",),
                                                    "threshold": (1,)})
        self.weight, self.bias, self.threshold = state["weight"], state["bias"], state["threshold"]
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"percentile": self.percentile}
