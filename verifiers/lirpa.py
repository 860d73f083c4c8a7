"""Sound output bounds of a torch module over an input region, through auto_LiRPA.

One function, :func:`bound_module`, over one region: the Lp ball of radius ``eps`` around
each input (optionally intersected with a box for the L-inf norm). It returns
:class:`Bounds` such that ``lower <= f(x') <= upper`` for every ``x'`` in the region,
where ``f`` is the module, or ``C @ module`` when a specification matrix ``C`` is given.

>>> import torch
>>> from torch import nn
>>> from certood.verifiers import bound_module
>>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
>>> b = bound_module(net, torch.zeros(4, 2), eps=0.1, method="crown")
>>> b.lower.shape, b.method
(torch.Size([4, 1]), 'crown')
>>> bool((b.lower <= net(torch.zeros(4, 2))).all())
True

:func:`bound_module` rebuilds the BoundedModule on each call (no cache): it snapshots the
weights when built, so a cache keyed on the module would silently bound stale weights after
training. :class:`Bounder` is the explicit alternative for bounding many batches of one
network: it deep-copies the module once, at construction, and reuses one BoundedModule
(IBP and CROWN; alpha-CROWN, which keeps per-batch state, rebuilds each call). It bounds
that snapshot, whatever happens to the module afterwards: build a new one after training.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from certood.errors import CertoodError

from .compat import ensure_lirpa

__all__ = ["Bounds", "Bounder", "bound_module", "METHODS"]

# certood name -> auto_LiRPA method name.
METHODS: dict[str, str] = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}

# Norms whose bounds the tests check by sampling and attack.
NORMS = (math.inf, 2.0)

# Always: 0.3's sparse-alpha path breaks with a shape mismatch when more than 90% of a
# layer's neurons are unstable (FACTS.md).
_BOUND_OPTS = {"sparse_features_alpha": False}


@dataclass(frozen=True)
class Bounds:
    """Element-wise bounds, shape (batch, n_outputs) or (batch, n_specs) with ``C``.

    ``upper`` is +inf everywhere when it was not requested (``bound_upper=False``).
    """

    lower: Tensor
    upper: Tensor
    method: str


def bound_module(
    module: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    norm: float = math.inf,
    method: str = "crown",
    C: Tensor | None = None,
    x_lower: Tensor | None = None,
    x_upper: Tensor | None = None,
    alpha_iterations: int = 20,
    bound_upper: bool = True,
) -> Bounds:
    """Bound ``module(x')`` (or ``C @ module(x')``) over ``||x' - x||_norm <= eps``.

    Args:
        module: the network; bounded as in eval mode, on a copy (the caller's module,
            its mode and its gradients are left untouched).
        x: centres, shape (batch, ...).
        eps: radius, >= 0. For ``norm=inf`` a tensor broadcastable to ``x`` gives one
            radius per element; for other norms it must be a scalar.
        norm: ``math.inf`` or ``2``.
        method: ``"ibp"``, ``"crown"`` or ``"alpha-crown"`` (tightest, slowest).
        C: specification matrix, shape (batch, n_specs, n_outputs); rows such as
            ``e_y - e_j`` bound logit margins directly (tighter than subtracting bounds).
        x_lower, x_upper: box the region is clipped to (e.g. the valid input range),
            broadcastable to ``x``; only for ``norm=inf``.
        alpha_iterations: optimisation steps of alpha-CROWN.
        bound_upper: compute the upper bound (skip it to halve alpha-CROWN's time).
    """
    return Bounder(module)(x, eps, norm=norm, method=method, C=C, x_lower=x_lower, x_upper=x_upper,
                           alpha_iterations=alpha_iterations, bound_upper=bound_upper)


class Bounder:
    """:func:`bound_module` for many batches of one network: a snapshot of ``module`` taken
    now (a deep copy in eval mode, gradients off) and one BoundedModule built on first use
    and reused for IBP and CROWN (any batch size). Calls take :func:`bound_module`'s
    arguments after ``module``.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise CertoodError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.net = copy.deepcopy(module).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._bounded = None

    def _build(self, lirpa, x: Tensor):
        return lirpa.BoundedModule(self.net, torch.zeros_like(x), bound_opts=dict(_BOUND_OPTS), verbose=False)

    def __call__(self, x: Tensor, eps: float | Tensor, norm: float = math.inf, method: str = "crown",
                 C: Tensor | None = None, x_lower: Tensor | None = None, x_upper: Tensor | None = None,
                 alpha_iterations: int = 20, bound_upper: bool = True) -> Bounds:
        net = self.net
        lirpa_method = _validate(net, x, eps, norm, method, C, x_lower, x_upper, alpha_iterations)
        lirpa = ensure_lirpa()
        x = x.detach()
        if C is not None:
            C = C.detach().to(x)
            with torch.no_grad():
                out = net(x)
            if out.dim() != 2 or C.shape[2] != out.shape[1]:
                raise CertoodError(
                    f"C must have shape (batch, n_specs, {out.shape[-1]}) for a module with output "
                    f"shape {tuple(out.shape)}, got {tuple(C.shape)}"
                )

        if norm == math.inf:
            # The region as an explicit box: handles per-element eps and the clip box at once.
            eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
            lo, hi = x - eps_t, x + eps_t
            if x_lower is not None:
                lo = torch.maximum(lo, x_lower.to(x))
            if x_upper is not None:
                hi = torch.minimum(hi, x_upper.to(x))
            if (lo > hi).any():
                raise CertoodError("the eps-ball around x does not meet the box [x_lower, x_upper]")
            ptb = lirpa.PerturbationLpNorm(eps=float(eps_t.max()), norm=math.inf, x_L=lo, x_U=hi)
        else:
            ptb = lirpa.PerturbationLpNorm(eps=float(eps), norm=float(norm))

        if method == "alpha-crown":  # optimised slopes are per batch: a fresh module each call
            bounded = self._build(lirpa, x)
            bounded.set_bound_opts({"optimize_bound_args": {"iteration": int(alpha_iterations)}})
        else:
            if self._bounded is None:
                self._bounded = self._build(lirpa, x)
            bounded = self._bounded
        bx = lirpa.BoundedTensor(x, ptb)
        # alpha-CROWN optimises by gradient descent, so it needs grad mode even inside a
        # caller's torch.no_grad().
        # alpha-CROWN keeps its best bounds in torch's default dtype (optimized_bounds.py casts
        # them with .to(torch.get_default_dtype())): float64 bounds would be rounded to float32,
        # either way, and the next update fails on the dtype mismatch. Run it in x's dtype.
        previous = torch.get_default_dtype()
        try:
            if method == "alpha-crown" and x.dtype.is_floating_point:
                torch.set_default_dtype(x.dtype)
            with torch.enable_grad() if method == "alpha-crown" else torch.no_grad():
                lower, upper = bounded.compute_bounds(
                    x=(bx,), C=C, method=lirpa_method, bound_lower=True, bound_upper=bound_upper
                )
        finally:
            torch.set_default_dtype(previous)
        lower = lower.detach()
        upper = upper.detach() if bound_upper and upper is not None else torch.full_like(lower, math.inf)
        return Bounds(lower=lower, upper=upper, method=method)


def _validate(module, x, eps, norm, method, C, x_lower, x_upper, alpha_iterations) -> str:
    if method not in METHODS:
        raise CertoodError(f"unknown bound method {method!r}; expected one of: {', '.join(METHODS)}")
    if not isinstance(module, nn.Module):
        raise CertoodError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise CertoodError(f"x must be a tensor of shape (batch, ...), got {_shape(x)}")
    if norm not in NORMS:
        raise CertoodError(f"norm must be one of: inf, 2 (tested with auto_LiRPA 0.3), got {norm!r}")
    eps_t = torch.as_tensor(eps)
    if (eps_t < 0).any() or not torch.isfinite(eps_t).all():
        raise CertoodError(f"eps must be finite and >= 0, got {eps!r}")
    if norm != math.inf:
        if eps_t.numel() != 1:
            raise CertoodError(f"eps must be a scalar for norm={norm}, got shape {tuple(eps_t.shape)}")
        if x_lower is not None or x_upper is not None:
            raise CertoodError(
                f"x_lower/x_upper clip the region only for norm=inf (auto_LiRPA ignores them for norm={norm})"
            )
    for label, t in (("eps", eps_t), ("x_lower", x_lower), ("x_upper", x_upper)):
        if isinstance(t, Tensor) and not _broadcasts(t, x):
            raise CertoodError(f"{label} of shape {tuple(t.shape)} does not broadcast to x of shape {tuple(x.shape)}")
    if C is not None and (not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] != x.shape[0]):
        raise CertoodError(f"C must have shape (batch={x.shape[0]}, n_specs, n_outputs), got {_shape(C)}")
    if method == "alpha-crown" and (int(alpha_iterations) != alpha_iterations or alpha_iterations < 1):
        raise CertoodError(f"alpha_iterations must be a positive integer, got {alpha_iterations!r}")
    return METHODS[method]


def _broadcasts(t: Tensor, x: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(t.shape, x.shape) == x.shape
    except RuntimeError:
        return False


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__
