"""`certood check` with a certify block, end to end on the tiny DigitsDet with a random
detector, then `certood recheck` on its output (and on tampered copies)."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from certood.check import run_check
from certood.cli import main
from certood.recheck import FEATURES_FILE
from certood.spec import load_spec_text

SPEC = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: {weights}, num_classes: 6, score_thresh: 0.0}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train, max_images: 3}}
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 3}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test, max_images: 1}}
  ood:
    near: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 1}}
taps: {{roi: box_head.input, penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: 0.5, detector_score: 0.0}}
rule: "energy > t.energy or maha > 100 * t.maha"
certify: {{tap: penultimate, eps: 0.000001, exact: z3, radius: true}}
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory, digitsdet_root, random_weights):
    spec = load_spec_text(SPEC.format(weights=random_weights, root=digitsdet_root))
    out = tmp_path_factory.mktemp("certified")
    return run_check(spec, out), out


def test_check_writes_certificates(results):
    result, out = results
    records = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert records and all("certificate" in r for r in records)
    c = records[0]["certificate"]
    assert {"verdict", "method", "eps", "norm", "score_bounds", "margin", "seconds", "radius"} <= set(c)
    assert set(c["score_bounds"]) == {"energy", "maha"}
    certs = result.metrics["certificates"]
    assert set(certs) == {"id_test", "near"}
    for entry in certs.values():
        assert 0 <= entry["certified_rate"] <= 1 and 0 <= entry["undecided_rate"] <= 1
        assert entry["n_boxes"] == sum(entry["counts"].values())
    assert sum(e["counts"]["certified_id"] + e["counts"]["certified_ood"] for e in certs.values()) > 0
    assert result.metrics["certify"]["to_detector_ratio"] > 0
    assert "certificates: crown" in (out / "summary.txt").read_text()
    assert "## Certificates" in (out / "report.md").read_text()
    assert (out / FEATURES_FILE).exists()


def test_gate_reads_the_certified_rate(results):
    from certood.gate import observe

    result, _ = results
    got = observe(result.metrics, "certified_rate", None, "ood/near")
    assert got.value == result.metrics["certificates"]["near"]["certified_rate"]


def _tamper_first_certified(src, dst, change) -> int:
    shutil.copytree(src, dst)
    lines = (dst / "boxes.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        r = json.loads(line)
        if r["certificate"]["verdict"] != "undecided":
            change(r["certificate"])
            lines[i] = json.dumps(r)
            break
    (dst / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    return i


def test_recheck_confirms_radii_then_catches_a_larger_one(results, tmp_path):
    """The radius path of `certood recheck` (tests/test_recheck.py has the rest): honest radii
    re-proven; a radius claimed 100x larger is not, even with --allow-unconfirmed (CROWN
    certificates are re-proven by the recheck's own CROWN)."""
    _, out = results
    ok = CliRunner().invoke(main, ["recheck", str(out), "--format", "json"])
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.output)
    assert payload["ok"] and payload["n_certified"] > 0
    assert payload["counts"]["confirmed"] == payload["n_certified"]

    bad = tmp_path / "tampered"
    i = _tamper_first_certified(out, bad, lambda c: c.update(radius=c["radius"] * 100))
    for flags in ([], ["--allow-unconfirmed"]):
        res = CliRunner().invoke(main, ["recheck", str(bad), *flags])
        assert res.exit_code == 1, res.output
        assert f"box {i} " in res.output and "not re-proven" in res.output and "DISAGREEMENT" in res.output

    (bad / FEATURES_FILE).unlink()
    res = CliRunner().invoke(main, ["recheck", str(bad)])
    assert res.exit_code == 3 and FEATURES_FILE in res.output
