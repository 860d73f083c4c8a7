"""`extends`: merge rules, positions in the parent's file, cycles, missing files, paths."""
from pathlib import Path

import pytest

from certood.errors import SpecError
from certood.spec import check_spec_file, check_spec_text, load_spec, load_spec_text
from certood.spec.extends import MAX_EXTENDS

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
REPO = Path(__file__).resolve().parents[2]

BASE = """\
version: 1
detector:
  kind: torchvision
  arch: digits_fasterrcnn
  weights: weights/det.safetensors
  num_classes: 6
data:
  fit:         {digitsdet: train}
  calibration: {digitsdet: val}
  ood:
    near: {digitsdet: ood-near}
    far:  {digitsdet: ood-far}
taps: {penultimate: box_head.output, logits: cls_logits}
scores:
  energy: {tap: logits, temperature: 2.0}
  maha:   {kind: mahalanobis, tap: penultimate}
threshold: {tpr: 0.9, detector_score: 0.5}
gate:
  - {metric: auroc, op: ">=", value: 0.8}
"""


def issues(path: Path) -> list[tuple[str, str, int, int]]:
    return [(Path(i.file).name, i.key_path, i.line, i.column) for i in check_spec_file(path) if i.severity == "error"]


def test_child_merges_over_parent(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\n"
        "detector: {min_size: 128}\n"                      # merged into the mapping
        "data: {ood: {near: null}}\n"                      # null removes an inherited key
        "scores: {energy: {temperature: 1.0}}\n"           # a nested override
        "gate: [{metric: fpr95, op: '<=', value: 0.5}]\n"  # lists replace
    )
    spec = load_spec(tmp_path / "child.yaml")
    assert spec.detector.min_size == 128 and spec.detector.num_classes == 6 and spec.detector.arch == "digits_fasterrcnn"
    assert set(spec.data.ood) == {"far"}
    assert spec.scores["energy"].params == {"temperature": 1.0} and spec.scores["maha"].kind == "mahalanobis"
    assert [p.metric for p in spec.gate] == ["fpr95"] and spec.gate[0].file.endswith("child.yaml")
    assert spec.threshold.tpr == 0.9 and spec.threshold.detector_score == 0.5
    assert "extends" not in spec.raw


