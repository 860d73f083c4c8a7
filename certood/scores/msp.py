"""Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): ``-max softmax(logits / T)``.

Higher = more OOD. Callers pass the **foreground-class logits only** (background column
removed), as for :mod:`certood.scores.energy`. Equal to pytorch-ood 0.4.0's ``MaxSoftmax``.

>>> round(msp_score(torch.tensor([[0.0, 0.0]])).item(), 4)  # two equal classes
-0.5
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import CertoodError
from certood.scores.base import Score, check_number


def msp_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``-max_c softmax(logits / T)_c`` over the last dimension ``[..., C]``."""
    return -torch.softmax(logits / temperature, dim=-1).max(dim=-1).values


def check_logit_columns(features: Tensor, who: str) -> Tensor:
    """Logit scores need at least one class column."""
    if features.shape[1] == 0:
        raise CertoodError(f"{who}: expected at least one logit column, found 0")
    return features


class MaxSoftmax(Score):
    """Negative maximum softmax probability of the foreground logits; needs no fitting.

    >>> MaxSoftmax().score(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    tensor([-0.9820, -0.5000])
    """

    kind = "msp"
    needs_fit = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_number("msp.temperature", temperature, gt=0)

    def _score(self, features: Tensor) -> Tensor:
        return msp_score(check_logit_columns(features, "msp.score"), self.temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}
