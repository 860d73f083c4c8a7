"""Fusion scores in the monitor: the reference is out of fold (each fitted component refitted
without the fold it scores), fusions are scored after what they read, and a spec with the
box-jitter tap calibrates and checks end to end on the tiny DigitsDet."""
from __future__ import annotations

import torch

from certood.extract import DatasetDetections
from certood.monitor import calibrate, fusion_reference, score_input, score_values
from certood.scores import build_score
from certood.scores.fusion import Fusion
from certood.spec import load_spec_text

SPEC = """\
version: 1
detector: {kind: torchvision, arch: digits_fasterrcnn, weights: builtin:digits_fasterrcnn, num_classes: 6}
data:
  calibration: {digitsdet: val}
  id_test: {digitsdet: test}
  fit: {digitsdet: train}
taps: {roi: box_head.input, penultimate: box_head.output, logits: cls_logits, jitter: box_jitter.logits}
scores:
  fused:  {kind: fusion, tap: logits, of: [maha, energy, jkl], folds: 3, min_class_boxes: 5}
  energy: {tap: logits}
  maha:   {kind: mahalanobis, tap: penultimate}
  jkl:    {kind: jitter_kl, tap: jitter}
threshold: {tpr: 0.95}
rule: "fused > t.fused"
"""


def _dets(n: int = 60, seed: int = 0) -> DatasetDetections:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 6, generator=g) * 3
    taps = {"box_head.input": torch.rand(n, 12, generator=g), "box_head.output": torch.rand(n, 8, generator=g),
            "cls_logits": logits, "box_jitter.logits": torch.cat([logits, torch.randn(n, 48, generator=g)], 1)}
    return DatasetDetections("x", torch.arange(n), torch.rand(n, 4, generator=g), logits[:, 1:].argmax(1) + 1,
                             torch.rand(n, generator=g), taps, n, 1.0)


def test_reference_is_out_of_fold_and_scoring_reads_the_components():
    spec = load_spec_text(SPEC)
    fit, labels = _dets(), torch.arange(60) % 3
    scores = {"energy": build_score("energy"), "jkl": build_score("jitter_kl"),
              "maha": build_score("mahalanobis").fit(score_input(spec, "maha", fit), labels)}
    fusion = build_score("fusion", spec.scores["fused"].params)
    ref = fusion_reference(spec, "fused", fusion, scores, fit, labels, detector=None)
    assert ref.shape == (60, 3 + 1 + 5)
    fold = fusion.fold_of(60)
    x = score_input(spec, "maha", fit)
    for f in range(3):  # maha, refitted without fold f, scores fold f
        held = fold == f
        part = build_score("mahalanobis").fit(x[~held], labels[~held])
        torch.testing.assert_close(ref[held, 0], part.score(x[held]).double())
    assert not torch.allclose(ref[:, 0], scores["maha"].score(x).double())  # in-sample differs
    torch.testing.assert_close(ref[:, 1], scores["energy"].score(score_input(spec, "energy", fit)).double())
    wh = (fit.boxes[:, 2:] - fit.boxes[:, :2]).double().clamp(min=0)
    torch.testing.assert_close(ref[:, 3], (wh[:, 0] * wh[:, 1]).sqrt())  # the box size
    torch.testing.assert_close(ref[:, 4:], fit.taps["cls_logits"][:, 1:].double())
    scores["fused"] = fusion.fit(ref)
    values = score_values(spec, scores, fit)
    assert list(values) == list(spec.scores)  # the spec's order, the fusion computed last
    rows = torch.cat([torch.stack([values[c].double() for c in ("maha", "energy", "jkl")], 1),
                      ref[:, 3:4], fit.taps["cls_logits"][:, 1:].double()], 1)
    torch.testing.assert_close(values["fused"], Fusion(of=("maha", "energy", "jkl"), folds=3, min_class_boxes=5)
                               .fit(ref).score(rows))


def test_fusion_of_jitter_and_logit_scores_calibrates_end_to_end(make_tiny_spec):
    tiny = make_tiny_spec()
    spec = load_spec_text(SPEC.replace("weights: builtin:digits_fasterrcnn", f"weights: {tiny.detector.weights}")
                          .replace("{digitsdet: val}", _src(tiny.data.calibration))
                          .replace("{digitsdet: test}", _src(tiny.data.id_test))
                          .replace("{digitsdet: train}", _src(tiny.data.fit))
                          .replace("num_classes: 6}", "num_classes: 6, score_thresh: 0.0}")
                          .replace("threshold: {tpr: 0.95}", "threshold: {tpr: 0.95, detector_score: 0.0}"))
    from certood.check import load_spec_detector

    detector = load_spec_detector(spec)
    monitor, extracted = calibrate(spec, detector, detector.num_classes)
    cal = extracted["calibration"]
    assert "box_jitter.logits" in cal.taps and cal.taps["box_jitter.logits"].shape[1] == 9 * 6
    values = monitor.score_boxes(cal)
    assert bool((values["jkl"] >= 0).all()) and float(values["jkl"].max()) > 0
    p = monitor.scores["fused"].pvalues(score_input(spec, "fused", cal, values))
    assert bool(((p > 0) & (p <= 1)).all())
    flagged = monitor.flag(values)
    assert 0 < float(flagged.double().mean()) <= 0.2  # about 5% of calibration boxes above t


def _src(source) -> str:
    return f"{{annotations: {source.annotations}, images: {source.images}, max_images: {source.max_images}}}"


def test_the_shipped_fusion_spec_is_energy_and_lared_by_the_smaller_pvalue():
    """specs/detection_fusion.yaml (the round-5 choice): its fusion reads energy and LaRED,
    out of fold, and scores a box by -log of the smaller of its two p-values."""
    from pathlib import Path

    from certood.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "detection_fusion.yaml")
    params = spec.scores["fused"].params
    assert params["of"] == ["energy", "lared"] and params["combine"] == "min"
    fit, labels = _dets(300, seed=1), torch.arange(300) % 3
    scores = {"energy": build_score("energy"),
              "lared": build_score("lared").fit(score_input(spec, "lared", fit), labels)}
    fusion = build_score("fusion", params)
    scores["fused"] = fusion.fit(fusion_reference(spec, "fused", fusion, scores, fit, labels, detector=None))
    query = _dets(40, seed=2)
    values = score_values(spec, scores, query)
    p = scores["fused"].pvalues(score_input(spec, "fused", query, values))
    torch.testing.assert_close(values["fused"].double(), -torch.log(p.min(dim=1).values))
    assert (p[:, 0] != p[:, 1]).any()  # the smaller p-value is not a mere copy of one component
