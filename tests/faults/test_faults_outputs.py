"""Fault injection: outputs and monitor artifacts (issue 19, items 1, 3, 6 and 7).

Built the way the audit built them: `-o` / `--out` pointing at a file, a project directory,
a results directory with the user's own files, an unwritable location or a full disk;
manifests with damaged values; `.pt` weights with non-tensor values; and `certood check`
runs killed (SIGKILL, SIGTERM) at fixed points through the test-only hook
``CERTOOD_TEST_DIE_AFTER=<stage>[:TERM]`` (certood.artifacts.die_here_for_tests).

Each case asserts the exit code of the contract (2 usage, 3 runtime), a message naming the
path (and the key), no traceback, and that the output location holds either the old
complete result or the new complete one, never a mixture and nothing of the user's lost.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from certood import artifacts
from certood.artifacts import RESULTS_MARKER, STAGING_MARKER, read_results_marker
from certood.cli import main

# smaller than tests/conftest.py's SPEC_TEMPLATE: these runs are repeated in subprocesses
SPEC = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: {weights}, num_classes: 6, score_thresh: 0.0}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train, max_images: 4}}
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 4}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test, max_images: 3}}
  ood:
    near: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 3}}
taps: {{penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: 0.95, detector_score: 0.0}}
rule: "energy > t.energy or maha > t.maha"
gate:
  - {{metric: auroc, score: energy, dataset: near, op: ">=", value: 0.0}}
"""


def cli(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256: what "left as it was" compares."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_complete(results: Path) -> None:
    """A whole result of one run: the marker lists exactly the files there, with their sha256."""
    marker = read_results_marker(results)
    assert marker is not None, f"{results}: no {RESULTS_MARKER}"
    files = tree(results)
    files.pop(RESULTS_MARKER)
    assert files == marker["files"]
    assert {"boxes.jsonl", "metrics.json", "summary.txt", "report.md", "monitor/manifest.json"} <= set(files)


def siblings(results: Path) -> list[str]:
    return sorted(p.name for p in results.parent.iterdir())


@pytest.fixture(scope="module")
def spec_path(digitsdet_root, random_weights, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(SPEC.format(weights=random_weights, root=digitsdet_root))
    return path


@pytest.fixture(scope="module")
def first_run(spec_path, tmp_path_factory) -> Path:
    """One complete `certood check` result, under umask 022, into a directory whose parents
    do not exist yet (they are created, like pytest's --junitxml does)."""
    out = tmp_path_factory.mktemp("runs") / "deep" / "er" / "out"
    old = os.umask(0o022)
    try:
        code, _, err = cli("check", spec_path, "--out", out)
    finally:
        os.umask(old)
    assert code == 0, err
    assert_complete(out)
    return out


@pytest.fixture()
def results(first_run, tmp_path) -> Path:
    """A private copy of the first run's result (tests below damage theirs)."""
    out = tmp_path / "runs" / "out"
    shutil.copytree(first_run, out)
    return out


def no_detector(monkeypatch):
    """Make loading the detector fail the test: refusals must come before any work."""
    import certood.check

    def boom(spec):
        raise AssertionError("the detector was loaded before the output/manifest was checked")

    monkeypatch.setattr(certood.check, "load_spec_detector", boom)


# ------------------------------------------------------------------ item 7: modes, parents
def test_outputs_honour_the_umask_and_missing_parents_are_created(first_run):
    modes = {p.relative_to(first_run).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in [first_run, *first_run.rglob("*")]}
    assert modes.pop(".") == "0o755"
    assert modes.pop("monitor") == "0o755" and modes.pop("plots") == "0o755"
    assert set(modes.values()) == {"0o644"}, modes
    assert siblings(first_run) == ["out"]  # no staging directory left


# ------------------------------------------------------------------- item 1: -o / --out targets
@pytest.mark.parametrize("command", ["calibrate", "check"])
@pytest.mark.parametrize("existing", ["file", "project", "results plus the user's notes"])
def test_an_output_certood_did_not_write_is_refused_and_left_as_it_was(
        spec_path, results, monkeypatch, command, existing):
    target = results.parent / "target"
    if existing == "file":
        target.write_text("precious\n")
    elif existing == "project":  # `calibrate SPEC -o ~/project` used to delete the project
        (target / "src").mkdir(parents=True)
        (target / "src" / "main.py").write_text("print('hi')\n")
        (target / "README.md").write_text("# mine\n")
    else:
        shutil.copytree(results, target)
        (target / "notes.txt").write_text("mine\n")
        if command == "calibrate":
            target = target / "monitor"
            (target / "notes.txt").write_text("mine\n")
    before = tree(results.parent)
    no_detector(monkeypatch)
    code, out, err = cli(command, spec_path, "-o" if command == "calibrate" else "--out", target)
    assert code == 2 and out == "", err
    assert str(target) in err and "Traceback" not in err and "internal error" not in err
    if existing.startswith("results"):
        assert "notes.txt" in err
    assert tree(results.parent) == before


@pytest.mark.parametrize("failure", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_an_unwritable_output_location_is_exit_3_before_any_work(spec_path, results, monkeypatch, failure):
    # root ignores permission bits, so the file system's refusal is injected where certood first writes
    def refuse(*args, **kwargs):
        raise OSError(failure, os.strerror(failure), kwargs.get("dir"))

    before = tree(results.parent)
    no_detector(monkeypatch)
    monkeypatch.setattr(artifacts.tempfile, "mkdtemp", refuse)
    code, _, err = cli("check", spec_path, "--out", results)
    assert code == 3 and "Traceback" not in err and "internal error" not in err
    assert f"{results.parent}: cannot write the output here ({os.strerror(failure)})" in err
    assert tree(results.parent) == before


def test_a_full_disk_while_writing_keeps_the_old_result_whole(spec_path, results, monkeypatch):
    import certood.check

    real = certood.check.atomic_write_json

    def full(path, obj):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    before = tree(results.parent)
    monkeypatch.setattr(certood.check, "atomic_write_json", full)
    code, _, err = cli("check", spec_path, "--monitor", results / "monitor", "--out", results)
    assert code == 3 and "Traceback" not in err
    assert f"{results}: cannot write the results (No space left on device)" in err
    assert tree(results.parent) == before  # old result, monitor included; no staging left


# --------------------------------------------------------------- item 6: damaged manifests
@pytest.mark.parametrize("key, value, message", [
    ("thresholds.energy", "abc", 'thresholds.energy: expected a finite number, found "abc"'),
    ("thresholds.energy", [1, 2], "thresholds.energy: expected a finite number, found [1, 2]"),
    ("thresholds.maha", None, "thresholds: missing maha (one per score of the spec)"),
    ("detector_threshold", "high", 'detector_threshold: expected a finite number, found "high"'),
    ("detector_threshold", float("nan"), "detector_threshold: expected a finite number, found nan"),
    ("label_to_category", [1, 2], "label_to_category: expected 5 category ids (the detector has 6 "
                                  "classes with background), found 2"),
])
def test_a_damaged_manifest_is_refused_with_file_and_key_before_extraction(
        spec_path, results, monkeypatch, tmp_path, key, value, message):
    monitor = tmp_path / "monitor"
    shutil.copytree(results / "monitor", monitor)
    manifest = json.loads((monitor / "manifest.json").read_text())
    *parents, last = key.split(".")
    holder = manifest
    for k in parents:
        holder = holder[k]
    if value is None:
        del holder[last]
    else:
        holder[last] = value
    (monitor / "manifest.json").write_text(json.dumps(manifest))
    no_detector(monkeypatch)  # refused before the detector loads, so before any extraction
    code, out, err = cli("check", spec_path, "--monitor", monitor, "--out", tmp_path / "new")
    assert code == 3 and out == "" and "Traceback" not in err and "internal error" not in err
    assert f"{monitor / 'manifest.json'}: " in err and message in err, err
    assert not (tmp_path / "new").exists()


def test_pt_weights_with_a_non_tensor_value_are_a_data_error_naming_the_key(
        digitsdet_root, random_weights, tmp_path):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(random_weights))
    first = next(iter(state))
    state[first] = 3  # weights_only=True lets plain ints (and lists, dicts) through
    torch.save(state, tmp_path / "bad.pt")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(weights=tmp_path / "bad.pt", root=digitsdet_root))
    code, _, err = cli("calibrate", spec, "-o", tmp_path / "monitor")
    assert code == 3 and "Traceback" not in err and "internal error" not in err
    assert f"{tmp_path / 'bad.pt'}: key {first!r}: expected a tensor, found int" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "spec.yaml"]


