"""Certificates: what the rule says over a region of feature space around each box.

For a box with feature ``z`` at the certify tap, the region is

    R(z) = {z' : ||z' - z||_p <= eps}            (p = inf or 2)

intersected with ``z' >= 0`` when ``domain`` is ``nonnegative`` (the default: RoI features
of the demo backbone and the box-head output are post-ReLU, so negative features cannot
occur; with ``norm: 2`` the bound is computed over the whole ball, a superset, so the claim
holds on the intersection too). The monitored head (everything between the tap and the
scores: box-head MLP + classifier at ``box_head.input``, the classifier alone at
``box_head.output``) is bounded over R(z) -- by certood's sparse CROWN
(certood.verifiers.sparse_crown: auto_LiRPA's IBP/CROWN relaxation, computed only where it
can change the result) for Linear/ReLU heads under the L-inf norm, by auto_LiRPA otherwise and for
alpha-CROWN (``certify.engine: auto_lirpa`` always uses auto_LiRPA); score bounds follow from
those bounds, and the rule is decided under the score bounds:

- ``certified_ood``: the rule flags every point of R(z);
- ``certified_id``: the rule flags no point of R(z);
- ``undecided``: neither is proven; ``reason`` says why (bounds too loose, z3 timeout, a
  score without a bound, a failed self-check) and ``margin`` how far from a proof. Where a
  short attack (certood.verifiers.witness) finds a point of R(z) that the rule decides the
  other way than the box itself, the reason starts with ``counterexample:`` and the
  certificate carries the ``witness`` (see :class:`Certificate`): no method can certify
  that box at that eps.

``certify.method: bab`` bounds with CROWN, then, for boxes left undecided by loose bounds and
without a counterexample, splits the head's unstable ReLUs (certood.verifiers.bab) within
``timeout_s`` seconds and :data:`BAB_SUBDOMAINS` subdomains per box; such a certificate's
``score_bounds`` are the whole region's (which alone do not decide it): it is proven only
leaf by leaf, so a re-check must re-run the leaves.

How each score is bounded (one entry per kind in :data:`BOUNDERS`; a kind without one is
unbounded, ``[-inf, inf]``, so a rule that does not need it can still be decided):

- logit scores (energy, msp, max_logit, entropy) read bounds on the foreground logits and
  on every logit margin ``l_i - l_j`` (rows of one linear layer appended to the head, so
  CROWN bounds the margins directly, tighter than subtracting logit bounds);
- mahalanobis: the whitening map ``u = L^T h`` (``P = L L^T``) is appended as a linear layer,
  ``y_c = u - L^T mu_c``, then a sum-of-squares interval per class, min over classes; where
  the backend bounds per-box linear specifications (certood's sparse CROWN, auto_LiRPA, the
  float64 reference) and the method is not IBP, the boxes the rule leaves open get the
  coupled bound of certood.verifiers.quadratic (a Fenchel lower bound and a secant upper
  bound, each through one CROWN-bounded linear function of ``u`` per class: the whitened
  coordinates stay coupled through the input), intersected per class with the interval;
- knn: bounds of the features themselves, then cosine and distance intervals to every
  bank row, and the k-th smallest lower / upper distance.

A score reading a tap *before* the certify tap is not a function of ``z'``: its value is
the box's own (a point interval). Margins are in the rule's units (min/max semantics of
``and``/``or``, differences for comparisons): positive = the slack of a proof, negative =
how far an undecided box is from one.

Cost. The head's rows are bounded in stages (:meth:`Certifier.bounds`): IBP for every box,
the rule decided three-valued under those intervals, then the spec's method (CROWN,
alpha-CROWN) only for the boxes still open, intersected with IBP's bounds. Verdicts are those
of bounding every box with the spec's method (a box decided under wider score intervals stays
decided under tighter ones); the test suite checks that on random heads. On the demo
(benchmarks/results/certify_table.md) CROWN through the sparse engine costs about 8x less
than through auto_LiRPA with the same verdicts; most of what is left is the arithmetic floor
of CROWN itself (the whitening rows of the Mahalanobis score times the 3,136-wide first
layer). z3 is skipped when the rule's interval evaluation is already exact
(:func:`rule_needs_exact`).

Soundness first. Bounds are propagated in float64 (a float32 whitening map with entries of
1e4 can cancel to errors far above any sensible padding) and widened by a relative 1e-9; the
sparse engine's float32 products with the first layer add their own rigorous rounding term
(Higham's gamma_n bound, see certood.verifiers.sparse_crown); score bounds are widened by a relative 1e-5, because the
detector and the scores run in float32 (about 5e-7 relative discrepancy measured). Every
box's own scores must lie inside its bounds and its own flag must agree with a certified
verdict, else the box is undecided ("self-check failed").

>>> VERDICTS
('certified_ood', 'certified_id', 'undecided')
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from certood.errors import CertoodError
from certood.scores import Score
from certood.spec.rule import (
    Arith, ClassThresholdRef, Compare, Logic, Neg, Not, Num, ScoreRef, ThresholdRef, class_key,
)

VERDICTS = ("certified_ood", "certified_id", "undecided")
# Tap points in forward order: a score reading an earlier tap than the certify tap is constant.
TAP_ORDER = ("box_head.input", "box_head.output", "cls_logits")
CERTIFY_TAPS = ("box_head.input", "box_head.output")
CHUNK_BOXES = 16
BOUND_DTYPE = torch.float64  # bound propagation precision (about 2x float32's time here)
PAD_ROWS = 1e-9  # relative widening of float64 bounds against rounding
PAD_REL = 1e-5  # relative widening of score bounds: the detector and scores run in float32
RADIUS_EXPAND = 4  # radius search: try eps * 2, 4, 8, 16 ...
RADIUS_BISECT = 6  # ... then this many bisection steps
BAB_SUBDOMAINS = 64  # method bab: subdomains bounded per box at most (and timeout_s seconds)


# --- certificates --------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    """One box's certificate (``to_json`` is what boxes.jsonl carries).

    ``witness`` (undecided boxes only): a point of the region where the rule decides the
    other way than at the box itself, found by certood.verifiers.witness, so no method can
    certify the box at this eps and ``reason`` starts with ``counterexample:``. JSON:
    ``{"sha256": 16 hex digits of the point's float32 little-endian bytes, "flag": the rule's
    flag there, "margin", "scores": {name: value}, "linf", "l2": distances to the box's
    feature, "step": which attack point (0 = a sampled vertex, k = PGD step k)}``; the point
    itself is ``witness_point`` (float32 ``[D]``, not in the JSON: a writer that stores it
    lets a re-check re-evaluate the witness, verifiers.witness.evaluate_witness).
    """

    verdict: str
    method: str
    eps: float
    norm: str
    domain: str
    tap: str
    score_bounds: dict[str, tuple[float | None, float | None]]
    margin: float | None
    reason: str | None
    seconds: float
    radius: float | None = None
    exact: str = "none"
    witness: dict | None = None
    witness_point: Tensor | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "verdict": self.verdict, "method": self.method, "eps": self.eps, "norm": self.norm,
            "domain": self.domain, "tap": self.tap, "exact": self.exact,
            "score_bounds": {k: [_finite(lo), _finite(hi)] for k, (lo, hi) in self.score_bounds.items()},
            "margin": _finite(self.margin), "seconds": round(self.seconds, 6),
        }
        if self.reason:
            out["reason"] = self.reason
        if self.radius is not None:
            out["radius"] = self.radius
        if self.witness is not None:
            out["witness"] = self.witness
        return out


def _witness_reason(w, own_flag: bool) -> str:
    """``counterexample: ...``: why no method can certify the box at this eps."""
    scores = ", ".join(f"{k} {v:.6g}" for k, v in w.scores.items())
    return (f"counterexample: a point of the region (L-inf distance {w.linf:.3g} from the box's feature, "
            f"sha256 {w.sha256}) is {'flagged' if w.flag else 'not flagged'} while the box itself is "
            f"{'flagged' if own_flag else 'not flagged'} (margin {w.margin:.4g}; {scores})")


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class CertifyResult:
    """Certificates of the boxes of one data set, in box order, with their features."""

    certificates: list[Certificate]
    features: Tensor  # [N, D] features at the certify tap
    seconds: float

    def summary(self) -> dict:
        """Rates and counts (what metrics.json carries per data set)."""
        n = len(self.certificates)
        counts = {v: sum(c.verdict == v for c in self.certificates) for v in VERDICTS}
        reasons: dict[str, int] = {}
        for c in self.certificates:
            if c.verdict == "undecided" and c.reason:
                key = c.reason.split(":", 1)[0]
                reasons[key] = reasons.get(key, 0) + 1

        def rate(k):
            return k / n if n else None

        out = {"certified_rate": rate(counts["certified_ood"] + counts["certified_id"]),
               "certified_ood_rate": rate(counts["certified_ood"]),
               "certified_id_rate": rate(counts["certified_id"]),
               "undecided_rate": rate(counts["undecided"]), "n_boxes": n, "counts": counts,
               "undecided_reasons": reasons,
               "seconds_per_box": self.seconds / n if n else None}
        radii = [c.radius for c in self.certificates if c.radius is not None]
        if radii:
            out["median_radius"] = float(torch.tensor(radii).median())
        return out


# --- score bounds from linear-row bounds -----------------------------------------------------
@dataclass(frozen=True)
class ScoreBounder:
    """How to bound one score kind.

    ``rows(score, dim)``: linear functions ``M x + m`` of the score's input ``x`` (``dim``
    wide) whose bounds the score needs: ``(M [r, dim], m [r])``, float64.
    ``bound(score, lo, hi, dim)``: score bounds ``[N]`` from row bounds ``[N, r]`` (float64).
    ``abs_pad``: extra absolute widening for the score's own float32 evaluation error.
    """

    rows: Callable[[Score, int], tuple[Tensor, Tensor]]
    bound: Callable[[Score, Tensor, Tensor, int], tuple[Tensor, Tensor]]
    abs_pad: float = 0.0


def logit_rows(c: int) -> tuple[Tensor, Tensor]:
    """The identity on ``c`` logits, then ``l_i - l_j`` for every ordered pair ``i != j``."""
    eye = torch.eye(c, dtype=torch.float64)
    pairs = [eye[i] - eye[j] for i in range(c) for j in range(c) if i != j]
    M = torch.cat([eye, torch.stack(pairs)]) if pairs else eye
    return M, torch.zeros(M.shape[0], dtype=torch.float64)


def split_logit_bounds(lo: Tensor, hi: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logit bounds ``[N, c]`` and margin bounds ``m[n, i, j]`` of ``l_i - l_j`` ``[N, c, c]``,
    each margin the tighter of its own row and the difference of logit bounds."""
    llo, lhi = lo[:, :c], hi[:, :c]
    mlo = llo.unsqueeze(2) - lhi.unsqueeze(1)
    mhi = lhi.unsqueeze(2) - llo.unsqueeze(1)
    if lo.shape[1] > c:
        k = 0
        for i in range(c):
            for j in range(c):
                if i != j:
                    mlo[:, i, j] = torch.maximum(mlo[:, i, j], lo[:, c + k])
                    mhi[:, i, j] = torch.minimum(mhi[:, i, j], hi[:, c + k])
                    k += 1
    diag = torch.arange(c)
    mlo[:, diag, diag] = 0.0
    mhi[:, diag, diag] = 0.0
    return llo, lhi, mlo, mhi


