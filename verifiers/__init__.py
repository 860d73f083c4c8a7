"""Bound propagation and exact checks for certood, imported as ``certood.verifiers``.

- :func:`bound_module` bounds a network's outputs (or linear specifications of them) over
  an Lp ball with IBP, CROWN or alpha-CROWN (auto_LiRPA);
- :func:`ensure_lirpa` imports auto_LiRPA 0.3 with the fixes it needs on torch 2 / numpy 2.
"""
from .compat import applied_fixes, ensure_lirpa
from .lirpa import METHODS, Bounder, Bounds, bound_module

__all__ = ["Bounds", "Bounder", "bound_module", "METHODS", "ensure_lirpa", "applied_fixes"]
