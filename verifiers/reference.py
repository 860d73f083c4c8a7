"""Float64 reference bounds for Linear/ReLU networks: IBP and CROWN, written out here.

Independent of auto_LiRPA (own code, float64 throughout). ``certood recheck`` re-verifies
stored certificates with it, and the tests compare it with auto_LiRPA, so a bug in either
shows up as a disagreement.

A network is a list of layers, each ``("linear", W [out, in], b [out])`` or ``("relu",)``;
:func:`mlp_layers` turns an ``nn.Sequential`` of Linear / ReLU / Flatten (torchvision's
``TwoMLPHead`` included) into that list. The region is an L-inf box (optionally clipped)
or an L2 ball around each row of ``center``.

>>> import torch
>>> layers = [("linear", torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)), ("relu",)]
>>> region = Region(torch.tensor([[1.0, -1.0]], dtype=torch.float64), 0.5)
>>> ibp_bounds(layers, region)
(tensor([[0.5000, 0.0000]], dtype=torch.float64), tensor([[1.5000, 0.0000]], dtype=torch.float64))

CROWN here uses the relaxation auto_LiRPA 0.3 uses by default: the upper line through
``(l, 0)`` and ``(u, u)``, the lower slope 1 when ``u > -l`` else 0, CROWN (not IBP) for
every intermediate layer, except that a neuron IBP proves stable keeps IBP's bounds (as
auto_LiRPA's sparse intermediate bounds and certood's sparse engine do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from certood.errors import CertoodError

__all__ = ["Region", "mlp_layers", "ibp_bounds", "crown_bounds", "reference_bounds", "evaluate"]

Layer = tuple


@dataclass(frozen=True)
class Region:
    """``{x : ||x - center||_norm <= eps}`` per row, intersected with ``[lower, upper]``
    (L-inf only: for L2 the box is not used, which bounds a superset, so stays sound).

    ``eps`` is a float or a tensor ``[N, 1]`` (one radius per row).
    """

    center: Tensor
    eps: float | Tensor
    norm: float = math.inf
    lower: Tensor | None = None
    upper: Tensor | None = None

    def _eps(self) -> Tensor:
        return torch.as_tensor(self.eps, dtype=self.center.dtype, device=self.center.device)

    def box(self) -> tuple[Tensor, Tensor]:
        """An axis-aligned box containing the region (equal to it for L-inf)."""
        e = self._eps()
        lo, hi = self.center - e, self.center + e
        if self.norm == math.inf:
            if self.lower is not None:
                lo = torch.maximum(lo, self.lower.to(lo))
            if self.upper is not None:
                hi = torch.minimum(hi, self.upper.to(hi))
        return lo, hi

    def linear_bounds(self, A: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Exact min and max of ``A[n] @ x + c[n]`` over the region of row n.

        ``A`` is ``[N, K, D]`` (or ``[K, D]``, shared), ``c`` is ``[N, K]`` or ``[K]``.
        """
        if A.dim() == 2:
            A = A.unsqueeze(0).expand(self.center.shape[0], -1, -1)
        if self.norm == math.inf:
            lo, hi = self.box()
            mid, rad = (lo + hi) / 2, (hi - lo) / 2
            centre = torch.einsum("nkd,nd->nk", A, mid)
            spread = torch.einsum("nkd,nd->nk", A.abs(), rad)
        else:
            dual = self.norm / (self.norm - 1) if self.norm != 1 else math.inf
            centre = torch.einsum("nkd,nd->nk", A, self.center)
            spread = A.norm(p=dual, dim=2) * self._eps().reshape(-1, 1)
        return centre + c - spread, centre + c + spread


def mlp_layers(module: nn.Module) -> list[Layer]:
    """The Linear / ReLU layers of ``module`` in order, as float64 tensors.

    Accepts ``nn.Sequential`` (nested), ``nn.Linear``, ``nn.ReLU``, ``nn.Flatten``,
    ``nn.Identity`` and torchvision's ``TwoMLPHead`` (flatten, fc6, relu, fc7, relu); raises
    CertoodError for anything else (the reference bounds are for MLP heads only).
    """
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    out: list[Layer] = []
    if isinstance(module, nn.Sequential):
        for child in module:
            out += mlp_layers(child)
    elif isinstance(module, nn.Linear):
        bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
        out.append(("linear", module.weight.detach().double().clone(), bias.detach().double().clone()))
    elif isinstance(module, nn.ReLU):
        out.append(("relu",))
    elif isinstance(module, (nn.Flatten, nn.Identity)):
        pass  # inputs are already flat [N, D]
    elif isinstance(module, TwoMLPHead):
        out += mlp_layers(module.fc6) + [("relu",)] + mlp_layers(module.fc7) + [("relu",)]
    else:
        raise CertoodError(f"reference bounds need a Linear/ReLU network, found a {type(module).__name__}")
    return out


def evaluate(layers: list[Layer], x: Tensor) -> Tensor:
    """The network's output at ``x`` (float64)."""
    x = x.double()
    for layer in layers:
        x = x @ layer[1].T + layer[2] if layer[0] == "linear" else x.clamp(min=0)
    return x


