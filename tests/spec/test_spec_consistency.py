"""Rule consistency with z3: never / always flagging rules are errors, clauses that never
matter are warnings, each located in the rule; gate policies that contradict each other."""
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certood.spec import check_spec_text, load_spec_text, parse_rule
from certood.spec.consistency import check_rule_consistency, score_ranges
from certood.spec.model import GatePolicy
from certood.spec.policy import GateNames, conflicts

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
RULE_LINE = 'rule: "energy > t.energy or maha > t.maha"\n'
RANGES = {"energy": (None, None), "maha": (0.0, None), "msp": (-1.0, 0.0), "h": (0.0, 1.6094379124341005)}


def findings(source: str, ranges=RANGES, fixed=None) -> list[tuple[str, int, str]]:
    return [(p.severity, p.pos, p.expected) for p in check_rule_consistency(parse_rule(source), ranges, fixed)]


NEVER = "a rule that can flag some box"
ALWAYS = "a rule that can leave some box unflagged"
DISJUNCT = "a disjunct that can change the flag"
CONJUNCT = "a conjunct that can change the flag"


@pytest.mark.parametrize("source, expected", [
    # fine rules: nothing to report
    ("energy > t.energy or maha > t.maha", []),
    ("energy > t.energy and maha > t.maha", []),
    ("maha > t.maha[class] or maha > t.maha", []),  # global and per-class thresholds are different unknowns
    ("energy - 2 * maha >= t.energy / 2", []),
    ("msp > t.msp", []),
    # never flags
    ("energy > t.energy and energy < t.energy", [("error", 0, NEVER)]),
    ("maha < 0", [("error", 0, NEVER)]),  # distances are >= 0
    ("msp > 0.5", [("error", 0, NEVER)]),  # msp lies in [-1, 0]
    ("maha < t.maha - maha and maha > t.maha", [("error", 0, NEVER)]),
    ("not (energy > t.energy or energy <= t.energy)", [("error", 0, NEVER)]),
    ("h > 2", [("error", 0, NEVER)]),  # entropy <= log 5 with 6 classes
    # always flags
    ("energy > t.energy or energy <= t.energy", [("error", 0, ALWAYS)]),
    ("maha >= 0 or energy > t.energy", [("error", 0, ALWAYS)]),
    ("msp <= 0", [("error", 0, ALWAYS)]),
    # clauses that never matter, at their offset
    ("energy > t.energy or energy > t.energy + 1", [("warning", 21, DISJUNCT)]),
    ("energy > t.energy + 1 or energy > t.energy", [("warning", 0, DISJUNCT)]),
    ("energy > t.energy or energy > t.energy", [("warning", 21, DISJUNCT)]),  # the later copy
    ("energy > t.energy and energy > t.energy - 1", [("warning", 22, CONJUNCT)]),
    ("maha > t.maha or maha < -1", [("warning", 17, DISJUNCT)]),
    ("energy > t.energy and maha >= 0", [("warning", 22, CONJUNCT)]),
    ("(energy > t.energy or maha > t.maha) and not (energy <= t.energy and maha <= t.maha)",
     [("warning", 41, CONJUNCT)]),
    ("not (energy > t.energy or energy > t.energy + 1)", [("warning", 26, DISJUNCT)]),
    ("energy > t.energy or (maha > t.maha and energy > t.energy)", [("warning", 21, DISJUNCT)]),
])
def test_findings(source, expected):
    assert findings(source) == expected


def test_messages_name_the_clause_and_the_assumed_ranges():
    (never,) = check_rule_consistency(parse_rule("maha < 0 and energy > t.energy"), RANGES)
    assert never.found.startswith("'maha < 0 and energy > t.energy', which no value")
    assert "maha >= 0" in never.hint and "never flags" in never.found
    (clause,) = check_rule_consistency(parse_rule("maha > t.maha or maha < -1"), RANGES)
    assert clause.found == "'maha < -1', which never holds in the scores' ranges"
    (implied,) = check_rule_consistency(parse_rule("energy > t.energy and energy > t.energy - 1"), RANGES)
    assert implied.found == "'energy > t.energy - 1', which the rest of the rule implies"


