"""Soundness and tightness of certood.verifiers.bound_module.

Soundness is checked from outside the bound code: the network is evaluated at the centre,
at uniform samples, at box vertices (L-inf) or on the sphere (L2), and at points found by a
PGD attack that pushes each output (or each row of C) up and down inside the region. Every
value must lie inside the bounds. The attack itself is checked on a linear network, where
the exact extremes are known in closed form.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from certood.errors import CertoodError
from certood.verifiers import METHODS, Bounds, bound_module

# float32 rounding between the bound computation and the forward pass; far below any
# looseness a real soundness bug would produce on these nets.
ATOL = 1e-4
N_SAMPLES = 500
PGD_STEPS = 50


# --- networks ---------------------------------------------------------------------------

def _seeded(seed: int):
    def wrap(build):
        @functools.wraps(build)
        def built(*args, **kwargs):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return build(*args, **kwargs)

        return built

    return wrap


@_seeded(0)
def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()


@_seeded(1)
def make_conv(pool: str = "avg") -> nn.Module:
    # AvgPool -> Flatten -> Linear -> ReLU with batch > 1 is the path that needs fix 6.
    pooling = nn.AvgPool2d(2) if pool == "avg" else nn.AdaptiveAvgPool2d(2)
    side = 4 if pool == "avg" else 2
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():  # non-trivial eval-mode statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), bn, nn.ReLU(), pooling, nn.Flatten(),
        nn.Linear(4 * side * side, 16), nn.ReLU(), nn.Linear(16, 4),
    ).eval()


@_seeded(2)
def make_inputs(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape)


# name -> (builder, input shape with batch 3, L-inf eps, L2 eps)
NETS = {
    "mlp": (make_mlp, (3, 16), 0.1, 0.3),
    "conv": (make_conv, (3, 2, 8, 8), 0.05, 0.3),
}


def margin_spec(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """C with rows e_y - e_j (j != y), y the class predicted at the centre."""
    with torch.no_grad():
        out = net(x)
    n = out.shape[1]
    y = out.argmax(1)
    C = torch.zeros(x.shape[0], n - 1, n)
    for b in range(x.shape[0]):
        others = [j for j in range(n) if j != y[b]]
        C[b, torch.arange(n - 1), y[b]] = 1.0
        C[b, torch.arange(n - 1), others] = -1.0
    return C


@functools.lru_cache(maxsize=None)
def case(name: str, method: str, with_spec: bool, norm: float):
    """Bounds for one configuration, computed once per test session."""
    build, shape, eps_inf, eps_2 = NETS[name]
    net, x = build(), make_inputs(shape)
    eps = eps_inf if norm == math.inf else eps_2
    C = margin_spec(net, x) if with_spec else None
    bounds = bound_module(net, x, eps=eps, norm=norm, method=method, C=C)
    return net, x, eps, C, bounds


# --- points inside the region -----------------------------------------------------------

def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], *([1] * (x.dim() - 1)))


def project(z: torch.Tensor, x: torch.Tensor, eps: float, norm: float) -> torch.Tensor:
    if norm == math.inf:
        return torch.max(torch.min(z, x + eps), x - eps)
    d = z - x
    length = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x + d * _per_sample((eps / length).clamp(max=1.0), x)


def region_points(x: torch.Tensor, eps: float, norm: float, n: int, gen: torch.Generator):
    """Uniform samples, and vertices (L-inf) or sphere points (L2): (n, *x.shape) each."""
    shape = (n, *x.shape)
    if norm == math.inf:
        uniform = x + eps * (2 * torch.rand(shape, generator=gen) - 1)
        vertices = x + eps * torch.randint(0, 2, shape, generator=gen).mul(2).sub(1).float()
        return uniform, vertices
    d = torch.randn(shape, generator=gen)
    d = d / d.flatten(2).norm(dim=2).view(n, x.shape[0], *([1] * (x.dim() - 1)))
    dim = x[0].numel()
    radius = eps * torch.rand(n, x.shape[0], generator=gen) ** (1.0 / dim)
    ball = x + d * radius.view(n, x.shape[0], *([1] * (x.dim() - 1)))
    sphere = x + eps * d
    return ball, sphere


def pgd_extremes(net, x, eps, norm, C, gen, steps=PGD_STEPS):
    """Attack points for every objective (output k, or row k of C) and direction.

    Returns the objective values at the final points, shape (2, batch, n_objectives):
    [0] after minimising each objective, [1] after maximising it.
    """
    with torch.no_grad():
        n_obj = C.shape[1] if C is not None else net(x).shape[1]
    batch = x.shape[0]
    # One copy of the batch per (direction, objective): shape (2 * n_obj * batch, ...).
    reps = 2 * n_obj
    centre = x.repeat(reps, *([1] * (x.dim() - 1)))
    sign = torch.tensor([-1.0, 1.0]).repeat_interleave(n_obj * batch)
    obj = torch.arange(n_obj).repeat_interleave(batch).repeat(2)
    spec = C.repeat(reps, 1, 1) if C is not None else None
    start = centre + eps * (2 * torch.rand(centre.shape, generator=gen) - 1) / (
        1.0 if norm == math.inf else math.sqrt(x[0].numel())
    )
    z = project(start, centre, eps, norm)
    step = 2.5 * eps / steps

    def objective(points):
        out = net(points)
        if spec is not None:
            out = torch.einsum("bso,bo->bs", spec, out)
        return out.gather(1, obj[:, None]).squeeze(1)

    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        (sign * objective(z)).sum().backward()
        g = z.grad
        if norm == math.inf:
            z = z + step * g.sign()
        else:
            z = z + step * g / _per_sample(g.flatten(1).norm(dim=1).clamp_min(1e-12), z)
        z = project(z.detach(), centre, eps, norm)
    with torch.no_grad():
        values = objective(z)
    return values.view(2, n_obj, batch).transpose(1, 2)


def outputs(net, points, C):
    """net (or C @ net) at points of shape (n, batch, ...) -> (n, batch, n_objectives)."""
    n, batch = points.shape[:2]
    with torch.no_grad():
        out = net(points.flatten(0, 1)).view(n, batch, -1)
    return out if C is None else torch.einsum("bso,nbo->nbs", C, out)


def assert_inside(values: torch.Tensor, bounds: Bounds, what: str) -> None:
    below = (bounds.lower - values - ATOL).clamp_min(0).max().item()
    above = (values - bounds.upper - ATOL).clamp_min(0).max().item()
    assert below == 0 and above == 0, (
        f"{bounds.method}: {what} outside the bounds (by {max(below, above):.3g} beyond atol)"
    )


# --- soundness ----------------------------------------------------------------------------

@pytest.mark.parametrize("with_spec", [False, True], ids=["outputs", "margins"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
@pytest.mark.parametrize("name", list(NETS))
def test_bounds_contain_sampled_and_attacked_outputs(name, norm, method, with_spec):
    net, x, eps, C, bounds = case(name, method, with_spec, norm)
    n_obj = C.shape[1] if C is not None else 4
    assert bounds.lower.shape == bounds.upper.shape == (x.shape[0], n_obj)
    assert bounds.method == method
    gen = torch.Generator().manual_seed(3)

    assert_inside(outputs(net, x[None], C)[0], bounds, "centre")
    inner, outer = region_points(x, eps, norm, N_SAMPLES, gen)
    assert_inside(outputs(net, inner, C), bounds, "uniform sample")
    assert_inside(outputs(net, outer, C), bounds, "vertex" if norm == math.inf else "sphere point")
    attacked = pgd_extremes(net, x, eps, norm, C, gen)
    assert_inside(attacked[0], bounds, "PGD minimum")
    assert_inside(attacked[1], bounds, "PGD maximum")


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_pgd_reaches_the_exact_extremes_of_a_linear_net(norm):
    # Without ReLUs the extremes are known: f(x) +- eps * ||w_k||_dual. If the attack
    # cannot get near them, the soundness test above proves little.
    net = _seeded(4)(lambda: nn.Linear(16, 3))()
    x = make_inputs((2, 16))
    eps = 0.1
    dual = 1 if norm == math.inf else 2
    with torch.no_grad():
        reach = eps * net.weight.norm(p=dual, dim=1)
        exact_min, exact_max = net(x) - reach, net(x) + reach
    found = pgd_extremes(net, x, eps, norm, None, torch.Generator().manual_seed(5))
    torch.testing.assert_close(found[0], exact_min, atol=1e-3 * reach.max().item(), rtol=0)
    torch.testing.assert_close(found[1], exact_max, atol=1e-3 * reach.max().item(), rtol=0)
    # and CROWN is exact on a linear net
    b = bound_module(net, x, eps=eps, norm=norm, method="crown")
    torch.testing.assert_close(b.lower, exact_min, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.upper, exact_max, atol=1e-5, rtol=1e-5)


def test_adaptive_avg_pool_conv_net_is_sound():
    net, x, eps = make_conv(pool="adaptive"), make_inputs((3, 2, 8, 8)), 0.05
    gen = torch.Generator().manual_seed(6)
    for method in METHODS:
        b = bound_module(net, x, eps=eps, method=method, alpha_iterations=5)
        inner, outer = region_points(x, eps, math.inf, N_SAMPLES, gen)
        assert_inside(outputs(net, inner, None), b, "uniform sample")
        assert_inside(outputs(net, outer, None), b, "vertex")
        attacked = pgd_extremes(net, x, eps, math.inf, None, gen)
        assert_inside(attacked[0], b, "PGD minimum")
        assert_inside(attacked[1], b, "PGD maximum")


# --- tightness ----------------------------------------------------------------------------

@pytest.mark.parametrize("with_spec", [False, True], ids=["outputs", "margins"])
@pytest.mark.parametrize("name", list(NETS))
def test_crown_is_tighter_than_ibp_on_average(name, with_spec):
    *_, ibp = case(name, "ibp", with_spec, math.inf)
    *_, crown = case(name, "crown", with_spec, math.inf)
    assert (crown.upper - crown.lower).mean() < (ibp.upper - ibp.lower).mean()


@pytest.mark.parametrize("with_spec", [False, True], ids=["outputs", "margins"])
@pytest.mark.parametrize("name", list(NETS))
def test_alpha_crown_is_strictly_tighter_than_crown(name, with_spec):
    # Catches compat fix 5 regressing: without it alpha-CROWN silently returns CROWN.
    *_, crown = case(name, "crown", with_spec, math.inf)
    *_, alpha = case(name, "alpha-crown", with_spec, math.inf)
    assert (alpha.lower >= crown.lower - ATOL).all()
    assert (alpha.upper <= crown.upper + ATOL).all()
    gain = (alpha.lower - crown.lower).mean() + (crown.upper - alpha.upper).mean()
    width = (crown.upper - crown.lower).mean()
    assert gain > 0.02 * width, f"alpha-CROWN gained only {gain:.3g} on a CROWN width of {width:.3g}"
