"""LaRED: per-class Gaussian density of latent box features, negated; higher = more OOD.

The per-class Gaussians of :mod:`certood.scores.larem` (own covariances, Ledoit-Wolf or fixed
shrinkage). The score is the negative log-likelihood under the most likely class, with no
class priors:

    -max_c log N(x; mu_c, Sigma_c) = min_c (d_c(x) + log det Sigma_c + D log 2 pi) / 2

With one class it is the negative log-likelihood of pytorch-ood 0.4.0's ``GMM`` and of
``scipy.stats.multivariate_normal`` (tested; ``GMM`` sums the classes instead of taking the
most likely one).

>>> g = torch.Generator().manual_seed(0)
>>> x, y = torch.randn(60, 3, generator=g), torch.arange(60) % 2
>>> LaRED(shrinkage=0.1).fit(x, y).score(torch.zeros(2, 3)).shape
torch.Size([2])
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from certood.scores.larem import LaREM, class_distances


def lared_score(features: Tensor, means: Tensor, factors: Tensor, log_dets: Tensor) -> Tensor:
    """``-max_c log N(x; mu_c, Sigma_c)`` over the classes kept; float64 ``[N]``."""
    keep = torch.isfinite(means).all(dim=1)
    d = class_distances(features, means[keep], factors[keep])
    nll = (d + log_dets[keep] + features.shape[1] * math.log(2 * math.pi)) / 2
    return nll.min(dim=1).values


class LaRED(LaREM):
    """Negative log-density under the most likely per-class Gaussian (same fit as LaREM)."""

    kind = "lared"

    def _score(self, features: Tensor) -> Tensor:
        dev = features.device
        return lared_score(features, self.means.to(dev), self.factors.to(dev),
                           self.log_dets.to(dev)).to(features.dtype)
