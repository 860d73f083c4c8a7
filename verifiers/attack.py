"""Falsify certificates: sample and attack points of each box's region, count violations.

A certificate says the rule flags every point of R(z) (``certified_ood``) or none
(``certified_id``). This module looks for a point that breaks it, from outside the bound
code: uniform samples (L-inf: half of them at random vertices), then PGD that pushes the
rule's margin toward the opposite verdict (up for certified_id, down for certified_ood).
Every visited point is evaluated with the monitor's own float32 scores (``Score.score``)
and its rule (``Rule.evaluate``); a point whose flag contradicts the verdict is a
violation. The gradient uses the scores' pure functions (one entry per kind in
:data:`DIFFERENTIABLE`); a kind without one is still sampled, not attacked.

>>> sorted(DIFFERENTIABLE)
['energy', 'entropy', 'knn', 'mahalanobis', 'max_logit', 'msp']
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["AttackResult", "attack_certificates", "DIFFERENTIABLE", "sample_region", "project"]


def _energy(score, x):
    from certood.scores.energy import energy_score

    return energy_score(x, score.temperature)


def _msp(score, x):
    from certood.scores.msp import msp_score

    return msp_score(x, score.temperature)


def _max_logit(score, x):
    return -x.max(dim=-1).values


def _entropy(score, x):
    from certood.scores.entropy import entropy_score

    return entropy_score(x)


def _mahalanobis(score, x):
    from certood.scores.mahalanobis import mahalanobis_score, precision_factor

    # the factor is an eigendecomposition: once per fitted precision, not per PGD step
    if getattr(score, "_factor_of", None) is not score.precision:
        score._factor, score._factor_of = precision_factor(score.precision), score.precision
    return mahalanobis_score(x, score.means, score.precision, score._factor)


def _knn(score, x):
    from certood.scores.knn import knn_score

    return knn_score(x, score.bank.to(x.dtype), score.k)


DIFFERENTIABLE: dict[str, Callable] = {
    "energy": _energy, "msp": _msp, "max_logit": _max_logit, "entropy": _entropy,
    "mahalanobis": _mahalanobis, "knn": _knn,
}


@dataclass
class AttackResult:
    n_boxes: int = 0
    n_points: int = 0
    violations: list[dict] = field(default_factory=list)  # {box, verdict, flag, margin}
    # per box (index into the verdicts): every score's [min, max] over the points visited
    score_ranges: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    points_per_box: dict[int, int] = field(default_factory=dict)

    @property
    def n_violations(self) -> int:
        return len(self.violations)


def project(x: Tensor, z: Tensor, eps: float, norm: float, nonnegative: bool) -> Tensor:
    """Project ``x`` onto ``{||x - z|| <= eps}`` (then onto ``x >= 0``, which keeps it in the
    ball because ``z >= 0``)."""
    if norm == math.inf:
        x = torch.maximum(torch.minimum(x, z + eps), z - eps)
    else:
        d = x - z
        n = d.flatten(1).norm(dim=1).clamp(min=1e-30).reshape(-1, *[1] * (x.dim() - 1))
        x = z + d * torch.clamp(eps / n, max=1.0)
    return x.clamp(min=0) if nonnegative else x


def sample_region(z: Tensor, eps: float, norm: float, nonnegative: bool, n: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """``n`` points per row of ``z`` ([B, D] -> [B, n, D]): uniform in the region; for L-inf
    half of them are random vertices of the box."""
    b, d = z.shape
    zz = z.unsqueeze(1).expand(b, n, d)
    if norm == math.inf:
        u = torch.rand(b, n, d, generator=generator, dtype=z.dtype) * 2 - 1
        corners = torch.sign(torch.rand(b, n, d, generator=generator, dtype=z.dtype) - 0.5)
        half = torch.arange(n) < n // 2
        u = torch.where(half.reshape(1, n, 1), corners, u)
        x = zz + eps * u
    else:
        g = torch.randn(b, n, d, generator=generator, dtype=z.dtype)
        g = g / g.norm(dim=2, keepdim=True).clamp(min=1e-30)
        r = torch.rand(b, n, 1, generator=generator, dtype=z.dtype) ** (1.0 / d)
        x = zz + eps * r * g
    return project(x.reshape(b * n, d), zz.reshape(b * n, d), eps, norm, nonnegative).reshape(b, n, d)


class _Scorer:
    """Forward from tap features to every score of the spec (float32, as the monitor runs)."""

    def __init__(self, spec, scores, head: nn.Module, point: str, values: dict[str, Tensor]):
        from certood.certify import TAP_ORDER, split_head

        self.spec, self.scores, self.point, self.values = spec, scores, point, values
        self.head = head.eval()
        self.prefix, self.classifier = split_head(head)
        self.order = TAP_ORDER

    def features(self, x: Tensor) -> dict[str, Tensor]:
        h = self.prefix(x) if self.classifier is not None else None
        logits = self.classifier(h) if self.classifier is not None else self.head(x)
        return {self.point: x, "box_head.output": h if h is not None else x, "cls_logits": logits[:, 1:]}

    def __call__(self, x: Tensor, box: Tensor, differentiable: bool) -> dict[str, Tensor]:
        """Scores at points ``x`` [P, D] of boxes ``box`` [P] (for constant scores)."""
        feats = self.features(x)
        out = {}
        for name, s in self.spec.scores.items():
            point = self.spec.taps[s.tap]
            if self.order.index(point) < self.order.index(self.point) or self.scores.get(name) is None:
                out[name] = self.values[name][box].double()  # constant here (or not evaluable)
                continue
            f = feats[point] if point != self.point else x
            if differentiable and s.kind in DIFFERENTIABLE:
                out[name] = DIFFERENTIABLE[s.kind](self.scores[name], f).double()
            else:
                out[name] = self.scores[name].score(f.detach()).double()
        return out


def attack_certificates(spec, scores: dict, thresholds: dict[str, float], head: nn.Module, point: str,
                        z: Tensor, verdicts: list[str], values: dict[str, Tensor], eps: float,
                        norm: float = math.inf, nonnegative: bool = True, n_samples: int = 500,
                        steps: int = 50, restarts: int = 2, seed: int = 0, chunk: int = 8,
                        labels: Tensor | None = None, class_thresholds: dict | None = None,
                        score_extremes: bool = False) -> AttackResult:
    """Look for points of R(z) whose flag contradicts each certified verdict.

    ``z`` [N, D] features at tap point ``point``, ``verdicts`` per box (undecided boxes are
    skipped), ``values`` the boxes' own scores (for scores read before the tap); ``labels``
    and ``class_thresholds`` (name -> per-label table) for rules with ``t.NAME[class]``.
    The attack runs in the head's precision (a float64 head: float64 points and scores).
    ``score_extremes``: PGD also pushes each differentiable score up and down, so that
    ``score_ranges`` (every box's score range over the visited points) can refute stored
    score bounds, not only verdicts.
    """
    from certood.certify import margin_at
    from certood.spec.rule import class_key

    tables = {class_key(k): torch.as_tensor(v, dtype=torch.float64).flatten()
              for k, v in (class_thresholds or {}).items()}
    all_labels = labels if labels is not None else torch.zeros(len(verdicts), dtype=torch.long)

    def per_point(box: Tensor) -> tuple[dict, dict, Tensor]:
        """(thresholds for Rule.evaluate, per point thresholds for margin_at, labels)."""
        lab = all_labels[box].long()
        return ({**thresholds, **tables}, {**thresholds, **{k: t[lab] for k, t in tables.items()}}, lab)

    gen = torch.Generator().manual_seed(seed)
    result = AttackResult()
    scorer = _Scorer(spec, scores, head, point, values)
    rule = spec.rule
    chosen = [i for i, v in enumerate(verdicts) if v in ("certified_ood", "certified_id")]
    dtype = next(head.parameters()).dtype
    z = z.detach().flatten(1).to(dtype)
    for s in range(0, len(chosen), chunk):
        idx = torch.tensor(chosen[s:s + chunk], dtype=torch.long)
        zb = z[idx]
        want_flag = torch.tensor([verdicts[i] == "certified_ood" for i in idx.tolist()])
        result.n_boxes += len(idx)

        def check(x: Tensor, box_rows: Tensor) -> None:
            th_eval, th_point, lab = per_point(idx[box_rows])
            with torch.no_grad():
                vals = scorer(x, idx[box_rows], differentiable=False)
                flags = rule.evaluate(vals, th_eval, lab)
                margin = margin_at(rule.tree, vals, th_point)
            result.n_points += x.shape[0]
            for j in box_rows.unique().tolist():
                b, mine = int(idx[j]), box_rows == j
                result.points_per_box[b] = result.points_per_box.get(b, 0) + int(mine.sum())
                ranges = result.score_ranges.setdefault(b, {})
                for name, v in vals.items():
                    lo, hi = float(v[mine].min()), float(v[mine].max())
                    old = ranges.get(name, [math.inf, -math.inf])
                    ranges[name] = [min(old[0], lo), max(old[1], hi)]
            bad = flags != want_flag[box_rows]
            for j in bad.nonzero().flatten().tolist():
                b = int(idx[box_rows[j]])
                result.violations.append({"box": b, "verdict": verdicts[b], "flag": bool(flags[j]),
                                          "margin": float(margin[j])})

        # 1. samples
        x = sample_region(zb, eps, norm, nonnegative, n_samples, gen)
        rows = torch.arange(len(idx)).repeat_interleave(n_samples)
        check(x.reshape(-1, zb.shape[1]), rows)
        # 2. PGD toward the opposite verdict: up for certified_id, down for certified_ood
        th_point = per_point(idx[torch.arange(len(idx)).repeat(restarts)])[1]
        sign = torch.where(want_flag, -1.0, 1.0).to(torch.float64)

        def rule_objective(vals):
            return sign.repeat(restarts) * margin_at(rule.tree, vals, th_point)

        objectives = [rule_objective]
        if score_extremes:  # 3. each score up and down (the stored bounds' two ends)
            for name, s_ in spec.scores.items():
                if s_.kind in DIFFERENTIABLE and name in scores and scores[name] is not None:
                    for direction in (1.0, -1.0):
                        objectives.append(lambda vals, n=name, d=direction: d * vals[n])
        for objective in objectives:
            _pgd(scorer, objective, zb, idx, eps, norm, nonnegative, steps, restarts, gen, check)
    return result


def _pgd(scorer, objective, zb: Tensor, idx: Tensor, eps: float, norm: float, nonnegative: bool, steps: int,
         restarts: int, gen, check) -> None:
    """Projected gradient ascent of ``objective(scores)`` (one value per point) from random
    starts in each region; every iterate is passed to ``check``."""
    zr = zb.repeat(restarts, 1)
    rows = torch.arange(len(idx)).repeat(restarts)
    x = sample_region(zr, eps, norm, nonnegative, 1, gen).squeeze(1)
    step = 2.5 * eps / steps
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            vals = scorer(x, idx[rows], differentiable=True)
            total = objective(vals).sum()
            if not total.requires_grad:
                break  # the objective does not depend on the features (a constant score)
            grad, = torch.autograd.grad(total, x, allow_unused=True)
        if grad is None:
            break
        with torch.no_grad():
            if norm == math.inf:
                x = x + step * grad.sign()
            else:
                x = x + step * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-30)
            x = project(x, zr, eps, norm, nonnegative)
        check(x.detach(), rows)
