"""Certificates: score bounds contain sampled values, the rule is decided soundly, and no
certified box survives an attack (>= 500 samples and 50 PGD steps per box, toward the
opposite verdict); a deliberately unsound bound (10% shrink) is caught by the same attack.

The heads are random (a TwoMLPHead + classifier as in the demo detector, smaller) with
random non-negative features, so every test runs in a second or two.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from certood.certify import (
    BOUNDERS, Certifier, ScoreBounder, certify_boxes, certify_metrics, entropy_from_prob_bounds, logit_rows,
    rule_under_bounds,
)
from certood.errors import CertoodError
from certood.monitor import Monitor
from certood.scores import build_score
from certood.scores.energy import energy_score
from certood.scores.entropy import entropy_score
from certood.scores.knn import knn_score
from certood.scores.mahalanobis import mahalanobis_score
from certood.scores.msp import msp_score
from certood.spec import load_spec_text
from certood.spec.rule import parse_rule
from certood.verifiers.attack import attack_certificates

D, H, K = 48, 32, 6

SPEC = """
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn"}}
data: {{calibration: {{digitsdet: val}}, fit: {{digitsdet: train}}}}
taps: {{roi: box_head.input, penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  msp: {{tap: logits}}
  entropy: {{tap: logits}}
  max_logit: {{tap: logits}}
  maha: {{kind: mahalanobis, tap: penultimate}}
  knn: {{kind: knn, tap: penultimate, k: 5}}
  rmaha: {{kind: relative_mahalanobis, tap: penultimate}}
  roi_maha: {{kind: mahalanobis, tap: roi}}
rule: "{rule}"
threshold: {{per_class: {per_class}}}
certify: {{tap: {tap}, eps: {eps}, norm: {norm}, exact: {exact}, radius: {radius}}}
"""


def _seeded(seed, fn):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


@pytest.fixture(scope="module")
def setup():
    """A random head, fitted scores, 60 boxes with their own scores."""
    head = _seeded(0, lambda: nn.Sequential(TwoMLPHead(D, H), nn.Linear(H, K)).eval())
    fit = _seeded(1, lambda: torch.rand(200, D) * 2)
    z = _seeded(2, lambda: torch.rand(60, D) * 2)
    spec = make_spec()
    with torch.no_grad():
        h, logits = head[0](fit), head(fit)
    labels = logits[:, 1:].argmax(1) % 2  # two classes, both populated
    inputs = {"roi": fit, "penultimate": h, "logits": logits[:, 1:]}
    scores = {}
    for name, s in spec.scores.items():
        scores[name] = build_score(s.kind, s.params)
        if scores[name].needs_fit:
            scores[name].fit(inputs[s.tap], labels)
    return head, scores, z


def make_spec(rule="energy > t.energy", tap="roi", eps=0.01, norm="inf", exact="none", radius="false",
              per_class=False):
    return load_spec_text(SPEC.format(rule=rule, tap=tap, eps=eps, norm=norm, exact=exact, radius=radius,
                                      per_class=str(per_class).lower()))


def own_values(spec, scores, head, z):
    with torch.no_grad():
        h, logits = head[0](z), head(z)
    inputs = {"roi": z, "penultimate": h, "logits": logits[:, 1:]}
    return {name: scores[name].score(inputs[s.tap]) for name, s in spec.scores.items()}


def monitor_for(spec, scores, values, quantile=0.5):
    thresholds = {k: float(v.double().quantile(quantile)) for k, v in values.items()}
    return Monitor(spec=spec, scores=scores, thresholds=thresholds, detector_threshold=0.0,
                   label_to_category=[1, 2, 3, 4, 5], detector_sha256="")


def run(setup, n=None, **spec_args):
    head, scores, z = setup
    z = z[:n]
    spec = make_spec(**spec_args)
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    flags = monitor.flag(values)
    result = certify_boxes(monitor, head, z, values, flags)
    return spec, monitor, values, flags, result


def attack(setup, spec, monitor, values, result, n_samples=500, steps=50):
    head, scores, z = setup
    o = spec.certify
    norm = math.inf if o.norm == "inf" else float(o.norm)
    return attack_certificates(spec, scores, monitor.thresholds, head, spec.taps[o.tap], z,
                               [c.verdict for c in result.certificates], values, o.eps, norm,
                               o.domain == "nonnegative", n_samples=n_samples, steps=steps)


# --- score bounds from row bounds ------------------------------------------------------------
def _logit_box(n=40, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    scale = torch.tensor([0.0, 0.1, 1.0, 3.0], dtype=torch.float64).repeat_interleave(n // 4).reshape(n, 1)
    width = torch.rand(n, c, generator=gen, dtype=torch.float64) * scale  # 0: point boxes first
    return centre - width, centre + width


def _rows_from_logit_box(lo, hi):
    M, _ = logit_rows(lo.shape[1])
    pos, neg = M.clamp(min=0), M.clamp(max=0)
    return lo @ pos.T + hi @ neg.T, hi @ pos.T + lo @ neg.T


def _samples(lo, hi, n=3000, seed=1):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(lo.shape[0], n, lo.shape[1], generator=gen, dtype=torch.float64)
    u[:, : n // 3] = u[:, : n // 3].round()  # vertices
    return lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)


@pytest.mark.parametrize("kind, fn", [
    ("energy", lambda x: energy_score(x, 2.0)), ("msp", lambda x: msp_score(x, 0.5)),
    ("max_logit", lambda x: -x.max(-1).values), ("entropy", entropy_score)])
def test_logit_score_bounds_contain_every_sample(kind, fn):
    lo, hi = _logit_box()
    rlo, rhi = _rows_from_logit_box(lo, hi) if kind != "max_logit" else (lo, hi)
    params = {"energy": {"temperature": 2.0}, "msp": {"temperature": 0.5}}.get(kind, {})
    score = build_score(kind, params)
    blo, bhi = BOUNDERS[kind].bound(score, rlo, rhi, lo.shape[1])
    values = fn(_samples(lo, hi))
    assert bool((values >= blo.unsqueeze(1) - 1e-12).all()) and bool((values <= bhi.unsqueeze(1) + 1e-12).all())
    point = fn(((lo + hi) / 2)[:10])  # zero-width boxes: the bounds are the value
    torch.testing.assert_close(blo[:10], point, rtol=0, atol=1e-9)
    torch.testing.assert_close(bhi[:10], point, rtol=0, atol=1e-9)


def test_entropy_bounds_reach_uniform_and_are_tight_on_vertices():
    plo = torch.full((1, 4), 0.1, dtype=torch.float64)
    phi = torch.full((1, 4), 0.4, dtype=torch.float64)
    lo, hi = entropy_from_prob_bounds(plo, phi)
    assert abs(float(hi[0]) - math.log(4)) < 1e-9  # uniform is feasible
    vertex = torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=torch.float64)  # the minimum is at a vertex
    assert abs(float(lo[0]) - float(-(vertex * vertex.log()).sum())) < 1e-9


def test_mahalanobis_and_knn_bounds_contain_every_sample(setup):
    head, scores, z = setup
    gen = torch.Generator().manual_seed(3)
    centre = torch.rand(20, H, generator=gen, dtype=torch.float64)
    lo, hi = centre - 0.05, centre + 0.05
    pts = _samples(lo, hi, 1000)
    for name, fn in (("maha", lambda x: mahalanobis_score(x, scores["maha"].means, scores["maha"].precision)),
                     ("knn", lambda x: knn_score(x, scores["knn"].bank.double(), scores["knn"].k))):
        M, m = BOUNDERS[scores[name].kind].rows(scores[name], H)
        pos, neg = M.clamp(min=0), M.clamp(max=0)
        rlo, rhi = lo @ pos.T + hi @ neg.T + m, hi @ pos.T + lo @ neg.T + m
        blo, bhi = BOUNDERS[scores[name].kind].bound(scores[name], rlo, rhi, H)
        values = torch.stack([fn(p) for p in pts])
        assert bool((values >= blo.unsqueeze(1) - 1e-9).all()), name
        assert bool((values <= bhi.unsqueeze(1) + 1e-9).all()), name


def test_three_valued_rule_with_division_and_unbounded_scores():
    b = {"a": (torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])),
         "b": (torch.tensor([0.5, -1.0]), torch.tensor([1.0, 1.0]))}
    r = rule_under_bounds(parse_rule("a / b > 0.9").tree, b, {})
    assert r.may_true.tolist() == [True, True] and r.may_false.tolist() == [False, True]
    assert r.division_by_zero.tolist() == [False, True]
    inf = (torch.tensor([-math.inf]), torch.tensor([math.inf]))
    a = (torch.tensor([2.0]), torch.tensor([3.0]))
    r = rule_under_bounds(parse_rule("a > 1 or u - u > 0").tree, {"a": a, "u": inf}, {})
    assert not bool(r.may_false[0])  # decided without the unbounded score
    r = rule_under_bounds(parse_rule("u * 0 > 1").tree, {"u": inf}, {})
    assert bool(r.may_true[0]) and bool(r.may_false[0])  # 0 * inf: widest, never NaN


# --- soundness under attack ------------------------------------------------------------------
ATTACKED = [
    dict(rule="energy > t.energy or maha > t.maha", eps=0.01),
    dict(rule="msp > t.msp and entropy > t.entropy", eps=0.01),
    dict(rule="max_logit > t.max_logit and knn > t.knn", eps=0.001, exact="z3"),
    dict(rule="energy > t.energy", eps=0.3, norm=2),
    dict(rule="energy > t.energy or maha > t.maha", eps=0.005, tap="penultimate"),
]


@pytest.mark.parametrize("args", ATTACKED, ids=[a["rule"] + f" {a.get('norm', 'inf')} {a.get('tap', 'roi')}"
                                                  for a in ATTACKED])
def test_no_certified_box_survives_the_attack(setup, args):
    spec, monitor, values, flags, result = run(setup, **args)
    counts = result.summary()["counts"]
    assert counts["certified_ood"] > 0 and counts["certified_id"] > 0, counts
    if args.get("tap") == "penultimate":  # the region sits at the head's penultimate features
        head, scores, z = setup
        with torch.no_grad():
            h = head[0](z)
        a = attack_certificates(spec, scores, monitor.thresholds, head[1:], "box_head.output", h,
                                [c.verdict for c in certify_boxes(monitor, nn.Sequential(head[1]), h, values,
                                                                  flags).certificates],
                                values, spec.certify.eps, n_samples=500, steps=50)
    else:
        a = attack(setup, spec, monitor, values, result)
    assert a.n_points >= 500 * a.n_boxes
    assert a.n_violations == 0, a.violations[:5]


def test_a_shrunk_bound_is_caught_by_the_attack(setup, monkeypatch):
    """10% too tight max_logit bounds certify boxes that the attack breaks: the test can fail."""
    sound = BOUNDERS["max_logit"]

    def shrunk(score, lo, hi, dim):
        a, b = sound.bound(score, lo, hi, dim)
        return a + 0.1 * (b - a), b - 0.1 * (b - a)

    args = dict(rule="max_logit > t.max_logit", eps=0.02)
    spec, monitor, values, flags, result = run(setup, **args)
    assert attack(setup, spec, monitor, values, result).n_violations == 0
    monkeypatch.setitem(BOUNDERS, "max_logit", ScoreBounder(sound.rows, shrunk))
    spec, monitor, values, flags, bad = run(setup, **args)
    assert bad.summary()["certified_rate"] > result.summary()["certified_rate"]
    assert attack(setup, spec, monitor, values, bad).n_violations > 0


def test_demo_head_architecture_at_the_roi_tap():
    """The demo detector's own head (3136 -> 256 -> 256 -> 6), random weights."""
    from certood.detectors.torchvision_frcnn import TorchvisionFasterRCNN, digits_fasterrcnn

    det = TorchvisionFasterRCNN(_seeded(0, lambda: digits_fasterrcnn(6)))
    head = det.monitored_head("box_head.input")
    z = _seeded(4, lambda: torch.rand(6, 3136))
    spec = make_spec(rule="max_logit > t.max_logit or entropy > t.entropy", eps=0.002)
    scores = {n: build_score(s.kind, s.params) for n, s in spec.scores.items()}
    with torch.no_grad():
        logits = head(z)[:, 1:]
    values = {n: scores[n].score(logits) for n in ("max_logit", "entropy")}
    values.update({n: torch.zeros(6) for n in spec.scores if n not in values})
    spec = dataclasses.replace(spec, scores={n: spec.scores[n] for n in ("max_logit", "entropy")})
    monitor = monitor_for(spec, scores, {n: values[n] for n in spec.scores})
    flags = monitor.flag(values)
    result = certify_boxes(monitor, head, z, values, flags)
    assert result.summary()["certified_rate"] > 0
    a = attack_certificates(spec, scores, monitor.thresholds, head, "box_head.input", z,
                            [c.verdict for c in result.certificates], values, 0.002, n_samples=500, steps=50)
    assert a.n_violations == 0 and a.n_points >= 500 * a.n_boxes


# --- verdict details ---------------------------------------------------------------------------
def test_unsupported_score_is_undecided_with_a_reason(setup):
    _, _, _, _, result = run(setup, rule="rmaha > t.rmaha")
    assert {c.verdict for c in result.certificates} == {"undecided"}
    assert all(c.reason == "unsupported score: score rmaha cannot be bounded (kind relative_mahalanobis "
               "has no bound)" for c in result.certificates)
    assert all(c.score_bounds["rmaha"] == (-math.inf, math.inf) for c in result.certificates)
    assert result.certificates[0].to_json()["score_bounds"]["rmaha"] == [None, None]
    # a rule that does not need it is still decided where the bounded part decides it
    _, _, _, _, result = run(setup, rule="max_logit > t.max_logit and rmaha > t.rmaha", eps=0.001)
    assert result.summary()["counts"]["certified_id"] > 0


def test_a_score_on_the_jitter_tap_is_unsupported_not_a_crash(setup):
    """box_jitter.logits pools other boxes from the feature maps: no function of the region."""
    head, scores, z = setup
    text = SPEC.format(rule="jkl > t.jkl or energy > t.energy", tap="roi", eps=0.01, norm="inf", exact="none",
                       radius="false", per_class="false")
    text = text.replace("logits: cls_logits}", "logits: cls_logits, jitter: box_jitter.logits}")
    text = text.replace("  energy: {tap: logits}\n", "  energy: {tap: logits}\n  jkl: {kind: jitter_kl, tap: jitter}\n")
    spec = load_spec_text(text)
    c = Certifier(spec, {**scores, "jkl": build_score("jitter_kl")}, {}, head, spec.certify, z.shape[1])
    [request] = [r for r in c.requests if r.name == "jkl"]
    assert request.source == "unsupported"
    assert request.reason == ("unsupported score: score jkl reads box_jitter.logits, which is not a function of "
                              "the features at the certify tap")


def test_exact_z3_decides_what_intervals_cannot(setup):
    args = dict(rule="energy - energy > 0 or maha > t.maha", eps=0.01)  # energy - energy: [lo - hi, hi - lo]
    _, _, _, _, loose = run(setup, **args)
    _, _, _, _, exact = run(setup, exact="z3", **args)
    assert loose.summary()["counts"]["certified_id"] == 0
    assert exact.summary()["counts"]["certified_id"] > 0
    assert exact.summary()["counts"]["certified_ood"] == loose.summary()["counts"]["certified_ood"]


def test_scores_before_the_tap_are_constant_and_roi_scores_exact(setup):
    _, _, _, _, result = run(setup, rule="roi_maha > t.roi_maha", tap="penultimate", eps=1.0)
    head, scores, z = setup
    # at box_head.output the roi score is not a function of the region: a point interval
    assert all(c.verdict != "undecided" for c in result.certificates)
    _, _, values, _, result = run(setup, rule="roi_maha > t.roi_maha", eps=0.001)
    for c, v in zip(result.certificates, values["roi_maha"]):
        lo, hi = c.score_bounds["roi_maha"]
        assert lo <= float(v) <= hi


def test_self_check_refuses_a_head_that_does_not_match_the_scores(setup):
    head, scores, z = setup
    spec = make_spec(rule="max_logit > t.max_logit", eps=0.001)
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    other = _seeded(9, lambda: nn.Sequential(TwoMLPHead(D, H), nn.Linear(H, K)).eval())
    result = certify_boxes(monitor, other, z, values, monitor.flag(values))
    assert all(c.verdict == "undecided" and c.reason.startswith("self-check failed") for c in result.certificates)


@pytest.mark.parametrize("norm", ["inf", 2])
def test_radius_is_a_proven_eps(setup, norm):
    eps = 0.01 if norm == "inf" else 0.2
    spec, monitor, values, flags, result = run(setup, n=12, rule="max_logit > t.max_logit", eps=eps, norm=norm,
                                               radius="true")
    head, scores, z = setup
    z = z[:12]
    radii = torch.tensor([c.radius for c in result.certificates])
    certified = torch.tensor([c.verdict != "undecided" for c in result.certificates])
    assert bool((radii[certified] >= eps).all()) and bool((radii[~certified] < eps).all())
    # every radius re-certifies its verdict (undecided boxes: the verdict of their own flag)
    pick = torch.arange(0, len(z), 3)
    for i in pick.tolist():
        if radii[i] == 0:
            continue
        o = dataclasses.replace(spec.certify, eps=float(radii[i]), radius=False)
        again = certify_boxes(monitor, head, z[i:i + 1], {k: v[i:i + 1] for k, v in values.items()}, flags[i:i + 1], o)
        want = result.certificates[i].verdict if certified[i] else ("certified_ood" if flags[i] else "certified_id")
        assert again.certificates[0].verdict == want


def test_negative_features_with_a_nonnegative_domain_are_an_error(setup):
    head, scores, z = setup
    spec = make_spec(rule="max_logit > t.max_logit")
    values = own_values(spec, scores, head, z - 1)
    monitor = monitor_for(spec, scores, values)
    with pytest.raises(CertoodError, match="domain: any"):
        certify_boxes(monitor, head, z - 1, values, monitor.flag(values))


def test_summary_and_metrics_shape(setup):
    spec, _, _, _, result = run(setup, rule="energy > t.energy or maha > t.maha")
    per_set, about = certify_metrics(spec.certify, {"id_test": result, "ood/near": result}, 0.05)
    # every box certified, over the detector's seconds on the same images
    assert about["to_detector_ratio"] == pytest.approx(2 * result.seconds / 0.05)
    assert set(per_set) == {"id_test", "near"}
    e = per_set["id_test"]
    assert e["n_boxes"] == 60 and abs(e["certified_rate"] + e["undecided_rate"] - 1) < 1e-12
    assert abs(e["certified_ood_rate"] + e["certified_id_rate"] - e["certified_rate"]) < 1e-12
    assert sum(e["counts"].values()) == 60 and about["method"] == "crown" and about["to_detector_ratio"] > 0
    j = result.certificates[0].to_json()
    assert {"verdict", "method", "eps", "norm", "score_bounds", "margin", "seconds"} <= set(j)


def test_per_class_thresholds_are_the_boxes_own_constants(setup):
    """`t.NAME[class]` reads the table at the box's predicted label (fixed for the detection)."""
    head, scores, z = setup
    spec = make_spec(rule="max_logit > t.max_logit[class] or energy > t.energy", eps=0.01, per_class=True)
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    labels = torch.arange(len(z)) % 5 + 1
    table = [0.0] + [float(values["max_logit"][labels == c].double().median()) for c in range(1, 6)]
    monitor.class_thresholds = {"max_logit": table}
    flags = monitor.flag(values, labels)
    result = certify_boxes(monitor, head, z, values, flags, labels=labels)
    counts = result.summary()["counts"]
    assert counts["certified_ood"] > 0 and counts["certified_id"] > 0, counts
    a = attack_certificates(spec, scores, monitor.thresholds, head, "box_head.input", z,
                            [c.verdict for c in result.certificates], values, 0.01, n_samples=500, steps=50,
                            labels=labels, class_thresholds=monitor.class_thresholds)
    assert a.n_violations == 0 and a.n_boxes > 0
    with pytest.raises(CertoodError, match="predicted label"):
        certify_boxes(monitor, head, z, values, flags)


# --- staged bounding: IBP first, CROWN only where the rule is still open -----------------------
@pytest.mark.parametrize("args", [
    dict(rule="energy > t.energy or maha > t.maha", eps=0.01),
    dict(rule="energy > t.energy or maha > t.maha", eps=0.002),
    dict(rule="msp > t.msp and entropy > t.entropy", eps=0.01),
    dict(rule="max_logit > t.max_logit and knn > t.knn", eps=0.001, exact="z3"),
    dict(rule="energy > t.energy", eps=0.3, norm=2),
])
def test_staged_bounds_give_the_full_paths_verdicts(setup, args):
    """Staging changes how fast, not what is proven: the same verdicts as bounding every box
    with CROWN (intersected with IBP), and never fewer certificates than CROWN alone."""
    head, scores, z = setup
    spec = make_spec(**args)
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    flags = monitor.flag(values)
    c = Certifier(spec, scores, monitor.thresholds, head, spec.certify, z.shape[1])
    assert c.staged
    eps = spec.certify.eps
    staged = c.decide(c.bounds(z, eps, values), None)[0]
    stages = c.last_stage_counts
    full = c.decide(c.bounds(z, eps, values, staged=False), None)[0]
    crown_only = c.decide(c.score_bounds(z, eps, values), None)[0]
    assert staged == full
    assert all(s == o for s, o in zip(staged, crown_only) if o != "undecided")
    assert stages["crown"] <= len(z)
    # every stored bound still contains the box's own score
    for name, (lo, hi) in c.bounds(z, eps, values).items():
        assert bool(((lo <= values[name].double()) & (values[name].double() <= hi)).all()), name


@pytest.mark.parametrize("args", [
    dict(rule="energy > t.energy or maha > t.maha", eps=0.01),
    dict(rule="msp > t.msp and entropy > t.entropy", eps=0.02),
    dict(rule="max_logit > t.max_logit and knn > t.knn", eps=0.001),
])
def test_sparse_engine_gives_auto_lirpas_bounds_and_verdicts(setup, args):
    """certify.engine auto (certood's sparse CROWN, float32 wide products with their rounding
    paid for) against auto_lirpa: the same verdicts, score bounds equal up to that rounding
    term and never tighter than auto_LiRPA's by more than float64 noise."""
    head, scores, z = setup
    spec = make_spec(**args)
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    out = {}
    for engine in ("auto", "auto_lirpa"):
        options = dataclasses.replace(spec.certify, engine=engine)
        c = Certifier(spec, scores, monitor.thresholds, head, options, z.shape[1])
        bounds = c.bounds(z, options.eps, values, staged=False)
        out[engine] = (bounds, c.decide(bounds, None)[0])
    assert out["auto"][1] == out["auto_lirpa"][1]
    for name, (lo, hi) in out["auto"][0].items():
        llo, lhi = out["auto_lirpa"][0][name]
        finite = torch.isfinite(llo) & torch.isfinite(lhi)
        assert torch.equal(finite, torch.isfinite(lo) & torch.isfinite(hi)), name
        if not finite.any():
            continue  # a score without a bound: [-inf, inf] for both
        width = (lhi - llo)[finite].clamp(min=1e-9)
        assert bool((lo[finite] <= llo[finite] + 1e-9 * (1 + llo[finite].abs())).all()), name
        assert bool((hi[finite] >= lhi[finite] - 1e-9 * (1 + lhi[finite].abs())).all()), name
        assert float(((llo - lo)[finite] / width).max()) < 1e-2, name
        assert float(((hi - lhi)[finite] / width).max()) < 1e-2, name


def test_engine_auto_falls_back_to_auto_lirpa_where_sparse_crown_does_not_apply(setup):
    from certood.certify import Region, sparse_backend

    head, _, _ = setup
    composite = copy.deepcopy(head).double()
    assert sparse_backend(composite, Region(math.inf, "crown", True)) is not None
    assert sparse_backend(composite, Region(2.0, "crown", False)) is None  # L2: auto_LiRPA
    assert sparse_backend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double(),
                          Region(math.inf, "crown", True)) is None


def test_staging_skips_crown_for_boxes_ibp_decides(setup):
    head, scores, z = setup
    spec = make_spec(rule="energy > t.energy or maha > t.maha", eps="0.000001")
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    c = Certifier(spec, scores, monitor.thresholds, head, spec.certify, z.shape[1])
    c.bounds(z, 1e-6, values)
    assert c.last_stage_counts["crown"] < len(z) // 2  # a tiny region: IBP decides most boxes


def test_z3_is_skipped_only_where_intervals_are_exact():
    from certood.certify import rule_needs_exact
    from certood.spec.rule import parse_rule

    assert not rule_needs_exact(parse_rule("energy > t.energy or maha > t.maha").tree)
    assert not rule_needs_exact(parse_rule("energy - maha > 1 and not knn < t.knn").tree)
    assert rule_needs_exact(parse_rule("energy - energy > 0 or maha > t.maha").tree)
    assert rule_needs_exact(parse_rule("energy / maha > 1").tree)


@pytest.mark.parametrize("rule", ["maha > t.maha", "energy > t.energy or maha > t.maha"])
def test_coupled_mahalanobis_bound_is_inside_the_interval_bound_and_certifies_more(setup, rule):
    """The Fenchel / secant Mahalanobis bound (certood.verifiers.quadratic) intersected with
    the interval bound: never wider, strictly narrower on some boxes, the boxes' own scores and
    400 samples of each region inside, at least as many verdicts; the float64 reference engine
    (what recheck re-proves with) gives nearly the same bound."""
    from certood.certify import reference_backend
    from certood.verifiers.attack import sample_region

    head, scores, z = setup
    spec = make_spec(rule=rule, eps=0.02)
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    c = Certifier(spec, scores, monitor.thresholds, head, spec.certify, z.shape[1])
    eps = spec.certify.eps
    lo, hi = c.score_bounds(z, eps, values)["maha"]
    ilo, ihi = c.score_bounds(z, eps, values, refine=False)["maha"]
    assert bool((lo >= ilo).all() and (hi <= ihi).all())
    assert bool((lo > ilo + 1e-6 * (1 + ilo.abs())).any() and (hi < ihi - 1e-6 * (1 + ihi.abs())).any())
    own = values["maha"].double()
    assert bool(((lo <= own) & (own <= hi)).all())
    x = sample_region(z.double(), eps, math.inf, True, 400, torch.Generator().manual_seed(4))
    with torch.no_grad():
        h = head[0](x.reshape(-1, D).float())
    d = mahalanobis_score(h, scores["maha"].means, scores["maha"].precision).reshape(len(z), 400)
    assert bool((d >= lo.unsqueeze(1)).all() and (d <= hi.unsqueeze(1)).all())
    coupled = c.decide(c.bounds(z, eps, values), None)[0]
    interval = c.decide(c.score_bounds(z, eps, values, refine=False), None)[0]
    assert all(a == b for a, b in zip(coupled, interval) if b != "undecided")
    assert sum(v != "undecided" for v in coupled) >= sum(v != "undecided" for v in interval)
    ref = Certifier(spec, scores, monitor.thresholds, head, spec.certify, z.shape[1], reference_backend("crown"))
    rlo, rhi = ref.score_bounds(z, eps, values)["maha"]
    width = (ihi - ilo).clamp(min=1e-9)
    assert float(((rlo - lo).abs() / width).max()) < 1e-2 and float(((rhi - hi).abs() / width).max()) < 1e-2


def test_undecided_boxes_carry_counterexamples_that_re_evaluate(setup):
    """A witness is a point of the region (checked in float64) where the monitor's own scores
    and rule decide the other way: re-evaluated from the point alone it gives the stored flag,
    scores and hash; certified boxes never carry one; the reason says counterexample."""
    from certood.verifiers.witness import evaluate_witness, witness_hash

    head, scores, z = setup
    spec, monitor, values, flags, result = run(setup, rule="energy > t.energy or maha > t.maha", eps=0.05)
    certs = result.certificates
    with_witness = [i for i, c in enumerate(certs) if c.witness is not None]
    assert with_witness, result.summary()
    assert all(certs[i].verdict == "undecided" for i in with_witness)
    assert result.summary()["undecided_reasons"].get("counterexample") == len(with_witness)
    for i in with_witness:
        c, x = certs[i], certs[i].witness_point
        assert c.reason.startswith("counterexample:") and c.to_json()["witness"]["sha256"] == witness_hash(x)
        assert float((x.double() - z[i].double()).abs().max()) <= 0.05 and bool((x >= 0).all())
        flag, at = evaluate_witness(spec, scores, monitor.thresholds, head, spec.taps["roi"], x,
                                    {k: v[i:i + 1] for k, v in values.items()})
        assert flag == c.witness["flag"] != bool(flags[i])
        assert at == pytest.approx(c.witness["scores"], rel=1e-4)  # float32, one point vs a batch


def test_method_bab_certifies_at_least_crowns_boxes_and_survives_the_attack(setup):
    """certify.method bab: CROWN, then branch and bound over the head's ReLUs for boxes left
    undecided without a counterexample; never fewer verdicts than CROWN, never a wrong one."""
    head, scores, z = setup
    spec = make_spec(rule="energy > t.energy or maha > t.maha", eps=0.03)
    values = own_values(spec, scores, head, z)
    monitor = monitor_for(spec, scores, values)
    flags = monitor.flag(values)
    crown = certify_boxes(monitor, head, z, values, flags)
    options = dataclasses.replace(spec.certify, method="bab", timeout_s=1.0)
    bab = certify_boxes(monitor, head, z, values, flags, options)
    cv = [c.verdict for c in crown.certificates]
    bv = [c.verdict for c in bab.certificates]
    assert all(b == c for b, c in zip(bv, cv) if c != "undecided")
    assert sum(v != "undecided" for v in bv) >= sum(v != "undecided" for v in cv)
    assert all(c.reason for c in bab.certificates if c.verdict == "undecided")
    spec_bab = dataclasses.replace(spec, certify=options)
    a = attack(setup, spec_bab, monitor, values, bab)
    assert a.n_violations == 0, a.violations[:5]
