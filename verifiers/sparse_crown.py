"""CROWN for Linear/ReLU heads over L-inf boxes, computing only what can change the result.

certood's production CROWN path for MLP heads (torchvision's box head + classifier + the
rows the scores need). It uses auto_LiRPA 0.3's CROWN relaxation (upper line through
``(l, 0)`` and ``(u, u)``, lower slope 1 when ``u > -l`` else 0; CROWN for every
intermediate layer), with three savings:

1. **Sparse intermediate bounds.** A hidden neuron that interval bounds (IBP) already prove
   stable has an exact relaxation (identity or zero) whatever its bounds, so CROWN
   back-substitutes only the rows IBP leaves unstable, per box; certood.verifiers.reference
   (what ``certood recheck`` re-proves with) uses the same rule, and the tests check that the
   two agree, including heads where CROWN's own bound of an IBP-stable neuron straddles 0.
   auto_LiRPA 0.3 has a similar default (``sparse_intermediate_bounds_with_ibp``): on the box
   head in the tests its bounds equal these to 1e-9 (and on the demo's 490 boxes no verdict
   differs), while on deeper random heads over wide regions these can be tighter than
   auto_LiRPA's (never looser, in the tests).
2. **Sparse columns.** Neurons of the first hidden layer that are inactive over the whole
   box drop out of the one wide product (rows x first-layer width x input width, 3,136
   wide at the RoI tap), and columns on which the lower- and upper-bound relaxations agree
   are multiplied once for both.
3. **Float32 products with a rigorous error term.** That wide product runs in float32
   (about twice float64's speed here) and the bound pays for its rounding: for an inner
   dimension ``n`` every entry of the float32 product is within
   ``gamma * (|Lambda| |W1|)`` of the exact one (Higham, *Accuracy and Stability of
   Numerical Algorithms*, Lemma 3.4 and Eq. 3.13: ``gamma = n u / (1 - n u)``,
   ``u = 2**-24``, any summation order), so the spread ``|Lambda W1| rad`` is over-estimated
   by ``gamma * |Lambda| (|W1| rad)`` -- a float64 matrix-vector product. Everything else
   (the centre term ``Lambda (W1 mid + b1)``, the small back-substitution products) is
   float64. ``gemm_dtype=torch.float64`` gives the plain float64 computation.

Float64 rounding is left to the caller, as with auto_LiRPA and the reference bounds
(certood.certify widens every row bound by a relative 1e-9).

>>> import torch
>>> from torch import nn
>>> from certood.verifiers.reference import mlp_layers
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
>>> x = torch.rand(4, 8, dtype=torch.float64)
>>> lo, hi = SparseCrown(mlp_layers(net))(x - 0.01, x + 0.01)
>>> bool(((lo <= net(x)) & (net(x) <= hi)).all())
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from certood.errors import CertoodError

__all__ = ["SparseCrown", "CrownState", "supports"]

_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
# Subnormal results may be flushed to zero (FTZ/DAZ): each flushed operation loses at most the
# smallest normal float32.
_UNDERFLOW = 2.0 ** -126
# Columns of the first layer per block of the wide product (3136 = 7 x 448 at the RoI tap).
_BLOCK = 448


def supports(layers: list[tuple]) -> bool:
    """Whether ``layers`` (as :func:`certood.verifiers.reference.mlp_layers` lists them) is
    Linear, then (ReLU, Linear) pairs: the networks :class:`SparseCrown` bounds."""
    if not layers or layers[0][0] != "linear" or layers[-1][0] != "linear":
        return False
    return all(layer[0] == ("linear" if i % 2 == 0 else "relu") for i, layer in enumerate(layers))


def float32_products_are_ieee() -> bool:
    """Whether float32 matrix products on the CPU run in IEEE float32 now (not reduced to bf16
    or tf32 by ``torch.backends.mkldnn.matmul.fp32_precision`` or the legacy
    ``torch.set_float32_matmul_precision``); False when that cannot be told."""
    try:
        mode = torch.backends.mkldnn.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        mode = "none"
    if mode != "none":
        return mode == "ieee"
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # both APIs in use: torch refuses to say
        return False


def _relax(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(upper slope, upper intercept, lower slope) of the ReLU relaxation on ``[l, u]``.

    Written here again on purpose, like :func:`_interval`: certood.verifiers.reference is the
    independent code ``certood recheck`` re-proves certificates with, so the two share nothing
    that computes a bound."""
    lc, uc = l.clamp(max=0), u.clamp(min=0)
    denom = uc - lc
    slope_u = torch.where(denom > 0, uc / denom.clamp(min=1e-300), torch.zeros_like(u))
    return slope_u, -slope_u * lc, (slope_u > 0.5).to(u.dtype)


