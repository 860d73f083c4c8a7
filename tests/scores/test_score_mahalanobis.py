"""Mahalanobis score: pytorch-ood 0.4.0 parity, sklearn covariance, state round trip."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import safetensors.torch
import torch
from pytorch_ood.detector import Mahalanobis as PodMahalanobis
from sklearn.covariance import EmpiricalCovariance

import certood.scores.mahalanobis as maha_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import Mahalanobis, fit_class_gaussians, mahalanobis_score


def make_data(seed=0, n=400, d=6, c=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centres = torch.randn(c, d, generator=g) * 3
    mix = torch.randn(d, d, generator=g)  # correlated, non-isotropic noise
    x = centres[y] + torch.randn(n, d, generator=g) @ mix
    return x, y


def direct_score(x, means, precision):
    """The definition, class by class, in float64."""
    x, means, precision = x.double(), means.double(), precision.double()
    return torch.stack([(((x - m) @ precision) * (x - m)).sum(1) for m in means], 1).min(1).values


def test_fit_matches_sklearn_empirical_covariance():
    x, y = make_data()
    means, precision = fit_class_gaussians(x, y, 3)
    assert means.dtype == precision.dtype == torch.float64
    ref_means = torch.stack([x[y == k].double().mean(0) for k in range(3)])
    torch.testing.assert_close(means, ref_means)
    centred = (x.double() - ref_means[y]).numpy()
    ref = EmpiricalCovariance(assume_centered=True).fit(centred)
    np.testing.assert_allclose(precision.numpy(), ref.precision_, rtol=1e-9, atol=1e-12)
    covariance = torch.linalg.pinv(precision).numpy()
    np.testing.assert_allclose(covariance, ref.covariance_, rtol=1e-9, atol=1e-12)


def test_score_matches_definition():
    x, y = make_data(1)
    means, precision = fit_class_gaussians(x, y, 3)
    probe = torch.randn(50, 6, generator=torch.Generator().manual_seed(9)) * 4
    torch.testing.assert_close(mahalanobis_score(probe, means, precision),
                               direct_score(probe, means, precision), rtol=1e-10, atol=1e-10)


@pytest.fixture
def float64_default():
    # pytorch-ood allocates its means and covariance with the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("seed", range(3))
def test_matches_pytorch_ood_up_to_scale_with_identical_ranking(seed, float64_default, same_ranking):
    # pytorch-ood 0.4.0: covariance = unnormalised scatter + 1e-6 I, score = 0.5 * distance.
    # Ours divides the scatter by N and drops the half: ours = 2 N * theirs (up to the ridge).
    x, y = make_data(seed)
    x = x.double()
    far = torch.randn(100, 6, generator=torch.Generator().manual_seed(seed)) * 6
    probe = torch.cat([x[:100], far])
    theirs = PodMahalanobis(None).fit_features(x, y).predict_features(probe)
    ours = Mahalanobis().fit(x, y).score(probe)
    torch.testing.assert_close(ours, 2 * len(x) * theirs, rtol=1e-7, atol=0)
    same_ranking(ours, theirs)  # to tolerance: the two sum in different orders


def test_matches_pytorch_ood_in_float32():
    x, y = make_data(7)  # pytorch-ood inverts in float32: agreement to its precision
    theirs = PodMahalanobis(None).fit_features(x, y).predict_features(x)
    ours = Mahalanobis().fit(x, y).score(x)
    torch.testing.assert_close(ours, 2 * len(x) * theirs, rtol=1e-3, atol=1e-3)


def test_absent_class_is_reported_and_ignored():
    x, y = make_data(2)
    y = torch.where(y == 1, torch.tensor(3), y)  # classes 0, 2, 3 present; 1 absent
    with pytest.warns(UserWarning, match=r"classes \[1\] have no samples"):
        m = Mahalanobis(num_classes=4).fit(x, y)
    assert m.missing_classes == [1] and torch.isnan(m.means[1]).all()
    scores = m.score(x)
    assert torch.isfinite(scores).all()
    # same as fitting on the three present classes relabelled 0, 1, 2
    relabelled = torch.tensor([0, 9, 1, 2])[y]
    torch.testing.assert_close(scores, Mahalanobis().fit(x, relabelled).score(x))


def test_unmatched_rows_are_ignored_and_num_classes_inferred():
    x, y = make_data(3)
    y_with_bg = y.clone()
    y_with_bg[::7] = -1
    m = Mahalanobis().fit(x, y_with_bg)
    ref = Mahalanobis().fit(x[y_with_bg >= 0], y[y_with_bg >= 0])
    assert m.means.shape == (3, 6) and m.params() == {"num_classes": None}
    assert torch.equal(m.score(x), ref.score(x))


def test_singular_covariance_uses_pseudo_inverse():
    x, y = make_data(4, n=5, d=8, c=1)  # fewer boxes than dimensions
    scores = Mahalanobis().fit(x, y).score(x)
    assert torch.isfinite(scores).all()
    assert scores.max() < 10  # the fitted points themselves are not far


def test_state_round_trip_through_safetensors():
    x, y = make_data(5)
    m = Mahalanobis(num_classes=3).fit(x, y)
    blob = safetensors.torch.save(m.state_tensors())
    loaded = Mahalanobis(num_classes=3).load_state_tensors(safetensors.torch.load(blob))
    probe = torch.randn(40, 6)
    assert torch.equal(loaded.score(probe), m.score(probe))
    assert loaded.feature_dim == 6 and loaded.missing_classes == []


def test_errors_name_expected_and_found():
    x, y = make_data(6)
    with pytest.raises(CertoodError, match="expected a fitted score, found an unfitted one"):
        Mahalanobis().score(x)
    m = Mahalanobis().fit(x, y)
    with pytest.raises(CertoodError, match="expected features with D=6 columns .+, found 5"):
        m.score(x[:, :5])
    with pytest.raises(CertoodError, match="expected class labels .+, found None"):
        Mahalanobis().fit(x)
    with pytest.raises(CertoodError, match=r"expected labels of shape \[400\]"):
        Mahalanobis().fit(x, y[:10])
    with pytest.raises(CertoodError, match="expected integer class labels, found torch.float32"):
        Mahalanobis().fit(x, y.float())
    with pytest.raises(CertoodError, match=r"expected labels in \[0, 2\), found \[2\]"):
        Mahalanobis(num_classes=2).fit(x, y)
    with pytest.raises(CertoodError, match=r"expected labels >= -1 \(-1 = unmatched\), found -2"):
        Mahalanobis().fit(x, y - 2)
    means, precision = fit_class_gaussians(x, y, 3)
    with pytest.raises(CertoodError, match=r"expected means \[C, 5\] and precision \[5, 5\]"):
        mahalanobis_score(x[:, :5], means, precision)
    with pytest.raises(CertoodError, match="found all 400 labelled -1"):
        Mahalanobis().fit(x, torch.full_like(y, -1))
    with pytest.raises(CertoodError, match="num_classes: expected a positive integer or null"):
        Mahalanobis(num_classes=0)
    state = m.state_tensors()
    with pytest.raises(ArtifactError, match=r"expected state tensors \['class_counts', 'means',"):
        Mahalanobis().load_state_tensors({"means": state["means"]})
    with pytest.raises(ArtifactError, match="expected means for 5 classes, found 3"):
        Mahalanobis(num_classes=5).load_state_tensors(state)
    with pytest.raises(ArtifactError, match=r"precision \[D, D\]"):
        Mahalanobis().load_state_tensors({**state, "precision": state["precision"][:2]})


def test_docstring_examples():
    assert doctest.testmod(maha_module).failed == 0
