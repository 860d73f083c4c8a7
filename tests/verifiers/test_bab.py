"""Branch and bound over ReLUs (certood.verifiers.bab) against exact answers (MILP) on small
heads, fixed-phase bounds against samples of their subdomains, and a certifier-level run."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from certood.verifiers.bab import branch_and_bound, split_scores
from certood.verifiers.milp import decide_relu_head_milp
from certood.verifiers.reference import Region, crown_bounds, evaluate, mlp_layers
from certood.verifiers.sparse_crown import SparseCrown


def _instance(sizes, seed):
    """A random head, a point, the top-logit margin row and CROWN's largest proven radius."""
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    layers = mlp_layers(nn.Sequential(*mods))
    x = torch.randn(1, sizes[0], dtype=torch.float64)
    top = evaluate(layers, x)[0].topk(2).indices
    c = torch.zeros(sizes[-1], dtype=torch.float64)
    c[top[0]], c[top[1]] = 1.0, -1.0
    W, b = layers[-1][1], layers[-1][2]
    spec = layers[:-1] + [("linear", c.reshape(1, -1) @ W, (c @ b).reshape(1))]  # the margin row
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(crown_bounds(spec, Region(x, mid))[0][0, 0]) > 0 else (lo, mid)
    return layers, spec, x, c, lo


def _decide(state, lo, hi):
    return lo[:, 0] > 0, lo[:, 0], torch.ones_like(lo)


def test_fixed_phase_bounds_hold_on_their_subdomain():
    layers, spec, x, c, r = _instance((6, 12, 12, 3), 0)
    crown = SparseCrown(spec, torch.float64)
    eps = 3 * r
    lo, hi = x - eps, x + eps
    root = crown.prepare(lo, hi, [torch.zeros(1, 12, dtype=torch.int8)] * 2)
    unstable = ((root.pre[0][0] < 0) & (root.pre[0][1] > 0))[0].nonzero().flatten()
    k = int(unstable[0])
    phases = [torch.zeros(2, 12, dtype=torch.int8), torch.zeros(2, 12, dtype=torch.int8)]
    phases[0][0, k], phases[0][1, k] = 1, -1
    within = [(a.expand(2, -1), b.expand(2, -1)) for a, b in root.pre]
    state = crown.prepare(lo.expand(2, -1), hi.expand(2, -1), phases, within)
    blo, bhi = crown.final_bounds(state)
    pts = lo + torch.rand(20000, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * (hi - lo)
    pre1 = pts @ layers[0][1].T + layers[0][2]
    out = evaluate(spec, pts)[:, 0]
    for i, inside in enumerate((pre1[:, k] >= 0, pre1[:, k] <= 0)):
        assert inside.any()
        assert bool((out[inside] >= blo[i, 0] - 1e-9).all() and (out[inside] <= bhi[i, 0] + 1e-9).all())
    # within the parent's bounds every hidden bound is at least as tight as the whole box's
    for (a, b), (pa, pb) in zip(state.pre, root.pre):
        assert bool((a >= pa - 1e-12).all() and (b <= pb + 1e-12).all())
    scores = split_scores(root, crown.weights, torch.ones(1, 1, dtype=torch.float64))
    assert float(scores[0][0, k]) >= 0 and bool((scores[0][0][~((root.pre[0][0] < 0) & (root.pre[0][1] > 0))[0]] == 0).all())


def test_never_a_wrong_proof_and_more_than_crown_against_milp():
    """Radii above CROWN's: every BaB proof is one the MILP confirms (never a counterexample),
    and BaB proves some that CROWN alone cannot."""
    proved_beyond_crown = 0
    for seed in range(5):
        layers, spec, x, c, r = _instance((8, 16, 16, 2), seed)
        crown = SparseCrown(spec, torch.float64)
        for factor in (1.05, 1.3):
            eps = factor * r
            res = branch_and_bound(crown, x - eps, x + eps, _decide, max_subdomains=120, time_s=20.0)
            exact = decide_relu_head_milp(layers, (x - eps)[0], (x + eps)[0], c, timeout_s=20.0)
            if res.status == "proved":
                assert exact.status != "counterexample", (seed, factor)
                proved_beyond_crown += 1
            else:
                assert res.margin <= 0 and res.subdomains >= 1
    assert proved_beyond_crown >= 2


def test_budget_leaves_the_box_open_with_a_reason():
    layers, spec, x, c, r = _instance((8, 16, 16, 2), 0)
    crown = SparseCrown(spec, torch.float64)
    res = branch_and_bound(crown, x - 3 * r, x + 3 * r, _decide, max_subdomains=4, time_s=10.0)
    assert res.status == "open" and "budget" in res.reason and res.subdomains <= 4 + 4
