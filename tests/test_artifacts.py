"""Monitor artifacts: save/load round-trips, refusal of other specs/detectors and of corrupt
files, and atomic writes that never leave a half-written or temporary file."""
from __future__ import annotations

import json
import os
import re
import socket
from datetime import datetime, timezone
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from certood import artifacts
from certood.artifacts import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, load_monitor, read_manifest, save_monitor,
)
from certood.check import load_spec_detector
from certood.errors import ArtifactError, CertoodError, UsageError
from certood.monitor import calibrate
from certood.scores import build_score


@pytest.fixture(scope="module")
def calibrated(make_tiny_spec):
    spec = make_tiny_spec()
    detector = load_spec_detector(spec)
    monitor, extracted = calibrate(spec, detector, detector.num_classes)
    return spec, detector, monitor, extracted["calibration"]


@pytest.fixture()
def saved(calibrated, tmp_path):
    spec, detector, monitor, cal = calibrated
    return save_monitor(monitor, tmp_path / "monitor")


def test_save_then_load_gives_identical_scores(calibrated, saved):
    spec, detector, monitor, cal = calibrated
    loaded = load_monitor(saved, spec, detector.weights_sha256)
    before, after = monitor.score_boxes(cal), loaded.score_boxes(cal)
    assert set(before) == set(after) == {"energy", "maha"}
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert loaded.thresholds == monitor.thresholds
    assert loaded.detector_threshold == monitor.detector_threshold
    assert loaded.label_to_category == monitor.label_to_category
    assert torch.equal(loaded.flag(after), monitor.flag(before))


def test_saved_monitor_is_json_and_safetensors_only(calibrated, saved):
    spec, detector, monitor, _ = calibrated
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "scores.safetensors"]
    manifest = read_manifest(saved)
    assert manifest["spec_fingerprint"] == spec.fingerprint()
    assert manifest["detector_sha256"] == detector.weights_sha256
    assert manifest["thresholds"] == monitor.thresholds
    assert manifest["threshold_rule"]["tpr"] == 0.95
    assert manifest["scores"]["maha"] == {"kind": "mahalanobis", "tap": "penultimate",
                                          "params": {"num_classes": None},
                                          "feature_dim": monitor.scores["maha"].feature_dim}
    assert manifest["scores"]["maha"]["feature_dim"] == 256
    from safetensors.torch import load_file

    tensors = load_file(str(saved / "scores.safetensors"))
    assert set(tensors) == {"maha/means", "maha/precision", "maha/class_counts"}


def test_loading_for_a_changed_spec_is_refused(calibrated, saved, make_tiny_spec):
    _, detector, _, _ = calibrated
    for changed in (make_tiny_spec(temperature=2.0), make_tiny_spec(tpr=0.9)):
        with pytest.raises(ArtifactError, match="calibrated for another spec") as err:
            load_monitor(saved, changed, detector.weights_sha256)
        assert "recalibrate" in str(err.value) and str(saved) in str(err.value)
    # the rule is not part of a calibration: editing it keeps the monitor usable
    load_monitor(saved, make_tiny_spec(rule="maha > t.maha"), detector.weights_sha256)


def test_loading_for_other_detector_weights_is_refused(calibrated, saved):
    spec, detector, _, _ = calibrated
    with pytest.raises(ArtifactError, match="other detector weights") as err:
        load_monitor(saved, spec, "f" * 64)
    assert detector.weights_sha256[:12] in str(err.value) and "ffffffffffff" in str(err.value)


@pytest.mark.parametrize("content, needle", [
    (None, "no manifest.json"),
    ('{"format": "certood-monitor", "format_ver', "unreadable manifest"),
    ("", "unreadable manifest"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "something-else", "format_version": 1}', "expected format 'certood-monitor'"),
    ('{"format": "certood-monitor", "format_version": 99}', "expected format_version 1"),
])
def test_missing_or_corrupt_manifest_raises_artifact_error(calibrated, saved, content, needle):
    spec, detector, _, _ = calibrated
    manifest = saved / "manifest.json"
    if content is None:
        manifest.unlink()
    else:
        manifest.write_text(content)
    with pytest.raises(ArtifactError, match=needle):
        load_monitor(saved, spec, detector.weights_sha256)


def test_manifest_missing_keys_raises_artifact_error(calibrated, saved):
    spec, detector, _, _ = calibrated
    manifest = json.loads((saved / "manifest.json").read_text())
    del manifest["thresholds"]
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="thresholds"):
        load_monitor(saved, spec, detector.weights_sha256)


