"""A small declarative schema: one definition both validates specs and emits JSON Schema.

Each type has `validate(value, path, ctx)` (returns the normalised value, or INVALID after
reporting through `ctx`) and `json()` (its JSON Schema, draft 2020-12), so the checks the
loader runs and the schema editors see cannot drift apart.

>>> ctx = Collector()
>>> Record({"n": Field(Int(min=1), required=True)}).validate({"n": 0}, (), ctx), ctx.problems
({'n': INVALID}, [Problem(path=('n',), expected='an integer >= 1', found='integer 0', hint='', at_key=False)])
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from certood.spec.source import INVALID, KeyPath, describe


MISSING: Any = object()  # a Field without a default


@dataclass(frozen=True)
class Problem:
    """An unlocated issue; the loader attaches file, line and column from the key path."""

    path: KeyPath
    expected: str
    found: str
    hint: str = ""
    at_key: bool = False  # locate at the mapping key rather than at its value


@dataclass
class Collector:
    """Gathers problems during a validation walk."""

    problems: list[Problem] = field(default_factory=list)

    def add(self, path: KeyPath, expected: str, found: str, hint: str = "", at_key: bool = False) -> None:
        self.problems.append(Problem(tuple(path), expected, found, hint, at_key))


def closest(word: object, choices) -> str | None:
    """The choice closest to a misspelt word, if any is close.

    >>> closest("wieghts", ["weights", "arch"])
    'weights'

    A choice with the same letters in another order comes first (transposed characters,
    which difflib scores low on short words such as operators):

    >>> closest("=>", [">", ">=", "<", "<="])
    '>='
    """
    if not isinstance(word, str):
        return None
    transposed = [str(c) for c in choices if sorted(str(c)) == sorted(word) and str(c) != word]
    if transposed:
        return transposed[0]
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: object, choices) -> str:
    """A "did you mean" hint, or "" when nothing is close."""
    match = closest(word, choices)
    return f"did you mean '{match}'?" if match else ""


class _Type:
    """Base of the schema types: INVALID (a value already reported) passes through silently."""

    def validate(self, value, path: KeyPath, ctx: Collector):
        """The normalised value, or INVALID after reporting the problem to `ctx`."""
        return INVALID if value is INVALID else self.check(value, path, ctx)


def _listing(choices) -> str:
    return ", ".join(str(c) for c in choices)


@dataclass(frozen=True)
class Str(_Type):
    """A string, optionally matching `pattern` in full (a regex valid in Python and ECMA 262)."""

    pattern: str | None = None
    expected: str = "a string"
    description: str = ""

    def check(self, value, path, ctx):
        if not isinstance(value, str) or (self.pattern and not re.fullmatch(self.pattern, value)):
            hint = "YAML reads yes/no/on/off/true/false as booleans: quote it" if isinstance(value, bool) else ""
            ctx.add(path, self.expected, describe(value), hint)
            return INVALID
        return value

    def json(self) -> dict:
        out: dict = {"type": "string"}
        if self.pattern:
            out["pattern"] = f"^(?:{self.pattern})$"
        return _described(out, self.description)


@dataclass(frozen=True)
class Int(_Type):
    """An integer in [min, max] (booleans are not integers)."""

    min: int | None = None
    max: int | None = None
    description: str = ""

    @property
    def expected(self) -> str:
        bounds = [f">= {self.min}" if self.min is not None else "", f"<= {self.max}" if self.max is not None else ""]
        return " ".join(["an integer", " and ".join(b for b in bounds if b)]).strip()

    def check(self, value, path, ctx):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            ctx.add(path, self.expected, describe(value))
            return INVALID
        return value

    def json(self) -> dict:
        out: dict = {"type": "integer"}
        if self.min is not None:
            out["minimum"] = self.min
        if self.max is not None:
            out["maximum"] = self.max
        return _described(out, self.description)


@dataclass(frozen=True)
class Float(_Type):
    """A finite number within bounds; YAML integers are accepted and become floats.

    `gt`/`lt` are exclusive bounds, `ge`/`le` inclusive ones.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    description: str = ""

    @property
    def expected(self) -> str:
        lo = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        hi = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else ""
        return " ".join(["a number", " and ".join(b for b in (lo, hi) if b)]).strip()

    def _in_range(self, x: float) -> bool:
        return math.isfinite(x) and all((
            self.ge is None or x >= self.ge, self.gt is None or x > self.gt,
            self.le is None or x <= self.le, self.lt is None or x < self.lt,
        ))

    def check(self, value, path, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
            if self._in_range(number):
                return number
        ctx.add(path, self.expected, describe(value))
        return INVALID

    def json(self) -> dict:
        out: dict = {"type": "number"}
        for key, bound in (("minimum", self.ge), ("exclusiveMinimum", self.gt),
                           ("maximum", self.le), ("exclusiveMaximum", self.lt)):
            if bound is not None:
                out[key] = bound
        return _described(out, self.description)


@dataclass(frozen=True)
class Enum(_Type):
    """One of fixed choices, matched by type too (so `true` is not `1`)."""

    choices: tuple
    description: str = ""

    @property
    def expected(self) -> str:
        return f"one of: {_listing(self.choices)}"

    def check(self, value, path, ctx):
        if any(type(value) is type(c) and value == c for c in self.choices):
            return value
        ctx.add(path, self.expected, describe(value), did_you_mean(value, self.choices))
        return INVALID

    def json(self) -> dict:
        return _described({"enum": list(self.choices)}, self.description)


@dataclass(frozen=True)
class AnyOf(_Type):
    """The first option that accepts the value wins; otherwise one combined problem."""

    options: tuple
    description: str = ""

    @property
    def expected(self) -> str:
        return " or ".join(o.expected for o in self.options)

    def check(self, value, path, ctx):
        for option in self.options:
            out = option.validate(value, path, Collector())
            if out is not INVALID:
                return out
        ctx.add(path, self.expected, describe(value))
        return INVALID

    def json(self) -> dict:
        return _described({"anyOf": [o.json() for o in self.options]}, self.description)


@dataclass(frozen=True)
class Field:
    """A key of a Record: its schema, whether it is required, and its default."""

    schema: Any
    required: bool = False
    default: Any = MISSING
    description: str = ""


@dataclass(frozen=True)
class Record(_Type):
    """A mapping with known keys. `one_of` lists key groups of which exactly one must be
    present, complete (e.g. `(("digitsdet",), ("annotations", "images"))`); with
    `one_of_required=False`, at most one (none is fine: the fields' defaults apply)."""

    fields: dict
    one_of: tuple = ()
    description: str = ""
    one_of_required: bool = True

    @property
    def expected(self) -> str:
        return f"a mapping with keys: {_listing(self.fields)}"

    def check(self, value, path, ctx):
        if not isinstance(value, dict):
            ctx.add(path, self.expected, describe(value))
            return INVALID
        out, suggested = {}, set()
        for key, item in value.items():
            if key not in self.fields:
                match = closest(key, self.fields)  # once: difflib is most of the cost of a file of typos
                suggested.add(match)
                hint = f"did you mean '{match}'?" if match else ""
                ctx.add(path + (key,), f"one of the keys: {_listing(self.fields)}",
                        f"unknown key '{key}'", hint, at_key=True)
            else:
                out[key] = self.fields[key].schema.validate(item, path + (key,), ctx)
        for key, f in self.fields.items():
            if key in value or key in suggested:  # a misspelt key is one issue, not two
                continue
            if f.required:
                ctx.add(path + (key,), f"key '{key}' ({f.schema.expected})", "nothing")
            elif f.default is not MISSING:
                out[key] = f.default
        self._check_one_of(value, path, ctx)
        return out

    def _check_one_of(self, value: dict, path, ctx) -> None:
        if not self.one_of:
            return
        wanted = " or ".join(" with ".join(f"'{k}'" for k in group) for group in self.one_of)
        present = [g for g in self.one_of if any(k in value for k in g)]
        if not present:
            if self.one_of_required:
                ctx.add(path, f"either {wanted}", "neither")
        elif len(present) > 1:
            first, second = (next(k for k in g if k in value) for g in present[:2])
            ctx.add(path + (second,), f"only one of {wanted}", f"both '{first}' and '{second}'", at_key=True)
        else:
            for key in present[0]:
                if key not in value:
                    given = next(k for k in present[0] if k in value)
                    ctx.add(path + (key,), f"key '{key}' (required with '{given}')", "nothing")

    def json(self) -> dict:
        props = {}
        for key, f in self.fields.items():
            props[key] = _described(f.schema.json(), f.description)
            if f.default is not MISSING:
                props[key]["default"] = f.default
        out: dict = {"type": "object", "properties": props, "additionalProperties": False}
        required = [k for k, f in self.fields.items() if f.required]
        if required:
            out["required"] = required
        if self.one_of and self.one_of_required:
            out["oneOf"] = [{"required": list(g)} for g in self.one_of]
        elif self.one_of:  # at most one group: no key of one group beside a key of another
            out["not"] = {"anyOf": [{"required": [a, b]} for i, g in enumerate(self.one_of)
                                    for h in self.one_of[i + 1:] for a in g for b in h]}
        if self.one_of:
            out["dependentRequired"] = {k: [o for o in g if o != k] for g in self.one_of if len(g) > 1 for k in g}
        return _described(out, self.description)


@dataclass(frozen=True)
class Tagged(_Type):
    """A Record chosen by its `tag` key; a missing tag defaults to the entry's own name
    (so `energy: {tap: logits}` is an energy score). Used as the values of a Map."""

    variants: dict  # tag value -> Record (whose fields include the tag key)
    tag: str = "kind"
    description: str = ""

    @property
    def expected(self) -> str:
        return f"a mapping with a '{self.tag}' (one of: {_listing(self.variants)})"

    def check(self, value, path, ctx):
        if not isinstance(value, dict):
            ctx.add(path, self.expected, describe(value))
            return INVALID
        name = path[-1] if path else None
        if self.tag in value:
            kind = value[self.tag]
            if not (isinstance(kind, str) and kind in self.variants):
                ctx.add(path + (self.tag,), f"one of: {_listing(self.variants)}", describe(kind),
                        did_you_mean(kind, self.variants))
                return INVALID
        elif name in self.variants:
            kind = name
        else:
            ctx.add(path, f"a '{self.tag}' key (one of: {_listing(self.variants)})", "none",
                    f"add '{self.tag}: ...', or name the entry after its {self.tag}", at_key=True)
            return INVALID
        out = self.variants[kind].validate(value, path, ctx)
        return {**out, self.tag: kind}

    def json_for(self, name: str | None) -> dict:
        """Schema of an entry called `name` (None: any other name, which must state its tag)."""
        options = []
        for kind, record in self.variants.items():
            schema = record.json()
            schema["properties"][self.tag] = {"const": kind}
            if kind != name:
                schema["required"] = [self.tag, *schema.get("required", [])]
            options.append(schema)
        return _described({"anyOf": options}, self.description)

    def json(self) -> dict:
        return self.json_for(None)


@dataclass(frozen=True)
class Map(_Type):
    """A mapping from user-chosen names (matching `key_pattern`) to values of one schema."""

    values: Any
    key_pattern: str
    key_expected: str
    min_items: int = 0
    description: str = ""
    max_items: int | None = None  # checked before any entry: an oversized map is one issue, not one per entry
    max_hint: str = ""

    @property
    def expected(self) -> str:
        return "a mapping of names to entries" if not self.min_items else "a non-empty mapping of names to entries"

    def check(self, value, path, ctx):
        if not isinstance(value, dict) or len(value) < self.min_items:
            ctx.add(path, self.expected, describe(value) if value != {} else "an empty mapping")
            return INVALID
        if self.max_items is not None and len(value) > self.max_items:
            ctx.add(path, f"at most {self.max_items} entries", f"{len(value):,} entries", self.max_hint, at_key=True)
            return INVALID
        out = {}
        for key, item in value.items():
            if not re.fullmatch(self.key_pattern, key):
                ctx.add(path + (key,), self.key_expected, repr(key), at_key=True)
            out[key] = self.values.validate(item, path + (key,), ctx)
        return out

    def json(self) -> dict:
        out: dict = {"type": "object", "propertyNames": {"pattern": f"^(?:{self.key_pattern})$"}}
        if isinstance(self.values, Tagged):
            out["properties"] = {k: self.values.json_for(k) for k in self.values.variants}
            out["additionalProperties"] = self.values.json_for(None)
        else:
            out["additionalProperties"] = self.values.json()
        if self.min_items:
            out["minProperties"] = self.min_items
        if self.max_items is not None:
            out["maxProperties"] = self.max_items
        return _described(out, self.description)


@dataclass(frozen=True)
class List(_Type):
    """A YAML sequence whose items all follow one schema (e.g. the spec's `gate:` policies)."""

    items: Any
    min_items: int = 0
    description: str = ""

    @property
    def expected(self) -> str:
        return "a list" if not self.min_items else "a non-empty list"

    def check(self, value, path, ctx):
        if not isinstance(value, list) or len(value) < self.min_items:
            ctx.add(path, self.expected, describe(value) if value != [] else "an empty list")
            return INVALID
        return [self.items.validate(item, path + (i,), ctx) for i, item in enumerate(value)]

    def json(self) -> dict:
        out: dict = {"type": "array", "items": self.items.json()}
        if self.min_items:
            out["minItems"] = self.min_items
        return _described(out, self.description)


def _described(schema: dict, description: str) -> dict:
    if description and "description" not in schema:
        schema["description"] = description
    return schema


_SCHEMA_MAPS = ("properties", "$defs", "patternProperties", "dependentSchemas")
_SCHEMA_ONE = ("additionalProperties", "items", "not", "propertyNames", "if", "then", "else", "contains")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def factor_repeats(schema: dict, min_chars: int = 400, keep_top: bool = True) -> dict:
    """`schema` with each subschema that occurs more than once (and is at least `min_chars`
    long as JSON) moved to `$defs` and referenced, so that tagged records repeated under
    every score name are written once. `keep_top`: the root's own `properties` stay inline
    (what editors and readers look at first). Names are content hashes: deterministic.

    >>> big = {"type": "object", "description": "x" * 500}
    >>> out = factor_repeats({"anyOf": [big, big]}, keep_top=False)
    >>> out["anyOf"][0] == out["anyOf"][1] == {"$ref": "#/$defs/s" + out["anyOf"][0]["$ref"][-10:]}
    True
    """
    import hashlib
    import json

    canon: dict[int, str] = {}
    counts: dict[str, int] = {}

    def measure(node) -> str:  # canonical JSON, bottom-up, counted in schema positions
        if isinstance(node, dict):
            text = "{" + ",".join(json.dumps(k) + ":" + measure(node[k]) for k in sorted(node)) + "}"
        elif isinstance(node, list):
            text = "[" + ",".join(measure(v) for v in node) + "]"
        else:
            return json.dumps(node, sort_keys=True)
        canon[id(node)] = text
        return text

    def count(node) -> None:
        if not isinstance(node, dict):
            return
        text = canon[id(node)]
        if len(text) >= min_chars:
            counts[text] = counts.get(text, 0) + 1
        for sub in _subschemas(node):
            count(sub)

    measure(schema)
    count(schema)
    defs: dict[str, dict] = {}

    def rewrite(node, protect: bool = False):
        if not isinstance(node, dict):
            return node
        text = canon[id(node)]
        if not protect and counts.get(text, 0) > 1:
            name = "s" + hashlib.sha256(text.encode()).hexdigest()[:10]
            if name not in defs:
                defs[name] = {}
                defs[name] = rebuild(node)
            return {"$ref": f"#/$defs/{name}"}
        return rebuild(node)

    def rebuild(node: dict, top: bool = False) -> dict:
        out = {}
        for key, value in node.items():
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {k: rewrite(v, protect=top and key == "properties") for k, v in value.items()}
            elif key in _SCHEMA_ONE and isinstance(value, dict):
                out[key] = rewrite(value)
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                out[key] = [rewrite(v) for v in value]
            else:
                out[key] = value
        return out

    result = rebuild(schema, top=keep_top)
    if defs:
        result["$defs"] = {**result.get("$defs", {}), **dict(sorted(defs.items()))}
    return result


def _subschemas(node: dict):
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            yield from (v for v in value.values() if isinstance(v, dict))
        elif key in _SCHEMA_ONE and isinstance(value, dict):
            yield value
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            yield from (v for v in value if isinstance(v, dict))
