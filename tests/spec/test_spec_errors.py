"""Malformed specs: every rejection is reported, located (key path, line, column), all at once.

Line numbers refer to tests/spec/fixtures/demo.yaml, which each case edits.
"""
import time
from pathlib import Path

import pytest

from certood.spec import SCORE_KINDS

from certood.errors import SpecError
from certood.spec import check_spec_file, check_spec_text, load_spec_text

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
RULE_LINE = 'rule: "energy > t.energy or maha > t.maha"\n'


def variant(old: str, new: str, text: str = DEMO) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def errors(text) -> list[tuple[str, int, int]]:
    _, issues = check_spec_text(text, "m.yaml")
    return [(i.key_path, i.line, i.column) for i in issues if i.severity == "error"]


BILLION_LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)

# (id, spec text or bytes, [(key path, line, column), ...] of every error expected)
CASES = [
    # --- reading: encoding, YAML syntax, document shape ---
    ("non-utf8", DEMO.encode().replace(b"{digitsdet: val}", b"{digitsdet: v\xe9l}"), [("", 11, 29)]),
    ("nul-char", variant("{digitsdet: val}", "{digitsdet: v\x00l}"), [("", 11, 29)]),
    ("syntax-missing-colon", variant("taps:\n", "taps\n"), [("", 17, 6)]),
    ("syntax-unclosed-flow", variant("{digitsdet: val}", "{digitsdet: val"), [("", 12, 10)]),
    ("empty-file", "", [("", 1, 1)]),
    ("comments-only", "# nothing here\n", [("", 1, 1)]),
    ("empty-document", "---\n", [("", 1, 1)]),
    ("list-document", "- version: 1\n", [("", 1, 1)]),
    ("scalar-document", "version 1\n", [("", 1, 1)]),
    ("two-documents", DEMO + "---\nversion: 1\n", [("", 26, 1)]),
    # --- reading: tags, anchors, aliases, keys ---
    ("python-tag", variant("version: 1", "version: !!python/object/apply:os.system [ls]"),
     [("version", 1, 10), ("version", 1, 10)]),  # the tag, and a list where 1 is expected
    ("local-tag", variant("arch: digits_fasterrcnn", "arch: !foo digits_fasterrcnn"), [("detector.arch", 4, 9)]),
    ("str-tag", variant("version: 1", "version: !!str 1"), [("version", 1, 10)]),
    ("anchor-alias", variant("  id_test:     {digitsdet: test}", "  id_test:     *cal")
     .replace("calibration: {", "calibration: &cal {"), [("data.calibration", 11, 16), ("data.id_test", 12, 16)]),
    ("billion-laughs", BILLION_LAUGHS, None),  # checked separately below
    ("duplicate-key", variant("  min_size: 128\n", "  min_size: 128\n  min_size: 64\n"), [("detector.min_size", 8, 3)]),
    ("bool-key", variant("    far:", "    true:"), [("data.ood", 15, 5)]),  # yes/no/on/off keys are names
    ("int-key", variant("taps:\n", "taps:\n  1: cls_logits\n"), [("taps", 17, 3)]),
    ("complex-key", variant("taps:\n", "taps:\n  ? [a, b]\n  : cls_logits\n"), [("taps", 17, 5)]),
    ("deep-nesting", variant("output: {dir: ../runs/demo}", "output: " + "[" * 70 + "]" * 70),
     [("", 25, 72)]),  # refused where the 65th level opens: reading stops there
    ("bad-int", variant("num_classes: 6", "num_classes: 0x_"), [("detector.num_classes", 6, 16)]),
    # --- schema: keys, types, ranges, choices ---
    ("unknown-top-key", variant("threshold:", "treshold:"), [("treshold", 23, 1)]),
    ("unknown-nested-key", variant("  weights:", "  wieghts:"), [("detector.wieghts", 5, 3)]),
    ("missing-taps", variant("taps:\n  roi: box_head.input\n  penultimate: box_head.output\n  logits: cls_logits\n", ""),
     [("taps", 1, 1)]),
    ("missing-calibration", variant("  calibration: {digitsdet: val}\n", ""), [("data.calibration", 9, 1)]),
    ("unsupported-version", variant("version: 1", "version: 2"), [("version", 1, 10)]),
    ("version-as-string", variant("version: 1", "version: '1'"), [("version", 1, 10)]),
    ("int-wrong-type", variant("num_classes: 6", "num_classes: six"), [("detector.num_classes", 6, 16)]),
    ("bool-is-not-int", variant("num_classes: 6", "num_classes: true"), [("detector.num_classes", 6, 16)]),
    ("int-out-of-range", variant("num_classes: 6", "num_classes: 1"), [("detector.num_classes", 6, 16)]),
    ("float-out-of-range", variant("tpr: 0.95", "tpr: 1.5"), [("threshold.tpr", 23, 18)]),
    ("float-not-finite", variant("temperature: 1.0", "temperature: .inf"), [("scores.energy.temperature", 21, 38)]),
    ("temperature-zero", variant("temperature: 1.0", "temperature: 0"), [("scores.energy.temperature", 21, 38)]),
    ("detector-score-bad", variant("detector_score: f1", "detector_score: f2"), [("threshold.detector_score", 23, 40)]),
    ("yaml11-on-is-bool", variant("weights: builtin:digits_fasterrcnn\n", "weights: builtin:digits_fasterrcnn\n  device: on\n"),
     [("detector.device", 6, 11)]),
    ("unknown-arch", variant("arch: digits_fasterrcnn", "arch: yolo"), [("detector.arch", 4, 9)]),
    ("weights-suffix", variant("weights: builtin:digits_fasterrcnn", "weights: model.onnx"), [("detector.weights", 5, 12)]),
    ("builtin-unknown", variant("weights: builtin:digits_fasterrcnn", "weights: builtin:resnet"), [("detector.weights", 5, 12)]),
    ("builtin-wrong-arch", variant("arch: digits_fasterrcnn", "arch: fasterrcnn_resnet50_fpn"), [("detector.weights", 5, 12)]),
    ("section-not-mapping", variant("threshold: {tpr: 0.95, detector_score: f1}", "threshold: 0.95"), [("threshold", 23, 12)]),
    ("null-section", variant("output: {dir: ../runs/demo}", "output:"), [("output", 25, 1)]),
    # --- data sources ---
    ("digitsdet-typo", variant("ood-near}", "ood-nera}"), [("data.ood.near.digitsdet", 14, 23)]),
    ("source-both", variant("{digitsdet: val}", "{digitsdet: val, annotations: a.json, images: im}"),
     [("data.calibration.annotations", 11, 33)]),
    ("source-neither", variant("{digitsdet: val}", "{max_images: 5}"), [("data.calibration", 11, 16)]),
    ("annotations-without-images", variant("{digitsdet: val}", "{annotations: a.json}"), [("data.calibration.images", 11, 3)]),
    ("max-images-zero", variant("max_images: 600", "max_images: 0"), [("data.fit.max_images", 10, 47)]),
    ("bad-ood-name", variant("    far:", "    far away:"), [("data.ood.far away", 15, 5)]),
    ("mahalanobis-without-fit", variant("  fit:         {digitsdet: train, max_images: 600}\n", ""), [("data.fit", 9, 1)]),
    # --- taps and scores ---
    ("empty-taps", variant("taps:\n  roi: box_head.input\n  penultimate: box_head.output\n  logits: cls_logits\n",
                           "taps: {}\n"), [("taps", 16, 7)]),
    ("unknown-tap-point", variant("roi: box_head.input", "roi: box_head.inputs"), [("taps.roi", 17, 8)]),
    ("unknown-score-kind", variant("kind: mahalanobis", "kind: mahalanobus"), [("scores.maha.kind", 22, 18)]),
    ("score-without-kind", variant("{kind: mahalanobis, tap: penultimate}", "{tap: penultimate}"), [("scores.maha", 22, 3)]),
    ("score-missing-tap", variant("{kind: mahalanobis, tap: penultimate}", "{kind: mahalanobis}"), [("scores.maha.tap", 22, 3)]),
    ("score-unknown-param", variant("temperature: 1.0", "temprature: 1.0"), [("scores.energy.temprature", 21, 25)]),
    ("param-of-other-kind", variant("{kind: mahalanobis, tap: penultimate}", "{kind: mahalanobis, tap: penultimate, temperature: 2}"),
     [("scores.maha.temperature", 22, 49)]),
    ("score-undefined-tap", variant("tap: penultimate", "tap: penultimat"), [("scores.maha.tap", 22, 36)]),
    ("energy-on-features-tap", variant("{tap: logits,", "{tap: roi,"), [("scores.energy.tap", 21, 17)]),
    ("score-name-not-identifier", variant("  maha:  ", "  ma-ha: ").replace("maha > t.maha", "energy > 1"),
     [("scores.ma-ha", 22, 3)]),
    ("score-named-t", variant("  maha:  ", "  t:     ").replace("or maha > t.maha", ""), [("scores.t", 22, 3)]),
    ("empty-scores", variant("scores:\n  energy: {tap: logits, temperature: 1.0}\n  maha:   {kind: mahalanobis, tap: penultimate}\n",
                             "scores: {}\n").replace(RULE_LINE, ""), [("scores", 20, 9)]),
    # --- the rule, located inside the string ---
    ("rule-undefined-name", variant("maha > t.maha", "mahal > t.maha"), [("rule", 24, 29)]),
    ("rule-undefined-threshold", variant("t.energy", "t.enrgy"), [("rule", 24, 17)]),
    ("rule-plain-scalar", variant(RULE_LINE, "rule: energy > t.energy or mah > t.maha\n"), [("rule", 24, 28)]),
    ("rule-single-quoted", variant(RULE_LINE, "rule: 'energy > t.energy or mah > t.maha'\n"), [("rule", 24, 29)]),
    ("rule-syntax", variant("energy > t.energy or", "energy > t.energy or or"), [("rule", 24, 29)]),
    ("rule-bad-char", variant("energy > t.energy", "energy == t.energy"), [("rule", 24, 15)]),
    ("rule-unclosed-paren", variant('"energy > t.energy or maha > t.maha"', '"(energy > t.energy"'), [("rule", 24, 26)]),
    ("rule-type-number", variant("energy > t.energy or maha > t.maha", "energy + t.energy"), [("rule", 24, 8)]),
    ("rule-type-and-of-number", variant("energy > t.energy or", "energy or"), [("rule", 24, 8)]),
    ("rule-not-string", variant(RULE_LINE, "rule: 3\n"), [("rule", 24, 7)]),
    ("rule-empty", variant(RULE_LINE, 'rule: ""\n'), [("rule", 24, 8)]),
    ("rule-constant", variant('"energy > t.energy or maha > t.maha"', '"1 > 0"'), [("rule", 24, 8)]),
    ("rule-block-scalar", variant(RULE_LINE, "rule: |\n  energy > t.energy or mah > t.maha\n"), [("rule", 24, 7)]),
    ("rule-escapes", variant(RULE_LINE, 'rule: "energy > t.energy or\\tmah > t.maha"\n'), [("rule", 24, 7)]),
    # --- per-class thresholds in the rule ---
    ("rule-class-unclosed", variant("t.energy or", "t.energy[class or"), [("rule", 24, 32)]),
    ("rule-class-wrong-word", variant("t.energy", "t.energy[cls]"), [("rule", 24, 26)]),
    ("rule-class-on-score", variant('"energy > t.energy', '"energy[class] > t.energy'), [("rule", 24, 14)]),
    ("rule-class-undefined", variant("t.maha", "t.mah[class]"), [("rule", 24, 36)]),
    ("rule-class-without-per-class", variant("t.maha", "t.maha[class]"), [("rule", 24, 36)]),
    ("rule-class-with-temporal", variant("t.maha", "t.maha[class]").replace("{tpr: 0.95,", "{tpr: 0.95, per_class: true,")
     .replace("{digitsdet: val}", "{digitsdet: video-val}") + "temporal: {aggregate: max}\n", [("rule", 24, 36)]),
    # --- consistency (z3): rules that never or always flag ---
    ("rule-never-flags", variant("energy > t.energy or maha > t.maha", "maha < 0 and energy > t.energy"), [("rule", 24, 8)]),
    ("rule-always-flags", variant("energy > t.energy or maha > t.maha", "maha >= 0 or energy > t.energy"),
     [("rule", 24, 8)]),
    ("rule-contradiction", variant("or maha > t.maha", "and energy < t.energy - 1"), [("rule", 24, 8)]),
    # --- thresholds and OOD validation data ---
    ("threshold-two-methods", variant("{tpr: 0.95,", "{tpr: 0.95, fixed: {energy: 1, maha: 2},"), [("threshold.fixed", 23, 24)]),
    ("threshold-fpr-without-on", variant("{tpr: 0.95,", "{fpr: 0.05,"), [("threshold.on", 23, 1)]),
    ("threshold-fpr-on-test-set", variant("{tpr: 0.95,", "{fpr: 0.05, on: far,"), [("threshold.on", 23, 28)]),
    ("threshold-fpr-on-unknown", variant("{tpr: 0.95,", "{fpr: 0.05, on: val,"), [("threshold.on", 23, 28)]),
    ("ood-validation-is-test-data", variant("  ood:\n", "  ood_validation: {v: {digitsdet: ood-far}}\n  ood:\n")
     .replace("{tpr: 0.95,", "{fpr: 0.05, on: v,"), [("data.ood_validation.v", 13, 20)]),
    ("threshold-fixed-missing-score", variant("{tpr: 0.95,", "{fixed: {energy: -3},"), [("threshold.fixed", 23, 20)]),
    ("threshold-fixed-unknown-score", variant("{tpr: 0.95,", "{fixed: {energy: -3, maha: 9, knn: 1},"),
     [("threshold.fixed.knn", 23, 42)]),
    ("threshold-fixed-per-class", variant("{tpr: 0.95,", "{fixed: {energy: -3, maha: 9}, per_class: true,"),
     [("threshold.per_class", 23, 54)]),
    ("threshold-per-class-not-bool", variant("{tpr: 0.95,", "{tpr: 0.95, per_class: 1,"), [("threshold.per_class", 23, 35)]),
    # --- extends ---
    ("extends-not-a-string", "extends: 3\n" + DEMO, [("extends", 1, 10)]),
    ("extends-empty", "extends: ''\n" + DEMO, [("extends", 1, 10)]),
    ("extends-missing-file", "extends: no-such-parent.yaml\n" + DEMO, [("extends", 1, 10)]),
    # --- several independent errors in one file are all reported ---
    ("three-errors", variant("version: 1", "version: 7").replace("min_size: 128", "min_size: big")
     .replace("t.maha", "t.mah"), [("version", 1, 10), ("detector.min_size", 7, 13), ("rule", 24, 36)]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES if c[2] is not None],
                         ids=[c[0] for c in CASES if c[2] is not None])
