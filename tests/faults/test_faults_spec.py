"""Fault injection: specs, `extends:` targets and policy files that are not small regular
YAML files (issue 19, item 5 on the spec side and item 7's extends point).

Each fault is refused with one located error and exit code 2, fast, without blocking,
without a traceback, and (for an `extends:` target) at the `extends:` line of the file that
names it, never quoting the target. Hang guards are generous (machines are noisy); where it
matters the test also shows, by counting, that the expensive step never ran.
"""
from __future__ import annotations

import doctest
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import certood.spec.files as files_module
import certood.spec.source as source_module
from certood.cli import main
from certood.errors import SpecError
from certood.spec import check_spec_file, check_spec_text, load_spec_text
from certood.spec.files import MAX_SPEC_BYTES, UnreadableFile, read_regular_file, read_spec_bytes
from certood.spec.loader import MAX_ISSUES, load_policy_file
from certood.spec.source import MAX_DEPTH, MAX_VALUES, read_yaml
from certood.spec.v1 import MAX_SCORES

DEMO = (Path(__file__).resolve().parents[1] / "spec" / "fixtures" / "demo.yaml").read_text()
GUARD_S = 10.0  # a hang guard, not a speed test: before the fix these took minutes or never ended
NESTING_GUARD_S = 5.0  # 100,000 nested levels are refused in ~0.01 s (they took minutes)
SECRET = "s3cr3t-token"  # content of files that must never be echoed


