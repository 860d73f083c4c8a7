"""Monte-Carlo dropout (Gal & Ghahramani, ICML 2016) on the penultimate features.

``samples`` passes of the classifier on ``dropout(h, p)``: pass ``t`` keeps the features
where its mask is 1 and scales them by ``1 / (1 - p)``, giving softmaxes ``p_t``. The masks are
drawn once from ``seed`` at fit and **shared by every box**, so a box's score is a fixed
function of its features (independent of the batch it comes in, reproducible after loading:
the masks are saved). With ``P`` the mean softmax, ``output`` selects, higher = more OOD:

- ``entropy``: predictive entropy ``H(P)``;
- ``mutual_information``: ``H(P) - mean_t H(p_t)`` (epistemic part, BALD);
- ``variance``: class-averaged variance of ``p_t`` across passes (Bessel-corrected), as
  pytorch-ood 0.4.0's ``MCD(mode="var")``;
- ``max_softmax``: ``-max_c P_c``, as ``MCD(mode="mean")``.

Equal to pytorch-ood's ``MCD`` when its model replays the same masks (tested).

>>> g = torch.Generator().manual_seed(0)
>>> h, w, b = torch.rand(4, 8, generator=g), torch.randn(3, 8, generator=g), torch.zeros(3)
>>> MCDropout(samples=10, output="mutual_information").fit(h, classifier=(w, b)).score(h).shape
torch.Size([4])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError
from certood.scores.base import (Score, check_choice, check_int, check_number,
                                 check_state_shapes)

OUTPUTS = ("entropy", "mutual_information", "variance", "max_softmax")


def dropout_masks(samples: int, dim: int, p: float, seed: int) -> Tensor:
    """``[samples, dim]`` bool keep-masks, each entry kept with probability ``1 - p``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(samples, dim, generator=g) >= p


def mc_softmax(features: Tensor, weight: Tensor, bias: Tensor, masks: Tensor,
               p: float) -> Tensor:
    """Softmax of the classifier on each masked copy: ``[T, N, C]``."""
    kept = features[None] * (masks[:, None, :].to(features.dtype) / (1 - p))
    return torch.softmax(kept @ weight.to(features.dtype).T + bias.to(features.dtype), dim=-1)


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(dim=-1)


def mc_dropout_score(probs: Tensor, output: str) -> Tensor:
    """Reduce ``[T, N, C]`` pass softmaxes to ``[N]`` for one of ``OUTPUTS``."""
    mean = probs.mean(dim=0)
    if output == "entropy":
        return _entropy(mean)
    if output == "mutual_information":
        return (_entropy(mean) - _entropy(probs).mean(dim=0)).clamp(min=0)
    if output == "variance":
        return probs.var(dim=0).mean(dim=1)
    return -mean.max(dim=1).values


class MCDropout(Score):
    """Dropout ensembles of the last layer; ``fit(features, classifier=(W, b))``.

    Nothing is learned from data (``needs_fit`` is False); ``fit`` records the classifier and
    draws the masks.
    """

    kind = "mc_dropout"
    needs_fit = False
    needs_classifier = True
    _STATE = ("weight", "bias", "masks")

    def __init__(self, samples: int = 20, p: float = 0.5, seed: int = 0,
                 output: str = "entropy") -> None:
        super().__init__()
        self.samples = check_int("mc_dropout.samples", samples, minimum=2)
        self.p = check_number("mc_dropout.p", p, ge=0, lt=1)
        self.seed = check_int("mc_dropout.seed", seed, minimum=0)
        self.output = check_choice("mc_dropout.output", output, OUTPUTS)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        self.masks = dropout_masks(self.samples, features.shape[1], self.p, self.seed)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        probs = mc_softmax(features, self.weight.to(dev), self.bias.to(dev),
                           self.masks.to(dev), self.p)
        return mc_dropout_score(probs, self.output)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("mc_dropout", state, {
            "weight": ("C", "D"), "bias": ("C",), "masks": (self.samples, "D")})
        if state["masks"].dtype != torch.bool:
            raise ArtifactError(f"mc_dropout: expected bool masks, found {state['masks'].dtype}")
        self.weight, self.bias, self.masks = state["weight"], state["bias"], state["masks"]
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"samples": self.samples, "p": self.p, "seed": self.seed, "output": self.output}
