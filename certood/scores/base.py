"""The :class:`Score` base class: fitted state around a pure scoring function.

Every score maps per-box features ``[N, D]`` to ``[N]``, **higher = more OOD**. Subclasses
implement ``_fit``, ``_score``, ``state_tensors``/``_load`` and ``params``; this class does the
checks (fitted? right shape and dimension?) once, with expected-vs-found messages.

Two optional inputs reach a score through ``fit`` only, as keywords:

- ``classifier=(W, b)`` for scores with ``needs_classifier``: the foreground rows of the
  detector's last linear layer, ``W [C, D]`` and ``b [C]``, mapping penultimate features to
  foreground logits. The score keeps them in its state tensors, so a saved score needs no
  detector to run.
- ``head=callable`` for scores with ``needs_head`` (ODIN): a torch callable from the features
  the score reads to foreground logits. A callable cannot be saved, so such a score keeps a
  reference and must be given the head again (``fit(features, head=head)``) after loading.

Scores that need neither ignore them. A score with ``needs_fit = False`` learns nothing from
data, but one that needs a classifier or head still takes it through ``fit``; any ID features
do there (only their width ``D`` is read).

>>> from certood.scores import Energy
>>> Energy().fit(torch.zeros(3, 2)).score(torch.zeros(1, 2)).shape
torch.Size([1])
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError


def check_features(features: Any, who: str, dim: int | None = None) -> Tensor:
    """Return ``features`` as a floating ``[N, D]`` tensor, or raise naming what is wrong."""
    if not isinstance(features, Tensor):
        raise CertoodError(f"{who}: expected features as a torch.Tensor, "
                           f"found {type(features).__name__}")
    if features.ndim != 2:
        raise CertoodError(f"{who}: expected features of shape [N, D], "
                           f"found {tuple(features.shape)}")
    if not features.is_floating_point():
        raise CertoodError(f"{who}: expected floating-point features, found {features.dtype}")
    if dim is not None and features.shape[1] != dim:
        raise CertoodError(f"{who}: expected features with D={dim} columns (as fitted), "
                           f"found {features.shape[1]}")
    return features.detach()


def check_labels(labels: Any, who: str, n: int) -> Tensor:
    """Return ``labels`` as an int64 ``[N]`` tensor matching ``n`` feature rows."""
    if not isinstance(labels, Tensor):
        raise CertoodError(f"{who}: expected labels as a torch.Tensor, "
                           f"found {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise CertoodError(f"{who}: expected integer class labels, found {labels.dtype}")
    if labels.shape != (n,):
        raise CertoodError(f"{who}: expected labels of shape [{n}] (one per feature row), "
                           f"found {tuple(labels.shape)}")
    return labels.detach().to(torch.int64)


def check_classifier(classifier: Any, who: str, dim: int) -> tuple[Tensor, Tensor]:
    """Return ``(W [C, D], b [C])`` detached and contiguous, ``D == dim``, or raise."""
    expected = f"classifier=(W [C, {dim}], b [C]) (foreground rows of the last linear layer)"
    if not isinstance(classifier, (tuple, list)) or len(classifier) != 2 \
            or not all(isinstance(t, Tensor) for t in classifier):
        found = "None" if classifier is None else type(classifier).__name__
        raise CertoodError(f"{who}: expected {expected}, found {found}")
    weight, bias = classifier
    if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] != dim \
            or bias.shape != (weight.shape[0],):
        raise CertoodError(f"{who}: expected {expected}, found W {tuple(weight.shape)} and "
                           f"b {tuple(bias.shape)}")
    if not (weight.is_floating_point() and bias.is_floating_point()):
        raise CertoodError(f"{who}: expected a floating-point classifier, found {weight.dtype} "
                           f"and {bias.dtype}")
    return weight.detach().clone().contiguous(), bias.detach().clone().contiguous()


def check_state_shapes(who: str, state: dict[str, Tensor],
                       shapes: dict[str, tuple[str | int, ...]]) -> dict[str, int]:
    """Check loaded tensors against symbolic shapes; return the value of each symbol.

    >>> check_state_shapes("x", {"w": torch.zeros(2, 3), "b": torch.zeros(2)},
    ...                    {"w": ("C", "D"), "b": ("C",)})
    {'C': 2, 'D': 3}
    """
    sizes: dict[str, int] = {}
    ok = True
    for name, dims in shapes.items():
        found = tuple(state[name].shape)
        if len(found) != len(dims):
            ok = False
            continue
        for sym, n in zip(dims, found):
            if isinstance(sym, int):
                ok &= n == sym
            else:
                ok &= sizes.setdefault(sym, n) == n
    if not ok:
        def show(dims):
            return "[" + ", ".join(map(str, dims)) + "]"
        raise ArtifactError(f"{who}: expected state tensors "
                            + ", ".join(f"{k} {show(v)}" for k, v in shapes.items())
                            + ", found " + ", ".join(f"{k} {show(tuple(state[k].shape))}"
                                                     for k in shapes))
    return sizes


def check_int(who: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (booleans are not integers), or raise."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum \
        and (maximum is None or value <= maximum)
    if not ok:
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise CertoodError(f"{who}: expected an integer {bound}, found {value!r}")
    return value


def check_number(who: str, value: Any, *, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, lt: float | None = None) -> float:
    """``value`` as a finite float within the given bounds, or raise naming them."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (ge is None or value >= ge) and (gt is None or value > gt) \
        and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        lo = f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else ""
        hi = f"<= {le}" if le is not None else f"< {lt}" if lt is not None else ""
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise CertoodError(f"{who}: expected a number {bounds}".rstrip() + f", found {value!r}")
    return float(value)


