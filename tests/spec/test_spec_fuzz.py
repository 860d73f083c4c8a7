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
