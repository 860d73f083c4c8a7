"""PARTICUL part detectors (Xu-Darme et al., 2022) adapted to detected boxes; higher = more OOD.

The RoI features entering the box head (``box_head.input``, ``[N, 3136]`` = ``64 x 7 x 7``)
are read as ``[N, channels, S, S]`` maps. ``parts`` detectors, each a 1x1 convolution (a
vector ``w_p`` of ``channels`` weights, no bias), give correlation maps ``w_p . x[:, i, j]``.
They are trained on the fit boxes, unsupervised, with PARTICUL's two losses on the maps after
a spatial softmax ``S_p``:

- locality: ``-mean_{n,p} max_{ij} (S_p * U)_{ij}``, ``U`` a 3x3 box of ones (each detector
  concentrates its mass around one location);
- unicity: ``mean_n relu(max_{ij} sum_p S_p[ij] - 1)`` (detectors do not pile up on one
  location), weighted by ``unicity``;

with Adam (learning rate 0.05, batches of 256, ``epochs`` passes, weights and batch order from
``seed``; about a second for 2,000 boxes on one CPU core). Then each detector is calibrated on
the fit boxes: a logistic distribution is fitted by maximum likelihood to its raw maximum
correlation ``a_p = max_{ij} w_p . x[:, i, j]`` (as ``scipy.stats.logistic.fit``, tested), and
its confidence is the logistic CDF ``sigmoid((a_p - loc_p) / scale_p)``. The box confidence is
the mean over detectors; the score is its negation, in ``[-1, 0]``. Class-agnostic: one set
of detectors for all classes. Labels are not used.

>>> x = torch.randn(64, 4 * 3 * 3, generator=torch.Generator().manual_seed(0))
>>> p = Particul(parts=2, channels=4, epochs=2).fit(x)
>>> p.score(x[:3]).shape
torch.Size([3])
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from certood.errors import ArtifactError, CertoodError
from certood.scores.base import Score, check_int, check_number, check_state_shapes

LEARNING_RATE = 0.05
BATCH_ROWS = 256


def as_maps(features: Tensor, channels: int) -> Tensor:
    """``[N, channels * S * S]`` rows as ``[N, channels, S, S]`` maps, or raise."""
    n, d = features.shape
    side = math.isqrt(d // channels) if d % channels == 0 else 0
    if side < 1 or channels * side * side != d:
        raise CertoodError(f"particul: expected features of width channels * S * S with "
                           f"channels={channels}, found {d}")
    return features.reshape(n, channels, side, side)


def correlation_maps(maps: Tensor, weight: Tensor) -> Tensor:
    """1x1 convolution of ``[N, C, S, S]`` maps by ``weight [P, C]``: ``[N, P, S, S]``."""
    return torch.einsum("pc,ncij->npij", weight.to(maps.dtype), maps)


def particul_losses(correlations: Tensor) -> tuple[Tensor, Tensor]:
    """PARTICUL's locality and unicity losses of correlation maps ``[N, P, S, S]``."""
    n, p, h, w = correlations.shape
    soft = torch.softmax(correlations.reshape(n, p, h * w), dim=2).reshape(n, p, h, w)
    box = torch.ones(p, 1, 3, 3, dtype=soft.dtype, device=soft.device)
    locality = -F.conv2d(soft, box, padding=1, groups=p).amax(dim=(2, 3)).mean()
    unicity = torch.relu(soft.sum(dim=1).amax(dim=(1, 2)) - 1).mean()
    return locality, unicity


