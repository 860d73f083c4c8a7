"""Branch and bound over unstable ReLUs: prove what one CROWN pass over the whole box cannot.

A box's region is split along the sign of one unstable hidden neuron at a time: the two
children are ``{x in box : z_k(x) >= 0}`` (active: ``relu(z_k) = z_k``) and
``{x : z_k(x) <= 0}`` (inactive), which together cover the parent. Each subdomain is
bounded by certood's sparse CROWN with the split phases fixed
(:meth:`certood.verifiers.sparse_crown.SparseCrown.prepare` with ``phases``: the fixed
neuron's bounds are clipped at 0, every later layer is bounded again, so every bound holds
over the subdomain), and ``decide`` says for each subdomain whether the property is proven
there. The property holds over the region when it is proven on every leaf; a leaf whose
clipped bounds cross is empty (no point of the box has its phases) and needs nothing.

Branching (BaBSR-style: Bunel et al., "Branch and Bound for Piecewise Linear Neural Network
Verification", JMLR 2020, score = the relaxation's intercept weighted by how much the
neuron moves the bounded outputs): for an unstable neuron with bounds ``l < 0 < u``, the
triangle relaxation's upper line is ``u (z - l) / (u - l)``, off by at most
``-u l / (u - l)``; that gap is multiplied by the neuron's sensitivity ``s_k``: for the
last hidden layer ``s = |W_out|^T w`` with ``w`` the weight of each output row (``decide``
supplies it, e.g. 1 / the width of the row's bound, so every row's relative looseness
counts), for earlier layers ``s_j = |W_{j+1}|^T (s_{j+1} * not-inactive)``. The neuron with
the largest score among the unfixed ones is split. Subdomains are bounded ``batch`` at a
time, the open leaves with the worst margin first. A child's bounds are intersected with
its parent's, layer by layer (both hold over the child).

Budget: at most ``max_subdomains`` bounded subdomains and ``time_s`` seconds per box; then
the result is ``open`` with the worst margin among the open leaves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["BabResult", "branch_and_bound", "split_scores"]


@dataclass(frozen=True)
class BabResult:
    """``status``: ``proved`` (every leaf proven or empty) or ``open`` (budget spent);
    ``margin``: the worst margin among the open leaves (positive once proven: the worst of
    the proven leaves)."""

    status: str
    subdomains: int
    leaves: int
    seconds: float
    margin: float
    reason: str = ""


def split_scores(state, weights: list[tuple[Tensor, Tensor]], out_weight: Tensor) -> list[Tensor]:
    """BaBSR-style scores ``[N, width]`` per hidden layer (0 for stable neurons): the triangle
    relaxation's largest gap ``-u l / (u - l)`` times the sensitivity (module docstring);
    ``out_weight`` ``[N, outputs]`` weighs the output rows."""
    n_hidden = len(state.pre)
    device = state.pre[0][0].device  # the subdomains' device (the weights may sit elsewhere)
    sens = out_weight.double().to(device) @ weights[-1][0].to(device).abs()  # [N, last hidden width]
    scores: list[Tensor] = [torch.zeros(0)] * n_hidden
    for j in range(n_hidden - 1, -1, -1):
        lo, hi = state.pre[j]
        unstable = (lo < 0) & (hi > 0)
        gap = torch.where(unstable, -hi * lo / (hi - lo).clamp(min=1e-300), torch.zeros_like(lo))
        scores[j] = gap * sens
        if j > 0:
            alive = (hi > 0).to(sens.dtype)  # inactive neurons pass nothing back
            sens = (sens * alive) @ weights[j][0].to(device).abs()
    return scores


def branch_and_bound(crown, lower: Tensor, upper: Tensor,
                     decide: Callable[[object, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
                     max_subdomains: int = 64, time_s: float = 2.0, batch: int = 8) -> BabResult:
    """Prove a property of one box ``[lower, upper]`` (``[1, D]``) by splitting ReLUs.

    ``crown``: a :class:`~certood.verifiers.sparse_crown.SparseCrown`; ``decide(state, lo,
    hi)`` gets a batch of subdomains (their CrownState and output bounds ``[B, outputs]``)
    and returns ``(proven [B] bool, margin [B], row_weight [B, outputs])``.
    """
    start = time.perf_counter()
    widths = [W.shape[0] for W, _ in crown.weights[:-1]]
    if not widths:
        return BabResult("open", 0, 1, 0.0, float("nan"), "no hidden ReLU to split")
    free = [torch.zeros(1, w, dtype=torch.int8) for w in widths]
    state = crown.prepare(lower, upper, free)
    lo, hi = crown.final_bounds(state)
    proven, margin, weight = decide(state, lo, hi)
    n_bounded, worst_proven = 1, float("inf")
    if bool(proven[0]):
        return BabResult("proved", 1, 1, time.perf_counter() - start, float(margin[0]))
    # open leaves: (margin, phases [per layer: [width] int8], scores [per layer], hidden bounds,
    # output bounds): a child's bounds are intersected with its parent's (both hold over it)
    open_leaves = [(float(margin[0]), [p[0] for p in free], [s[0] for s in split_scores(state, crown.weights, weight)],
                    [(a[0], b[0]) for a, b in state.pre], (lo[0], hi[0]))]
    while open_leaves:
        if n_bounded >= max_subdomains or time.perf_counter() - start > time_s:
            m = min(leaf[0] for leaf in open_leaves)
            why = (f"branch and bound budget spent ({n_bounded} subdomains, {time.perf_counter() - start:.2f} s): "
                   f"{len(open_leaves)} open")
            return BabResult("open", n_bounded, len(open_leaves), time.perf_counter() - start, m, why)
        open_leaves.sort(key=lambda leaf: leaf[0])
        take, open_leaves = open_leaves[:max(1, batch // 2)], open_leaves[max(1, batch // 2):]
        children: list[list[Tensor]] = []
        parents: list[tuple] = []
        for _, phases, scores, pre, out in take:
            layer, neuron = _pick(phases, scores)
            if layer is None:  # nothing left to split: an exact relaxation that still fails
                return BabResult("open", n_bounded, len(open_leaves) + 1, time.perf_counter() - start,
                                 min(leaf[0] for leaf in take), "every unstable ReLU fixed; not proven")
            for phase in (1, -1):
                child = [p.clone() for p in phases]
                child[layer][neuron] = phase
                children.append(child)
                parents.append((pre, out))
        stacked = [torch.stack([c[j] for c in children]) for j in range(len(widths))]
        within = [(torch.stack([p[0][j][0] for p in parents]), torch.stack([p[0][j][1] for p in parents]))
                  for j in range(len(widths))]
        k = len(children)
        state = crown.prepare(lower.expand(k, -1), upper.expand(k, -1), stacked, within)
        lo, hi = crown.final_bounds(state)
        lo = torch.maximum(lo, torch.stack([p[1][0] for p in parents]))
        hi = torch.minimum(hi, torch.stack([p[1][1] for p in parents]))
        proven, margin, weight = decide(state, lo, hi)
        n_bounded += k
        scores = split_scores(state, crown.weights, weight)
        for i in range(k):
            if bool(state.empty[i]):
                continue
            if bool(proven[i]):
                worst_proven = min(worst_proven, float(margin[i]))
                continue
            open_leaves.append((float(margin[i]), children[i], [s[i] for s in scores],
                                [(a[i], b[i]) for a, b in state.pre], (lo[i], hi[i])))
    return BabResult("proved", n_bounded, 0, time.perf_counter() - start,
                     worst_proven if worst_proven < float("inf") else 0.0)


def _pick(phases: list[Tensor], scores: list[Tensor]) -> tuple[int | None, int | None]:
    """The unfixed neuron with the largest score (layer, index), or (None, None)."""
    best, where = 0.0, (None, None)
    for j, (p, s) in enumerate(zip(phases, scores)):
        s = torch.where(p == 0, s, torch.zeros_like(s))
        if s.numel() and float(s.max()) > best:
            best, where = float(s.max()), (j, int(s.argmax()))
    return where
