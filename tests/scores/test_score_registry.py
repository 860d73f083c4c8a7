"""Score registry and the shared Score base behaviour."""
from __future__ import annotations

import doctest

import pytest
import torch

import certood.scores as scores_pkg
import certood.scores.base as base_module
from certood.errors import CertoodError
from certood.scores import SCORE_CLASSES, Energy, Mahalanobis, build_score


def test_registry_and_build():
    assert SCORE_CLASSES == {"energy": Energy, "mahalanobis": Mahalanobis}
    e = build_score("energy", {"temperature": 3.0})
    assert isinstance(e, Energy) and e.temperature == 3.0
    assert isinstance(build_score("mahalanobis", {}), Mahalanobis)
    assert isinstance(build_score("mahalanobis"), Mahalanobis)


@pytest.mark.parametrize("kind", sorted(SCORE_CLASSES))
def test_params_rebuild_the_same_score(kind):
    x, y = torch.randn(30, 4), torch.arange(30) % 2
    s = build_score(kind, {}).fit(x, y)
    rebuilt = build_score(kind, s.params()).load_state_tensors(s.state_tensors())
    assert torch.equal(rebuilt.score(x), s.score(x))
    assert s.kind == kind and s.score(x).shape == (30,)


def test_unknown_kind_and_params_list_valid_choices():
    with pytest.raises(CertoodError, match="expected one of energy, mahalanobis, found 'knn'"):
        build_score("knn", {})
    with pytest.raises(CertoodError, match="expected parameters among temperature, found 'temp'"):
        build_score("energy", {"temp": 1.0})


def test_fit_rejects_empty_features():
    with pytest.raises(CertoodError, match="expected at least one feature row, found 0"):
        Mahalanobis().fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_docstring_examples():
    assert doctest.testmod(scores_pkg).failed == 0
    assert doctest.testmod(base_module).failed == 0