@pytest.mark.parametrize("damage", ["missing", "garbage", "missing tensor"])
def test_damaged_score_tensors_raise_artifact_error(calibrated, saved, damage):
    from safetensors.torch import load_file, save_file

    spec, detector, _, _ = calibrated
    path = saved / "scores.safetensors"
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    else:
        tensors = load_file(str(path))
        del tensors["maha/precision"]
        save_file(tensors, str(path))
    with pytest.raises(ArtifactError):
        load_monitor(saved, spec, detector.weights_sha256)


def test_a_failed_resave_leaves_the_old_monitor_loadable_as_it_was(calibrated, saved, monkeypatch):
    spec, detector, monitor, cal = calibrated
    maha = monitor.scores["maha"]
    shifted = build_score("mahalanobis", maha.params()).load_state_tensors(
        {k: (v + 1 if v.is_floating_point() else v) for k, v in maha.state_tensors().items()})
    other = replace(monitor, scores={**monitor.scores, "maha": shifted})
    real_replace = os.replace

    def fail_on_manifest(src, dst):
        if Path(dst).name == "manifest.json":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_manifest)
    with pytest.raises(CertoodError, match="disk full") as err:
        save_monitor(other, saved)
    assert str(saved) in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["monitor"]  # no staging left behind
    try:
        loaded = load_monitor(saved, spec, detector.weights_sha256)
    except ArtifactError:
        return  # refusing the mixture is fine too
    assert torch.equal(loaded.score_boxes(cal)["maha"], monitor.score_boxes(cal)["maha"])


# ------------------------------------------------------------- what save_monitor may replace
def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("existing", ["file", "project", "monitor plus notes", "symlink"])
def test_save_monitor_refuses_what_is_not_a_monitor_and_leaves_it(calibrated, tmp_path, existing):
    _, _, monitor, _ = calibrated
    target = tmp_path / "target"
    if existing == "file":
        target.write_text("precious\n")
    elif existing == "project":  # `-o ~/project` once wiped a project
        (target / "src").mkdir(parents=True)
        (target / "src" / "main.py").write_text("print('hi')\n")
        (target / "manifest.json").write_text('{"format": "something-else"}')
    elif existing == "monitor plus notes":
        save_monitor(monitor, target)
        (target / "notes.txt").write_text("mine\n")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    before = _tree(tmp_path)
    with pytest.raises(UsageError) as err:
        save_monitor(monitor, target)
    assert str(target) in str(err.value)
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["target"] + (["elsewhere"] if existing == "symlink" else []))


