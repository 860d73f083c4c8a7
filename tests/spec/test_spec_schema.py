"""json_schema() is a valid draft 2020-12 schema that agrees with the loader."""
from pathlib import Path

import jsonschema
import pytest
import yaml

from certood.spec import check_spec_text, json_schema

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
RULE_LINE = 'rule: "energy > t.energy or maha > t.maha"\n'


def variant(old: str, new: str) -> str:
    assert DEMO.count(old) == 1, old
    return DEMO.replace(old, new)


def schema_accepts(text: str) -> bool:
    return jsonschema.Draft202012Validator(json_schema()).is_valid(yaml.safe_load(text))


def loader_accepts(text: str) -> bool:
    return not any(i.severity == "error" for i in check_spec_text(text)[1])


def test_schema_is_valid_draft_2020_12():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert json_schema() == schema and json_schema() is not schema  # fresh, deterministic


def test_records_forbid_additional_properties_everywhere():
    def records(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "propertyNames" not in node:
                yield node
            for value in node.values():
                yield from records(value)
        elif isinstance(node, list):
            for value in node:
                yield from records(value)

    found = list(records(json_schema()))
    assert len(found) > 8 and all(r["additionalProperties"] is False for r in found)


def test_demo_validates_and_unknown_key_fails():
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.validate(yaml.safe_load(DEMO))
    assert not validator.is_valid(yaml.safe_load(DEMO + "colour: blue\n"))
    assert not validator.is_valid(yaml.safe_load(variant("  weights:", "  wieghts:")))


VALID = [
    DEMO,
    variant('rule: "energy > t.energy or maha > t.maha"\n', ""),
    variant("{digitsdet: val}", "{annotations: a.json, images: img, max_images: 3}"),
    variant("maha:   {kind: mahalanobis,", "mahalanobis: {").replace(RULE_LINE, ""),
    variant("energy: {tap: logits,", "e2: {kind: energy, tap: logits,").replace(RULE_LINE, ""),
    variant("detector_score: f1", "detector_score: 0.5"),
    variant("  max_size: 128\n", "  max_size: 128\n  device: auto\n  score_thresh: 0\n"),
]

INVALID = [
    variant("version: 1", "version: 2"),
    variant("arch: digits_fasterrcnn", "arch: yolo"),
    variant("weights: builtin:digits_fasterrcnn", "weights: model.onnx"),
    variant("num_classes: 6", "num_classes: 1"),
    variant("num_classes: 6", "num_classes: true"),
    variant("tpr: 0.95", "tpr: 1"),
    variant("detector_score: f1", "detector_score: 1.5"),
    variant("temperature: 1.0", "temperature: 0"),
    variant("{digitsdet: val}", "{digitsdet: val, annotations: a.json, images: img}"),
    variant("{digitsdet: val}", "{digitsdet: val, images: img}"),
    variant("{digitsdet: val}", "{annotations: a.json}"),
    variant("{digitsdet: val}", "{max_images: 3}"),
    variant("  calibration: {digitsdet: val}\n", ""),
    variant("{kind: mahalanobis, tap: penultimate}", "{tap: penultimate}"),
    variant("{kind: mahalanobis, tap: penultimate}", "{kind: knnn, tap: penultimate}"),
    variant("{kind: mahalanobis, tap: penultimate}", "{kind: mahalanobis, tap: penultimate, temperature: 1}"),
    variant("  maha:  ", "  ma-ha: "),
    variant("roi: box_head.input", "roi: box_head"),
    variant("    far:", "    far away:"),
    variant("output: {dir: ../runs/demo}", "output: {dir: ../runs/demo, format: json}"),
]


@pytest.mark.parametrize("text", VALID)
def test_schema_and_loader_accept_the_same_valid_specs(text):
    assert loader_accepts(text) and schema_accepts(text)


@pytest.mark.parametrize("text", INVALID)
def test_schema_and_loader_reject_the_same_invalid_specs(text):
    assert not loader_accepts(text) and not schema_accepts(text)
