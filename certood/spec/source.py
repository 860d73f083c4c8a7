"""Strict YAML reading: bytes -> plain values, each with its 1-based source position.

Only PyYAML's scanner and parser run (an event stream); no constructor ever does. A tag
therefore cannot build an object, and an alias cannot expand (aliases and anchors are
rejected outright, which also defuses "billion laughs" bombs).

Specs are small, so reading is bounded before it starts: at most MAX_SPEC_BYTES of text,
MAX_VALUES keys and values, and MAX_DEPTH levels of nesting. The nesting limit is enforced
inside PyYAML's scanner (`_BoundedLoader`), where each open flow collection costs every later
token a pass over its pending simple keys (100,000 nested `[` took minutes); the other two
stop the event stream at the first value too many. Past any limit the document is refused
at once, with one issue at the place the limit was reached.

>>> doc = read_yaml(b"a:\\n  b: 1\\n", "m.yaml")
>>> doc.value, doc.values[("a", "b")], doc.issues
({'a': {'b': 1}}, Loc(line=2, column=6, source='1'), [])
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    MappingEndEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode

from certood.errors import SpecIssue
from certood.spec.files import MAX_SPEC_BYTES, size_text

KeyPath = tuple  # of str (mapping keys) and int (list indices)


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()  # a value rejected and reported already (an alias, a bad number...)

MAX_DEPTH = 64  # nesting deeper than any spec needs; keeps every walker far from recursion limits
MAX_VALUES = 10_000  # keys and values of one document; PyYAML reads about 10,000 a second
# YAML 1.1 reads these plain words as booleans; as mapping keys they are names (`on: near_val`),
# as YAML 1.2 and editors read them. `true`/`false` keys stay booleans (and are rejected).
WORD_KEYS = frozenset(w for word in ("yes", "no", "on", "off") for w in (word, word.title(), word.upper()))
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts as a line break
_TAG_PREFIX = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class Loc:
    """Where a node starts (1-based), and its text as written for scalars ("" otherwise).
    `file` names the file for values a spec inherits through `extends` ("": the spec itself)."""

    line: int
    column: int
    source: str = ""
    file: str = field(default="", repr=False, compare=False)


@dataclass
class Document:
    """A parsed YAML document: plain value, positions by key path, problems found while reading.

    `value` is None when nothing usable was read (then `issues` says why); rejected parts
    (aliases, malformed numbers) are INVALID.
    """

    value: object
    values: dict[KeyPath, Loc] = field(default_factory=dict)  # where each value starts
    keys: dict[KeyPath, Loc] = field(default_factory=dict)  # where each mapping key is written
    issues: list[SpecIssue] = field(default_factory=list)
    # why `value` is None, in words that never quote the text ("not valid YAML (line 3,
    # column 1)", "a list, not a mapping"): what `extends` reports about an unusable parent
    unusable: str = ""


def key_path_str(path: KeyPath) -> str:
    """Dotted key path for people.

    >>> key_path_str(("scores", "maha", "tap")), key_path_str(("a", 0, "b"))
    ('scores.maha.tap', 'a[0].b')
    """
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def line_col(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of a character index, counting line breaks as YAML does.

    >>> line_col("ab\\r\\ncd", 5)
    (2, 2)
    """
    line, start = 1, 0
    for m in LINE_BREAK.finditer(text, 0, index):
        line, start = line + 1, m.end()
    return line, index - start + 1


