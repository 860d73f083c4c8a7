"""Sound bounds of a squared distance ``||u(x) - o||^2`` that keep the coordinates' coupling.

The Mahalanobis score is ``min_c ||u(x) - o_c||^2`` with ``u = L^T h(x)`` the whitened
penultimate features (``P = L L^T``) and ``o_c = L^T mu_c``. Summing the squares of interval
bounds of the ``u_j`` (certood.certify's interval bound) lets every coordinate sit at its own
extreme, each at a different ``x``; on the demo that leaves most of the range unreachable
(an attack reaches about 10-15% of it). Here both ends are bounded through *one* linear
function of ``u`` per class, which a linear bound engine (CROWN) bounds over the whole
region at once, so the coordinates stay coupled through ``x``:

- **lower** (Fenchel / Lagrangian weak duality): for every ``nu`` and real ``y``,
  ``y^2 >= nu y - nu^2 / 4``, so for every ``x`` of the region

      ||u(x) - o||^2 >= nu . u(x) - nu . o - ||nu||^2 / 4 >= LB(nu . u) - nu . o - ||nu||^2 / 4

  with ``LB`` any sound lower bound of ``nu . u`` over the region. Valid for *any* ``nu``:
  no optimality or solver trust is needed, only that ``LB`` is sound. The value is best at
  ``nu = 2 (u* - o)``, ``u*`` the minimiser; several candidates are bounded and the best is
  kept: the minimiser of the decoupled problem (the clamp of ``o`` into the interval bounds:
  with per-coordinate bounds it gives the interval bound back exactly), the point a short
  projected-gradient search finds, and blends of the two.
- **upper** (secant: a convex function lies below its chords): for ``y`` in
  ``[a, b]``, ``y^2 <= (a + b) y - a b``, so with ``y = u_j - o_j`` in its interval bound

      ||u(x) - o||^2 <= UB(s . u) - s . o - sum_j a_j b_j,     s_j = a_j + b_j

  (``a, b`` the bounds of ``u - o``); with per-coordinate bounds of ``s . u`` it is at most
  the interval bound ``sum_j max(a_j^2, b_j^2)``.

Callers intersect with the interval bound (both are sound). ``spec`` is the bound engine:
``spec(C) -> (lower, upper)`` of ``C[n] @ u(x)`` over box ``n``'s region, ``C`` ``[N, K, r]``.

>>> import torch
>>> lo, hi = torch.tensor([[-1.0, -1.0]]), torch.tensor([[1.0, 1.0]])
>>> o = torch.tensor([[3.0, 0.0]])
>>> def spec(C):  # u(x) = (x1 + x2, x1 - x2) over the box [-1, 1]^2: exact bounds of C u
...     A = torch.stack([C[..., 0] + C[..., 1], C[..., 0] - C[..., 1]], -1)
...     return -A.abs().sum(-1), A.abs().sum(-1)
>>> ul, uh = torch.tensor([[-2.0, -2.0]]), torch.tensor([[2.0, 2.0]])
>>> u_near = torch.tensor([[[2.0, 0.0]]])
>>> lower, upper = distance_bounds(spec, ul, uh, o, u_near)
>>> float(lower[0, 0]), float(upper[0, 0])
(1.0, 29.0)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["fenchel_lower", "secant_upper", "decoupled_nu", "distance_bounds", "nearest_points", "BLENDS"]

# Candidate multipliers: nu = BLENDS[k] * nu_search + (1 - BLENDS[k]) * nu_decoupled (the
# blends that did best on the demo's boxes; each costs one bounded row per class and box).
BLENDS = (1.0, 0.75, 0.5)


def fenchel_lower(lower_nu_u: Tensor, nu: Tensor, o: Tensor) -> Tensor:
    """``LB(nu . u) - nu . o - ||nu||^2 / 4``: a lower bound of ``||u - o||^2`` over the region
    (``lower_nu_u`` ``[...]`` a sound lower bound of ``nu . u``, ``nu`` and ``o`` ``[..., r]``)."""
    return lower_nu_u - (nu * o).sum(-1) - (nu * nu).sum(-1) / 4


def secant_upper(upper_s_u: Tensor, a: Tensor, b: Tensor, o: Tensor) -> Tensor:
    """``UB(s . u) - s . o - sum a b`` with ``s = a + b``: an upper bound of ``||u - o||^2``
    when ``a <= u - o <= b`` (``upper_s_u`` a sound upper bound of ``s . u``)."""
    return upper_s_u - ((a + b) * o).sum(-1) - (a * b).sum(-1)


def decoupled_nu(ul: Tensor, uh: Tensor, o: Tensor) -> Tensor:
    """``2 (clamp(o, ul, uh) - o)``: the optimal multiplier of the problem in which every
    ``u_j`` ranges over its interval on its own (``ul, uh`` ``[N, r]``, ``o`` ``[C, r]`` ->
    ``[N, C, r]``)."""
    return 2 * (torch.maximum(torch.minimum(o.unsqueeze(0), uh.unsqueeze(1)), ul.unsqueeze(1)) - o.unsqueeze(0))


def distance_bounds(spec: Callable[[Tensor], tuple[Tensor, Tensor]], ul: Tensor, uh: Tensor, o: Tensor,
                    u_near: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds ``[N, C]`` of ``||u(x) - o_c||^2`` over each box's region.

    ``ul, uh`` ``[N, r]``: sound bounds of ``u`` over the region; ``o`` ``[C, r]``;
    ``u_near`` ``[N, C, r]``: ``u`` at points of the region near each class's minimiser
    (from :func:`nearest_points`; only the choice of multipliers depends on it, never the
    soundness). One call of ``spec`` with ``(len(BLENDS) + 2) * C`` rows per box (one
    candidate is the decoupled multiplier alone).
    """
    ul, uh, o = ul.double(), uh.double(), o.double()
    n, r = ul.shape
    c = o.shape[0]
    nu_d = decoupled_nu(ul, uh, o)  # [N, C, r]
    cands = [nu_d]
    if u_near is not None:
        nu_s = 2 * (u_near.double() - o.unsqueeze(0))
        cands += [w * nu_s + (1 - w) * nu_d for w in BLENDS]
    a = ul.unsqueeze(1) - o.unsqueeze(0)  # bounds of u - o_c: [N, C, r]
    b = uh.unsqueeze(1) - o.unsqueeze(0)
    rows = torch.cat(cands + [a + b], dim=1)  # [N, (K + 1) C, r]
    lo, hi = spec(rows)
    k = len(cands)
    lower = torch.stack([fenchel_lower(lo[:, i * c:(i + 1) * c], cands[i], o.unsqueeze(0)) for i in range(k)])
    upper = secant_upper(hi[:, k * c:], a, b, o.unsqueeze(0))
    return lower.max(dim=0).values, upper


