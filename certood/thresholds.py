"""Score thresholds: the math of the spec's `threshold:` block (flag = score > threshold).

- ``tpr``: the ``tpr`` quantile of the calibration ID boxes' scores ("higher" interpolation),
  so a fraction ``tpr`` of them at least stays at or below it (unflagged);
- ``fpr``: on the boxes of an OOD *validation* set, the largest threshold that leaves at most
  a fraction ``fpr`` of them at or below it (unflagged, i.e. accepted as ID);
- ``fixed``: the spec's values.

With ``per_class``, each predicted class gets its own threshold at the same target, on that
class's boxes; a class with fewer than ``min_boxes`` boxes falls back to the global threshold
(and the record says so).

>>> import torch
>>> tpr_threshold(torch.arange(100.0), 0.95), fpr_threshold(torch.arange(100.0), 0.05)
(95.0, 4.999999999999999)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from certood.errors import DataError


def tpr_threshold(id_values: Tensor, tpr: float) -> float:
    """The smallest score value with at least a fraction ``tpr`` of ``id_values`` <= it."""
    if len(id_values) == 0:
        raise DataError("calibration set: no monitored box; cannot set a threshold at an ID TPR")
    return float(torch.quantile(id_values.double(), tpr, interpolation="higher"))


def fpr_threshold(ood_values: Tensor, fpr: float) -> float:
    """The largest threshold with at most a fraction ``fpr`` of ``ood_values`` <= it: just
    below the (floor(fpr * n) + 1)-th smallest value (ties never push the rate above ``fpr``)."""
    if len(ood_values) == 0:
        raise DataError("OOD validation set: no monitored box; cannot set a threshold at an OOD FPR")
    ordered = torch.sort(ood_values.double()).values
    k = math.floor(fpr * len(ordered) + 1e-9)
    if k >= len(ordered):  # fpr near 1: every box may pass
        return float(ordered[-1])
    return math.nextafter(float(ordered[k]), -math.inf)


@dataclass
class Thresholds:
    """Global thresholds per score, per-class tables (index: detector label, 0 unused) and
    how they were set (JSON-ready, for the manifest and metrics.json)."""

    values: dict[str, float]
    per_class: dict[str, list[float]] = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def compute_thresholds(threshold, values: dict[str, Tensor], labels: Tensor, num_labels: int,
                       min_boxes: int, on_name: str = "calibration") -> Thresholds:
    """Thresholds of every score from ``threshold`` (a `ThresholdSpec`): ``values``/``labels``
    are the scores and predicted labels (1-based) of the boxes the method is set on (the
    calibration ID boxes for tpr, the OOD validation boxes for fpr; unused for fixed).

    >>> from certood.spec import ThresholdSpec
    >>> v, l = {"e": torch.arange(40.0)}, torch.tensor([1] * 30 + [2] * 10)
    >>> t = compute_thresholds(ThresholdSpec(tpr=0.5, per_class=True), v, l, 3, min_boxes=20)
    >>> t.values, t.per_class, t.record["classes"]["2"]
    ({'e': 20.0}, {'e': [20.0, 15.0, 20.0]}, {'boxes': 10, 'fallback': True})
    """
    method = threshold.method
    if method == "fixed":
        return Thresholds({k: float(v) for k, v in threshold.fixed.items()},
                          record={"method": "fixed", "per_class": False})
    target = threshold.tpr if method == "tpr" else threshold.fpr
    at = (lambda v: tpr_threshold(v, target)) if method == "tpr" else (lambda v: fpr_threshold(v, target))
    record = {"method": method, "target": target,
              "on": "calibration ID boxes" if method == "tpr" else f"ood_validation/{on_name} boxes",
              "boxes": len(labels), "per_class": bool(threshold.per_class)}
    out = Thresholds({name: at(v) for name, v in values.items()}, record=record)
    if not threshold.per_class:
        return out
    labels = torch.as_tensor(labels).long()
    counts = {c: int((labels == c).sum()) for c in range(1, num_labels)}
    record["min_class_boxes"] = min_boxes
    record["classes"] = {str(c): {"boxes": n, "fallback": n < min_boxes} for c, n in counts.items()}
    for name, v in values.items():
        table = [out.values[name]] * num_labels  # slot 0 (background) and fallbacks: the global value
        for c, n in counts.items():
            if n >= min_boxes:
                table[c] = at(v[labels == c])
        out.per_class[name] = table
    return out
