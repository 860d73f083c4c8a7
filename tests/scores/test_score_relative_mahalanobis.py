"""Relative Mahalanobis: pytorch-ood 0.4.0 RMD parity (scale N), definition, state, errors."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from pytorch_ood.detector import RMD
from sklearn.covariance import EmpiricalCovariance

import certood.scores.relative_mahalanobis as rmd_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import RelativeMahalanobis


def make_data(seed=0, n=400, d=6, c=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)  # correlated, well conditioned
    x = (torch.randn(c, d, generator=g) * 3)[y] + torch.randn(n, d, generator=g) @ mix
    return x, y


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()  # pytorch-ood allocates its means with the default dtype
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("seed", range(3))
def test_matches_pytorch_ood_up_to_scale(seed, float64_default, same_ranking):
    # pytorch-ood 0.4.0 does not divide either scatter matrix by N (and adds a 1e-6 ridge):
    # its distances are ours / N, so ours = N * theirs and the rankings are identical. (The
    # ridge moves theirs by about 1e-6 / the smallest scatter eigenvalue, relatively.)
    x, y = make_data(seed)
    x = x.double()
    far = torch.randn(100, 6, generator=torch.Generator().manual_seed(9)) * 6
    probe = torch.cat([x[:100], far])
    theirs = RMD(None).fit_features(x, y).predict_features(probe)
    ours = RelativeMahalanobis().fit(x, y).score(probe)
    torch.testing.assert_close(ours, len(x) * theirs, rtol=1e-6, atol=1e-6)
    same_ranking(ours, theirs)  # to tolerance: the two sum in different orders


def test_matches_definition_with_sklearn_covariances():
    x, y = make_data(4)
    xd = x.double()
    means = torch.stack([xd[y == k].mean(0) for k in range(3)])
    shared = torch.from_numpy(EmpiricalCovariance(assume_centered=True).fit(
        (xd - means[y]).numpy()).precision_)
    background = EmpiricalCovariance().fit(xd.numpy())
    bg_mean, bg_precision = torch.from_numpy(background.location_), torch.from_numpy(
        background.precision_)
    probe = torch.randn(30, 6, dtype=torch.float64) * 4

    def sq(z, m, p):
        return (((z - m) @ p) * (z - m)).sum(1)

    expected = torch.stack([sq(probe, m, shared) for m in means], 1).min(1).values \
        - sq(probe, bg_mean, bg_precision)
    # min_k (d_k - d_0) = min_k d_k - d_0: the background term does not depend on k
    ours = RelativeMahalanobis().fit(xd, y).score(probe)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-8, atol=1e-8)


def test_ood_scores_higher(data, auroc):
    s = RelativeMahalanobis().fit(data.fit, data.fit_labels)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_unmatched_rows_ignored_and_state_round_trip(round_trip):
    x, y = make_data(5)
    y_bg = y.clone()
    y_bg[::5] = -1
    s = RelativeMahalanobis(num_classes=3).fit(x, y_bg)
    ref = RelativeMahalanobis().fit(x[y_bg >= 0], y[y_bg >= 0])
    assert torch.equal(s.score(x), ref.score(x))
    loaded = round_trip(s)
    assert torch.equal(loaded.score(x), s.score(x)) and loaded.feature_dim == 6


def test_errors():
    x, y = make_data(6)
    with pytest.raises(CertoodError, match="expected a fitted score, found an unfitted one"):
        RelativeMahalanobis().score(x)
    with pytest.raises(CertoodError, match="expected class labels .+, found None"):
        RelativeMahalanobis().fit(x)
    with pytest.raises(CertoodError, match="found all 400 labelled -1"):
        RelativeMahalanobis().fit(x, torch.full_like(y, -1))
    with pytest.raises(CertoodError, match="num_classes: expected an integer >= 1, found 0"):
        RelativeMahalanobis(num_classes=0)
    state = RelativeMahalanobis().fit(x, y).state_tensors()
    with pytest.raises(ArtifactError, match="expected means for 4 classes, found 3"):
        RelativeMahalanobis(num_classes=4).load_state_tensors(state)
    with pytest.raises(ArtifactError, match=r"expected state tensors means \[C, D\], factor"):
        RelativeMahalanobis().load_state_tensors({**state, "factor": state["factor"][:2]})


def test_docstring_examples():
    assert doctest.testmod(rmd_module).failed == 0
