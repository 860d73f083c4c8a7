"""Relative Mahalanobis distance (Ren et al., 2021), higher = more OOD.

Class-conditional Gaussians with a shared covariance (as :mod:`certood.scores.mahalanobis`)
and one background Gaussian fitted to all ID boxes, each the maximum-likelihood estimate in
float64 with a pseudo-inverse precision. With ``d_k`` the squared Mahalanobis distance to
class ``k`` and ``d_0`` the one under the background Gaussian, the score is

    min_k (d_k(x) - d_0(x))

pytorch-ood 0.4.0's ``RMD`` differs only in scale: it does not divide either scatter by N
(and adds a 1e-6 ridge), so its score is ours / N up to that ridge; rankings agree (tested).

>>> x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
>>> rmd = RelativeMahalanobis().fit(x, torch.tensor([0, 0, 1, 1]))
>>> rmd.score(torch.tensor([[0.0, 0.0]])).shape
torch.Size([1])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_int, check_state_shapes, drop_unmatched
from certood.scores.mahalanobis import fit_class_gaussians


def whitener(precision: Tensor) -> Tensor:
    """``L`` with ``L L^T = P`` for a symmetric PSD precision ``P`` (negative eigenvalues
    from round-off count as 0); squared distances become plain squared norms of ``x @ L``."""
    w, v = torch.linalg.eigh(precision)
    return v * w.clamp(min=0).sqrt()


def fit_background_gaussian(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and pseudo-inverse of the ML covariance ``[D, D]`` of all rows, float64."""
    x = features.to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, torch.linalg.pinv(centred.T @ centred / x.shape[0], hermitian=True)


def squared_distances(features: Tensor, means: Tensor, factor: Tensor) -> Tensor:
    """``||(x - mu_k) @ L||^2`` for every row and mean: ``[N, K]`` float64."""
    xl = features.to(torch.float64) @ factor
    ml = means.to(torch.float64) @ factor
    return torch.stack([((xl - m) ** 2).sum(dim=1) for m in ml], dim=1)


def relative_mahalanobis_score(features: Tensor, means: Tensor, factor: Tensor,
                               background_mean: Tensor, background_factor: Tensor) -> Tensor:
    """``min_k d_k(x) - d_0(x)`` over classes with finite means; float64 ``[N]``."""
    keep = torch.isfinite(means).all(dim=1)
    if not keep.any():
        raise CertoodError("relative_mahalanobis: expected at least one class with a finite "
                           "mean, found none")
    d_k = squared_distances(features, means[keep], factor)
    d_0 = squared_distances(features, background_mean[None], background_factor)
    return (d_k - d_0).min(dim=1).values


class RelativeMahalanobis(Score):
    """Class-conditional minus background Mahalanobis distance.

    ``fit(features, labels)`` ignores rows labelled -1; ``num_classes=None`` takes
    ``max(label) + 1``. The whitening factors are stored (no eigen-decomposition per call).
    """

    kind = "relative_mahalanobis"
    _STATE = ("means", "factor", "background_mean", "background_factor")

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None:
            check_int("relative_mahalanobis.num_classes", num_classes)
        self.num_classes = num_classes

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        if labels is None:
            raise CertoodError("relative_mahalanobis.fit: expected class labels (one per "
                               "feature row), found None")
        features, labels = drop_unmatched(features, labels, "relative_mahalanobis.fit")
        c = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        means, precision = fit_class_gaussians(features, labels, c)
        background_mean, background_precision = fit_background_gaussian(features)
        self.means, self.factor = means, whitener(precision)
        self.background_mean = background_mean
        self.background_factor = whitener(background_precision)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        state = [t.to(features.device) for t in (self.means, self.factor, self.background_mean,
                                                 self.background_factor)]
        return relative_mahalanobis_score(features, *state).to(features.dtype)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("relative_mahalanobis", state, {
            "means": ("C", "D"), "factor": ("D", "D"), "background_mean": ("D",),
            "background_factor": ("D", "D")})
        if self.num_classes is not None and sizes["C"] != self.num_classes:
            raise ArtifactError(f"relative_mahalanobis: expected means for {self.num_classes} "
                               f"classes, found {sizes['C']}")
        for k in self._STATE:
            setattr(self, k, state[k].to(torch.float64))
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}
