"""GradNorm (Huang et al., NeurIPS 2021) in closed form, higher = more OOD.

The loss is ``KL(u || softmax(z / T))`` between the uniform distribution ``u`` over the C
foreground classes and the softmax of the logits ``z = W h + b``. Its gradient is
``dL/dz_c = (p_c - 1/C) / T``, so the gradients of the last layer are ``dL/dW = g h^T`` and
``dL/db = g`` with ``g = (p - 1/C) / T``, and their L1 norm factorises:

    ||dL/dW||_1 + ||dL/db||_1 = (sum_c |p_c - 1/C|) / T * (sum_j |h_j| + 1)

No backward pass is needed (checked against autograd). ID boxes have peaked softmaxes and
larger norms, so the score is the **negated** norm. The ``+ 1`` is the bias; the paper uses
the weight gradient only. Equal to pytorch-ood 0.4.0's ``GradNorm`` on an ``nn.Linear`` made of
the classifier, all its parameters selected (tested).

>>> h, w, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2)
>>> round(gradnorm_score(h, w, b).item(), 4)  # -(2 |sigmoid(1) - 1/2|) * (3 + 1)
-1.8485
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.scores.base import Score, check_number, check_state_shapes


def gradnorm_score(features: Tensor, weight: Tensor, bias: Tensor,
                   temperature: float = 1.0) -> Tensor:
    """``-(sum_c |p_c - 1/C|) / T * (sum_j |h_j| + 1)`` with ``p = softmax((W h + b) / T)``."""
    logits = features @ weight.to(features.dtype).T + bias.to(features.dtype)
    p = torch.softmax(logits / temperature, dim=1)
    logit_grad_l1 = (p - 1 / p.shape[1]).abs().sum(dim=1) / temperature
    return -logit_grad_l1 * (features.abs().sum(dim=1) + 1)


class GradNorm(Score):
    """Negated L1 norm of the last layer's gradient of ``KL(uniform || softmax)``.

    ``fit(features, classifier=(W, b))`` only records the classifier.
    """

    kind = "gradnorm"
    needs_fit = False
    needs_classifier = True
    _STATE = ("weight", "bias")

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_number("gradnorm.temperature", temperature, gt=0)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        return gradnorm_score(features, self.weight.to(dev), self.bias.to(dev), self.temperature)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("gradnorm", state, {"weight": ("C", "D"), "bias": ("C",)})
        self.weight, self.bias = state["weight"], state["bias"]
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}
