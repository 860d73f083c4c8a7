"""Maximum logit (Hendrycks et al., ICML 2022): ``-max_c logits_c``, higher = more OOD.

Foreground-class logits only. Equal to pytorch-ood 0.4.0's ``MaxLogit``.

>>> max_logit_score(torch.tensor([[1.0, 3.0]])).item()
-3.0
"""
from __future__ import annotations

import torch  # noqa: F401 - the docstring examples use it
from torch import Tensor

from certood.scores.base import Score
from certood.scores.msp import check_logit_columns


def max_logit_score(logits: Tensor) -> Tensor:
    """``-max_c logits_c`` over the last dimension ``[..., C]``."""
    return -logits.max(dim=-1).values


class MaxLogit(Score):
    """Negative maximum foreground logit; needs no fitting and has no parameters.

    >>> MaxLogit().score(torch.tensor([[1.0, 3.0], [0.5, -1.0]]))
    tensor([-3.0000, -0.5000])
    """

    kind = "max_logit"
    needs_fit = False

    def _score(self, features: Tensor) -> Tensor:
        return max_logit_score(check_logit_columns(features, "max_logit.score"))