def finishes(fn, fifo: Path | None = None, seconds: float = GUARD_S):
    """fn()'s result, or a test failure if it takes longer than `seconds` (a reader blocked on
    `fifo` is released by opening the FIFO for writing, so the test run itself never hangs)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a blocked reader exists: this succeeds
        thread.join(seconds)
        pytest.fail(f"still running after {seconds} s (blocked or unbounded)")
    if "error" in box:
        raise box["error"]
    assert time.perf_counter() - start < seconds
    return box.get("result")


# --- the faulty files -----------------------------------------------------------------------
def _deep_flow(key: str = "a") -> str:
    return f"{key}: " + "[" * 100_000 + "]" * 100_000 + "\n"


def _many_keys() -> str:  # just under 1 MiB, 200,000 keys and values
    return "".join(f"k{i}: 1\n" for i in range(100_000))


def make_fault(kind: str, d: Path) -> Path:
    """A file (or device) of the given fault kind; the bad content carries SECRET."""
    if kind == "fifo":
        path = d / "fifo.yaml"
        os.mkfifo(path)
        return path
    if kind in ("dev_zero", "dev_urandom"):
        return Path("/dev/" + kind.removeprefix("dev_"))
    path = d / f"{kind}.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    elif kind == "huge":  # 50 MiB, sparse: nothing is written to disk
        with open(path, "wb") as f:
            f.write(f"{SECRET}: [".encode())
            f.truncate(50 << 20)
    elif kind == "deep":
        path.write_text(_deep_flow(SECRET))
    elif kind == "many_keys":
        path.write_text(f"{SECRET}: 1\n" + _many_keys())
    elif kind == "passwd":  # /etc/passwd-like: one YAML string, not a mapping
        path.write_text(f"{SECRET}:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/false\n")
    elif kind == "not_yaml":
        path.write_text(f"{SECRET}: {{a: [\n")
    elif kind == "not_utf8":
        path.write_bytes(f"{SECRET}: ".encode() + b"\xff\xfe\n")
    elif kind == "empty":
        path.write_text("# nothing\n")
    else:
        raise ValueError(kind)
    return path


# kind -> words the refusal must contain
SPEC_FAULTS = {
    "fifo": "a FIFO (named pipe), not a regular file",
    "dev_zero": "a character device, not a regular file",
    "dev_urandom": "a character device, not a regular file",
    "directory": "a directory, not a regular file",
    "missing": "No such file or directory",
    "huge": "52,428,800 bytes (over the 1 MiB limit)",
    "deep": f"at most {MAX_DEPTH} levels of nesting",
    "many_keys": f"at most {MAX_VALUES:,} keys and values in a spec",
}
EXTENDS_FAULTS = {
    **{k: v for k, v in SPEC_FAULTS.items() if k not in ("deep", "many_keys")},
    "deep": f"which is more than {MAX_DEPTH} levels of nesting (line 1, column ",
    "many_keys": f"which is more than {MAX_VALUES:,} keys and values in a spec (line ",
    "passwd": "which is a string, not a mapping",
    "not_yaml": "which is not valid YAML (line 2, column 1)",
    "not_utf8": "which is not UTF-8 text (line 1, column 15)",
    "empty": "which is an empty document",
}


@pytest.mark.parametrize("kind", list(SPEC_FAULTS))
def test_a_faulty_spec_file_is_one_error_at_its_start(tmp_path, kind):
    path = make_fault(kind, tmp_path)
    (issue,) = finishes(lambda: check_spec_file(path), fifo=path if kind == "fifo" else None)
    assert issue.file == str(path) and issue.severity == "error"
    assert SPEC_FAULTS[kind] in str(issue)
    assert SECRET not in str(issue)


@pytest.mark.parametrize("kind", list(EXTENDS_FAULTS))
def test_a_faulty_extends_target_is_reported_at_the_extends_line_naming_it(tmp_path, kind):
    target = make_fault(kind, tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text(f"version: 1\nextends: {target}\n")
    (issue,) = finishes(lambda: check_spec_file(child), fifo=target if kind == "fifo" else None)
    assert (issue.file, issue.line, issue.column, issue.key_path) == (str(child), 2, 10, "extends")
    assert issue.found.startswith(f"'{target}'") and EXTENDS_FAULTS[kind] in issue.found
    assert SECRET not in str(issue)


def test_an_error_inside_a_parent_mapping_stays_located_in_the_parent(tmp_path):
    (tmp_path / "base.yaml").write_text(DEMO.replace("version: 1", "version: 7"))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\n")
    (issue,) = [i for i in check_spec_file(tmp_path / "child.yaml") if i.severity == "error"]
    assert (Path(issue.file).name, issue.line, issue.column, issue.key_path) == ("base.yaml", 1, 10, "version")


def test_a_fifo_swapped_in_after_the_stat_does_not_block(tmp_path, monkeypatch):
    fifo = make_fault("fifo", tmp_path)
    regular = tmp_path / "regular.yaml"
    regular.write_text("version: 1\n")
    real_stat = os.stat
    monkeypatch.setattr(files_module.os, "stat", lambda p, *a, **k: real_stat(regular if p == fifo else p))
    with pytest.raises(UnreadableFile, match=r"a FIFO \(named pipe\), not a regular file"):
        finishes(lambda: read_regular_file(fifo, MAX_SPEC_BYTES, "spec file"), fifo=fifo)


def test_a_file_growing_past_the_limit_is_refused_after_reading_at_most_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "grows.yaml"
    path.write_bytes(b"#" * (3 * MAX_SPEC_BYTES))
    real_stat, real_read, read = os.stat, os.read, []
    monkeypatch.setattr(files_module.os, "stat", lambda p, *a, **k: os.stat_result(
        real_stat(p)[:6] + (10,) + real_stat(p)[7:]))  # it looked small when stat-ed
    monkeypatch.setattr(files_module.os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    with pytest.raises(UnreadableFile, match="more bytes than when it was opened"):
        read_regular_file(path, MAX_SPEC_BYTES, "spec file")
    assert sum(read) == MAX_SPEC_BYTES + 1


def test_devices_and_huge_files_are_never_opened_or_parsed(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("must not be called")

    huge = make_fault("huge", tmp_path)
    monkeypatch.setattr(files_module.os, "open", forbidden)
    monkeypatch.setattr(source_module, "_Reader", forbidden)
    for path in (Path("/dev/zero"), Path("/dev/urandom"), huge):
        (issue,) = check_spec_file(path)
        assert issue.expected == "a readable spec file"


def test_huge_text_in_memory_is_refused_before_parsing(monkeypatch):
    def unit(text):
        return "bytes" if isinstance(text, bytes) else "characters"

    monkeypatch.setattr(source_module, "_Reader", lambda *a: pytest.fail("parsed"))
    for text in ("a: 1\n" * (MAX_SPEC_BYTES // 5 + 1), b"#" * (MAX_SPEC_BYTES + 1)):
        (issue,) = read_yaml(text, "m.yaml").issues
        assert (issue.line, issue.column) == (1, 1) and issue.found == f"{len(text):,} {unit(text)}"
        assert issue.expected == ("a spec of at most 1 MiB" if isinstance(text, bytes)
                                  else f"a spec of at most {MAX_SPEC_BYTES:,} characters")


@pytest.mark.parametrize("text", [
    "a: " + "[" * 100_000,                   # flow sequences, unclosed
    "a: " + "{b: " * 100_000,                # flow mappings
    _deep_flow(),                            # closed
    "a:\n" + "- " * 100_000 + "x\n",         # block sequences on one line
    "".join(" " * i + f"k{i}:\n" for i in range(1000)),  # block mappings, one per line
    "a:\n" + "".join(" " * i + "- \n" for i in range(0, 1000)),
])
def test_deep_nesting_stops_the_scanner_at_the_limit(text, monkeypatch):
    tokens = []
    real = yaml.scanner.Scanner.fetch_more_tokens
    monkeypatch.setattr(yaml.scanner.Scanner, "fetch_more_tokens", lambda self: tokens.append(1) or real(self))
    doc = finishes(lambda: read_yaml(text, "m.yaml"), seconds=NESTING_GUARD_S)
    (issue,) = doc.issues
    assert doc.value is None and issue.expected == f"at most {MAX_DEPTH} levels of nesting"
    # by structure: the scanner stopped near the limit (100,000 levels are 100,000+ tokens;
    # the quadratic cost was every token passing over every open level's pending key)
    assert len(tokens) < 3 * MAX_DEPTH + 10


def test_nesting_up_to_the_limit_is_read():
    levels = MAX_DEPTH - 1  # under the top-level mapping
    doc = read_yaml("a: " + "[" * levels + "1" + "]" * levels + "\n", "m.yaml")
    assert doc.issues == [] and doc.value is not None


def test_many_keys_stop_at_the_value_limit():
    doc = finishes(lambda: read_yaml(_many_keys(), "m.yaml"))
    (issue,) = doc.issues
    assert (issue.line, issue.column) == (MAX_VALUES // 2, 8) and doc.value is None  # the value of k4999
    assert issue.expected == f"at most {MAX_VALUES:,} keys and values in a spec"


def test_many_errors_are_capped_and_counted(tmp_path):
    n = 3000  # unknown top-level keys: 3,000 errors, 6,000 values (under the value limit)
    path = tmp_path / "m.yaml"
    path.write_text(DEMO + "".join(f"unknown_{i}: 1\n" for i in range(n)))
    issues = finishes(lambda: check_spec_file(path))
    assert len(issues) == MAX_ISSUES + 1
    summary = issues[-1]
    assert summary.expected == f"at most {MAX_ISSUES} issues in one report"
    assert summary.found == f"{n - MAX_ISSUES:,} more ({n - MAX_ISSUES:,} errors), not shown"
    assert (summary.line, summary.column) == (issues[-2].line + 1, 1)  # where the first one not shown is
    with pytest.raises(SpecError) as info:
        load_spec_text(path.read_text(), "m.yaml")
    assert len(info.value.issues) == MAX_ISSUES + 1


@pytest.mark.parametrize("n", [MAX_SCORES + 1, 2000])
def test_too_many_scores_is_one_spec_error(n):
    many = "".join(f"  s{i}: {{tap: logits}}\n" for i in range(n))
    text = DEMO.replace("scores:\n", "scores:\n" + many, 1)
    spec, issues = finishes(lambda: check_spec_text(text, "m.yaml"))
    errors = [i for i in issues if i.severity == "error"]
    assert spec is None and [(i.key_path, i.expected) for i in errors] == [("scores", f"at most {MAX_SCORES} entries")]
    assert errors[0].found == f"{n + 2:,} entries"  # the demo's own two as well


def test_at_most_the_limit_of_scores_is_valid():
    many = "".join(f"  s{i}: {{kind: energy, tap: logits}}\n" for i in range(MAX_SCORES - 2))
    spec, issues = check_spec_text(DEMO.replace("scores:\n", "scores:\n" + many, 1), "m.yaml")
    assert spec is not None and len(spec.scores) == MAX_SCORES


# --- through the command line: exit 2, the file named, no traceback --------------------------
def _invoke(args) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.exception


@pytest.mark.parametrize("kind", list(SPEC_FAULTS))
def test_validate_exits_2_on_each_fault(tmp_path, kind):
    path = make_fault(kind, tmp_path)
    code, output, exc = finishes(lambda: _invoke(["validate", path]), fifo=path if kind == "fifo" else None)
    assert code == 2 and isinstance(exc, SystemExit), output
    assert output.startswith(f"{path}:1:") or kind in ("deep", "many_keys")
    assert str(path) in output and SECRET not in output and "Traceback" not in output


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge", "passwd", "not_yaml"])
def test_validate_exits_2_on_a_faulty_extends_target(tmp_path, kind):
    target = make_fault(kind, tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {target}\n")
    code, output, _ = finishes(lambda: _invoke(["validate", child]), fifo=target if kind == "fifo" else None)
    assert code == 2 and output.startswith(f"{child}:1:10: extends: ") and str(target) in output
    assert SECRET not in output


def test_validate_prints_at_most_the_capped_issues(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(DEMO + "".join(f"unknown_{i}: 1\n" for i in range(3000)))
    code, output, _ = finishes(lambda: _invoke(["validate", path]))
    lines = output.splitlines()
    assert code == 2 and len(lines) == MAX_ISSUES + 1
    assert "2,900 more (2,900 errors), not shown" in lines[-1]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dev_urandom", "huge", "deep", "not_yaml"])
def test_gate_policy_file_faults_exit_2(tmp_path, kind):
    spec = tmp_path / "m.yaml"
    spec.write_text(DEMO)
    policy = make_fault(kind, tmp_path)
    code, output, exc = finishes(lambda: _invoke(["gate", spec, "--results", tmp_path, "--policy", policy]),
                                 fifo=policy if kind == "fifo" else None)
    assert code == 2 and isinstance(exc, SystemExit) and str(policy) in output, output
    assert SECRET not in output and "Traceback" not in output


def test_load_policy_file_reads_a_regular_file_only(tmp_path):
    spec = load_spec_text(DEMO, "m.yaml")
    with pytest.raises(SpecError, match="a character device, not a regular file"):
        finishes(lambda: load_policy_file("/dev/zero", spec))


def test_check_with_too_many_scores_exits_2_before_any_work(tmp_path):
    many = "".join(f"  s{i}: {{tap: logits}}\n" for i in range(1000))  # 10,000 hit the value limit first
    spec = tmp_path / "m.yaml"
    spec.write_text(DEMO.replace("scores:\n", "scores:\n" + many, 1))
    code, output, exc = finishes(lambda: _invoke(["check", spec, "--out", tmp_path / "out"]))
    assert code == 2 and isinstance(exc, SystemExit) and f"at most {MAX_SCORES} entries" in output
    assert not (tmp_path / "out").exists()


def test_validate_dev_zero_in_a_subprocess_exits_2_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "certood.cli", "validate", "/dev/zero"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("/dev/zero:1:1: expected a readable spec file, found a character device")
    assert "Traceback" not in proc.stderr


def test_doctests_of_the_file_reader():
    assert doctest.testmod(files_module).failed == 0


def test_a_regular_spec_file_within_the_limit_is_read_whole(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"#" * (MAX_SPEC_BYTES - 1) + b"\n")
    assert read_spec_bytes(path) == path.read_bytes()


def test_a_chain_of_extends_is_read_within_the_limit_of_one_file(tmp_path):
    """16 parents of nearly 1 MiB each would cost 16 times the parse of one file."""
    filler = "# " + "x" * (MAX_SPEC_BYTES // 2) + "\n"
    for i in range(3):
        (tmp_path / f"p{i}.yaml").write_text(f"extends: p{i + 1}.yaml\n" + filler)
    (tmp_path / "p3.yaml").write_text(DEMO)
    child = tmp_path / "child.yaml"
    child.write_text("extends: p0.yaml\n")
    (issue,) = finishes(lambda: check_spec_file(child))
    assert (Path(issue.file).name, issue.line, issue.column, issue.key_path) == ("p0.yaml", 1, 10, "extends")
    assert issue.expected == "a spec and the files it extends of at most 1 MiB in all"
    assert issue.found.startswith("'p1.yaml': 524,")  # the second half-MiB parent
