"""The :class:`Score` base class: fitted state around a pure scoring function.

Every score maps per-box features ``[N, D]`` to ``[N]``, **higher = more OOD**. Subclasses
implement ``_fit``, ``_score``, ``state_tensors``/``_load`` and ``params``; this class does the
checks (fitted? right shape and dimension?) once, with expected-vs-found messages.

>>> from certood.scores import Energy
>>> Energy().fit(torch.zeros(3, 2)).score(torch.zeros(1, 2)).shape
torch.Size([1])
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError


def check_features(features: Any, who: str, dim: int | None = None) -> Tensor:
    """Return ``features`` as a floating ``[N, D]`` tensor, or raise naming what is wrong."""
    if not isinstance(features, Tensor):
        raise CertoodError(f"{who}: expected features as a torch.Tensor, "
                           f"found {type(features).__name__}")
    if features.ndim != 2:
        raise CertoodError(f"{who}: expected features of shape [N, D], "
                           f"found {tuple(features.shape)}")
    if not features.is_floating_point():
        raise CertoodError(f"{who}: expected floating-point features, found {features.dtype}")
    if dim is not None and features.shape[1] != dim:
        raise CertoodError(f"{who}: expected features with D={dim} columns (as fitted), "
                           f"found {features.shape[1]}")
    return features.detach()


def check_labels(labels: Any, who: str, n: int) -> Tensor:
    """Return ``labels`` as an int64 ``[N]`` tensor matching ``n`` feature rows."""
    if not isinstance(labels, Tensor):
        raise CertoodError(f"{who}: expected labels as a torch.Tensor, "
                           f"found {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise CertoodError(f"{who}: expected integer class labels, found {labels.dtype}")
    if labels.shape != (n,):
        raise CertoodError(f"{who}: expected labels of shape [{n}] (one per feature row), "
                           f"found {tuple(labels.shape)}")
    return labels.detach().to(torch.int64)


class Score:
    """Base of every OOD score: ``fit`` returns ``self``, ``score`` gives ``[N]``, higher = OOD."""

    kind: ClassVar[str] = ""
    needs_fit: ClassVar[bool] = True

    def __init__(self) -> None:
        self.feature_dim: int | None = None  # set by fit / load_state_tensors

    @property
    def is_fitted(self) -> bool:
        return not self.needs_fit or self.feature_dim is not None

    def fit(self, features: Tensor, labels: Tensor | None = None) -> "Score":
        features = check_features(features, f"{self.kind}.fit")
        if features.shape[0] == 0:
            raise CertoodError(f"{self.kind}.fit: expected at least one feature row, found 0")
        if labels is not None:
            labels = check_labels(labels, f"{self.kind}.fit", features.shape[0])
        self._fit(features, labels)
        return self

    def score(self, features: Tensor) -> Tensor:
        if not self.is_fitted:
            raise CertoodError(f"{self.kind}: expected a fitted score, found an unfitted one "
                               "(call fit(features, labels) or load_state_tensors first)")
        return self._score(check_features(features, f"{self.kind}.score", self.feature_dim))

    def state_tensors(self) -> dict[str, Tensor]:
        """Fitted state as named contiguous tensors (safetensors-ready; no pickle)."""
        return {}

    def load_state_tensors(self, state: dict[str, Tensor]) -> "Score":
        expected = set(self.state_tensors_spec())
        if set(state) != expected:
            raise ArtifactError(f"{self.kind}: expected state tensors {sorted(expected)}, "
                                f"found {sorted(state)}")
        self._load(state)
        return self

    def state_tensors_spec(self) -> tuple[str, ...]:
        """Names of the tensors ``state_tensors`` returns once fitted."""
        return ()

    def params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able: ``build_score(kind, params)`` rebuilds the score."""
        return {}

    # subclasses
    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        pass

    def _score(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def _load(self, state: dict[str, Tensor]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
