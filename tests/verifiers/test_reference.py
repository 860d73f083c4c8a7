"""The float64 reference bounds (own IBP and CROWN) agree with auto_LiRPA's and contain
every sampled output: two independent implementations, so a bug in either shows."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from certood.errors import CertoodError
from certood.verifiers import bound_module
from certood.verifiers.reference import Region, evaluate, mlp_layers, reference_bounds


def _head():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(TwoMLPHead(20, 16), nn.Linear(16, 5)).double().eval()


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("norm, eps, clip", [(math.inf, 0.1, True), (math.inf, 0.3, False), (2, 0.5, False)])
def test_reference_matches_auto_lirpa_in_float64(method, norm, eps, clip):
    head = _head()
    z = torch.rand(8, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lower = torch.zeros_like(z) if clip else None
    ours = reference_bounds(mlp_layers(head), Region(z, eps, norm, lower=lower), method)
    theirs = bound_module(head, z, eps, norm=norm, method=method, x_lower=lower)
    torch.testing.assert_close(ours[0], theirs.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours[1], theirs.upper, rtol=1e-9, atol=1e-9)
    # and they contain sampled outputs (uniform in the box, clipped)
    half = eps / math.sqrt(20) if norm == 2 else eps  # a box inside the L2 ball
    x = z.unsqueeze(1) + (torch.rand(8, 300, 20, dtype=torch.float64) * 2 - 1) * half
    x = x.clamp(min=0) if clip else x
    out = evaluate(mlp_layers(head), x.reshape(-1, 20)).reshape(8, 300, 5)
    assert bool((out >= ours[0].unsqueeze(1) - 1e-12).all() and (out <= ours[1].unsqueeze(1) + 1e-12).all())


def test_per_row_eps_and_non_mlp_heads():
    head = _head()
    z = torch.rand(3, 20, dtype=torch.float64)
    eps = torch.tensor([[0.0], [0.1], [0.2]], dtype=torch.float64)
    lo, hi = reference_bounds(mlp_layers(head), Region(z, eps), "crown")
    torch.testing.assert_close(lo[0], evaluate(mlp_layers(head), z[:1])[0])
    assert bool(((hi - lo)[1] < (hi - lo)[2]).all())
    with pytest.raises(CertoodError, match="Linear/ReLU"):
        mlp_layers(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
