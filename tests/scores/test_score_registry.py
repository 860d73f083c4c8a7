"""Score registry and the shared Score base behaviour."""
from __future__ import annotations

import doctest
import inspect

import pytest
import torch

import certood.scores as scores_pkg
import certood.scores.base as base_module
from certood.errors import CertoodError
from certood.scores import SCORE_CLASSES, Energy, Mahalanobis, build_score
from certood.spec.v1 import SCORE_KIND_TABLE


def test_registry_and_build():
    assert SCORE_CLASSES["energy"] is Energy and SCORE_CLASSES["mahalanobis"] is Mahalanobis
    assert all(cls.kind == kind for kind, cls in SCORE_CLASSES.items())
    e = build_score("energy", {"temperature": 3.0})
    assert isinstance(e, Energy) and e.temperature == 3.0
    assert isinstance(build_score("mahalanobis", {}), Mahalanobis)
    assert isinstance(build_score("mahalanobis"), Mahalanobis)


@pytest.mark.parametrize("kind", sorted(SCORE_CLASSES))
def test_params_rebuild_the_same_score(kind):
    # 256 = 64 x 2 x 2 columns, so PARTICUL's default 64-channel maps fit too; 90 rows: more
    # than residual's 64 directions; jitter_kl reads 8 + 1 blocks (252 = 9 x 28)
    x, y = torch.randn(90, 256).relu(), torch.arange(90) % 2
    x = x[:, :252] if kind == "jitter_kl" else x
    params = {"of": ["a", "b"]} if kind == "fusion" else {}  # a fusion must name what it fuses
    cls = SCORE_CLASSES[kind]
    extra = {}
    if cls.needs_classifier:
        extra["classifier"] = (torch.randn(3, 256), torch.randn(3))
    if cls.needs_head:
        extra["head"] = torch.nn.Linear(256, 3)
    s = build_score(kind, params).fit(x, y, **extra)
    rebuilt = build_score(kind, s.params()).load_state_tensors(s.state_tensors())
    if cls.needs_head:  # a head is never saved: it is given again
        rebuilt.fit(x, head=extra["head"])
    assert torch.equal(rebuilt.score(x), s.score(x))
    assert s.kind == kind and s.score(x).shape == (90,)


@pytest.mark.parametrize("kind", sorted(SCORE_CLASSES))
def test_spec_table_matches_the_classes(kind):
    cls, entry = SCORE_CLASSES[kind], SCORE_KIND_TABLE[kind]
    assert entry.needs_fit == cls.needs_fit
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self"}
    if kind == "fusion":  # `of` has no default in specs: it is required
        defaults.pop("of")
        assert entry.params["of"].required
    if kind == "jitter_kl":  # fixed by the adapter's tap, not a spec key
        assert defaults.pop("jitters") == 8 and "jitters" not in entry.params
    if kind != "mahalanobis":  # its num_classes is not exposed in specs
        assert {name: f.default for name, f in entry.params.items() if not f.required} == defaults
    if cls.needs_classifier or cls.needs_head:
        assert entry.tap_point == "features"


def test_unknown_kind_and_params_list_valid_choices():
    with pytest.raises(CertoodError, match="expected one of activation_pattern, ash, "
                                           ".*energy, entropy, .*, found 'mahalanobus'"):
        build_score("mahalanobus", {})
    with pytest.raises(CertoodError, match="expected parameters among temperature, found 'temp'"):
        build_score("energy", {"temp": 1.0})


def test_fit_rejects_empty_features():
    with pytest.raises(CertoodError, match="expected at least one feature row, found 0"):
        Mahalanobis().fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_docstring_examples():
    assert doctest.testmod(scores_pkg).failed == 0
    assert doctest.testmod(base_module).failed == 0


def test_classifier_and_head_reach_only_the_scores_that_need_them():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    clf = (torch.ones(2, 3), torch.zeros(2))
    m = Mahalanobis().fit(x, y, classifier=clf, head=torch.nn.Linear(3, 2))
    assert not hasattr(m, "weight") and not hasattr(m, "head")
    kinds = {k for k, cls in SCORE_CLASSES.items() if cls.needs_classifier}
    assert kinds == {"vim", "react", "ash", "dice", "gradnorm", "mc_dropout",
                     "activation_pattern", "pvalue_fusion"}
    assert {k for k, cls in SCORE_CLASSES.items() if cls.needs_head} == {"odin"}
    gradnorm = build_score("gradnorm").fit(x, classifier=clf)  # copied, not referenced
    clf[0].add_(1)
    assert torch.equal(gradnorm.weight, torch.ones(2, 3))
