"""MC dropout: parity with pytorch-ood 0.4.0's MCD on replayed masks, outputs, state, errors."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
from pytorch_ood.detector import MCD
from torch import nn

import certood.scores.mc_dropout as mc_module
from certood.errors import ArtifactError, CertoodError
from certood.scores import MCDropout
from certood.scores.mc_dropout import dropout_masks


class ReplayDropoutClassifier(nn.Module):
    """The classifier after dropout whose t-th call applies our t-th mask (pytorch-ood's MCD
    draws its masks from nn.Dropout; replaying ours makes both see the same passes)."""

    def __init__(self, weight, bias, masks, p):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.masks, self.p, self.calls = masks, p, 0

    def forward(self, x):
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        return self.linear(x * mask / (1 - self.p))


@pytest.mark.parametrize(("p", "samples"), [(0.5, 20), (0.1, 7)])
def test_matches_pytorch_ood(data, p, samples):
    probe = torch.cat([data.id[:100], data.ood[:100]])
    s = MCDropout(samples=samples, p=p, output="variance").fit(data.fit,
                                                              classifier=data.classifier)
    model = ReplayDropoutClassifier(data.weight, data.bias, s.masks, p)
    ref_var = MCD(model, samples=samples, mode="var").predict(probe)
    torch.testing.assert_close(s.score(probe), ref_var)
    model.calls = 0
    s_mean = MCDropout(samples=samples, p=p, output="max_softmax").fit(
        data.fit, classifier=data.classifier)
    torch.testing.assert_close(s_mean.score(probe),
                               MCD(model, samples=samples, mode="mean").predict(probe))
    # entropy and mutual information from the same passes
    model.calls = 0
    passes = torch.stack([torch.softmax(model(probe), 1) for _ in range(samples)]).detach()
    mean = passes.mean(0)
    entropy = -(mean * mean.log()).nan_to_num().sum(1)
    expected_mi = entropy + (passes * passes.log()).nan_to_num().sum(2).mean(0)
    for output, expected in (("entropy", entropy),
                             ("mutual_information", expected_mi.clamp(min=0))):
        got = MCDropout(samples=samples, p=p, output=output).fit(
            data.fit, classifier=data.classifier).score(probe)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_masks_are_seeded_and_shared_by_every_box(data):
    masks = dropout_masks(20, 32, 0.5, seed=3)
    assert masks.dtype == torch.bool and masks.shape == (20, 32)
    assert torch.equal(masks, dropout_masks(20, 32, 0.5, seed=3))
    assert not torch.equal(masks, dropout_masks(20, 32, 0.5, seed=4))
    assert abs(masks.float().mean().item() - 0.5) < 0.1
    s = MCDropout(seed=3).fit(data.fit, classifier=data.classifier)
    assert torch.equal(s.masks, dropout_masks(20, 32, 0.5, seed=3))
    batch = s.score(data.id[:10])  # a box scores the same alone and in a batch (to round-off)
    torch.testing.assert_close(torch.cat([s.score(data.id[i:i + 1]) for i in range(10)]), batch)
    assert all(MCDropout(p=0.0, output=o).fit(data.fit, classifier=data.classifier)
               .score(data.id).abs().max() < 1e-5 for o in ("mutual_information", "variance"))


@pytest.mark.parametrize("output", ["entropy", "max_softmax"])
def test_ood_scores_higher(data, auroc, output):
    s = MCDropout(output=output).fit(data.fit, classifier=data.classifier)
    out = s.score(data.id)
    assert out.shape == (len(data.id),) and out.dtype == torch.float32
    assert auroc(out, s.score(data.ood)) > 0.9
    if output == "entropy":
        assert (out >= 0).all() and (out <= math.log(4) + 1e-6).all()


@pytest.mark.parametrize("output", ["mutual_information", "variance"])
def test_disagreement_outputs_flag_ambiguous_boxes(data, auroc, output):
    # Mutual information and variance measure how much the passes disagree. The "far" boxes
    # give near-uniform softmaxes in every pass (no disagreement), so their shift is an
    # ambiguous box instead: two class blocks active at the ID level, whose winner flips with
    # the masks.
    g = torch.Generator().manual_seed(6)
    ambiguous = torch.zeros(400, 32)
    first = torch.arange(400) % 4
    for i, (a, b) in enumerate(zip(first.tolist(), ((first + 1) % 4).tolist())):
        ambiguous[i, 4 * a: 4 * a + 4] = 3 + torch.randn(4, generator=g)
        ambiguous[i, 4 * b: 4 * b + 4] = 3 + torch.randn(4, generator=g)
    s = MCDropout(output=output).fit(data.fit, classifier=data.classifier)
    assert auroc(s.score(data.id), s.score(ambiguous.relu())) > 0.9


def test_state_round_trip(round_trip, data):
    s = MCDropout(samples=5, p=0.3, seed=1, output="mutual_information").fit(
        data.fit, classifier=data.classifier)
    loaded = round_trip(s)
    assert torch.equal(loaded.masks, s.masks) and torch.equal(loaded.score(data.ood),
                                                              s.score(data.ood))


def test_errors(data):
    with pytest.raises(CertoodError, match="mc_dropout: expected a fitted score"):
        MCDropout().score(data.id)
    with pytest.raises(CertoodError, match="mc_dropout.output: expected one of entropy, "
                                           "mutual_information, variance, max_softmax, found 'mi'"):
        MCDropout(output="mi")
    with pytest.raises(CertoodError, match="mc_dropout.p: expected a number >= 0 and < 1, found 1"):
        MCDropout(p=1)
    with pytest.raises(CertoodError, match="mc_dropout.samples: expected an integer >= 2, found 1"):
        MCDropout(samples=1)
    state = MCDropout(samples=4).fit(data.fit, classifier=data.classifier).state_tensors()
    with pytest.raises(ArtifactError, match=r"masks \[20, D\]"):
        MCDropout().load_state_tensors(state)
    with pytest.raises(ArtifactError, match="expected bool masks, found torch.uint8"):
        MCDropout(samples=4).load_state_tensors({**state, "masks": state["masks"].to(torch.uint8)})


def test_docstring_examples():
    assert doctest.testmod(mc_module).failed == 0