def decode_utf8(data: bytes, file: str) -> tuple[str | None, list[SpecIssue]]:
    """Decode spec bytes; a bad byte becomes an issue located at its line and column.

    >>> decode_utf8(b"a: 1\\nb: \\xff", "m.yaml")[1][0].column
    4
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line_start = before.rfind(b"\n") + 1
        line = before.count(b"\n") + 1
        column = len(before[line_start:].decode("utf-8", "replace")) + 1
        found = f"byte 0x{data[e.start]:02x}, which is not valid UTF-8"
        issue = SpecIssue(file, line, column, "", "UTF-8 text", found, "save the file as UTF-8")
        return None, [issue]
    return text.removeprefix("\ufeff"), []


def describe(value: object) -> str:
    """How a found value reads in an error message.

    >>> describe(None), describe(True), describe("x" * 3), describe({})
    ('nothing (null)', 'boolean true', "'xxx'", 'a mapping')
    """
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):  # bit_length guard: str() of a huge int raises ValueError
        return f"integer {value}" if value.bit_length() < 128 else "a very large integer"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def kind_of(value: object) -> str:
    """What kind of value a document holds, without quoting it (for a file that is not a spec).

    >>> kind_of("root:x:0:0"), kind_of([1]), kind_of(3.5)
    ('a string', 'a list', 'a number')
    """
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(type(value), "a value")


def read_yaml(text: str | bytes, file: str) -> Document:
    """Read one YAML document strictly into plain values with positions (see module doc)."""
    if len(text) > MAX_SPEC_BYTES:  # before decoding or parsing anything
        unit = "bytes" if isinstance(text, bytes) else "characters"
        found = f"{len(text):,} {unit}"
        limit = size_text(MAX_SPEC_BYTES) if unit == "bytes" else f"{MAX_SPEC_BYTES:,} characters"
        issue = SpecIssue(file, 1, 1, "", f"a spec of at most {limit}", found, "specs are small: is this the right file?")
        return Document(None, issues=[issue], unusable=f"{found}, over the {limit} limit")
    if isinstance(text, bytes):
        decoded, issues = decode_utf8(text, file)
        if decoded is None:
            at = issues[0]
            return Document(None, issues=issues, unusable=f"not UTF-8 text (line {at.line}, column {at.column})")
        text = decoded
    return _Reader(text, file).read()


class _Refused(Exception):
    """A reading limit reached: the document is refused at `mark`."""

    def __init__(self, mark, expected: str, found: str):
        super().__init__(found)
        self.mark, self.expected, self.found = mark, expected, found


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe scanner and parser with MAX_DEPTH and MAX_VALUES enforced as they read.

    Only the scanner knows flow nesting early enough: it looks ahead up to 1,024 characters
    for a simple key, and every open `[`/`{` makes each later token slower. Block nesting is
    counted by its indentation stack (a sequence written at its key's indentation opens no
    indentation level; the reader's own depth check covers it)."""

    values_read = 0

    def _open_levels(self) -> int:
        return len(self.indents) + self.flow_level

    def fetch_flow_collection_start(self, TokenClass):
        if self._open_levels() >= MAX_DEPTH:
            raise _Refused(self.get_mark(), f"at most {MAX_DEPTH} levels of nesting", "deeper nesting")
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column):
        if self.indent < column and self._open_levels() >= MAX_DEPTH:
            raise _Refused(self.get_mark(), f"at most {MAX_DEPTH} levels of nesting", "deeper nesting")
        return super().add_indent(column)

    def get_event(self):
        event = super().get_event()
        if isinstance(event, (ScalarEvent, CollectionStartEvent, AliasEvent)):
            self.values_read += 1
            if self.values_read > MAX_VALUES:
                raise _Refused(event.start_mark, f"at most {MAX_VALUES:,} keys and values in a spec",
                               "more (specs are small)")
        return event


