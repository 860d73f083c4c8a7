"""Softmax entropy: parity with pytorch-ood 0.4.0's Entropy, bounds, direction, state."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
from pytorch_ood.detector import Entropy as PodEntropy
from scipy.stats import entropy as scipy_entropy

import certood.scores.entropy as entropy_module
from certood.errors import CertoodError
from certood.scores import Entropy
from certood.scores.entropy import entropy_score


def test_matches_pytorch_ood_to_its_clipping():
    # pytorch-ood clips p to [1e-7, 1] before the log; a clipped term differs from ours by
    # at most 1e-7 * log(1e7) (1.6e-6), so the sums agree to C * 1.6e-6
    logits = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * 8
    ref = PodEntropy.score(logits)
    torch.testing.assert_close(entropy_score(logits), ref, rtol=0, atol=5 * 1.7e-6)
    mild = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))  # nothing clipped
    torch.testing.assert_close(Entropy().score(mild), PodEntropy.score(mild), rtol=1e-6, atol=1e-6)


def test_matches_scipy_and_bounds():
    logits = torch.randn(50, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = torch.from_numpy(scipy_entropy(torch.softmax(logits, 1).numpy(), axis=1))
    torch.testing.assert_close(entropy_score(logits), ref, rtol=1e-12, atol=1e-12)
    assert entropy_score(torch.zeros(1, 5)).item() == pytest.approx(math.log(5))
    assert entropy_score(torch.tensor([[1e4, 0.0]])).item() == 0.0


def test_ood_scores_higher(data, auroc):
    logits = lambda x: x @ data.weight.T + data.bias  # noqa: E731
    assert auroc(Entropy().score(logits(data.id)), Entropy().score(logits(data.ood))) > 0.9


def test_shape_dtype_state_and_no_fit(round_trip):
    logits = torch.randn(6, 3, dtype=torch.float64)
    s = Entropy()
    assert not s.needs_fit and s.is_fitted and s.state_tensors() == {}
    out = s.score(logits)
    assert out.shape == (6,) and out.dtype == torch.float64
    assert torch.equal(round_trip(s).score(logits), out)


def test_errors():
    with pytest.raises(CertoodError, match="entropy.score: expected at least one logit column"):
        Entropy().score(torch.zeros(2, 0))


def test_docstring_examples():
    assert doctest.testmod(entropy_module).failed == 0
