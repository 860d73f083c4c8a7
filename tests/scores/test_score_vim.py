"""ViM: parity with pytorch-ood 0.4.0's ViM, the fitted pieces, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_ood.detector import ViM as PodViM

import certood.scores.vim as vim_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import ViM


def make_data(seed=0, n=500, d=24, c=5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)).relu()
    return x, torch.randn(c, d, generator=g) * 0.3, torch.randn(c, generator=g), g


@pytest.mark.parametrize(("seed", "dim"), [(0, 12), (1, 4), (2, 20)])
def test_matches_pytorch_ood(seed, dim):
    x, w, b, g = make_data(seed)
    probe = torch.cat([x[:100], torch.randn(100, 24, generator=g).abs() * 3])
    theirs = PodViM(None, d=dim, w=w, b=b).fit_features(x, torch.zeros(len(x))).predict_features(
        probe)
    ours = ViM(dim=dim).fit(x, classifier=(w, b)).score(probe)
    # ours fits in float64, pytorch-ood in float32: equal to float32 precision
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_fitted_pieces():
    x, w, b, _ = make_data(3)
    s = ViM(dim=10).fit(x, classifier=(w, b))
    xd, wd, bd = x.double(), w.double(), b.double()
    torch.testing.assert_close(s.origin @ wd.T + bd, torch.zeros(5, dtype=torch.float64),
                               atol=1e-10, rtol=0)  # the classifier maps the origin to 0 logits
    r = s.residual_basis
    assert r.shape == (24, 14)
    torch.testing.assert_close(r.T @ r, torch.eye(14, dtype=torch.float64))
    centred = xd - s.origin
    vals, vecs = torch.linalg.eigh(centred.T @ centred / len(x))
    torch.testing.assert_close(r.T @ vecs[:, -10:], torch.zeros(14, 10, dtype=torch.float64),
                               atol=1e-10, rtol=0)  # orthogonal to the 10 leading directions
    alpha = (xd @ wd.T + bd).max(1).values.mean() / (centred @ r).norm(dim=1).mean()
    torch.testing.assert_close(s.alpha, alpha.reshape(1))
    probe = x[:7]
    expected = alpha * ((probe.double() - s.origin) @ r).norm(dim=1) - torch.logsumexp(
        probe.double() @ wd.T + bd, 1)
    torch.testing.assert_close(s.score(probe.double()), expected)


def test_default_dim_is_half_the_width(data):
    s = ViM().fit(data.fit, classifier=data.classifier)
    assert s.params() == {"dim": None} and s.residual_basis.shape == (32, 16)


def test_ood_scores_higher(data, auroc):
    s = ViM(dim=8).fit(data.fit, data.fit_labels, classifier=data.classifier)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_state_round_trip(round_trip, data):
    s = ViM(dim=8).fit(data.fit, classifier=data.classifier)
    loaded = round_trip(s)
    assert torch.equal(loaded.score(data.ood), s.score(data.ood))
    assert torch.equal(loaded.weight, data.weight)  # the classifier travels with the state


def test_errors(data):
    with pytest.raises(CertoodError, match="vim: expected a fitted score, found an unfitted one "
                                           r"\(call fit\(features, labels, classifier=\(W, b\)\)"):
        ViM().score(data.id)
    with pytest.raises(CertoodError, match=r"vim.fit: expected classifier=\(W \[C, 32\], b \[C\]\)"
                                           r" .+, found None"):
        ViM().fit(data.fit)
    with pytest.raises(CertoodError, match=r"found W \(4, 31\) and b \(4,\)"):
        ViM().fit(data.fit, classifier=(data.weight[:, 1:], data.bias))
    with pytest.raises(CertoodError, match=r"vim.dim: expected a principal dimension in \[1, 31\]"
                                           " for 32-dim features, found 32"):
        ViM(dim=32).fit(data.fit, classifier=data.classifier)
    state = ViM(dim=8).fit(data.fit, classifier=data.classifier).state_tensors()
    with pytest.raises(ArtifactError, match="expected a residual basis of 28 columns"):
        ViM(dim=4).load_state_tensors(state)
    with pytest.raises(ArtifactError, match=r"expected state tensors weight \[C, D\]"):
        ViM().load_state_tensors({**state, "bias": state["bias"][:2]})


def test_docstring_examples():
    assert doctest.testmod(vim_module).failed == 0
