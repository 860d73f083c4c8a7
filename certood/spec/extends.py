"""`extends: other.yaml`: a spec that starts from another one, still plain data.

The parent is read as strictly as the spec itself (nothing is imported or run), relative to
the file that names it, and may extend another file in turn. Merging: the child's mappings
merge over the parent's, recursively; lists and scalars replace the parent's value; a null
removes an inherited mapping or list (a data set, a section, the gate list). Where the
schema offers a choice, the child's choice replaces the parent's: a threshold method (tpr /
fpr + on / fixed) or a data source form (digitsdet / annotations + images) drops the
parent's other keys, and another `kind` (of the detector, of a score) replaces the whole
entry. Every merged value keeps the position, and the file, it was written at (`Loc.file`),
so an error in an inherited value names the parent's file:line:col. A missing parent, a
cycle (reported with its chain), or a parent that cannot be used as a spec (not a regular
file, over 1 MiB, not YAML, not a mapping, past a reading limit) is an error at the `extends`
value that leads there, naming the parent and never quoting it (`extends: /etc/passwd` must
not print the password file). Errors inside a parent that is a YAML mapping are located in it.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "base.yaml").write_text("a: {b: 1, c: [1, 2]}\\nd: {e: 4}\\n")
>>> doc, dirs = read_spec_document("extends: base.yaml\\na: {c: [3]}\\nd: null\\n", "m.yaml", d)
>>> doc.value, doc.values[("a", "b")].file, doc.values[("a", "c")].file
({'a': {'b': 1, 'c': [3]}}, 'base.yaml', '')
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from certood.errors import SpecIssue
from certood.spec.files import MAX_SPEC_BYTES, UnreadableFile, read_spec_bytes, size_text
from certood.spec.schema import List, Map, Record, Tagged
from certood.spec.source import Document, KeyPath, describe, read_yaml

EXTENDS = "extends"
MAX_EXTENDS = 16  # files in one chain: far more than any project needs, and a bounded recursion
PATH_KEYS = ("weights", "path", "annotations", "images", "dir")  # values resolved against their file
PATH_SECTIONS = ("detector", "data", "output")
_ABSENT = object()


def read_spec_document(text: str | bytes, filename: str, base_dir: Path,
                       real_path: str | None = None) -> tuple[Document, dict[str, Path]]:
    """The spec's document with its `extends` chain merged in (value None when a file of the
    chain cannot be used: its issues say why), and the directory of each parent file read,
    by the name issues give it. `real_path`: the spec's own file, for cycle detection."""
    doc = read_yaml(text, filename)
    chain = ((os.path.realpath(real_path),) if real_path else (), (filename,))
    return _resolve(doc, filename, Path(base_dir), chain, MAX_SPEC_BYTES - len(text))


def _resolve(doc: Document, filename: str, base_dir: Path, chain,
             budget: int) -> tuple[Document, dict[str, Path]]:
    """`budget`: bytes the files still to read may hold, so that a spec and every file it
    extends are read within the limit of one spec file (16 parents of 1 MiB would cost 16)."""
    if not isinstance(doc.value, dict) or EXTENDS not in doc.value:
        return doc, {}
    real_chain, shown_chain = chain
    ref, loc = doc.value[EXTENDS], doc.values[(EXTENDS,)]

    def fail(expected: str, found: str, hint: str = "") -> tuple[Document, dict]:
        issue = SpecIssue(loc.file or filename, loc.line, loc.column, EXTENDS, expected, found, hint)
        return Document(None, issues=doc.issues + [issue]), {}

    if not isinstance(ref, str) or not re.fullmatch(r"[^\x00]+", ref):
        return fail("a path to the spec file this one extends", describe(ref) if ref != "" else "an empty string")
    if len(shown_chain) > MAX_EXTENDS:
        return fail(f"at most {MAX_EXTENDS} files in a chain of extends", f"a longer chain ({shown_chain[0]} -> ...)")
    target = Path(os.path.normpath(os.path.join(base_dir, ref)))
    shown = os.path.normpath(os.path.join(os.path.dirname(filename), ref)) \
        if not filename.startswith("<") else str(target)
    real = os.path.realpath(target)
    if real in real_chain:
        return fail("a chain of extends without a cycle", "a cycle: " + " -> ".join(shown_chain + (shown,)),
                    "remove one of the extends")
    try:
        data = read_spec_bytes(target)
    except UnreadableFile as e:  # missing, a directory, a FIFO, a device, too large, ...
        return fail("a readable spec file to extend", f"'{ref}': {e.reason}",
                    e.hint or ("the path is relative to this file" if not os.path.isabs(ref) else ""))
    if len(data) > budget:
        return fail(f"a spec and the files it extends of at most {size_text(MAX_SPEC_BYTES)} in all",
                    f"'{ref}': {len(data):,} bytes, after {MAX_SPEC_BYTES - budget:,} read before it")
    parent = read_yaml(data, shown)
    if parent.value is None:  # not a spec at all: said here, without the parent's issues (they quote it)
        return fail("a spec file (a YAML mapping) to extend", f"'{ref}', which is {parent.unusable}",
                    f"certood validate {shown} shows why" if "line" in parent.unusable else "")
    parent.values = {p: dataclasses.replace(v, file=shown) for p, v in parent.values.items()}
    parent.keys = {p: dataclasses.replace(v, file=shown) for p, v in parent.keys.items()}
    if parent.value is not None:
        parent, dirs = _resolve(parent, shown, target.parent, (real_chain + (real,), shown_chain + (shown,)),
                                budget - len(data))
    if parent.value is None:
        return Document(None, issues=doc.issues + parent.issues), {}
    dirs[shown] = target.parent
    return _merge(parent, doc), dirs


