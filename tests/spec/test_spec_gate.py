"""Gate policies in a spec (`gate:`) and in a policy file: strict, located, all errors at once."""
from pathlib import Path

import jsonschema
import pytest
import yaml

from certood.errors import SpecError
from certood.spec import check_spec_text, load_spec_text
from certood.spec.loader import check_policy_text, load_policy_file
from certood.spec.model import GatePolicy
from certood.spec.policy import GateNames, targets
from certood.spec.v1 import GATE_METRIC_TABLE, json_schema

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
GATE_LINE = DEMO.count("\n") + 2  # the first policy of a `gate:` block appended to DEMO


def with_gate(*policies: str, text: str = DEMO) -> str:
    return text + "gate:\n" + "".join(f"  - {p}\n" for p in policies)


def errors(text: str) -> list[tuple[str, int, int]]:
    _, issues = check_spec_text(text, "m.yaml")
    return [(i.key_path, i.line, i.column) for i in issues if i.severity == "error"]


def issue_text(text: str) -> str:
    _, issues = check_spec_text(text, "m.yaml")
    return "\n".join(str(i) for i in issues if i.severity == "error")


AUROC = '{metric: auroc, score: energy, dataset: near, op: ">=", value: 0.85}'


def test_gate_policies_load_with_their_position():
    spec = load_spec_text(with_gate(
        AUROC,
        '{metric: fpr95, baseline: {max_rise: 0.05}, warn: 0.01, name: "FPR95 may not regress"}',
        '{metric: map50, op: ">", value: 0.5}',
    ), "m.yaml")
    assert spec.gate == (
        GatePolicy("auroc", ">=", 0.85, "energy", "near", file="m.yaml", line=GATE_LINE, column=5),
        GatePolicy("fpr95", max_rise=0.05, warn=0.01, name="FPR95 may not regress", file="m.yaml",
                   line=GATE_LINE + 1, column=5),
        GatePolicy("map50", ">", 0.5, file="m.yaml", line=GATE_LINE + 2, column=5),
    )
    assert [p.describe() for p in spec.gate] == [
        "auroc[energy] on near >= 0.85", "fpr95 vs baseline, max_rise 0.05", "map50 > 0.5"]
    assert spec.gate[1].is_baseline and not spec.gate[0].is_baseline


def test_a_spec_without_gate_has_no_policies_and_gate_does_not_change_the_fingerprint():
    plain = load_spec_text(DEMO)
    gated = load_spec_text(with_gate(AUROC))
    assert plain.gate == () and len(gated.gate) == 1
    assert plain.fingerprint() == gated.fingerprint()


