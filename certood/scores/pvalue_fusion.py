"""Class-conditional p-value fusion of logit and feature evidence, higher = more OOD.

A detection-specific combination of complementary scores, all read from the penultimate
box features ``z`` and the detector's classifier ``(W, b)``:

- ``energy``       ``-logsumexp(W z + b)``: the classifier's evidence (logits);
- ``mahalanobis``  distance to the nearest class mean, tied covariance: where the box sits
  in feature space relative to the ID classes;
- ``knn``          distance to the ``k``-th nearest normalised fit feature (k = 10): local,
  non-Gaussian feature density;
- ``residual``     norm of ``z - u`` outside the principal subspace of the fit features
  (ViM's residual, ``D // 2`` principal directions): activity in directions ID boxes never use.

Each component is turned into an **ID-calibrated p-value conditioned on the predicted class**
``c = argmax(W z + b)``: ``p_k(z) = (1 + #{reference boxes of class c with s_k >= s_k(z)}) /
(1 + n_c)``. The reference boxes are the fit boxes scored **out of fold** (``folds``-fold cross
fitting: the Gaussian, the kNN bank and the subspace that score a fold are fitted on the other
folds, so reference values are not shrunk by overfitting; the final model is fitted on all fit
boxes). A class with fewer than ``min_class_boxes`` reference boxes uses the pooled reference.
The p-values are combined by ``fisher`` (``-2 sum log p_k``, chi-squared with 2K degrees of
freedom for independent p-values), ``stouffer`` (``sum Phi^-1(1 - p_k) / sqrt(K)``), ``min``
(``-log min p_k``: the Bonferroni combination ``min(1, K min p_k)`` ranks boxes the same way) or
``hmp`` (``-log`` of the harmonic mean p-value ``K / sum 1/p_k``). Fisher and Stouffer add
evidence, so one strong p-value among K - 1 ID-like ones is diluted; ``min`` and ``hmp`` are
driven by the smallest p-values and keep a novelty that only one component sees.

Why this helps on detection: (1) logit scores and feature scores miss different objects (an
unseen object drawn into a known class's logit region keeps a confident logit but lands away
from that class in feature space, and the reverse), so combining them keeps what each sees;
(2) their scales are incommensurable (nats vs squared distances in hundreds of dimensions): a
raw sum is dominated by one of them, while p-values put every component on the same
ID-calibrated scale; (3) a detector's classes differ in feature spread and logit scale (thin
"1" boxes vs round "0" boxes, small vs large objects of a class), so one pooled threshold
over-flags the widest classes; per-predicted-class p-values make every class's ID boxes
uniform on [0, 1], which equalises false alarms across classes.

>>> g = torch.Generator().manual_seed(0)
>>> x, y = torch.randn(80, 6, generator=g), torch.arange(80) % 2
>>> s = PValueFusion(min_class_boxes=10).fit(x, y, classifier=(torch.randn(2, 6, generator=g), torch.zeros(2)))
>>> s.score(x[:3]).shape
torch.Size([3])
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_choice, check_features, check_int, check_state_shapes
from certood.scores.energy import energy_score
from certood.scores.knn import knn_score, l2_normalise
from certood.scores.mahalanobis import fit_class_gaussians, mahalanobis_score, precision_factor
from certood.scores.vim import fit_vim

COMPONENTS = ("energy", "mahalanobis", "knn", "residual")
COMBINE = ("fisher", "stouffer", "min", "hmp")
KNN_K = 10  # small: a fold's bank holds a fraction of the fit boxes
_COMPONENT_STATE = {"energy": (), "mahalanobis": ("means", "precision"), "knn": ("bank",),
                    "residual": ("origin", "residual_basis")}


def cross_fit_folds(n: int, folds: int, seed: int) -> Tensor:
    """The cross-fitting fold (0..folds-1) of each of ``n`` rows: a seeded permutation mod ``folds``.

    >>> cross_fit_folds(6, 3, 0).bincount().tolist()
    [2, 2, 2]
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % folds