def nearest_points(forward: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, o: Tensor,
                   steps: int = 12) -> Tensor:
    """``u`` at a point of each box ``[lo, hi]`` (``[N, D]``) near the minimiser of
    ``||u(x) - o_c||^2``, per class: sign-gradient descent from the centre with a halving
    step, the best point kept (``forward``: ``x [P, D] -> u [P, r]``). Returns ``[N, C, r]``.
    A heuristic: it only chooses multipliers for :func:`distance_bounds`."""
    n, d = lo.shape
    c = o.shape[0]
    dtype = torch.float32  # a heuristic: float32 is enough
    lo3, hi3 = lo.to(dtype).unsqueeze(1), hi.to(dtype).unsqueeze(1)
    target = o.to(dtype).unsqueeze(0)
    x = ((lo3 + hi3) / 2).expand(n, c, d).clone()
    rad = (hi3 - lo3) / 2
    best_f = torch.full((n, c), float("inf"), dtype=dtype)
    best_u = None
    step = 1.0
    for t in range(steps + 1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            u = forward(x.reshape(n * c, d)).reshape(n, c, -1)
            f = ((u - target) ** 2).sum(-1)
            g, = torch.autograd.grad(f.sum(), x)
        with torch.no_grad():
            better = f < best_f
            best_f = torch.where(better, f, best_f)
            best_u = u.detach() if best_u is None else torch.where(better.unsqueeze(-1), u.detach(), best_u)
            if t == steps:
                break
            x = torch.minimum(torch.maximum(x - step * rad * g.sign(), lo3), hi3)
            if t % 3 == 2:
                step /= 2
    return best_u.double()
