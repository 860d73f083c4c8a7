"""PARTICUL on RoI maps: losses by hand, logistic fit vs scipy, speed, sanity, state, errors."""
from __future__ import annotations

import doctest
import time

import numpy as np
import pytest
import torch
from scipy.stats import logistic

import certood.scores.particul as particul_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import Particul
from certood.scores.particul import fit_logistic, particul_losses, train_part_detectors


def roi_maps(n, patterns, seed):
    """[N, 64*7*7] RoI features: ReLU noise, plus each pattern at a random location."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, 7, 7, generator=g).relu() * 0.5
    for v in patterns:
        i, j = torch.randint(0, 7, (n,), generator=g), torch.randint(0, 7, (n,), generator=g)
        x[torch.arange(n), :, i, j] += v
    return x.reshape(n, -1)


@pytest.fixture(scope="module")
def parts():
    patterns = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).relu() * 2
    fit = roi_maps(2000, patterns, 1)
    t = time.perf_counter()
    score = Particul().fit(fit)
    elapsed = time.perf_counter() - t
    return score, elapsed, roi_maps(300, patterns, 2), roi_maps(300, [], 3)


def test_losses_by_hand():
    peaked = torch.full((1, 2, 7, 7), -1e4)
    peaked[0, 0, 1, 1] = peaked[0, 1, 5, 5] = 0.0  # two parts, two places
    locality, unicity = particul_losses(peaked)
    assert locality.item() == pytest.approx(-1.0) and unicity.item() == 0.0
    peaked[0, 1, 5, 5], peaked[0, 1, 1, 1] = -1e4, 0.0  # both parts on one place
    assert particul_losses(peaked)[1].item() == pytest.approx(1.0)
    flat = torch.zeros(1, 1, 7, 7)  # uniform: the best 3x3 window holds 9/49
    assert particul_losses(flat)[0].item() == pytest.approx(-9 / 49)


def test_training_lowers_the_loss_and_is_seeded():
    patterns = torch.randn(2, 8, generator=torch.Generator().manual_seed(4)).relu() * 3
    maps = roi_maps(300, [torch.cat([p, torch.zeros(56)]) for p in patterns], 5).reshape(
        300, 64, 7, 7)[:, :8]
    before = train_part_detectors(maps, 3, 0, seed=1)
    after = train_part_detectors(maps, 3, 5, seed=1)

    def loss(w):
        return sum(particul_losses(torch.einsum("pc,ncij->npij", w, maps))).item()

    assert loss(after) < loss(before)
    assert torch.equal(after, train_part_detectors(maps, 3, 5, seed=1))
    assert not torch.equal(after, train_part_detectors(maps, 3, 5, seed=2))


@pytest.mark.parametrize("seed", range(3))
def test_logistic_fit_matches_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randn(500, 1, generator=g) * 2 + 1,
                        torch.rand(500, 1, generator=g) * 5,
                        torch.from_numpy(logistic.rvs(3, 0.5, size=(500, 1), random_state=seed))],
                       1)
    loc, scale = fit_logistic(values)
    for j in range(3):
        ref_loc, ref_scale = logistic.fit(values[:, j].double().numpy())
        assert loc[j].item() == pytest.approx(ref_loc, rel=1e-6, abs=1e-6)
        assert scale[j].item() == pytest.approx(ref_scale, rel=1e-6)


def test_ood_scores_higher(parts, auroc):
    score, elapsed, id_maps, ood_maps = parts
    out = score.score(id_maps)
    assert out.shape == (300,) and out.dtype == torch.float32
    assert (out >= -1).all() and (out <= 0).all()
    assert auroc(out, score.score(ood_maps)) > 0.9


def test_confidence_is_the_mean_calibrated_part_confidence(parts):
    score, _, id_maps, _ = parts
    peaks = torch.einsum("pc,ncij->npij", score.weight, id_maps.reshape(-1, 64, 7, 7)).amax((2, 3))
    cdf = torch.from_numpy(logistic.cdf(peaks.double().numpy(), score.loc.numpy(),
                                        score.scale.numpy()))
    np.testing.assert_allclose(score.score(id_maps).numpy(), -cdf.mean(1).numpy(), atol=1e-6)


def test_state_round_trip(parts, round_trip):
    score, _, id_maps, _ = parts
    loaded = round_trip(score)
    assert torch.equal(loaded.score(id_maps), score.score(id_maps)) and loaded.feature_dim == 3136


def test_errors(parts):
    score, _, _, _ = parts
    with pytest.raises(CertoodError, match="particul: expected a fitted score"):
        Particul().score(torch.zeros(2, 3136))
    with pytest.raises(CertoodError, match="particul: expected features of width channels \\* S "
                                           r"\* S with channels=64, found 100"):
        Particul().fit(torch.zeros(4, 100))
    with pytest.raises(CertoodError, match="particul: expected features of width"):
        Particul(channels=64).fit(torch.zeros(4, 64 * 6))  # 6 is not a square
    with pytest.raises(CertoodError, match="particul.parts: expected an integer >= 1"):
        Particul(parts=0)
    state = score.state_tensors()
    with pytest.raises(ArtifactError, match=r"map_shape \[64, S, S\], found \[64, 7, 6\]"):
        Particul().load_state_tensors({**state, "map_shape": torch.tensor([64, 7, 6])})
    with pytest.raises(ArtifactError, match=r"expected state tensors weight \[4, 64\]"):
        Particul(parts=4).load_state_tensors(state)


def test_docstring_examples():
    assert doctest.testmod(particul_module).failed == 0
