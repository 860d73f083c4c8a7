"""Fuzz: whatever the input, the loader returns issues or raises SpecError, never a traceback."""
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certood.errors import SpecError, SpecIssue
from certood.spec import check_spec_file, check_spec_text, load_spec_text

DEMO = (Path(__file__).parent / "fixtures" / "demo.yaml").read_text()
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
YAML_CHARS = ":{}[]-,&*!|>'\"#?%@`.\t\n\r \\0123456789truefalsyonTxe\x00\x85\u2028\ufeff\ud800é"


def assert_well_behaved(text) -> None:
    spec, issues = check_spec_text(text, "fuzz.yaml")
    assert all(isinstance(i, SpecIssue) and i.line >= 1 and i.column >= 1 for i in issues)
    assert all(i.severity in ("error", "warning") for i in issues)
    errors = [i for i in issues if i.severity == "error"]
    assert (spec is None) == bool(errors)
    if spec is not None:
        assert len(spec.fingerprint()) == 64
    try:
        load_spec_text(text, "fuzz.yaml")
    except SpecError as e:
        assert e.issues == errors and errors


@st.composite
def mutated_demo(draw) -> str:
    """The demo spec after a few character or line edits: deletes, duplicates, swaps, inserts."""
    text = DEMO
    for _ in range(draw(st.integers(1, 4))):
        lines = text.splitlines(keepends=True)
        op = draw(st.sampled_from(["del_char", "dup_char", "swap_char", "ins_char", "del_line", "dup_line", "swap_line"]))
        if not text:
            break
        if op.endswith("char"):
            i, j = draw(st.integers(0, len(text) - 1)), draw(st.integers(0, len(text) - 1))
            if op == "del_char":
                text = text[:i] + text[i + 1:]
            elif op == "dup_char":
                text = text[:i] + text[i] + text[i:]
            elif op == "ins_char":
                text = text[:i] + draw(st.sampled_from(YAML_CHARS)) + text[i:]
            else:
                chars = list(text)
                chars[i], chars[j] = chars[j], chars[i]
                text = "".join(chars)
        elif lines:
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "del_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(i, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
    return text


@FUZZ
@given(mutated_demo())
def test_mutated_demo_spec(text):
    assert_well_behaved(text)


@FUZZ
@given(st.text(alphabet=YAML_CHARS, max_size=200))
def test_yaml_like_text(text):
    assert_well_behaved(text)


@settings(FUZZ, max_examples=150)
@given(st.text(max_size=300))
def test_random_text(text):
    assert_well_behaved(text)


@settings(FUZZ, max_examples=150)
@given(st.binary(max_size=300))
def test_random_bytes(data):
    assert_well_behaved(data)


@settings(FUZZ, max_examples=50)
@given(mutated_demo().map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=200))
def test_check_spec_file_on_disk(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_bytes(data)
        issues = check_spec_file(path)
    assert all(isinstance(i, SpecIssue) and i.file == str(path) for i in issues)


# --- the rule language: per-class thresholds, and z3 on whatever parses ----------------------
RULE_LINE = 'rule: "energy > t.energy or maha > t.maha"\n'
RULE_TOKENS = ["energy", "maha", "t.energy", "t.maha", "t.energy[class]", "t.maha[class]", "[", "]", "class",
               "t.", "t", ".", "(", ")", "and", "or", "not", ">", ">=", "<", "<=", "+", "-", "*", "/", "0",
               "1.5", "1e999", "-2", "energy[class]", "t.maha[", "[class]"]


@st.composite
def rule_text(draw) -> str:
    return " ".join(draw(st.lists(st.sampled_from(RULE_TOKENS), min_size=1, max_size=25)))


@st.composite
def rule_tree(draw, depth: int = 0) -> str:
    """A well-formed rule (so that z3 sees many different ones), arithmetic and logic mixed."""
    def number(d: int) -> str:
        if d >= 3 or draw(st.booleans()):
            return draw(st.sampled_from(["energy", "maha", "t.energy", "t.maha", "t.maha[class]", "t.energy[class]",
                                         "0", "1", "-1", "2.5", "0.5"]))
        op = draw(st.sampled_from(["+", "-", "*", "/"]))
        return f"({number(d + 1)} {op} {number(d + 1)})"

    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return f"{number(depth)} {draw(st.sampled_from(['>', '>=', '<', '<=']))} {number(depth)}"
    kind = draw(st.sampled_from(["and", "or", "not"]))
    if kind == "not":
        return f"not ({draw(rule_tree(depth + 1))})"
    parts = [draw(rule_tree(depth + 1)) for _ in range(draw(st.integers(2, 3)))]
    return "(" + f" {kind} ".join(parts) + ")"


def with_rule(rule: str, per_class: bool) -> str:
    text = DEMO.replace(RULE_LINE, f"rule: '{rule}'\n")
    return text.replace("{tpr: 0.95,", "{tpr: 0.95, per_class: true,") if per_class else text


@FUZZ
@given(rule_text(), st.booleans())
def test_random_rules_with_class_thresholds(rule, per_class):
    assert_well_behaved(with_rule(rule, per_class))


@settings(FUZZ, max_examples=120, deadline=5000)
@given(rule_tree(), st.booleans())
def test_well_formed_rules_through_z3(rule, per_class):
    assert_well_behaved(with_rule(rule, per_class))


# --- extends: missing files, cycles, broken parents ---------------------------------------
FILES = ["a.yaml", "b.yaml", "sub/c.yaml", "d.yaml"]
PARENT_REFS = ["a.yaml", "b.yaml", "sub/c.yaml", "../a.yaml", "c.yaml", "d.yaml", "missing.yaml", "sub", "", "3",
               "[a.yaml]", "'b.yaml'", "/nonexistent/x.yaml", "a.yaml\x00"]
BODIES = [DEMO, "version: 1\n", "scores: {energy: {temperature: 0}}\n", "data: {ood: {near: null}}\n",
          "threshold: {fixed: {energy: 1, maha: 2}}\n", "{", "- a\n", "", "rule: 'maha < 0'\n",
          "detector: {kind: onnx, path: m.onnx}\n", "extends: a.yaml\n"]


@st.composite
def spec_tree(draw) -> dict[str, str]:
    files = {}
    for name in FILES:
        if draw(st.booleans()):
            body = draw(st.sampled_from(BODIES))
            if draw(st.booleans()):
                body = f"extends: {draw(st.sampled_from(PARENT_REFS))}\n" + body
            files[name] = body
    files.setdefault("a.yaml", "extends: b.yaml\n")
    return files


@settings(FUZZ, max_examples=150)
@given(spec_tree())
def test_extends_graphs(files):
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8", errors="surrogatepass")
        for name in files:
            issues = check_spec_file(Path(tmp) / name)
            assert all(isinstance(i, SpecIssue) and i.line >= 1 and i.column >= 1 for i in issues)
            assert all(i.severity in ("error", "warning") for i in issues)
        text = (Path(tmp) / "a.yaml").read_bytes()
        spec, issues = check_spec_text(text, "a.yaml", Path(tmp))
        assert (spec is None) == any(i.severity == "error" for i in issues)
