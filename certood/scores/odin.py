"""ODIN (Liang et al., ICLR 2018) at the RoI-feature tap, higher = more OOD.

The input perturbation acts on the box head's input features ``x`` (``box_head.input``,
``[N, 3136]`` for a 64x7x7 RoI) rather than on image pixels: with ``S(x) = softmax(head(x) / T)``,

    x' = x - eps * sign(-grad_x log max_c S(x)_c),   score = -max_c S(x')_c

``head`` maps those features to foreground logits (the rest of the box head plus the
foreground rows of the predictor). Rows are perturbed independently (the loss is summed over
rows, so a box's score does not depend on the other boxes in the batch). This is pytorch-ood
0.4.0's ``ODIN`` on the same head and features: its cross-entropy to the predicted class,
averaged over the batch, has the same gradient signs (tested equal).

The head is a callable, which cannot be saved: ``ODIN`` keeps a reference to the head given
to ``fit`` and has no state tensors, so a loaded ODIN must be given the head again with
``fit(features, head=head)`` (any ID features; only their width is read).

>>> head = torch.nn.Linear(4, 3)
>>> ODIN(temperature=1000.0, eps=0.0014).fit(torch.zeros(1, 4), head=head).score(
...     torch.randn(2, 4)).shape
torch.Size([2])
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from certood.errors import CertoodError
from certood.scores.base import Score, check_number


def head_logits(head: Callable[[Tensor], Tensor], features: Tensor) -> Tensor:
    """``head(features)``, checked to be ``[N, C]`` logits with ``C >= 1``."""
    logits = head(features)
    if not isinstance(logits, Tensor) or logits.ndim != 2 \
            or logits.shape[0] != features.shape[0] or logits.shape[1] == 0:
        found = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise CertoodError(f"odin: expected head to return logits [{features.shape[0]}, C], "
                           f"found {found}")
    return logits


def odin_perturb(features: Tensor, head: Callable[[Tensor], Tensor], temperature: float,
                 eps: float) -> Tensor:
    """``x - eps * sign(-grad_x log max softmax(head(x) / T))``, row by row."""
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().clone().requires_grad_(True)
        log_msp = torch.log_softmax(head_logits(head, x) / temperature, dim=1).max(dim=1).values
        (grad,) = torch.autograd.grad(log_msp.sum(), x)
    return features.detach() + eps * grad.sign()


def odin_score(features: Tensor, head: Callable[[Tensor], Tensor], temperature: float = 1000.0,
               eps: float = 0.0014) -> Tensor:
    """``-max_c softmax(head(x') / T)_c`` at the perturbed features ``x'``; ``[N]``."""
    x_hat = odin_perturb(features, head, temperature, eps)
    with torch.no_grad():
        logits = head_logits(head, x_hat)
    return -torch.softmax(logits / temperature, dim=1).max(dim=1).values


class ODIN(Score):
    """ODIN through a head callable; ``fit(features, head=head)`` only records the head.

    ``needs_fit`` is False (nothing is learned from data); the head must still come through
    ``fit``, and again after loading a saved score.
    """

    kind = "odin"
    needs_fit = False
    needs_head = True

    def __init__(self, temperature: float = 1000.0, eps: float = 0.0014) -> None:
        super().__init__()
        self.temperature = check_number("odin.temperature", temperature, gt=0)
        self.eps = check_number("odin.eps", eps, ge=0)

    @property
    def is_fitted(self) -> bool:
        return self.head is not None and self.feature_dim is not None

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        return odin_score(features, self.head, self.temperature, self.eps).to(features.dtype)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "eps": self.eps}
