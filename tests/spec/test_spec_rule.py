"""The rule language: parsing, precedence, type errors at the right offset, tensor evaluation."""
import pytest
import torch

from certood.spec.rule import (
    MAX_DEPTH, MAX_TOKENS, Compare, Logic, Not, RuleProblem, ScoreRef, check_rule, parse_rule,
)


def test_precedence_not_binds_tighter_than_and_tighter_than_or():
    tree = parse_rule("a > 1 or not b > 2 and c < 3").tree
    assert isinstance(tree, Logic) and tree.op == "or"
    left, right = tree.operands
    assert isinstance(left, Compare) and isinstance(right, Logic) and right.op == "and"
    assert isinstance(right.operands[0], Not) and isinstance(right.operands[1], Compare)


def test_arithmetic_is_left_associative_and_times_binds_tighter():
    rule = parse_rule("a - b - c * 2 > 0")
    torch_scores = {k: torch.tensor([v]) for k, v in {"a": 10.0, "b": 3.0, "c": 2.0}.items()}
    assert rule.evaluate(torch_scores, {}).tolist() == [True]  # (10 - 3) - 4 = 3 > 0
    assert parse_rule("a - b - c * 2 > 4").evaluate(torch_scores, {}).tolist() == [False]


def test_names_and_threshold_names():
    rule = parse_rule("energy > t.energy and (maha > 2 * t.maha or -knn < t.energy)")
    assert rule.names() == {"energy", "maha", "knn"}
    assert rule.threshold_names() == {"energy", "maha"}


REFERENCE_RULES = {
    "e > t.e or m > t.m": lambda e, m, te, tm: e > te or m > tm,
    "e > t.e and not m <= t.m": lambda e, m, te, tm: e > te and not m <= tm,
    "e - 2 * m >= t.e / 2": lambda e, m, te, tm: e - 2 * m >= te / 2,
    "-(e + m) < -1.5e0 or (e > t.e and m > t.m)": lambda e, m, te, tm: -(e + m) < -1.5 or (e > te and m > tm),
    "not not e > .5": lambda e, m, te, tm: e > 0.5,
}


@pytest.mark.parametrize("source", REFERENCE_RULES)
def test_evaluate_matches_elementwise_python(source):
    gen = torch.Generator().manual_seed(0)
    e, m = (torch.randn(200, generator=gen, dtype=torch.float64) for _ in range(2))
    thresholds = {"e": 0.3, "m": -0.2}
    flags = parse_rule(source).evaluate({"e": e, "m": m}, thresholds)
    expected = [REFERENCE_RULES[source](a, b, 0.3, -0.2) for a, b in zip(e.tolist(), m.tolist())]
    assert flags.dtype == torch.bool and flags.shape == (200,)
    assert flags.tolist() == expected


def test_evaluate_handles_no_boxes_and_division_by_zero():
    rule = parse_rule("e / 0 > t.e")
    assert rule.evaluate({"e": torch.empty(0)}, {"e": 1.0}).shape == (0,)
    assert rule.evaluate({"e": torch.tensor([1.0, -1.0])}, {"e": 1.0}).tolist() == [True, False]


def test_evaluate_names_missing_inputs():
    with pytest.raises(KeyError, match="t.e"):
        parse_rule("e > t.e").evaluate({"e": torch.zeros(2)}, {})


@pytest.mark.parametrize("source, pos, found", [
    ("", 0, "the end of the rule"),
    ("a >", 3, "the end of the rule"),
    ("a > > 1", 4, "'>'"),
    ("a > 1 > 2", 6, "'>'"),  # comparisons do not chain
    ("a == 1", 2, "'='"),
    ("a > 1 b", 6, "'b'"),
    ("(a > 1", 6, "the end of the rule"),
    ("a > 1)", 5, "')'"),
    ("t. > 1", 0, "'t.>'"),
    ("a > 1 or", 8, "the end of the rule"),
    ("a > $", 4, "'$'"),
])
def test_syntax_errors_are_located(source, pos, found):
    with pytest.raises(RuleProblem) as info:
        parse_rule(source)
    assert (info.value.pos, info.value.found) == (pos, found)


@pytest.mark.parametrize("source, pos", [
    ("a", 0),  # a number where a condition is needed
    ("a + b", 0),
    ("a > 1 and b", 10),
    ("not b", 4),
    ("(a > 1) + 2 > 3", 0),
    ("a > (b < 1)", 4),
    ("-(a > 1) > 0", 1),
])
def test_type_errors_are_located(source, pos):
    with pytest.raises(RuleProblem) as info:
        parse_rule(source)
    assert info.value.pos == pos


def test_check_rule_resolves_names():
    rule, problems = check_rule("enrgy > t.energy or maha > t.knn", {"energy", "maha"})
    assert rule is None
    assert [(p.pos, p.found, p.hint) for p in problems] == [
        (0, "'enrgy'", "did you mean 'energy'?"), (27, "'t.knn'", ""),
    ]
    assert check_rule("energy > t.energy", {"energy"})[1] == []
    assert check_rule("1 > 0", {"energy"})[1][0].expected == "a rule that reads at least one score"


def test_limits_turn_pathological_rules_into_problems():
    deep = "(" * (MAX_DEPTH + 1) + "a > 1" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(RuleProblem, match="nested"):
        parse_rule(deep)
    with pytest.raises(RuleProblem, match="nested"):
        parse_rule("not " * (MAX_DEPTH + 1) + "a > 1")
    with pytest.raises(RuleProblem, match="tokens"):
        parse_rule(" + ".join(["a"] * MAX_TOKENS) + " > 1")
    long_ok = " + ".join(["a"] * 200) + " > 1"
    assert parse_rule(long_ok).evaluate({"a": torch.ones(3)}, {}).tolist() == [True] * 3
    assert isinstance(parse_rule("(" * MAX_DEPTH + "a > 1" + ")" * MAX_DEPTH).tree, Compare)


