"""ReAct: parity with pytorch-ood 0.4.0's ReAct, the numpy percentile, state, errors."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from pytorch_ood.detector import EnergyBased
from pytorch_ood.detector import ReAct as PodReAct

import certood.scores.react as react_module
from certood.errors import CertoodError
from certood.scores import ReAct
from certood.scores.react import percentile


@pytest.mark.parametrize("q", [90.0, 50.0, 99.0, 100.0])
def test_matches_pytorch_ood(data, q):
    w, b = data.classifier
    y = data.fit_labels.clone()
    y[::9] = -1  # both leave unmatched rows out of the percentile
    pod = PodReAct(backbone=None, head=lambda m: m.flatten(1) @ w.T + b, percentile=q / 100)
    pod.fit_feature_maps(data.fit[:, :, None, None], y)
    ours = ReAct(percentile=q).fit(data.fit, y, classifier=(w, b))
    # numpy interpolates float32 activations in float32, ours in float64
    assert ours.threshold.item() == pytest.approx(pod.threshold, rel=1e-6)
    probe = torch.cat([data.id, data.ood])
    torch.testing.assert_close(ours.score(probe), pod.predict_feature_maps(probe[:, :, None, None]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentile_equals_numpy(n):
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    for q in (0.0, 12.5, 33.3, 50.0, 90.0, 99.9, 100.0):
        assert percentile(v, q).item() == np.percentile(v.double().numpy(), q)


def test_clips_then_energy(data):
    s = ReAct(percentile=80.0).fit(data.fit, classifier=data.classifier)
    clipped = data.ood.clamp(max=s.threshold.item())
    expected = EnergyBased.score(clipped @ data.weight.T + data.bias)
    torch.testing.assert_close(s.score(data.ood), expected)


def test_ood_scores_higher(data, auroc):
    s = ReAct().fit(data.fit, data.fit_labels, classifier=data.classifier)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_state_round_trip(round_trip, data):
    s = ReAct(percentile=75.0).fit(data.fit, classifier=data.classifier)
    loaded = round_trip(s)
    assert torch.equal(loaded.score(data.ood), s.score(data.ood)) and loaded.params() == {
        "percentile": 75.0}


def test_errors(data):
    with pytest.raises(CertoodError, match="react: expected a fitted score, found an unfitted one"):
        ReAct().score(data.id)
    with pytest.raises(CertoodError, match=r"react.fit: expected classifier=\(W \[C, 32\]"):
        ReAct().fit(data.fit, classifier=data.weight)
    with pytest.raises(CertoodError, match="react.percentile: expected a number >= 0 and <= 100, "
                                           "found 101"):
        ReAct(percentile=101)


def test_docstring_examples():
    assert doctest.testmod(react_module).failed == 0
