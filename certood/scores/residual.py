"""Principal-subspace residual: the part of a box feature no ID direction explains.

A reconstruction-style OOD score, the residual term of ViM (Wang et al., "ViM: Out-Of-
Distribution with Virtual-logit Matching", CVPR 2022) without its logit part, and the
reconstruction error of PCA. With ``mu`` the mean of the ID fit features and ``V [dim, D]``
the ``dim`` leading right singular vectors of the centred fit features (their principal
directions), the score is, higher = more OOD,

    ||(x - mu) - V^T V (x - mu)||_2

It needs no classifier, so it reads any tap; it is meant for the 3136-wide RoI feature
(``box_head.input``), where ID boxes fill a few directions and unknown objects leave energy
outside them. Fitted in float64: with more fit boxes than columns (``N > D``) through the
eigenvectors of the ``D x D`` scatter matrix, accumulated in chunks of rows so the fit never
holds a float64 copy of all features; otherwise through a thin SVD. Equal to scikit-learn's
``PCA(n_components=dim)`` reconstruction error to 1e-8 (tested). Not the same as
``pvalue_fusion``'s ``residual`` component, which is ViM's own (centred at ViM's origin
``-pinv(W) b``, ``D // 2`` directions, on penultimate features).

>>> x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
>>> Residual(dim=2).fit(x).score(torch.tensor([[0.5, 0.5, 3.0], [7.0, -2.0, 0.0]]))
tensor([3., 0.])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_int, check_state_shapes, drop_unmatched

CHUNK_ROWS = 4096


def fit_residual(features: Tensor, dim: int, chunk_rows: int = CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and the ``dim`` leading principal directions ``[dim, D]`` (rows), float64."""
    n, d = features.shape
    if not 1 <= dim < min(n, d):
        raise CertoodError(f"residual.dim: expected dim < min(N, D) = {min(n, d)} ({n} fit boxes, "
                           f"{d} feature columns), found {dim}")
    chunks = features.split(chunk_rows)
    mean = sum(c.to(torch.float64).sum(dim=0) for c in chunks) / n
    if n > d:
        scatter = torch.zeros(d, d, dtype=torch.float64, device=features.device)
        for c in chunks:
            centred = c.to(torch.float64) - mean
            scatter += centred.T @ centred
        _, vecs = torch.linalg.eigh(scatter)  # ascending eigenvalues
        basis = vecs[:, -dim:].flip(1).T
    else:
        _, _, vh = torch.linalg.svd(features.to(torch.float64) - mean, full_matrices=False)
        basis = vh[:dim]
    return mean.contiguous(), basis.contiguous()


def residual_score(features: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """``||(x - mu) - V^T V (x - mu)||`` per row, with ``V = basis [dim, D]``; float64 ``[N]``."""
    mean, basis = mean.to(torch.float64), basis.to(torch.float64)
    centred = features.to(torch.float64) - mean
    return (centred - (centred @ basis.T) @ basis).norm(dim=1)


class Residual(Score):
    """Norm outside the ``dim``-dimensional principal subspace of the fit features.

    Labels are accepted and ignored: every fit row counts.
    """

    kind = "residual"
    _STATE = ("mean", "basis")

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.dim = check_int("residual.dim", dim)
        self.mean: Tensor | None = None
        self.basis: Tensor | None = None

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        features, _ = drop_unmatched(features, labels, "residual.fit")  # -1: a box matched to nothing
        self.mean, self.basis = fit_residual(features, self.dim)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        return residual_score(features, self.mean.to(dev), self.basis.to(dev)).to(features.dtype)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("residual", state, {"mean": ("D",), "basis": ("K", "D")})
        if sizes["K"] != self.dim:
            raise ArtifactError(f"residual: expected a basis of {self.dim} rows (dim={self.dim}), "
                                f"found {sizes['K']}")
        if not (state["mean"].is_floating_point() and state["basis"].is_floating_point()):
            raise ArtifactError(f"residual: expected floating-point state tensors, found mean "
                                f"{state['mean'].dtype} and basis {state['basis'].dtype}")
        self.mean = state["mean"].to(torch.float64)
        self.basis = state["basis"].to(torch.float64)
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim}
