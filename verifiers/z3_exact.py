"""Exact decisions with z3, always under a time limit (unknown, never a hang).

Two questions, both over real numbers with the floats converted exactly to rationals:

(a) :func:`decide_rule`: given an interval for every score, can the rule be true, and can it
    be false, for some assignment of the scores inside their intervals? "never false" proves
    certified_ood, "never true" proves certified_id. Exact where interval evaluation is not
    (a score used twice, arithmetic between scores).

(b) :func:`decide_relu_head`: does ``c . f(x) + d > 0`` (or ``>= 0``) hold for every ``x`` of an
    L-inf box, where ``f`` is a Linear/ReLU network? Neurons that CROWN (auto_LiRPA, on each
    prefix of the network) proves stable are fixed; each unstable one gets the disjunctive
    encoding ``(y >= 0 and a = y) or (y <= 0 and a = 0)`` plus its triangle relaxation
    (redundant, but it helps the solver). A model found by z3 is checked in float64 before it
    is reported as a counterexample.

>>> from certood.spec.rule import parse_rule
>>> rule = parse_rule("e > t.e")
>>> decide_rule(rule.tree, {"e": 1.0}, {"e": (2.0, 3.0)}, timeout_s=1).status
'always'
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from certood.errors import CertoodError
from certood.spec.rule import (
    Arith, ClassThresholdRef, Compare, Logic, Neg, Not, Num, ScoreRef, ThresholdRef, class_key,
)

__all__ = ["RuleDecision", "decide_rule", "HeadDecision", "decide_relu_head", "preactivation_bounds"]


def _z3():
    import z3

    return z3


def _check(solver, seconds: float):
    """``solver.check()`` within ``seconds``: z3's own timeout, plus a watchdog that
    interrupts the context (z3's timeout alone overshot 10 s by up to 8 s here)."""
    import threading

    solver.set("timeout", max(1, int(seconds * 1000)))
    watchdog = threading.Timer(seconds + 0.05, solver.ctx.interrupt)
    watchdog.daemon = True
    watchdog.start()
    try:
        return solver.check()
    finally:
        watchdog.cancel()


def _q(x: float):
    """The float ``x`` as an exact z3 rational."""
    z3 = _z3()
    f = Fraction(float(x))
    return z3.Q(f.numerator, f.denominator)


# --- (a) rules under score intervals ----------------------------------------------------------
@dataclass(frozen=True)
class RuleDecision:
    """``always``: the rule holds for every assignment (flags every point); ``never``: for
    none; ``both``: both are possible under the intervals; ``unknown``: z3 gave up (``reason``)."""

    status: str
    reason: str = ""
    seconds: float = 0.0


class _Unsupported(Exception):
    pass


def _encode(node, names: dict, thresholds: dict):
    z3 = _z3()
    if isinstance(node, Num):
        return _q(node.value)
    if isinstance(node, ScoreRef):
        return names[node.name]
    if isinstance(node, ThresholdRef):
        return _q(thresholds[node.name])
    if isinstance(node, ClassThresholdRef):  # the box's own class: one number here
        return _q(thresholds[class_key(node.name)])
    if isinstance(node, Neg):
        return -_encode(node.operand, names, thresholds)
    if isinstance(node, Not):
        return z3.Not(_encode(node.operand, names, thresholds))
    if isinstance(node, Logic):
        parts = [_encode(o, names, thresholds) for o in node.operands]
        return z3.And(*parts) if node.op == "and" else z3.Or(*parts)
    left = _encode(node.left, names, thresholds)
    right = _encode(node.right, names, thresholds)
    if isinstance(node, Arith):
        if node.op == "/":
            raise _Unsupported("division: z3's x/0 is not the monitor's inf/nan")
        return {"+": left + right, "-": left - right, "*": left * right}[node.op]
    if isinstance(node, Compare):
        return {">": left > right, ">=": left >= right, "<": left < right, "<=": left <= right}[node.op]
    raise _Unsupported(f"rule node {type(node).__name__}")


def decide_rule(tree, thresholds: dict[str, float], bounds: dict[str, tuple[float | None, float | None]],
                timeout_s: float = 2.0) -> RuleDecision:
    """Decide ``tree`` (a parsed rule) when each score ``s`` ranges over ``bounds[s] = (lo, hi)``
    (``None`` or an infinite value: unbounded on that side).

    Two satisfiability queries share one time limit: is there an assignment where the rule
    is true, and one where it is false?
    """
    z3 = _z3()
    start = time.perf_counter()
    names = {name: z3.Real(name) for name in bounds}
    try:
        formula = _encode(tree, names, thresholds)
    except _Unsupported as e:
        return RuleDecision("unknown", f"the rule cannot be decided exactly ({e})", time.perf_counter() - start)
    except KeyError as e:
        raise CertoodError(f"decide_rule: no bounds or threshold for {e}") from None
    box = []
    for name, (lo, hi) in bounds.items():
        if lo is not None and math.isfinite(lo):
            box.append(names[name] >= _q(lo))
        if hi is not None and math.isfinite(hi):
            box.append(names[name] <= _q(hi))
    can = {}
    for label, goal in (("true", formula), ("false", z3.Not(formula))):
        remaining = timeout_s - (time.perf_counter() - start)
        if remaining <= 0:
            return RuleDecision("unknown", f"z3 timeout after {timeout_s:g}s", time.perf_counter() - start)
        solver = z3.Solver()
        solver.add(*box, goal)
        result = _check(solver, remaining)
        if result == z3.unknown:
            why = solver.reason_unknown()
            kind = "timeout" if why in ("timeout", "canceled") else f"unknown ({why})"
            return RuleDecision("unknown", f"z3 {kind} after {timeout_s:g}s" if kind == "timeout" else f"z3 {kind}",
                                time.perf_counter() - start)
        can[label] = result == z3.sat
    seconds = time.perf_counter() - start
    if can["true"] and can["false"]:
        return RuleDecision("both", "the rule can be true and false under the score bounds (z3)", seconds)
    if can["true"]:
        return RuleDecision("always", "", seconds)
    if can["false"]:
        return RuleDecision("never", "", seconds)
    return RuleDecision("unknown", "z3: the score bounds admit no assignment (empty box)", seconds)


# --- (b) small ReLU heads over an L-inf box ---------------------------------------------------
@dataclass(frozen=True)
class HeadDecision:
    """``proved``: ``c . f(x) + d`` is > 0 (>= 0 when not strict) on the whole box;
    ``counterexample``: ``x`` violates it (checked in float64); ``unknown``: timeout or an
    unconfirmed model (``reason``)."""

    status: str
    reason: str = ""
    seconds: float = 0.0
    counterexample: Tensor | None = None
    value: float | None = None  # c . f(x) + d at the counterexample
    n_unstable: int = 0


def _linear_layers(layers) -> list[tuple[Tensor, Tensor]]:
    """[(W, b), ...] from a layer list (see certood.verifiers.reference) that alternates
    Linear and ReLU and ends with a Linear."""
    out = []
    expect_linear = True
    for layer in layers:
        if (layer[0] == "linear") != expect_linear:
            raise CertoodError("decide_relu_head: expected Linear and ReLU layers alternating, "
                               "starting and ending with a Linear")
        if layer[0] == "linear":
            out.append((layer[1].double(), layer[2].double()))
        expect_linear = not expect_linear
    if expect_linear:
        raise CertoodError("decide_relu_head: the network must end with a Linear layer")
    return out


def preactivation_bounds(layers, x_lo: Tensor, x_hi: Tensor, method: str = "crown") -> list[tuple[Tensor, Tensor]]:
    """Bounds of every hidden pre-activation over the box, by auto_LiRPA on each prefix of the
    network (float64), padded outwards by a relative 1e-9 against rounding."""
    from torch import nn

    from certood.verifiers.lirpa import bound_module

    linears = _linear_layers(layers)
    centre, radius = ((x_lo + x_hi) / 2).double().reshape(1, -1), ((x_hi - x_lo) / 2).double().reshape(1, -1)
    out = []
    modules: list[nn.Module] = []
    for W, b in linears[:-1]:
        lin = nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        modules.append(lin)
        bounds = bound_module(nn.Sequential(*modules), centre, radius, method=method)
        lo, hi = bounds.lower[0], bounds.upper[0]
        pad = 1e-9 * (1 + torch.maximum(lo.abs(), hi.abs()))
        out.append((lo - pad, hi + pad))
        modules.append(nn.ReLU())
    return out


def _forward(linears, x: Tensor) -> Tensor:
    for i, (W, b) in enumerate(linears):
        x = W @ x + b
        if i < len(linears) - 1:
            x = x.clamp(min=0)
    return x


def head_problem(layers, x_lo: Tensor, x_hi: Tensor, c: Tensor,
                 pre_bounds: list[tuple[Tensor, Tensor]] | None):
    """What both exact head deciders (z3, MILP) start from: the head's Linear layers, the box
    and ``c`` flattened to float64, and the hidden pre-activation bounds (CROWN when not given)."""
    x_lo, x_hi = x_lo.double().flatten(), x_hi.double().flatten()
    if pre_bounds is None:
        pre_bounds = preactivation_bounds(layers, x_lo, x_hi)
    return _linear_layers(layers), x_lo, x_hi, c.double().flatten(), pre_bounds


def decide_relu_head(layers, x_lo: Tensor, x_hi: Tensor, c: Tensor, d: float = 0.0, *,
                     strict: bool = True, timeout_s: float = 10.0,
                     pre_bounds: list[tuple[Tensor, Tensor]] | None = None) -> HeadDecision:
    """Prove ``c . f(x) + d > 0`` (``>= 0`` when not ``strict``) for all ``x`` in ``[x_lo, x_hi]``
    or find a counterexample, within ``timeout_s``.

    ``layers``: a Linear/ReLU layer list (``certood.verifiers.reference.mlp_layers``).
    ``pre_bounds``: bounds of each hidden pre-activation; computed by CROWN when omitted.
    """
    z3 = _z3()
    start = time.perf_counter()
    linears, x_lo, x_hi, c, pre_bounds = head_problem(layers, x_lo, x_hi, c, pre_bounds)
    xs = [z3.Real(f"x{i}") for i in range(len(x_lo))]
    cons = []
    for v, lo, hi in zip(xs, x_lo.tolist(), x_hi.tolist()):
        cons += [v >= _q(lo), v <= _q(hi)]
    acts = list(xs)
    n_unstable = 0
    for k, (W, b) in enumerate(linears[:-1]):
        l, u = pre_bounds[k]
        nxt = []
        for j in range(W.shape[0]):
            y = z3.Sum([_q(w) * a for w, a in zip(W[j].tolist(), acts) if w != 0] + [_q(b[j].item())])
            lj, uj = float(l[j]), float(u[j])
            if lj >= 0:
                nxt.append(y)
            elif uj <= 0:
                nxt.append(_q(0.0))
            else:
                n_unstable += 1
                a = z3.Real(f"a{k}_{j}")
                slope = Fraction(uj) / (Fraction(uj) - Fraction(lj))
                cons += [y >= _q(lj), y <= _q(uj), a >= 0, a >= y,
                         a <= z3.Q(slope.numerator, slope.denominator) * (y - _q(lj)),
                         z3.Or(z3.And(y >= 0, a == y), z3.And(y <= 0, a == 0))]
                nxt.append(a)
        acts = nxt
    W, b = linears[-1]
    outputs = [z3.Sum([_q(w) * a for w, a in zip(row, acts) if w != 0] + [_q(bi)])
               for row, bi in zip(W.tolist(), b.tolist())]  # exact: no float products
    objective = z3.Sum([_q(ci) * o for ci, o in zip(c.tolist(), outputs) if ci != 0] + [_q(float(d))])
    solver = z3.Solver()
    remaining = timeout_s - (time.perf_counter() - start)
    if remaining <= 0:
        return HeadDecision("unknown", f"z3 timeout after {timeout_s:g}s (encoding)", time.perf_counter() - start,
                            n_unstable=n_unstable)
    solver.add(*cons, objective <= 0 if strict else objective < 0)
    result = _check(solver, remaining)
    seconds = time.perf_counter() - start
    if result == z3.unsat:
        return HeadDecision("proved", "", seconds, n_unstable=n_unstable)
    if result == z3.unknown:
        why = solver.reason_unknown()
        reason = f"z3 timeout after {timeout_s:g}s" if why in ("timeout", "canceled") else f"z3 unknown ({why})"
        return HeadDecision("unknown", reason, seconds, n_unstable=n_unstable)
    model = solver.model()
    exact_x = [_model_value(model, v) for v in xs]
    # The model is exact: check it in exact rational arithmetic (float64 can round a point on
    # the boundary either way), then report it in float64.
    value_exact = _forward_exact(linears, exact_x, c, d)
    violated = value_exact <= 0 if strict else value_exact < 0
    x = torch.tensor([float(v) for v in exact_x], dtype=torch.float64)
    if not violated:
        return HeadDecision("unknown", f"z3 model not confirmed (c.f(x)+d = {float(value_exact):.3g})", seconds,
                            n_unstable=n_unstable)
    return HeadDecision("counterexample", "", seconds, x, float(value_exact), n_unstable)


def _model_value(model, var) -> Fraction:
    val = model.eval(var, model_completion=True)
    if hasattr(val, "numerator_as_long"):
        return Fraction(val.numerator_as_long(), val.denominator_as_long())
    return Fraction(val.approx(30).as_fraction())


def _forward_exact(linears, x: list[Fraction], c: Tensor, d: float) -> Fraction:
    """``c . f(x) + d`` in exact rational arithmetic (the floats as exact fractions)."""
    acts = x
    for i, (W, b) in enumerate(linears):
        rows = W.tolist()
        acts = [sum((Fraction(w) * a for w, a in zip(row, acts) if w != 0), Fraction(bj))
                for row, bj in zip(rows, b.tolist())]
        if i < len(linears) - 1:
            acts = [max(a, Fraction(0)) for a in acts]
    return sum((Fraction(ci) * a for ci, a in zip(c.tolist(), acts)), Fraction(float(d)))