def empirical_pvalues(values: Tensor, reference: Tensor) -> Tensor:
    """Upper-tail p-values ``(1 + #{reference >= v}) / (1 + n)`` of ``values [N]`` under a
    reference sample ``[n]`` (conservative: an ID value is never given a p-value below its rank).

    >>> empirical_pvalues(torch.tensor([0.0, 2.5, 9.0]), torch.tensor([1.0, 2.0, 3.0])).tolist()
    [1.0, 0.5, 0.25]
    """
    ref = torch.sort(reference.to(torch.float64)).values
    below = torch.searchsorted(ref, values.to(torch.float64).contiguous(), right=False)
    return (1.0 + (ref.numel() - below).to(torch.float64)) / (1.0 + ref.numel())


def class_pvalues(values: Tensor, predicted: Tensor, ref_scores: Tensor, ref_classes: Tensor,
                  class_conditional: bool, min_class_boxes: int) -> Tensor:
    """p-values ``[N, K]`` of ``values [N, K]`` against the reference rows ``ref_scores [M, K]``
    of the same predicted class (``predicted [N]``, ``ref_classes [M]``); a class with fewer
    than ``min_class_boxes`` reference rows, or ``class_conditional=False``: all of them.

    >>> ref, cls = torch.tensor([[1.0], [2.0], [10.0], [20.0]]), torch.tensor([0, 0, 1, 1])
    >>> class_pvalues(torch.tensor([[1.5], [1.5]]), torch.tensor([0, 1]), ref, cls, True, 2).flatten().tolist()
    [0.6666666666666666, 1.0]
    """
    levels = [(predicted, ref_classes)] if class_conditional else []
    return conditional_pvalues(values, ref_scores, levels, min_class_boxes)


def conditional_pvalues(values: Tensor, ref_scores: Tensor, levels: list[tuple[Tensor, Tensor]],
                        min_boxes: int) -> Tensor:
    """p-values ``[N, K]`` of ``values [N, K]`` against reference rows ``ref_scores [M, K]``
    that share the row's key, trying ``levels`` finest first: each level is (row keys ``[N]``,
    reference keys ``[M]``), and a row uses the first level whose key has at least
    ``min_boxes`` reference rows; a row no level serves uses every reference row.

    >>> ref = torch.tensor([[1.0], [2.0], [3.0], [10.0], [20.0]])
    >>> fine, coarse = (torch.tensor([5, 7]), torch.tensor([5, 5, 6, 7, 7])), (torch.tensor([0, 0]), torch.zeros(5))
    >>> conditional_pvalues(torch.tensor([[1.5], [1.5]]), ref, [fine, coarse], 2).flatten().tolist()
    [0.6666666666666666, 1.0]
    """
    p = torch.empty_like(values, dtype=torch.float64)
    pending = torch.ones(values.shape[0], dtype=torch.bool)
    for keys, ref_keys in levels:
        for key in keys[pending].unique().tolist():
            ref_rows = ref_keys == key
            if int(ref_rows.sum()) < min_boxes:
                continue
            rows = pending & (keys == key)
            pending &= ~rows
            for k in range(values.shape[1]):
                p[rows, k] = empirical_pvalues(values[rows, k], ref_scores[ref_rows, k])
    if pending.any():
        for k in range(values.shape[1]):
            p[pending, k] = empirical_pvalues(values[pending, k], ref_scores[:, k])
    return p


