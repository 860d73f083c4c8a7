"""Class-conditional Mahalanobis score (Lee et al., NeurIPS 2018), higher = more OOD.

One Gaussian per class with a shared (pooled, tied) covariance, fitted in float64:
``mu_c`` = class means, ``Sigma = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` (the maximum
likelihood estimate, as sklearn's ``EmpiricalCovariance`` on class-centred features), and
``P = pinv(Sigma)``. The score is the squared distance to the nearest class mean,
``min_c (x - mu_c)^T P (x - mu_c)``. With a singular ``Sigma`` (fewer boxes than dimensions)
directions outside the data span are not measured.

pytorch-ood 0.4.0's ``Mahalanobis`` differs only in scale: it does not divide the scatter by
N, adds a 1e-6 ridge and halves the distance, so its score is ours / (2 N) up to that ridge;
rankings agree (tested).

>>> x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # Sigma = I / 2
>>> means, precision = fit_class_gaussians(x, torch.zeros(4, dtype=torch.long), 1)
>>> round(mahalanobis_score(torch.tensor([[1.0, 0.0]]), means, precision).item(), 6)
2.0
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_features, check_labels, drop_unmatched


def fit_class_gaussians(features: Tensor, labels: Tensor,
                        num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means ``[C, D]`` and pooled precision ``[D, D]``, both float64.

    Labels must lie in ``[0, num_classes)``. Classes without samples get NaN means (ignored by
    :func:`mahalanobis_score`) and a warning names them.
    """
    features = check_features(features, "fit_class_gaussians").to(torch.float64)
    labels = check_labels(labels, "fit_class_gaussians", features.shape[0])
    if features.shape[0] == 0:
        raise CertoodError("fit_class_gaussians: expected at least one feature row, found 0")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise CertoodError(f"fit_class_gaussians: expected labels in [0, {num_classes}), "
                           f"found {sorted(set(labels[bad].tolist()))[:5]}")
    counts = torch.bincount(labels, minlength=num_classes)
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    means = sums / counts.unsqueeze(1)  # NaN rows for absent classes (0 / 0)
    centred = features - means[labels]
    precision = torch.linalg.pinv(centred.T @ centred / features.shape[0], hermitian=True)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        warnings.warn(f"mahalanobis: classes {missing} have no samples; they are left out",
                      stacklevel=2)
    return means, precision


def precision_factor(precision: Tensor) -> Tensor:
    """``L = V sqrt(max(w, 0))`` with ``P = V diag(w) V^T``, so ``P = L L^T`` (float64 ``[D, D]``)."""
    w, v = torch.linalg.eigh(precision.to(torch.float64))
    return v * w.clamp(min=0).sqrt()


def mahalanobis_score(features: Tensor, means: Tensor, precision: Tensor,
                      factor: Tensor | None = None) -> Tensor:
    """``min_c (x - mu_c)^T P (x - mu_c)`` over classes with finite means; float64 ``[N]``.

    ``factor``: :func:`precision_factor` of ``precision``, when the caller keeps it (it costs an
    eigendecomposition per call otherwise)."""
    x = features.to(torch.float64)
    means = means.to(device=x.device, dtype=torch.float64)
    precision = precision.to(device=x.device, dtype=torch.float64)
    d = x.shape[-1]
    if means.ndim != 2 or means.shape[1] != d or precision.shape != (d, d):
        raise CertoodError(f"mahalanobis_score: expected means [C, {d}] and precision [{d}, {d}] "
                           f"for {d}-dim features, found {tuple(means.shape)} and "
                           f"{tuple(precision.shape)}")
    means = means[torch.isfinite(means).all(dim=1)]
    if len(means) == 0:
        raise CertoodError("mahalanobis_score: expected at least one class with a finite mean, "
                           "found none")
    # P = L L^T with L = V sqrt(w): distances become plain squared norms (no cancellation).
    factor = precision_factor(precision) if factor is None else factor.to(device=x.device, dtype=torch.float64)
    xl, ml = x @ factor, means @ factor
    dist = torch.stack([((xl - m) ** 2).sum(dim=1) for m in ml], dim=1)
    return dist.min(dim=1).values


class Mahalanobis(Score):
    """Pooled-covariance Mahalanobis distance to the nearest class mean.

    ``fit(features, labels)`` ignores rows labelled -1 (detections matched to no ground truth).
    ``num_classes=None`` takes ``max(label) + 1``. Scores come back in the features' dtype.

    >>> m = Mahalanobis().fit(torch.randn(50, 3), torch.arange(50) % 2)
    >>> m.score(torch.zeros(4, 3)).shape
    torch.Size([4])
    """

    kind = "mahalanobis"
    _STATE = ("means", "precision", "class_counts")

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 1):
            raise CertoodError(f"mahalanobis.num_classes: expected a positive integer or null, "
                               f"found {num_classes!r}")
        self.num_classes = num_classes
        self.means: Tensor | None = None
        self.precision: Tensor | None = None
        self.class_counts: Tensor | None = None

    @property
    def missing_classes(self) -> list[int]:
        """Classes that had no fitting samples (left out of the minimum)."""
        if self.class_counts is None:
            return []
        return (self.class_counts == 0).nonzero().flatten().tolist()

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        if labels is None:
            raise CertoodError("mahalanobis.fit: expected class labels (one per feature row), "
                               "found None")
        features, labels = drop_unmatched(features, labels, "mahalanobis.fit")
        c = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        self.means, self.precision = fit_class_gaussians(features, labels, c)
        self.class_counts = torch.bincount(labels, minlength=c)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        if getattr(self, "_factor_of", None) is not self.precision:  # cached per fitted precision
            self._factor, self._factor_of = precision_factor(self.precision), self.precision
        return mahalanobis_score(features, self.means, self.precision, self._factor).to(features.dtype)

    def state_tensors_spec(self) -> tuple[str, ...]:
        return self._STATE

    def state_tensors(self) -> dict[str, Tensor]:
        if not self.is_fitted:
            return {}
        return {k: getattr(self, k).contiguous().clone() for k in self._STATE}

    def _load(self, state: dict[str, Tensor]) -> None:
        means, precision, counts = (state[k] for k in self._STATE)
        c, d = means.shape if means.ndim == 2 else (-1, -1)
        if self.num_classes is not None and c != self.num_classes:
            raise ArtifactError(f"mahalanobis: expected means for {self.num_classes} classes, "
                                f"found {c}")
        if means.ndim != 2 or precision.shape != (d, d) or counts.shape != (c,):
            raise ArtifactError(f"mahalanobis: expected means [C, D], precision [D, D], "
                                f"class_counts [C], found {tuple(means.shape)}, "
                                f"{tuple(precision.shape)}, {tuple(counts.shape)}")
        self.means, self.precision = means.to(torch.float64), precision.to(torch.float64)
        self.class_counts = counts.to(torch.int64)
        self.feature_dim = d

    def params(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}
