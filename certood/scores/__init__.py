"""Empirical OOD scores: pure functions on tensors plus small fit/score classes.

Every score is **higher = more OOD**. ``build_score(kind, params)`` makes one from a spec.

>>> build_score("energy", {"temperature": 2.0})
Energy(temperature=2.0)
"""
from __future__ import annotations

import inspect
from typing import Any

from certood.errors import CertoodError
from certood.scores.base import Score
from certood.scores.energy import Energy, energy_score
from certood.scores.mahalanobis import Mahalanobis, fit_class_gaussians, mahalanobis_score

SCORE_CLASSES: dict[str, type[Score]] = {"energy": Energy, "mahalanobis": Mahalanobis}

__all__ = ["SCORE_CLASSES", "Energy", "Mahalanobis", "Score", "build_score", "energy_score",
           "fit_class_gaussians", "mahalanobis_score"]


def build_score(kind: str, params: dict[str, Any] | None = None) -> Score:
    """Make the score ``kind`` from constructor ``params``; unknown names list the valid ones."""
    if kind not in SCORE_CLASSES:
        raise CertoodError(f"score kind: expected one of {', '.join(sorted(SCORE_CLASSES))}, "
                           f"found {kind!r}")
    cls, params = SCORE_CLASSES[kind], dict(params or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise CertoodError(f"{kind}: expected parameters among {', '.join(accepted) or '(none)'}, "
                           f"found {', '.join(map(repr, unknown))}")
    return cls(**params)
