"""`threshold:` methods (tpr, fpr on an OOD validation set, fixed), per_class, and the
per-class rule syntax they enable: loading, cross-checks, fingerprint."""
from pathlib import Path

import pytest

from certood.spec import ThresholdSpec, check_spec_text, load_spec_text
from certood.spec.model import DataSource

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
THRESHOLD = "threshold: {tpr: 0.95, detector_score: f1}\n"
RULE = 'rule: "energy > t.energy or maha > t.maha"\n'
VALIDATION = "    far:  {digitsdet: ood-far}\n  ood_validation:\n    digits_val: {digitsdet: mixed, max_images: 50}\n"


def variant(threshold: str | None = None, rule: str | None = None, extra: str = "", validation: bool = False) -> str:
    text = DEMO
    if threshold is not None:
        text = text.replace(THRESHOLD, f"threshold: {threshold}\n")
    if rule is not None:
        text = text.replace(RULE, f'rule: "{rule}"\n')
    if validation:
        text = text.replace("    far:  {digitsdet: ood-far}\n", VALIDATION)
    return text + extra


def errors(text: str) -> list[tuple[str, int, int, str]]:
    _, issues = check_spec_text(text, "m.yaml")
    return [(i.key_path, i.line, i.column, i.found) for i in issues if i.severity == "error"]


def test_threshold_methods_load():
    assert load_spec_text(DEMO).threshold == ThresholdSpec(0.95, "f1")
    fpr = load_spec_text(variant("{fpr: 0.05, on: digits_val}", validation=True))
    assert fpr.threshold == ThresholdSpec(tpr=None, fpr=0.05, on="digits_val")
    assert fpr.threshold.method == "fpr" and fpr.data.ood_validation == {
        "digits_val": DataSource(digitsdet="mixed", max_images=50)}
    fixed = load_spec_text(variant("{fixed: {energy: -3.2, maha: 40}}"))
    assert fixed.threshold.fixed == {"energy": -3.2, "maha": 40.0} and fixed.threshold.method == "fixed"
    per_class = load_spec_text(variant("{tpr: 0.9, per_class: true}", "energy > t.energy[class] or maha > t.maha"))
    assert per_class.threshold.per_class and per_class.rule.class_threshold_names() == {"energy"}
    assert per_class.threshold.describe() == "90% ID TPR on calibration boxes, per predicted class"


def test_on_is_a_name_not_a_boolean():
    text = variant("\n  fpr: 0.05\n  on: digits_val", validation=True)  # block style, plain `on:` key
    assert load_spec_text(text).threshold.on == "digits_val"


@pytest.mark.parametrize("threshold, rule, validation, expected", [
    ("{tpr: 0.9, fpr: 0.05, on: digits_val}", None, True,
     [("threshold.fpr", 25, 23, "both 'tpr' and 'fpr'")]),
    ("{fpr: 0.05}", None, True, [("threshold.on", 25, 1, "nothing")]),
    ("{fpr: 0.05, on: far}", None, True, [("threshold.on", 25, 28, "'far', an OOD test set of data.ood")]),
    ("{fpr: 0.05, on: digit_val}", None, True, [("threshold.on", 25, 28, "'digit_val'")]),
    ("{fpr: 0.05, on: near}", None, False, [("threshold.on", 23, 28, "'near', an OOD test set of data.ood")]),
    ("{fpr: 1.5, on: digits_val}", None, True, [("threshold.fpr", 25, 18, "number 1.5")]),
    ("{fixed: {energy: -3}}", None, False, [("threshold.fixed", 23, 20, "none for maha")]),
    ("{fixed: {energy: -3, maha: 1, mahal: 2}}", None, False, [("threshold.fixed.mahal", 23, 42, "'mahal'")]),
    ("{fixed: {energy: -3, maha: 40}, per_class: true}", None, False,
     [("threshold.per_class", 23, 55, "fixed thresholds")]),
    ("{fixed: {energy: -3, maha: high}}", None, False, [("threshold.fixed.maha", 23, 39, "'high'")]),
    ("{tpr: 0.95}", "energy > t.energy[class] or maha > t.maha", False,
     [("rule", 24, 17, "'t.energy[class]', but threshold.per_class is not true")]),
])
def test_threshold_errors_are_located(threshold, rule, validation, expected):
    assert errors(variant(threshold, rule, validation=validation)) == expected


def test_validation_sets_are_never_test_sets():
    text = variant("{fpr: 0.05, on: digits_val}", validation=True).replace(
        "{digitsdet: mixed, max_images: 50}", "{digitsdet: ood-near, max_images: 50}")
    assert errors(text) == [("data.ood_validation.digits_val", 17, 5, "the same data as data.ood.near (digitsdet: ood-near)")]
    same_file = variant("{fpr: 0.05, on: v}").replace(
        "  ood:\n", "  ood_validation:\n    v: {annotations: ./x/ood.json, images: y}\n  ood:\n").replace(
        "far:  {digitsdet: ood-far}", "far:  {annotations: x/ood.json, images: z}")
    assert [e[0] for e in errors(same_file)] == ["data.ood_validation.v"]


def test_unused_validation_set_is_a_warning():
    spec = load_spec_text(variant(validation=True))
    assert [(w.key_path, w.severity) for w in spec.warnings] == [("data.ood_validation.digits_val", "warning")]


def test_per_class_rules_with_certify_and_temporal():
    per_class = variant("{tpr: 0.95, per_class: true}", "energy > t.energy[class] or maha > t.maha")
    assert errors(per_class + "certify: {tap: penultimate, eps: 0.01}\n") == []  # each box's own class threshold
    video = per_class.replace("{digitsdet: val}", "{digitsdet: video-val}") + "temporal: {aggregate: ema}\n"
    assert errors(video) == [("rule", 24, 17, "'t.energy[class]'")]  # track thresholds are global


def test_temporal_needs_the_tpr_method():
    text = variant("{fixed: {energy: -3, maha: 40}}").replace("{digitsdet: val}", "{digitsdet: video-val}")
    text += "temporal: {aggregate: ema}\n"
    assert [e[:3] for e in errors(text)] == [("threshold.fixed", 23, 13)]


def test_fingerprint_changes_with_every_threshold_option():
    base = load_spec_text(variant(validation=True)).fingerprint()
    fprs = [load_spec_text(variant("{fpr: 0.05, on: digits_val}", validation=True)).fingerprint(),
            load_spec_text(variant("{fpr: 0.1, on: digits_val}", validation=True)).fingerprint()]
    moved = variant("{fpr: 0.05, on: digits_val}", validation=True).replace("max_images: 50}", "max_images: 60}")
    others = [
        load_spec_text(moved).fingerprint(),  # the validation set's data
        load_spec_text(variant("{tpr: 0.95, per_class: true}", validation=True)).fingerprint(),
        load_spec_text(variant("{fixed: {energy: -3.2, maha: 40}}", validation=True)).fingerprint(),
        load_spec_text(variant("{fixed: {energy: -3.1, maha: 40}}", validation=True)).fingerprint(),
    ]
    assert len({base, *fprs, *others}) == 7
    # an unused validation set does not matter to a tpr calibration
    assert load_spec_text(DEMO).fingerprint() == load_spec_text(variant(
        "{tpr: 0.95, detector_score: f1}", validation=True).replace("    far:  {digitsdet: ood-far}\n", "")
        .replace("  ood_validation:", "    far:  {digitsdet: ood-far}\n  ood_validation:")).fingerprint()
