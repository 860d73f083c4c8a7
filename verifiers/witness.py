"""Counterexamples: a point of a box's region where the rule decides the other way.

A box whose region holds points the rule flags and points it does not can never be
certified at that eps, by any method: its ``undecided`` verdict is then a fact, not a
looseness. :func:`find_witnesses` looks for such a point for each box, from the box's own
flag: a few region vertices, then sign-gradient steps (PGD) on the rule's margin toward the
other decision (certood.verifiers.attack's scorer: the monitor's own float32 scores, and
``Rule.evaluate`` on them, so the point is judged exactly as the monitor would judge it).

A witness records the point (``point``, float32, as the monitor evaluates it), a short hash
of its bytes, its scores, its flag and margin, and its L-inf / L2 distance to the box's
feature; :func:`witness_hash` and :func:`evaluate_witness` re-derive both from the point
alone, which is what a re-check does.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Witness", "find_witnesses", "witness_hash", "evaluate_witness"]

HASH_CHARS = 16


@dataclass(frozen=True)
class Witness:
    """A point of the region whose flag differs from the box's own."""

    point: Tensor  # [D] float32
    sha256: str  # first HASH_CHARS hex digits of sha256 over the float32 little-endian bytes
    scores: dict[str, float]
    flag: bool
    margin: float
    linf: float
    l2: float
    step: int  # 0..: which attack point found it (vertices first, then PGD steps)

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "flag": self.flag, "margin": self.margin,
                "scores": {k: float(v) for k, v in self.scores.items()}, "linf": self.linf, "l2": self.l2,
                "step": self.step}


def witness_hash(point: Tensor) -> str:
    """Short sha256 of a point's float32 little-endian bytes (a stable name for it)."""
    data = point.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes()
    return hashlib.sha256(data).hexdigest()[:HASH_CHARS]


def evaluate_witness(spec, scores: dict, thresholds: dict, head: nn.Module, point: str, x: Tensor,
                     values: dict[str, Tensor], label: int = 0,
                     class_thresholds: dict | None = None) -> tuple[bool, dict[str, float]]:
    """The rule's flag and the scores at one point ``x`` [D] (values: the box's own scores,
    for scores read before the tap)."""
    from certood.spec.rule import class_key
    from certood.verifiers.attack import _Scorer

    tables = {class_key(k): torch.as_tensor(v, dtype=torch.float64).flatten()
              for k, v in (class_thresholds or {}).items()}
    scorer = _Scorer(spec, scores, head, point, {k: v.reshape(-1)[:1] for k, v in values.items()})
    dtype = next(head.parameters()).dtype
    with torch.no_grad():
        vals = scorer(x.reshape(1, -1).to(dtype), torch.zeros(1, dtype=torch.long), differentiable=False)
        flag = spec.rule.evaluate(vals, {**thresholds, **tables}, torch.tensor([label]))
    return bool(flag[0]), {k: float(v[0]) for k, v in vals.items()}


def find_witnesses(spec, scores: dict, thresholds: dict, head: nn.Module, point: str, z: Tensor,
                   flags: Tensor, values: dict[str, Tensor], eps: float, norm: float = math.inf,
                   nonnegative: bool = True, steps: int = 10, vertices: int = 4, seed: int = 0,
                   labels: Tensor | None = None, class_thresholds: dict | None = None) -> list[Witness | None]:
    """For each box (rows of ``z``), a point of its region whose flag differs from
    ``flags[i]``, or None where none was found (which proves nothing)."""
    from certood.certify import margin_at
    from certood.spec.rule import class_key
    from certood.verifiers.attack import _Scorer, project, sample_region

    n = z.shape[0]
    if n == 0:
        return []
    dtype = next(head.parameters()).dtype
    z = z.detach().flatten(1).to(dtype)
    eps = float(eps)
    # a hair inside the region: float32 rounding of z +- eps cannot step out of it (and every
    # point is checked in float64 before it counts)
    reach = eps * (1 - 1e-4)
    tables = {class_key(k): torch.as_tensor(v, dtype=torch.float64).flatten()
              for k, v in (class_thresholds or {}).items()}
    lab = (labels if labels is not None else torch.zeros(n, dtype=torch.long)).long()
    scorer = _Scorer(spec, scores, head, point, values)
    rule = spec.rule
    gen = torch.Generator().manual_seed(seed)
    found: list[Witness | None] = [None] * n
    want = ~flags.bool()  # the other decision
    boxes = torch.arange(n)

    def check(x: Tensor, rows: Tensor, step: int) -> None:
        th_point = {**thresholds, **{k: t[lab[rows]] for k, t in tables.items()}}
        with torch.no_grad():
            vals = scorer(x, rows, differentiable=False)
            fl = rule.evaluate(vals, {**thresholds, **tables}, lab[rows])
            margin = margin_at(rule.tree, vals, th_point)
            d = x.double() - z[rows].double()
            inside = (d.abs().amax(1) if norm == math.inf else d.norm(dim=1)) <= eps
            if nonnegative:
                inside &= (x >= 0).all(1)
        for j in ((fl == want[rows]) & inside).nonzero().flatten().tolist():
            i = int(rows[j])
            if found[i] is None:
                d = (x[j].double() - z[i].double())
                found[i] = Witness(x[j].detach().float().clone(), witness_hash(x[j]),
                                   {k: float(v[j]) for k, v in vals.items()}, bool(fl[j]), float(margin[j]),
                                   float(d.abs().max()), float(d.norm()), step)

    # 1. random vertices (L-inf; half of the points) and points of the region, a few per box
    if vertices:
        x = sample_region(z, reach, norm, nonnegative, vertices, gen)  # [n, V, D]
        rows = boxes.repeat_interleave(vertices)
        check(x.reshape(n * vertices, -1), rows, 0)
    # 2. PGD on the margin toward the other decision, from the centre, for boxes still without one
    rows = torch.tensor([i for i in range(n) if found[i] is None], dtype=torch.long)
    if not len(rows):
        return found
    sign = torch.where(want[rows], 1.0, -1.0).to(dtype)  # raise the margin to flag, lower it to unflag
    x = z[rows].clone()
    zr = z[rows]
    th_point = {**thresholds, **{k: t[lab[rows]] for k, t in tables.items()}}
    for t in range(1, steps + 1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            vals = scorer(x, rows, differentiable=True)
            objective = (sign.double() * margin_at(rule.tree, vals, th_point)).sum()
            if not objective.requires_grad:  # no differentiable score in the rule: vertices only
                break
            grad, = torch.autograd.grad(objective, x, allow_unused=True)
        if grad is None:
            break
        with torch.no_grad():
            if norm == math.inf:
                x = x + 2.5 * reach / steps * grad.sign()
            else:
                x = x + 2.5 * reach / steps * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-30)
            x = project(x, zr, reach, norm, nonnegative)
        check(x.detach(), rows, t)
    return found