# ------------------------------------------------------- item 3: incomplete results refused
def test_gate_and_recheck_refuse_a_result_without_its_completion_marker(spec_path, results):
    (results / RESULTS_MARKER).unlink()  # what a killed run of an older certood left
    code, _, err = cli("gate", spec_path, "--results", results)
    assert code == 3 and f"{results}: no {RESULTS_MARKER}: not a complete `certood check` output" in err
    code, _, err = cli("recheck", results)
    assert code == 3 and f"{results}: no {RESULTS_MARKER}" in err and "Traceback" not in err
    assert cli("gate", spec_path, "--results", results.parent / "missing")[0] == 3


def _check_killed(spec_path: Path, out: Path, stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, artifacts.TEST_DIE_AFTER: stage, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "certood.cli", "check", str(spec_path), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_killed_checks_leave_the_old_or_the_new_complete_result_and_a_rerun_cleans_up(
        spec_path, results):
    old = tree(results)
    # SIGKILL after calibrating: nothing runs after it; the old result is untouched
    done = _check_killed(spec_path, results, "calibrated")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert tree(results) == old
    [staging] = [p for p in results.parent.iterdir() if p.name != "out"]
    assert staging.name.startswith(".out.certood-staging.") and (staging / STAGING_MARKER).is_file()
    # SIGTERM with every output written, before the swap: unwinds and removes its staging; it
    # also removed the killed run's staging when it started (name and marker say it was ours)
    done = _check_killed(spec_path, results, "written:TERM")
    assert done.returncode == 128 + signal.SIGTERM and "terminated" in done.stderr
    assert "Traceback" not in done.stderr
    assert tree(results) == old and siblings(results) == ["out"]
    # SIGKILL just after the swap: the new complete result is in place, the old one aside, whole
    done = _check_killed(spec_path, results, "swapped")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert_complete(results)
    [aside] = [p for p in results.parent.iterdir() if p.name != "out"]
    assert aside.name.startswith(".out.certood-") and tree(aside) == old
    # a re-run succeeds, reuses the monitor inside its own output and removes both leftovers
    code, _, err = cli("check", spec_path, "--monitor", results / "monitor", "--out", results)
    assert code == 0, err
    assert_complete(results)
    assert siblings(results) == ["out"]
    assert cli("gate", spec_path, "--results", results)[0] == 0
