"""Residual: parity with scikit-learn's PCA reconstruction error, fitted pieces, state, errors."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import safetensors.torch
import torch
from sklearn.decomposition import PCA

import certood.scores.residual as residual_module
from certood.errors import ArtifactError, CertoodError
from certood.scores.residual import Residual, fit_residual, residual_score


def make_data(seed=0, n=400, d=24):
    g = torch.Generator().manual_seed(seed)
    # correlated columns with spread-out variances, so the principal directions are well defined
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                            dtype=torch.float64)
    return x + 3.0, g


def round_trip(score):
    """Rebuild ``score`` from its params and its state tensors sent through safetensors bytes."""
    blob = safetensors.torch.save(score.state_tensors())
    return type(score)(**score.params()).load_state_tensors(safetensors.torch.load(blob))


@pytest.mark.parametrize(("seed", "n", "d", "dim"),
                         [(0, 400, 24, 5), (1, 400, 24, 20), (2, 300, 16, 1),
                          (3, 20, 50, 7), (4, 30, 30, 29)])  # N > D (scatter), N <= D (SVD)
def test_matches_sklearn_pca_reconstruction_error(seed, n, d, dim):
    x, g = make_data(seed, n, d)
    probe = torch.cat([x[:50], 5 * torch.randn(50, d, generator=g, dtype=torch.float64)])
    pca = PCA(n_components=dim, svd_solver="full").fit(x.numpy())
    rec = pca.inverse_transform(pca.transform(probe.numpy()))
    expected = torch.from_numpy(np.linalg.norm(probe.numpy() - rec, axis=1))
    ours = Residual(dim=dim).fit(x).score(probe)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-8)
    s = Residual(dim=dim).fit(x)
    torch.testing.assert_close(residual_score(probe, s.mean, s.basis), expected, rtol=0, atol=1e-8)


def test_fitted_pieces():
    x, _ = make_data(5)
    mean, basis = fit_residual(x, 6)
    assert mean.dtype == basis.dtype == torch.float64 and basis.shape == (6, 24)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(basis @ basis.T, torch.eye(6, dtype=torch.float64))
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    # same subspace as the 6 leading right singular vectors (signs may differ)
    torch.testing.assert_close(basis.T @ basis, vh[:6].T @ vh[:6], rtol=0, atol=1e-10)


def test_chunked_fit_equals_one_chunk():
    x, _ = make_data(6, n=500, d=12)
    m1, b1 = fit_residual(x, 4, chunk_rows=37)
    m2, b2 = fit_residual(x, 4, chunk_rows=10_000)
    torch.testing.assert_close(m1, m2, rtol=0, atol=1e-12)
    torch.testing.assert_close(b1.T @ b1, b2.T @ b2, rtol=0, atol=1e-10)


def test_zero_in_the_subspace():
    x, g = make_data(7)
    s = Residual(dim=5).fit(x)
    inside = s.mean + 10 * torch.randn(30, 5, generator=g, dtype=torch.float64) @ s.basis
    assert s.score(inside).abs().max() < 1e-10
    assert s.score(s.mean[None]).item() == 0.0
    # a step orthogonal to the subspace is scored by its length
    step = torch.randn(24, generator=g, dtype=torch.float64)
    step -= s.basis.T @ (s.basis @ step)
    torch.testing.assert_close(s.score(inside[:3] + step), step.norm().expand(3),
                               rtol=0, atol=1e-10)


def test_class_labels_are_ignored_and_unmatched_rows_dropped(data):
    labels = data.fit_labels.clone()
    assert torch.equal(Residual(dim=8).fit(data.fit, labels).score(data.id),
                       Residual(dim=8).fit(data.fit).score(data.id))
    labels[::3] = -1  # boxes matched to no ground-truth object: not ID references
    keep = labels >= 0
    assert torch.equal(Residual(dim=8).fit(data.fit, labels).score(data.id),
                       Residual(dim=8).fit(data.fit[keep]).score(data.id))


def test_ood_scores_higher(data, auroc):
    s = Residual(dim=8).fit(data.fit, data.fit_labels)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_params_and_state_round_trip(data):
    s = Residual(dim=8).fit(data.fit)
    assert s.params() == {"dim": 8} and Residual().params() == {"dim": 64}
    assert repr(s) == "Residual(dim=8)"
    assert not s.needs_classifier and not s.needs_head and s.needs_fit
    state = s.state_tensors()
    assert set(state) == {"mean", "basis"} == set(s.state_tensors_spec())
    assert state["mean"].shape == (32,) and state["basis"].shape == (8, 32)
    assert Residual().state_tensors() == {}
    loaded = round_trip(s)
    assert torch.equal(loaded.score(data.ood), s.score(data.ood))
    assert torch.equal(loaded.score(data.id.double()), s.score(data.id.double()))


def test_errors(data):
    with pytest.raises(CertoodError, match=r"residual: expected a fitted score, found an unfitted "
                                           r"one \(call fit\(features, labels\)"):
        Residual().score(data.id)
    with pytest.raises(CertoodError, match=r"residual.dim: expected dim < min\(N, D\) = 32 "
                                           r"\(800 fit boxes, 32 feature columns\), found 32"):
        Residual(dim=32).fit(data.fit)
    with pytest.raises(CertoodError, match=r"residual.dim: expected dim < min\(N, D\) = 10 "
                                           r"\(10 fit boxes, 32 feature columns\), found 64"):
        Residual().fit(data.fit[:10])
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(CertoodError, match="residual.dim: expected an integer >= 1"):
            Residual(dim=bad)
    s = Residual(dim=8).fit(data.fit)
    with pytest.raises(CertoodError, match="residual.score: expected features with D=32 columns "
                                           r"\(as fitted\), found 31"):
        s.score(data.id[:, 1:])
    with pytest.raises(CertoodError, match=r"expected features of shape \[N, D\], found \(32,\)"):
        s.score(data.id[0])
    state = s.state_tensors()
    with pytest.raises(ArtifactError, match=r"residual: expected a basis of 4 rows \(dim=4\), "
                                            "found 8"):
        Residual(dim=4).load_state_tensors(state)
    with pytest.raises(ArtifactError, match=r"residual: expected state tensors mean \[D\], "
                                            r"basis \[K, D\], found mean \[31\], basis \[8, 32\]"):
        Residual(dim=8).load_state_tensors({**state, "mean": state["mean"][1:]})
    with pytest.raises(ArtifactError, match=r"expected state tensors \['basis', 'mean'\], "
                                            r"found \['mean'\]"):
        Residual(dim=8).load_state_tensors({"mean": state["mean"]})
    with pytest.raises(ArtifactError, match="expected floating-point state tensors"):
        Residual(dim=8).load_state_tensors({**state, "basis": state["basis"].long()})


def test_docstring_examples():
    assert doctest.testmod(residual_module).failed == 0
