"""Activation patterns: Hamming distances by brute force, class keying, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch

import certood.scores.activation_pattern as ap_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import ActivationPattern
from certood.scores.activation_pattern import hamming_to_class


def brute_force(patterns, classes, bank, bank_class, d):
    out = []
    for p, c in zip(patterns, classes):
        same = bank[bank_class == c]
        out.append(min([(p != q).sum().item() for q in same], default=d))
    return torch.tensor(out, dtype=torch.float32)


def test_hamming_matches_brute_force_and_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    bank = torch.rand(60, 20, generator=g) > 0.5
    bank_class = torch.randint(0, 3, (60,), generator=g)
    patterns = torch.rand(40, 20, generator=g) > 0.5
    classes = torch.randint(0, 4, (40,), generator=g)  # class 3 has no patterns: distance 20
    expected = brute_force(patterns, classes, bank, bank_class, 20)
    assert torch.equal(hamming_to_class(patterns, classes, bank, bank_class), expected)
    assert (expected[classes == 3] == 20).all()
    monkeypatch.setattr(ap_module, "CHUNK_ELEMENTS", 60 * 3)  # three rows at a time
    assert torch.equal(hamming_to_class(patterns, classes, bank, bank_class), expected)


def test_fit_patterns_are_distinct_and_keyed_by_label_or_prediction(data):
    s = ActivationPattern().fit(data.fit, data.fit_labels, classifier=data.classifier)
    assert s.patterns.dtype == torch.bool and s.patterns.shape[1] == 32
    keyed = torch.cat([s.pattern_class[:, None], s.patterns.long()], 1)
    assert len(torch.unique(keyed, dim=0)) == len(keyed) <= len(data.fit)
    assert torch.equal(s.score(data.fit), torch.zeros(len(data.fit)))  # seen patterns score 0
    predicted = ActivationPattern().fit(data.fit, classifier=data.classifier)
    assert torch.equal(predicted.score(data.id), s.score(data.id))  # labels = predictions here


def test_ood_scores_higher(data, auroc):
    s = ActivationPattern().fit(data.fit, data.fit_labels, classifier=data.classifier)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_state_round_trip(round_trip, data):
    s = ActivationPattern().fit(data.fit, classifier=data.classifier)
    state = s.state_tensors()
    assert state["patterns"].dtype == torch.bool
    loaded = round_trip(s)
    assert torch.equal(loaded.score(data.ood), s.score(data.ood))


def test_errors(data):
    with pytest.raises(CertoodError, match="activation_pattern: expected a fitted score"):
        ActivationPattern().score(data.id)
    with pytest.raises(CertoodError, match=r"activation_pattern.fit: expected labels in \[0, 4\)"):
        ActivationPattern().fit(data.fit, data.fit_labels + 1, classifier=data.classifier)
    state = ActivationPattern().fit(data.fit, classifier=data.classifier).state_tensors()
    with pytest.raises(ArtifactError, match="expected bool patterns, found torch.uint8"):
        ActivationPattern().load_state_tensors({**state, "patterns": state["patterns"].byte()})


def test_docstring_examples():
    assert doctest.testmod(ap_module).failed == 0
