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

4. **Batched over boxes.** Every hidden-layer product of a call is one GEMM for all its
   boxes (the back-substituted coefficients of every box stacked, ``[boxes x rows, width]``;
   per-box unstable neurons and rows as index lists padded to the batch's largest), and the
   per-box parts (relaxations, the lower/upper coefficient updates) are batched products.
   The wide product with the first layer runs box by box on the CPU (each box on its own
   nonzero columns, with ``|W1| rad`` folded into one gathered, scaled copy of W1: the
   products stay in cache and no padding is multiplied), and as one GEMM per column block
   of W1 for all boxes of the call on CUDA (``wide="batched"``; all columns, no gathers).
   Tensors stay on the boxes' device; the weights are copied once per device.

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
# Row counts times input width up to this are multiplied in one product (no column blocks).
_SMALL = 2 ** 17


def supports(layers: list[tuple]) -> bool:
    """Whether ``layers`` (as :func:`certood.verifiers.reference.mlp_layers` lists them) is
    Linear, then (ReLU, Linear) pairs: the networks :class:`SparseCrown` bounds."""
    if not layers or layers[0][0] != "linear" or layers[-1][0] != "linear":
        return False
    return all(layer[0] == ("linear" if i % 2 == 0 else "relu") for i, layer in enumerate(layers))


def float32_products_are_ieee(device: torch.device | str | None = None) -> bool:
    """Whether float32 matrix products on ``device`` (default the CPU) run in IEEE float32 now
    (not reduced to bf16 or tf32: on the CPU by ``torch.backends.mkldnn.matmul.fp32_precision``,
    on CUDA by ``torch.backends.cuda.matmul.fp32_precision`` / ``allow_tf32``, or by the
    legacy ``torch.set_float32_matmul_precision``); False when that cannot be told."""
    cuda = device is not None and torch.device(device).type == "cuda"
    try:
        mode = torch.backends.cuda.matmul.fp32_precision if cuda else torch.backends.mkldnn.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        mode = "none"
    if mode != "none":
        return mode == "ieee"
    if cuda and getattr(torch.backends.cuda.matmul, "allow_tf32", False):
        return False
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


def _padded_index(mask: Tensor, first: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mask`` ``[N, w]`` -> ``(idx [N, m], valid [N, m])``: per row the positions where it is
    set, first (in order; those also set in ``first`` ahead of the others), then unset
    positions up to the batch's largest count ``m`` (``valid`` False there). Padding points at
    distinct unset positions of its own row."""
    counts = mask.sum(1)
    m = int(counts.max()) if mask.numel() else 0
    key = (~mask).to(torch.int8) * 2
    if first is not None:
        key += (~first).to(torch.int8)
    idx = torch.argsort(key, dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid


def _bmv(A: Tensor, v: Tensor) -> Tensor:
    """``A[n] @ v[n]`` for ``A`` ``[N, K, w]`` and ``v`` ``[N, w]``."""
    return torch.bmm(A, v.unsqueeze(2)).squeeze(2)


def _times(A: Tensor, W: Tensor) -> Tensor:
    """``A[n] @ W`` for every box (``A`` ``[N, K, w]``): one GEMM for all boxes."""
    return (A.reshape(-1, A.shape[2]) @ W).reshape(A.shape[0], A.shape[1], W.shape[1])


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
        idx = torch.as_tensor(idx, device=self.centre1.device)
        return CrownState([(lo[idx], hi[idx]) for lo, hi in self.pre], self.centre1[idx], self.spread1[idx],
                          self.rad[idx], self.lower[idx], self.upper[idx], engine=self.engine,
                          empty=None if self.empty is None else self.empty[idx])

    def find(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        """Indices of boxes ``[lower, upper]`` among this state's boxes (equal bit for bit),
        or None when one is missing: then the state cannot serve them."""
        if self.lower is None or lower.shape[1] != self.lower.shape[1] or lower.device != self.lower.device:
            return None
        same = ((self.lower.unsqueeze(0) == lower.unsqueeze(1)) & (self.upper.unsqueeze(0) == upper.unsqueeze(1))).all(2)
        if not bool(same.any(1).all()):
            return None
        return same.double().argmax(1)


class _OnDevice:
    """An engine's weights on one device (made once per device its boxes come on)."""

    def __init__(self, engine: "SparseCrown", device: torch.device):
        self.weights = [(W.to(device), b.to(device)) for W, b in engine.weights]
        W1 = self.weights[0][0]
        self.W1_gemm = W1.to(engine.gemm_dtype)
        self.W1_blocks = [self.W1_gemm[:, c].contiguous() for c in engine.blocks]
        self.W1_abs = W1.abs()


class SparseCrown:
    """CROWN bounds of a Linear/ReLU network over boxes ``[lower, upper]`` (one per row).

    ``layers`` as :func:`certood.verifiers.reference.mlp_layers` gives them (float64
    ``("linear", W, b)`` and ``("relu",)``, alternating, Linear first and last);
    ``gemm_dtype`` the precision of the wide first-layer product (float32 or float64; its
    rounding is accounted for either way); ``wide``: how that product runs, ``"per_box"``
    (each box on its own nonzero columns), ``"batched"`` (one GEMM per column block of W1 for
    all boxes, on every column) or ``"auto"`` (batched on CUDA, per box on the CPU). The
    bounds of both agree to rounding (each pays for its own). Returns float64 ``(lower,
    upper)`` per output on the boxes' device (CPU or CUDA).
    """

    def __init__(self, layers: list[tuple], gemm_dtype: torch.dtype = torch.float32, wide: str = "auto"):
        if not supports(layers):
            raise CertoodError("SparseCrown bounds Linear, (ReLU, Linear)* networks only")
        if gemm_dtype not in _UNIT_ROUNDOFF:
            raise CertoodError(f"gemm_dtype must be float32 or float64, got {gemm_dtype}")
        if wide not in ("auto", "per_box", "batched"):
            raise CertoodError(f"wide must be auto, per_box or batched, got {wide!r}")
        self.layers = layers
        self.weights = [(layer[1].double(), layer[2].double()) for layer in layers if layer[0] == "linear"]
        self.gemm_dtype = gemm_dtype
        self.wide = wide
        W1 = self.weights[0][0]
        self.blocks = [slice(s, min(s + _BLOCK, W1.shape[1])) for s in range(0, W1.shape[1], _BLOCK)]
        # what rounding W1 to gemm_dtype moved it by (0 for float32 weights held in float64)
        self.W1_round = (W1 - W1.to(gemm_dtype).double()).abs().amax().item()
        self.u = _UNIT_ROUNDOFF[gemm_dtype]
        self.stats: dict[str, float] = {}
        self.last_state: CrownState | None = None
        # set to a list to record the shapes of the wide products (benchmarks replay them)
        self.gemm_log: list | None = None
        self._devices: dict[torch.device, _OnDevice] = {}

    def _on(self, device: torch.device) -> _OnDevice:
        if device not in self._devices:
            self._devices[device] = _OnDevice(self, device)
        return self._devices[device]

    def _exact(self) -> "SparseCrown":
        """This engine with float64 products (reduced-precision float32 products are on)."""
        return SparseCrown(self.layers, torch.float64, self.wide)

    def __call__(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._check(lower, upper)
        if self.gemm_dtype == torch.float32 and not float32_products_are_ieee(lower.device):
            # bf16 / tf32 products were switched on: the rounding term assumes IEEE float32,
            # so this call multiplies in float64 instead (global state is read, never changed)
            exact = self._exact()
            bounds = exact._bounds(lower, upper)
            self.stats, self.last_state = exact.stats, exact.last_state
            return bounds
        return self._bounds(lower, upper)

    def ibp(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Interval bounds (the first layer exactly over the box), float64."""
        lower, upper = self._check(lower, upper)
        lo, hi, _, _ = self._first(lower, upper)
        for W, b in self._on(lower.device).weights[1:]:
            lo, hi = _interval(W, b, lo.clamp(min=0), hi.clamp(min=0))
        return lo, hi

    def _check(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = lower.double().flatten(1), upper.double().flatten(1)
        if lower.shape != upper.shape or lower.shape[1] != self.weights[0][0].shape[1]:
            raise CertoodError(f"SparseCrown: boxes of shape {tuple(lower.shape)} / {tuple(upper.shape)} "
                               f"for an input width of {self.weights[0][0].shape[1]}")
        if lower.device != upper.device:
            raise CertoodError(f"SparseCrown: lower on {lower.device}, upper on {upper.device}")
        if bool((lower > upper).any()):
            raise CertoodError("SparseCrown: a box has lower > upper")
        return lower, upper

    def _first(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Exact bounds of z1 over the box, its value at the centre and ``|W1| rad``."""
        dev = self._on(lower.device)
        W1, b1 = dev.weights[0]
        centre1 = (lower + upper) / 2 @ W1.T + b1
        spread1 = (upper - lower) / 2 @ dev.W1_abs.T
        return centre1 - spread1, centre1 + spread1, centre1, spread1

    def _bounds(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        state = self._intermediate(lower, upper)
        self.last_state = state  # for spec_bounds over the same boxes
        lo, hi = self.final_bounds(state)
        if len(self.weights) > 1:
            state.rows += lower.shape[0] * self.weights[-1][0].shape[0]
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
        if self.gemm_dtype == torch.float32 and not float32_products_are_ieee(lower.device):
            return self._exact().prepare(lower, upper, phases, within)
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
        W, b = engine._on(state.centre1.device).weights[-1]
        C = C.to(device=state.centre1.device, dtype=torch.float64)
        if C.dim() != 3 or C.shape[0] != state.centre1.shape[0] or C.shape[2] != W.shape[0]:
            raise CertoodError(f"spec_bounds: C of shape {tuple(C.shape)} for {state.centre1.shape[0]} boxes "
                               f"and {W.shape[0]} outputs")
        if len(engine.weights) == 1:  # C W x + C b over the box, exactly
            A = C @ W
            centre = _bmv(A, (state.lower + state.upper) / 2) + C @ b
            return centre - _bmv(A.abs(), state.rad), centre + _bmv(A.abs(), state.rad)
        return engine._backsubstitute(len(engine.weights) - 1, _times(C, W), C @ b, state)

    def final_bounds(self, state: "CrownState") -> tuple[Tensor, Tensor]:
        """CROWN bounds of every output over each box (subdomain) of ``state``."""
        engine = state.engine if state.engine is not None else self
        if len(engine.weights) == 1:
            return state.pre[0]
        W, b = engine._on(state.centre1.device).weights[-1]
        n = state.centre1.shape[0]
        return engine._backsubstitute(len(engine.weights) - 1, W.expand(n, -1, -1), b.expand(n, -1), state)

    def _intermediate(self, lower: Tensor, upper: Tensor, phases: list[Tensor] | None = None,
                      within: list[tuple[Tensor, Tensor]] | None = None) -> "CrownState":
        """Bounds of every hidden pre-activation: IBP from the previous bounds, CROWN for the
        rows it leaves unstable, all boxes at once (``phases``: see :meth:`prepare`)."""
        device = lower.device
        weights = self._on(device).weights
        rad = (upper - lower) / 2
        l1, u1, centre1, spread1 = self._first(lower, upper)
        empty = torch.zeros(lower.shape[0], dtype=torch.bool, device=device)
        if within is not None:
            l1, u1 = torch.maximum(l1, within[0][0].to(l1)), torch.minimum(u1, within[0][1].to(u1))
        if phases is not None:
            l1, u1, empty = _fix(l1, u1, phases[0].to(device), empty)
        state = CrownState([(l1, u1)], centre1, spread1, rad, lower, upper, engine=self, empty=empty)
        for k in range(1, len(weights) - 1):
            W, b = weights[k]
            lo, hi = _interval(W, b, state.pre[-1][0].clamp(min=0), state.pre[-1][1].clamp(min=0))
            rows, valid = _padded_index((lo < 0) & (hi > 0))
            if rows.shape[1]:
                keep = valid.to(W.dtype)
                # padded rows are zero: their bounds (0) are computed and dropped
                lo_r, hi_r = self._backsubstitute(k, W[rows] * keep.unsqueeze(2), b[rows] * keep, state, valid)
                box = torch.arange(lower.shape[0], device=device).unsqueeze(1).expand_as(rows)[valid]
                lo, hi = lo.clone(), hi.clone()
                lo[box, rows[valid]] = lo_r[valid]
                hi[box, rows[valid]] = hi_r[valid]
                state.rows += int(valid.sum())
            if within is not None:
                lo, hi = torch.maximum(lo, within[k][0].to(lo)), torch.minimum(hi, within[k][1].to(hi))
            if phases is not None:
                lo, hi, state.empty = _fix(lo, hi, phases[k].to(device), state.empty)
            state.pre.append((lo, hi))
        return state

    def _backsubstitute(self, k: int, S: Tensor, b0: Tensor, state: "CrownState",
                        row_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """CROWN bounds ``[N, K]`` of the rows ``S[n] x + b0[n]`` of layer ``k``'s input ``x``
        (``S`` ``[N, K, width]``: rows of its weight, or combinations of them) over box ``n``
        of ``state``, all boxes at once; ``row_valid`` ``[N, K]``: the rows that count (the
        others are zero padding); the wide products' multiply-adds are added to ``state.macs``.

        The lower- and upper-bound coefficients are kept as ``S + Dl R`` and ``S + Du R``:
        they differ only through the unstable neurons met on the way (their relaxation depends
        on the sign of the coefficient), so ``R`` has one row per unstable neuron. Coefficients
        live on each box's *live* neurons of the layer they stand on (active or unstable:
        an inactive neuron's column is zeroed by its relaxation), listed per box and padded
        to the batch's largest count, so every product with a hidden weight matrix is one
        batched product for all boxes over the weight's rows and columns of those lists."""
        dev = self._on(state.centre1.device)
        pre = state.pre
        n, K = S.shape[0], S.shape[1]
        device = S.device
        su, iu, sl = _relax(pre[k - 1][0], pre[k - 1][1])
        # live neurons of layer k - 1, the stable ones first (the only nonzero columns of S
        # after their relaxation: on layer 0 the wide product with S needs only those)
        idx, ok = _padded_index((su != 0) | (sl != 0), (su == sl) & (iu == 0))
        S = S.gather(2, idx.unsqueeze(1).expand(n, K, idx.shape[1]))
        R = S.new_zeros(n, 0, idx.shape[1])
        R_valid = torch.zeros(n, 0, dtype=torch.bool, device=device)
        Dl = Du = S.new_zeros(n, K, 0)
        bl = bu = b0
        for j in range(k - 1, -1, -1):
            keep = ok.to(S.dtype)
            s_u, i_u, s_l = (t.gather(1, idx) * keep for t in (su, iu, sl))
            unstable = ((s_u != s_l) | (i_u != 0)) & ok
            stable = torch.where(unstable, torch.zeros_like(s_l), s_l).unsqueeze(1)  # slope 1 or 0
            uidx, uvalid = _padded_index(unstable)
            m = uidx.shape[1]
            if m:
                ukeep = uvalid.to(S.dtype)
                Su = S.gather(2, uidx.unsqueeze(1).expand(n, K, m))
                Ru = R.gather(2, uidx.unsqueeze(1).expand(n, R.shape[1], m))
                Al, Au = torch.baddbmm(Su, Dl, Ru), torch.baddbmm(Su, Du, Ru)
                gu, gi, gl = ((t.gather(1, uidx) * ukeep).unsqueeze(1) for t in (s_u, i_u, s_l))
                bl = bl + (Al.clamp(max=0) * gi).sum(2)
                bu = bu + (Au.clamp(min=0) * gi).sum(2)
                Dl = torch.cat([Dl, Al.clamp(min=0) * gl + Al.clamp(max=0) * gu], 2)
                Du = torch.cat([Du, Au.clamp(min=0) * gu + Au.clamp(max=0) * gl], 2)
                select = S.new_zeros(n, m, S.shape[2]).scatter_(2, uidx.unsqueeze(2), ukeep.unsqueeze(2))
                R = torch.cat([R * stable, select], 1)
                R_valid = torch.cat([R_valid, uvalid], 1)
            else:
                R = R * stable
            S = S * stable
            if j > 0:
                Wj, bj = dev.weights[j]
                bg = bj[idx] * keep  # [n, live]
                Rb = _bmv(R, bg)
                bl = bl + _bmv(S, bg) + _bmv(Dl, Rb)
                bu = bu + _bmv(S, bg) + _bmv(Du, Rb)
                su, iu, sl = _relax(pre[j - 1][0], pre[j - 1][1])
                nidx, nok = _padded_index((su != 0) | (sl != 0), (su == sl) & (iu == 0))
                # this layer's live rows x the next layer's live columns of W_j, per box (padding
                # columns are zeroed by the next relaxation, padding rows meet zero coefficients)
                Wg = Wj[idx.unsqueeze(2), nidx.unsqueeze(1)]
                SR = torch.bmm(torch.cat([S, R], 1), Wg)
                S, R = SR[:, :K], SR[:, K:]
                idx, ok = nidx, nok
        # coefficients on z1 = W1 x + b1 (on its live neurons idx): the centre term exactly
        # (float64), the spread |A W1| rad by the wide products
        centre1 = state.centre1.gather(1, idx) * ok.to(S.dtype)
        Rc = _bmv(R, centre1)
        low = _bmv(S, centre1) + _bmv(Dl, Rc) + bl
        high = _bmv(S, centre1) + _bmv(Du, Rc) + bu
        spread1 = state.spread1.gather(1, idx) * ok.to(S.dtype)
        batched = self.wide == "batched" or (self.wide == "auto" and device.type != "cpu")
        wide = self._wide_batched if batched else self._wide_per_box
        n_s = (stable.squeeze(1) != 0).sum(1)  # layer 0's stable live neurons (listed first)
        spread_l, spread_u, macs = wide(S, R, Dl, Du, idx, ok, n_s, state.rad, spread1, dev, row_valid, R_valid)
        state.macs += macs
        return low - spread_l, high + spread_u

    def _rounding(self, S, R, Dl, Du, spread1, rsum, inner):
        """What the float32 wide products (inner dimension ``inner``) and a rounded W1 can
        miss: ``|fl(M) - M| <= c (|S| |W1| + |D| |R| |W1|)`` entrywise, ``M = S W1 + D R W1``
        exactly (or the same product formed as ``(S + D R) W1``), ``c`` the products' gamma
        factors (inner dimensions: the columns multiplied and R's rows) plus the roundings of
        the casts, of the scaling by rad and of the sums (Higham Lemma 3.4 and Eq. 3.13), and
        ``2 delta |.| 1`` for a rounded W1; plus flushed subnormals. Works on one box
        (2-d) or a batch (3-d). Returns the additions to the (lower, upper) spreads."""
        mv = (lambda A, v: A @ v) if S.dim() == 2 else _bmv
        gamma = sum(d * self.u / (1 - d * self.u) for d in (inner, inner, R.shape[-2]))
        coef = 1.01 * gamma + 10 * self.u
        aS, aR = S.abs(), R.abs()
        eS, eR = coef * mv(aS, spread1) + 2 * self.W1_round * rsum * aS.sum(-1), \
            coef * mv(aR, spread1) + 2 * self.W1_round * rsum * aR.sum(-1)
        # flushed subnormals: at most one smallest normal per operation of an entry, times rad
        flushed = (2 * inner + R.shape[-2] + 3) * _UNDERFLOW * rsum
        return eS + mv(Dl.abs(), eR) + flushed, eS + mv(Du.abs(), eR) + flushed

    def _sums(self, sl: Tensor, su: Tensor, d: int) -> tuple[Tensor, Tensor]:
        """Float32 sums of nonnegative terms per column block: within gamma of the exact."""
        if self.gemm_dtype == torch.float64:
            return sl, su
        nb = max(c.stop - c.start for c in self.blocks)
        gamma = nb * self.u / (1 - nb * self.u)
        flushed = d * _UNDERFLOW  # a flushed term per addend of the sums
        return sl / (1 - gamma) + flushed, su / (1 - gamma) + flushed

    def _wide_per_box(self, S, R, Dl, Du, idx, ok, n_s, rad, spread1, dev, row_valid, R_valid):
        """``|(S + D R)[n] W1| rad[n]`` (D = Dl, Du) box by box, on box n's own rows and live
        columns: W1's rows gathered once per box and scaled by ``rad`` (``|M| r = |M diag(r)|``
        for ``r >= 0``), then per column block the products and one ``|.|`` sum. Either
        ``S W1 + D (R W1)`` or ``(S + D R) W1``, whichever multiplies less. Returns the spreads
        ``[N, K]`` (float64, rounding paid for) and the multiply-adds."""
        n, K = S.shape[0], S.shape[1]
        g = self.gemm_dtype
        out_l, out_u = S.new_zeros(n, K), S.new_zeros(n, K)
        r = _round_up(rad, g)
        rsum = rad.sum(1)
        n_rows = row_valid.sum(1).tolist() if row_valid is not None else [K] * n
        n_cols = ok.sum(1).tolist()
        n_stable = n_s.tolist()  # layer 0's live neurons are listed stable first: S is zero on the others
        macs, d = 0, rad.shape[1]
        exact = g == torch.float64 and not self.W1_round
        for i in range(n):
            kr, m, ms = n_rows[i], n_cols[i], n_stable[i]
            if not kr:
                continue
            rr = R_valid[i].nonzero().flatten()
            nr = len(rr)
            Si, Ri = S[i, :kr, :m], R[i, rr, :m]
            Dli, Dui = Dl[i, :kr, rr], Du[i, :kr, rr]
            sl = torch.zeros(kr, dtype=torch.float64, device=S.device)
            su = torch.zeros(kr, dtype=torch.float64, device=S.device)
            if m:
                W1r = dev.W1_gemm.index_select(0, idx[i, :m]).mul_(r[i])  # [m, D]: W1 diag(rad)
                # S W1 + D (R W1) (S on its nonzero columns) or twice (S + D R) W1: the fewer products
                split = kr * ms + nr * m + 2 * kr * nr < 2 * kr * m
                if split:
                    Sg, Rg, Dlg, Dug = Si[:, :ms].to(g), Ri.to(g), Dli.to(g), Dui.to(g)
                    macs += (kr * ms + nr * m + 2 * kr * nr) * d
                else:
                    Alg, Aug = torch.addmm(Si, Dli, Ri).to(g), torch.addmm(Si, Dui, Ri).to(g)
                    macs += 2 * kr * m * d
                # column blocks keep a block's products in cache through the |.| and the sum;
                # a few rows are multiplied over the whole width at once (sums still per block)
                chunks = self.blocks if kr * d > _SMALL else [slice(0, d)]
                if self.gemm_log is not None:
                    self.gemm_log.append(("per_box", kr, ms, nr, m, split, len(chunks) > 1))
                for cc in chunks:
                    Wb = W1r[:, cc]
                    if split:
                        SW, RW = Sg @ Wb[:ms], Rg @ Wb
                        Mu = torch.addmm(SW, Dug, RW)
                        Ml = SW.addmm_(Dlg, RW)
                    else:
                        Ml, Mu = Alg @ Wb, Aug @ Wb
                    Ml, Mu = Ml.abs_(), Mu.abs_()
                    for cb in (self.blocks if len(chunks) == 1 else [slice(0, cc.stop - cc.start)]):
                        sl += Ml[:, cb].sum(1).double()
                        su += Mu[:, cb].sum(1).double()
                sl, su = self._sums(sl, su, d)
            if not exact:
                el, eu = self._rounding(Si, Ri, Dli, Dui, spread1[i, :m], float(rsum[i]), m)
                sl, su = sl + el, su + eu
            out_l[i, :kr], out_u[i, :kr] = sl, su
        return out_l, out_u, macs

    def _wide_batched(self, S, R, Dl, Du, idx, ok, n_s, rad, spread1, dev, row_valid, R_valid):
        """The same spreads for all boxes at once: per column block of W1 one batched GEMM of
        every box's rows of ``S`` and ``R`` with W1's rows of its live neurons (padded), then
        the lower/upper combinations and ``|.| rad`` as batched products."""
        n, K, m = S.shape
        g = self.gemm_dtype
        r = _round_up(rad, g).unsqueeze(2)
        SR = torch.cat([S, R], 1).to(g)
        Dlg, Dug = Dl.to(g), Du.to(g)
        out_l, out_u = S.new_zeros(n, K), S.new_zeros(n, K)
        W1g = dev.W1_gemm[idx] * ok.unsqueeze(2).to(g)  # [n, m, D]
        if self.gemm_log is not None:
            self.gemm_log.append(("batched", n, K, R.shape[1], m))
        for cb in self.blocks:
            P = torch.bmm(SR, W1g[:, :, cb])
            SW, RW = P[:, :K], P[:, K:]
            Mu = torch.baddbmm(SW, Dug, RW)
            Ml = torch.baddbmm(SW, Dlg, RW)
            out_l += torch.bmm(Ml.abs_(), r[:, cb]).squeeze(2).double()
            out_u += torch.bmm(Mu.abs_(), r[:, cb]).squeeze(2).double()
        out_l, out_u = self._sums(out_l, out_u, rad.shape[1])
        if g != torch.float64 or self.W1_round:
            el, eu = self._rounding(S, R, Dl, Du, spread1, rad.sum(1, keepdim=True), m)
            out_l, out_u = out_l + el, out_u + eu
        macs = n * ((K + R.shape[1]) * m + 2 * K * R.shape[1]) * rad.shape[1]
        return out_l, out_u, macs