def _interval(W: Tensor, b: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Interval bounds of ``x @ W.T + b`` for ``x`` in ``[lo, hi]``."""
    c, s = (lo + hi) / 2 @ W.T + b, (hi - lo) / 2 @ W.abs().T
    return c - s, c + s


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` (float64, >= 0) in ``dtype``, rounded up where the cast rounded down."""
    y = x.to(dtype)
    if dtype == torch.float64:
        return y
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def _fix(lo: Tensor, hi: Tensor, phase: Tensor, empty: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clip pre-activation bounds to fixed phases (+1: ``>= 0``, -1: ``<= 0``); rows where a
    clipped bound crosses are empty subdomains (their bounds are then left meaningless)."""
    lo = torch.where(phase > 0, lo.clamp(min=0), lo)
    hi = torch.where(phase < 0, hi.clamp(max=0), hi)
    crossed = (lo > hi).any(1)
    hi = torch.where(crossed.unsqueeze(1), torch.maximum(lo, hi), hi)  # keep later arithmetic finite
    return lo, hi, empty | crossed


def _columns(A: Tensor) -> Tensor:
    """Indices of the columns of ``A`` that are not all zero."""
    return (A != 0).any(0).nonzero().flatten()


def _sparse_mm(A: Tensor, W: Tensor) -> Tensor:
    """``A @ W`` over the nonzero columns of ``A`` only (the same result, fewer products)."""
    cols = _columns(A)
    return A.index_select(1, cols) @ W.index_select(0, cols)


@dataclass
class CrownState:
    """Per-box intermediate bounds of :class:`SparseCrown`: pre-activation bounds of every
    hidden layer (``pre[j]``, ``[N, width]``), the first layer at the box centres and
    ``|W1| rad``; ``rows``/``macs`` count the work so far."""

    pre: list[tuple[Tensor, Tensor]]
    centre1: Tensor
    spread1: Tensor
    rad: Tensor
    lower: Tensor | None = None  # the boxes, [N, D]
    upper: Tensor | None = None
    rows: int = 0
    macs: int = 0
    engine: "SparseCrown | None" = None
    empty: Tensor | None = None  # [N] bool: a fixed phase contradicts the bounds (an empty subdomain)

    def select(self, idx: Tensor) -> "CrownState":
        """The state of boxes ``idx`` only (the intermediate bounds are per box)."""
        return CrownState([(lo[idx], hi[idx]) for lo, hi in self.pre], self.centre1[idx], self.spread1[idx],
                          self.rad[idx], self.lower[idx], self.upper[idx], engine=self.engine,
                          empty=None if self.empty is None else self.empty[idx])

    def find(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        """Indices of boxes ``[lower, upper]`` among this state's boxes (equal bit for bit),
        or None when one is missing: then the state cannot serve them."""
        if self.lower is None or lower.shape[1] != self.lower.shape[1]:
            return None
        same = ((self.lower.unsqueeze(0) == lower.unsqueeze(1)) & (self.upper.unsqueeze(0) == upper.unsqueeze(1))).all(2)
        if not bool(same.any(1).all()):
            return None
        return same.double().argmax(1)


class SparseCrown:
    """CROWN bounds of a Linear/ReLU network over boxes ``[lower, upper]`` (one per row).

    ``layers`` as :func:`certood.verifiers.reference.mlp_layers` gives them (float64
    ``("linear", W, b)`` and ``("relu",)``, alternating, Linear first and last);
    ``gemm_dtype`` the precision of the wide first-layer product (float32 or float64; its
    rounding is accounted for either way). Returns float64 ``(lower, upper)`` per output;
    CPU tensors (indices are made on the CPU).
    """

    def __init__(self, layers: list[tuple], gemm_dtype: torch.dtype = torch.float32):
        if not supports(layers):
            raise CertoodError("SparseCrown bounds Linear, (ReLU, Linear)* networks only")
        if gemm_dtype not in _UNIT_ROUNDOFF:
            raise CertoodError(f"gemm_dtype must be float32 or float64, got {gemm_dtype}")
        self.layers = layers
        self.weights = [(layer[1].double(), layer[2].double()) for layer in layers if layer[0] == "linear"]
        self.gemm_dtype = gemm_dtype
        W1 = self.weights[0][0]
        W1_gemm = W1.to(gemm_dtype)
        self.blocks = [slice(s, min(s + _BLOCK, W1.shape[1])) for s in range(0, W1.shape[1], _BLOCK)]
        self.W1_blocks = [W1_gemm[:, c].contiguous() for c in self.blocks]
        # what rounding W1 to gemm_dtype moved it by (0 for float32 weights held in float64)
        self.W1_round = (W1 - W1_gemm.double()).abs().amax().item()
        self.W1_abs = W1.abs()
        self.u = _UNIT_ROUNDOFF[gemm_dtype]
        self.stats: dict[str, float] = {}
        self.last_state: CrownState | None = None

    def __call__(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._check(lower, upper)
        if self.gemm_dtype == torch.float32 and not float32_products_are_ieee():
            # bf16 / tf32 products were switched on: the rounding term assumes IEEE float32,
            # so this call multiplies in float64 instead (global state is read, never changed)
            exact = SparseCrown(self.layers, torch.float64)
            bounds = exact._bounds(lower, upper)
            self.stats, self.last_state = exact.stats, exact.last_state
            return bounds
        return self._bounds(lower, upper)

    def ibp(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Interval bounds (the first layer exactly over the box), float64."""
        lower, upper = self._check(lower, upper)
        lo, hi, _, _ = self._first(lower, upper)
        for W, b in self.weights[1:]:
            lo, hi = _interval(W, b, lo.clamp(min=0), hi.clamp(min=0))
        return lo, hi

    def _check(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = lower.double().flatten(1), upper.double().flatten(1)
        if lower.shape != upper.shape or lower.shape[1] != self.weights[0][0].shape[1]:
            raise CertoodError(f"SparseCrown: boxes of shape {tuple(lower.shape)} / {tuple(upper.shape)} "
                               f"for an input width of {self.weights[0][0].shape[1]}")
        if bool((lower > upper).any()):
            raise CertoodError("SparseCrown: a box has lower > upper")
        return lower, upper

    def _first(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Exact bounds of z1 over the box, its value at the centre and ``|W1| rad``."""
        W1, b1 = self.weights[0]
        centre1 = (lower + upper) / 2 @ W1.T + b1
        spread1 = (upper - lower) / 2 @ self.W1_abs.T
        return centre1 - spread1, centre1 + spread1, centre1, spread1

    def _bounds(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        state = self._intermediate(lower, upper)
        self.last_state = state  # for spec_bounds over the same boxes
        if len(self.weights) == 1:  # one Linear layer: its exact bounds over the box
            self.stats = {"boxes": lower.shape[0], "rows": 0, "wide_macs": 0}
            return state.pre[0]
        W, b = self.weights[-1]
        lo, hi = (torch.empty(lower.shape[0], W.shape[0], dtype=torch.float64) for _ in range(2))
        for i in range(lower.shape[0]):  # every output row by CROWN
            lo[i], hi[i], m = self._backsubstitute(len(self.weights) - 1, W, b, i, state)
            state.rows += W.shape[0]
            state.macs += m
        # rows back-substituted and multiply-adds of the wide products (the bulk of the cost)
        self.stats = {"boxes": lower.shape[0], "rows": state.rows, "wide_macs": state.macs}
        return lo, hi

    def prepare(self, lower: Tensor, upper: Tensor, phases: list[Tensor] | None = None,
                within: list[tuple[Tensor, Tensor]] | None = None) -> "CrownState":
        """The boxes' intermediate bounds, for :meth:`spec_bounds` (computed once, reused by
        every specification bounded over the same boxes).

        ``phases`` (branch and bound): per hidden layer ``[N, width]``, +1 where the neuron is
        fixed active (the subdomain ``{x in box : pre-activation >= 0}``), -1 fixed inactive
        (``<= 0``), 0 free. A fixed neuron's bounds are clipped at 0, which is exact over its
        subdomain and makes its relaxation exact; every later layer is bounded again from
        those bounds, so all bounds hold over the subdomain (the intersection of the box with
        every fixed half-space). ``state.empty`` marks subdomains whose clipped bounds cross
        (no point of the box has those phases). ``within``: bounds per hidden layer known to
        hold over each subdomain already (its parent's): every layer's bounds are intersected
        with them before the next layer is bounded (CROWN's adaptive slopes make a child's own
        bounds occasionally looser than its parent's)."""
        lower, upper = self._check(lower, upper)
        if self.gemm_dtype == torch.float32 and not float32_products_are_ieee():
            return SparseCrown(self.layers, torch.float64).prepare(lower, upper, phases, within)
        if phases is not None:
            return self._intermediate(lower, upper, phases, within)
        cached = self.last_state
        idx = cached.find(lower, upper) if cached is not None else None
        if idx is not None:  # the same boxes as the last call: its intermediate bounds
            return cached.select(idx)
        return self._intermediate(lower, upper)

    def spec_bounds(self, state: "CrownState", C: Tensor) -> tuple[Tensor, Tensor]:
        """CROWN bounds of ``C[n] @ f(x)`` over box ``n`` of ``state`` (from :meth:`prepare`):
        one specification matrix per box, ``C`` ``[N, K, outputs]``, float64 ``[N, K]``.

        The same bound as appending ``C[n]`` to the last layer: the rows are back-substituted
        with the rounding of the wide products accounted for, as every output row is."""
        engine = state.engine if state.engine is not None else self
        W, b = engine.weights[-1]
        C = C.double()
        if C.dim() != 3 or C.shape[0] != state.centre1.shape[0] or C.shape[2] != W.shape[0]:
            raise CertoodError(f"spec_bounds: C of shape {tuple(C.shape)} for {state.centre1.shape[0]} boxes "
                               f"and {W.shape[0]} outputs")
        if len(engine.weights) == 1:  # C W x + C b over the box, exactly
            A = C @ W
            centre = (A @ ((state.lower + state.upper) / 2).unsqueeze(2)).squeeze(2) + C @ b
            spread = (A.abs() @ state.rad.unsqueeze(2)).squeeze(2)
            return centre - spread, centre + spread
        lo, hi = (torch.empty(C.shape[0], C.shape[1], dtype=torch.float64) for _ in range(2))
        for i in range(C.shape[0]):
            lo[i], hi[i], _ = engine._backsubstitute(len(engine.weights) - 1, C[i] @ W, C[i] @ b, i, state)
        return lo, hi

    def final_bounds(self, state: "CrownState") -> tuple[Tensor, Tensor]:
        """CROWN bounds of every output over each box (subdomain) of ``state``."""
        engine = state.engine if state.engine is not None else self
        if len(engine.weights) == 1:
            return state.pre[0]
        W, b = engine.weights[-1]
        n = state.centre1.shape[0]
        lo, hi = (torch.empty(n, W.shape[0], dtype=torch.float64) for _ in range(2))
        for i in range(n):
            lo[i], hi[i], _ = engine._backsubstitute(len(engine.weights) - 1, W, b, i, state)
        return lo, hi

    def _intermediate(self, lower: Tensor, upper: Tensor, phases: list[Tensor] | None = None,
                      within: list[tuple[Tensor, Tensor]] | None = None) -> "CrownState":
        """Bounds of every hidden pre-activation: IBP from the previous bounds, CROWN for the
        rows it leaves unstable (``phases``: see :meth:`prepare`)."""
        rad = (upper - lower) / 2
        l1, u1, centre1, spread1 = self._first(lower, upper)
        empty = torch.zeros(lower.shape[0], dtype=torch.bool)
        if within is not None:
            l1, u1 = torch.maximum(l1, within[0][0]), torch.minimum(u1, within[0][1])
        if phases is not None:
            l1, u1, empty = _fix(l1, u1, phases[0], empty)
        state = CrownState([(l1, u1)], centre1, spread1, rad, lower, upper, engine=self, empty=empty)
        for k in range(1, len(self.weights) - 1):
            W, b = self.weights[k]
            lo, hi = _interval(W, b, state.pre[-1][0].clamp(min=0), state.pre[-1][1].clamp(min=0))
            for i in range(lower.shape[0]):
                rows = ((lo[i] < 0) & (hi[i] > 0)).nonzero().flatten()
                if not len(rows):
                    continue
                lo_i, hi_i, m = self._backsubstitute(k, W[rows], b[rows], i, state)
                lo[i, rows], hi[i, rows] = lo_i, hi_i
                state.rows += len(rows)
                state.macs += m
            if within is not None:
                lo, hi = torch.maximum(lo, within[k][0]), torch.minimum(hi, within[k][1])
            if phases is not None:
                lo, hi, state.empty = _fix(lo, hi, phases[k], state.empty)
            state.pre.append((lo, hi))
        return state

    def _backsubstitute(self, k: int, S: Tensor, b0: Tensor, i: int,
                        state: "CrownState") -> tuple[Tensor, Tensor, int]:
        """CROWN bounds of the rows ``S x + b0`` of layer ``k``'s input ``x`` (rows of its
        weight, or combinations of them), box ``i``, and the multiply-adds of the wide products.

        The lower- and upper-bound coefficients are kept as ``S + Dl R`` and ``S + Du R``:
        they differ only through the unstable neurons met on the way (their relaxation depends
        on the sign of the coefficient), so ``R`` has one row per unstable neuron and every
        product with a weight matrix is done once for both bounds."""
        pre, centre1, rad, spread1 = state.pre, state.centre1[i], state.rad[i], state.spread1[i]
        R = S.new_zeros(0, S.shape[1])
        Dl = Du = S.new_zeros(S.shape[0], 0)
        bl = bu = b0
        for j in range(k - 1, -1, -1):
            su, iu, sl = _relax(pre[j][0][i], pre[j][1][i])
            unstable = ((su != sl) | (iu != 0)).nonzero().flatten()
            stable = torch.where((su == sl) & (iu == 0), sl, torch.zeros_like(sl))  # slope 1 or 0
            if len(unstable):
                Al = S[:, unstable] + Dl @ R[:, unstable]
                Au = S[:, unstable] + Du @ R[:, unstable]
                s_u, i_u, s_l = su[unstable], iu[unstable], sl[unstable]
                bl = bl + Al.clamp(max=0) @ i_u
                bu = bu + Au.clamp(min=0) @ i_u
                Dl = torch.cat([Dl, Al.clamp(min=0) * s_l + Al.clamp(max=0) * s_u], 1)
                Du = torch.cat([Du, Au.clamp(min=0) * s_u + Au.clamp(max=0) * s_l], 1)
                select = S.new_zeros(len(unstable), S.shape[1])
                select[torch.arange(len(unstable)), unstable] = 1.0
                R = torch.cat([R * stable, select])
            else:
                R = R * stable
            S = S * stable
            if j > 0:
                Wj, bj = self.weights[j]
                Rb = R @ bj
                bl, bu = bl + S @ bj + Dl @ Rb, bu + S @ bj + Du @ Rb
                S, R = _sparse_mm(S, Wj), _sparse_mm(R, Wj)
        # coefficients on z1 = W1 x + b1: the centre term exactly (float64), the spread
        # |A W1| rad by the wide products S W1 and R W1 over their nonzero columns
        Rc = R @ centre1
        low = S @ centre1 + Dl @ Rc + bl
        high = S @ centre1 + Du @ Rc + bu
        g = self.gemm_dtype
        cs, cr = _columns(S), _columns(R)
        Sg, Rg = S.index_select(1, cs).to(g), R.index_select(1, cr).to(g)
        Dlg, Dug = Dl.to(g), Du.to(g)
        r = _round_up(rad, g)
        spread_l = spread_u = torch.zeros(S.shape[0], dtype=torch.float64)
        # column blocks of W1: the r x block products stay in cache through the abs and the sum
        for cols, block in zip(self.blocks, self.W1_blocks):
            SW = Sg @ block.index_select(0, cs)
            RW = Rg @ block.index_select(0, cr)
            Mu = torch.addmm(SW, Dug, RW)
            Ml = SW.addmm_(Dlg, RW)
            spread_l = spread_l + (Ml.abs_() @ r[cols]).double()
            spread_u = spread_u + (Mu.abs_() @ r[cols]).double()
        if g != torch.float64:
            # every term >= 0 (rad rounded up): each block's rounded sum is within gamma of the exact
            n = max(c.stop - c.start for c in self.blocks)
            gamma = n * self.u / (1 - n * self.u)
            flushed = rad.shape[0] * _UNDERFLOW  # a flushed term per addend of the sums
            spread_l, spread_u = spread_l / (1 - gamma) + flushed, spread_u / (1 - gamma) + flushed
        if g != torch.float64 or self.W1_round:
            # |fl(M) - M| <= c (|S| |W1| + |D| |R| |W1|) entrywise, M = S W1 + D R W1 exactly,
            # c = the three products' gamma factors plus the roundings of the casts and the
            # sum (Higham Lemma 3.4 and Eq. 3.13), and 2 delta |.| 1 for a rounded W1
            gamma = sum(n * self.u / (1 - n * self.u) for n in (len(cs), len(cr), R.shape[0]))
            coef = 1.01 * gamma + 8 * self.u
            aS, aR = S.abs() @ spread1, R.abs() @ spread1
            flat = 2 * self.W1_round * float(rad.sum())
            fS, fR = S.abs().sum(1), R.abs().sum(1)
            # flushed subnormals: at most one smallest normal per operation of an entry, times rad
            flushed = (len(cs) + len(cr) + R.shape[0] + 2) * _UNDERFLOW * float(rad.sum())
            spread_l = spread_l + coef * (aS + Dl.abs() @ aR) + flat * (fS + Dl.abs() @ fR) + flushed
            spread_u = spread_u + coef * (aS + Du.abs() @ aR) + flat * (fS + Du.abs() @ fR) + flushed
        macs = (S.shape[0] * len(cs) + R.shape[0] * len(cr) + 2 * S.shape[0] * R.shape[0]) * rad.shape[0]
        return low - spread_l, high + spread_u, macs