L = GATE_LINE
# (id, policies, [(key path, index of the policy, the text the error points at), ...] of every error)
CASES = [
    ("unknown-metric", ['{metric: auc, op: ">=", value: 0.9}'], [("gate[0].metric", 0, "auc")]),
    ("bad-op", ['{metric: auroc, op: "=>", value: 0.9}'], [("gate[0].op", 0, '"=>"')]),
    ("value-above-1", ['{metric: auroc, op: ">=", value: 1.5}'], [("gate[0].value", 0, "1.5")]),
    ("value-not-a-number", ['{metric: auroc, op: ">=", value: high}'], [("gate[0].value", 0, "high")]),
    ("op-without-value", ['{metric: auroc, op: ">="}'], [("gate[0].value", 0, "{")]),
    ("neither-op-nor-baseline", ["{metric: auroc}"], [("gate[0]", 0, "{")]),
    ("op-and-baseline", ['{metric: auroc, op: ">=", value: 0.9, baseline: {max_drop: 0.1}}'],
     [("gate[0].baseline", 0, "baseline")]),
    ("baseline-both-limits", ["{metric: auroc, baseline: {max_drop: 0.1, max_rise: 0.1}}"],
     [("gate[0].baseline.max_rise", 0, "max_rise")]),
    ("baseline-wrong-direction", ["{metric: fpr95, baseline: {max_drop: 0.1}}"],
     [("gate[0].baseline.max_drop", 0, "max_drop")]),
    ("baseline-wrong-direction-map", ["{metric: map, baseline: {max_rise: 0.1}}"],
     [("gate[0].baseline.max_rise", 0, "max_rise")]),
    ("unknown-key", ['{metric: auroc, op: ">=", value: 0.9, colour: red}'], [("gate[0].colour", 0, "colour")]),
    ("unknown-score", ['{metric: auroc, score: enrgy, op: ">=", value: 0.9}'], [("gate[0].score", 0, "enrgy")]),
    ("score-rule", ['{metric: auroc, score: rule, op: ">=", value: 0.9}'], [("gate[0].score", 0, "rule")]),
    ("score-on-rule-metric", ['{metric: rule_id_tpr, score: energy, op: ">=", value: 0.9}'],
     [("gate[0].score", 0, "score")]),
    ("score-on-map", ['{metric: map, score: energy, op: ">=", value: 0.5}'], [("gate[0].score", 0, "score")]),
    ("unknown-dataset", ['{metric: auroc, dataset: farr, op: ">=", value: 0.9}'],
     [("gate[0].dataset", 0, "farr")]),
    ("id_test-for-ood-metric", ['{metric: auroc, dataset: id_test, op: ">=", value: 0.9}'],
     [("gate[0].dataset", 0, "id_test")]),
    ("ood-set-for-map", ['{metric: map, dataset: near, op: ">=", value: 0.5}'], [("gate[0].dataset", 0, "near")]),
    ("contradictory", [AUROC, '{metric: auroc, score: energy, dataset: near, op: "<", value: 0.8}'],
     [("gate[1]", 1, "{")]),
    ("contradictory-through-defaults", [AUROC, '{metric: auroc, op: "<=", value: 0.8}'], [("gate[1]", 1, "{")]),
    ("touching-strict-bounds", ['{metric: map, op: ">", value: 0.5}', '{metric: map, op: "<", value: 0.5}'],
     [("gate[1]", 1, "{")]),
    ("impossible-alone", ['{metric: map, op: ">", value: 1}'], [("gate[0]", 0, "{")]),
    ("impossible-below-0", ['{metric: fpr95, op: "<", value: 0}'], [("gate[0]", 0, "{")]),
    ("name-with-newline", ['{metric: map, op: ">", value: 0.5, name: "a\\nb"}'], [("gate[0].name", 0, '"a')]),
    ("warn-zero", ['{metric: map, op: ">", value: 0.5, warn: 0}'], [("gate[0].warn", 0, "0}")]),
    ("one-bad-one-good", ['{metric: auroc, score: rule, op: ">=", value: 0.9}', AUROC,
                          '{metric: map, dataset: far, op: ">=", value: 0.5}'],
     [("gate[0].score", 0, "rule"), ("gate[2].dataset", 2, "far")]),
]


def located(policies: list[str], expected) -> list[tuple[str, int, int]]:
    """(key path, line, column) with the column of `needle` in the policy's line ("  - " + policy)."""
    return [(key, L + i, 5 + policies[i].index(needle)) for key, i, needle in expected]


