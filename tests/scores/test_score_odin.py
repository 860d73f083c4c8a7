"""ODIN at the RoI-feature tap: parity with pytorch-ood 0.4.0's ODIN, head handling, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_ood.detector import ODIN as PodODIN
from torch import nn

import certood.scores.odin as odin_module
from certood.errors import CertoodError
from certood.scores import ODIN
from certood.scores.msp import msp_score
from certood.scores.odin import odin_score


def roi_head(seed=0):
    """A small stand-in for box head + foreground predictor: [N, 64*7*7] -> [N, 5]."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


@pytest.mark.parametrize(("temperature", "eps"), [(1000.0, 0.0014), (1.0, 0.05), (10.0, 0.0)])
def test_matches_pytorch_ood(temperature, eps):
    head = roi_head()
    x = torch.randn(64, 64 * 7 * 7, generator=torch.Generator().manual_seed(1)).relu()
    ref = PodODIN(head, eps=eps, temperature=temperature).predict(x)
    ours = ODIN(temperature, eps).fit(x[:1], head=head).score(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_definition_and_batch_independence():
    head = roi_head(1)
    x = torch.randn(20, 64 * 7 * 7, generator=torch.Generator().manual_seed(2))
    batch = odin_score(x, head, 5.0, 0.01)
    for i in (0, 7, 19):  # one row at a time: the same score
        xi = x[i:i + 1].clone().requires_grad_(True)
        torch.log_softmax(head(xi) / 5.0, 1).max(1).values.sum().backward()
        x_hat = x[i:i + 1] - 0.01 * torch.sign(-xi.grad)
        expected = msp_score(head(x_hat).detach(), 5.0)
        torch.testing.assert_close(batch[i:i + 1], expected)
    with torch.no_grad():  # eps = 0 is MSP at temperature T
        torch.testing.assert_close(odin_score(x, head, 5.0, 0.0), msp_score(head(x), 5.0))


def test_works_under_inference_mode():
    head = roi_head()
    x = torch.randn(5, 64 * 7 * 7)
    s = ODIN().fit(x, head=head)
    expected = s.score(x)
    with torch.inference_mode():
        assert torch.equal(s.score(x), expected)
        x_inference = x.clone()  # an inference tensor, as a monitor under inference_mode makes
        assert torch.equal(s.score(x_inference), expected)


def test_ood_scores_higher(data, auroc):
    head = nn.Linear(32, 4)
    with torch.no_grad():
        head.weight.copy_(data.weight)
        head.bias.copy_(data.bias)
    s = ODIN(temperature=1.0, eps=0.01).fit(data.fit, head=head)
    assert auroc(s.score(data.id), s.score(data.ood)) > 0.9


def test_head_is_kept_by_reference_not_saved(round_trip):
    head = roi_head()
    x = torch.randn(6, 64 * 7 * 7)
    s = ODIN(temperature=2.0, eps=0.001).fit(x, head=head)
    assert s.needs_head and not s.needs_fit and s.head is head and s.state_tensors() == {}
    out = s.score(x)
    assert out.shape == (6,) and out.dtype == torch.float32
    loaded = round_trip(s)
    assert not loaded.is_fitted and loaded.params() == {"temperature": 2.0, "eps": 0.001}
    with pytest.raises(CertoodError, match=r"call fit\(features, labels, head=head\)"):
        loaded.score(x)
    assert torch.equal(loaded.fit(x[:1], head=head).score(x), out)


def test_errors():
    x = torch.randn(3, 8)
    with pytest.raises(CertoodError, match="odin: expected a fitted score, found an unfitted one"):
        ODIN().score(x)
    with pytest.raises(CertoodError,
                       match=r"expected head=<callable mapping \[N, 8\] .+, found None"):
        ODIN().fit(x)
    with pytest.raises(CertoodError, match="found Tensor"):
        ODIN().fit(x, head=torch.zeros(3))
    with pytest.raises(CertoodError, match="odin.eps: expected a number >= 0, found -1"):
        ODIN(eps=-1)
    with pytest.raises(CertoodError, match="odin.temperature: expected a number > 0"):
        ODIN(temperature=0)
    bad_head = ODIN().fit(x, head=lambda t: t.sum(1))
    with pytest.raises(CertoodError,
                       match=r"expected head to return logits \[3, C\], found \(3,\)"):
        bad_head.score(x)
    with pytest.raises(CertoodError, match="expected features with D=8 columns"):
        bad_head.score(torch.zeros(2, 9))


def test_docstring_examples():
    assert doctest.testmod(odin_module).failed == 0
