"""LaREM: Ledoit-Wolf/shrunk covariances vs scikit-learn, definition, pytorch-ood parity for
one class, state, errors."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from pytorch_ood.detector import Mahalanobis as PodMahalanobis
from sklearn.covariance import LedoitWolf, ShrunkCovariance

import certood.scores.larem as larem_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import LaREM
from certood.scores.larem import ledoit_wolf_shrinkage, shrunk_covariance


def make_data(seed=0, n=300, d=6, c=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    mixes = torch.eye(d) + 0.5 * torch.randn(c, d, d, generator=g)  # a covariance per class
    x = (torch.randn(c, d, generator=g) * 3)[y] + torch.einsum(
        "nd,nde->ne", torch.randn(n, d, generator=g), mixes[y])
    return x, y


@pytest.mark.parametrize("seed", range(3))
def test_ledoit_wolf_matches_sklearn(seed):
    x, _ = make_data(seed, n=40, d=12)  # few rows per dimension: real shrinkage
    ref = LedoitWolf().fit(x.double().numpy())
    np.testing.assert_allclose(shrunk_covariance(x).numpy(), ref.covariance_, rtol=1e-10,
                               atol=1e-12)
    centred = x.double() - x.double().mean(0)
    assert ledoit_wolf_shrinkage(centred).item() == pytest.approx(ref.shrinkage_, rel=1e-10)


def test_fixed_shrinkage_matches_sklearn():
    x, _ = make_data(3)
    ref = ShrunkCovariance(shrinkage=0.3).fit(x.double().numpy()).covariance_
    np.testing.assert_allclose(shrunk_covariance(x, 0.3).numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", 0.0, 0.2])
def test_score_matches_definition(shrinkage):
    x, y = make_data(4)
    probe = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 5
    expected = []
    for c in range(3):
        rows = x[y == c].double().numpy()
        est = LedoitWolf() if shrinkage == "ledoit_wolf" else ShrunkCovariance(shrinkage=shrinkage)
        est.fit(rows)
        diff = probe.numpy() - rows.mean(0)
        expected.append(((diff @ np.linalg.inv(est.covariance_)) * diff).sum(1))
    ours = LaREM(shrinkage=shrinkage).fit(x, y).score(probe)
    np.testing.assert_allclose(ours.numpy(), np.min(expected, axis=0), rtol=1e-8)


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()  # pytorch-ood allocates its means with the default dtype
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_one_class_without_shrinkage_matches_pytorch_ood(float64_default, same_ranking):
    # With one class the shared and the per-class covariance coincide. pytorch-ood 0.4.0's
    # Mahalanobis does not divide its scatter by N (plus a 1e-6 ridge) and halves the distance:
    # ours = 2 N * theirs, identical ranking.
    x, _ = make_data(5)
    x = x.double()
    y = torch.zeros(len(x), dtype=torch.long)
    probe = torch.randn(100, 6, generator=torch.Generator().manual_seed(2)) * 6
    theirs = PodMahalanobis(None).fit_features(x, y).predict_features(probe)
    ours = LaREM(shrinkage=0.0).fit(x, y).score(probe)
    torch.testing.assert_close(ours, 2 * len(x) * theirs, rtol=1e-7, atol=0)
    same_ranking(ours, theirs)  # to tolerance: the two sum in different orders


def test_ood_scores_higher(data, auroc):
    s = LaREM().fit(data.fit, data.fit_labels)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_small_classes_left_out_and_state_round_trip(round_trip):
    x, y = make_data(6)
    y = y.clone()
    y[y == 1] = -1
    y[0] = 1  # class 1 has a single box: left out
    with pytest.warns(UserWarning, match=r"classes \[1\] have fewer than 2 samples"):
        s = LaREM(num_classes=3).fit(x, y)
    assert torch.isnan(s.means[1]).all() and torch.isfinite(s.score(x)).all()
    loaded = round_trip(s)
    assert torch.equal(loaded.score(x), s.score(x)) and loaded.feature_dim == 6


def test_singular_class_gets_a_floor():
    x, y = make_data(7, n=12, d=8, c=2)  # 6 boxes per class in 8 dimensions
    scores = LaREM(shrinkage=0.0).fit(x, y).score(x)
    assert torch.isfinite(scores).all() and scores.max() < 100  # fit points are near


def test_errors():
    x, y = make_data(8)
    with pytest.raises(CertoodError, match="larem: expected a fitted score"):
        LaREM().score(x)
    with pytest.raises(CertoodError, match="larem.fit: expected class labels .+, found None"):
        LaREM().fit(x)
    with pytest.raises(CertoodError, match=r"larem.fit: expected labels in \[0, 2\), found \[2\]"):
        LaREM(num_classes=2).fit(x, y)
    with pytest.raises(CertoodError, match="larem.shrinkage: expected 'ledoit_wolf' or a number"):
        LaREM(shrinkage="oas")
    with pytest.raises(CertoodError, match="larem.shrinkage: expected a number >= 0 and <= 1"):
        LaREM(shrinkage=1.5)
    with pytest.warns(UserWarning), pytest.raises(CertoodError, match="expected a class with at "
                                                                      "least 2 boxes, found none"):
        LaREM().fit(x[:1], y[:1])
    state = LaREM().fit(x, y).state_tensors()
    with pytest.raises(ArtifactError, match="expected means for 4 classes, found 3"):
        LaREM(num_classes=4).load_state_tensors(state)
    with pytest.raises(ArtifactError, match=r"factors \[C, D, D\]"):
        LaREM().load_state_tensors({**state, "factors": state["factors"][:, :2]})


def test_docstring_examples():
    assert doctest.testmod(larem_module).failed == 0