class _Reader:
    """Walks PyYAML's event stream, building plain values and recording positions."""

    def __init__(self, text: str, file: str):
        self.text, self.file = text, file
        self.doc = Document(None)
        self.aliases_seen: set[str] = set()
        self.events: _BoundedLoader | None = None

    def issue(self, mark, path: KeyPath, expected: str, found: str, hint: str = "") -> None:
        """Record a problem at a PyYAML mark (0-based), a Loc (1-based) or, for None, 1:1."""
        if isinstance(mark, Loc):
            line, column = mark.line, mark.column
        else:
            line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        self.doc.issues.append(
            SpecIssue(self.file, line, column, key_path_str(path), expected, found, hint)
        )

    def read(self) -> Document:
        try:
            self.events = _BoundedLoader(self.text)  # only its parser/resolver are used
            self._read_stream()
        except _Refused as e:
            self.doc.value = None
            self.issue(e.mark, (), e.expected, e.found)
            self.doc.unusable = f"{e.expected.replace('at most', 'more than')} ({self._at(e.mark)})"
        except yaml.MarkedYAMLError as e:
            self.doc.value = None
            found = e.problem or "invalid YAML"
            hint = f"{e.context}" if e.context else ""
            self.issue(e.problem_mark or e.context_mark, (), "valid YAML", found, hint)
            self.doc.unusable = f"not valid YAML ({self._at(e.problem_mark or e.context_mark)})"
        except yaml.reader.ReaderError as e:  # a character YAML does not allow
            self.doc.value = None
            line, column = line_col(self.text, e.position)
            found = f"character {e.character:#06x}, which YAML does not allow"
            self.doc.issues.append(SpecIssue(self.file, line, column, "", "valid YAML", found))
            self.doc.unusable = f"not valid YAML (line {line}, column {column})"
        finally:
            if self.events is not None:
                self.events.dispose()
        return self.doc

    @staticmethod
    def _at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "line 1, column 1"

    def _read_stream(self) -> None:
        ev = self.events
        ev.get_event()  # StreamStart
        if ev.check_event(StreamEndEvent):
            self.issue(None, (), "a mapping of spec keys", "an empty document")
            self.doc.unusable = "an empty document"
            return
        start = ev.get_event().start_mark  # DocumentStart
        value = self._node((), 0)
        ev.get_event()  # DocumentEnd
        if value is INVALID:  # the whole document was rejected, and reported
            self.doc.unusable = "not a plain YAML mapping"
            return
        if value is None:
            self.issue(start, (), "a mapping of spec keys", "an empty document")
            self.doc.unusable = "an empty document"
            return
        if not isinstance(value, dict):
            self.issue(self.doc.values.get(()), (), "a mapping of spec keys", describe(value))
            self.doc.unusable = f"{kind_of(value)}, not a mapping"
            return
        self.doc.value = value
        if not ev.check_event(StreamEndEvent):
            self.issue(ev.peek_event().start_mark, (), "a single YAML document",
                       "a second document", "remove the '---' separator and what follows it")

    def _node(self, path: KeyPath, depth: int, record: bool = True):
        """Consume one node's events and return its plain value (INVALID where rejected)."""
        event = self.events.get_event()
        mark = event.start_mark
        if record:
            source = self.text[mark.index : event.end_mark.index] if isinstance(event, ScalarEvent) else ""
            self.doc.values[path] = Loc(mark.line + 1, mark.column + 1, source)
        if isinstance(event, AliasEvent):
            if event.anchor not in self.aliases_seen:
                self.aliases_seen.add(event.anchor)
                self.issue(mark, path, "a plain value (aliases are not allowed)",
                           f"alias *{event.anchor}", "write the value out in full")
            return INVALID
        if event.anchor is not None:
            self.issue(mark, path, "a plain value (anchors are not allowed)",
                       f"anchor &{event.anchor}", "remove the anchor")
        if event.tag is not None:
            tag = event.tag.replace(_TAG_PREFIX, "!!")
            self.issue(mark, path, "an untagged value", f"tag {tag}",
                       "remove the tag: specs are plain data")
        if isinstance(event, ScalarEvent):
            return self._scalar(event, path)
        if depth >= MAX_DEPTH:  # e.g. sequences at their key's indentation, which the scanner does not count
            raise _Refused(mark, f"at most {MAX_DEPTH} levels of nesting", "deeper nesting")
        if isinstance(event, SequenceStartEvent):
            items = []
            while not self.events.check_event(SequenceEndEvent):
                items.append(self._node(path + (len(items),), depth + 1, record))
            self.events.get_event()
            return items
        return self._mapping(path, depth, record)

    def _mapping(self, path: KeyPath, depth: int, record: bool) -> dict:
        out: dict = {}
        first: dict[str, object] = {}
        while not self.events.check_event(MappingEndEvent):
            event = self.events.peek_event()
            mark = event.start_mark
            if isinstance(event, ScalarEvent) and event.style is None and event.tag is None \
                    and event.anchor is None and event.value in WORD_KEYS:
                key = self.events.get_event().value
            else:
                key = self._node(path, depth + 1, record=False)
            if key is INVALID:  # an alias as key: reported already
                self._node(path, depth + 1, record=False)
                continue
            if not isinstance(key, str):
                hint = "quote the key" if not isinstance(key, (dict, list)) else ""
                self.issue(mark, path, "a string key", describe(key), hint)
                self._node(path, depth + 1, record=False)
                continue
            if key in first:
                at = first[key]
                self.issue(mark, path + (key,), "each key at most once",
                           f"duplicate key '{key}' (first at line {at.line + 1}, column {at.column + 1})",
                           "remove one of them")
                self._node(path + (key,), depth + 1, record=False)
                continue
            first[key] = mark
            if record:
                self.doc.keys[path + (key,)] = Loc(mark.line + 1, mark.column + 1, key)
            out[key] = self._node(path + (key,), depth + 1, record)
            if record and out[key] is None and self.doc.values[path + (key,)].source == "":
                self.doc.values[path + (key,)] = self.doc.keys[path + (key,)]  # `key:` with no value
        self.events.get_event()
        return out

    def _scalar(self, event: ScalarEvent, path: KeyPath):
        """Plain scalars resolve as YAML 1.1 (null/bool/int/float); everything else is a string."""
        if event.style is not None:  # quoted or block: always a string
            return event.value
        node = ScalarNode(None, event.value, event.start_mark, event.end_mark)
        tag = self.events.resolve(ScalarNode, event.value, (True, False))
        convert = {
            _TAG_PREFIX + "null": lambda: None,
            _TAG_PREFIX + "bool": lambda: self.events.construct_yaml_bool(node),
            _TAG_PREFIX + "int": lambda: self.events.construct_yaml_int(node),
            _TAG_PREFIX + "float": lambda: self.events.construct_yaml_float(node),
        }.get(tag)
        if convert is None:  # str, and YAML 1.1 timestamps/merge keys, kept as written
            return event.value
        try:
            return convert()
        except ValueError:  # e.g. "0x_" or an int past Python's digit limit
            self.issue(event.start_mark, path, "a valid number", repr(event.value[:40]), "quote it if it is text")
            return INVALID
