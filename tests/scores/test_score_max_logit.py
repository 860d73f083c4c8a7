"""Max logit: parity with pytorch-ood 0.4.0's MaxLogit, direction, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_ood.detector import MaxLogit as PodMaxLogit

import certood.scores.max_logit as max_logit_module
from certood.errors import CertoodError
from certood.scores import MaxLogit
from certood.scores.max_logit import max_logit_score


def test_matches_pytorch_ood():
    logits = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * 5
    ref = PodMaxLogit.score(logits)
    torch.testing.assert_close(max_logit_score(logits), ref, rtol=0, atol=0)
    torch.testing.assert_close(MaxLogit().score(logits), ref, rtol=0, atol=0)


def test_ood_scores_higher(data, auroc):
    logits = lambda x: x @ data.weight.T + data.bias  # noqa: E731
    assert auroc(MaxLogit().score(logits(data.id)), MaxLogit().score(logits(data.ood))) > 0.9


def test_shape_dtype_state_and_no_fit(round_trip):
    logits = torch.tensor([[1.0, 3.0, -2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    s = MaxLogit()
    assert not s.needs_fit and s.is_fitted and s.params() == {} and s.state_tensors() == {}
    out = s.score(logits)
    assert out.dtype == torch.float64 and out.tolist() == [-3.0, 0.0]
    assert torch.equal(round_trip(s).score(logits), out)


def test_errors():
    with pytest.raises(CertoodError, match="max_logit.score: expected at least one logit column"):
        MaxLogit().score(torch.zeros(3, 0))
    with pytest.raises(CertoodError, match="expected floating-point features, found torch.int64"):
        MaxLogit().score(torch.zeros(3, 2, dtype=torch.long))


def test_docstring_examples():
    assert doctest.testmod(max_logit_module).failed == 0