def test_score_ref_positions():
    tree = parse_rule("x > 1 or  yy > 2").tree
    assert tree.operands[1].left == ScoreRef("yy", 10)


# --- per-class thresholds: t.NAME[class] ---------------------------------------------------
def test_class_threshold_parses_and_is_a_number():
    from certood.spec.rule import ClassThresholdRef, render

    rule = parse_rule("maha > t.maha[class] or maha > 2 * t.maha")
    assert rule.class_threshold_names() == {"maha"} and rule.threshold_names() == {"maha"}
    assert rule.tree.operands[0].right == ClassThresholdRef("maha", 7)
    assert render(rule.tree) == "maha > t.maha[class] or maha > 2 * t.maha"
    assert parse_rule("class > t.class[class]").names() == {"class"}  # `class` is a keyword only in [ ]


@pytest.mark.parametrize("source, pos, found", [
    ("m > t.m[", 8, "the end of the rule"),
    ("m > t.m[cls]", 8, "'cls'"),
    ("m > t.m[class", 13, "the end of the rule"),
    ("m > t.m[0]", 8, "'0'"),
    ("m > t.m[class]]", 14, "']'"),
    ("m[class] > t.m", 1, "'['"),
    ("m > t.m[[class]]", 8, "'['"),
    ("m > t[class]", 5, "'['"),
])
def test_class_threshold_syntax_errors_are_located(source, pos, found):
    with pytest.raises(RuleProblem) as info:
        parse_rule(source)
    assert (info.value.pos, info.value.found) == (pos, found)


def test_score_indexed_by_class_gets_a_hint():
    with pytest.raises(RuleProblem) as info:
        parse_rule("maha[class] > 1")
    assert info.value.hint == "only thresholds are per class: write t.maha[class]"


def test_check_rule_resolves_class_threshold_names():
    rule, problems = check_rule("maha > t.mah[class]", {"maha"})
    assert rule is None and [(p.pos, p.found, p.hint) for p in problems] == [
        (7, "'t.mah[class]'", "did you mean 'maha'?")]


def test_evaluate_reads_each_boxs_class_threshold():
    rule = parse_rule("m > t.m[class] or e > t.e")
    scores = {"m": torch.tensor([1.0, 1.0, 1.0, 5.0]), "e": torch.tensor([0.0, 0.0, 9.0, 0.0])}
    thresholds = {"e": 1.0, "m[class]": torch.tensor([0.0, 0.5, 2.0])}  # index: predicted label
    labels = torch.tensor([1, 2, 2, 2])
    assert rule.evaluate(scores, thresholds, labels).tolist() == [True, False, True, True]
    assert rule.evaluate(scores, {"e": 1.0, "m[class]": [0.0, 0.5, 2.0]}, labels.tolist()).tolist() == \
        [True, False, True, True]  # plain sequences too


def test_evaluate_class_thresholds_match_python_reference():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(300, generator=gen, dtype=torch.float64)
    labels = torch.randint(1, 4, (300,), generator=gen)
    table = [9.9, -0.5, 0.0, 0.7]
    flags = parse_rule("m > t.m[class] and m > t.m").evaluate({"m": m}, {"m": -0.2, "m[class]": table}, labels)
    assert flags.tolist() == [a > table[c] and a > -0.2 for a, c in zip(m.tolist(), labels.tolist())]


def test_evaluate_without_labels_or_table_says_what_is_missing():
    rule = parse_rule("m > t.m[class]")
    with pytest.raises(KeyError, match=r"t\.m\[class\]"):
        rule.evaluate({"m": torch.zeros(2)}, {"m": 1.0})  # only global thresholds
    with pytest.raises(ValueError, match="labels"):
        rule.evaluate({"m": torch.zeros(2)}, {"m[class]": [0.0, 1.0]})
    with pytest.raises(ValueError, match=r"labels in \[0, 1\]"):
        rule.evaluate({"m": torch.zeros(2)}, {"m[class]": [0.0, 1.0]}, torch.tensor([1, 2]))


def test_global_only_callers_are_unchanged():
    rule = parse_rule("e > t.e")
    assert rule.evaluate({"e": torch.tensor([1.0, 3.0])}, {"e": 2.0}).tolist() == [False, True]
    assert rule.evaluate({"e": torch.tensor([1.0, 3.0])}, {"e": 2.0}, torch.tensor([1, 1])).tolist() == [False, True]
    assert rule.evaluate({"e": torch.empty(0)}, {"e": 2.0}).shape == (0,)
    flags = parse_rule("e > t.e[class]").evaluate({"e": torch.empty(0)}, {"e[class]": [0.0]}, torch.empty(0))
    assert flags.shape == (0,)


@pytest.mark.parametrize("source", [
    "a > 1 or not (b + 2 * c <= t.b[class])", "-(a - b) / 2 > t.a and (a > 1 or b > 2)",
    "not not a > 1e-07", "a - (b - c) > 0", "(a > 1 and b > 2) or c > 3",
])
def test_render_round_trips(source):
    from certood.spec.rule import render

    tree = parse_rule(source).tree
    assert _strip(parse_rule(render(tree)).tree) == _strip(tree)


def _strip(node):
    """A tree without positions, for comparing structure."""
    import dataclasses

    if not dataclasses.is_dataclass(node):
        return node
    return tuple([type(node).__name__] + [
        tuple(_strip(x) for x in v) if isinstance(v, tuple) else _strip(v)
        for k, v in ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node)) if k != "pos"])
