"""Box abstraction monitor (Henzinger et al., ECAI 2020; Wu et al.), higher = more OOD.

At fit, the features of each class are split into ``k`` clusters by k-means (k-means++ start
from ``seed``, Lloyd iterations, float64, in torch), and each cluster becomes one axis-aligned
box ``[min, max]`` of its members, each side pushed out by ``gamma`` times the box width in
that dimension. The score of a box is its distance to the **nearest abstraction box of any
class**: 0 inside a box, else the L-inf (``norm="linf"``) or L2 norm of how far it lies
outside. The class is not used at score time: taking the nearest box over all classes keeps
the score a function of the features alone (no classifier needed) and makes it a plain
membership test of the union of the boxes, which is what a sound "seen before" region needs;
``nearest_class`` reports the class of that box. ``labels=None`` clusters all rows as one
class.

>>> x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
>>> BoxAbstraction(k=1).fit(x).score(torch.tensor([[0.5, 0.5], [3.0, 1.0]]))
tensor([0., 2.])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import CertoodError
from certood.scores.base import (Score, check_choice, check_features, check_int, check_number,
                                 check_state_shapes, drop_unmatched)

NORMS = ("linf", "l2")
MAX_ITER = 100
CHUNK_ELEMENTS = 1 << 22


def kmeans(x: Tensor, k: int, seed: int = 0, max_iter: int = MAX_ITER) -> Tensor:
    """Cluster index per row ``[n]`` (values ``0..k'-1``, ``k' <= k`` when there are fewer
    distinct rows): k-means++ seeding from ``seed``, then Lloyd iterations until stable."""
    x = x.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(x.shape[0], (1,), generator=g)]
    d2 = ((x - centres[0]) ** 2).sum(dim=1)
    while centres.shape[0] < k and d2.sum() > 0:
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        centres = torch.cat([centres, x[pick]])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(dim=1))
    assign = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=centres.shape[0])
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        new = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return torch.unique(assign, return_inverse=True)[1]  # drop clusters left empty


def fit_boxes(features: Tensor, labels: Tensor, k: int, gamma: float,
              seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Lower ``[B, D]`` and upper ``[B, D]`` corners and the class ``[B]`` of every box."""
    lower, upper, box_class = [], [], []
    for c in torch.unique(labels).tolist():
        rows = features[labels == c]
        assign = kmeans(rows, k, seed)
        for j in range(int(assign.max()) + 1):
            members = rows[assign == j]
            lo, hi = members.min(dim=0).values, members.max(dim=0).values
            pad = gamma * (hi - lo)
            lower.append(lo - pad)
            upper.append(hi + pad)
            box_class.append(c)
    return torch.stack(lower), torch.stack(upper), torch.tensor(box_class, dtype=torch.int64)


def box_distances(features: Tensor, lower: Tensor, upper: Tensor, norm: str = "linf") -> Tensor:
    """Distance of each row to each box (0 inside): ``[N, B]``, in chunks of rows."""
    rows = max(1, CHUNK_ELEMENTS // max(1, lower.numel()))
    out = []
    for x in features.split(rows):
        outside = (lower[None] - x[:, None]).clamp(min=0) + (x[:, None] - upper[None]).clamp(min=0)
        out.append(outside.amax(dim=2) if norm == "linf" else outside.norm(dim=2))
    return torch.cat(out) if out else features.new_zeros(0, lower.shape[0])


def box_abstraction_score(features: Tensor, lower: Tensor, upper: Tensor,
                          norm: str = "linf") -> Tensor:
    """Distance to the nearest box of any class, ``[N]``."""
    return box_distances(features, lower, upper, norm).min(dim=1).values


class BoxAbstraction(Score):
    """Distance outside the nearest of ``k`` boxes per class (fit by k-means)."""

    kind = "box_abstraction"
    _STATE = ("lower", "upper", "box_class")

    def __init__(self, k: int = 3, gamma: float = 0.0, norm: str = "linf", seed: int = 0) -> None:
        super().__init__()
        self.k = check_int("box_abstraction.k", k)
        self.gamma = check_number("box_abstraction.gamma", gamma, ge=0)
        self.norm = check_choice("box_abstraction.norm", norm, NORMS)
        self.seed = check_int("box_abstraction.seed", seed, minimum=0)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        features, labels = drop_unmatched(features, labels, "box_abstraction.fit")
        if labels is None:
            labels = torch.zeros(features.shape[0], dtype=torch.int64)
        self.lower, self.upper, self.box_class = fit_boxes(  # on the CPU: seeded sampling
            features.to("cpu", torch.float32), labels.cpu(), self.k, self.gamma, self.seed)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        lower, upper = self.lower.to(features), self.upper.to(features)
        return box_abstraction_score(features, lower, upper, self.norm)

    def nearest_class(self, features: Tensor) -> Tensor:
        """Class of the box nearest to each row (ties: the first box), ``[N]`` int64."""
        if not self.is_fitted:
            self.score(features)  # raises the usual error
        features = check_features(features, "box_abstraction.nearest_class", self.feature_dim)
        d = box_distances(features, self.lower.to(features), self.upper.to(features), self.norm)
        return self.box_class.to(features.device)[d.argmin(dim=1)]

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("box_abstraction", state, {
            "lower": ("B", "D"), "upper": ("B", "D"), "box_class": ("B",)})
        if sizes["B"] < 1:
            raise CertoodError("box_abstraction: expected at least one box, found 0")
        self.lower, self.upper = state["lower"], state["upper"]
        self.box_class = state["box_class"].to(torch.int64)
        self.feature_dim = sizes["D"]

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "gamma": self.gamma, "norm": self.norm, "seed": self.seed}
