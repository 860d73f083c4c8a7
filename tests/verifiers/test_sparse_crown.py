"""certood's sparse CROWN: the bounds of the float64 reference CROWN and of auto_LiRPA's, every
sampled and attacked output inside them, and a float32 product whose rounding is paid for
(a head built to cancel catastrophically breaks the bound without the error term)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from certood.errors import CertoodError
from certood.verifiers import bound_module
from certood.verifiers import sparse_crown as sc
from certood.verifiers.reference import Region, crown_bounds, evaluate, ibp_bounds, mlp_layers
from certood.verifiers.sparse_crown import SparseCrown, supports


def _net(widths: list[int], seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=torch.float64) / a ** 0.5)
            lin.bias.copy_(torch.randn(b, generator=g, dtype=torch.float64) * 0.1)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _boxes(n: int, d: int, eps: float, seed: int, clip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z[:, ::3] = 0.0  # post-ReLU zeros: the clipped box is one-sided there
    lo, hi = z - eps, z + eps
    return z, (lo.clamp(min=0) if clip else lo), hi


@pytest.mark.parametrize("widths", [[12, 9, 4], [20, 16, 16, 5], [30, 24, 16, 12, 3]])
@pytest.mark.parametrize("clip", [True, False])
def test_float64_equals_reference_crown(widths, clip):
    layers = mlp_layers(_net(widths, seed=len(widths)))
    z, lo, hi = _boxes(10, widths[0], 0.08, seed=1, clip=clip)
    ref = crown_bounds(layers, Region(z, 0.08, lower=torch.zeros_like(z) if clip else None))
    ours = SparseCrown(layers, torch.float64)(lo, hi)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-10)
    ibp = ibp_bounds(layers, Region(z, 0.08, lower=torch.zeros_like(z) if clip else None))
    torch.testing.assert_close(SparseCrown(layers).ibp(lo, hi), ibp, rtol=1e-12, atol=1e-12)


def test_equals_auto_lirpa_crown_on_a_box_head():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = nn.Sequential(TwoMLPHead(48, 32), nn.Linear(32, 7)).double().eval()
    z, lo, hi = _boxes(6, 48, 0.05, seed=2, clip=True)
    theirs = bound_module(head, z, 0.05, method="crown", x_lower=torch.zeros_like(z))
    ours = SparseCrown(mlp_layers(head), torch.float64)(lo, hi)
    torch.testing.assert_close(ours[0], theirs.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours[1], theirs.upper, rtol=1e-9, atol=1e-9)


def test_float32_products_contain_float64_bounds_and_lose_little():
    layers = mlp_layers(_net([200, 64, 64, 12], seed=3))
    _, lo, hi = _boxes(8, 200, 0.02, seed=4, clip=True)
    l64, h64 = SparseCrown(layers, torch.float64)(lo, hi)
    l32, h32 = SparseCrown(layers, torch.float32)(lo, hi)
    assert bool((l32 <= l64).all() and (h32 >= h64).all())
    width = h64 - l64
    assert float(((l64 - l32) / width).max()) < 1e-3
    assert float(((h32 - h64) / width).max()) < 1e-3


@pytest.mark.parametrize("wide", ["per_box", "batched"])
def test_outputs_sampled_and_attacked_stay_inside(wide):
    net = _net([40, 32, 24, 6], seed=5)
    layers = mlp_layers(net)
    _, lo, hi = _boxes(5, 40, 0.1, seed=6, clip=True)
    blo, bhi = SparseCrown(layers, wide=wide)(lo, hi)
    g = torch.Generator().manual_seed(7)
    x = lo.unsqueeze(1) + torch.rand(5, 2000, 40, generator=g, dtype=torch.float64) * (hi - lo).unsqueeze(1)
    out = evaluate(layers, x.reshape(-1, 40)).reshape(5, 2000, 6)
    assert bool((out >= blo.unsqueeze(1)).all() and (out <= bhi.unsqueeze(1)).all())
    # projected gradient descent on every output, both directions, from the box centre
    for sign in (1.0, -1.0):
        x = ((lo + hi) / 2).clone().requires_grad_(True)
        for _ in range(60):
            (sign * net(x)).sum().backward()
            with torch.no_grad():
                x -= 0.02 * x.grad.sign()
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            x.grad = None
        with torch.no_grad():
            reached = net(x)
        assert bool((reached >= blo).all() and (reached <= bhi).all())
    # the attack gets close to the bounds: they are not vacuous
    assert float((bhi - blo).max()) < 10 * float(out.amax(1).sub(out.amin(1)).max())


def test_float32_rounding_term_is_what_keeps_a_cancelling_head_sound(monkeypatch):
    """Two copies of one hidden neuron read with weights 10000.0001 and -10000.0002: the
    output depends on x through 1e-4 W1, but both weights round to 10000.0 in float32, so
    the float32 product of the coefficients with W1 is exactly 0. The error term covers
    that; without it, the bound collapses to the centre value and misses the exact range
    (computed in float64 from the exact coefficients)."""
    g = torch.Generator().manual_seed(8)
    d = 3000
    # multiples of 1/16: 10000 w is exact in float32, so the float32 product is exactly 0
    w = torch.randint(1, 17, (d,), generator=g).double() / 16 * (torch.randint(0, 2, (d,), generator=g) * 2 - 1)
    W1, b1 = torch.stack([w, w]), torch.tensor([5000.0, 5000.0], dtype=torch.float64)  # active over the box
    W2 = torch.tensor([[10000.0001, -10000.0002]], dtype=torch.float64)
    assert float(W2[0, 0].float()) == float(W2[0, 1].abs().float())
    layers = [("linear", W1, b1), ("relu",), ("linear", W2, torch.zeros(1, dtype=torch.float64))]
    x = torch.rand(1, d, generator=g, dtype=torch.float64)
    lo, hi = x - 0.01, x + 0.01
    M = W2 @ W1  # the affine output's exact coefficients (float64: no cancellation at this scale)
    centre = float(M @ ((lo + hi) / 2).T + W2 @ b1)
    spread = float(M.abs() @ ((hi - lo) / 2).T)
    blo, bhi = SparseCrown(layers, torch.float32)(lo, hi)
    assert float(blo) <= centre - spread and float(bhi) >= centre + spread
    monkeypatch.setattr(sc, "_UNIT_ROUNDOFF", {torch.float32: 0.0, torch.float64: 0.0})
    blo, bhi = SparseCrown(layers, torch.float32)(lo, hi)
    assert float(blo) > centre - spread and float(bhi) < centre + spread


def test_supported_networks_and_bad_boxes():
    lin = ("linear", torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert supports([lin]) and supports([lin, ("relu",), lin])
    assert not supports([("relu",), lin]) and not supports([lin, ("relu",)]) and not supports([lin, lin])
    with pytest.raises(CertoodError, match="Linear"):
        SparseCrown([lin, ("relu",)])
    with pytest.raises(CertoodError, match="lower > upper"):
        SparseCrown([lin])(torch.ones(1, 2), torch.zeros(1, 2))
    with pytest.raises(CertoodError, match="input width"):
        SparseCrown([lin])(torch.zeros(1, 3), torch.ones(1, 3))


def test_stats_count_the_wide_products():
    """One hidden layer, every neuron active over the box: r rows x n1 columns x D inputs."""
    g = torch.Generator().manual_seed(9)
    W1 = torch.randn(6, 10, generator=g, dtype=torch.float64)
    layers = [("linear", W1, torch.full((6,), 100.0, dtype=torch.float64)), ("relu",),
              ("linear", torch.randn(3, 6, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))]
    crown = SparseCrown(layers)
    x = torch.rand(2, 10, generator=g, dtype=torch.float64)
    crown(x - 0.01, x + 0.01)
    assert crown.stats == {"boxes": 2, "rows": 6, "wide_macs": 2 * 3 * 6 * 10}


def test_reduced_precision_float32_products_fall_back_to_float64(monkeypatch):
    """With bf16 products switched on, the float32 rounding term would not hold: the call
    multiplies in float64 (the same bounds as gemm_dtype=float64) and leaves the setting alone."""
    layers = mlp_layers(_net([30, 16, 4], seed=10))
    _, lo, hi = _boxes(3, 30, 0.05, seed=11, clip=True)
    assert sc.float32_products_are_ieee()
    monkeypatch.setattr(sc, "float32_products_are_ieee", lambda device=None: False)
    torch.testing.assert_close(SparseCrown(layers, torch.float32)(lo, hi), SparseCrown(layers, torch.float64)(lo, hi),
                               rtol=0, atol=0)


def test_equals_reference_where_ibp_proves_a_neuron_stable_that_crown_does_not():
    """Over many random heads and wide regions both engines keep IBP's bounds for a neuron IBP
    proves stable (exact relaxation) even where CROWN's own bound straddles 0; the case
    occurs here (pure CROWN intermediate bounds give other bounds for some heads)."""
    differs = 0
    for seed in range(40):
        layers = mlp_layers(_net([10, 12, 12, 12, 3], seed=100 + seed))
        z, lo, hi = _boxes(4, 10, 0.3, seed=200 + seed, clip=True)
        region = Region(z, 0.3, lower=torch.zeros_like(z))
        ref = crown_bounds(layers, region)
        ours = SparseCrown(layers, torch.float64)(lo, hi)
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-10)
        pure = crown_bounds(layers, region, stable_from_ibp=False)
        differs += int(not (torch.allclose(pure[0], ref[0]) and torch.allclose(pure[1], ref[1])))
    assert differs > 0


def test_never_looser_than_auto_lirpa_on_deeper_heads():
    """Deeper random heads, wide regions, one box per auto_LiRPA call: where the two differ,
    certood's bounds are the tighter ones (both sound: the sampling and attack tests)."""
    for seed in range(0, 40, 4):
        net = _net([10, 12, 12, 12, 3], seed=100 + seed)
        z, lo, hi = _boxes(4, 10, 0.3, seed=200 + seed, clip=True)
        ours = SparseCrown(mlp_layers(net), torch.float64)(lo, hi)
        for i in range(4):
            theirs = bound_module(net, z[i:i + 1], 0.3, method="crown", x_lower=torch.zeros_like(z[i:i + 1]))
            assert bool((ours[0][i] >= theirs.lower[0] - 1e-9).all() and (ours[1][i] <= theirs.upper[0] + 1e-9).all())


