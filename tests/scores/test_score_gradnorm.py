"""GradNorm in closed form: autograd check, pytorch-ood 0.4.0 parity, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_ood.detector import GradNorm as PodGradNorm
from torch import nn

import certood.scores.gradnorm as gradnorm_module
from certood.errors import CertoodError
from certood.scores import GradNorm
from certood.scores.gradnorm import gradnorm_score


def classifier(seed=0, d=16, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, d, generator=g), torch.randn(c, generator=g), g


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_closed_form_equals_autograd_of_kl(temperature):
    w, b, g = classifier()
    h = torch.randn(20, 16, generator=g, dtype=torch.float64)
    w, b = w.double(), b.double()
    for i in range(len(h)):
        wi, bi = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        log_p = torch.log_softmax((h[i] @ wi.T + bi) / temperature, dim=0)
        kl = (torch.full_like(log_p, 1 / 5) * (torch.log(torch.tensor(1 / 5)) - log_p)).sum()
        kl.backward()
        norm = wi.grad.abs().sum() + bi.grad.abs().sum()
        torch.testing.assert_close(gradnorm_score(h[i:i + 1], w, b, temperature), -norm.reshape(1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_pytorch_ood(temperature):
    w, b, g = classifier(1)
    model = nn.Linear(16, 5)
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    h = torch.randn(64, 16, generator=g)
    ref = PodGradNorm(model, temperature=temperature).predict(h)  # all parameters: W and b
    ours = GradNorm(temperature).fit(h[:1], classifier=(w, b)).score(h)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ood_scores_higher(data, auroc):
    # GradNorm grows with the feature norm: "far" boxes of large norm but near-uniform softmax
    # can still score low. Its shift is a confused classifier: every class block equally active
    # at the ID activation level.
    g = torch.Generator().manual_seed(5)
    confused = torch.zeros(len(data.ood), 32)
    confused[:, :16] = (0.75 + 0.3 * torch.randn(len(data.ood), 16, generator=g)).relu()
    s = GradNorm().fit(data.fit, classifier=data.classifier)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(confused)) > 0.9


def test_state_round_trip(round_trip, data):
    s = GradNorm(temperature=2.0).fit(data.fit[:3], classifier=data.classifier)
    assert not s.needs_fit and s.needs_classifier
    assert torch.equal(round_trip(s).score(data.ood), s.score(data.ood))


def test_errors(data):
    with pytest.raises(CertoodError, match="gradnorm: expected a fitted score"):
        GradNorm().score(data.id)
    with pytest.raises(CertoodError, match="gradnorm.fit: expected classifier=.+, found list"):
        GradNorm().fit(data.fit, classifier=[data.weight])
    with pytest.raises(CertoodError, match="expected a floating-point classifier"):
        GradNorm().fit(data.fit, classifier=(data.weight.long(), data.bias))
    with pytest.raises(CertoodError, match="gradnorm.temperature: expected a number > 0"):
        GradNorm(temperature=float("inf"))


def test_docstring_examples():
    assert doctest.testmod(gradnorm_module).failed == 0
