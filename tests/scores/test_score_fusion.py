"""fusion: p-values against the reference of the box's class and size bin (brute force in numpy),
the fallbacks, what size conditioning buys when size is a nuisance, state and parameter errors."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import certood.scores.fusion as module
from certood.errors import CertoodError
from certood.scores import build_score
from certood.scores.fusion import Fusion


def test_docstring_examples():
    assert doctest.testmod(module).failed == 0


def _rows(values: torch.Tensor, sizes: torch.Tensor, classes: torch.Tensor, n_classes: int = 3) -> torch.Tensor:
    logits = torch.nn.functional.one_hot(classes, n_classes).double() * 5.0
    return torch.cat([values.double(), sizes.double()[:, None], logits], dim=1)


def _reference(seed: int = 0, n: int = 400):
    g = torch.Generator().manual_seed(seed)
    classes = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(90, dtype=torch.long),
                         torch.full((n - 390,), 2)])  # class 2: too few rows for its own reference
    return torch.randn(n, 2, generator=g), 10 + 40 * torch.rand(n, generator=g), classes


def _brute_force(query, q_sizes, q_classes, ref, r_sizes, r_classes, bins: int, min_boxes: int) -> np.ndarray:
    edges = np.quantile(r_sizes.numpy(), np.arange(1, bins) / bins)
    q_bin, r_bin = np.digitize(q_sizes.numpy(), edges), np.digitize(r_sizes.numpy(), edges)
    out = np.empty(query.shape)
    for i in range(len(query)):
        cell = (r_classes.numpy() == int(q_classes[i])) & (r_bin == q_bin[i])
        klass = r_classes.numpy() == int(q_classes[i])
        use = cell if cell.sum() >= min_boxes else klass if klass.sum() >= min_boxes else np.ones(len(ref), bool)
        for k in range(query.shape[1]):
            out[i, k] = (1 + np.sum(ref.numpy()[use, k] >= query[i, k].item())) / (1 + use.sum())
    return out


@pytest.mark.parametrize("bins", [1, 2, 3, 5])
def test_pvalues_use_the_class_and_size_bin_reference_then_fall_back(bins):
    ref, r_sizes, r_classes = _reference()
    g = torch.Generator().manual_seed(1)
    query, q_sizes = torch.randn(60, 2, generator=g), 5 + 50 * torch.rand(60, generator=g)
    q_classes = torch.arange(60) % 3
    f = Fusion(of=("a", "b"), min_class_boxes=40, size_bins=bins).fit(_rows(ref, r_sizes, r_classes))
    got = f.pvalues(_rows(query, q_sizes, q_classes)).numpy()
    np.testing.assert_allclose(got, _brute_force(query, q_sizes, q_classes, ref, r_sizes, r_classes, bins, 40))


def test_one_bin_ignores_the_box_size():
    ref, r_sizes, r_classes = _reference()
    f = Fusion(of=("a", "b"), min_class_boxes=40).fit(_rows(ref, r_sizes, r_classes))
    query, classes = torch.randn(30, 2, generator=torch.Generator().manual_seed(2)), torch.arange(30) % 3
    small, large = f.score(_rows(query, torch.full((30,), 1.0), classes)), f.score(_rows(query, torch.full((30,), 99.0), classes))
    torch.testing.assert_close(small, large)


def test_size_bins_without_classes_condition_on_size_alone():
    ref, r_sizes, r_classes = _reference()
    f = Fusion(of=("a", "b"), class_conditional=False, min_class_boxes=40, size_bins=3)
    f.fit(_rows(ref, r_sizes, r_classes))
    query, q_sizes = torch.randn(20, 2, generator=torch.Generator().manual_seed(3)), torch.linspace(5, 60, 20)
    same_class = torch.zeros(20, dtype=torch.long)
    expected = _brute_force(query, q_sizes, same_class, ref, r_sizes, torch.zeros(len(ref), dtype=torch.long), 3, 40)
    np.testing.assert_allclose(f.pvalues(_rows(query, q_sizes, torch.arange(20) % 3)).numpy(), expected)


def test_conditioning_on_size_separates_better_when_size_is_a_nuisance():
    """ID evidence drifts with box size (small boxes look more OOD); unknown boxes add a shift
    of the size of that drift. Within a size bin the shift stands out; pooled over sizes it is
    buried: the size-conditional fusion must rank clearly better (AUROC, sklearn)."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(4)

    def boxes(n: int, shift: float):
        sizes = 10 + 50 * torch.rand(n, generator=g)
        values = (60 - sizes)[:, None] / 10 + torch.randn(n, 2, generator=g) * 0.5 + shift
        return values, sizes

    classes = torch.zeros(1500, dtype=torch.long)
    ref_v, ref_s = boxes(1500, 0.0)
    id_v, id_s = boxes(500, 0.0)
    ood_v, ood_s = boxes(500, 1.0)
    auroc = {}
    for bins in (1, 4):
        f = Fusion(of=("a", "b"), size_bins=bins).fit(_rows(ref_v, ref_s, classes, 2))
        s = torch.cat([f.score(_rows(id_v, id_s, classes[:500], 2)), f.score(_rows(ood_v, ood_s, classes[:500], 2))])
        auroc[bins] = roc_auc_score(np.r_[np.zeros(500), np.ones(500)], s.numpy())
    assert auroc[4] > auroc[1] + 0.1, auroc