@pytest.mark.parametrize("policies,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_invalid_policy_is_reported_located(policies, expected):
    assert errors(with_gate(*policies)) == located(policies, expected)


@pytest.mark.parametrize("policies", [
    [AUROC, '{metric: auroc, score: energy, dataset: near, op: "<=", value: 0.99}'],  # an interval
    ['{metric: map, op: ">=", value: 0.5}', '{metric: map, op: "<=", value: 0.5}'],  # one point
    [AUROC, '{metric: auroc, score: maha, dataset: near, op: "<", value: 0.8}'],  # other score
    [AUROC, '{metric: aupr_in, score: energy, dataset: near, op: "<", value: 0.8}'],  # other metric
    [AUROC, "{metric: auroc, baseline: {max_drop: 0}}"],  # baseline policies are not intervals
    ['{metric: fpr95, op: "<=", value: 0}', '{metric: certified_rate, dataset: id_test, op: ">=", value: 1}'],
])
def test_compatible_policies_are_accepted(policies):
    assert errors(with_gate(*policies)) == []


def test_messages_say_what_was_expected_with_a_hint():
    policies = ['{metric: auroc, score: rule, op: ">=", value: 0.9}',
                '{metric: auroc, dataset: farr, op: ">=", value: 0.9}',
                "{metric: fpr95, baseline: {max_drop: 0.1}}",
                AUROC, '{metric: auroc, score: energy, dataset: near, op: "<", value: 0.8}']
    (_, l0, c0), (_, l1, c1), (_, l2, c2), (_, l4, c4) = located(policies, [
        ("", 0, "rule"), ("", 1, "farr"), ("", 2, "max_drop"), ("", 4, "{")])
    assert issue_text(with_gate(*policies)).splitlines() == [
        f"m.yaml:{l0}:{c0}: gate[0].score: expected a score defined under scores (one of: energy, maha), "
        "found 'rule' (hint: the rule is a flag, not a score: gate it with rule_ood_flag_rate or rule_id_tpr)",
        f"m.yaml:{l1}:{c1}: gate[1].dataset: expected an OOD set defined under data.ood (one of: near, far), "
        "found 'farr' (hint: did you mean 'far'?)",
        f"m.yaml:{l2}:{c2}: gate[2].baseline.max_drop: expected max_rise (fpr95: lower is better), "
        "found 'max_drop' (hint: a max_drop on fpr95 would limit an improvement; use max_rise)",
        f"m.yaml:{l4}:{c4}: gate[4]: expected a bound compatible with 'auroc[energy] on near >= 0.85' at "
        f"m.yaml:{L + 3}:5, found 'auroc[energy] on near < 0.8': no auroc[energy] on ood/near passes both "
        "(hint: contradictory policies: remove or relax one of them)",
    ]


def test_policies_needing_data_the_spec_lacks_are_errors():
    no_id_test = DEMO.replace("  id_test:     {digitsdet: test}\n", "")
    no_ood = DEMO.replace("  ood:\n    near: {digitsdet: ood-near}\n    far:  {digitsdet: ood-far}\n", "")
    on_map = '{metric: map, op: ">=", value: 0.5}'
    on_id_test = '{metric: certified_rate, dataset: id_test, op: ">=", value: 0.5}'
    on_ood = '{metric: auroc, op: ">=", value: 0.5}'
    assert errors(with_gate(on_map, text=no_id_test)) == [("gate[0].metric", L - 1, 5 + on_map.index("map,"))]
    assert errors(with_gate(on_id_test, text=no_id_test)) == [
        ("gate[0].dataset", L - 1, 5 + on_id_test.index("id_test"))]
    assert errors(with_gate(on_ood, text=no_ood)) == [("gate[0].metric", L - 3, 5 + on_ood.index("auroc"))]


def test_gate_must_be_a_non_empty_list():
    assert errors(DEMO + "gate: []\n") == [("gate", L - 1, 7)]
    assert errors(DEMO + "gate: {metric: auroc}\n") == [("gate", L - 1, 7)]


def test_every_error_of_the_file_is_reported_at_once():
    text = with_gate('{metric: auroc, score: rule, op: ">=", value: 0.9}').replace("tap: logits,", "tap: logit,")
    assert [k for k, _, _ in errors(text)] == ["scores.energy.tap", "gate[0].score"]


def test_an_invalid_scores_section_does_not_pile_up_gate_errors():
    text = with_gate('{metric: auroc, score: energy, op: ">=", value: 0.9}').replace(
        "scores:\n  energy: {tap: logits, temperature: 1.0}\n  maha:   {kind: mahalanobis, tap: penultimate}\n",
        "scores: 3\n").replace('rule: "energy > t.energy or maha > t.maha"\n', "")
    assert [k for k, _, _ in errors(text)] == ["scores"]


def test_schema_agrees_with_the_loader_on_gate_blocks():
    validator = jsonschema.Draft202012Validator(json_schema())
    valid = with_gate(AUROC, "{metric: fpr95, baseline: {max_rise: 0.05}, warn: 0.01}")
    assert validator.is_valid(yaml.safe_load(valid)) and errors(valid) == []
    for policy in ['{metric: auc, op: ">=", value: 0.9}', '{metric: auroc, op: ">="}', "{metric: auroc}",
                   '{metric: auroc, op: ">=", value: 0.9, baseline: {max_drop: 0.1}}',
                   "{metric: auroc, baseline: {max_drop: 0.1, max_rise: 0.1}}",
                   '{metric: auroc, op: ">=", value: 2}', '{metric: auroc, op: ">=", value: 0.9, x: 1}']:
        text = with_gate(policy)
        assert not validator.is_valid(yaml.safe_load(text)) and errors(text), policy


def test_targets_expand_omitted_score_and_dataset():
    names = GateNames(scores=("energy", "maha"), ood=("near", "far"), has_id_test=True)
    assert targets(GatePolicy("auroc", ">=", 0.9), names) == [
        ("energy", "ood/near"), ("energy", "ood/far"), ("maha", "ood/near"), ("maha", "ood/far")]
    assert targets(GatePolicy("auroc", ">=", 0.9, score="maha", dataset="far"), names) == [("maha", "ood/far")]
    assert targets(GatePolicy("rule_id_tpr", ">=", 0.9), names) == [(None, "ood/near"), (None, "ood/far")]
    assert targets(GatePolicy("map", ">=", 0.5), names) == [(None, "id_test")]
    assert targets(GatePolicy("undecided_rate", "<=", 0.5), names) == [
        (None, "id_test"), (None, "ood/near"), (None, "ood/far")]


def test_metric_table_directions():
    lower = {m for m, g in GATE_METRIC_TABLE.items() if not g.higher_is_better}
    assert lower == {"fpr95", "fpr95_first", "undecided_rate"}


# --- policy files ----------------------------------------------------------------------------
def spec_with_gate():
    return load_spec_text(with_gate(AUROC), "spec.yaml")


def test_policy_file_loads_with_positions(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text('version: 1\ngate:\n  - {metric: map, op: ">=", value: 0.5, name: ID}\n')
    (policy,) = load_policy_file(path, spec_with_gate())
    assert policy == GatePolicy("map", ">=", 0.5, name="ID", file=str(path), line=3, column=5)


def test_policy_file_errors_are_located_in_the_policy_file():
    text = ("gate:\n"
            "  - {metric: auroc, score: enrgy, op: \">=\", value: 0.9}\n"
            "  - {metric: auroc, score: energy, dataset: near, op: \"<\", value: 0.8}\n"
            "  - {metric: map, op: \">=\", value: 0.5, colour: red}\n"
            "extra: 1\n")
    policies, issues = check_policy_text(text, spec_with_gate(), "p.yaml")
    assert policies is None
    assert [str(i) for i in issues] == [
        "p.yaml:2:28: gate[0].score: expected a score defined under scores (one of: energy, maha), "
        "found 'enrgy' (hint: did you mean 'energy'?)",
        f"p.yaml:3:5: gate[1]: expected a bound compatible with 'auroc[energy] on near >= 0.85' at "
        f"spec.yaml:{L}:5, found 'auroc[energy] on near < 0.8': no auroc[energy] on ood/near passes both "
        "(hint: contradictory policies: remove or relax one of them)",
        "p.yaml:4:41: gate[2].colour: expected one of the keys: name, metric, score, dataset, op, value, "
        "baseline, warn, found unknown key 'colour'",
        "p.yaml:5:1: extra: expected one of the keys: version, gate, found unknown key 'extra'",
    ]


@pytest.mark.parametrize("text,expected", [
    ("", [("", 1, 1)]),
    ("- {metric: map}\n", [("", 1, 1)]),
    ("version: 1\n", [("gate", 1, 1)]),
    ("gate: [{metric: map, op: '>=', value: 0.5}]\nversion: 2\n", [("version", 2, 10)]),
    ("gate:\n  - !!python/object:os.system {metric: map}\n", [("gate[0]", 2, 5), ("gate[0]", 2, 5)]),  # tag; no op
])
def test_policy_file_reading_is_as_strict_as_a_spec(text, expected):
    policies, issues = check_policy_text(text, spec_with_gate(), "p.yaml")
    assert policies is None
    assert [(i.key_path, i.line, i.column) for i in issues] == expected


def test_missing_policy_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as e:
        load_policy_file(tmp_path / "nope.yaml", spec_with_gate())
    assert str(e.value).startswith(f"{tmp_path / 'nope.yaml'}:1:1: expected a readable policy file")