def test_save_monitor_fills_an_empty_directory_and_replaces_its_own_monitor(calibrated, tmp_path):
    spec, detector, monitor, _ = calibrated
    target = tmp_path / "empty"
    target.mkdir()
    save_monitor(monitor, target)
    first = read_manifest(target)["created"]
    save_monitor(monitor, target)  # a monitor certood wrote: replaced whole
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "scores.safetensors"]
    assert read_manifest(target)["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    load_monitor(target, spec, detector.weights_sha256)


def test_a_rerun_removes_the_staging_leftovers_of_killed_runs_and_nothing_else(calibrated, tmp_path):
    _, _, monitor, _ = calibrated
    target = tmp_path / "monitor"
    dead = tmp_path / ".monitor.certood-staging.abc123"  # a killed run: marker, pid gone
    dead.mkdir()
    (dead / artifacts.STAGING_MARKER).write_text(json.dumps(
        {"format": "certood-staging", "pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    (dead / "scores.safetensors").write_bytes(b"half")
    alive = tmp_path / ".monitor.certood-staging.def456"  # a concurrent run (this process): kept
    alive.mkdir()
    (alive / artifacts.STAGING_MARKER).write_text(json.dumps(
        {"format": "certood-staging", "pid": os.getppid(), "host": socket.gethostname()}))
    elsewhere = tmp_path / ".monitor.certood-staging.ghi789"  # another host's run, started now: kept
    elsewhere.mkdir()
    (elsewhere / artifacts.STAGING_MARKER).write_text(json.dumps(
        {"format": "certood-staging", "pid": 1, "host": "another-host",
         "created": datetime.now(timezone.utc).isoformat()}))
    stale = tmp_path / ".monitor.certood-staging.jkl012"  # another host's, days old: taken
    stale.mkdir()
    (stale / artifacts.STAGING_MARKER).write_text(json.dumps(
        {"format": "certood-staging", "pid": 1, "host": "another-host", "created": "2020-01-01T00:00:00+00:00"}))
    lookalike = tmp_path / ".monitor.certood-staging.user"  # the name, but no marker: not ours
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("x")
    legacy = tmp_path / ".monitor.old.k3j4h5g6"  # what certood before markers left: a monitor inside
    save_monitor(monitor, legacy / "monitor")
    user_backup = tmp_path / ".monitor.backup"  # a user's copy of a monitor: not a certood name
    save_monitor(monitor, user_backup)
    save_monitor(monitor, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["monitor", alive.name, elsewhere.name, lookalike.name, user_backup.name])
    assert (lookalike / "keep.txt").read_text() == "x"


def test_outputs_honour_the_umask(calibrated, tmp_path):
    _, _, monitor, _ = calibrated
    old = os.umask(0o027)
    try:
        save_monitor(monitor, tmp_path / "m027")
        atomic_write_text(tmp_path / "f027.txt", "x")
        os.umask(0o022)
        save_monitor(monitor, tmp_path / "m022")
        atomic_write_text(tmp_path / "f022.txt", "x")
    finally:
        os.umask(old)

    def mode(p):
        return oct(p.stat().st_mode & 0o777)

    assert [mode(tmp_path / "m027"), mode(tmp_path / "m027" / "manifest.json"), mode(tmp_path / "f027.txt")] == \
        ["0o750", "0o640", "0o640"]
    assert [mode(tmp_path / "m022"), mode(tmp_path / "m022" / "scores.safetensors"), mode(tmp_path / "f022.txt")] == \
        ["0o755", "0o644", "0o644"]


def test_missing_parents_of_an_output_are_created(calibrated, tmp_path):
    _, _, monitor, _ = calibrated
    save_monitor(monitor, tmp_path / "a" / "b" / "monitor")
    assert read_manifest(tmp_path / "a" / "b" / "monitor")["format"] == "certood-monitor"


# ----------------------------------------------------- results directories, replaced whole
def _results(directory: Path, text: str) -> Path:
    """A results directory as run_check closes one (metrics.json of ours, marker last)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps({"spec_fingerprint": "f", "protocol": "p", "v": text}))
    (directory / "plots").mkdir(exist_ok=True)
    (directory / "plots" / "roc.png").write_text(text)
    artifacts.write_results_marker(directory, spec_fingerprint="f", detector_sha256="d")
    return directory


@pytest.mark.parametrize("exchange", [True, False])
def test_staged_results_replace_the_old_ones_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without renameat2 RENAME_EXCHANGE: two renames
        monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    target = _results(tmp_path / "out", "old")
    (target / "plots" / "stale.png").write_text("an old figure")
    artifacts.write_results_marker(target, spec_fingerprint="f", detector_sha256="d")
    with artifacts.stage_results(target) as staged:
        assert staged.path.parent == tmp_path and (staged.path / artifacts.STAGING_MARKER).is_file()
        _results(staged.path, "new")
        staged.commit()
    assert json.loads((target / "metrics.json").read_text())["v"] == "new"
    assert sorted(_tree(target)) == ["certood-results.json", "metrics.json", "plots/roc.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert artifacts.results_incomplete(target) is None


def test_a_failed_staged_run_leaves_the_old_results_and_no_staging(tmp_path):
    target = _results(tmp_path / "out", "old")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError):
        with artifacts.stage_results(target) as staged:
            (staged.path / "metrics.json").write_text("half")
            raise RuntimeError("the run failed")
    assert _tree(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("content, why", [
    ({"notes.txt": "mine"}, "holds files certood did not write (notes.txt)"),
    ({"src/main.py": "x", "README.md": "y"}, "is not a `certood check` results directory"),
    ({"metrics.json": '{"auroc": 1}'}, "is not a `certood check` results directory"),
])
def test_stage_results_refuses_a_directory_with_files_certood_did_not_write(tmp_path, content, why):
    target = tmp_path / "out"
    if "notes.txt" in content:
        _results(target, "old")
    for name, text in content.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match=re.escape(why)) as err:
        artifacts.stage_results(target)
    assert str(target) in str(err.value) and _tree(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_results_of_an_older_certood_without_marker_are_replaceable_but_incomplete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "metrics.json").write_text(json.dumps({"spec_fingerprint": "f", "protocol": "p"}))
    (target / "boxes.jsonl").write_text("")
    assert artifacts.foreign_results_entries(target) == []
    assert "no certood-results.json" in artifacts.results_incomplete(target)
    (target / "mine.csv").write_text("")
    assert artifacts.foreign_results_entries(target) == ["mine.csv"]


# --------------------------------------------------------- manifest values, validated on load
def _edit(manifest: dict, change: str) -> None:
    if change == "threshold text":
        manifest["thresholds"]["energy"] = "abc"
    elif change == "threshold list":
        manifest["thresholds"]["energy"] = [1.0]
    elif change == "thresholds list":
        manifest["thresholds"] = [1.0, 2.0]
    elif change == "threshold missing":
        del manifest["thresholds"]["maha"]
    elif change == "threshold extra":
        manifest["thresholds"]["gone"] = 1.0
    elif change == "detector text":
        manifest["detector_threshold"] = "high"
    elif change == "detector nan":
        manifest["detector_threshold"] = float("nan")
    elif change == "labels short":
        manifest["label_to_category"] = manifest["label_to_category"][:-1]
    elif change == "labels text":
        manifest["label_to_category"] = ["a"] * len(manifest["label_to_category"])
    elif change == "class table":
        manifest["class_thresholds"] = {"energy": [0.0, 1.0]}
    elif change == "scores list":
        manifest["scores"] = []


@pytest.mark.parametrize("change, key", [
    ("threshold text", "thresholds.energy: expected a finite number, found \"abc\""),
    ("threshold list", "thresholds.energy: expected a finite number, found [1.0]"),
    ("thresholds list", "thresholds: expected an object of score name -> number"),
    ("threshold missing", "thresholds: missing maha (one per score of the spec)"),
    ("threshold extra", "thresholds: gone not a score of this spec"),
    ("detector text", "detector_threshold: expected a finite number, found \"high\""),
    ("detector nan", "detector_threshold: expected a finite number, found nan"),
    ("labels short", "label_to_category: expected 5 category ids (the detector has 6 classes with "
                     "background), found 4"),
    ("labels text", "label_to_category: expected a non-empty list of category ids (integers)"),
    ("class table", "class_thresholds.energy: expected 6 values (background and each label), found 2"),
    ("scores list", "scores: expected an object of score name -> object"),
])
def test_a_damaged_manifest_value_is_refused_naming_file_and_key(calibrated, saved, change, key):
    spec, detector, _, _ = calibrated
    path = saved / "manifest.json"
    manifest = json.loads(path.read_text())
    _edit(manifest, change)
    path.write_text(json.dumps(manifest))  # json writes NaN as NaN, and reads it back
    with pytest.raises(ArtifactError) as err:
        load_monitor(saved, spec, detector.weights_sha256)
    assert str(err.value).startswith(f"{path}: ") and key in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_writes_create_replace_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    atomic_write_text(tmp_path / "t.txt", "grüße\n")
    assert (tmp_path / "t.txt").read_bytes() == "grüße\n".encode("utf-8")
    atomic_write_json(tmp_path / "m.json", {"a": [1, 2.5], "b": None})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2.5], "b": None}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.json", "out.bin", "sub", "t.txt"]


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "write"])
def test_a_failed_atomic_write_keeps_the_old_file_intact(tmp_path, monkeypatch, fail_at):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"old": True})
    old = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated failure in {fail_at}")

    if fail_at == "replace":
        monkeypatch.setattr(artifacts.os, "replace", boom)
    elif fail_at == "fsync":
        monkeypatch.setattr(artifacts.os, "fsync", boom)
    else:
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError("simulated failure in write")

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(artifacts.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="simulated failure"):
        atomic_write_json(target, {"new": "x" * 10_000})
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_json_refuses_nan_without_touching_the_file(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"auroc": 0.5})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"auroc": float("nan")})
    assert json.loads(target.read_text()) == {"auroc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_an_output_given_as_dot_is_staged_beside_it_not_inside(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with artifacts.stage_results(Path(".")) as staged:
        assert staged.path.parent == tmp_path and staged.target == work
    with pytest.raises(UsageError, match="root"):
        artifacts.stage_results(Path("/"))


@pytest.mark.parametrize("name", ["manifest.json", "scores.safetensors"])
def test_a_monitor_file_that_is_not_a_regular_file_is_refused_without_blocking(calibrated, saved, name):
    spec, detector, _, _ = calibrated
    (saved / name).unlink()
    os.mkfifo(saved / name)  # open() of a FIFO blocks until a writer comes: never opened for reading
    with pytest.raises(ArtifactError, match=re.escape(f"{saved / name}: expected a readable monitor")) as err:
        load_monitor(saved, spec, detector.weights_sha256)
    assert "FIFO" in str(err.value)
