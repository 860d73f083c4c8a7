"""Exact decisions (z3 and MILP) against known answers and brute force.

Rules under score intervals: known answers where interval evaluation cannot decide
(a score used twice, products), and a grid of points for random rules. ReLU heads: the
exact minimum of ``c . f(x)`` over the box, computed independently by enumerating every
activation pattern of a tiny network and solving one LP per pattern (scipy), decides the
property; z3 and the MILP must agree with it whenever they answer.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from certood.certify import rule_under_bounds
from certood.spec.rule import parse_rule
from certood.verifiers.milp import decide_relu_head_milp
from certood.verifiers.reference import evaluate
from certood.verifiers.z3_exact import decide_rule, decide_relu_head


@pytest.mark.parametrize("rule, bounds, expected", [
    ("a > t.a", {"a": (2.0, 3.0)}, "always"),
    ("a > t.a", {"a": (-1.0, 0.5)}, "never"),
    ("a > t.a", {"a": (0.0, 3.0)}, "both"),
    ("a - a > 0", {"a": (-1.0, 1.0)}, "never"),  # intervals: [-2, 2], undecided
    ("a * a >= 0", {"a": (-1.0, 1.0)}, "always"),  # intervals: [-1, 1], undecided
    ("a > 1 and a < 0", {"a": (-5.0, 5.0)}, "never"),
    ("a > t.a or not (a > t.a)", {"a": (-5.0, 5.0)}, "always"),
    ("a + b > 1 and a - b > 1", {"a": (0.0, 1.0), "b": (0.0, 1.0)}, "never"),
    ("a > t.a or b > t.b", {"a": (0.0, 0.5), "b": (None, None)}, "both"),  # unbounded b
    ("a > t.a", {"a": (1.0, 1.0)}, "never"),  # threshold 1: strict
    ("a >= t.a", {"a": (1.0, 1.0)}, "always"),
])
def test_decide_rule_known_answers(rule, bounds, expected):
    d = decide_rule(parse_rule(rule).tree, {"a": 1.0, "b": 0.0}, bounds, timeout_s=5)
    assert d.status == expected, d


def test_decide_rule_is_exact_where_intervals_are_not():
    tree = parse_rule("a - a > 0").tree
    r = rule_under_bounds(tree, {"a": (torch.tensor([-1.0]), torch.tensor([1.0]))}, {})
    assert bool(r.may_true[0]) and bool(r.may_false[0])  # intervals: unknown
    assert decide_rule(tree, {}, {"a": (-1.0, 1.0)}).status == "never"


def test_decide_rule_time_limit_and_division():
    d = decide_rule(parse_rule("a > t.a").tree, {"a": 0.0}, {"a": (-1.0, 1.0)}, timeout_s=1e-12)
    assert d.status == "unknown" and "timeout" in d.reason
    d = decide_rule(parse_rule("a / b > 1").tree, {}, {"a": (1.0, 2.0), "b": (1.0, 2.0)})
    assert d.status == "unknown" and "division" in d.reason


RULES = ["a > t.a or b > t.b", "a > t.a and b > t.b", "a - b > 0.1", "a * b > t.a",
         "not (a > t.a) and (a + b > t.b or a - 2 * b < -1)", "a * a + b * b < 1"]


@pytest.mark.parametrize("rule", RULES)
def test_decide_rule_agrees_with_a_grid(rule):
    gen = torch.Generator().manual_seed(hash(rule) % 1000)
    tree = parse_rule(rule).tree
    thresholds = {"a": 0.2, "b": -0.3}
    for _ in range(8):
        lo = torch.rand(2, generator=gen) * 4 - 2
        width = torch.rand(2, generator=gen) * 1.5
        bounds = {"a": (float(lo[0]), float(lo[0] + width[0])), "b": (float(lo[1]), float(lo[1] + width[1]))}
        d = decide_rule(tree, thresholds, bounds, timeout_s=5)
        ga = torch.linspace(*bounds["a"], 41, dtype=torch.float64)
        gb = torch.linspace(*bounds["b"], 41, dtype=torch.float64)
        A, B = torch.meshgrid(ga, gb, indexing="ij")
        flags = parse_rule(rule).evaluate({"a": A.flatten(), "b": B.flatten()}, thresholds)
        if d.status == "always":
            assert bool(flags.all())
        elif d.status == "never":
            assert not bool(flags.any())
        else:
            assert d.status == "both", d
        # intervals are sound: when they decide, z3 agrees
        r = rule_under_bounds(tree, {k: (torch.tensor([v[0]], dtype=torch.float64),
                                         torch.tensor([v[1]], dtype=torch.float64)) for k, v in bounds.items()},
                              thresholds)
        if not bool(r.may_false[0]):
            assert d.status == "always"
        if not bool(r.may_true[0]):
            assert d.status == "never"


# --- ReLU heads -----------------------------------------------------------------------------
def _net(seed: int, sizes: tuple[int, ...]):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(("linear", torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a),
                       torch.randn(b, generator=gen, dtype=torch.float64) * 0.3))
        if i < len(sizes) - 2:
            layers.append(("relu",))
    return layers


def _exact_min(layers, x_lo, x_hi, c) -> float:
    """min over the box of c . f(x), by one LP per activation pattern (tiny nets only)."""
    (W1, b1), (W2, b2), (W3, b3) = [(l[1].numpy(), l[2].numpy()) for l in layers if l[0] == "linear"]
    n1, n2 = W1.shape[0], W2.shape[0]
    best = math.inf
    bounds = list(zip(x_lo.tolist(), x_hi.tolist()))
    for p1 in itertools.product((0, 1), repeat=n1):
        D1 = np.diag(p1)
        sign1 = np.where(np.array(p1) == 1, -1.0, 1.0)  # active: y >= 0 -> -y <= 0
        A_ub, b_ub = [sign1[:, None] * W1], [-sign1 * b1]
        M1, m1 = W2 @ D1 @ W1, W2 @ D1 @ b1 + b2
        for p2 in itertools.product((0, 1), repeat=n2):
            D2 = np.diag(p2)
            sign2 = np.where(np.array(p2) == 1, -1.0, 1.0)
            A = np.vstack(A_ub + [sign2[:, None] * M1])
            bb = np.concatenate(b_ub + [-sign2 * m1])
            obj = c.numpy() @ W3 @ D2 @ M1
            const = float(c.numpy() @ (W3 @ D2 @ m1 + b3))
            res = linprog(obj, A_ub=A, b_ub=bb, bounds=bounds, method="highs")
            if res.status == 0:
                best = min(best, res.fun + const)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_relu_head_decisions_match_pattern_enumeration(seed):
    layers = _net(seed, (3, 4, 3, 2))
    gen = torch.Generator().manual_seed(100 + seed)
    centre = torch.randn(3, generator=gen, dtype=torch.float64)
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    if float(c @ evaluate(layers, centre.unsqueeze(0))[0]) < 0:
        c = -c
    value = float(c @ evaluate(layers, centre.unsqueeze(0))[0])
    for eps in (0.05, 0.3, 1.0):
        lo, hi = centre - eps, centre + eps
        truth = _exact_min(layers, lo, hi, c)
        assert truth <= value + 1e-9
        for decide in (decide_relu_head, decide_relu_head_milp):
            d = decide(layers, lo, hi, c, timeout_s=20)
            if abs(truth) < 1e-6:
                continue  # on the boundary: either answer is within tolerance
            if d.status == "proved":
                assert truth > 0, (decide.__name__, eps, truth)
            elif d.status == "counterexample":
                assert truth <= 0 and d.value <= 0
                assert bool(((d.counterexample >= lo) & (d.counterexample <= hi)).all())
            else:
                pytest.fail(f"{decide.__name__} gave {d.status} ({d.reason}) on a tiny net")


def test_relu_head_timeout_is_unknown_never_a_hang():
    layers = _net(7, (16, 32, 32, 2))
    centre = torch.zeros(16, dtype=torch.float64)
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    d = decide_relu_head(layers, centre - 1.0, centre + 1.0, c, timeout_s=0.05)
    assert d.status in ("unknown", "counterexample", "proved")
    assert d.seconds < 10
