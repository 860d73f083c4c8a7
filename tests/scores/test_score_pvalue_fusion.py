"""pvalue_fusion: p-values and their combination against scipy, ID calibration per class,
cross-fitted references, OOD ranking, state round trip and parameter errors."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from scipy import stats

import certood.scores.pvalue_fusion as module
from certood.errors import CertoodError
from certood.scores import PValueFusion, build_score
from certood.scores.pvalue_fusion import combine_pvalues, empirical_pvalues


def test_docstring_examples():
    assert doctest.testmod(module).failed == 0


def test_empirical_pvalues_count_the_reference_at_or_above():
    g = torch.Generator().manual_seed(0)
    ref, values = torch.randn(200, generator=g), torch.randn(50, generator=g)
    values[:3] = ref[:3]  # ties count as "at or above"
    expected = [(1 + int((ref >= v).sum())) / 201 for v in values]
    torch.testing.assert_close(empirical_pvalues(values, ref), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("method", ["fisher", "stouffer"])
def test_combination_matches_scipy(method):
    p = torch.rand(20, 3, generator=torch.Generator().manual_seed(1)).clamp(min=1e-4)
    expected = [stats.combine_pvalues(row.numpy(), method=method).statistic for row in p.double()]
    np.testing.assert_allclose(combine_pvalues(p, method).numpy(), expected, rtol=1e-6)


def test_min_combination_and_unknown_method():
    p = torch.tensor([[0.2, 0.05], [0.5, 0.9]])
    np.testing.assert_allclose(combine_pvalues(p, "min").numpy(), -np.log([0.05, 0.5]), rtol=1e-6)
    with pytest.raises(CertoodError, match="expected one of fisher, stouffer, min, hmp, found 'sum'"):
        combine_pvalues(p, "sum")


def _two_class_data(seed: int, n: int):
    """Class 0 spread wide, class 1 narrow; the classifier reads the class off unit 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) * torch.where(y == 0, 3.0, 0.5).unsqueeze(1)
    x[:, 0] = torch.where(y == 0, -6.0, 6.0) + 0.3 * torch.randn(n, generator=g)
    weight = torch.zeros(2, 8)
    weight[0, 0], weight[1, 0] = -1.0, 1.0
    return x, y, (weight, torch.zeros(2))


def test_class_conditional_pvalues_equalise_false_alarms_across_classes():
    x, y, clf = _two_class_data(0, 3000)
    fresh, fresh_y, _ = _two_class_data(1, 4000)
    rates = {}
    for cc in (True, False):
        s = PValueFusion(components=["mahalanobis"], class_conditional=cc).fit(x, y, classifier=clf)
        flagged = s.pvalues(fresh)[:, 0] <= 0.05
        rates[cc] = [float(flagged[fresh_y == c].float().mean()) for c in (0, 1)]
    # per predicted class, about 5% of fresh ID boxes fall at p <= 0.05 ...
    assert all(0.03 <= r <= 0.075 for r in rates[True]), rates
    # ... while a pooled reference piles the false alarms onto the wide class
    assert rates[False][0] > 0.08 and rates[False][1] < 0.01, rates


def test_cross_fitted_reference_is_not_shrunk_by_overfitting():
    # 64 dims, 300 boxes: in-sample Mahalanobis distances are clearly smaller than fresh ones
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 64, generator=g), torch.arange(300) % 3
    clf = (torch.randn(3, 64, generator=g), torch.zeros(3))
    s = PValueFusion(components=["mahalanobis"], class_conditional=False).fit(x, y, classifier=clf)
    fresh = torch.randn(2000, 64, generator=g)
    p = s.pvalues(fresh)[:, 0]
    # out-of-fold reference: fresh ID boxes are not pushed to tiny p-values (conservative if anything)
    assert float((p <= 0.05).float().mean()) <= 0.08
    in_sample = s._components(x, s.parts)[0][:, 0]
    assert float(in_sample.mean()) < 0.8 * float(s.ref_scores[:, 0].mean())


def test_ranks_far_ood_above_id(data, auroc):
    s = PValueFusion().fit(data.fit, data.fit_labels, classifier=data.classifier)
    assert auroc(s.score(data.id), s.score(data.ood)) > 0.99


@pytest.mark.parametrize("components", [["energy", "mahalanobis"], ["knn", "residual"],
                                        ["energy", "mahalanobis", "knn", "residual"]])
def test_state_round_trip(data, round_trip, components):
    s = PValueFusion(components=components, combine="stouffer", min_class_boxes=20)
    s.fit(data.fit, data.fit_labels, classifier=data.classifier)
    rebuilt = round_trip(s)
    assert torch.equal(rebuilt.score(data.ood), s.score(data.ood))
    assert rebuilt.params() == s.params() and rebuilt.params()["components"] == components


def test_small_classes_fall_back_to_the_pooled_reference(data):
    kwargs = dict(components=["energy", "mahalanobis"])
    big = PValueFusion(min_class_boxes=10_000, **kwargs).fit(data.fit, data.fit_labels, classifier=data.classifier)
    pooled = PValueFusion(class_conditional=False, **kwargs).fit(data.fit, data.fit_labels,
                                                                 classifier=data.classifier)
    assert torch.equal(big.score(data.id), pooled.score(data.id))
    cc = PValueFusion(**kwargs).fit(data.fit, data.fit_labels, classifier=data.classifier)
    assert not torch.equal(cc.score(data.id), pooled.score(data.id))


def test_unmatched_rows_are_left_out_of_the_fit(data):
    labels = data.fit_labels.clone()
    labels[::5] = -1
    a = PValueFusion().fit(data.fit, labels, classifier=data.classifier)
    b = PValueFusion().fit(data.fit[labels >= 0], labels[labels >= 0], classifier=data.classifier)
    assert torch.equal(a.score(data.id), b.score(data.id))


@pytest.mark.parametrize("params, message", [
    ({"components": []}, "non-empty list of distinct names"),
    ({"components": ["energy", "energy"]}, "non-empty list of distinct names"),
    ({"components": ["logits"]}, "among energy, mahalanobis, knn, residual, found"),
    ({"combine": "mean"}, "expected one of fisher, stouffer, min"),
    ({"folds": 1}, "folds: expected an integer >= 2"),
    ({"class_conditional": "yes"}, "expected true or false"),
])
def test_bad_parameters_say_what_was_expected(params, message):
    with pytest.raises(CertoodError, match=message):
        build_score("pvalue_fusion", params)


def test_fit_needs_labels_and_enough_rows(data):
    with pytest.raises(CertoodError, match="expected class labels"):
        PValueFusion().fit(data.fit, classifier=data.classifier)
    with pytest.raises(CertoodError, match="expected at least 10 labelled rows \\(5 folds\\)"):
        PValueFusion().fit(data.fit[:3], data.fit_labels[:3], classifier=data.classifier)