def check_choice(who: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, or raise listing them."""
    if not isinstance(value, str) or value not in choices:
        raise CertoodError(f"{who}: expected one of {', '.join(choices)}, found {value!r}")
    return value


def drop_unmatched(features: Tensor, labels: Tensor | None,
                   who: str) -> tuple[Tensor, Tensor | None]:
    """Keep rows with a class label ``>= 0`` (``-1`` = a box matched to no ground truth).

    Without labels every row is kept.
    """
    if labels is None:
        return features, None
    if (labels < -1).any():
        raise CertoodError(f"{who}: expected labels >= -1 (-1 = unmatched), "
                           f"found {labels.min().item()}")
    keep = labels >= 0
    if not keep.any():
        raise CertoodError(f"{who}: expected rows with a class label >= 0, "
                           f"found all {len(labels)} labelled -1")
    return features[keep], labels[keep]


class Score:
    """Base of every OOD score: ``fit`` returns ``self``, ``score`` gives ``[N]``, higher = OOD."""

    kind: ClassVar[str] = ""
    needs_fit: ClassVar[bool] = True
    needs_classifier: ClassVar[bool] = False  # fit takes classifier=(W [C, D], b [C])
    needs_head: ClassVar[bool] = False  # fit takes head=callable (kept by reference)
    _STATE: ClassVar[tuple[str, ...]] = ()  # attribute names saved by the default state_tensors

    def __init__(self) -> None:
        self.feature_dim: int | None = None  # set by fit / load_state_tensors
        if self.needs_classifier:
            self.weight: Tensor | None = None  # [C, D], set by fit(classifier=...) or loading
            self.bias: Tensor | None = None  # [C]
        if self.needs_head:
            self.head: Any = None  # a reference, never saved

    @property
    def is_fitted(self) -> bool:
        if self.needs_fit or self.needs_classifier or self.needs_head:
            return self.feature_dim is not None
        return True

    def fit(self, features: Tensor, labels: Tensor | None = None, *,
            classifier: tuple[Tensor, Tensor] | None = None, head: Any = None) -> "Score":
        who = f"{self.kind}.fit"
        features = check_features(features, who)
        if features.shape[0] == 0:
            raise CertoodError(f"{who}: expected at least one feature row, found 0")
        if labels is not None:
            labels = check_labels(labels, who, features.shape[0])
        if self.needs_classifier:
            self.weight, self.bias = check_classifier(classifier, who, features.shape[1])
        if self.needs_head and not callable(head):
            found = "None" if head is None else type(head).__name__
            raise CertoodError(f"{who}: expected head=<callable mapping [N, {features.shape[1]}] "
                               f"features to foreground logits [N, C]>, found {found}")
        if self.needs_head:
            self.head = head
        self._fit(features, labels)
        return self

    def attach_head(self, head: Any, feature_dim: int) -> "Score":
        """Give a loaded score its head back: heads are code, not state, so they are not saved."""
        if not callable(head):
            raise CertoodError(f"{self.kind}: expected a callable head, found {type(head).__name__}")
        self.head = head
        if self.feature_dim is None:
            self.feature_dim = int(feature_dim)
        return self

    def score(self, features: Tensor) -> Tensor:
        if not self.is_fitted:
            needs = "".join([", classifier=(W, b)" if self.needs_classifier else "",
                             ", head=head" if self.needs_head else ""])
            raise CertoodError(f"{self.kind}: expected a fitted score, found an unfitted one "
                               f"(call fit(features, labels{needs}) or load_state_tensors first)")
        return self._score(check_features(features, f"{self.kind}.score", self.feature_dim))

    def state_tensors(self) -> dict[str, Tensor]:
        """Fitted state as named contiguous tensors (safetensors-ready; no pickle)."""
        if not self.is_fitted:
            return {}
        return {k: getattr(self, k).contiguous().clone() for k in self._STATE}

    def load_state_tensors(self, state: dict[str, Tensor]) -> "Score":
        expected = set(self.state_tensors_spec())
        if set(state) != expected:
            raise ArtifactError(f"{self.kind}: expected state tensors {sorted(expected)}, "
                                f"found {sorted(state)}")
        self._load(state)
        return self

    def state_tensors_spec(self) -> tuple[str, ...]:
        """Names of the tensors ``state_tensors`` returns once fitted."""
        return self._STATE

    def params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able: ``build_score(kind, params)`` rebuilds the score."""
        return {}

    # subclasses
    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        pass

    def _score(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def _load(self, state: dict[str, Tensor]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