def test_paths_are_relative_to_the_file_they_are_written_in(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base.yaml").write_text(BASE + "output: {dir: runs}\n")
    (tmp_path / "child.yaml").write_text("extends: base/base.yaml\ndata: {calibration: {annotations: a.json, images: im}}\n")
    spec = load_spec(tmp_path / "child.yaml")
    assert spec.detector.weights == str(tmp_path / "base" / "weights" / "det.safetensors")
    assert spec.output.dir == tmp_path / "base" / "runs"
    assert spec.data.calibration.annotations == tmp_path / "a.json"  # the child's own path
    assert spec.data.calibration.digitsdet is None  # the child's choice of source form replaces the parent's


def test_choices_replace_the_parents_choice(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\n"
        "threshold: {fixed: {energy: -3, maha: 40}}\n"   # drops the inherited tpr, keeps detector_score
        "scores: {maha: {kind: knn, tap: penultimate}}\n"  # another kind: the whole entry
    )
    spec = load_spec(tmp_path / "child.yaml")
    assert spec.threshold.method == "fixed" and spec.threshold.tpr is None and spec.threshold.detector_score == 0.5
    assert spec.scores["maha"].kind == "knn" and spec.scores["maha"].params == {"k": 50}


def test_fingerprint_of_merged_spec_equals_the_standalone_one(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nthreshold: {tpr: 0.95}\n")
    (tmp_path / "flat.yaml").write_text(BASE.replace("{tpr: 0.9,", "{tpr: 0.95,"))
    child, flat = load_spec(tmp_path / "child.yaml"), load_spec(tmp_path / "flat.yaml")
    assert child.fingerprint() == flat.fingerprint()
    assert child.fingerprint() != load_spec(tmp_path / "base.yaml").fingerprint()


def test_errors_in_the_parent_are_located_in_the_parent(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE.replace("temperature: 2.0", "temperature: 0"))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ndetector: {min_size: 0}\n")
    assert issues(tmp_path / "child.yaml") == [
        ("child.yaml", "detector.min_size", 2, 22),
        ("base.yaml", "scores.energy.temperature", 15, 38),
    ]


def test_a_rule_and_gate_inherited_from_the_parent_are_located_there(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE + 'rule: "energy > t.energy or mahal > t.maha"\n')
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ngate:\n  - {metric: auroc, op: '>=', value: 0.9}\n"
                                         "  - {metric: auroc, op: '<=', value: 0.5}\n")
    assert issues(tmp_path / "child.yaml") == [("child.yaml", "gate[1]", 4, 5), ("base.yaml", "rule", 20, 29)]


def test_a_parent_that_is_not_yaml_is_reported_at_the_extends_line_with_its_position(tmp_path):
    (tmp_path / "base.yaml").write_text("version: 1\ndata: {calibration: {digitsdet: val}\n")
    (tmp_path / "child.yaml").write_text("version: 1\nextends: base.yaml\n")
    (issue,) = [i for i in check_spec_file(tmp_path / "child.yaml") if i.severity == "error"]
    assert (Path(issue.file).name, issue.key_path, issue.line, issue.column) == ("child.yaml", "extends", 2, 10)
    assert issue.found == "'base.yaml', which is not valid YAML (line 3, column 1)"
    assert issue.hint == f"certood validate {tmp_path / 'base.yaml'} shows why"


def test_yaml_errors_inside_a_parent_mapping_stay_in_the_parent(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE.replace("version: 1", "version: &v 1"))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\n")
    assert issues(tmp_path / "child.yaml") == [("base.yaml", "version", 1, 10)]


@pytest.mark.parametrize("files, expected", [
    ({"a.yaml": "extends: a.yaml\nversion: 1\n"}, "a cycle: {d}/a.yaml -> {d}/a.yaml"),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "a cycle: {d}/a.yaml -> {d}/b.yaml -> {d}/a.yaml"),
    ({"a.yaml": "extends: sub/b.yaml\n", "sub/b.yaml": "extends: ../a.yaml\n"},
     "a cycle: {d}/a.yaml -> {d}/sub/b.yaml -> {d}/a.yaml"),
])
def test_cycles_are_reported_with_the_chain(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (issue,) = check_spec_file(tmp_path / "a.yaml")
    assert issue.found == expected.format(d=tmp_path) and issue.key_path == "extends"
    assert issue.expected == "a chain of extends without a cycle"


def test_missing_parent_and_bad_values(tmp_path):
    (tmp_path / "a.yaml").write_text("version: 1\nextends: nope.yaml\n")
    (issue,) = check_spec_file(tmp_path / "a.yaml")
    assert (issue.line, issue.column, issue.expected) == (2, 10, "a readable spec file to extend")
    assert issue.found.startswith("'nope.yaml': ") and issue.hint == "the path is relative to this file"
    for value, found in (("3", "integer 3"), ("[a.yaml]", "a list"), ('""', "an empty string"), ("", "nothing (null)")):
        _, (issue,) = check_spec_text(f"extends: {value}\n", "m.yaml", tmp_path)
        assert (issue.key_path, issue.found) == ("extends", found)
    (tmp_path / "dir.yaml").mkdir()
    _, (issue,) = check_spec_text("extends: dir.yaml\n", "m.yaml", tmp_path)
    assert issue.expected == "a readable spec file to extend"


def test_long_chains_stop(tmp_path):
    for i in range(MAX_EXTENDS + 3):
        (tmp_path / f"s{i}.yaml").write_text(f"extends: s{i + 1}.yaml\n")
    (issue,) = [i for i in check_spec_file(tmp_path / "s0.yaml") if i.severity == "error"]
    assert issue.expected == f"at most {MAX_EXTENDS} files in a chain of extends"


def test_in_memory_text_resolves_against_base_dir(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    spec = load_spec_text("extends: base.yaml\n", "m.yaml", base_dir=tmp_path)
    assert spec.threshold.tpr == 0.9
    with pytest.raises(SpecError, match="m.yaml:1:10: extends"):
        load_spec_text("extends: base.yaml\n", "m.yaml", base_dir=tmp_path / "elsewhere")


def test_example_specs_extend_the_shared_base():
    for name in ("logits", "feature_distance", "density", "abstraction", "part_based"):
        spec = load_spec(REPO / "specs" / f"{name}.yaml")
        assert spec.detector.arch == "digits_fasterrcnn" and spec.data.calibration.digitsdet == "val"
        assert spec.output.dir == REPO / "runs" / name