def test_malformed_spec_is_located(text, expected):
    assert sorted(errors(text)) == sorted(expected)
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "m.yaml")
    assert len(info.value.issues) == len(expected)
    assert all(str(i).startswith(f"m.yaml:{i.line}:{i.column}:") for i in info.value.issues)


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


def test_billion_laughs_is_rejected_fast():
    start = time.perf_counter()
    _, issues = check_spec_text(BILLION_LAUGHS, "bomb.yaml")
    # a hang guard, not a speed test: expanding the bomb would take minutes and gigabytes
    assert time.perf_counter() - start < 10
    found = [i.found for i in issues]
    assert [f for f in found if f.startswith("anchor")] == [f"anchor &a{i}" for i in range(10)]
    assert [f for f in found if f.startswith("alias")] == [f"alias *a{i}" for i in range(9)]


def test_messages_say_expected_found_and_hint():
    def issue(text):
        _, (first, *_) = check_spec_text(text, "m.yaml")
        return first

    dup = issue(variant("  min_size: 128\n", "  min_size: 128\n  min_size: 64\n"))
    assert "line 7, column 3" in dup.found and "line 8" not in dup.found and (dup.line, dup.column) == (8, 3)
    typo = issue(variant("  weights:", "  wieghts:"))
    assert typo.hint == "did you mean 'weights'?" and "weights" in typo.expected and "arch" in typo.expected
    kind = issue(variant("kind: mahalanobis", "kind: mahalanobus"))
    assert kind.expected == "one of: " + ", ".join(SCORE_KINDS) and kind.hint == "did you mean 'mahalanobis'?"
    split = issue(variant("ood-near}", "ood_near}"))
    assert split.expected.startswith("one of: train, val, test, ood-near, ood-far, mixed")
    point = issue(variant("roi: box_head.input", "roi: box_head"))
    assert point.expected == ("one of: box_head.input, box_head.output, cls_logits, box_jitter.logits, head.input, "
                              "head.cls_features")
    tap = issue(variant("tap: penultimate", "tap: penultimat"))
    assert "roi, penultimate, logits" in tap.expected and tap.hint == "did you mean 'penultimate'?"
    boolean = issue(variant("{digitsdet: val}", "{digitsdet: off}"))
    assert boolean.found == "boolean false"
    device = issue(variant("  max_size: 128\n", "  max_size: 128\n  device: no\n"))
    assert device.found == "boolean false"
    tag = issue(variant("version: 1", "version: !!python/name:os.system 1"))
    assert tag.found == "tag !!python/name:os.system"
    version = issue(variant("version: 1", "version: 2"))
    assert version.expected == "one of: 1" and version.found == "integer 2"
    energy = issue(variant("{tap: logits,", "{tap: roi,"))
    assert "cls_logits" in energy.expected and energy.hint == "taps at logits points: logits"
    rule = issue(variant("t.energy", "t.enrgy"))
    assert rule.found == "'t.enrgy'" and rule.hint == "did you mean 'energy'?"


def test_check_spec_file_reports_errors_and_warnings(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(variant("maha > t.maha", "energy > 0").replace("version: 1", "version: 9"))
    issues = check_spec_file(path)
    assert [(i.key_path, i.severity) for i in issues] == [("version", "error"), ("scores.maha", "warning")]
    assert all(i.file == str(path) for i in issues)
