"""Exact decisions of small ReLU heads by big-M MILP (``scipy.optimize.milp``, HiGHS).

The same question as :func:`certood.verifiers.z3_exact.decide_relu_head`: is
``c . f(x) + d > 0`` on the whole L-inf box? It minimises ``c . f(x) + d``; each unstable
ReLU (CROWN pre-activation bounds ``l < 0 < u``) gets a binary ``s`` and

    a >= 0,  a >= y,  a <= u s,  a <= y - l (1 - s)

Proved when HiGHS's dual bound is above a small tolerance (1e-7 relative: HiGHS works in
floating point with feasibility tolerances, unlike z3's exact rationals); a counterexample
is the optimum's ``x``, confirmed in float64. A time limit gives ``unknown``.

>>> import torch
>>> layers = [("linear", torch.tensor([[1.0]]), torch.tensor([0.0])), ("relu",),
...           ("linear", torch.tensor([[1.0]]), torch.tensor([1.0]))]
>>> decide_relu_head_milp(layers, torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([1.0])).status
'proved'
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from .z3_exact import HeadDecision, _forward, head_problem

__all__ = ["decide_relu_head_milp"]

TOLERANCE = 1e-7


def decide_relu_head_milp(layers, x_lo: Tensor, x_hi: Tensor, c: Tensor, d: float = 0.0, *,
                          strict: bool = True, timeout_s: float = 10.0,
                          pre_bounds: list[tuple[Tensor, Tensor]] | None = None) -> HeadDecision:
    """Prove ``c . f(x) + d > 0`` (``>= 0`` when not strict) on ``[x_lo, x_hi]`` by MILP."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    start = time.perf_counter()
    linears, x_lo, x_hi, c, pre_bounds = head_problem(layers, x_lo, x_hi, c, pre_bounds)

    # variables: x, then per hidden layer its activations a, then the binaries
    lb, ub, integrality = list(x_lo.tolist()), list(x_hi.tolist()), [0] * len(x_lo)
    prev = list(range(len(x_lo)))  # variable index of each input of the current layer
    rows, lo_rows, hi_rows = [], [], []  # (dict var -> coef), lower, upper
    n_unstable = 0
    for k, (W, b) in enumerate(linears[:-1]):
        l, u = pre_bounds[k]
        act = []
        for j in range(W.shape[0]):
            w = {prev[i]: float(W[j, i]) for i in range(W.shape[1]) if W[j, i] != 0}
            bj, lj, uj = float(b[j]), float(l[j]), float(u[j])
            a = len(lb)
            act.append(a)
            lb.append(max(0.0, lj))
            ub.append(max(0.0, uj))
            integrality.append(0)
            if uj <= 0:
                lb[a] = ub[a] = 0.0
                continue
            minus_w = {i: -v for i, v in w.items()}
            if lj >= 0:  # a = y  <=>  a - w.x = b
                rows.append({a: 1.0, **minus_w})
                lo_rows.append(bj)
                hi_rows.append(bj)
                continue
            n_unstable += 1
            s = len(lb)
            lb.append(0.0)
            ub.append(1.0)
            integrality.append(1)
            rows.append({a: 1.0, **minus_w})  # a >= y
            lo_rows.append(bj)
            hi_rows.append(np.inf)
            rows.append({a: 1.0, s: -uj})  # a <= u s
            lo_rows.append(-np.inf)
            hi_rows.append(0.0)
            rows.append({a: 1.0, **minus_w, s: -lj})  # a <= y - l (1 - s)
            lo_rows.append(-np.inf)
            hi_rows.append(bj - lj)
        prev = act
    W, b = linears[-1]
    out_w = (c @ W).tolist()
    out_b = float(c @ b) + float(d)
    objective = np.zeros(len(lb))
    for i, v in zip(prev, out_w):
        objective[i] += v

    constraints = []
    if rows:
        A = lil_matrix((len(rows), len(lb)))
        for r, coefs in enumerate(rows):
            for i, v in coefs.items():
                A[r, i] += v
        constraints.append(LinearConstraint(A.tocsr(), np.array(lo_rows), np.array(hi_rows)))
    remaining = max(0.01, timeout_s - (time.perf_counter() - start))
    res = milp(objective, constraints=constraints, integrality=np.array(integrality),
               bounds=Bounds(np.array(lb), np.array(ub)),
               options={"time_limit": remaining, "mip_rel_gap": 0.0, "presolve": True})
    seconds = time.perf_counter() - start
    scale = 1.0 + abs(out_b) + float(np.abs(objective).sum())
    dual = getattr(res, "mip_dual_bound", None)
    if res.status == 0 and dual is None:
        dual = res.fun
    proved_bound = (dual is not None and np.isfinite(dual) and dual + out_b > TOLERANCE * scale)
    if proved_bound and res.status in (0, 1):
        return HeadDecision("proved", "", seconds, n_unstable=n_unstable)
    if res.x is not None:
        x = torch.tensor(res.x[: len(x_lo)], dtype=torch.float64)
        x = torch.minimum(torch.maximum(x, x_lo), x_hi)
        value = float(c @ _forward(linears, x) + d)
        if (value <= 0) if strict else (value < 0):
            return HeadDecision("counterexample", "", seconds, x, value, n_unstable)
    if res.status == 1:
        return HeadDecision("unknown", f"MILP time limit after {timeout_s:g}s", seconds, n_unstable=n_unstable)
    if res.status == 0:
        return HeadDecision("unknown", "MILP optimum within tolerance of 0 (not confirmed either way)", seconds,
                            n_unstable=n_unstable)
    return HeadDecision("unknown", f"MILP status {res.status}: {res.message}", seconds, n_unstable=n_unstable)