def test_state_round_trip_keeps_the_size_reference():
    ref, r_sizes, r_classes = _reference()
    f = Fusion(of=("a", "b"), min_class_boxes=40, size_bins=3).fit(_rows(ref, r_sizes, r_classes))
    again = build_score("fusion", f.params()).load_state_tensors(f.state_tensors())
    query = _rows(torch.randn(25, 2, generator=torch.Generator().manual_seed(5)), torch.linspace(5, 60, 25),
                  torch.arange(25) % 3)
    assert again.params()["size_bins"] == 3
    torch.testing.assert_close(again.score(query), f.score(query))
    torch.testing.assert_close(again.size_edges(), f.size_edges())


@pytest.mark.parametrize("bad", [0, 11, 2.5, "3"])
def test_size_bins_must_be_an_integer_from_1_to_10(bad):
    with pytest.raises(CertoodError, match="fusion.size_bins"):
        Fusion(of=("a", "b"), size_bins=bad)


def test_fit_rejects_rows_without_a_size_column_or_with_a_bad_size():
    ref, r_sizes, r_classes = _reference()
    with pytest.raises(CertoodError, match="the box size"):
        Fusion(of=("a", "b")).fit(torch.cat([ref.double(), torch.ones(len(ref), 1)], 1))
    sizes = r_sizes.clone()
    sizes[3] = float("nan")
    with pytest.raises(CertoodError, match="not finite"):
        Fusion(of=("a", "b")).fit(_rows(ref, sizes, r_classes))


def _combined_brute_force(p: np.ndarray, combine: str) -> np.ndarray:
    """Each combiner written out row by row from its textbook formula (numpy, scipy)."""
    from scipy.stats import norm

    out = []
    for row in p:
        k = len(row)
        if combine == "fisher":
            out.append(-2.0 * sum(np.log(v) for v in row))
        elif combine == "stouffer":
            out.append(sum(norm.isf(min(v, 1 - 1e-12)) for v in row) / np.sqrt(k))  # p = 1 kept finite
        elif combine == "min":
            out.append(-np.log(min(row)))
        else:  # hmp: minus the log of the harmonic mean p-value
            out.append(-np.log(k / sum(1.0 / v for v in row)))
    return np.array(out)


@pytest.mark.parametrize("combine", ["fisher", "stouffer", "min", "hmp"])
def test_each_combiner_matches_its_formula_on_the_fusions_own_pvalues(combine):
    ref, r_sizes, r_classes = _reference()
    query = torch.randn(40, 2, generator=torch.Generator().manual_seed(6)) * 2
    rows = _rows(query, torch.full((40,), 20.0), torch.arange(40) % 3)
    f = Fusion(of=("a", "b"), min_class_boxes=40, combine=combine).fit(_rows(ref, r_sizes, r_classes))
    expected = _combined_brute_force(f.pvalues(rows).numpy(), combine)
    np.testing.assert_allclose(f.score(rows).numpy(), expected, rtol=1e-9, atol=1e-9)


def test_min_and_hmp_keep_a_novelty_only_one_component_sees_where_fisher_dilutes_it():
    """Three components: for the "one-sided" box only the first sees anything (p = 1/301, the
    others median-like); the "diffuse" box is mildly unusual on all three (p ~ 0.05 each).
    Fisher ranks the diffuse box above the one-sided one; min and hmp rank the one-sided box first."""
    n = 300
    ref = torch.arange(n, dtype=torch.float64)[:, None].repeat(1, 3)  # every column uniform 0..299
    f = {c: Fusion(of=("a", "b", "c"), class_conditional=False, combine=c).fit(
        _rows(ref, torch.full((n,), 20.0), torch.zeros(n, dtype=torch.long))) for c in ("fisher", "min", "hmp")}
    one_sided = torch.tensor([[1000.0, 150.0, 150.0]])
    diffuse = torch.tensor([[285.0, 285.0, 285.0]])
    rows = _rows(torch.cat([one_sided, diffuse]), torch.full((2,), 20.0), torch.zeros(2, dtype=torch.long))
    fisher, low, hmp = (f[c].score(rows) for c in ("fisher", "min", "hmp"))
    assert fisher[1] > fisher[0] and low[0] > low[1] and hmp[0] > hmp[1], (fisher, low, hmp)


def test_hmp_is_a_combine_choice_and_survives_a_state_round_trip():
    ref, r_sizes, r_classes = _reference()
    f = Fusion(of=("a", "b"), min_class_boxes=40, combine="hmp").fit(_rows(ref, r_sizes, r_classes))
    again = build_score("fusion", f.params()).load_state_tensors(f.state_tensors())
    query = _rows(torch.randn(10, 2, generator=torch.Generator().manual_seed(7)), torch.full((10,), 20.0),
                  torch.arange(10) % 3)
    assert again.params()["combine"] == "hmp"
    torch.testing.assert_close(again.score(query), f.score(query))
    with pytest.raises(CertoodError, match="fusion.combine"):
        Fusion(of=("a", "b"), combine="harmonic")