def _lse_bounds(lo: Tensor, hi: Tensor, c: int, t: float) -> tuple[Tensor, Tensor]:
    """Bounds of ``T logsumexp(l / T)``: monotone in each logit, and, for every k,
    ``l_k + T log sum_j exp((l_j - l_k) / T)`` with margin bounds; the tightest of all."""
    llo, lhi, mlo, mhi = split_logit_bounds(lo, hi, c)
    up = t * torch.logsumexp(lhi / t, dim=1)
    down = t * torch.logsumexp(llo / t, dim=1)
    # m[:, j, k] = l_j - l_k: sum over j for each k
    up_k = lhi + t * torch.logsumexp(mhi / t, dim=1)
    down_k = llo + t * torch.logsumexp(mlo / t, dim=1)
    return torch.maximum(down, down_k.max(dim=1).values), torch.minimum(up, up_k.min(dim=1).values)


def _softmax_bounds(lo: Tensor, hi: Tensor, c: int, t: float = 1.0) -> tuple[Tensor, Tensor]:
    """Bounds of each ``p_k = 1 / sum_j exp((l_j - l_k) / T)`` from margin bounds."""
    _, _, mlo, mhi = split_logit_bounds(lo, hi, c)
    plo = torch.exp(-torch.logsumexp(mhi / t, dim=1))
    phi = torch.exp(-torch.logsumexp(mlo / t, dim=1))
    return plo, phi.clamp(max=1.0)


def energy_bounds(score, lo, hi, c):
    t = score.temperature
    lse_lo, lse_hi = _lse_bounds(lo, hi, c, t)
    return -lse_hi, -lse_lo


def max_logit_bounds(score, lo, hi, c):
    return -hi[:, :c].max(dim=1).values, -lo[:, :c].max(dim=1).values


def msp_bounds(score, lo, hi, c):
    plo, phi = _softmax_bounds(lo, hi, c, score.temperature)
    return -phi.max(dim=1).values, -plo.max(dim=1).values


def _neg_xlogx(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p)


