"""Rule consistency, decided with z3 when a spec is loaded: is the rule worth writing?

Every score is an unknown real inside the range its kind declares (`value_range` in
`SCORE_KIND_TABLE`; undeclared: unbounded), and so is every threshold (`t.NAME` and
`t.NAME[class]` are separate unknowns, in NAME's range) unless the spec fixes it
(`threshold: {fixed: ...}`). Under those assumptions a rule is reported when it

- can never flag (no scores and thresholds satisfy it): an error;
- always flags (no scores and thresholds falsify it): an error;
- has a clause that never matters, whatever the calibration gives: a disjunct the rest of the
  rule already covers, or a conjunct the rest implies (dropping it never changes the flag): a
  warning located at the clause.

Each question is one z3 query under a small time limit, all of them under a budget; an
unknown answer is no report (a check that gives up never blocks a spec). Division follows
z3's semantics (x/0 is some real), which only makes queries easier to satisfy, so a report
never rests on it.

>>> from certood.spec.rule import parse_rule
>>> [p.found for p in check_rule_consistency(parse_rule("maha < 0"), {"maha": (0.0, None)})]
["'maha < 0', which no value in the scores' ranges satisfies: the rule never flags"]
>>> p, = check_rule_consistency(parse_rule("e > t.e or e > t.e + 1"), {"e": (None, None)})
>>> p.severity, p.pos, p.found
('warning', 11, "'e > t.e + 1', which the rest of the rule covers whenever it holds")
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction

from certood.spec.rule import ClassThresholdRef, Logic, Neg, Not, Num, Rule, ScoreRef, ThresholdRef, render

QUERY_TIMEOUT_MS = 200  # one z3 query
BUDGET_S = 1.5  # every query of one rule together: redundancy checks stop when it is spent
# A deterministic per-query resource limit as well, so that a result does not depend on the
# machine's speed for queries that hit it (the wall-clock timeout is the safety net).
QUERY_RLIMIT = 2_000_000

Range = tuple  # (lo, hi), floats or None (unbounded)


@dataclass(frozen=True)
class ConsistencyProblem:
    """A finding located in the rule text (`pos`, 0-based), like a `RuleProblem`."""

    pos: int
    severity: str  # "error" (never / always flags) or "warning" (a clause that never matters)
    expected: str
    found: str
    hint: str = ""


def score_ranges(kinds: dict[str, str], num_classes: int | None = None) -> dict[str, Range]:
    """Each score's value range from its kind's declaration; `num_classes` (background
    included) resolves a "log(C)" bound, otherwise left unbounded.

    >>> score_ranges({"h": "entropy", "e": "energy"}, num_classes=3)["h"]
    (0.0, 0.6931471805599454)
    """
    from certood.spec.v1 import LOG_CLASSES, SCORE_KIND_TABLE

    def bound(b, up: bool):
        if b == LOG_CLASSES:
            if num_classes is None or num_classes < 2:
                return None
            # a little above log(C): float rounding must not put a real value outside
            return math.nextafter(math.log(num_classes - 1), math.inf) if up else math.log(num_classes - 1)
        return b

    out = {}
    for name, kind in kinds.items():
        entry = SCORE_KIND_TABLE.get(kind)
        lo, hi = entry.value_range if entry is not None else (None, None)
        out[name] = (bound(lo, False), bound(hi, True))
    return out


def describe_range(name: str, r: Range) -> str:
    """'maha >= 0', 'msp in [-1, 0]', or '' for an unbounded score."""
    lo, hi = r
    if lo is None and hi is None:
        return ""
    if lo is None:
        return f"{name} <= {hi:g}"
    if hi is None:
        return f"{name} >= {lo:g}"
    return f"{name} in [{lo:g}, {hi:.4g}]"


def check_rule_consistency(rule: Rule, ranges: dict[str, Range], fixed: dict[str, float] | None = None,
                           timeout_ms: int = QUERY_TIMEOUT_MS, budget_s: float = BUDGET_S) -> list[ConsistencyProblem]:
    """Problems of `rule` (see the module doc) under score `ranges`; `fixed`: thresholds known
    in advance (`t.NAME` is then that number)."""
    try:
        import z3
    except ImportError:  # the check is an aid; without z3 there is simply no report
        return []
    return _Checker(z3, rule, ranges, fixed or {}, timeout_ms, budget_s).run()


class _Checker:
    def __init__(self, z3, rule: Rule, ranges: dict, fixed: dict, timeout_ms: int, budget_s: float):
        self.z3, self.rule, self.ranges, self.fixed = z3, rule, ranges, fixed
        self.timeout_ms, self.deadline = timeout_ms, time.perf_counter() + budget_s
        self.vars: dict[str, object] = {}
        self.domain: list = []

    # -- encoding
    def var(self, key: str, score: str):
        if key not in self.vars:
            v = self.vars[key] = self.z3.Real(key)
            lo, hi = self.ranges.get(score, (None, None))
            if lo is not None:
                self.domain.append(v >= _q(self.z3, lo))
            if hi is not None:
                self.domain.append(v <= _q(self.z3, hi))
        return self.vars[key]

    def encode(self, node, replaced: dict):
        z3 = self.z3
        if id(node) in replaced:
            return z3.BoolVal(replaced[id(node)])
        if isinstance(node, Num):
            return _q(z3, node.value)
        if isinstance(node, ScoreRef):
            return self.var(node.name, node.name)
        if isinstance(node, ThresholdRef):
            if node.name in self.fixed:
                return _q(z3, self.fixed[node.name])
            return self.var(f"t.{node.name}", node.name)
        if isinstance(node, ClassThresholdRef):
            return self.var(f"t.{node.name}[class]", node.name)
        if isinstance(node, Neg):
            return -self.encode(node.operand, replaced)
        if isinstance(node, Not):
            return z3.Not(self.encode(node.operand, replaced))
        if isinstance(node, Logic):
            parts = [self.encode(o, replaced) for o in node.operands]
            return z3.And(*parts) if node.op == "and" else z3.Or(*parts)
        left, right = self.encode(node.left, replaced), self.encode(node.right, replaced)
        ops = {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right,
               "/": lambda: left / right, ">": lambda: left > right, ">=": lambda: left >= right,
               "<": lambda: left < right, "<=": lambda: left <= right}
        return ops[node.op]()

    def unsat(self, formula) -> bool:
        """True only when z3 proves `formula` (with the ranges) unsatisfiable in time."""
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            return False
        solver = self.z3.Solver()
        solver.set("timeout", max(1, min(self.timeout_ms, int(remaining * 1000))))
        solver.set("rlimit", QUERY_RLIMIT)
        solver.add(*self.domain, formula)
        try:
            return solver.check() == self.z3.unsat
        except self.z3.Z3Exception:  # e.g. an arithmetic z3 refuses: no report
            return False

    # -- the checks
    def run(self) -> list[ConsistencyProblem]:
        try:
            formula = self.encode(self.rule.tree, {})
        except (self.z3.Z3Exception, ValueError, OverflowError):
            return []
        shown, hint = render(self.rule.tree), self._hint("check the comparisons' directions and constants")
        if self.unsat(formula):
            return [ConsistencyProblem(0, "error", "a rule that can flag some box", f"'{shown}', which no value "
                                       "in the scores' ranges satisfies: the rule never flags", hint)]
        if self.unsat(self.z3.Not(formula)):
            return [ConsistencyProblem(0, "error", "a rule that can leave some box unflagged", f"'{shown}', which "
                                       "every value in the scores' ranges satisfies: the rule always flags", hint)]
        return self._redundant(formula)

    def _hint(self, advice: str) -> str:
        used = sorted(self.rule.names() | self.rule.threshold_names() | self.rule.class_threshold_names())
        ranges = [d for d in (describe_range(n, self.ranges.get(n, (None, None))) for n in used) if d]
        fixed = [f"t.{n} = {self.fixed[n]:g}" for n in used if n in self.fixed and n in self.rule.threshold_names()]
        facts = ranges + fixed
        assumed = "; assumed: " + ", ".join(facts) if facts else ""
        return advice + assumed + ", and each threshold within its score's range"

    def _redundant(self, formula) -> list[ConsistencyProblem]:
        """Clauses whose removal never changes the flag, outermost first, right to left (so
        of two equal clauses the later one is reported), each removal kept for the next."""
        problems: list[ConsistencyProblem] = []
        replaced: dict = {}
        current = formula

        def visit(node) -> None:
            nonlocal current
            if isinstance(node, Logic):
                for operand in reversed(node.operands):
                    if time.perf_counter() >= self.deadline:
                        return
                    trial = {**replaced, id(operand): node.op == "and"}
                    candidate = self.encode(self.rule.tree, trial)
                    if self.unsat(candidate != current):
                        replaced[id(operand)] = node.op == "and"
                        current = candidate
                        alone = self.encode(operand, {})
                        constant = self.unsat(alone if node.op == "or" else self.z3.Not(alone))
                        problems.append(_clause_problem(node.op, operand, constant))
                for operand in node.operands:
                    if id(operand) not in replaced:
                        visit(operand)
            elif isinstance(node, Not):
                visit(node.operand)

        try:
            visit(self.rule.tree)
        except self.z3.Z3Exception:
            return problems
        return sorted(problems, key=lambda p: p.pos)


def _clause_problem(op: str, clause, constant: bool) -> ConsistencyProblem:
    """`constant`: the clause alone never holds (a disjunct) or always holds (a conjunct)."""
    text = render(clause)
    hint = "it never changes the flag: remove it, or fix its comparison"
    if op == "or":
        why = ("which never holds in the scores' ranges" if constant
               else "which the rest of the rule covers whenever it holds")
        return ConsistencyProblem(clause.pos, "warning", "a disjunct that can change the flag", f"'{text}', {why}",
                                  hint)
    why = "which always holds in the scores' ranges" if constant else "which the rest of the rule implies"
    return ConsistencyProblem(clause.pos, "warning", "a conjunct that can change the flag", f"'{text}', {why}", hint)


def _q(z3, x: float):
    """A float as an exact z3 rational."""
    f = Fraction(float(x))
    return z3.Q(f.numerator, f.denominator)
