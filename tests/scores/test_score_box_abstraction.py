"""Box abstraction: k-means vs scikit-learn, boxes and distances by hand, state, errors."""
from __future__ import annotations

import doctest

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import certood.scores.box_abstraction as box_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import BoxAbstraction
from certood.scores.box_abstraction import box_distances, kmeans


def blobs(seed=0, n=300, d=5, k=3, spread=10.0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(n) % k
    return (torch.randn(k, d, generator=g) * spread)[truth] + torch.randn(n, d, generator=g), truth


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_recovers_blobs_like_sklearn(seed):
    x, truth = blobs(seed)
    assign = kmeans(x, 3, seed=seed)
    assert adjusted_rand_score(truth.numpy(), assign.numpy()) == 1.0
    assert torch.equal(assign, kmeans(x, 3, seed=seed))  # deterministic
    ref = KMeans(3, n_init=10, random_state=0).fit(x.double().numpy())
    centres = torch.stack([x[assign == j].double().mean(0) for j in range(3)])
    inertia = ((x.double() - centres[assign]) ** 2).sum().item()
    assert inertia == pytest.approx(ref.inertia_, rel=1e-6)


def test_kmeans_with_fewer_distinct_rows_than_k():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assign = kmeans(x, 5)
    assert assign.tolist() in ([0, 0, 1], [1, 1, 0])


def test_boxes_cover_their_clusters():
    x, truth = blobs(1)
    s = BoxAbstraction(k=2, gamma=0.0).fit(x, truth)
    assert s.lower.shape == (6, 5) and s.box_class.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(s.score(x), torch.zeros(len(x)))  # every fit box lies in a box
    for c in range(3):  # each class's boxes are the min/max of its k-means clusters
        rows = x[truth == c]
        assign = kmeans(rows, 2, seed=0)
        for j, box in enumerate((s.box_class == c).nonzero().flatten().tolist()):
            assert torch.equal(s.lower[box], rows[assign == j].min(0).values)
            assert torch.equal(s.upper[box], rows[assign == j].max(0).values)


def test_distances_by_hand_and_gamma():
    lower, upper = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    probe = torch.tensor([[0.5, 1.0], [3.0, 1.0], [-3.0, 6.0], [1.0, 2.0]])
    assert box_distances(probe, lower, upper, "linf")[:, 0].tolist() == [0.0, 2.0, 4.0, 0.0]
    assert box_distances(probe, lower, upper, "l2")[:, 0].tolist() == [0.0, 2.0, 5.0, 0.0]
    s = BoxAbstraction(k=1, gamma=0.5).fit(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    assert s.lower.tolist() == [[-0.5, -1.0]] and s.upper.tolist() == [[1.5, 3.0]]
    assert s.score(probe).tolist() == [0.0, 1.5, 3.0, 0.0]  # L-inf: max(2.5, 3)


def test_nearest_box_over_all_classes():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0], [11.0, 11.0]])
    s = BoxAbstraction(k=1).fit(x, torch.tensor([0, 0, 1, 1]))
    probe = torch.tensor([[2.0, 1.0], [9.0, 10.0], [5.0, 5.0]])
    assert s.score(probe).tolist() == [1.0, 1.0, 4.0]
    assert s.nearest_class(probe).tolist() == [0, 1, 0]


def test_ood_scores_higher(data, auroc):
    s = BoxAbstraction().fit(data.fit, data.fit_labels)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9


def test_state_round_trip(round_trip, data):
    s = BoxAbstraction(k=2, gamma=0.1, norm="l2", seed=3).fit(data.fit, data.fit_labels)
    loaded = round_trip(s)
    assert torch.equal(loaded.score(data.ood), s.score(data.ood))
    assert torch.equal(loaded.nearest_class(data.ood), s.nearest_class(data.ood))


def test_errors(data):
    with pytest.raises(CertoodError, match="box_abstraction: expected a fitted score"):
        BoxAbstraction().score(data.id)
    with pytest.raises(CertoodError, match="box_abstraction: expected a fitted score"):
        BoxAbstraction().nearest_class(data.id)
    with pytest.raises(CertoodError, match="box_abstraction.norm: expected one of linf, l2, "
                                           "found 'l1'"):
        BoxAbstraction(norm="l1")
    with pytest.raises(CertoodError, match="box_abstraction.k: expected an integer >= 1, found 0"):
        BoxAbstraction(k=0)
    with pytest.raises(CertoodError, match="box_abstraction.gamma: expected a number >= 0"):
        BoxAbstraction(gamma=-0.1)
    state = BoxAbstraction().fit(data.fit).state_tensors()
    with pytest.raises(ArtifactError, match=r"expected state tensors lower \[B, D\], upper"):
        BoxAbstraction().load_state_tensors({**state, "upper": state["upper"][:, :3]})


def test_docstring_examples():
    assert doctest.testmod(box_module).failed == 0