def entropy_from_prob_bounds(plo: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy bounds over ``{p : plo <= p <= phi, sum p = 1}`` (a superset of the softmax
    outputs the logit bounds allow).

    Upper: Lagrangian dual ``min_lambda lambda + sum_k max_{p_k} (-p_k log p_k - lambda p_k)``,
    sound for every lambda (lambda by bisection). Lower: the entropy is concave, so its
    minimum over the polytope is at a vertex (all coordinates but one at a bound): every
    vertex is enumerated for up to 10 classes; also ``H >= -log max_k p_k``.
    """
    n, c = plo.shape
    plo, phi = plo.clamp(0, 1), phi.clamp(0, 1)

    def dual(lam):  # lam [N]
        p = torch.minimum(torch.maximum(torch.exp(-1 - lam).unsqueeze(1), plo), phi)
        return lam + (_neg_xlogx(p) - lam.unsqueeze(1) * p).sum(dim=1), p.sum(dim=1)

    a = torch.full((n,), -60.0, dtype=plo.dtype)
    b = torch.full((n,), 60.0, dtype=plo.dtype)
    for _ in range(80):  # sum_k p_k(lambda) decreases in lambda: find where it crosses 1
        mid = (a + b) / 2
        _, total = dual(mid)
        a = torch.where(total > 1, mid, a)
        b = torch.where(total > 1, b, mid)
    upper = torch.minimum(dual(a)[0], dual(b)[0])
    upper = torch.minimum(upper, torch.full_like(upper, math.log(c)))

    lower = -torch.log(phi.max(dim=1).values.clamp(min=1e-300))
    lower = torch.maximum(lower, torch.zeros_like(lower))
    if c <= 10:
        tol = 1e-12
        best = torch.full((n,), math.inf, dtype=plo.dtype)
        masks = torch.tensor([[(m >> i) & 1 for i in range(c - 1)] for m in range(2 ** (c - 1))],
                             dtype=torch.bool)  # [V, c-1]
        for k in range(c):
            others = [j for j in range(c) if j != k]
            olo, ohi = plo[:, others], phi[:, others]  # [N, c-1]
            pick = torch.where(masks.unsqueeze(0), ohi.unsqueeze(1), olo.unsqueeze(1))  # [N, V, c-1]
            pk = 1 - pick.sum(dim=2)
            ok = (pk >= plo[:, k:k + 1] - tol) & (pk <= phi[:, k:k + 1] + tol)
            value = _neg_xlogx(pick).sum(dim=2) + _neg_xlogx(pk.clamp(0, 1))
            value = torch.where(ok, value, torch.full_like(value, math.inf))
            best = torch.minimum(best, value.min(dim=1).values)
        vertex = torch.where(torch.isfinite(best), best - 1e-12, torch.zeros_like(best))
        lower = torch.maximum(lower, vertex)
    else:
        ends = torch.minimum(_neg_xlogx(plo), _neg_xlogx(phi)).sum(dim=1)
        lower = torch.maximum(lower, ends)
    return lower, upper


def entropy_bounds(score, lo, hi, c):
    plo, phi = _softmax_bounds(lo, hi, c)
    return entropy_from_prob_bounds(plo, phi)


def _identity_rows(score: Score, dim: int) -> tuple[Tensor, Tensor]:
    return torch.eye(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)


def _logit_rows(score: Score, dim: int) -> tuple[Tensor, Tensor]:
    return logit_rows(dim)


_WHITENING: dict[int, tuple[Tensor, tuple[Tensor, Tensor]]] = {}


def mahalanobis_whitening(score) -> tuple[Tensor, Tensor]:
    """``(L^T [r, D], offsets [C, r])`` with ``P = L L^T`` (eigen-factor, as
    ``mahalanobis_score`` computes it; null directions dropped) and offsets ``L^T mu_c`` for
    the classes with finite means. Cached per precision tensor (an eigh per chunk is slow
    for RoI-sized features)."""
    cached = _WHITENING.get(id(score.precision))
    if cached is not None and cached[0] is score.precision:
        return cached[1]
    if len(_WHITENING) > 64:
        _WHITENING.clear()
    result = _whitening(score)
    _WHITENING[id(score.precision)] = (score.precision, result)
    return result


def _whitening(score) -> tuple[Tensor, Tensor]:
    precision = score.precision.double()
    w, v = torch.linalg.eigh(precision)
    factor = v * w.clamp(min=0).sqrt()
    keep = w > 0
    factor = factor[:, keep]
    means = score.means.double()
    means = means[torch.isfinite(means).all(dim=1)]
    return factor.T.contiguous(), means @ factor


def _mahalanobis_rows(score, dim):
    LT, _ = mahalanobis_whitening(score)
    return LT, torch.zeros(LT.shape[0], dtype=torch.float64)


def class_distance_intervals(lo: Tensor, hi: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Interval bounds ``[N, C]`` of ``||u - o_c||^2`` from bounds ``[N, r]`` of each ``u_j``
    (each coordinate at its own extreme: the decoupled bound)."""
    ylo = lo.unsqueeze(1) - offsets.unsqueeze(0)  # [N, C, r]
    yhi = hi.unsqueeze(1) - offsets.unsqueeze(0)
    sq_lo = torch.where(ylo > 0, ylo ** 2, torch.where(yhi < 0, yhi ** 2, torch.zeros_like(ylo)))
    sq_hi = torch.maximum(ylo ** 2, yhi ** 2)
    return sq_lo.sum(dim=2), sq_hi.sum(dim=2)


def mahalanobis_bounds(score, lo, hi, dim):
    _, offsets = mahalanobis_whitening(score)
    sq_lo, sq_hi = class_distance_intervals(lo, hi, offsets)
    return sq_lo.min(dim=1).values, sq_hi.min(dim=1).values


def knn_bounds(score, lo, hi, dim):
    """Distance bounds of the normalised feature to every bank row, k-th smallest of each."""
    bank = score.bank.double()  # unit rows [M, D]
    pos, neg = bank.clamp(min=0), bank.clamp(max=0)
    dlo = lo @ pos.T + hi @ neg.T
    dhi = hi @ pos.T + lo @ neg.T
    nearest = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(lo)))
    nlo = nearest.norm(dim=1, keepdim=True)
    nhi = torch.maximum(lo.abs(), hi.abs()).norm(dim=1, keepdim=True)
    safe = nlo > 1e-9  # otherwise the row may be (near) zero: any distance in [0, 2]
    nlo_s = nlo.clamp(min=1e-300)
    cos_lo = torch.where(dlo >= 0, dlo / nhi.clamp(min=1e-300), dlo / nlo_s)
    cos_hi = torch.where(dhi >= 0, dhi / nlo_s, dhi / nhi.clamp(min=1e-300))
    cos_lo = torch.where(safe, cos_lo, torch.full_like(cos_lo, -1.0)).clamp(-1, 1)
    cos_hi = torch.where(safe, cos_hi, torch.full_like(cos_hi, 1.0)).clamp(-1, 1)
    dist_lo = (2 - 2 * cos_hi).clamp(min=0).sqrt()
    dist_hi = (2 - 2 * cos_lo).clamp(min=0).sqrt()
    k = score.k
    return dist_lo.kthvalue(k, dim=1).values, dist_hi.kthvalue(k, dim=1).values


BOUNDERS: dict[str, ScoreBounder] = {
    "energy": ScoreBounder(_logit_rows, energy_bounds),
    "max_logit": ScoreBounder(_identity_rows, max_logit_bounds),
    "msp": ScoreBounder(_logit_rows, msp_bounds),
    "entropy": ScoreBounder(_logit_rows, entropy_bounds),
    "mahalanobis": ScoreBounder(_mahalanobis_rows, mahalanobis_bounds),
    # float32 cdist (|a|^2 + |b|^2 - 2ab) errs by ~3e-7 before the square root: ~6e-4 after it
    "knn": ScoreBounder(_identity_rows, knn_bounds, abs_pad=1e-3),
}


def bounder_for(kind: str) -> ScoreBounder | None:
    """The bound of a score kind, or None: the kind cannot be bounded (explicitly unsupported)."""
    return BOUNDERS.get(kind)


def pad_bounds(lo: Tensor, hi: Tensor, rel: float = PAD_REL, absolute: float = 0.0) -> tuple[Tensor, Tensor]:
    """Widen bounds by ``rel * (1 + |b|) + absolute`` (against float rounding)."""
    return lo - (rel * (1 + lo.abs()) + absolute), hi + (rel * (1 + hi.abs()) + absolute)


