"""The coupled Mahalanobis bound (certood.verifiers.quadratic) and the per-box specifications
it is bounded through (SparseCrown.spec_bounds, reference crown_bounds(spec=...)).

Exact references: on a linear map the Fenchel lower bound at the true minimiser's multiplier
is the minimum of the convex QP (scipy's L-BFGS-B over the box) and the upper bound is at
least the maximum over the box's vertices (enumerated); on small ReLU heads with a 2-D input
a dense grid gives the minimum and maximum to grid resolution. Soundness: sampled and PGD
points of the region (certood.verifiers.attack) stay inside the bounds.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from certood.certify import class_distance_intervals
from certood.verifiers.attack import sample_region
from certood.verifiers.quadratic import decoupled_nu, distance_bounds, fenchel_lower, nearest_points
from certood.verifiers.reference import Region, crown_bounds, evaluate, mlp_layers
from certood.verifiers.sparse_crown import SparseCrown


def _seeded(seed, fn):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _head(sizes, r, seed):
    """Linear/ReLU layers ending with a whitening-like Linear (no ReLU) to ``r`` rows."""
    def make():
        mods = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(sizes[-1], r))
        return nn.Sequential(*mods).double().eval()
    return _seeded(seed, make)


def _spec_fn(crown, lo, hi):
    state = crown.prepare(lo, hi)
    return lambda C: crown.spec_bounds(state, C)


@pytest.mark.parametrize("gemm", [torch.float32, torch.float64])
def test_spec_bounds_equal_appended_rows_and_the_reference(gemm):
    net = _head([10, 16, 12], 5, seed=0)
    layers = mlp_layers(net)
    x = _seeded(1, lambda: torch.rand(4, 10, dtype=torch.float64))
    lo, hi = x - 0.05, x + 0.05
    C = _seeded(2, lambda: torch.randn(4, 3, 5, dtype=torch.float64))
    crown = SparseCrown(layers, gemm)
    slo, shi = crown.spec_bounds(crown.prepare(lo, hi), C)
    rlo, rhi = crown_bounds(layers, Region(x, 0.05), spec=C)
    assert torch.allclose(slo, rlo, atol=1e-6) and torch.allclose(shi, rhi, atol=1e-6)
    for n in range(4):  # the same as a network whose last layer is C[n] W
        W, b = layers[-1][1], layers[-1][2]
        alone = SparseCrown(layers[:-1] + [("linear", C[n] @ W, C[n] @ b)], gemm)
        alo, ahi = alone(lo[n:n + 1], hi[n:n + 1])
        assert torch.allclose(slo[n], alo[0], atol=1e-9) and torch.allclose(shi[n], ahi[0], atol=1e-9)
    # prepare over the boxes of the last call reuses its intermediate bounds, bit for bit
    # (the specification rows, batched otherwise, agree to rounding)
    crown(lo, hi)
    state = crown.prepare(lo[[2, 0]], hi[[2, 0]])
    for (a, b), (c, d) in zip(state.pre, crown.last_state.pre):
        assert torch.equal(a, c[[2, 0]]) and torch.equal(b, d[[2, 0]])
    again = crown.spec_bounds(state, C[[2, 0]])
    torch.testing.assert_close(again, (slo[[2, 0]], shi[[2, 0]]), rtol=1e-12, atol=1e-12)


def test_decoupled_multiplier_gives_the_interval_bound_back():
    ul = torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64)
    uh = torch.tensor([[1.0, 1.5, 3.0]], dtype=torch.float64)
    o = torch.tensor([[0.0, 3.0, -1.0], [2.0, 1.0, 2.5]], dtype=torch.float64)
    nu = decoupled_nu(ul, uh, o)
    # per-coordinate bounds of nu . u: each coordinate at its own extreme
    lower_nu_u = (torch.where(nu > 0, ul.unsqueeze(1), uh.unsqueeze(1)) * nu).sum(-1)
    got = fenchel_lower(lower_nu_u, nu, o.unsqueeze(0))
    want, _ = class_distance_intervals(ul, uh, o)
    assert torch.allclose(got, want, atol=1e-12)
    assert want.tolist() == [[1.5 ** 2 + 3.0 ** 2, 1.0]]  # |o - clamp(o, ul, uh)|^2 by hand


def test_linear_map_lower_bound_is_the_exact_qp_minimum_and_upper_above_every_vertex():
    from scipy.optimize import minimize

    A = _seeded(3, lambda: torch.randn(4, 6, dtype=torch.float64))
    b = _seeded(4, lambda: torch.randn(4, dtype=torch.float64))
    o = _seeded(5, lambda: 3 * torch.randn(2, 4, dtype=torch.float64))
    x0 = _seeded(6, lambda: torch.rand(1, 6, dtype=torch.float64))
    eps = 0.3
    lo, hi = x0 - eps, x0 + eps
    layers = [("linear", A, b)]
    spec = _spec_fn(SparseCrown(layers, torch.float64), lo, hi)
    u = evaluate(layers, torch.cat([lo, hi]))
    ul, uh = Region(x0, eps).linear_bounds(A, b)
    bounds = list(zip(lo[0].tolist(), hi[0].tolist()))
    vertices = torch.tensor(list(itertools.product(*[(a, c) for a, c in bounds])), dtype=torch.float64)
    uv = evaluate(layers, vertices)
    for c in range(2):
        f = lambda x: float(((A @ torch.tensor(x) + b - o[c]) ** 2).sum())  # noqa: E731
        res = minimize(f, x0[0].numpy(), bounds=bounds, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12})
        x_star = torch.tensor(res.x).reshape(1, -1)
        exact = f(res.x)
        u_star = evaluate(layers, x_star).reshape(1, 1, -1).expand(1, 2, -1)
        lower, upper = distance_bounds(spec, ul, uh, o, u_star)
        assert lower[0, c] <= exact + 1e-9 and lower[0, c] >= exact - 1e-6 * (1 + exact)
        # the nearest-point search instead of the exact minimiser: still close
        near = nearest_points(lambda x: x.double() @ A.T + b, lo, hi, o, steps=30)
        lower_s, _ = distance_bounds(spec, ul, uh, o, near)
        interval_lo, interval_hi = class_distance_intervals(ul, uh, o)
        assert lower_s[0, c] <= exact + 1e-9
        assert exact - lower_s[0, c] <= 0.05 * (exact - interval_lo[0, c]) + 1e-6
        top = float(((uv - o[c]) ** 2).sum(1).max())  # a convex function's max over a box: at a vertex
        assert top - 1e-9 <= upper[0, c] <= interval_hi[0, c] + 1e-9
    assert u.shape[1] == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_relu_heads_against_a_dense_grid(seed):
    """2-D inputs: a 301 x 301 grid of the box gives min and max to grid resolution; the bounds
    contain both and close most of the gap the interval bound leaves."""
    net = _head([2, 12, 8], 6, seed)
    layers = mlp_layers(net)
    x0 = _seeded(10 + seed, lambda: torch.rand(1, 2, dtype=torch.float64))
    eps = 0.4
    lo, hi = x0 - eps, x0 + eps
    o = _seeded(20 + seed, lambda: torch.randn(3, 6, dtype=torch.float64))
    crown = SparseCrown(layers, torch.float64)
    ul, uh = crown(lo, hi)
    near = nearest_points(lambda x: net(x.double()), lo, hi, o)
    lower, upper = distance_bounds(_spec_fn(crown, lo, hi), ul, uh, o, near)
    t = torch.linspace(0, 1, 301, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t) * (hi - lo) + lo
    d = ((evaluate(layers, grid).unsqueeze(1) - o.unsqueeze(0)) ** 2).sum(-1)  # [G, C]
    ilo, ihi = class_distance_intervals(ul, uh, o)
    lo_c, hi_c = torch.maximum(lower, ilo)[0], torch.minimum(upper, ihi)[0]
    assert bool((lo_c <= d.min(0).values + 1e-9).all()) and bool((hi_c >= d.max(0).values - 1e-9).all())
    # tighter than the interval bound on the lower side for most classes of these heads
    gap_interval = d.min(0).values - ilo[0]
    gap_coupled = d.min(0).values - lo_c
    assert float(gap_coupled.sum()) < 0.8 * float(gap_interval.sum())


def test_sampled_and_attacked_points_stay_inside_the_bounds():
    """A 3136-wide first layer as at the demo's RoI tap (float32 wide products), random
    non-negative features: 400 samples per box (half vertices) and 30 PGD steps per class
    toward the minimum and the maximum stay inside the per-class bounds."""
    net = _head([3136, 32, 24], 16, seed=3)
    layers = mlp_layers(net)
    z = _seeded(7, lambda: torch.rand(3, 3136, dtype=torch.float64) * 0.5)
    eps = 0.01
    region = Region(z, eps, lower=torch.zeros_like(z))
    lo, hi = region.box()
    o = _seeded(8, lambda: torch.randn(3, 16, dtype=torch.float64) * 0.3)
    crown = SparseCrown(layers)
    ul, uh = crown(lo, hi)
    near = nearest_points(lambda x: net(x.double()), lo, hi, o)
    lower, upper = distance_bounds(_spec_fn(crown, lo, hi), ul, uh, o, near)
    ilo, ihi = class_distance_intervals(ul, uh, o)
    lower, upper = torch.maximum(lower, ilo), torch.minimum(upper, ihi)
    x = sample_region(z, eps, math.inf, True, 400, torch.Generator().manual_seed(0))  # [N, S, D]
    d = ((evaluate(layers, x.reshape(-1, 3136)).reshape(3, 400, 1, -1) - o) ** 2).sum(-1)  # [N, S, C]
    lows, highs = [d.min(1).values], [d.max(1).values]
    for sign in (1.0, -1.0):  # PGD down (sign 1) and up, per class
        xs = z.unsqueeze(1).repeat(1, 3, 1)
        for _ in range(30):
            xs.requires_grad_(True)
            f = ((net(xs) - o.unsqueeze(0)) ** 2).sum(-1)
            g, = torch.autograd.grad(f.sum(), xs)
            with torch.no_grad():
                xs = torch.minimum(torch.maximum(xs - sign * eps / 5 * g.sign(), lo.unsqueeze(1)), hi.unsqueeze(1))
        with torch.no_grad():
            f = ((net(xs) - o.unsqueeze(0)) ** 2).sum(-1)
        (lows if sign > 0 else highs).append(f)
    reached_lo = torch.stack(lows).min(0).values
    reached_hi = torch.stack(highs).max(0).values
    assert bool((lower <= reached_lo).all()) and bool((upper >= reached_hi).all())
    assert bool((lower > ilo).any()) and bool((upper < ihi).any())  # the refinement does something
