"""DICE: parity with pytorch-ood 0.4.0's DICE, the mask, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_ood.detector import DICE as PodDICE

import certood.scores.dice as dice_module
from certood.errors import CertoodError
from certood.scores import DICE


@pytest.mark.parametrize("q", [90.0, 50.0, 70.0, 0.0])
def test_matches_pytorch_ood(q):
    g = torch.Generator().manual_seed(int(q))
    x = torch.randn(400, 24, generator=g).relu() * torch.rand(24, generator=g) * 3
    w, b = torch.randn(5, 24, generator=g), torch.randn(5, generator=g)
    y = torch.arange(400) % 5
    y[::7] = -1  # both leave unmatched rows out of the mean activation
    pod = PodDICE(None, w=w, b=b, p=q / 100).fit_features(x, y)
    ours = DICE(percentile=q).fit(x, y, classifier=(w, b))
    assert torch.equal(ours.masked_weight, pod.masked_w)
    probe = torch.randn(100, 24, generator=g).relu() * 2
    torch.testing.assert_close(ours.score(probe), pod.predict_features(probe), rtol=1e-5, atol=1e-5)


def test_mask_keeps_the_top_contributions(data):
    s = DICE(percentile=75.0).fit(data.fit, classifier=data.classifier)
    contribution = data.fit.mean(0)[None] * data.weight
    kept = s.masked_weight != 0
    assert kept.sum() == (contribution > contribution.flatten().quantile(0.75)).sum()
    assert contribution[kept].min() > contribution[~kept].max()


def test_ood_scores_higher(data, auroc):
    s = DICE().fit(data.fit, data.fit_labels, classifier=data.classifier)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_state_round_trip(round_trip, data):
    s = DICE(percentile=60.0).fit(data.fit, classifier=data.classifier)
    loaded = round_trip(s)
    assert torch.equal(loaded.score(data.ood), s.score(data.ood))
    assert torch.equal(loaded.masked_weight, s.masked_weight)


def test_errors(data):
    with pytest.raises(CertoodError, match="dice: expected a fitted score, found an unfitted one"):
        DICE().score(data.id)
    with pytest.raises(CertoodError, match="dice.fit: expected classifier=.+, found None"):
        DICE().fit(data.fit)
    with pytest.raises(CertoodError, match="dice.fit: expected rows with a class label >= 0"):
        DICE().fit(data.fit, torch.full_like(data.fit_labels, -1), classifier=data.classifier)
    with pytest.raises(CertoodError, match="dice.percentile: expected a number >= 0 and < 100"):
        DICE(percentile=-5)


def test_docstring_examples():
    assert doctest.testmod(dice_module).failed == 0