# --- the rule under score intervals: three-valued, vectorised -----------------------------------
def _sanitize(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """NaN bounds (inf - inf, 0 * inf) become the widest sound ones."""
    return (torch.where(torch.isnan(lo), torch.full_like(lo, -math.inf), lo),
            torch.where(torch.isnan(hi), torch.full_like(hi, math.inf), hi))


def _threshold(node, thresholds: dict, n: int) -> Tensor:
    """``t.NAME`` (a number) or ``t.NAME[class]`` (``thresholds[class_key(NAME)]``: a number or
    one value per box, the table read at each box's predicted label) as ``[n]`` float64."""
    key = node.name if isinstance(node, ThresholdRef) else class_key(node.name)
    v = torch.as_tensor(thresholds[key], dtype=torch.float64)
    return v.expand(n).clone() if v.dim() == 0 else v.reshape(n)


def _interval(node, bounds: dict, thresholds: dict, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(lo, hi, division-by-zero-possible) of a number expression, per box."""
    f64 = torch.float64
    none = torch.zeros(n, dtype=torch.bool)
    if isinstance(node, Num):
        v = torch.full((n,), float(node.value), dtype=f64)
        return v, v, none
    if isinstance(node, (ThresholdRef, ClassThresholdRef)):
        v = _threshold(node, thresholds, n)
        return v, v, none
    if isinstance(node, ScoreRef):
        lo, hi = bounds[node.name]
        return lo, hi, none
    if isinstance(node, Neg):
        lo, hi, z = _interval(node.operand, bounds, thresholds, n)
        return -hi, -lo, z
    assert isinstance(node, Arith), node
    alo, ahi, az = _interval(node.left, bounds, thresholds, n)
    blo, bhi, bz = _interval(node.right, bounds, thresholds, n)
    z = az | bz
    if node.op == "+":
        lo, hi = alo + blo, ahi + bhi
    elif node.op == "-":
        lo, hi = alo - bhi, ahi - blo
    else:
        if node.op == "/":
            zero = (blo <= 0) & (bhi >= 0)
            z = z | zero
            one = torch.ones_like(blo)
            blo, bhi = 1 / torch.where(zero, one, bhi), 1 / torch.where(zero, one, blo)
        prods = torch.stack([alo * blo, alo * bhi, ahi * blo, ahi * bhi])
        prods_lo = torch.where(torch.isnan(prods), torch.full_like(prods, -math.inf), prods)
        prods_hi = torch.where(torch.isnan(prods), torch.full_like(prods, math.inf), prods)
        lo, hi = prods_lo.min(dim=0).values, prods_hi.max(dim=0).values
        if node.op == "/":
            lo = torch.where(zero, torch.full_like(lo, -math.inf), lo)
            hi = torch.where(zero, torch.full_like(hi, math.inf), hi)
    lo, hi = _sanitize(lo, hi)
    return lo, hi, z


@dataclass(frozen=True)
class RuleBounds:
    """Three-valued rule under score bounds, per box: can it be true / false somewhere in the
    box of scores, and its margin interval (``> 0``: flagged)."""

    may_true: Tensor
    may_false: Tensor
    margin_lo: Tensor
    margin_hi: Tensor
    division_by_zero: Tensor


def rule_under_bounds(tree, bounds: dict[str, tuple[Tensor, Tensor]], thresholds: dict[str, float]) -> RuleBounds:
    """Evaluate the rule tree over score intervals (Kleene logic, interval arithmetic).

    >>> from certood.spec.rule import parse_rule
    >>> r = rule_under_bounds(parse_rule("e > t.e").tree,
    ...                       {"e": (torch.tensor([2.0, 0.0]), torch.tensor([3.0, 3.0]))}, {"e": 1.0})
    >>> r.may_true.tolist(), r.may_false.tolist()
    ([True, True], [False, True])
    """
    n = next(iter(bounds.values()))[0].shape[0] if bounds else 1
    bounds = {k: (lo.double(), hi.double()) for k, (lo, hi) in bounds.items()}
    return _truth(tree, bounds, thresholds, n)


def _truth(node, bounds, thresholds, n) -> RuleBounds:
    if isinstance(node, Not):
        r = _truth(node.operand, bounds, thresholds, n)
        return RuleBounds(r.may_false, r.may_true, -r.margin_hi, -r.margin_lo, r.division_by_zero)
    if isinstance(node, Logic):
        parts = [_truth(o, bounds, thresholds, n) for o in node.operands]
        t = torch.stack([p.may_true for p in parts])
        f = torch.stack([p.may_false for p in parts])
        lo = torch.stack([p.margin_lo for p in parts])
        hi = torch.stack([p.margin_hi for p in parts])
        z = torch.stack([p.division_by_zero for p in parts]).any(dim=0)
        if node.op == "and":
            return RuleBounds(t.all(0), f.any(0), lo.min(0).values, hi.min(0).values, z)
        return RuleBounds(t.any(0), f.all(0), lo.max(0).values, hi.max(0).values, z)
    assert isinstance(node, Compare), node
    left, right = (node.left, node.right) if node.op in (">", ">=") else (node.right, node.left)
    alo, ahi, az = _interval(left, bounds, thresholds, n)
    blo, bhi, bz = _interval(right, bounds, thresholds, n)
    mlo, mhi = _sanitize(alo - bhi, ahi - blo)
    if node.op in (">", "<"):
        may_true, may_false = mhi > 0, mlo <= 0
    else:
        may_true, may_false = mhi >= 0, mlo < 0
    return RuleBounds(may_true, may_false, mlo, mhi, az | bz)


def margin_at(tree, scores: dict[str, Tensor], thresholds: dict[str, float]) -> Tensor:
    """The rule's margin at points (differentiable): ``a > b`` -> ``a - b``, ``and`` -> min,
    ``or`` -> max, ``not`` -> minus; positive roughly where the rule flags (attacks use it)."""
    if isinstance(node := tree, Not):
        return -margin_at(node.operand, scores, thresholds)
    if isinstance(node, Logic):
        parts = torch.stack([margin_at(o, scores, thresholds) for o in node.operands])
        return parts.min(0).values if node.op == "and" else parts.max(0).values
    left, right = (node.left, node.right) if node.op in (">", ">=") else (node.right, node.left)
    return _value(left, scores, thresholds) - _value(right, scores, thresholds)


def _value(node, scores, thresholds):
    if isinstance(node, Num):
        return torch.tensor(node.value, dtype=torch.float64)
    if isinstance(node, (ThresholdRef, ClassThresholdRef)):
        key = node.name if isinstance(node, ThresholdRef) else class_key(node.name)
        return torch.as_tensor(thresholds[key], dtype=torch.float64)
    if isinstance(node, ScoreRef):
        return scores[node.name].double()
    if isinstance(node, Neg):
        return -_value(node.operand, scores, thresholds)
    a, b = _value(node.left, scores, thresholds), _value(node.right, scores, thresholds)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[node.op]


def rule_needs_exact(tree) -> bool:
    """False when the three-valued interval evaluation of the rule is already exact over a
    box of score values, so z3 cannot decide more: every score occurs at most once and there
    is no division (sub-expressions then depend on disjoint scores, the box is a product, and
    interval arithmetic and Kleene logic give the exact range of each single-use expression).

    >>> from certood.spec.rule import parse_rule
    >>> rule_needs_exact(parse_rule("e > t.e or m > t.m").tree), rule_needs_exact(parse_rule("e > t.e and e < 3").tree)
    (False, True)
    """
    counts: dict[str, int] = {}
    division = False

    def walk(node):
        nonlocal division
        if isinstance(node, ScoreRef):
            counts[node.name] = counts.get(node.name, 0) + 1
        elif isinstance(node, (Not, Neg)):
            walk(node.operand)
        elif isinstance(node, Logic):
            for o in node.operands:
                walk(o)
        elif isinstance(node, (Compare, Arith)):
            division = division or (isinstance(node, Arith) and node.op == "/")
            walk(node.left)
            walk(node.right)

    walk(tree)
    return division or any(c > 1 for c in counts.values())


# --- bound backends: rows of the composite head over the region ---------------------------------
@dataclass(frozen=True)
class Region:
    """Certify options as the bound backends need them."""

    norm: float
    method: str
    nonnegative: bool


def lirpa_backend(composite: nn.Module, region: Region) -> Callable[..., tuple[Tensor, Tensor]]:
    """Row bounds by auto_LiRPA (in the composite's precision, the method of the spec, or
    ``method=`` per call). One :class:`~certood.verifiers.Bounder` per backend: the
    composite is the Certifier's own float64 snapshot of the head, so the BoundedModule is
    built once and reused for every chunk (it cannot go stale: nothing else holds it)."""
    from certood.verifiers import Bounder

    dtype = next(composite.parameters()).dtype
    bounder = Bounder(composite)

    def bound(z: Tensor, eps, **kwargs) -> tuple[Tensor, Tensor]:
        z = z.to(dtype)
        kwargs["norm"] = region.norm
        if region.norm == math.inf:
            if isinstance(eps, Tensor):
                eps = eps.to(dtype).reshape(-1, 1)
            if region.nonnegative:
                kwargs["x_lower"] = torch.zeros_like(z)
        else:
            eps = float(eps)
        b = bounder(z, eps, **kwargs)
        return b.lower.double(), b.upper.double()

    def run(z: Tensor, eps, method: str | None = None) -> tuple[Tensor, Tensor]:
        return bound(z, eps, method=method or region.method)

    def spec_bounds(z: Tensor, eps, C: Tensor) -> tuple[Tensor, Tensor]:
        """CROWN bounds of ``C[n] @ rows`` over box n's region (``C`` ``[N, K, rows]``)."""
        return bound(z, eps, method="crown", C=C.to(dtype))

    run.staged = True  # takes method=: Certifier.certify bounds with IBP first
    run.spec_bounds = spec_bounds  # per-box linear specifications (the Mahalanobis bound)
    return run


def sparse_backend(composite: nn.Module, region: Region) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """Row bounds by :class:`certood.verifiers.sparse_crown.SparseCrown` (IBP and CROWN with
    auto_LiRPA's relaxation, float32 wide products with their rounding bounded), or
    None when it does not apply (an L2 region, a head that is not Linear/ReLU). alpha-CROWN
    calls go to auto_LiRPA."""
    from certood.verifiers.reference import Region as RefRegion, mlp_layers
    from certood.verifiers.sparse_crown import SparseCrown, supports

    if region.norm != math.inf:
        return None
    try:
        layers = mlp_layers(composite)
    except CertoodError:
        return None
    if not supports(layers):
        return None
    crown = SparseCrown(layers)
    fallback: list[Callable] = []

    def run(z: Tensor, eps, method: str | None = None) -> tuple[Tensor, Tensor]:
        method = method or region.method
        if method == "alpha-crown":
            if not fallback:
                fallback.append(lirpa_backend(composite, region))
            return fallback[0](z, eps, method=method)
        z = z.double()
        e = eps.double().reshape(-1, 1) if isinstance(eps, Tensor) else float(eps)
        lo, hi = RefRegion(z, e, lower=torch.zeros_like(z) if region.nonnegative else None).box()
        return crown.ibp(lo, hi) if method == "ibp" else crown(lo, hi)

    def spec_bounds(z: Tensor, eps, C: Tensor) -> tuple[Tensor, Tensor]:
        """CROWN bounds of ``C[n] @ rows`` over box n (``C`` ``[N, K, rows]``)."""
        z = z.double()
        e = eps.double().reshape(-1, 1) if isinstance(eps, Tensor) else float(eps)
        lo, hi = RefRegion(z, e, lower=torch.zeros_like(z) if region.nonnegative else None).box()
        return crown.spec_bounds(crown.prepare(lo, hi), C)

    run.staged = True
    run.spec_bounds = spec_bounds
    run.crown = crown  # method bab splits this engine's ReLUs
    return run


def default_backend(engine: str = "auto") -> Callable:
    """The bound backend of ``certify.engine``: ``auto`` = :func:`sparse_backend` where it
    applies, else :func:`lirpa_backend`; ``auto_lirpa`` = :func:`lirpa_backend`."""
    if engine not in ("auto", "auto_lirpa"):
        raise CertoodError(f"certify.engine: expected auto or auto_lirpa, found {engine!r}")

    def make(composite: nn.Module, region: Region):
        return (engine == "auto" and sparse_backend(composite, region)) or lirpa_backend(composite, region)

    return make


def reference_backend(method: str) -> Callable:
    """Row bounds by certood.verifiers.reference (own code, float64): for ``recheck``."""
    from certood.verifiers.reference import Region as RefRegion, crown_bounds, mlp_layers, reference_bounds

    def make(composite: nn.Module, region: Region):
        layers = mlp_layers(composite)

        def ref_region(z: Tensor, eps) -> RefRegion:
            e = eps.double().reshape(-1, 1) if isinstance(eps, Tensor) else float(eps)
            lower = torch.zeros_like(z) if (region.nonnegative and region.norm == math.inf) else None
            return RefRegion(z, e, region.norm, lower=lower)

        def run(z: Tensor, eps) -> tuple[Tensor, Tensor]:
            return reference_bounds(layers, ref_region(z.double(), eps), method)

        def spec_bounds(z: Tensor, eps, C: Tensor) -> tuple[Tensor, Tensor]:
            return crown_bounds(layers, ref_region(z.double(), eps), spec=C)

        if method != "ibp":  # IBP re-proves IBP's bounds only
            run.spec_bounds = spec_bounds
        return run

    return make


# --- the certifier -----------------------------------------------------------------------------
@dataclass
class _Request:
    name: str
    kind: str
    source: str  # constant | region | rows | unsupported
    reason: str | None = None
    rows: slice | None = None
    dim: int = 0  # width of the score's input
    M: Tensor | None = None  # region source: rows on the tap features
    m: Tensor | None = None
    abs_pad: float = 0.0


def split_head(head: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """``(prefix, classifier)``: a head that is an ``nn.Sequential`` ending with a Linear layer
    splits there (the Linear's input is the penultimate ``box_head.output``)."""
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        return nn.Sequential(*list(head)[:-1]), head[-1]
    if isinstance(head, nn.Linear):
        return nn.Sequential(), head
    return head, None


class Certifier:
    """Bound a monitor's scores and decide its rule over the certify region of each box.

    Built once per (monitor, head, options): it plans which linear rows of the head's output
    each score needs and appends them as one Linear layer, so one bound computation per
    chunk of boxes serves every score.
    """

    def __init__(self, spec, scores: dict[str, Score], thresholds: dict[str, float], head: nn.Module,
                 options, input_dim: int, backend: Callable | None = None,
                 class_thresholds: dict[str, Any] | None = None):
        self.spec, self.scores, self.thresholds, self.options = spec, scores, thresholds, options
        self.head = head  # the monitored head as the monitor runs it: counterexamples are judged on it
        # per predicted class tables for t.NAME[class]: the label of a box is part of the
        # detection (torchvision emits one box per class), so its threshold is a constant
        self.class_thresholds = {k: torch.as_tensor(v, dtype=torch.float64).flatten()
                                 for k, v in (class_thresholds or {}).items()}
        self.point = spec.taps[options.tap]
        if self.point not in CERTIFY_TAPS:
            raise CertoodError(f"certify.tap: expected a tap at {' or '.join(CERTIFY_TAPS)}, "
                               f"found '{options.tap}' at {self.point}")
        # method bab bounds with CROWN first, then splits ReLUs (verifiers/bab.py)
        self.region = Region(norm=math.inf if options.norm == "inf" else float(options.norm),
                             method="crown" if options.method == "bab" else options.method,
                             nonnegative=options.domain == "nonnegative")
        prefix, classifier = split_head(head)
        self.requests: list[_Request] = []
        blocks: list[tuple[str, Tensor, Tensor]] = []  # (space, rows, bias); space: h or logits
        dtype = next((p.dtype for p in head.parameters()), torch.float32)
        with torch.no_grad():
            if classifier is not None:
                n_logits = classifier.out_features
            else:
                n_logits = head.eval()(torch.zeros(1, input_dim, dtype=dtype)).shape[1]
            for name, s in spec.scores.items():
                self.requests.append(self._plan(name, s, scores[name], classifier, n_logits, input_dim, blocks))
        self.composite = self._composite(prefix, classifier, head, blocks)
        self.n_rows = sum(b[1].shape[0] for b in blocks)
        make = backend or default_backend(options.engine)
        self._bound_rows = make(self.composite, self.region) if self.n_rows else None
        # IBP first, then the spec's method only for boxes IBP leaves open (same verdicts)
        self.staged = bool(getattr(self._bound_rows, "staged", False)) and options.method != "ibp"
        self._needs_z3 = rule_needs_exact(spec.rule.tree)
        # per-box linear specifications for the coupled Mahalanobis bound (not under method ibp)
        self._spec_bounds = getattr(self._bound_rows, "spec_bounds", None) if options.method != "ibp" else None
        self._forward32_net: nn.Module | None = None

    def _plan(self, name, s, score, classifier, n_logits, input_dim, blocks) -> _Request:
        point = self.spec.taps[s.tap]
        bounder = bounder_for(s.kind)
        if point not in TAP_ORDER:  # box_jitter.logits: other boxes pooled from the feature maps
            return _Request(name, s.kind, "unsupported",
                            f"unsupported score: score {name} reads {point}, which is not a function of the "
                            f"features at the certify tap")
        if TAP_ORDER.index(point) < TAP_ORDER.index(self.point):
            return _Request(name, s.kind, "constant")
        if bounder is None:
            return _Request(name, s.kind, "unsupported",
                            f"unsupported score: score {name} cannot be bounded (kind {s.kind} has no bound)")
        if point == "cls_logits":
            dim = n_logits - 1  # foreground columns (background first)
            M, m = bounder.rows(score, dim)
            M = torch.cat([torch.zeros(M.shape[0], 1, dtype=torch.float64), M], dim=1)  # on all logits
            if classifier is not None:
                W, b = classifier.weight.detach().double(), classifier.bias.detach().double()
                return self._block(name, s.kind, blocks, "h", M @ W, M @ b + m, bounder, dim)
            return self._block(name, s.kind, blocks, "logits", M, m, bounder, dim)
        if point == "box_head.output":
            if classifier is None:
                return _Request(name, s.kind, "unsupported",
                                f"unsupported score: score {name} reads box_head.output, but the head "
                                "does not end with a Linear classifier")
            M, m = bounder.rows(score, classifier.in_features)
            return self._block(name, s.kind, blocks, "h", M, m, bounder, classifier.in_features)
        M, m = bounder.rows(score, input_dim)  # the tap itself, ahead of the head: exact bounds
        return _Request(name, s.kind, "region", dim=input_dim, M=M, m=m, abs_pad=bounder.abs_pad)

    @staticmethod
    def _block(name, kind, blocks, space, M, m, bounder, dim) -> _Request:
        """Register rows ``M h + m`` (shared with an earlier score asking for the same)."""
        start = 0
        for sp, rows, bias in blocks:
            if sp == space and rows.shape == M.shape and torch.equal(rows, M) and torch.equal(bias, m):
                return _Request(name, kind, "rows", rows=slice(start, start + rows.shape[0]), dim=dim,
                                abs_pad=bounder.abs_pad)
            start += rows.shape[0]
        blocks.append((space, M, m))
        return _Request(name, kind, "rows", rows=slice(start, start + M.shape[0]), dim=dim, abs_pad=bounder.abs_pad)

    def _composite(self, prefix, classifier, head, blocks) -> nn.Module:
        """The head up to the penultimate features (or to the logits, for a head without a
        final Linear), then one Linear layer with every requested row; a float64 copy."""
        if not blocks:
            return nn.Sequential()
        M = torch.cat([b[1] for b in blocks])
        m = torch.cat([b[2] for b in blocks])
        out = nn.Linear(M.shape[1], M.shape[0]).to(BOUND_DTYPE)
        with torch.no_grad():
            out.weight.copy_(M)
            out.bias.copy_(m)
        base = copy.deepcopy(prefix if classifier is not None else head).to(BOUND_DTYPE)
        layers = list(base) if isinstance(base, nn.Sequential) else [base]
        net = nn.Sequential(*layers, out).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    # -- bounds and verdicts
    def score_bounds(self, z: Tensor, eps, values: dict[str, Tensor],
                     row_bounds: tuple[Tensor, Tensor] | None = None,
                     refine: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
        """Bounds of every score over the region of each row of ``z`` (float64, padded);
        ``row_bounds``: the head's row bounds when already computed (unpadded); ``refine``:
        the coupled Mahalanobis bound (:meth:`_refine_distances`) for every box, where the
        backend can bound per-box specifications."""
        n = z.shape[0]
        rows = None
        if self._bound_rows is not None:
            lo, hi = row_bounds if row_bounds is not None else self._bound_rows(z, eps)
            rows = pad_bounds(lo, hi, rel=PAD_ROWS)
        out = {}
        for r in self.requests:
            if r.source == "constant":
                v = values[r.name].double()
                lo, hi = v, v
            elif r.source == "unsupported":
                lo = torch.full((n,), -math.inf, dtype=torch.float64)
                hi = torch.full((n,), math.inf, dtype=torch.float64)
            elif r.source == "region":
                from certood.verifiers.reference import Region as RefRegion

                e = eps.double().reshape(-1, 1) if isinstance(eps, Tensor) else float(eps)
                lower = torch.zeros_like(z.double()) if self.region.nonnegative else None
                region = RefRegion(z.double(), e, self.region.norm, lower=lower)
                flo, fhi = region.linear_bounds(r.M, r.m)
                lo, hi = BOUNDERS[r.kind].bound(self.scores[r.name], *pad_bounds(flo, fhi, rel=PAD_ROWS), r.dim)
            else:
                lo, hi = BOUNDERS[r.kind].bound(self.scores[r.name], rows[0][:, r.rows], rows[1][:, r.rows], r.dim)
            out[r.name] = pad_bounds(lo.double(), hi.double(), absolute=r.abs_pad)
        if refine and rows is not None:
            out = self._refine_distances(z, eps, rows, out, torch.arange(n))
        return out

    def _forward32(self) -> nn.Module:
        """A float32 copy of the composite (rows of the head), for the nearest-point search."""
        if self._forward32_net is None:
            self._forward32_net = copy.deepcopy(self.composite).float()
        return self._forward32_net

    def _refine_distances(self, z: Tensor, eps, rows: tuple[Tensor, Tensor], out: dict[str, tuple[Tensor, Tensor]],
                          idx: Tensor, state=None, near: dict | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Mahalanobis bounds of boxes ``idx`` that keep the whitened coordinates' coupling
        (certood.verifiers.quadratic: a Fenchel lower bound and a secant upper bound, each
        through one CROWN-bounded linear function of the whitened features per class),
        intersected per class with the interval bound, then the min over classes.
        ``rows``: the padded row bounds of every box. Sound for any multipliers: the
        nearest-point search only chooses them. ``state``: a sparse-CROWN state of these
        boxes (branch and bound's subdomains) to bound the specifications over; ``near``: a
        cache of nearest points per score (subdomains of one box share them)."""
        from certood.verifiers.quadratic import distance_bounds, nearest_points
        from certood.verifiers.reference import Region as RefRegion

        todo = [r for r in self.requests if r.kind == "mahalanobis" and r.source == "rows"]
        if (self._spec_bounds is None and state is None) or not todo or not len(idx):
            return out
        zi = z[idx].double()
        e = eps[idx] if isinstance(eps, Tensor) and eps.dim() else eps
        box = None
        if self.region.norm == math.inf:
            ee = e.double().reshape(-1, 1) if isinstance(e, Tensor) else float(e)
            box = RefRegion(zi, ee, lower=torch.zeros_like(zi) if self.region.nonnegative else None).box()
        out = dict(out)
        for r in todo:
            _, offsets = mahalanobis_whitening(self.scores[r.name])
            ul, uh = rows[0][idx, r.rows], rows[1][idx, r.rows]

            def spec(Cr: Tensor, sl: slice = r.rows) -> tuple[Tensor, Tensor]:
                C = Cr.new_zeros(Cr.shape[0], Cr.shape[1], self.n_rows)
                C[:, :, sl] = Cr
                if state is not None:
                    return pad_bounds(*self._bound_rows.crown.spec_bounds(state.select(idx), C), rel=PAD_ROWS)
                return pad_bounds(*self._spec_bounds(zi, e, C), rel=PAD_ROWS)

            u_near = None if near is None else near.get(r.name)
            if box is not None and u_near is None:
                net = self._forward32()
                u_near = nearest_points(lambda x, sl=r.rows: net(x)[:, sl], box[0], box[1], offsets)
                if near is not None:
                    near[r.name] = u_near
            lower, upper = distance_bounds(spec, ul, uh, offsets, u_near)  # [n, C]
            ilo, ihi = class_distance_intervals(ul, uh, offsets)
            lo = torch.maximum(lower, ilo).min(dim=1).values
            hi = torch.minimum(upper, ihi).min(dim=1).values
            lo, hi = pad_bounds(lo, hi, absolute=r.abs_pad)
            olo, ohi = (t.clone() for t in out[r.name])
            olo[idx] = torch.maximum(olo[idx], lo)
            ohi[idx] = torch.minimum(ohi[idx], hi)
            out[r.name] = (olo, ohi)
        return out

    def bounds(self, z: Tensor, eps, values: dict[str, Tensor], labels: Tensor | None = None,
               staged: bool | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Score bounds for :meth:`certify`: with auto_LiRPA, the head's rows are bounded by IBP
        for every box, then by the spec's method (CROWN, alpha-CROWN) only for the boxes the rule
        is still open on under the IBP score intervals, and the two are intersected (both sound,
        so their intersection is). ``staged=False`` runs the spec's method on every box: the
        same verdicts, since a box decided under IBP's intervals stays decided under any
        tighter ones (interval logic and z3 over score intervals are monotone); only the
        stored bounds of IBP-decided boxes are wider. Other backends: one bound computation."""
        staged = self.staged if staged is None else (staged and self.staged)
        if not self.staged or self._bound_rows is None:
            return self.score_bounds(z, eps, values)
        lo, hi = self._bound_rows(z, eps, method="ibp")
        idx = torch.arange(z.shape[0])
        if staged:
            r = rule_under_bounds(self.spec.rule.tree, self.score_bounds(z, eps, values, (lo, hi), refine=False),
                                  self.box_thresholds(labels, z.shape[0]))
            idx = (r.may_true & r.may_false).nonzero().flatten()
        if len(idx):
            e = eps[idx] if isinstance(eps, Tensor) and eps.dim() else eps
            clo, chi = self._bound_rows(z[idx], e)
            lo, hi = lo.clone(), hi.clone()
            lo[idx] = torch.maximum(lo[idx], clo)
            hi[idx] = torch.minimum(hi[idx], chi)
        self.last_stage_counts = {"ibp": z.shape[0], self.options.method: int(len(idx))}
        out = self.score_bounds(z, eps, values, (lo, hi), refine=False)
        if self._spec_bounds is not None and len(idx):
            # the coupled Mahalanobis bound where the rule is still open (same verdicts as for all)
            r = rule_under_bounds(self.spec.rule.tree, out, self.box_thresholds(labels, z.shape[0]))
            still = (r.may_true & r.may_false).nonzero().flatten() if staged else idx
            out = self._refine_distances(z, eps, pad_bounds(lo, hi, rel=PAD_ROWS), out, still)
            self.last_stage_counts["quadratic"] = int(len(still))
        return out

    def box_thresholds(self, labels: Tensor | None, n: int) -> dict[str, Any]:
        """Thresholds for ``n`` boxes: the global ones, and ``class_key(NAME)`` per box."""
        out: dict[str, Any] = dict(self.thresholds)
        used = getattr(self.spec.rule, "class_threshold_names", lambda: set())()
        for name, table in self.class_thresholds.items():
            if name not in used:
                continue
            if labels is None:
                raise CertoodError(f"certify: the rule reads t.{name}[class]: pass each box's predicted label")
            out[class_key(name)] = table[torch.as_tensor(labels).long().reshape(n)]
        return out

    def decide(self, bounds: dict[str, tuple[Tensor, Tensor]],
               labels: Tensor | None = None) -> tuple[list[str], Tensor, list[str | None]]:
        """Verdicts, margins and reasons from score bounds (z3 for what intervals leave open
        when ``exact: z3``)."""
        rule = self.spec.rule
        n = next(iter(bounds.values()))[0].shape[0]
        th = self.box_thresholds(labels, n)
        r = rule_under_bounds(rule.tree, bounds, th)
        verdicts, reasons = [], []
        margins = torch.where(~r.may_false, r.margin_lo,
                              torch.where(~r.may_true, -r.margin_hi, torch.maximum(r.margin_lo, -r.margin_hi)))
        unsupported = [q for q in self.requests if q.source == "unsupported" and q.name in rule.names()]
        for i in range(n):
            if not bool(r.may_false[i]):
                verdicts.append("certified_ood")
                reasons.append(None)
                continue
            if not bool(r.may_true[i]):
                verdicts.append("certified_id")
                reasons.append(None)
                continue
            verdict, reason = "undecided", None
            if self.options.exact == "z3" and self._needs_z3:
                from certood.verifiers.z3_exact import decide_rule

                box = {k: (float(lo[i]), float(hi[i])) for k, (lo, hi) in bounds.items()}
                th_i = {k: float(v[i]) if isinstance(v, Tensor) and v.dim() else float(v) for k, v in th.items()}
                d = decide_rule(rule.tree, th_i, box, self.options.timeout_s)
                if d.status == "always":
                    verdict = "certified_ood"
                elif d.status == "never":
                    verdict = "certified_id"
                elif d.status == "unknown":
                    reason = d.reason if d.reason.startswith("z3") else f"not decided: {d.reason}"
            if verdict == "undecided" and reason is None:
                if unsupported:
                    reason = unsupported[0].reason
                elif bool(r.division_by_zero[i]):
                    reason = "division by zero possible: a divisor's bounds contain 0"
                else:
                    reason = "bounds too loose: the rule can be true and false under the score bounds"
            verdicts.append(verdict)
            reasons.append(reason)
        return verdicts, margins, reasons

    def certify(self, z: Tensor, values: dict[str, Tensor], flags: Tensor,
                labels: Tensor | None = None) -> list[Certificate]:
        """Certificates of the boxes whose features are the rows of ``z`` (one chunk);
        ``labels`` (predicted labels) only for rules with per-class thresholds."""
        start = time.perf_counter()
        z = z.flatten(1)
        self._check_domain(z)
        bounds = self.bounds(z, self.options.eps, values, labels)
        verdicts, margins, reasons = self.decide(bounds, labels)
        verdicts, reasons = self._self_check(verdicts, reasons, bounds, values, flags)
        witnesses = self.witnesses(z, values, flags, verdicts, reasons, labels)
        reasons = [_witness_reason(w, bool(flags[i])) if w is not None and not (reasons[i] or "").startswith(
            "unsupported") else reasons[i] for i, w in enumerate(witnesses)]
        if self.options.method == "bab":
            margins = margins.clone()
            for i in range(z.shape[0]):
                if verdicts[i] == "undecided" and witnesses[i] is None and reasons[i] is not None \
                        and reasons[i].startswith("bounds too loose"):
                    verdicts[i], reasons[i], margins[i] = self._bab(z[i:i + 1], {k: v[i:i + 1] for k, v in values.items()},
                                                                    bool(flags[i]),
                                                                    None if labels is None else labels[i:i + 1])
        radii = self.radius(z, values, flags, verdicts, labels) if self.options.radius else None
        seconds = (time.perf_counter() - start) / max(1, z.shape[0])
        o = self.options
        return [Certificate(
            verdict=verdicts[i], method=o.method, eps=float(o.eps), norm=str(o.norm), domain=o.domain,
            tap=self.point, exact=o.exact,
            score_bounds={k: (float(lo[i]), float(hi[i])) for k, (lo, hi) in bounds.items()},
            margin=float(margins[i]), reason=reasons[i], seconds=seconds,
            radius=None if radii is None else float(radii[i]),
            witness=None if witnesses[i] is None else witnesses[i].to_json(),
            witness_point=None if witnesses[i] is None else witnesses[i].point)
            for i in range(z.shape[0])]

    def _bab(self, z: Tensor, values: dict[str, Tensor], flag: bool, labels: Tensor | None) -> tuple[str, str | None, float]:
        """Branch and bound over the head's unstable ReLUs (certood.verifiers.bab) for one box
        (``z`` ``[1, D]``) toward its own flag's verdict: every leaf subdomain bounded by sparse
        CROWN with its phases fixed, scores and the coupled Mahalanobis bound from those
        bounds, the rule decided under them. ``(verdict, reason, margin)``."""
        from certood.verifiers.bab import branch_and_bound
        from certood.verifiers.reference import Region as RefRegion

        crown = getattr(self._bound_rows, "crown", None)
        if crown is None:
            return ("undecided", "bounds too loose; branch and bound needs certood's sparse engine (an L-inf "
                    "region and a Linear/ReLU head)", float("nan"))
        eps = float(self.options.eps)
        zd = z.double()
        lo, hi = RefRegion(zd, eps, lower=torch.zeros_like(zd) if self.region.nonnegative else None).box()
        target = "certified_ood" if flag else "certified_id"
        near: dict = {}

        def decide(state, rlo, rhi):
            b = rlo.shape[0]
            zb = zd.expand(b, -1)
            vals = {k: v.expand(b) for k, v in values.items()}
            out = self.score_bounds(zb, eps, vals, (rlo, rhi), refine=False)
            out = self._refine_distances(zb, eps, pad_bounds(rlo, rhi, rel=PAD_ROWS), out, torch.arange(b),
                                         state=state, near=near)
            th = self.box_thresholds(None if labels is None else labels.expand(b), b)
            r = rule_under_bounds(self.spec.rule.tree, out, th)
            proven = ~r.may_false if flag else ~r.may_true
            margin = r.margin_lo if flag else -r.margin_hi
            return proven, margin, 1.0 / (rhi - rlo).clamp(min=1e-9)

        res = branch_and_bound(crown, lo, hi, decide, max_subdomains=BAB_SUBDOMAINS, time_s=self.options.timeout_s)
        if res.status == "proved":
            return target, None, res.margin
        return "undecided", f"bounds too loose: {res.reason} (best margin {res.margin:.4g})", res.margin

    def witnesses(self, z: Tensor, values: dict[str, Tensor], flags: Tensor, verdicts: list[str],
                  reasons: list[str | None], labels: Tensor | None = None) -> list:
        """Counterexamples (certood.verifiers.witness) for the undecided boxes, None elsewhere
        and where none is found (a self-check failure is a bug, not a property of the region:
        not searched)."""
        from certood.verifiers.witness import find_witnesses

        out: list = [None] * z.shape[0]
        idx = [i for i, v in enumerate(verdicts) if v == "undecided"
               and not (reasons[i] or "").startswith("self-check failed")]
        if not idx or self.head is None or not any(True for _ in self.head.parameters()):
            return out
        sel = torch.tensor(idx, dtype=torch.long)
        try:
            found = find_witnesses(self.spec, self.scores, self.thresholds, self.head, self.point, z[sel],
                                   flags[sel], {k: v[sel] for k, v in values.items()}, float(self.options.eps),
                                   self.region.norm, self.region.nonnegative,
                                   labels=None if labels is None else torch.as_tensor(labels)[sel],
                                   class_thresholds=self.class_thresholds)
        except (CertoodError, RuntimeError) as e:  # the search is evidence, never a reason to fail
            self.last_witness_error = str(e)  # (a head that does not fit the scores, say)
            return out
        for i, w in zip(idx, found):
            out[i] = w
        return out

    def _check_domain(self, z: Tensor) -> None:
        if self.region.nonnegative and bool((z < 0).any()):
            raise CertoodError(f"certify: domain is nonnegative, but features at {self.point} have negative "
                               f"entries (min {float(z.min()):.4g}); set certify.domain: any")

    def _self_check(self, verdicts, reasons, bounds, values, flags):
        """A box's own scores lie in its region: they must be inside the bounds, and its own
        flag must agree with a certified verdict. Anything else is a bug: never a proof."""
        verdicts, reasons = list(verdicts), list(reasons)
        for i in range(len(verdicts)):
            for name, (lo, hi) in bounds.items():
                v = float(values[name][i])
                if not (float(lo[i]) <= v <= float(hi[i])):
                    verdicts[i] = "undecided"
                    reasons[i] = (f"self-check failed: the box's own {name} score {v:.6g} lies outside "
                                  f"its bounds [{float(lo[i]):.6g}, {float(hi[i]):.6g}]")
                    break
            else:
                flag = bool(flags[i])
                if (verdicts[i] == "certified_ood" and not flag) or (verdicts[i] == "certified_id" and flag):
                    reasons[i] = f"self-check failed: verdict {verdicts[i]} but the box's own flag is {flag}"
                    verdicts[i] = "undecided"
        return verdicts, reasons

    # -- radius
    def holds(self, z: Tensor, values: dict[str, Tensor], flags: Tensor, eps: Tensor, target: list[str],
              labels: Tensor | None = None) -> Tensor:
        """Whether each box's ``target`` verdict is certified at its own ``eps``."""
        out = torch.zeros(z.shape[0], dtype=torch.bool)
        if self.region.norm == math.inf:
            groups = [(torch.arange(z.shape[0]), eps)]
        else:  # auto_LiRPA takes one eps per call for L2: group equal radii
            groups = [((eps == e).nonzero().flatten(), float(e)) for e in eps.unique()]
        for idx, e in groups:
            sub = {k: v[idx] for k, v in values.items()}
            e_sub = e[idx] if isinstance(e, Tensor) else e
            lab = None if labels is None else labels[idx]
            bounds = self.bounds(z[idx], e_sub, sub, lab)
            verdicts, _, reasons = self.decide(bounds, lab)
            verdicts, _ = self._self_check(verdicts, reasons, bounds, sub, flags[idx])
            for j, i in enumerate(idx.tolist()):
                out[i] = verdicts[j] == target[i]
        return out

    def radius(self, z: Tensor, values: dict[str, Tensor], flags: Tensor, verdicts: list[str],
               labels: Tensor | None = None) -> Tensor:
        """The largest eps found (doubling, then bisection) at which the box's verdict holds:
        its certified verdict, or for an undecided box the verdict of its own flag. 0 when
        none is found. Always an eps at which the verdict was proven (a sound radius)."""
        eps0 = float(self.options.eps)
        n = z.shape[0]
        certified = torch.tensor([v != "undecided" for v in verdicts])
        target = [v if v != "undecided" else ("certified_ood" if bool(flags[i]) else "certified_id")
                  for i, v in enumerate(verdicts)]
        lo = torch.where(certified, torch.full((n,), eps0, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
        hi = torch.where(certified, torch.full((n,), math.inf, dtype=torch.float64),
                         torch.full((n,), eps0, dtype=torch.float64))
        e = eps0
        for _ in range(RADIUS_EXPAND):
            active = torch.isinf(hi)
            if not active.any():
                break
            e *= 2
            idx = active.nonzero().flatten()
            ok = self._holds_at(z, values, flags, idx, torch.full((len(idx),), e, dtype=torch.float64), target,
                                labels)
            lo[idx[ok]] = e
            hi[idx[~ok]] = e
        for _ in range(RADIUS_BISECT):
            idx = torch.isfinite(hi).nonzero().flatten()
            if not len(idx):
                break
            mid = (lo[idx] + hi[idx]) / 2
            ok = self._holds_at(z, values, flags, idx, mid, target, labels)
            lo[idx[ok]] = mid[ok]
            hi[idx[~ok]] = mid[~ok]
        return lo

    def _holds_at(self, z, values, flags, idx, eps, target, labels=None) -> Tensor:
        sub = {k: v[idx] for k, v in values.items()}
        return self.holds(z[idx], sub, flags[idx], eps, [target[i] for i in idx.tolist()],
                          None if labels is None else labels[idx])


def certify_boxes(monitor, head: nn.Module, features: Tensor, values: dict[str, Tensor], flags: Tensor,
                  options=None, progress=None, chunk: int = CHUNK_BOXES, backend: Callable | None = None,
                  desc: str = "certify", labels: Tensor | None = None) -> CertifyResult:
    """Certificates for every box: ``features`` at the certify tap ``[N, D]``, the boxes'
    own score ``values`` and ``flags`` (from the monitor), chunks of ``chunk`` boxes.

    ``options`` defaults to ``monitor.spec.certify``; ``backend`` to auto_LiRPA; ``labels``
    (predicted labels) are needed by rules with per-class thresholds.
    """
    options = options or monitor.spec.certify
    if options is None:
        raise CertoodError("certify: the spec has no certify block")
    start = time.perf_counter()
    features = features.detach().flatten(1)
    certificates: list[Certificate] = []
    if len(features):
        certifier = Certifier(monitor.spec, monitor.scores, monitor.thresholds, head, options,
                              features.shape[1], backend, getattr(monitor, "class_thresholds", None))
        starts: Any = range(0, len(features), chunk)
        if progress is not None:
            starts = progress(starts, len(starts), desc)
        for s in starts:
            sl = slice(s, s + chunk)
            certificates += certifier.certify(features[sl], {k: v[sl] for k, v in values.items()}, flags[sl],
                                              None if labels is None else labels[sl])
    return CertifyResult(certificates, features, time.perf_counter() - start)


def certify_head(detector, point: str) -> nn.Module:
    """The detector's monitored head from tap point ``point`` to its class logits."""
    get = getattr(detector, "monitored_head", None)
    if get is None:
        raise CertoodError(f"certify: the detector ({type(detector).__name__}) exposes no monitored_head(); "
                           "certificates need the head between the certify tap and the logits")
    return get(point)


def certify_detections(monitor, detector, dets, values: dict[str, Tensor], flags: Tensor,
                       progress=None) -> CertifyResult:
    """Certificates of every box of ``dets`` (a DatasetDetections) under ``monitor.spec.certify``."""
    options = monitor.spec.certify
    point = monitor.spec.taps[options.tap]
    if point not in dets.taps:
        raise CertoodError(f"certify: the detections carry no features at {point} (extract them with "
                           "Monitor.tap_points)")
    head = certify_head(detector, point)
    return certify_boxes(monitor, head, dets.taps[point], values, flags, options, progress,
                         desc=f"certify {dets.name}", labels=dets.labels)


def certify_metrics(options, results: dict[str, CertifyResult],
                    detector_seconds: float | None = None) -> tuple[dict, dict]:
    """``(metrics["certificates"], metrics["certify"])``: per data set (``id_test`` or the OOD
    set's name) rates and counts; the options and the cost of certifying: per box, and
    ``to_detector_ratio``, certifying every box of the images over the detector's forward
    passes on the same images (``detector_seconds``)."""
    per_set = {name.removeprefix("ood/"): r.summary() for name, r in results.items()}
    n = sum(len(r.certificates) for r in results.values())
    seconds = sum(r.seconds for r in results.values())
    about = {"tap": options.tap, "eps": options.eps, "norm": options.norm, "method": options.method,
             "exact": options.exact, "timeout_s": options.timeout_s, "radius": options.radius,
             "domain": options.domain, "seconds_per_box": seconds / n if n else None}
    if detector_seconds:
        about["to_detector_ratio"] = seconds / detector_seconds
    about["versions"] = _versions()
    return per_set, about


def _versions() -> dict[str, str | None]:
    """Versions of what a certificate rests on (bound propagation, the exact solver)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("auto_LiRPA", "z3-solver", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
