"""Import auto_LiRPA 0.3 on today's torch and numpy, with the fixes it needs.

auto_LiRPA 0.3 (Sep 2022) is the newest release on PyPI. It pins torch<1.13, so it is
installed with ``--no-deps``; on torch 2.14 with numpy 2 it needs six fixes. Each fix is a
small function below that first checks whether it is needed (an attribute is missing, a
known piece of 0.3 code is present, torch behaves the old way), so a newer auto_LiRPA or
torch is left alone. Import-time shims for numpy and torch.onnx are installed only while
auto_LiRPA is imported and removed afterwards; the fixes that must outlive the import patch
auto_LiRPA's own classes, plus one method that torch removed from ``torch._C.Node``.

>>> from certood.verifiers.compat import ensure_lirpa
>>> lirpa = ensure_lirpa()
>>> lirpa.BoundedModule.__name__
'BoundedModule'
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from certood.errors import CertoodError

__all__ = ["ensure_lirpa", "applied_fixes"]

_LOCK = threading.Lock()
_LIRPA: types.ModuleType | None = None
_APPLIED: list[str] = []


def ensure_lirpa() -> types.ModuleType:
    """Return the ``auto_LiRPA`` module, importing and fixing it on the first call.

    Idempotent and safe to call from several threads: later calls return the same module.
    """
    global _LIRPA
    if _LIRPA is not None:
        return _LIRPA
    with _LOCK:
        if _LIRPA is not None:
            return _LIRPA
        with _numpy_arraysetops_shim(), _torch_onnx_import_shims():
            try:
                lirpa = _import_quietly("auto_LiRPA")
            except ModuleNotFoundError as e:
                if e.name != "auto_LiRPA":
                    raise
                raise CertoodError(
                    "auto_LiRPA is not installed (hint: pip install --no-deps auto-lirpa==0.3, "
                    "as the Makefile does; it pins an old torch, so pip refuses it as a dependency)"
                ) from e
        _fix_node_getitem()
        _fix_named_members(lirpa)
        _fix_relu_alpha_clamp(lirpa)
        _fix_avgpool_contiguous(lirpa)
        _LIRPA = lirpa
        return lirpa


def _import_quietly(name: str) -> types.ModuleType:
    """Import ``name``, keeping the process's warning filters as they were.

    auto_LiRPA 0.3 calls ``warnings.simplefilter("once")`` at import, which would change
    warning behaviour for the whole program; ``catch_warnings`` restores the filters. It
    also scripts helpers with ``torch.jit.script``, which torch 2.14 deprecates: nothing a
    user can act on, so that one warning is dropped and any other is passed on.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    for w in caught:
        if not (issubclass(w.category, FutureWarning) and "torch.jit.script" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return module


def applied_fixes() -> tuple[str, ...]:
    """Names of the fixes ``ensure_lirpa`` applied in this process (for logs and tests)."""
    return tuple(_APPLIED)


def _mark(name: str) -> None:
    if name not in _APPLIED:
        _APPLIED.append(name)


@contextlib.contextmanager
def _temporary_attr(module_name: str, attr: str, value: Any) -> Iterator[None]:
    """Give ``module_name`` the attribute ``attr`` for the duration of the block."""
    try:
        module = importlib.import_module(module_name)
        made_module = False
    except ImportError:
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        made_module = True
    setattr(module, attr, value)
    try:
        yield
    finally:
        if made_module:
            sys.modules.pop(module_name, None)
        else:
            with contextlib.suppress(AttributeError):
                delattr(module, attr)


# Fix 1. numpy 2 removed the module numpy.lib.arraysetops; auto_LiRPA 0.3
# (operators/base.py) imports only `isin` from it, which numpy still has at the top level.
@contextlib.contextmanager
def _numpy_arraysetops_shim() -> Iterator[None]:
    if importlib.util.find_spec("numpy.lib.arraysetops") is not None:
        yield
        return
    import numpy

    _mark("numpy_arraysetops_shim")
    with _temporary_attr("numpy.lib.arraysetops", "isin", numpy.isin):
        yield


# Fix 2 (import part). auto_LiRPA 0.3 (parse_graph.py) imports
# torch.onnx.utils._optimize_graph and torch.onnx.symbolic_helper._set_opset_version.
# Newer torch moved the TorchScript exporter to torch.onnx._internal.torchscript_exporter;
# _optimize_graph lives there (torch 2.14.1 still re-exports it from torch.onnx.utils, so
# that half is a no-op there), and _set_opset_version is gone (checked on 2.14.1): setting
# GLOBALS.export_onnx_opset_version does its job.
@contextlib.contextmanager
def _torch_onnx_import_shims() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if not _has_attr("torch.onnx.utils", "_optimize_graph"):
            from torch.onnx._internal.torchscript_exporter.utils import _optimize_graph

            _mark("torch_onnx_optimize_graph")
            stack.enter_context(_temporary_attr("torch.onnx.utils", "_optimize_graph", _optimize_graph))
        if not _has_attr("torch.onnx.symbolic_helper", "_set_opset_version"):
            _mark("torch_onnx_set_opset_version")
            stack.enter_context(
                _temporary_attr("torch.onnx.symbolic_helper", "_set_opset_version", _set_opset_version)
            )
        yield


def _has_attr(module_name: str, attr: str) -> bool:
    try:
        return hasattr(importlib.import_module(module_name), attr)
    except ImportError:
        return False


def _set_opset_version(opset_version: int) -> None:
    """What torch.onnx.symbolic_helper._set_opset_version did before torch removed it."""
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    GLOBALS.export_onnx_opset_version = opset_version


# Fix 3. torch 2.14 no longer defines torch._C.Node.__getitem__ (node["attr"]); auto_LiRPA
# 0.3 reads node attributes that way when it parses the traced graph.
def _fix_node_getitem() -> None:
    if hasattr(torch._C.Node, "__getitem__"):
        return
    try:
        from torch.onnx._internal.torchscript_exporter.symbolic_helper import _node_get
    except ImportError:  # same behaviour, for a torch that moves it again

        def _node_get(node: Any, key: str) -> Any:
            return getattr(node, node.kindOf(key))(key)

    torch._C.Node.__getitem__ = _node_get
    _mark("torch_node_getitem")


# Fix 4. torch 2.x calls Module._named_members(..., remove_duplicate=...); auto_LiRPA 0.3
# overrides it without that argument, so BoundedModule.parameters() raises a TypeError. The
# bound code calls it on some paths, e.g. alpha-CROWN on conv layers in matrix mode.
def _fix_named_members(lirpa: types.ModuleType) -> None:
    cls = lirpa.BoundedModule
    if "remove_duplicate" in inspect.signature(cls._named_members).parameters:
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        # auto_LiRPA 0.3's body, plus remove_duplicate as torch defines it.
        memo = set()
        modules = (
            self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
            if recurse
            else [(prefix, self)]
        )
        for module_prefix, module in modules:
            for k, v in get_members_fn(module):
                if v is None or v in memo:
                    continue
                if remove_duplicate:
                    memo.add(v)
                name = module_prefix + ("." if module_prefix else "") + k
                yield self.node_name_map.get(name, name), v

    cls._named_members = _named_members
    _mark("bounded_module_named_members")


# Fix 5 (SILENT). In torch 2.14 clamp's gradient is zero exactly at its bounds (probed below
# before patching). alpha-CROWN's ReLU slopes start exactly at 0 or 1 and are clamped to [0, 1] in
# BoundRelu._relu_mask_alpha, so they get no gradient, never move, and alpha-CROWN quietly
# returns CROWN's bounds. A straight-through clamp keeps the clamped value (soundness only
# needs a slope in [0, 1]) and passes the gradient; auto_LiRPA clips alpha after each step.
def _fix_relu_alpha_clamp(lirpa: types.ModuleType) -> None:
    from auto_LiRPA.operators.activation import BoundRelu

    original = inspect.getattr_static(BoundRelu, "_relu_mask_alpha", None)
    if not isinstance(original, staticmethod) or not _clamp_blocks_gradient_at_bounds():
        return
    try:
        source = inspect.getsource(original.__func__)
    except (OSError, TypeError):
        return
    if "torch.clamp(lb_lower_d, min=0., max=1.)" not in source:  # not the 0.3 code
        return

    def _relu_mask_alpha(lower, upper, lb_lower_d, ub_lower_d):
        lower_mask = (lower >= 0).requires_grad_(False).to(lower.dtype)
        upper_mask = (upper <= 0).requires_grad_(False)
        zero_coeffs = upper_mask.all()
        no_mask = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
        if lb_lower_d is not None:
            lb_lower_d = _straight_through_unit_clamp(lb_lower_d) * no_mask + lower_mask
        if ub_lower_d is not None:
            ub_lower_d = _straight_through_unit_clamp(ub_lower_d) * no_mask + lower_mask
        return lb_lower_d, ub_lower_d, zero_coeffs

    BoundRelu._relu_mask_alpha = staticmethod(_relu_mask_alpha)
    _mark("relu_alpha_straight_through_clamp")


def _straight_through_unit_clamp(t: torch.Tensor) -> torch.Tensor:
    """clamp(t, 0, 1) in value, identity in gradient."""
    return t + (t.clamp(0.0, 1.0) - t).detach()


def _clamp_blocks_gradient_at_bounds() -> bool:
    probe = torch.tensor([0.0, 1.0], requires_grad=True)
    probe.clamp(0.0, 1.0).sum().backward()
    return bool((probe.grad == 0).any())


# Fix 6. BoundAveragePool.bound_backward in 0.3 calls last_A.view(...). When a Linear after
# Flatten feeds a ReLU, its intermediate bounds start from an identity spec that 0.3 expands
# over the batch (stride 0), so with batch > 1 CROWN through AvgPool -> Flatten -> Linear
# raises "view size is not compatible with input tensor's size and stride" (seen on torch
# 2.14.1). Hand it contiguous tensors (Patches objects pass through untouched).
def _fix_avgpool_contiguous(lirpa: types.ModuleType) -> None:
    from auto_LiRPA.operators.pooling import BoundAveragePool

    original = BoundAveragePool.bound_backward
    if getattr(original, "_certood_fix", False):
        return
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return
    if "last_A.view(" not in source or ".contiguous()" in source:  # not the 0.3 code
        return

    @functools.wraps(original)
    def bound_backward(self, last_lA, last_uA, x, *args, **kwargs):
        if isinstance(last_lA, torch.Tensor):
            last_lA = last_lA.contiguous()
        if isinstance(last_uA, torch.Tensor):
            last_uA = last_uA.contiguous()
        return original(self, last_lA, last_uA, x, *args, **kwargs)

    bound_backward._certood_fix = True
    BoundAveragePool.bound_backward = bound_backward
    _mark("avgpool_contiguous")
