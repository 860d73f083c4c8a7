"""ASH-S: parity with pytorch-ood 0.4.0's ASH, the shaping itself, state, errors."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
from pytorch_ood.detector import ASH as PodASH

import certood.scores.ash as ash_module
from certood.errors import CertoodError
from certood.scores import ASH
from certood.scores.ash import ash_s, kept_count


@pytest.mark.parametrize("q", [65.0, 90.0, 95.0, 0.0])
def test_matches_pytorch_ood(data, q):
    w, b = data.classifier
    pod = PodASH(backbone=None, head=lambda m: m.flatten(1) @ w.T + b, variant="ash-s",
                 percentile=q / 100)
    probe = torch.cat([data.id, data.ood])
    ref = pod.predict_feature_maps(probe[:, :, None, None])  # pooled features as [N, D, 1, 1]
    ours = ASH(percentile=q).fit(data.fit, classifier=(w, b)).score(probe)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)


def test_shaping_by_hand():
    x = torch.tensor([[4.0, 1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    shaped = ash_s(x, 50.0)  # keep 2 of 4: 4 and 3, sums 8 -> 7
    expected = torch.tensor([[4.0, 0.0, 0.0, 3.0]]) * math.exp(8 / 7)
    torch.testing.assert_close(shaped[:1], expected)
    assert torch.equal(shaped[1], torch.zeros(4))  # all-zero box: no NaN (pytorch-ood: NaN)
    assert [kept_count(256, p) for p in (90.0, 65.0, 0.0)] == [26, 90, 256]


def test_ood_scores_higher(data, auroc):
    s = ASH().fit(data.fit, classifier=data.classifier)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_needs_no_data_but_the_classifier_and_round_trips(round_trip, data):
    s = ASH(percentile=80.0)
    assert not s.needs_fit and s.needs_classifier and not s.is_fitted
    s.fit(data.fit[:1], classifier=data.classifier)  # one row is enough: only D is read
    loaded = round_trip(s)
    assert torch.equal(loaded.score(data.ood), s.score(data.ood))
    assert set(s.state_tensors()) == {"weight", "bias"}


def test_errors(data):
    with pytest.raises(CertoodError, match="ash: expected a fitted score, found an unfitted one"):
        ASH().score(data.id)
    with pytest.raises(CertoodError, match="ash.fit: expected classifier=.+, found None"):
        ASH().fit(data.fit)
    with pytest.raises(CertoodError, match="ash.percentile: expected to keep at least one of 2 "
                                           "activations, found 80.0"):
        ASH(percentile=80.0).fit(torch.rand(3, 2), classifier=(torch.ones(1, 2), torch.zeros(1)))
    with pytest.raises(CertoodError, match="ash.percentile: expected a number >= 0 and < 100"):
        ASH(percentile=100)


def test_docstring_examples():
    assert doctest.testmod(ash_module).failed == 0
