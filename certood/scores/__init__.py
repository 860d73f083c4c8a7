"""Empirical OOD scores: pure functions on tensors plus small fit/score classes.

Every score is **higher = more OOD**. ``build_score(kind, params)`` makes one from a spec.

>>> build_score("energy", {"temperature": 2.0})
Energy(temperature=2.0)
"""
from __future__ import annotations

import inspect
from typing import Any

from certood.errors import CertoodError
from certood.scores.activation_pattern import ActivationPattern
from certood.scores.ash import ASH
from certood.scores.base import Score
from certood.scores.box_abstraction import BoxAbstraction
from certood.scores.dice import DICE
from certood.scores.energy import Energy, energy_score
from certood.scores.entropy import Entropy
from certood.scores.fusion import Fusion
from certood.scores.gradnorm import GradNorm
from certood.scores.jitter_kl import JitterKL
from certood.scores.knn import KNN
from certood.scores.lared import LaRED
from certood.scores.larem import LaREM
from certood.scores.mahalanobis import Mahalanobis, fit_class_gaussians, mahalanobis_score
from certood.scores.max_logit import MaxLogit
from certood.scores.mc_dropout import MCDropout
from certood.scores.msp import MaxSoftmax
from certood.scores.odin import ODIN
from certood.scores.particul import Particul
from certood.scores.pvalue_fusion import PValueFusion
from certood.scores.react import ReAct
from certood.scores.relative_mahalanobis import RelativeMahalanobis
from certood.scores.residual import Residual
from certood.scores.vim import ViM

SCORE_CLASSES: dict[str, type[Score]] = {cls.kind: cls for cls in (
    Energy, Mahalanobis, MaxSoftmax, MaxLogit, Entropy, ODIN, RelativeMahalanobis, KNN, ViM,
    ReAct, ASH, DICE, GradNorm, MCDropout, LaREM, LaRED, BoxAbstraction, ActivationPattern,
    Particul, PValueFusion, Fusion, Residual, JitterKL)}

__all__ = ["ASH", "DICE", "KNN", "ODIN", "SCORE_CLASSES", "ActivationPattern", "BoxAbstraction",
           "Energy", "Entropy", "Fusion", "GradNorm", "JitterKL", "LaRED", "LaREM", "MCDropout", "Mahalanobis",
           "MaxLogit", "MaxSoftmax", "PValueFusion", "Particul", "ReAct", "RelativeMahalanobis", "Residual",
           "Score", "ViM",
           "build_score", "energy_score", "fit_class_gaussians", "mahalanobis_score"]


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
