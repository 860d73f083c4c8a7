"""LaRED: per-class Gaussian log-density vs scipy, pytorch-ood GMM parity for one class."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from pytorch_ood.detector import GMM
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf

import certood.scores.lared as lared_module
from certood.errors import CertoodError
from certood.scores import LaRED, LaREM


def make_data(seed=0, n=300, d=6, c=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    mixes = torch.eye(d) + 0.5 * torch.randn(c, d, d, generator=g)
    x = (torch.randn(c, d, generator=g) * 3)[y] + torch.einsum(
        "nd,nde->ne", torch.randn(n, d, generator=g), mixes[y])
    return x, y


def test_matches_scipy_log_density():
    x, y = make_data(0)
    probe = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    log_pdf = []
    for c in range(3):
        rows = x[y == c].double().numpy()
        log_pdf.append(multivariate_normal(rows.mean(0), LedoitWolf().fit(rows).covariance_)
                       .logpdf(probe.numpy()))
    ours = LaRED().fit(x, y).score(probe)
    np.testing.assert_allclose(ours.numpy(), -np.max(log_pdf, axis=0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_one_class_matches_pytorch_ood_gmm(seed):
    # pytorch-ood 0.4.0's GMM: -log sum_k pi_k N(z; mu_k, Sigma_k) with ML covariances; with a
    # single class (pi = 1) and no regularisation it is our score without shrinkage.
    x, _ = make_data(seed)
    y = torch.zeros(len(x), dtype=torch.long)
    probe = torch.cat([x[:50], torch.randn(50, 6, generator=torch.Generator().manual_seed(3)) * 5])
    theirs = GMM(None, reg=0.0).fit_features(x, y).predict_features(probe)
    ours = LaRED(shrinkage=0.0).fit(x.double(), y).score(probe.double())
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_same_fit_as_larem_and_ood_scores_higher(data, auroc):
    s = LaRED().fit(data.fit, data.fit_labels)
    m = LaREM().fit(data.fit, data.fit_labels)
    assert torch.equal(s.factors, m.factors) and torch.equal(s.log_dets, m.log_dets)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_state_round_trip(round_trip):
    x, y = make_data(4)
    s = LaRED(shrinkage=0.1, num_classes=3).fit(x, y)
    loaded = round_trip(s)
    assert isinstance(loaded, LaRED) and torch.equal(loaded.score(x), s.score(x))
    assert loaded.params() == {"shrinkage": 0.1, "num_classes": 3}


def test_errors():
    x, y = make_data(5)
    with pytest.raises(CertoodError, match="lared: expected a fitted score"):
        LaRED().score(x)
    with pytest.raises(CertoodError, match="lared.fit: expected class labels"):
        LaRED().fit(x)
    with pytest.raises(CertoodError, match="lared.num_classes: expected an integer >= 1"):
        LaRED(num_classes=True)


def test_docstring_examples():
    assert doctest.testmod(lared_module).failed == 0
