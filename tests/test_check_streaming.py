"""certood check streams (issue 15): shards, DataLoader workers, --resume.

The reference for a streamed check is the same check in one shard decoded in the main
process: shard size and worker count change how images are grouped and who decodes them, never
a result. Rows may be computed in different batch compositions, so floats are compared with a
tolerance; reruns of the same command are compared bit for bit.
"""
from __future__ import annotations

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
from certood.artifacts import STAGING_MARKER
from certood.cli import main

SPEC = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: {weights}, num_classes: 6, score_thresh: 0.0,
           batch_size: 2}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train, max_images: 4}}
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 4}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test, max_images: 7}}
  ood:
    near: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 5}}
    mixed: {{annotations: {root}/mixed.json, images: {root}/mixed, max_images: 5, protocol: gt_matched}}
taps: {{penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: 0.95, detector_score: 0.0}}
rule: "energy > t.energy or maha > t.maha"
run: {{workers: {workers}, shard_images: {shard}}}
"""


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def write_spec(directory: Path, weights, root, workers=0, shard=256, name="spec.yaml") -> Path:
    path = directory / name
    path.write_text(SPEC.format(weights=weights, root=root, workers=workers, shard=shard))
    return path


def boxes(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]


def assert_same_records(a: list[dict], b: list[dict], tol=1e-4) -> None:
    """Same boxes in the same order; boxes, scores and detector scores to ``tol`` (relative)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in ("box", "scores", "det_score")} == \
            {k: v for k, v in y.items() if k not in ("box", "scores", "det_score")}
        assert x["box"] == pytest.approx(y["box"], rel=tol, abs=0.02)
        assert x["det_score"] == pytest.approx(y["det_score"], rel=tol, abs=1e-4)
        assert x["scores"] == pytest.approx(y["scores"], rel=tol, abs=1e-4)


def metric_numbers(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {"id_test": m["id_test"], "ood": m["ood"], "issues": m["issues"]}


@pytest.fixture(scope="module")
def root(digitsdet_root, tmp_path_factory) -> Path:
    """Tiny DigitsDet with one test image made unreadable (reported and skipped)."""
    root = tmp_path_factory.mktemp("streaming") / "root"
    shutil.copytree(digitsdet_root, root)
    first = sorted((root / "test").iterdir())[2]
    first.write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def reference(root, random_weights, tmp_path_factory) -> Path:
    """One shard per data set, decoded in the main process."""
    work = tmp_path_factory.mktemp("reference")
    out = work / "out"
    code, _, err = cli("check", write_spec(work, random_weights, root), "--out", out)
    assert code == 0, err
    return out


def test_shards_and_workers_change_no_result(reference, root, random_weights, tmp_path):
    # 2 images per shard (odd-sized sets end in a short shard), decoded by two worker processes
    out = tmp_path / "out"
    code, _, err = cli("check", write_spec(tmp_path, random_weights, root, workers=2, shard=2), "--out", out)
    assert code == 0, err
    assert len(boxes(reference)) > 100  # a random detector at score 0: many boxes per image
    assert_same_records(boxes(out), boxes(reference))
    a, b = metric_numbers(out), metric_numbers(reference)
    assert a["issues"] == b["issues"] and any("not an image" in m or "cannot" in m for m in a["issues"])
    assert a["id_test"]["n_images"] == b["id_test"]["n_images"] == 6  # 7 listed, 1 unreadable
    assert a["id_test"]["map"] == pytest.approx(b["id_test"]["map"], abs=1e-6)
    for name in ("near", "mixed"):
        for score, m in b["ood"][name]["scores"].items():
            assert a["ood"][name]["scores"][score]["auroc"] == pytest.approx(m["auroc"], abs=1e-6)
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert run["shards"] == 4 + 3 + 3 and run["shards_resumed"] == 0 and run["workers"] == 2
    # the shards were the run's own: none is left in the results, nothing beside them
    assert not (out / "shards").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "spec.yaml"]


def _killed_after_shards(spec: Path, out: Path, n: int) -> subprocess.CompletedProcess:
    """A check SIGKILLed as its first shard is written (test hook), ``n`` times in a row."""
    env = {**os.environ, artifacts.TEST_DIE_AFTER: "shard", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "certood.cli", "check", str(spec), "--out", str(out),
                           *(["--resume"] if n > 1 else [])],
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_killed_check_resumes_from_its_shards_without_redoing_them(reference, root, random_weights, tmp_path):
    spec = write_spec(tmp_path, random_weights, root, shard=2)
    out = tmp_path / "out"
    # killed twice, each time just after writing one more shard (the second run resumes the first's)
    for n in (1, 2):
        done = _killed_after_shards(spec, out, n)
        assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists()  # nothing complete-looking: the results appear only whole
    [staging] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.certood-staging.")]
    assert (staging / STAGING_MARKER).is_file() and len(list((staging / "shards").glob("*/*.safetensors"))) == 2
    assert (staging / "monitor" / "manifest.json").is_file() and not (staging / "metrics.json").exists()
    code, _, err = cli("check", spec, "--out", out, "--resume")
    assert code == 0, err
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert run["shards_resumed"] == 2
    assert_same_records(boxes(out), boxes(reference))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a resumed run gives what an uninterrupted run of the same command gives, bit for bit
    again = tmp_path / "again"
    assert cli("check", spec, "--out", again)[0] == 0
    assert (again / "boxes.jsonl").read_bytes() == (out / "boxes.jsonl").read_bytes()


def test_resume_drops_shards_of_another_spec_and_a_plain_run_removes_leftovers(root, random_weights, tmp_path):
    spec = write_spec(tmp_path, random_weights, root, shard=2)
    out = tmp_path / "out"
    assert _killed_after_shards(spec, out, 1).returncode == -signal.SIGKILL
    # the rule changed: the old shards' flags would be wrong, so none is reused
    changed = tmp_path / "changed.yaml"
    changed.write_text(spec.read_text().replace('rule: "energy > t.energy or maha > t.maha"',
                                                'rule: "energy > t.energy"'))
    code, _, err = cli("check", changed, "--out", out, "--resume")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["shards_resumed"] == 0
    t = metrics["monitor"]["thresholds"]["energy"]
    assert [r["flag"] for r in boxes(out)] == [r["scores"]["energy"] > t for r in boxes(out)]
    # without --resume a leftover staging directory is removed and the run starts afresh
    assert _killed_after_shards(spec, out, 1).returncode == -signal.SIGKILL
    assert any(p.name.startswith(".out.certood-staging.") for p in tmp_path.iterdir())
    code, _, err = cli("check", spec, "--out", out)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["run"]["shards_resumed"] == 0
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_an_interrupted_check_keeps_its_shards_for_resume(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with artifacts.stage_results(target) as staged:
            staged.keep_on_interrupt = "shards"
            (staged.path / "shards").mkdir()
            raise KeyboardInterrupt
    assert staged.path.is_dir()
    assert artifacts.adoptable_staging(target, "shards") == staged.path
    # any other failure removes the staging directory, shards or not
    with pytest.raises(RuntimeError):
        with artifacts.stage_results(target) as other:
            other.keep_on_interrupt = "shards"
            (other.path / "shards").mkdir()
            raise RuntimeError("boom")
    assert not other.path.exists()
    assert not staged.path.exists()  # the plain run above removed the leftover when it started
