"""Synthetic per-box features shared by the score tests (seeded, small, CPU).

``penultimate()`` imitates post-ReLU box-head outputs: D=32 units, C=4 classes. Class ``c``
drives its own block of four units (``[4c, 4c+4)``) and leaves the rest mostly silent; the
classifier reads each class off its block. OOD boxes are "far": the class blocks go quiet and
the last 16 units, never active on ID boxes, fire strongly. Every score should rank them above
ID boxes.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from sklearn.metrics import roc_auc_score

D, C = 32, 4


def penultimate(seed: int = 0, n_fit: int = 800, n_test: int = 400) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    means = torch.full((C, D), -2.0)
    for c in range(C):
        means[c, 4 * c: 4 * c + 4] = 3.0

    def boxes(n):
        y = torch.arange(n) % C
        return (means[y] + torch.randn(n, D, generator=g)).relu(), y

    fit, fit_labels = boxes(n_fit)
    id_test, id_labels = boxes(n_test)
    ood = (torch.randn(n_test, D, generator=g) - 1).relu()
    ood[:, 16:] = 4 + torch.randn(n_test, 16, generator=g).abs()
    weight = torch.zeros(C, D)
    for c in range(C):
        weight[c, 4 * c: 4 * c + 4] = 1.5
    bias = 0.1 * torch.randn(C, generator=g)
    return SimpleNamespace(fit=fit, fit_labels=fit_labels, id=id_test, id_labels=id_labels,
                           ood=ood, weight=weight, bias=bias, classifier=(weight, bias))


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return roc_auc_score(y, np.r_[id_scores.double().numpy(), ood_scores.double().numpy()])


@pytest.fixture(scope="module")
def data() -> SimpleNamespace:
    """``penultimate(seed=0)``: fit, id, ood features, labels and the classifier."""
    return penultimate()


@pytest.fixture(scope="session")
def make_data():
    """``penultimate`` itself, for other seeds and sizes."""
    return penultimate


@pytest.fixture(scope="session")
def auroc():
    """``auroc(id_scores, ood_scores)``: scikit-learn AUROC with OOD as the positive class."""
    return _auroc


def _round_trip(score):
    """Rebuild ``score`` from its params and its state tensors sent through safetensors bytes."""
    from certood.scores import build_score

    blob = safetensors.torch.save(score.state_tensors())
    return build_score(score.kind, score.params()).load_state_tensors(safetensors.torch.load(blob))


@pytest.fixture(scope="session")
def round_trip():
    """``round_trip(score)``: the score rebuilt via ``build_score`` and safetensors bytes."""
    return _round_trip


def _assert_same_ranking(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    """``b`` ranks the rows as ``a`` does, except between rows closer than ``rtol`` (relative).

    Two implementations that sum in different orders agree to float tolerance, so an exact
    argsort comparison would fail on near ties; an inversion wider than the tolerance would
    show as a row of ``b`` (taken in ``a``'s order) below the running maximum before it.
    """
    a, b = a.double(), b.double()
    in_a_order = b[torch.argsort(a)]
    drop = in_a_order.cummax(0).values - in_a_order
    tol = rtol * float(b.abs().max())
    assert float(drop.max()) <= tol, f"an inversion of {float(drop.max()):.3g} > {tol:.3g}"


@pytest.fixture(scope="session")
def same_ranking():
    """``same_ranking(a, b, rtol)``: ``b`` orders the rows like ``a`` up to near ties."""
    return _assert_same_ranking
