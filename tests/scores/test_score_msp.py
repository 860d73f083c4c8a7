"""MSP: parity with pytorch-ood 0.4.0's MaxSoftmax, direction, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_ood.detector import MaxSoftmax as PodMaxSoftmax

import certood.scores.msp as msp_module
from certood.errors import CertoodError
from certood.scores import MaxSoftmax
from certood.scores.msp import msp_score


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1000.0])
def test_matches_pytorch_ood(temperature):
    logits = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * 5
    ref = PodMaxSoftmax.score(logits, t=temperature)
    torch.testing.assert_close(msp_score(logits, temperature), ref, rtol=0, atol=0)
    torch.testing.assert_close(MaxSoftmax(temperature).score(logits), ref, rtol=0, atol=0)


def test_ood_scores_higher(data, auroc):
    logits = lambda x: x @ data.weight.T + data.bias  # noqa: E731
    s = MaxSoftmax()
    assert auroc(s.score(logits(data.id)), s.score(logits(data.ood))) > 0.9


def test_shape_dtype_state_and_no_fit(round_trip):
    logits = torch.randn(7, 5, dtype=torch.float64)
    s = MaxSoftmax(2.0)
    assert not s.needs_fit and s.is_fitted and s.fit(logits) is s
    out = s.score(logits)
    assert out.shape == (7,) and out.dtype == torch.float64 and (out <= -1 / 5 + 1e-12).all()
    assert s.state_tensors() == {} and s.params() == {"temperature": 2.0}
    assert torch.equal(round_trip(s).score(logits), out)


def test_errors():
    with pytest.raises(CertoodError, match="msp.temperature: expected a number > 0, found 0"):
        MaxSoftmax(0)
    with pytest.raises(CertoodError, match="expected at least one logit column, found 0"):
        MaxSoftmax().score(torch.zeros(3, 0))
    with pytest.raises(CertoodError, match=r"expected features of shape \[N, D\]"):
        MaxSoftmax().score(torch.zeros(3))


def test_docstring_examples():
    assert doctest.testmod(msp_module).failed == 0
