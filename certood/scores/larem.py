"""LaREM: per-class Mahalanobis distance on latent box features, higher = more OOD.

After Arnez et al.'s latent-representation scores for object detectors (LaREM/LaRED). One
Gaussian per class, each with its **own** covariance, shrunk towards ``mu I`` (``mu`` = mean
variance) as ``(1 - s) S + s mu I``: ``shrinkage="ledoit_wolf"`` picks ``s`` per class by
the Ledoit-Wolf formula (equal to scikit-learn's ``LedoitWolf``, tested), a number fixes it
(scikit-learn's ``ShrunkCovariance``). ``S`` is the maximum-likelihood covariance, in float64.
Eigenvalues below ``1e-10 * max`` are raised to that floor so every class has a precision and
a log-determinant (a singular ``S`` with ``shrinkage=0`` then measures directions outside the
data strictly). Classes with fewer than two boxes are left out (warned).

The score is ``min_c (x - mu_c)^T Sigma_c^{-1} (x - mu_c)``. :mod:`certood.scores.lared` uses
the same fit for a density. Whitening factors ``L_c`` (``L_c L_c^T = Sigma_c^{-1}``) are stored,
so scoring is one ``[N, D] x [D, D]`` product per class.

>>> g = torch.Generator().manual_seed(0)
>>> x, y = torch.randn(60, 3, generator=g), torch.arange(60) % 2
>>> LaREM().fit(x, y).score(torch.zeros(2, 3)).shape
torch.Size([2])
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import (Score, check_int, check_number, check_state_shapes,
                                 drop_unmatched)

EIGEN_FLOOR = 1e-10  # relative to the largest eigenvalue of each class covariance


def ledoit_wolf_shrinkage(centred: Tensor) -> Tensor:
    """Ledoit-Wolf shrinkage ``s`` in ``[0, 1]`` for centred rows ``[n, D]`` (scikit-learn's
    ``ledoit_wolf_shrinkage`` formula), float64 0-d."""
    x = centred.to(torch.float64)
    n, d = x.shape
    x2 = x ** 2
    variances = x2.sum(dim=0) / n
    mu = variances.sum() / d
    beta_ = (x2.T @ x2).sum()
    delta_ = ((x.T @ x) ** 2).sum() / n ** 2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * variances.sum() + d * mu ** 2) / d
    beta = torch.minimum(beta, delta)
    return torch.where(beta == 0, torch.zeros_like(beta), beta / delta)


def shrunk_covariance(features: Tensor, shrinkage: float | str = "ledoit_wolf") -> Tensor:
    """``(1 - s) S + s (trace S / D) I`` of the rows' ML covariance ``S``; float64 ``[D, D]``."""
    x = features.to(torch.float64)
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / x.shape[0]
    s = ledoit_wolf_shrinkage(centred) if shrinkage == "ledoit_wolf" \
        else torch.tensor(float(shrinkage), dtype=torch.float64)
    mu = cov.diagonal().mean()
    return (1 - s) * cov + s * mu * torch.eye(cov.shape[0], dtype=torch.float64)


def fit_per_class_gaussians(features: Tensor, labels: Tensor, num_classes: int,
                            shrinkage: float | str = "ledoit_wolf",
                            who: str = "larem") -> tuple[Tensor, Tensor, Tensor]:
    """Means ``[C, D]``, whitening factors ``[C, D, D]`` and log-determinants ``[C]``, float64.

    Classes with fewer than two rows get NaN means (left out of the scores) and a warning.
    """
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise CertoodError(f"{who}.fit: expected labels in [0, {num_classes}), "
                           f"found {sorted(set(labels[bad].tolist()))[:5]}")
    d = features.shape[1]
    means = torch.full((num_classes, d), float("nan"), dtype=torch.float64)
    factors = torch.zeros(num_classes, d, d, dtype=torch.float64)
    log_dets = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    left_out = []
    for c in range(num_classes):
        rows = features[labels == c].to(torch.float64)
        if rows.shape[0] < 2:
            left_out.append(c)
            continue
        w, v = torch.linalg.eigh(shrunk_covariance(rows, shrinkage))
        w = w.clamp(min=EIGEN_FLOOR * max(w.max().item(), 1e-300))
        means[c], factors[c], log_dets[c] = rows.mean(dim=0), v / w.sqrt(), w.log().sum()
    if left_out:
        warnings.warn(f"{who}: classes {left_out} have fewer than 2 samples; they are left out",
                      stacklevel=3)
    return means, factors, log_dets


def class_distances(features: Tensor, means: Tensor, factors: Tensor) -> Tensor:
    """``(x - mu_c)^T Sigma_c^{-1} (x - mu_c)`` per row and class, float64 ``[N, C]``; NaN for
    classes left out."""
    x = features.to(torch.float64)
    return torch.stack([(((x - m) @ f) ** 2).sum(dim=1) for m, f in zip(means, factors)], dim=1)


def larem_score(features: Tensor, means: Tensor, factors: Tensor) -> Tensor:
    """Squared Mahalanobis distance to the nearest class (own covariances); float64 ``[N]``."""
    keep = torch.isfinite(means).all(dim=1)
    return class_distances(features, means[keep], factors[keep]).min(dim=1).values


def check_shrinkage(who: str, shrinkage: Any) -> float | str:
    if shrinkage == "ledoit_wolf":
        return shrinkage
    if isinstance(shrinkage, str):
        raise CertoodError(f"{who}: expected 'ledoit_wolf' or a number in [0, 1], "
                           f"found {shrinkage!r}")
    return check_number(who, shrinkage, ge=0, le=1)


class LaREM(Score):
    """Per-class, shrunk-covariance Mahalanobis distance to the nearest class.

    ``fit(features, labels)`` ignores rows labelled -1; ``num_classes=None`` takes
    ``max(label) + 1``.
    """

    kind = "larem"
    _STATE = ("means", "factors", "log_dets")

    def __init__(self, shrinkage: float | str = "ledoit_wolf",
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.shrinkage = check_shrinkage(f"{self.kind}.shrinkage", shrinkage)
        if num_classes is not None:
            check_int(f"{self.kind}.num_classes", num_classes)
        self.num_classes = num_classes

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        if labels is None:
            raise CertoodError(f"{self.kind}.fit: expected class labels (one per feature row), "
                               "found None")
        features, labels = drop_unmatched(features, labels, f"{self.kind}.fit")
        c = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        self.means, self.factors, self.log_dets = fit_per_class_gaussians(
            features, labels, c, self.shrinkage, self.kind)
        if not torch.isfinite(self.means).all(dim=1).any():
            raise CertoodError(f"{self.kind}.fit: expected a class with at least 2 boxes, "
                               "found none")
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        means, factors = self.means.to(features.device), self.factors.to(features.device)
        return larem_score(features, means, factors).to(features.dtype)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes(self.kind, state, {
            "means": ("C", "D"), "factors": ("C", "D", "D"), "log_dets": ("C",)})
        if self.num_classes is not None and sizes["C"] != self.num_classes:
            raise ArtifactError(f"{self.kind}: expected means for {self.num_classes} classes, "
                                f"found {sizes['C']}")
        for k in self._STATE:
            setattr(self, k, state[k].to(torch.float64))
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage, "num_classes": self.num_classes}
