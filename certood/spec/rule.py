"""The rule language: when is a box flagged? Parsed into a tree and evaluated on tensors,
never handed to `eval`.

    expr  := or        or := and ('or' and)*      and := not ('and' not)*
    not   := 'not' not | cmp                      cmp := arith (('>'|'>='|'<'|'<=') arith)?
    arith := term (('+'|'-') term)*               term := unary (('*'|'/') unary)*
    unary := '-' unary | atom
    atom  := NUMBER | NAME | 't' '.' NAME ('[' 'class' ']')? | '(' expr ')'

NAME is a score's value for the box, `t.NAME` its calibrated (global) threshold and
`t.NAME[class]` its threshold for the box's predicted class (`class` is a keyword only inside
the brackets; `threshold: {per_class: true}` calibrates those). The whole rule must be
boolean; and/or/not take booleans, arithmetic and comparisons take numbers.

>>> rule = parse_rule("energy > t.energy or maha > 2 * t.maha")
>>> sorted(rule.names()), sorted(rule.threshold_names())
(['energy', 'maha'], ['energy', 'maha'])
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from certood.spec.schema import did_you_mean

KEYWORDS = ("and", "or", "not")
THRESHOLDS = "t"  # `t.NAME` is the threshold of score NAME
CLASS = "class"  # `t.NAME[class]`: the threshold of the box's predicted class
MAX_TOKENS = 500
MAX_DEPTH = 32  # nested parentheses / unary operators; keeps the recursive parser shallow

_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>>=|<=|[<>+\-*/().\[\]])",
    re.ASCII,
)
_COMPARE = (">", ">=", "<", "<=")


# --- the tree: every node knows where its source starts (0-based offset) -------------------
@dataclass(frozen=True)
class Num:
    value: float
    pos: int


@dataclass(frozen=True)
class ScoreRef:
    name: str
    pos: int


@dataclass(frozen=True)
class ThresholdRef:
    name: str
    pos: int


@dataclass(frozen=True)
class ClassThresholdRef:
    """`t.NAME[class]`: score NAME's threshold for each box's predicted class."""

    name: str
    pos: int


@dataclass(frozen=True)
class Neg:
    operand: object
    pos: int


@dataclass(frozen=True)
class Arith:
    op: str  # + - * /
    left: object
    right: object
    pos: int


@dataclass(frozen=True)
class Compare:
    op: str  # > >= < <=
    left: object
    right: object
    pos: int


@dataclass(frozen=True)
class Not:
    operand: object
    pos: int


@dataclass(frozen=True)
class Logic:
    op: str  # and / or
    operands: tuple
    pos: int


@dataclass
class RuleProblem(ValueError):
    """A located problem in a rule: `pos` is the 0-based offset in the rule text."""

    pos: int
    expected: str
    found: str
    hint: str = ""


def _children(node) -> tuple:
    if isinstance(node, (Neg, Not)):
        return (node.operand,)
    if isinstance(node, (Arith, Compare)):
        return (node.left, node.right)
    if isinstance(node, Logic):
        return node.operands
    return ()


def _walk(node):
    yield node
    for child in _children(node):
        yield from _walk(child)


@dataclass(frozen=True)
class Rule:
    """A parsed rule. Build one with `parse_rule`."""

    source: str
    tree: object

    def nodes(self):
        """Every node of the tree, depth first (parents before children)."""
        return _walk(self.tree)

    def names(self) -> set[str]:
        """Score names the rule reads."""
        return {n.name for n in _walk(self.tree) if isinstance(n, ScoreRef)}

    def threshold_names(self) -> set[str]:
        """Names used as `t.NAME`."""
        return {n.name for n in _walk(self.tree) if isinstance(n, ThresholdRef)}

    def class_threshold_names(self) -> set[str]:
        """Names used as `t.NAME[class]` (per predicted class thresholds)."""
        return {n.name for n in _walk(self.tree) if isinstance(n, ClassThresholdRef)}

    def evaluate(self, scores: dict, thresholds: dict, labels=None):
        """Flag boxes: 1-D score tensors (one value per box) -> a bool tensor of the same length.

        `thresholds[NAME]` is a number (global threshold); `thresholds[class_key(NAME)]`, read
        by `t.NAME[class]`, is a per-class table (1-D tensor or sequence indexed by predicted
        label), and then `labels` gives each box's predicted label.

        >>> import torch
        >>> parse_rule("e > t.e").evaluate({"e": torch.tensor([1.0, 3.0])}, {"e": 2.0})
        tensor([False,  True])
        >>> parse_rule("e > t.e[class]").evaluate({"e": torch.tensor([1.0, 1.0])},
        ...     {"e[class]": torch.tensor([0.0, 2.0, 0.5])}, labels=torch.tensor([1, 2]))
        tensor([False,  True])
        """
        import torch  # lazily: validating a spec should not pay for importing torch

        missing = sorted(self.names() - scores.keys())
        missing += [f"t.{n}" for n in sorted(self.threshold_names() - thresholds.keys())]
        missing += [f"t.{n}[class]" for n in sorted(self.class_threshold_names())
                    if class_key(n) not in thresholds]
        if missing:
            raise KeyError(f"rule {self.source!r} needs values for: {', '.join(missing)}")
        per_class = {}
        for name in sorted(self.class_threshold_names()):
            per_class[name] = _class_thresholds(self.source, name, thresholds[class_key(name)], labels, torch)
        result = _evaluate(self.tree, scores, thresholds, torch, per_class)
        shapes = [torch.as_tensor(scores[n]).shape for n in self.names()] or [torch.Size([])]
        shapes += [t.shape for t in per_class.values()]
        return torch.as_tensor(result).to(torch.bool).expand(torch.broadcast_shapes(*shapes))


def class_key(name: str) -> str:
    """The key of score `name`'s per-class threshold table in `Rule.evaluate`'s thresholds.

    >>> class_key("maha")
    'maha[class]'
    """
    return f"{name}[{CLASS}]"


def _class_thresholds(source: str, name: str, table, labels, torch):
    """Each box's threshold: the per-class `table` read at the box's predicted label."""
    if labels is None:
        raise ValueError(f"rule {source!r} reads t.{name}[class]: pass each box's predicted label (labels=...)")
    table = torch.as_tensor(table, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).long().flatten()
    bad = (labels < 0) | (labels >= len(table))
    if bool(bad.any()):
        raise ValueError(f"t.{name}[class]: expected labels in [0, {len(table) - 1}] (the per-class table), "
                         f"found {int(labels[bad][0])}")
    return table[labels]


def _evaluate(node, scores, thresholds, torch, per_class):
    if isinstance(node, Num):
        return torch.tensor(node.value, dtype=torch.float64)
    if isinstance(node, ScoreRef):
        return torch.as_tensor(scores[node.name])
    if isinstance(node, ThresholdRef):
        return torch.tensor(float(thresholds[node.name]), dtype=torch.float64)
    if isinstance(node, ClassThresholdRef):
        return per_class[node.name]
    if isinstance(node, Neg):
        return -_evaluate(node.operand, scores, thresholds, torch, per_class)
    if isinstance(node, Not):
        return torch.logical_not(_evaluate(node.operand, scores, thresholds, torch, per_class))
    if isinstance(node, Logic):
        combine = torch.logical_and if node.op == "and" else torch.logical_or
        values = [_evaluate(o, scores, thresholds, torch, per_class) for o in node.operands]
        out = values[0]
        for value in values[1:]:
            out = combine(out, value)
        return out
    left = _evaluate(node.left, scores, thresholds, torch, per_class)
    right = _evaluate(node.right, scores, thresholds, torch, per_class)
    ops = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div,
           ">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le}
    return ops[node.op](left, right)


_PRECEDENCE = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 5, "-": 5, "*": 6, "/": 6, "neg": 7, "atom": 8}


def render(node) -> str:
    """A subtree as rule text, parenthesised only where precedence needs it.

    >>> render(parse_rule("(a > 1) or not (b + 2 * c <= t.b[class])").tree)
    'a > 1 or not b + 2 * c <= t.b[class]'
    """
    text, _ = _render(node)
    return text


def _render(node) -> tuple[str, int]:
    def wrap(child, least: int) -> str:
        text, level = _render(child)
        return f"({text})" if level < least else text

    if isinstance(node, Num):
        return f"{node.value:g}", _PRECEDENCE["atom"]
    if isinstance(node, ScoreRef):
        return node.name, _PRECEDENCE["atom"]
    if isinstance(node, ThresholdRef):
        return f"{THRESHOLDS}.{node.name}", _PRECEDENCE["atom"]
    if isinstance(node, ClassThresholdRef):
        return f"{THRESHOLDS}.{node.name}[{CLASS}]", _PRECEDENCE["atom"]
    if isinstance(node, Neg):
        return "-" + wrap(node.operand, _PRECEDENCE["neg"]), _PRECEDENCE["neg"]
    if isinstance(node, Not):
        return "not " + wrap(node.operand, _PRECEDENCE["not"]), _PRECEDENCE["not"]
    if isinstance(node, Logic):
        level = _PRECEDENCE[node.op]
        return f" {node.op} ".join(wrap(o, level + 1) for o in node.operands), level
    if isinstance(node, Compare):
        level = _PRECEDENCE["cmp"]
        return f"{wrap(node.left, level + 1)} {node.op} {wrap(node.right, level + 1)}", level
    level = _PRECEDENCE[node.op]  # Arith: left-associative
    return f"{wrap(node.left, level)} {node.op} {wrap(node.right, level + 1)}", level


# --- parsing -------------------------------------------------------------------------------
def _tokenize(source: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset) tokens, ending with ("end", "", len(source))."""
    tokens, pos = [], 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if m is None:
            raise RuleProblem(pos, "a name, number, operator or parenthesis", repr(source[pos]))
        if m.lastgroup != "space":
            kind = "keyword" if m.lastgroup == "name" and m.group() in KEYWORDS else m.lastgroup
            tokens.append((kind, m.group(), pos))
            if len(tokens) > MAX_TOKENS:
                raise RuleProblem(pos, f"a rule of at most {MAX_TOKENS} tokens", "a longer rule")
        pos = m.end()
    return tokens + [("end", "", len(source))]


