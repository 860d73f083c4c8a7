"""Deep k-NN: parity with pytorch-ood 0.4.0's KNN (scikit-learn), chunking, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_ood.detector import KNN as PodKNN

import certood.scores.knn as knn_module
from certood.errors import CertoodError
from certood.scores import KNN
from certood.scores.knn import knn_score, l2_normalise


@pytest.mark.parametrize("k", [1, 5, 50])
def test_matches_pytorch_ood(k):
    g = torch.Generator().manual_seed(k)
    fit, probe = torch.randn(600, 16, generator=g), torch.randn(300, 16, generator=g) * 2
    y = torch.arange(600) % 3
    y[::10] = -1  # both leave unmatched rows out of the bank
    ref = PodKNN(None, k=k).fit_features(fit, y).predict_features(probe)
    ours = KNN(k=k).fit(fit, y).score(probe)
    # matrix-product distances in float32 against scikit-learn's: a few 1e-7 apart
    torch.testing.assert_close(ours.double(), ref.double(), rtol=0, atol=2e-6)


def test_chunks_give_the_same_result():
    g = torch.Generator().manual_seed(3)
    bank, probe = l2_normalise(torch.randn(200, 8, generator=g)), torch.randn(50, 8, generator=g)
    chunked, whole = knn_score(probe, bank, 7, chunk_rows=7), knn_score(probe, bank, 7)
    # chunks change the matrix products' shapes, so BLAS may sum in another order: the values
    # agree to float32 tolerance, not bit for bit (issue 13: AVX-512 with 2 threads)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    # and the k-th neighbour is the same row wherever its distance is clear of the next ones
    q = l2_normalise(probe)
    d_chunked = torch.cat([torch.cdist(c, bank, compute_mode="use_mm_for_euclid_dist")
                           for c in q.split(7)])
    d_whole = torch.cdist(q, bank, compute_mode="use_mm_for_euclid_dist")
    torch.testing.assert_close(d_chunked, d_whole, rtol=0, atol=1e-6)
    sorted_d, order = d_whole.sort(1)
    gap = torch.minimum(sorted_d[:, 6] - sorted_d[:, 5], sorted_d[:, 7] - sorted_d[:, 6])
    clear = gap > 1e-5
    assert int(clear.sum()) >= 40  # the check is not vacuous
    kth_chunked = d_chunked.kthvalue(7, dim=1).indices
    assert torch.equal(kth_chunked[clear], order[clear, 6])
    exact = torch.cdist(l2_normalise(probe).double(), bank.double()).sort(1).values[:, 6]
    torch.testing.assert_close(knn_score(probe, bank, 7).double(), exact, rtol=0, atol=1e-6)


def test_ood_scores_higher(data, auroc):
    s = KNN(k=10).fit(data.fit)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_scale_invariant_and_state_round_trip(round_trip):
    x = torch.randn(80, 5, generator=torch.Generator().manual_seed(4))
    s = KNN(k=3).fit(x)
    torch.testing.assert_close(s.score(x * 7), s.score(x))
    loaded = round_trip(s)
    assert torch.equal(loaded.score(x), s.score(x)) and loaded.params() == {"k": 3}
    assert s.score(x.double()).dtype == torch.float64


def test_errors():
    x = torch.randn(10, 4)
    with pytest.raises(CertoodError, match="knn: expected a fitted score, found an unfitted one"):
        KNN().score(x)
    with pytest.raises(CertoodError, match="knn.fit: expected at least k=50 fit rows, found 10"):
        KNN().fit(x)
    with pytest.raises(CertoodError, match="knn.k: expected an integer >= 1, found 0"):
        KNN(k=0)
    with pytest.raises(CertoodError, match="knn: expected a bank of at least k=20 rows, found 10"):
        KNN(k=20).load_state_tensors(KNN(k=5).fit(x).state_tensors())


def test_docstring_examples():
    assert doctest.testmod(knn_module).failed == 0