@pytest.mark.parametrize("gemm", [torch.float64, torch.float32])
@pytest.mark.parametrize("wide", ["per_box", "batched"])
def test_a_batch_of_boxes_gets_each_box_alone_bounds(gemm, wide):
    """All boxes of one call (padded per-box index lists, one product per layer) get the bounds
    each box gets alone, to rounding; the float64 ones equal the reference CROWN's."""
    net = _net([60, 40, 32, 24, 9], seed=12)
    layers = mlp_layers(net)
    z, lo, hi = _boxes(7, 60, 0.06, seed=13, clip=True)
    z[3] = 0.0  # a box that sees only the clipped region
    lo, hi = (z - 0.06).clamp(min=0), z + 0.06
    crown = SparseCrown(layers, gemm, wide=wide)
    blo, bhi = crown(lo, hi)
    # float32: the rounding term depends on the padded widths of the batch (1e-6 here)
    alone_tol = 1e-9 if gemm == torch.float64 else 1e-5
    for n in range(7):
        alo, ahi = SparseCrown(layers, gemm, wide=wide)(lo[n:n + 1], hi[n:n + 1])
        torch.testing.assert_close(blo[n], alo[0], rtol=alone_tol, atol=alone_tol)
        torch.testing.assert_close(bhi[n], ahi[0], rtol=alone_tol, atol=alone_tol)
    ref = crown_bounds(layers, Region(z, 0.06, lower=torch.zeros_like(z)))
    tol = 1e-10 if gemm == torch.float64 else 1e-4
    torch.testing.assert_close(blo, ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(bhi, ref[1], rtol=tol, atol=tol)
    if gemm == torch.float32:  # the rounding term only widens
        assert bool((blo <= ref[0] + 1e-12).all() and (bhi >= ref[1] - 1e-12).all())


def test_batched_and_per_box_wide_products_agree_and_count_their_work():
    """The two ways of running the wide product give the same bounds to rounding; the batched
    one multiplies every box's rows over the batch's largest live-neuron list (at least as
    many multiply-adds as the per-box one, which takes each box's own)."""
    layers = mlp_layers(_net([80, 48, 32, 10], seed=14))
    _, lo, hi = _boxes(9, 80, 0.05, seed=15, clip=True)
    per, bat = SparseCrown(layers, wide="per_box"), SparseCrown(layers, wide="batched")
    a, b = per(lo, hi), bat(lo, hi)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # each pays for its own float32 rounding
    assert bat.stats["rows"] == per.stats["rows"] and bat.stats["wide_macs"] >= per.stats["wide_macs"] > 0
    with pytest.raises(CertoodError, match="wide must be"):
        SparseCrown(layers, wide="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_boxes_are_bounded_on_the_device():
    layers = mlp_layers(_net([50, 32, 24, 6], seed=16))
    _, lo, hi = _boxes(6, 50, 0.05, seed=17, clip=True)
    crown = SparseCrown(layers)
    clo, chi = crown(lo.cuda(), hi.cuda())
    assert clo.device.type == "cuda" and chi.device.type == "cuda"
    cpu = SparseCrown(layers)(lo, hi)
    torch.testing.assert_close((clo.cpu(), chi.cpu()), cpu, rtol=1e-5, atol=1e-5)
    state = crown.prepare(lo.cuda(), hi.cuda())
    C = torch.randn(6, 2, 6, dtype=torch.float64, device="cuda")
    slo, shi = crown.spec_bounds(state, C)
    assert slo.device.type == "cuda"
