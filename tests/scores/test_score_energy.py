"""Energy score: parity with pytorch-ood 0.4.0's EnergyBased."""
from __future__ import annotations

import doctest
import math

import pytest
import safetensors.torch
import torch
from pytorch_ood.detector import EnergyBased

import certood.scores.energy as energy_module
from certood.errors import CertoodError
from certood.scores import Energy, energy_score


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5, 1000.0])
def test_matches_pytorch_ood(temperature):
    logits = torch.randn(300, 7, generator=torch.Generator().manual_seed(0)) * 5
    ref = EnergyBased.score(logits, t=temperature)  # -T logsumexp(x / T): higher = more OOD
    torch.testing.assert_close(energy_score(logits, temperature), ref, rtol=0, atol=0)
    torch.testing.assert_close(Energy(temperature).score(logits), ref, rtol=0, atol=0)
    torch.testing.assert_close(EnergyBased(None, t=temperature).predict_logits(logits), ref)


def test_hand_values_and_direction():
    assert energy_score(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(-math.log(2))
    assert energy_score(torch.tensor([[3.0]]), 2.0).item() == pytest.approx(-3.0)
    confident, flat = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.0]])
    assert energy_score(confident) < energy_score(flat)  # the confident box is less OOD


def test_needs_no_fit_and_keeps_no_state():
    e = Energy(2.0)
    assert not e.needs_fit and e.is_fitted
    assert e.fit(torch.randn(4, 3)) is e
    assert e.state_tensors() == {} and e.params() == {"temperature": 2.0}
    logits = torch.randn(5, 3)
    blob = safetensors.torch.save(e.state_tensors())
    loaded = Energy(2.0).load_state_tensors(safetensors.torch.load(blob))
    assert torch.equal(loaded.score(logits), e.score(logits))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_rejects_bad_temperature(bad):
    with pytest.raises(CertoodError, match="energy.temperature: expected a positive number"):
        Energy(bad)


def test_rejects_bad_features():
    with pytest.raises(CertoodError, match=r"expected features of shape \[N, D\], found \(3,\)"):
        Energy().score(torch.zeros(3))
    with pytest.raises(CertoodError, match="expected floating-point features, found torch.int64"):
        Energy().score(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(CertoodError, match="expected features as a torch.Tensor, found list"):
        Energy().score([[1.0, 2.0]])


def test_docstring_examples():
    assert doctest.testmod(energy_module).failed == 0