def combine_pvalues(p: Tensor, method: str) -> Tensor:
    """Combine p-values ``[N, K]`` into one statistic per row, higher = more OOD.

    >>> round(combine_pvalues(torch.tensor([[0.5, 0.5]]), "fisher").item(), 4)  # -2 * 2 * log 0.5
    2.7726
    >>> round(combine_pvalues(torch.tensor([[0.01, 1.0]]), "hmp").item(), 4)  # -log(2 / 101)
    3.922
    """
    p = p.to(torch.float64).clamp(min=1e-300, max=1.0)
    if method == "fisher":
        return -2.0 * torch.log(p).sum(dim=1)
    if method == "stouffer":
        z = math.sqrt(2.0) * torch.special.erfinv(1.0 - 2.0 * p.clamp(max=1 - 1e-12))  # Phi^-1(1 - p)
        return z.sum(dim=1) / math.sqrt(p.shape[1])
    if method == "min":
        return -torch.log(p.min(dim=1).values)
    if method == "hmp":  # -log(K / sum 1/p): the harmonic mean p-value, in (0, 1]
        return torch.log((1.0 / p).sum(dim=1) / p.shape[1])
    raise CertoodError(f"pvalue_fusion.combine: expected one of {', '.join(COMBINE)}, found {method!r}")


