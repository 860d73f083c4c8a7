"""Snapshots of `certood validate` for the newer spec features: exit code and every message,
exactly as a person reads them (per-class rules, z3 consistency, thresholds, extends)."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from certood.cli import main

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
RULE = 'rule: "energy > t.energy or maha > t.maha"'
THRESHOLD = "threshold: {tpr: 0.95, detector_score: f1}"

# (id, {file: text}, file to validate, exit code, output)
SNAPSHOTS = [
    ("rule-class-unclosed", {"m.yaml": DEMO.replace(RULE, 'rule: "energy > t.energy[class or maha > t.maha"')}, "m.yaml", 2,
     "m.yaml:24:32: rule: expected ']', found 'or'\n"),
    ("rule-class-keyword", {"m.yaml": DEMO.replace(RULE, 'rule: "energy > t.energy[cls] or maha > t.maha"')}, "m.yaml", 2,
     "m.yaml:24:26: rule: expected 'class' (t.energy[class] is the threshold of the box's predicted class), "
     "found 'cls'\n"),
    ("rule-class-on-a-score", {"m.yaml": DEMO.replace(RULE, 'rule: "energy[class] > t.energy or maha > t.maha"')}, "m.yaml", 2,
     "m.yaml:24:14: rule: expected an operator or the end of the rule, found '[' "
     "(hint: only thresholds are per class: write t.energy[class])\n"),
    ("rule-class-needs-per-class", {"m.yaml": DEMO.replace(RULE, 'rule: "energy > t.energy or maha > t.maha[class]"')},
     "m.yaml", 2,
     "m.yaml:24:36: rule: expected t.NAME[class] with per-class thresholds calibrated, found 't.maha[class]', but "
     "threshold.per_class is not true (hint: set threshold: {per_class: true}, or use t.maha)\n"),
    ("rule-never-flags", {"m.yaml": DEMO.replace(RULE, 'rule: "maha < 0 and energy > t.energy"')}, "m.yaml", 2,
     "m.yaml:24:8: rule: expected a rule that can flag some box, found 'maha < 0 and energy > t.energy', which no "
     "value in the scores' ranges satisfies: the rule never flags (hint: check the comparisons' directions and "
     "constants; assumed: maha >= 0, and each threshold within its score's range)\n"),
    ("rule-always-flags", {"m.yaml": DEMO.replace(RULE, 'rule: "energy > t.energy or energy <= t.energy + maha"')},
     "m.yaml", 2,
     "m.yaml:24:8: rule: expected a rule that can leave some box unflagged, found 'energy > t.energy or energy <= "
     "t.energy + maha', which every value in the scores' ranges satisfies: the rule always flags (hint: check the "
     "comparisons' directions and constants; assumed: maha >= 0, and each threshold within its score's range)\n"),
    ("rule-redundant-clause", {"m.yaml": DEMO.replace(RULE, 'rule: "energy > t.energy or maha > t.maha or energy > t.energy + 1"')},
     "m.yaml", 0,
     "warning: m.yaml:24:46: rule: expected a disjunct that can change the flag, found 'energy > t.energy + 1', which "
     "the rest of the rule covers whenever it holds (hint: it never changes the flag: remove it, or fix its "
     "comparison)\n1 spec(s) valid\n"),
    ("rule-implied-conjunct", {"m.yaml": DEMO.replace(RULE, 'rule: "maha > t.maha and maha >= 0"')}, "m.yaml", 0,
     "warning: m.yaml:21:3: scores.energy: expected a score the rule reads, found score 'energy' unused by the rule "
     "(hint: use it in rule, or remove it)\n"
     "warning: m.yaml:24:26: rule: expected a conjunct that can change the flag, found 'maha >= 0', which always "
     "holds in the scores' ranges (hint: it never changes the flag: remove it, or fix its comparison)\n"
     "1 spec(s) valid\n"),
    ("threshold-fpr-on-a-test-set", {"m.yaml": DEMO.replace(THRESHOLD, "threshold: {fpr: 0.05, on: far}")}, "m.yaml", 2,
     "m.yaml:23:28: threshold.on: expected a set of data.ood_validation (the spec defines none), found 'far', an OOD "
     "test set of data.ood (hint: thresholds are never set on test data: add a separate set under "
     "data.ood_validation)\n"),
    ("threshold-fixed-typo", {"m.yaml": DEMO.replace(THRESHOLD, "threshold: {fixed: {energy: -3, mahal: 9}}")}, "m.yaml", 2,
     "m.yaml:23:33: threshold.fixed.mahal: expected a score defined under scores (one of: energy, maha), found "
     "'mahal' (hint: did you mean 'maha'?)\n"),
    ("extends-cycle", {"a.yaml": "extends: b.yaml\nversion: 1\n", "b.yaml": "extends: a.yaml\n"}, "a.yaml", 2,
     "b.yaml:1:10: extends: expected a chain of extends without a cycle, found a cycle: a.yaml -> b.yaml -> a.yaml "
     "(hint: remove one of the extends)\n"),
    ("extends-missing", {"a.yaml": "extends: missing.yaml\n"}, "a.yaml", 2,
     "a.yaml:1:10: extends: expected a readable spec file to extend, found 'missing.yaml': No such file or directory "
     "(hint: the path is relative to this file)\n"),
    ("extends-error-in-parent", {"base/demo.yaml": DEMO.replace("temperature: 1.0", "temperature: 0"),
                                 "m.yaml": "extends: base/demo.yaml\ndetector: {min_size: 0}\n"}, "m.yaml", 2,
     "m.yaml:2:22: detector.min_size: expected an integer >= 1 and <= 100000, found integer 0\n"
     "base/demo.yaml:21:38: scores.energy.temperature: expected a number > 0, found integer 0\n"),
    ("extends-yaml-error-in-parent", {"p.yaml": "version: 1\ndata: {calibration: [\n", "m.yaml": "extends: p.yaml\n"},
     "m.yaml", 2, "m.yaml:1:10: extends: expected a spec file (a YAML mapping) to extend, found 'p.yaml', "
     "which is not valid YAML (line 3, column 1) (hint: certood validate p.yaml shows why)\n"),
    ("fusion-reads-its-components", {"m.yaml": DEMO.replace(
        "  maha:   {kind: mahalanobis, tap: penultimate}\n",
        "  maha:   {kind: mahalanobis, tap: penultimate}\n  fz: {kind: fusion, tap: logits, of: [energy, maha]}\n")
        .replace(RULE, 'rule: "fz > t.fz"')}, "m.yaml", 0, "1 spec(s) valid\n"),
    ("fusion-unknown-component", {"m.yaml": DEMO.replace(
        "  maha:   {kind: mahalanobis, tap: penultimate}\n",
        "  maha:   {kind: mahalanobis, tap: penultimate}\n  fz: {kind: fusion, tap: logits, of: [energy, mahal]}\n")
        .replace(RULE, 'rule: "fz > t.fz"')}, "m.yaml", 2,
     "warning: m.yaml:22:3: scores.maha: expected a score the rule reads, found score 'maha' unused by the rule "
     "(hint: use it in rule, or remove it)\n"
     "m.yaml:23:48: scores.fz.of[1]: expected the name of a score of this spec (one of: energy, maha), found "
     "'mahal' (hint: did you mean 'maha'?)\n"),
]


@pytest.mark.parametrize("files, target, code, output", [s[1:] for s in SNAPSHOTS], ids=[s[0] for s in SNAPSHOTS])
def test_validate_snapshot(tmp_path, monkeypatch, files, target, code, output):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["validate", target])
    assert (result.exit_code, result.output) == (code, output)