def ibp_bounds(layers: list[Layer], region: Region) -> tuple[Tensor, Tensor]:
    """Interval bounds; the first Linear layer is bounded exactly over the region."""
    lo = hi = None
    for layer in layers:
        if layer[0] == "linear":
            W, b = layer[1], layer[2]
            if lo is None:
                lo, hi = region.linear_bounds(W, b)
            else:
                mid, rad = (lo + hi) / 2, (hi - lo) / 2
                centre, spread = mid @ W.T + b, rad @ W.abs().T
                lo, hi = centre - spread, centre + spread
        else:
            if lo is None:
                lo, hi = region.box()
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    if lo is None:
        return region.box()
    return lo, hi


def _relax(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU relaxation given pre-activation bounds: (upper slope, upper intercept, lower slope)."""
    lc, uc = l.clamp(max=0), u.clamp(min=0)
    denom = uc - lc
    slope_u = torch.where(denom > 0, uc / denom.clamp(min=1e-300), torch.zeros_like(u))
    icpt_u = -slope_u * lc
    slope_l = (slope_u > 0.5).to(u.dtype)
    return slope_u, icpt_u, slope_l


def _backward(layers: list[Layer], pre: dict[int, tuple[Tensor, Tensor]], region: Region,
              n: int, spec: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CROWN bounds of the output of ``layers`` (which must end with a Linear layer), or of
    ``spec[n] @ output`` (``spec`` ``[N, K, outputs]``: one specification matrix per row)."""
    Al = Au = None
    bl = bu = None
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        if layer[0] == "linear":
            W, b = layer[1], layer[2]
            if Al is None and spec is not None:
                Al = Au = spec.double() @ W
                bl = spec.double() @ b
                bu = bl.clone()
            elif Al is None:
                Al = W.unsqueeze(0).expand(n, -1, -1)
                Au = Al
                bl = b.unsqueeze(0).expand(n, -1).clone()
                bu = bl.clone()
            else:
                bl = bl + Al @ b
                bu = bu + Au @ b
                Al, Au = Al @ W, Au @ W
        else:
            su, iu, sl = _relax(*pre[index])
            su, iu, sl = su.unsqueeze(1), iu.unsqueeze(1), sl.unsqueeze(1)
            pos, neg = Al.clamp(min=0), Al.clamp(max=0)
            bl = bl + (neg * iu).sum(-1)
            Al = pos * sl + neg * su
            pos, neg = Au.clamp(min=0), Au.clamp(max=0)
            bu = bu + (pos * iu).sum(-1)
            Au = pos * su + neg * sl
    lo, _ = region.linear_bounds(Al, bl)
    _, hi = region.linear_bounds(Au, bu)
    return lo, hi


def crown_bounds(layers: list[Layer], region: Region, stable_from_ibp: bool = True,
                 spec: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CROWN bounds (backward linear relaxation, CROWN for intermediate layers too) of the
    output, or of ``spec[n] @ output`` for row ``n`` (``spec`` ``[N, K, outputs]``).

    ``stable_from_ibp``: a hidden neuron that interval bounds (from the layer before) prove
    stable keeps those bounds, so its relaxation is exact even where its own CROWN bound
    would straddle 0: the rule of auto_LiRPA 0.3's sparse intermediate bounds and of
    certood's sparse engine (certood.verifiers.sparse_crown), which ``certood recheck``
    re-proves. ``False``: pure CROWN intermediate bounds.
    """
    if not layers or layers[-1][0] != "linear":
        raise CertoodError("crown_bounds: the network must end with a Linear layer")
    n = region.center.shape[0]
    pre: dict[int, tuple[Tensor, Tensor]] = {}
    for index, layer in enumerate(layers):
        if layer[0] == "relu":
            if index == 0 or layers[index - 1][0] != "linear":
                lo, hi = region.box() if index == 0 else (pre[index - 1][0].clamp(min=0),
                                                          pre[index - 1][1].clamp(min=0))
                # a ReLU after a ReLU (or on the input): pass interval bounds through
                pre[index] = (lo, hi)
            else:
                lo, hi = _backward(layers[:index], pre, region, n)
                before = [i for i in pre if i < index - 1]
                if stable_from_ibp and before:  # IBP through the Linear from the previous bounds
                    W, b = layers[index - 1][1], layers[index - 1][2]
                    plo, phi = (pre[max(before)][0].clamp(min=0), pre[max(before)][1].clamp(min=0))
                    mid, rad = (plo + phi) / 2, (phi - plo) / 2
                    ilo, ihi = mid @ W.T + b - rad @ W.abs().T, mid @ W.T + b + rad @ W.abs().T
                    stable = (ilo >= 0) | (ihi <= 0)
                    lo, hi = torch.where(stable, ilo, lo), torch.where(stable, ihi, hi)
                pre[index] = (lo, hi)
    return _backward(layers, pre, region, n, spec)


def reference_bounds(layers: list[Layer], region: Region, method: str = "crown") -> tuple[Tensor, Tensor]:
    """``ibp_bounds`` or ``crown_bounds`` by name."""
    if method == "ibp":
        return ibp_bounds(layers, region)
    if method == "crown":
        return crown_bounds(layers, region)
    raise CertoodError(f"reference bounds: expected method ibp or crown, found {method!r}")