def test_fixed_thresholds_are_known_values():
    assert findings("maha > t.maha", fixed={"maha": -1.0}) == [("error", 0, ALWAYS)]
    assert findings("msp > t.msp", fixed={"msp": 0.0}) == [("error", 0, NEVER)]
    assert findings("maha > t.maha", fixed={"maha": 3.0}) == []


def test_nonlinear_and_division_do_not_break_the_check():
    assert findings("energy * maha > t.energy * t.maha or energy / maha > 3") == []
    assert findings("energy / 0 > t.energy") == []  # z3's x/0 is some real: no report rests on it
    assert findings("energy > 1e999") == []  # a number that is no rational: no report


def test_a_spent_budget_reports_nothing():
    rule = parse_rule("energy > t.energy and energy < t.energy")
    assert check_rule_consistency(rule, RANGES, budget_s=0.0) == []


def test_score_ranges_come_from_the_kind_table():
    ranges = score_ranges({"e": "energy", "m": "mahalanobis", "p": "msp", "h": "entropy", "k": "knn"}, num_classes=6)
    assert ranges["e"] == (None, None) and ranges["m"] == (0.0, None) and ranges["p"] == (-1.0, 0.0)
    assert ranges["k"] == (0.0, 2.0)
    assert ranges["h"][0] == 0.0 and 1.6094379124341 < ranges["h"][1] < 1.6094379124342
    assert score_ranges({"h": "entropy"})["h"] == (0.0, None)  # C unknown: unbounded above


# --- in the loader: located in the file, errors vs warnings ---------------------------------
def located(text: str):
    _, issues = check_spec_text(text, "m.yaml")
    return [(i.severity, i.key_path, i.line, i.column) for i in issues]


def test_loader_reports_never_flagging_rule_as_an_error_at_the_rule():
    text = DEMO.replace(RULE_LINE, 'rule: "maha < 0 and energy > t.energy"\n')
    assert located(text) == [("error", "rule", 24, 8)]


def test_loader_reports_a_redundant_clause_as_a_warning_at_the_clause():
    text = DEMO.replace(RULE_LINE, 'rule: "energy > t.energy or maha > t.maha or energy > t.energy + 1"\n')
    assert located(text) == [("warning", "rule", 24, 46)]
    assert len(load_spec_text(text).warnings) == 1  # a warning does not stop the spec


def test_loader_uses_num_classes_for_entropy_and_fixed_thresholds():
    text = DEMO.replace("maha:   {kind: mahalanobis, tap: penultimate}", "h: {kind: entropy, tap: logits}")
    assert located(text.replace(RULE_LINE, 'rule: "energy > t.energy or h > t.h"\n')) == []
    assert located(text.replace(RULE_LINE, 'rule: "energy > t.energy and h > 1.7"\n')) == [("error", "rule", 24, 8)]
    fixed = DEMO.replace("{tpr: 0.95, detector_score: f1}", "{fixed: {energy: -3, maha: -1}}")
    assert ("error", "rule", 24, 8) in located(fixed)  # maha > -1 always holds
    assert ("warning", "threshold.fixed.maha", 23, 39) in located(fixed)


# --- gate policies: the interval check agrees with z3 --------------------------------------
NAMES = GateNames(scores=("energy",), ood=("near",), has_id_test=True)
OPS = (">=", ">", "<=", "<")


def _z3_passable(policies) -> bool:
    import z3

    x = z3.Real("x")
    solver = z3.Solver()
    solver.add(x >= 0, x <= 1)
    for p in policies:
        v = z3.RealVal(str(p.value))
        solver.add({">=": x >= v, ">": x > v, "<=": x <= v, "<": x < v}[p.op])
    return solver.check() == z3.sat


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])), min_size=1, max_size=4))
def test_gate_conflicts_agree_with_z3(bounds):
    policies = [GatePolicy("auroc", op=op, value=v, score="energy", dataset="near") for op, v in bounds]
    problems = conflicts([(("gate", i), p) for i, p in enumerate(policies)], NAMES)
    assert (not problems) == _z3_passable(policies)