class PValueFusion(Score):
    """Fisher (or Stouffer / min) combination of class-conditional, ID-calibrated p-values of
    complementary scores on penultimate features; ``fit(features, labels, classifier=(W, b))``.

    Rows labelled -1 (boxes matched to no ground truth) are left out of the fit.
    """

    kind = "pvalue_fusion"
    needs_classifier = True

    def __init__(self, components: tuple[str, ...] | list[str] = ("energy", "mahalanobis"),
                 combine: str = "fisher", class_conditional: bool = True, folds: int = 5,
                 min_class_boxes: int = 50, seed: int = 0) -> None:
        super().__init__()
        if isinstance(components, str) or not isinstance(components, (tuple, list)) or not components \
                or any(c not in COMPONENTS for c in components) or len(set(components)) != len(components):
            raise CertoodError(f"pvalue_fusion.components: expected a non-empty list of distinct names among "
                               f"{', '.join(COMPONENTS)}, found {components!r}")
        self.components = tuple(components)
        self.combine = check_choice("pvalue_fusion.combine", combine, COMBINE)
        if not isinstance(class_conditional, bool):
            raise CertoodError(f"pvalue_fusion.class_conditional: expected true or false, "
                               f"found {class_conditional!r}")
        self.class_conditional = class_conditional
        self.folds = check_int("pvalue_fusion.folds", folds, minimum=2, maximum=20)
        self.min_class_boxes = check_int("pvalue_fusion.min_class_boxes", min_class_boxes)
        self.seed = check_int("pvalue_fusion.seed", seed, minimum=0)

    # -- the component scores, from fitted parts ------------------------------------------
    def _fit_parts(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        parts: dict[str, Tensor] = {}
        if "mahalanobis" in self.components:
            parts["means"], parts["precision"] = fit_class_gaussians(x, labels, int(labels.max()) + 1)
        if "knn" in self.components:
            if x.shape[0] < KNN_K:
                raise CertoodError(f"pvalue_fusion.fit: expected at least {KNN_K} rows per fold for knn, "
                                   f"found {x.shape[0]}")
            parts["bank"] = l2_normalise(x.to(torch.float32)).contiguous()
        if "residual" in self.components:
            d = x.shape[1]
            if d < 2:
                raise CertoodError(f"pvalue_fusion: expected features of width >= 2 for residual, found {d}")
            origin, basis, _ = fit_vim(x, self.weight, self.bias, d // 2)
            parts["origin"], parts["residual_basis"] = origin, basis
        return parts

    def _components(self, x: Tensor, parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Component scores ``[N, K]`` (float64) and predicted classes ``[N]``."""
        x = x.to(torch.float64)
        logits = x @ self.weight.to(torch.float64).T + self.bias.to(torch.float64)
        cols = []
        for name in self.components:
            if name == "energy":
                cols.append(energy_score(logits))
            elif name == "mahalanobis":
                if "factor" not in parts:  # kept beside the precision, never saved
                    parts["factor"] = precision_factor(parts["precision"])
                cols.append(mahalanobis_score(x, parts["means"], parts["precision"], parts["factor"]))
            elif name == "knn":
                cols.append(knn_score(x.to(torch.float32), parts["bank"], KNN_K).to(torch.float64))
            else:
                cols.append(((x - parts["origin"]) @ parts["residual_basis"]).norm(dim=1))
        return torch.stack(cols, dim=1), logits.argmax(dim=1)

    # -- fit / score -------------------------------------------------------------------------
    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        if labels is None:
            raise CertoodError("pvalue_fusion.fit: expected class labels (one per feature row), found None")
        keep = labels >= 0
        x, y = features[keep].to(torch.float64), labels[keep]
        if x.shape[0] < 2 * self.folds:
            raise CertoodError(f"pvalue_fusion.fit: expected at least {2 * self.folds} labelled rows "
                               f"({self.folds} folds), found {x.shape[0]}")
        fold = cross_fit_folds(x.shape[0], self.folds, self.seed)
        ref = torch.empty(x.shape[0], len(self.components), dtype=torch.float64)
        ref_class = torch.empty(x.shape[0], dtype=torch.long)
        for f in range(self.folds):
            held = fold == f
            with warnings.catch_warnings():  # a class missing from one fold: the final fit warns
                warnings.simplefilter("ignore", UserWarning)
                parts = self._fit_parts(x[~held], y[~held])
            ref[held], ref_class[held] = self._components(x[held], parts)
        self.parts = self._fit_parts(x, y)
        self.ref_scores, self.ref_classes = ref.contiguous(), ref_class.contiguous()
        self.feature_dim = x.shape[1]

    def pvalues(self, features: Tensor) -> Tensor:
        """The components' p-values ``[N, K]`` (float64, in ``components`` order) that the score
        combines: under ID data each column is close to uniform on [0, 1], per predicted class."""
        if not self.is_fitted:
            raise CertoodError("pvalue_fusion: expected a fitted score, found an unfitted one")
        features = check_features(features, "pvalue_fusion.pvalues", self.feature_dim)
        values, predicted = self._components(features, self.parts)
        return class_pvalues(values, predicted, self.ref_scores, self.ref_classes,
                             self.class_conditional, self.min_class_boxes)

    def _score(self, features: Tensor) -> Tensor:
        return combine_pvalues(self.pvalues(features), self.combine).to(features.dtype)

    # -- state ------------------------------------------------------------------------------
    def state_tensors_spec(self) -> tuple[str, ...]:
        names = ["weight", "bias", "ref_scores", "ref_classes"]
        for c in self.components:
            names += _COMPONENT_STATE[c]
        return tuple(names)

    def state_tensors(self) -> dict[str, Tensor]:
        if not self.is_fitted:
            return {}
        source = {"weight": self.weight, "bias": self.bias, "ref_scores": self.ref_scores,
                  "ref_classes": self.ref_classes, **self.parts}
        return {k: source[k].contiguous().clone() for k in self.state_tensors_spec()}

    def _load(self, state: dict[str, Tensor]) -> None:
        shapes = {"weight": ("C", "D"), "bias": ("C",), "ref_scores": ("M", len(self.components)),
                  "ref_classes": ("M",), "means": ("L", "D"), "precision": ("D", "D"), "bank": ("B", "D"),
                  "origin": ("D",), "residual_basis": ("D", "R")}
        sizes = check_state_shapes("pvalue_fusion", state, {k: shapes[k] for k in self.state_tensors_spec()})
        if state["ref_classes"].is_floating_point():
            raise ArtifactError("pvalue_fusion: expected integer ref_classes, found floating point")
        self.weight, self.bias = state["weight"], state["bias"]
        self.ref_scores, self.ref_classes = state["ref_scores"].to(torch.float64), state["ref_classes"].long()
        self.parts = {k: state[k] for k in self.state_tensors_spec()
                      if k not in ("weight", "bias", "ref_scores", "ref_classes")}
        if "bank" in self.parts:
            self.parts["bank"] = self.parts["bank"].to(torch.float32)
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"components": list(self.components), "combine": self.combine,
                "class_conditional": self.class_conditional, "folds": self.folds,
                "min_class_boxes": self.min_class_boxes, "seed": self.seed}
