"""Fusion of other scores of a spec by ID-calibrated, class-conditional p-values.

The box-level evidence of a detector comes from several places that no single score reads
together: the classifier's logits (energy), the RoI feature the box head starts from
(``residual``: activity outside the ID subspace), and how the box head answers when the box
moves (``jitter_kl``, the ``box_jitter.logits`` tap). A ``fusion`` score combines the
values of named scores of the same spec, each read at its own tap:

- each component ``k`` is turned into an upper-tail p-value against the **out-of-fold**
  values of the ID fit boxes of the same predicted class ``c`` (argmax of the foreground
  logits): ``p_k = (1 + #{reference boxes of class c with s_k >= s_k(box)}) / (1 + n_c)``
  (certood.scores.pvalue_fusion.class_pvalues; a class with fewer than ``min_class_boxes``
  reference boxes uses the pooled reference). Out of fold: the monitor refits each fitted
  component on ``folds - 1`` folds of the fit boxes and scores the held-out fold
  (:func:`certood.monitor.fusion_reference`), so the reference is not shrunk by overfitting;
- with ``size_bins: B > 1`` the reference is also conditioned on the **box size**
  (``sqrt(width * height)`` in pixels): the fit boxes' sizes are cut at their ``1/B, ...,
  (B-1)/B`` quantiles and a box is compared with the reference boxes of its class *and* size
  bin (a cell with fewer than ``min_class_boxes`` rows falls back to the class, then to all).
  Box size is a nuisance for a detector's evidence (small boxes pool fewer pixels and get
  lower logits), so conditioning on it removes ID variance that is not about the class;
- the p-values are combined by Fisher (``-2 sum log p_k``), Stouffer, min (Bonferroni's
  ranking) or ``hmp``, the harmonic mean p-value (``-log(K / sum 1/p_k)``). Fisher adds the
  evidence of every component, so a novelty that one component sees and the others do not is
  diluted by their ID-like p-values; min and hmp follow the smallest p-values and keep it.

Its input is ``[N, K + 1 + C]``: the K component values in ``of`` order, the box size, then
the C foreground logits of its own tap (a logits tap), which give the predicted class
(:func:`certood.monitor.score_input` builds it). The values and the reference stay in the
components' own units, so scales never need matching; the score is as cheap as a table
lookup once its components are computed.

Why it helps on detection: the evidence a detector offers fails on different boxes. The
logits (energy) see what the classifier was trained to separate, and miss objects it maps
confidently onto a known class; feature density (``lared``, ``larem``, ``mahalanobis`` on the
penultimate features) sees where a box sits relative to the ID classes, and misses objects
that land near a class; the RoI residual sees activity in directions no ID box uses; box
jitter (``jitter_kl``) sees instability under the box changes localisation error produces
anyway. p-values put them on one ID-calibrated scale per class. certood's default
(``specs/detection_fusion.yaml``: energy + LaRED, ``combine: min``) was chosen by the worst
AUROC over 19 views of nine kinds of ID-made proxy OOD, plain and confidence-matched
(benchmarks/select_fusion_matched.py): on kinds where energy fails density holds and the
reverse, and the smaller p-value keeps whichever sees the box.

>>> import torch
>>> ref = torch.cat([torch.rand(200, 2, generator=torch.Generator().manual_seed(0)),
...                  torch.full((200, 1), 20.0), torch.eye(2).repeat(100, 1)], dim=1)  # 2 values, size, 2 logits
>>> f = Fusion(of=("a", "b"), min_class_boxes=10).fit(ref, torch.zeros(200, dtype=torch.long))
>>> bool(f.score(torch.tensor([[5.0, 5.0, 20.0, 1.0, 0.0]])) > f.score(torch.tensor([[0.1, 0.1, 20.0, 1.0, 0.0]])))
True
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_choice, check_features, check_int, check_state_shapes
from certood.scores.pvalue_fusion import COMBINE, combine_pvalues, conditional_pvalues, cross_fit_folds


class Fusion(Score):
    """p-value fusion of named component scores; ``fit([N, K + 1 + C] reference rows)`` where
    the K values are out of fold (the monitor provides them), then the box size, then C logits."""

    kind = "fusion"

    def __init__(self, of: tuple[str, ...] | list[str] = (), combine: str = "fisher",
                 class_conditional: bool = True, folds: int = 5, min_class_boxes: int = 50,
                 seed: int = 0, size_bins: int = 1) -> None:
        super().__init__()
        if isinstance(of, str) or not isinstance(of, (tuple, list)) or len(of) < 2 \
                or not all(isinstance(n, str) and n for n in of) or len(set(of)) != len(of):
            raise CertoodError(f"fusion.of: expected a list of at least 2 distinct score names, found {of!r}")
        self.of = tuple(of)
        self.combine = check_choice("fusion.combine", combine, COMBINE)
        if not isinstance(class_conditional, bool):
            raise CertoodError(f"fusion.class_conditional: expected true or false, found {class_conditional!r}")
        self.class_conditional = class_conditional
        self.folds = check_int("fusion.folds", folds, minimum=2, maximum=20)
        self.min_class_boxes = check_int("fusion.min_class_boxes", min_class_boxes)
        self.seed = check_int("fusion.seed", seed, minimum=0)
        self.size_bins = check_int("fusion.size_bins", size_bins, minimum=1, maximum=10)

    def fold_of(self, n: int) -> Tensor:
        """The cross-fitting fold of each of ``n`` fit rows (seeded): what the monitor refits on."""
        return cross_fit_folds(n, self.folds, self.seed)

    def _split(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(component values [N, K], box sizes [N], predicted class [N])."""
        k = len(self.of)
        x = features.to(torch.float64)
        return x[:, :k], x[:, k], x[:, k + 1:].argmax(dim=1)

    def size_edges(self) -> Tensor:
        """The reference boxes' size quantiles that cut the ``size_bins`` bins (empty for 1)."""
        q = torch.arange(1, self.size_bins, dtype=torch.float64) / self.size_bins
        return torch.quantile(self.ref_sizes, q) if len(q) else q

    def _levels(self, sizes: Tensor, predicted: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Reference keys finest first: (class, size bin) when binned, class when class-conditional."""
        levels = []
        if self.size_bins > 1:
            edges = self.size_edges()
            bins = torch.bucketize(sizes.contiguous(), edges, right=True)
            ref_bins = torch.bucketize(self.ref_sizes, edges, right=True)
            if self.class_conditional:
                bins, ref_bins = predicted * self.size_bins + bins, self.ref_classes * self.size_bins + ref_bins
            levels.append((bins, ref_bins))
        if self.class_conditional:
            levels.append((predicted, self.ref_classes))
        return levels

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        k = len(self.of)
        if features.shape[1] < k + 3:
            raise CertoodError(f"fusion.fit: expected rows of {k} component values, the box size, then at least "
                               f"2 logits, found width {features.shape[1]}")
        if features.shape[0] < 2 * self.folds:
            raise CertoodError(f"fusion.fit: expected at least {2 * self.folds} reference rows, found "
                               f"{features.shape[0]}")
        values, sizes, predicted = self._split(features)
        if not bool(torch.isfinite(values).all()) or not bool(torch.isfinite(sizes).all()):
            raise CertoodError("fusion.fit: a component value or box size of a reference row is not finite")
        self.ref_scores, self.ref_classes = values.contiguous(), predicted.contiguous()
        self.ref_sizes = sizes.contiguous()
        self.class_counts = torch.bincount(predicted, minlength=features.shape[1] - k - 1)
        self.feature_dim = features.shape[1]

    def pvalues(self, features: Tensor) -> Tensor:
        """The components' p-values ``[N, K]`` (float64, in ``of`` order)."""
        if not self.is_fitted:
            raise CertoodError("fusion: expected a fitted score, found an unfitted one")
        values, sizes, predicted = self._split(check_features(features, "fusion.pvalues", self.feature_dim))
        return conditional_pvalues(values, self.ref_scores, self._levels(sizes, predicted), self.min_class_boxes)

    def _score(self, features: Tensor) -> Tensor:
        return combine_pvalues(self.pvalues(features), self.combine).to(features.dtype)

    def state_tensors_spec(self) -> tuple[str, ...]:
        return ("ref_scores", "ref_classes", "ref_sizes", "class_counts")

    def state_tensors(self) -> dict[str, Tensor]:
        if not self.is_fitted:
            return {}
        return {"ref_scores": self.ref_scores.contiguous().clone(),
                "ref_classes": self.ref_classes.contiguous().clone(),
                "ref_sizes": self.ref_sizes.contiguous().clone(),
                "class_counts": self.class_counts.contiguous().clone()}

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("fusion", state, {"ref_scores": ("M", len(self.of)), "ref_classes": ("M",),
                                                     "ref_sizes": ("M",), "class_counts": ("C",)})
        if state["ref_classes"].is_floating_point() or state["class_counts"].is_floating_point():
            raise ArtifactError("fusion: expected integer ref_classes and class_counts, found floating point")
        self.ref_scores = state["ref_scores"].to(torch.float64)
        self.ref_classes, self.class_counts = state["ref_classes"].long(), state["class_counts"].long()
        self.ref_sizes = state["ref_sizes"].to(torch.float64)
        self.feature_dim = len(self.of) + 1 + sizes["C"]

    def params(self) -> dict[str, Any]:
        return {"of": list(self.of), "combine": self.combine, "class_conditional": self.class_conditional,
                "folds": self.folds, "min_class_boxes": self.min_class_boxes, "seed": self.seed,
                "size_bins": self.size_bins}
