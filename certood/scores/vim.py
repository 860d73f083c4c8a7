"""Virtual-logit matching, ViM (Wang et al., CVPR 2022), higher = more OOD.

Penultimate features are centred at ``u = -pinv(W) b`` (the point the classifier maps to zero
logits). The principal subspace is spanned by the ``dim`` leading eigenvectors of the
uncentred second moment ``X^T X / N`` of the centred fit features; the residual ``x^{P_perp}``
is what is left outside it. With ``alpha = mean(max logit) / mean(||x^{P_perp}||)`` over the
fit rows, the score is

    alpha * ||x^{P_perp}|| - logsumexp(W x + b)

``dim=None`` takes ``D // 2`` (the paper's choice for small feature widths; 128 for the
256-wide box head). Fitted in float64; equal to pytorch-ood 0.4.0's ``ViM`` (float32) to
float tolerance (tested).

>>> g = torch.Generator().manual_seed(0)
>>> x, w, b = torch.randn(50, 6, generator=g), torch.randn(3, 6, generator=g), torch.zeros(3)
>>> ViM(dim=2).fit(x, classifier=(w, b)).score(x[:4]).shape
torch.Size([4])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_int, check_state_shapes, drop_unmatched


def fit_vim(features: Tensor, weight: Tensor, bias: Tensor,
            dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Origin ``u [D]``, residual basis ``[D, D - dim]`` and ``alpha`` (0-d), float64."""
    x, w, b = (t.to(torch.float64) for t in (features, weight, bias))
    origin = -(torch.linalg.pinv(w) @ b)
    centred = x - origin
    _, vecs = torch.linalg.eigh(centred.T @ centred / x.shape[0])  # ascending eigenvalues
    residual_basis = vecs[:, : x.shape[1] - dim].contiguous()
    residual_norm = (centred @ residual_basis).norm(dim=1)
    alpha = (x @ w.T + b).max(dim=1).values.mean() / residual_norm.mean()
    return origin, residual_basis, alpha


def vim_score(features: Tensor, weight: Tensor, bias: Tensor, origin: Tensor,
              residual_basis: Tensor, alpha: Tensor) -> Tensor:
    """``alpha ||(x - u) R|| - logsumexp(W x + b)``; float64 ``[N]``."""
    x = features.to(torch.float64)
    virtual_logit = alpha * ((x - origin) @ residual_basis).norm(dim=1)
    return virtual_logit - torch.logsumexp(x @ weight.T + bias, dim=1)


class ViM(Score):
    """ViM on penultimate features; ``fit(features, classifier=(W, b))``, labels optional."""

    kind = "vim"
    needs_classifier = True
    _STATE = ("weight", "bias", "origin", "residual_basis", "alpha")

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None:
            check_int("vim.dim", dim)
        self.dim = dim

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        features, _ = drop_unmatched(features, labels, "vim.fit")
        d = features.shape[1]
        dim = self.dim if self.dim is not None else d // 2
        if not 1 <= dim < d:
            raise CertoodError(f"vim.dim: expected a principal dimension in [1, {d - 1}] for "
                               f"{d}-dim features, found {dim}")
        self.origin, self.residual_basis, alpha = fit_vim(features, self.weight, self.bias, dim)
        self.alpha = alpha.reshape(1)
        self.feature_dim = d

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        w, b, u, r, a = (getattr(self, k).to(dev, torch.float64) for k in self._STATE)
        return vim_score(features, w, b, u, r, a).to(features.dtype)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("vim", state, {
            "weight": ("C", "D"), "bias": ("C",), "origin": ("D",),
            "residual_basis": ("D", "R"), "alpha": (1,)})
        if self.dim is not None and sizes["R"] != sizes["D"] - self.dim:
            raise ArtifactError(f"vim: expected a residual basis of {sizes['D'] - self.dim} "
                                f"columns (dim={self.dim}), found {sizes['R']}")
        for k in self._STATE:
            setattr(self, k, state[k])
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim}
