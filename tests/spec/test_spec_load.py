"""The example spec loads into the documented dataclasses; defaults, paths and fingerprint."""
from pathlib import Path

import pytest
import torch

from certood.errors import SpecError
from certood.spec import (
    SCORE_KIND_TABLE, SCORE_KINDS, TAP_POINTS, DataSource, DetectorSpec, OutputSpec, ScoreSpec,
    ThresholdSpec, check_spec_file, load_spec, load_spec_text,
)

DEMO_PATH = Path(__file__).parent / "fixtures" / "demo.yaml"
DEMO = DEMO_PATH.read_text()

MINIMAL = """\
version: 1
detector: {kind: torchvision, arch: fasterrcnn_resnet50_fpn, weights: models/det.pt}
data: {calibration: {annotations: coco/val.json, images: coco/images}}
taps: {logits: cls_logits}
scores: {energy: {tap: logits}}
"""


def variant(old: str, new: str, text: str = DEMO) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_demo_spec_loads_into_dataclasses():
    spec = load_spec(DEMO_PATH)
    fixtures = DEMO_PATH.parent.resolve()
    assert spec.path == DEMO_PATH.resolve()
    assert spec.version == 1
    assert spec.detector == DetectorSpec("torchvision", "digits_fasterrcnn", "builtin:digits_fasterrcnn",
                                         6, 128, 128, 0.05, "cpu")
    assert spec.data.fit == DataSource(digitsdet="train", max_images=600)
    assert spec.data.calibration == DataSource(digitsdet="val")
    assert spec.data.id_test == DataSource(digitsdet="test")
    assert spec.data.ood == {"near": DataSource(digitsdet="ood-near"), "far": DataSource(digitsdet="ood-far")}
    assert spec.taps == {"roi": "box_head.input", "penultimate": "box_head.output", "logits": "cls_logits"}
    assert spec.scores == {"energy": ScoreSpec("energy", "logits", {"temperature": 1.0}),
                           "maha": ScoreSpec("mahalanobis", "penultimate", {})}
    assert spec.threshold == ThresholdSpec(0.95, "f1")
    assert spec.rule.source == "energy > t.energy or maha > t.maha"
    assert spec.rule.names() == spec.rule.threshold_names() == {"energy", "maha"}
    assert spec.output == OutputSpec(fixtures.parent / "runs" / "demo")
    assert spec.warnings == ()
    assert spec.raw["scores"]["maha"] == {"kind": "mahalanobis", "tap": "penultimate"}
    assert check_spec_file(DEMO_PATH) == []


def test_defaults_and_paths_resolve_against_base_dir(tmp_path):
    spec = load_spec_text(MINIMAL, base_dir=tmp_path)
    assert spec.path is None
    assert spec.detector.weights == str(tmp_path / "models" / "det.pt")
    assert spec.detector.num_classes is None and spec.detector.score_thresh == 0.05
    assert spec.data.fit is None and spec.data.id_test is None and spec.data.ood == {}
    assert spec.data.calibration == DataSource(annotations=tmp_path / "coco" / "val.json",
                                               images=tmp_path / "coco" / "images")
    assert spec.threshold == ThresholdSpec() and spec.output == OutputSpec(None)
    assert spec.rule.source == "energy > t.energy"


def test_default_rule_ors_every_score():
    spec = load_spec_text(variant('rule: "energy > t.energy or maha > t.maha"\n', ""))
    assert spec.rule.source == "energy > t.energy or maha > t.maha"


def test_yaml_int_accepted_for_float_and_bytes_input():
    spec = load_spec_text(variant("temperature: 1.0", "temperature: 2").encode())
    assert spec.scores["energy"].params == {"temperature": 2.0}
    assert isinstance(spec.scores["energy"].params["temperature"], float)


def test_fingerprint_is_stable_and_covers_only_what_calibration_depends_on():
    base = load_spec_text(DEMO).fingerprint()
    assert len(base) == 64 and base == load_spec(DEMO_PATH).fingerprint()
    unchanged = [
        variant("maha > t.maha", "maha > 2 * t.maha"),
        variant("{dir: ../runs/demo}", "{dir: elsewhere}"),
        variant("{digitsdet: test}", "{digitsdet: mixed}"),
        variant("    far:  {digitsdet: ood-far}\n", ""),
        "# a comment\n" + DEMO.replace("{tap: logits, temperature: 1.0}", "{temperature: 1.0, tap: logits}"),
    ]
    for text in unchanged:
        assert load_spec_text(text).fingerprint() == base
    changed = [
        variant("temperature: 1.0", "temperature: 2.0"),
        variant("{kind: mahalanobis, tap: penultimate}", "{kind: mahalanobis, tap: roi}"),
        variant("{digitsdet: val}", "{digitsdet: val, max_images: 10}"),
        variant("tpr: 0.95", "tpr: 0.9"),
        variant("min_size: 128", "min_size: 64"),
    ]
    for text in changed:
        assert load_spec_text(text).fingerprint() != base


def test_warning_for_a_score_the_rule_does_not_read():
    text = variant('"energy > t.energy or maha > t.maha"', '"energy > t.energy"')
    spec = load_spec_text(text)
    assert [(w.key_path, w.line, w.column, w.severity) for w in spec.warnings] == [("scores.maha", 22, 3, "warning")]


def test_load_spec_raises_spec_error_with_all_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(variant("version: 1", "version: 3").replace("tap: logits", "tap: nowhere"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [(i.key_path, i.line) for i in info.value.issues] == [("version", 1), ("scores.energy.tap", 21)]
    assert str(path) in str(info.value)


def test_missing_file_is_an_issue_not_a_crash(tmp_path):
    issues = check_spec_file(tmp_path / "nope.yaml")
    assert len(issues) == 1 and issues[0].expected == "a readable spec file"
    with pytest.raises(SpecError):
        load_spec(tmp_path)  # a directory


def test_public_constants():
    assert TAP_POINTS == {"box_head.input": "features", "box_head.output": "features", "cls_logits": "logits",
                          "box_jitter.logits": "jitter_logits", "head.input": "features",
                          "head.cls_features": "features"}
    assert SCORE_KINDS == tuple(SCORE_KIND_TABLE) and SCORE_KINDS[:2] == ("energy", "mahalanobis")
    from certood.scores import SCORE_CLASSES
    assert set(SCORE_KINDS) == set(SCORE_CLASSES)  # every spec kind can be built, and only those


def test_loaded_rule_evaluates_on_tensors():
    spec = load_spec_text(DEMO)
    scores = {"energy": torch.tensor([0.0, 5.0, 0.0]), "maha": torch.tensor([0.0, 0.0, 9.0])}
    flags = spec.rule.evaluate(scores, {"energy": 1.0, "maha": 1.0})
    assert flags.dtype == torch.bool and flags.tolist() == [False, True, True]
