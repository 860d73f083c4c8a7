"""specs/: the README's key reference is generated from the v1 table; every example spec
validates (CLI exit 0) and agrees with `certood schema`."""
import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from certood.cli import main
from certood.spec import SCORE_KIND_TABLE, json_schema, load_spec
from certood.spec.docs import BEGIN, END, generated_section, render_reference
from certood.spec.extends import read_spec_document
from certood.spec.source import read_yaml

SPECS = Path(__file__).resolve().parents[2] / "specs"
EXAMPLES = sorted(SPECS.glob("*.yaml"))
FAMILIES = {  # score family -> example spec
    "logits": {"energy", "msp", "entropy"},
    "feature_distance": {"mahalanobis", "knn"},
    "density": {"lared"},
    "abstraction": {"box_abstraction", "activation_pattern"},
    "part_based": {"particul"},
    "detection_fusion": {"fusion", "lared"},
}


def test_readme_reference_is_generated_from_the_table():
    text = (SPECS / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert generated_section(text) == render_reference(), \
        "specs/README.md is stale: run `python -m certood.spec.docs specs/README.md`"


def test_reference_lists_every_key_and_score_kind():
    reference = render_reference()
    for key in ("extends", "threshold.fpr", "threshold.on", "threshold.fixed", "threshold.per_class",
                "data.ood_validation", "gate[].metric", "temporal.certified.k"):
        assert f"| `{key}` |" in reference, key
    for kind in SCORE_KIND_TABLE:
        assert f"| `{kind}` |" in reference, kind
    assert "| `entropy` | logits | no | [0, log C] |" in reference


def test_validate_exits_0_on_every_example():
    result = CliRunner().invoke(main, ["validate", *map(str, EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output


@pytest.mark.parametrize("name, kinds", FAMILIES.items())
def test_one_example_per_score_family(name, kinds):
    spec = load_spec(SPECS / f"{name}.yaml")
    assert {s.kind for s in spec.scores.values()} >= kinds
    assert spec.warnings == ()


def test_schema_command_prints_json_schema():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0 and json.loads(result.output) == json.loads(json.dumps(json_schema()))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_schema_validates_every_example(path):
    validator = jsonschema.Draft202012Validator(json_schema())
    as_written = read_yaml(path.read_bytes(), path.name).value  # YAML read the way certood reads it
    validator.validate(as_written)
    merged, _ = read_spec_document(path.read_bytes(), path.name, path.parent)
    validator.validate(merged.value)  # after extends: the complete schema applies
    broken = {**merged.value, "colour": "blue"}
    assert not validator.is_valid(broken)


def test_schema_of_a_spec_with_extends_checks_types_not_completeness():
    validator = jsonschema.Draft202012Validator(json_schema())
    assert validator.is_valid({"extends": "base.yaml", "detector": {"min_size": 64}})
    assert not validator.is_valid({"extends": "base.yaml", "detector": {"min_size": "big"}})
    assert not validator.is_valid({"detector": {"min_size": 64}})  # without extends: complete specs only
    assert not validator.is_valid({"extends": "base.yaml", "threshold": {"tpr": 0.9, "fixed": {"e": 1.0}}})
