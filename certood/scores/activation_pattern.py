"""Neuron activation patterns (Cheng et al., DATE 2019), higher = more OOD.

A box's pattern is the set of penultimate units that fire (``h > 0``, post-ReLU). At fit,
the distinct patterns of each class are stored (bool). The score is the Hamming distance from
the box's pattern to the nearest stored pattern **of its predicted class** (argmax of the
classifier's logits), 0 if the pattern was seen. A class with no stored pattern gives the
largest distance, ``D``. Fit patterns are keyed by the given labels (rows labelled -1 left
out), or by the predicted class when no labels are given. Distances are computed as
``|a| + |b| - 2 a.b`` in chunks of rows (exact: integer counts in float32 up to 2^24).

>>> h = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
>>> w, b = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), torch.zeros(2)
>>> s = ActivationPattern().fit(h, torch.tensor([0, 1]), classifier=(w, b))
>>> s.score(torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 2.0], [0.0, 5.0, 1.0]]))
tensor([0., 1., 1.])
"""
from __future__ import annotations

import torch
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_state_shapes, drop_unmatched

CHUNK_ELEMENTS = 1 << 22


def activation_patterns(features: Tensor) -> Tensor:
    """Which units fire, ``features > 0``: bool ``[N, D]``."""
    return features > 0


def fit_patterns(patterns: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct ``(class, pattern)`` pairs: patterns ``[M, D]`` bool and their classes ``[M]``."""
    rows = torch.cat([classes[:, None].to(torch.int64), patterns.to(torch.int64)], dim=1)
    unique = torch.unique(rows, dim=0)
    return unique[:, 1:].bool().contiguous(), unique[:, 0].contiguous()


def hamming_to_class(patterns: Tensor, classes: Tensor, bank: Tensor,
                     bank_class: Tensor) -> Tensor:
    """Hamming distance of each pattern to the nearest bank pattern of its class; ``D`` when
    the class has none. float32 ``[N]``."""
    d = patterns.shape[1]
    bank_f = bank.to(torch.float32)
    bank_ones = bank_f.sum(dim=1)
    rows = max(1, CHUNK_ELEMENTS // max(1, bank.shape[0]))
    out = []
    for p, c in zip(patterns.split(rows), classes.split(rows)):
        pf = p.to(torch.float32)
        dist = pf.sum(dim=1, keepdim=True) + bank_ones[None] - 2 * pf @ bank_f.T
        dist = dist.masked_fill(bank_class[None] != c[:, None], float(d))
        out.append(dist.min(dim=1).values if bank.shape[0] else pf.new_full((len(p),), float(d)))
    return torch.cat(out) if out else patterns.new_zeros(0, dtype=torch.float32)


class ActivationPattern(Score):
    """Hamming distance to the nearest fit activation pattern of the predicted class.

    ``fit(features, labels=None, classifier=(W, b))``.
    """

    kind = "activation_pattern"
    needs_classifier = True
    _STATE = ("weight", "bias", "patterns", "pattern_class")

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        features, labels = drop_unmatched(features, labels, "activation_pattern.fit")
        c = self.weight.shape[0]
        if labels is None:
            labels = self._predict(features)
        elif (labels >= c).any():
            raise CertoodError(f"activation_pattern.fit: expected labels in [0, {c}) (the "
                               f"classifier's classes), found {labels.max().item()}")
        self.patterns, self.pattern_class = fit_patterns(activation_patterns(features), labels)
        self.feature_dim = features.shape[1]

    def _predict(self, features: Tensor) -> Tensor:
        w, b = self.weight.to(features), self.bias.to(features)
        return (features @ w.T + b).argmax(dim=1)

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        d = hamming_to_class(activation_patterns(features), self._predict(features),
                             self.patterns.to(dev), self.pattern_class.to(dev))
        return d.to(features.dtype)

    def _load(self, state: dict[str, Tensor]) -> None:
        sizes = check_state_shapes("activation_pattern", state, {
            "weight": ("C", "D"), "bias": ("C",), "patterns": ("M", "D"),
            "pattern_class": ("M",)})
        if state["patterns"].dtype != torch.bool:
            raise ArtifactError(f"activation_pattern: expected bool patterns, "
                                f"found {state['patterns'].dtype}")
        self.weight, self.bias = state["weight"], state["bias"]
        self.patterns = state["patterns"]
        self.pattern_class = state["pattern_class"].to(torch.int64)
        self.feature_dim = sizes["D"]