def _found(token) -> str:
    kind, text, _ = token
    return "the end of the rule" if kind == "end" else f"'{text}'"


class _Parser:
    """Recursive descent over the grammar in the module docstring."""

    def __init__(self, source: str):
        self.tokens = _tokenize(source)
        self.i = 0
        self.depth = 0

    def peek(self):
        return self.tokens[self.i]

    def take(self):
        token = self.tokens[self.i]
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return token

    def at(self, *texts: str) -> bool:
        kind, text, _ = self.peek()
        return kind in ("op", "keyword") and text in texts

    def nest(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RuleProblem(pos, f"at most {MAX_DEPTH} nested parentheses or unary operators", "deeper nesting")

    def parse(self):
        tree = self.or_()
        if self.peek()[0] != "end":
            raise RuleProblem(self.peek()[2], "an operator or the end of the rule", _found(self.peek()))
        return tree

    def logic(self, op: str, operand):
        first = operand()
        operands = [first]
        while self.at(op):
            self.take()
            operands.append(operand())
        return first if len(operands) == 1 else Logic(op, tuple(operands), first.pos)

    def or_(self):
        return self.logic("or", self.and_)

    def and_(self):
        return self.logic("and", self.not_)

    def not_(self):
        if self.at("not"):
            pos = self.take()[2]
            self.nest(pos)
            node = Not(self.not_(), pos)
            self.depth -= 1
            return node
        return self.cmp()

    def cmp(self):
        left = self.arith()
        if self.at(*_COMPARE):
            op = self.take()[1]
            return Compare(op, left, self.arith(), left.pos)
        return left

    def arith(self):
        node = self.term()
        while self.at("+", "-"):
            node = Arith(self.take()[1], node, self.term(), node.pos)
        return node

    def term(self):
        node = self.unary()
        while self.at("*", "/"):
            node = Arith(self.take()[1], node, self.unary(), node.pos)
        return node

    def unary(self):
        if self.at("-"):
            pos = self.take()[2]
            self.nest(pos)
            node = Neg(self.unary(), pos)
            self.depth -= 1
            return node
        return self.atom()

    def atom(self):
        kind, text, pos = self.take()
        if kind == "number":
            return Num(float(text), pos)
        if kind == "name" and text == THRESHOLDS and self.at("."):
            self.take()
            name_kind, name, _ = self.take()
            if name_kind != "name":
                raise RuleProblem(pos, "t.NAME with NAME a score", f"'t.{name}'")
            if not self.at("["):
                return ThresholdRef(name, pos)
            self.take()
            inner_kind, inner, inner_pos = self.take()
            if (inner_kind, inner) != ("name", CLASS):
                raise RuleProblem(inner_pos, f"'{CLASS}' (t.{name}[{CLASS}] is the threshold of the box's "
                                  "predicted class)", _found((inner_kind, inner, inner_pos)))
            if not self.at("]"):
                raise RuleProblem(self.peek()[2], "']'", _found(self.peek()))
            self.take()
            return ClassThresholdRef(name, pos)
        if kind == "name":
            if self.at("["):
                raise RuleProblem(self.peek()[2], "an operator or the end of the rule", "'['",
                                  f"only thresholds are per class: write t.{text}[{CLASS}]" if text != THRESHOLDS
                                  else f"a threshold is t.NAME: write t.NAME[{CLASS}]")
            return ScoreRef(text, pos)
        if kind == "op" and text == "(":
            self.nest(pos)
            inner = self.or_()
            if not self.at(")"):
                raise RuleProblem(self.peek()[2], "')'", _found(self.peek()))
            self.take()
            self.depth -= 1
            return dataclasses.replace(inner, pos=pos)
        raise RuleProblem(pos, "a score, t.NAME, a number or '('", _found((kind, text, pos)))


def parse_rule(source: str) -> Rule:
    """Parse and type-check a rule (names are not resolved here; see `check_rule`).

    Raises RuleProblem at the first syntax or type error.

    >>> parse_rule("not (a > 1)").tree
    Not(operand=Compare(op='>', left=ScoreRef(name='a', pos=5), right=Num(value=1.0, pos=9), pos=4), pos=0)
    """
    tree = _Parser(source).parse()
    problems = _type_problems(tree, want="bool")
    if problems:
        raise problems[0]
    return Rule(source, tree)


def _kind(node) -> str:
    return "bool" if isinstance(node, (Compare, Not, Logic)) else "number"


_WANT = {"bool": "a condition (a comparison, or and/or/not of them)", "number": "a number"}
_GOT = {"bool": "a condition", "number": "a number expression"}


def _type_problems(node, want: str) -> list[RuleProblem]:
    """Type errors of `node` used where a `want` ("bool"/"number") is needed."""
    problems = []
    if _kind(node) != want:
        problems.append(RuleProblem(node.pos, _WANT[want], _GOT[_kind(node)]))
    child_want = "bool" if isinstance(node, (Not, Logic)) else "number"
    for child in _children(node):
        problems += _type_problems(child, child_want)
    return problems


def check_rule(source: str, scores: set[str] | None) -> tuple[Rule | None, list[RuleProblem]]:
    """Parse a rule and resolve its names against the defined scores (None: skip that,
    because the scores themselves are broken and were reported already).

    >>> check_rule("enrgy > t.energy", {"energy"})[1][0].hint
    "did you mean 'energy'?"
    """
    try:
        tree = _Parser(source).parse()
    except RuleProblem as problem:
        return None, [problem]
    problems = _type_problems(tree, want="bool")
    rule = Rule(source, tree)
    if scores is None:
        return (None if problems else rule), problems
    defined = ", ".join(sorted(scores)) or "none defined"
    for node in _walk(tree):
        if isinstance(node, ScoreRef) and node.name not in scores:
            problems.append(RuleProblem(node.pos, f"a score name (one of: {defined})",
                                        f"'{node.name}'", did_you_mean(node.name, scores)))
        elif isinstance(node, ThresholdRef) and node.name not in scores:
            problems.append(RuleProblem(node.pos, f"t.NAME with NAME a score (one of: {defined})",
                                        f"'t.{node.name}'", did_you_mean(node.name, scores)))
        elif isinstance(node, ClassThresholdRef) and node.name not in scores:
            problems.append(RuleProblem(node.pos, f"t.NAME[class] with NAME a score (one of: {defined})",
                                        f"'t.{node.name}[class]'", did_you_mean(node.name, scores)))
    if not problems and not rule.names():
        problems.append(RuleProblem(0, "a rule that reads at least one score", "a rule on constants only"))
    return (None if problems else rule), sorted(problems, key=lambda p: p.pos)
