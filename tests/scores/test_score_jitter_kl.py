"""JitterKL: parity with scipy's KL divergence, invariances, direction, errors."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import safetensors.torch
import torch
from scipy.special import softmax
from scipy.stats import entropy

import certood.scores.jitter_kl as jitter_kl_module
from certood.errors import CertoodError
from certood.scores.jitter_kl import JitterKL, jitter_kl_score


def logits(seed=0, n=50, jitters=8, c=6, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, (jitters + 1) * c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("seed", "jitters", "c"), [(0, 8, 6), (1, 1, 2), (2, 4, 21),
                                                    (3, 12, 3)])
def test_matches_scipy_kl(seed, jitters, c):
    x = logits(seed, jitters=jitters, c=c)
    blocks = x.numpy().reshape(len(x), jitters + 1, c)
    p = softmax(blocks[:, :, 1:], axis=-1)  # foreground softmax per block
    expected = np.array([np.mean([entropy(row[0], row[k]) for k in range(1, jitters + 1)])
                         for row in p])
    ours = JitterKL(jitters=jitters).score(x)
    assert ours.dtype == torch.float64 and ours.shape == (len(x),)
    torch.testing.assert_close(ours, torch.from_numpy(expected), rtol=0, atol=1e-10)
    torch.testing.assert_close(jitter_kl_score(x, jitters), ours, rtol=0, atol=0)
    assert (ours >= 0).all()


def test_float32_in_float32_out_computed_in_float64():
    x = logits(4, scale=40.0)
    ours = JitterKL().score(x.float())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, JitterKL().score(x).float(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ours).all()


def test_zero_when_all_blocks_are_equal():
    block = torch.randn(7, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = block.repeat(1, 9)  # [7, 9 * 5]
    assert torch.equal(JitterKL().score(x), torch.zeros(7, dtype=torch.float64))


def test_invariant_to_a_constant_added_to_a_block():
    x = logits(6)
    shifted = x.clone().reshape(len(x), 9, 6)
    shifted += 10 * torch.randn(len(x), 9, 1, generator=torch.Generator().manual_seed(7),
                                dtype=torch.float64)  # one constant per (box, block)
    torch.testing.assert_close(JitterKL().score(shifted.reshape(len(x), -1)), JitterKL().score(x),
                               rtol=0, atol=1e-12)


def test_background_column_does_not_matter():
    x = logits(8)
    other = x.clone().reshape(len(x), 9, 6)
    other[:, :, 0] = 100 * torch.randn(len(x), 9, generator=torch.Generator().manual_seed(9),
                                       dtype=torch.float64)
    assert torch.equal(JitterKL().score(other.reshape(len(x), -1)), JitterKL().score(x))


def test_unstable_predictions_score_higher(auroc):
    g = torch.Generator().manual_seed(10)
    c, k = 6, 8
    own = torch.randn(200, 1, c, generator=g) * 3
    stable = own + 0.1 * torch.randn(200, k + 1, c, generator=g)  # ID: same class under jitter
    unstable = own + 2.0 * torch.randn(200, k + 1, c, generator=g)  # unknown: it moves around
    s = JitterKL(jitters=k)
    id_scores, ood_scores = s.score(stable.reshape(200, -1)), s.score(unstable.reshape(200, -1))
    assert auroc(id_scores, ood_scores) > 0.95


def test_needs_no_fit_and_keeps_no_state():
    s = JitterKL(jitters=3)
    assert not s.needs_fit and not s.needs_classifier and not s.needs_head and s.is_fitted
    assert s.kind == "jitter_kl" and s.params() == {"jitters": 3}
    assert repr(s) == "JitterKL(jitters=3)"
    assert JitterKL().params() == {"jitters": 8}
    assert s.fit(torch.randn(4, 12)) is s and s.state_tensors() == {}
    x = logits(11, jitters=3, c=4).float()
    blob = safetensors.torch.save(s.state_tensors())
    loaded = JitterKL(**s.params()).load_state_tensors(safetensors.torch.load(blob))
    assert torch.equal(loaded.score(x), s.score(x))


def test_errors():
    msg = r"expected \(jitters\+1\)\*C = 9\*C columns with C >= 2 class logits per block"
    with pytest.raises(CertoodError, match=f"jitter_kl.score: {msg} .*found 256 columns"):
        JitterKL().score(torch.zeros(3, 256))
    with pytest.raises(CertoodError, match=f"jitter_kl.score: {msg} .*found 9 columns"):
        JitterKL().score(torch.zeros(3, 9))  # C = 1: no foreground class to compare
    with pytest.raises(CertoodError, match=f"jitter_kl.fit: {msg} .*found 10 columns"):
        JitterKL().fit(torch.zeros(3, 10))
    with pytest.raises(CertoodError, match=f"jitter_kl: {msg} .*found 7 columns"):
        jitter_kl_score(torch.zeros(3, 7), 8)
    with pytest.raises(CertoodError, match=r"expected features of shape \[N, D\], found \(18,\)"):
        JitterKL().score(torch.zeros(18))
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(CertoodError, match="jitter_kl.jitters: expected an integer >= 1"):
            JitterKL(jitters=bad)


def test_docstring_examples():
    assert doctest.testmod(jitter_kl_module).failed == 0
