"""Energy score (Liu et al., NeurIPS 2020): ``-T * logsumexp(logits / T)``, higher = more OOD.

Detectors have a background column in their class logits; callers pass the
**foreground-class logits only** (background column removed), so a box the detector calls
background does not look confidently ID.

>>> round(energy_score(torch.tensor([[0.0, 0.0]])).item(), 4)  # -log 2
-0.6931
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from certood.errors import CertoodError
from certood.scores.base import Score


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``-T * logsumexp(logits / T, dim=-1)`` over foreground-class logits ``[..., C]``."""
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


class Energy(Score):
    """Energy of the foreground logits; needs no fitting.

    >>> Energy(temperature=2.0).score(torch.tensor([[1.0, 3.0]])).shape
    torch.Size([1])
    """

    kind = "energy"
    needs_fit = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise CertoodError(f"energy.temperature: expected a positive number, "
                               f"found {temperature!r}")
        self.temperature = float(temperature)

    def _score(self, features: Tensor) -> Tensor:
        if features.shape[1] == 0:
            raise CertoodError("energy.score: expected at least one logit column, found 0")
        return energy_score(features, self.temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}