def train_part_detectors(maps: Tensor, parts: int, epochs: int, seed: int,
                         unicity: float = 1.0) -> Tensor:
    """Part detector weights ``[P, C]`` trained on ``[N, C, S, S]`` maps with Adam.

    Adam is written out (a few lines) because ``torch.optim`` imports ``torch._dynamo`` on
    first use, which alone takes seconds.
    """
    g = torch.Generator().manual_seed(seed)
    maps = maps.to(torch.float32)
    weight = (torch.randn(parts, maps.shape[1], generator=g) / math.sqrt(maps.shape[1])).to(
        maps.device)
    m, v, step = torch.zeros_like(weight), torch.zeros_like(weight), 0
    beta1, beta2 = 0.9, 0.999
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(epochs):
            for rows in torch.randperm(maps.shape[0], generator=g).split(BATCH_ROWS):
                weight.requires_grad_(True)
                locality, unique = particul_losses(correlation_maps(maps[rows], weight))
                (grad,) = torch.autograd.grad(locality + unicity * unique, weight)
                step += 1
                with torch.no_grad():
                    m.mul_(beta1).add_(grad, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
                    weight = weight.detach() - LEARNING_RATE * m_hat / (v_hat.sqrt() + 1e-8)
    return weight.detach()


def _logistic_nll(v: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    z = (v - loc) / log_scale.exp()
    return (z + 2 * F.softplus(-z)).mean(dim=0) + log_scale


def fit_logistic(values: Tensor, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood logistic location and scale of each column of ``[N, P]``, float64.

    Damped Newton steps on ``(loc, log scale)`` from the moment estimates, with the
    closed-form gradient and Hessian of the mean negative log-likelihood.
    """
    v = values.to(torch.float64)
    loc = v.mean(dim=0)
    std = v.std(dim=0, correction=0) if v.shape[0] > 1 else torch.ones_like(loc)
    log_scale = (std * math.sqrt(3) / math.pi).clamp(min=1e-12).log()
    nll = _logistic_nll(v, loc, log_scale)
    for _ in range(max_iter):
        s = log_scale.exp()
        z = (v - loc) / s
        th = torch.tanh(z / 2)
        sech2 = 1 - th ** 2
        g_loc, g_ls = -(th.mean(dim=0)) / s, 1 - (z * th).mean(dim=0)
        h_ll = (sech2.mean(dim=0)) / (2 * s ** 2)
        h_ls = (th + z * sech2 / 2).mean(dim=0) / s
        h_ss = (z * th + z ** 2 * sech2 / 2).mean(dim=0)
        det = h_ll * h_ss - h_ls ** 2
        newton = det > 0
        safe = torch.where(newton, det, torch.ones_like(det))
        d_loc = torch.where(newton, -(h_ss * g_loc - h_ls * g_ls) / safe, -g_loc * s ** 2)
        d_ls = torch.where(newton, -(h_ll * g_ls - h_ls * g_loc) / safe, -g_ls)
        step = torch.ones_like(loc)
        for _ in range(30):  # halve each column's step until its loss does not increase
            trial = _logistic_nll(v, loc + step * d_loc, log_scale + step * d_ls)
            worse = ~(trial <= nll)
            if not worse.any():
                break
            step = torch.where(worse, step / 2, step)
        loc, log_scale = loc + step * d_loc, log_scale + step * d_ls
        nll = _logistic_nll(v, loc, log_scale)
        if (g_loc.abs().max() * s.max() < 1e-12) and (g_ls.abs().max() < 1e-12):
            break
    return loc, log_scale.exp()


def particul_score(features: Tensor, weight: Tensor, loc: Tensor, scale: Tensor,
                   channels: int) -> Tensor:
    """``-mean_p sigmoid((max_ij w_p . x_ij - loc_p) / scale_p)``; ``[N]``."""
    peaks = correlation_maps(as_maps(features, channels), weight).amax(dim=(2, 3))
    return -torch.sigmoid((peaks - loc.to(peaks)) / scale.to(peaks)).mean(dim=1)


class Particul(Score):
    """Negative mean calibrated confidence of ``parts`` part detectors trained at fit."""

    kind = "particul"
    _STATE = ("weight", "loc", "scale", "map_shape")

    def __init__(self, parts: int = 6, channels: int = 64, epochs: int = 10, seed: int = 0,
                 unicity: float = 1.0) -> None:
        super().__init__()
        self.parts = check_int("particul.parts", parts)
        self.channels = check_int("particul.channels", channels)
        self.epochs = check_int("particul.epochs", epochs, minimum=0)
        self.seed = check_int("particul.seed", seed, minimum=0)
        self.unicity = check_number("particul.unicity", unicity, ge=0)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        maps = as_maps(features, self.channels)
        self.weight = train_part_detectors(maps, self.parts, self.epochs, self.seed,
                                           self.unicity)
        peaks = correlation_maps(maps.to(torch.float32), self.weight).amax(dim=(2, 3))
        self.loc, self.scale = fit_logistic(peaks)
        self.map_shape = torch.tensor(maps.shape[1:], dtype=torch.int64)
        self.feature_dim = features.shape[1]

    def _score(self, features: Tensor) -> Tensor:
        w = self.weight.to(features.device)
        return particul_score(features, w, self.loc, self.scale, self.channels)

    def _load(self, state: dict[str, Tensor]) -> None:
        check_state_shapes("particul", state, {
            "weight": (self.parts, self.channels), "loc": (self.parts,),
            "scale": (self.parts,), "map_shape": (3,)})
        channels, side, side_too = state["map_shape"].tolist()
        if channels != self.channels or side != side_too or side < 1:
            raise ArtifactError(f"particul: expected map_shape [{self.channels}, S, S], "
                                f"found {state['map_shape'].tolist()}")
        self.weight, self.loc, self.scale = state["weight"], state["loc"], state["scale"]
        self.map_shape = state["map_shape"].to(torch.int64)
        self.feature_dim = channels * side * side

    def params(self) -> dict[str, Any]:
        return {"parts": self.parts, "channels": self.channels, "epochs": self.epochs,
                "seed": self.seed, "unicity": self.unicity}