def _merge(parent: Document, child: Document) -> Document:
    """`child` over `parent` (each value with the position it was written at), minus `extends`."""
    out = Document(None, issues=child.issues + parent.issues)
    child_value = {k: v for k, v in child.value.items() if k != EXTENDS}
    parent_value = {k: v for k, v in parent.value.items() if k != EXTENDS}
    out.value = _merge_node((), parent_value, child_value, parent, child, out)
    return out


def _merge_node(path: KeyPath, p, c, parent: Document, child: Document, out: Document):
    if c is _ABSENT:
        _copy(path, p, parent, out)
        return p
    if not (isinstance(p, dict) and isinstance(c, dict)):
        _copy(path, c, child, out)
        return c
    schema = _schema_at(path)
    if isinstance(schema, Tagged) and schema.tag in c:  # another kind: the child's entry only
        inherited = p.get(schema.tag, path[-1] if path and path[-1] in schema.variants else None)
        if c[schema.tag] != inherited:
            _copy(path, c, child, out)
            return c
    if isinstance(schema, Record) and schema.one_of:  # the child's choice drops the parent's other one
        chosen = [g for g in schema.one_of if any(k in c for k in g)]
        if chosen:
            dropped = {k for g in schema.one_of if g not in chosen for k in g}
            p = {k: v for k, v in p.items() if k not in dropped}
    _copy_one(path, child, out)
    merged = {}
    for key in [*p, *(k for k in c if k not in p)]:
        if key in c and c[key] is None and isinstance(p.get(key), (dict, list)):  # null removes an inherited block
            continue
        merged[key] = _merge_node(path + (key,), p.get(key, _ABSENT), c.get(key, _ABSENT), parent, child, out)
    return merged


def _schema_at(path: KeyPath):
    """The spec schema type at `path` (None where unknown, e.g. inside a tagged entry)."""
    from certood.spec.v1 import SPEC  # late: v1 imports the spec model

    node = SPEC
    for key in path:
        if isinstance(node, Record) and key in node.fields:
            node = node.fields[key].schema
        elif isinstance(node, Map):
            node = node.values
        elif isinstance(node, List):
            node = node.items
        else:
            return None
    return node


def _copy_one(path: KeyPath, src: Document, out: Document) -> None:
    if path in src.values:
        out.values[path] = src.values[path]
    if path in src.keys:
        out.keys[path] = src.keys[path]


def _copy(path: KeyPath, value, src: Document, out: Document) -> None:
    """Positions of `value` (at `path` in `src`) and everything below it."""
    _copy_one(path, src, out)
    if isinstance(value, dict):
        for key, item in value.items():
            _copy(path + (key,), item, src, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _copy(path + (i,), item, src, out)


def rebase_paths(norm, doc: Document, dirs: dict[str, Path]):
    """`norm` with relative paths inherited from a parent made absolute against the parent's
    directory (a path is relative to the file it is written in); `builtin:` weights stay."""
    if not dirs or not isinstance(norm, dict):
        return norm

    def walk(path: KeyPath, value):
        if isinstance(value, dict):
            return {k: walk(path + (k,), v) for k, v in value.items()}
        if isinstance(value, str) and path and path[-1] in PATH_KEYS and not value.startswith("builtin:"):
            loc = doc.values.get(path)
            if loc is not None and loc.file in dirs:
                return os.path.normpath(os.path.join(dirs[loc.file], value))
        return value

    return {k: walk((k,), v) if k in PATH_SECTIONS else v for k, v in norm.items()}
