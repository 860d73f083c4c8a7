"""The ground-truth-matched protocol: matching, metrics, spec key, and `certood check` on a
mixed DigitsDet set; the paired bootstrap used to compare two scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from certood.check import run_check
from certood.errors import CertoodError, SpecError
from certood.metrics import (
    GT_MATCH, bootstrap_ci, bootstrap_diff_ci, gt_match_status, gt_matched_metrics, ood_metrics,
)
from certood.spec import check_spec_text, load_spec_text
from tests.conftest import SPEC_TEMPLATE

ID, OOD, NONE = GT_MATCH["id"], GT_MATCH["ood"], GT_MATCH["unmatched"]


# ----------------------------------------------------------------------------- matching
def test_gt_match_status_by_hand():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    known = [True, False]
    pred = [[0, 0, 10, 10],  # exact on the ID object
            [20, 0, 30, 10],  # exact on the unknown object
            [0, 0, 10, 5],  # IoU 0.5 exactly with the ID object: matched
            [0, 0, 10, 4.9],  # IoU 0.49: unmatched
            [40, 40, 50, 50],  # background
            [2, 0, 28, 10]]  # straddles both objects, IoU < 0.5 with each
    assert gt_match_status(pred, gt, known).tolist() == [ID, OOD, ID, NONE, NONE, NONE]
    assert gt_match_status(pred, gt, known, iou=0.3).tolist()[3] == ID
    assert gt_match_status(pred, np.zeros((0, 4)), []).tolist() == [NONE] * 6
    assert gt_match_status(np.zeros((0, 4)), gt, known).tolist() == []


def test_gt_match_status_takes_the_best_overlap_of_any_class():
    gt = [[0, 0, 10, 10], [0, 0, 10, 12]]  # an ID and an unknown object, nearly on top of each other
    assert gt_match_status([[0, 0, 10, 11.9]], gt, [True, False]).tolist() == [OOD]
    assert gt_match_status([[0, 0, 10, 10.1]], gt, [True, False]).tolist() == [ID]


def test_gt_match_status_checks_its_inputs():
    with pytest.raises(CertoodError, match="gt_known: expected 2 entries"):
        gt_match_status([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 2, 2]], [True])
    with pytest.raises(CertoodError, match="iou: expected a number in \\[0, 1\\]"):
        gt_match_status([[0, 0, 1, 1]], [[0, 0, 1, 1]], [True], iou=1.5)


def test_gt_matched_metrics_match_sklearn_on_the_matched_boxes():
    rng = np.random.default_rng(0)
    status = rng.choice([ID, OOD, NONE], size=400, p=[0.4, 0.3, 0.3])
    scores = rng.normal(size=400) + (status == OOD)  # OOD boxes score higher
    scores[status == NONE] = 100.0  # unmatched boxes must not count at all
    m = gt_matched_metrics(scores, status)
    assert m["counts"] == {"id_matched": int((status == ID).sum()), "ood_matched": int((status == OOD).sum()),
                           "unmatched": int((status == NONE).sum())}
    keep = status != NONE
    y = (status[keep] == OOD).astype(int)
    assert m["metrics"]["auroc"] == pytest.approx(roc_auc_score(y, scores[keep]))
    assert m["metrics"]["aupr_in"] == pytest.approx(average_precision_score(1 - y, -scores[keep]))
    assert m["metrics"] == ood_metrics(scores[status == ID], scores[status == OOD])


def test_gt_matched_metrics_without_one_side_are_none():
    m = gt_matched_metrics([0.1, 0.2, 0.3], [ID, ID, NONE])
    assert m["metrics"] is None and m["counts"] == {"id_matched": 2, "ood_matched": 0, "unmatched": 1}
    with pytest.raises(CertoodError, match="status: expected codes"):
        gt_matched_metrics([0.1], [7])


# ----------------------------------------------------------------------------- paired bootstrap
def test_bootstrap_diff_ci_is_paired_and_reuses_the_replicates():
    rng = np.random.default_rng(1)
    g_id, g_ood = np.repeat(np.arange(60), 3), np.repeat(np.arange(60, 100), 3)
    a_id, a_ood = rng.normal(size=180), rng.normal(1.5, size=120)
    assert bootstrap_diff_ci(a_id, a_ood, a_id, a_ood, g_id, g_ood, n_boot=200) == (0.0, 0.0)
    # a constant shift of one score changes no ranking: the difference is exactly zero
    assert bootstrap_diff_ci(a_id + 3, a_ood + 3, a_id, a_ood, g_id, g_ood, n_boot=200) == (0.0, 0.0)
    noise_id, noise_ood = a_id + rng.normal(0, 2, 180), a_ood + rng.normal(0, 2, 120)  # a worse score
    lo, hi = bootstrap_diff_ci(a_id, a_ood, noise_id, noise_ood, g_id, g_ood, n_boot=300)
    assert 0 < lo < hi
    # against a score with no constant part, the difference interval matches the separate ones
    ci_a = bootstrap_ci(a_id, a_ood, g_id, g_ood, n_boot=300)
    zero = bootstrap_diff_ci(a_id, a_ood, np.zeros(180), np.zeros(120), g_id, g_ood, n_boot=300)
    assert np.allclose(np.array(zero) + 0.5, ci_a)  # AUROC of an all-tied score is 0.5 everywhere
    with pytest.raises(CertoodError, match="expected two scores of the same boxes"):
        bootstrap_diff_ci(a_id, a_ood, a_id[:-1], a_ood, g_id, g_ood)


# ----------------------------------------------------------------------------- spec
BASE = """version: 1
detector: {kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn"}
data:
  calibration: {digitsdet: val}
  ood:
    mixed: {digitsdet: mixed, protocol: PROTO}
    near:  {digitsdet: ood-near}
taps: {logits: cls_logits}
scores: {energy: {tap: logits}}
"""


def test_spec_protocol_defaults_to_box_and_reads_gt_matched():
    spec = load_spec_text(BASE.replace("PROTO", "gt_matched"))
    assert spec.data.ood["mixed"].protocol == "gt_matched" and spec.data.ood["near"].protocol == "box"
    assert spec.data.calibration.protocol == "box"


def test_spec_protocol_errors_and_warnings_are_located():
    with pytest.raises(SpecError) as err:
        load_spec_text(BASE.replace("PROTO", "gt_match"), filename="s.yaml")
    [issue] = err.value.issues
    assert (issue.file, issue.line, issue.column, issue.key_path) == ("s.yaml", 6, 41, "data.ood.mixed.protocol")
    assert "box, gt_matched" in issue.expected and "did you mean 'gt_matched'" in issue.hint
    # protocol only on OOD sets
    _, issues = check_spec_text(BASE.replace("PROTO", "box").replace(
        "calibration: {digitsdet: val}", "calibration: {digitsdet: val, protocol: box}"))
    assert [i.key_path for i in issues if i.severity == "error"] == ["data.calibration.protocol"]
    # gt_matched on a set without ID objects, and mixed under the box protocol: warnings
    spec, issues = check_spec_text(BASE.replace("PROTO", "box").replace(
        "near:  {digitsdet: ood-near}", "near:  {digitsdet: ood-near, protocol: gt_matched}"))
    assert spec is not None
    warnings = {(i.key_path, i.line) for i in issues if i.severity == "warning"}
    assert warnings == {("data.ood.mixed.digitsdet", 6), ("data.ood.near.protocol", 7)}


# ----------------------------------------------------------------------------- certood check
@pytest.fixture(scope="module")
def mixed_check(digitsdet_root, random_weights, tmp_path_factory):
    text = SPEC_TEMPLATE.format(weights=random_weights, root=digitsdet_root, far=digitsdet_root, tpr=0.95,
                                temperature=1.0, rule="energy > t.energy or maha > t.maha")
    mixed = (f"    mixed: {{annotations: {digitsdet_root}/mixed.json, images: {digitsdet_root}/mixed, "
             "max_images: 10, protocol: gt_matched}\n")
    text = text.replace("    far:  {", mixed + "    far:  {")
    spec = load_spec_text(text)
    assert spec.data.ood["mixed"].protocol == "gt_matched"
    out = tmp_path_factory.mktemp("mixed_check")
    result = run_check(spec, out)
    boxes = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    return result, boxes, digitsdet_root


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_check_labels_mixed_boxes_by_their_ground_truth(mixed_check):
    result, boxes, root = mixed_check
    mixed = [b for b in boxes if b["dataset"] == "ood/mixed"]
    assert mixed and all(b["gt_match"] in ("id", "ood", "unmatched") for b in mixed)
    assert all("gt_match" not in b for b in boxes if b["dataset"] != "ood/mixed")
    coco = json.loads((root / "mixed.json").read_text())
    gts: dict = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        gts.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], a["category_id"]))
    checked = 0
    for b in mixed:  # brute force, skipping boxes within rounding of the IoU cut
        ious = [(_iou(b["box"], g), c) for g, c in gts.get(b["image_id"], [])]
        best, cat = max(ious) if ious else (0.0, None)
        if abs(best - 0.5) < 0.01:
            continue
        expected = "unmatched" if best < 0.5 else "id" if cat in (1, 2, 3, 4, 5) else "ood"
        assert b["gt_match"] == expected, (b, best, cat)
        checked += 1
    assert checked >= 0.95 * len(mixed)
    entry = result.metrics["ood"]["mixed"]
    counts = {k: sum(b["gt_match"] == k for b in mixed) for k in ("id", "ood", "unmatched")}
    assert entry["protocol"] == "gt_matched" and entry["n_boxes"] == len(mixed)
    assert entry["counts"] == {"id_matched": counts["id"], "ood_matched": counts["ood"],
                               "unmatched": counts["unmatched"]}
    assert counts["id"] >= 3 and counts["ood"] >= 3  # the random detector does hit objects
    assert result.metrics["ood"]["near"]["protocol"] == "box"
    assert set(result.metrics["protocols"]) == {"box", "gt_matched"}


def test_check_gt_matched_metrics_compare_the_sets_own_id_and_ood_boxes(mixed_check):
    result, boxes, _ = mixed_check
    entry = result.metrics["ood"]["mixed"]
    matched = [b for b in boxes if b["dataset"] == "ood/mixed" and b["gt_match"] != "unmatched"]
    y = np.array([b["gt_match"] == "ood" for b in matched], dtype=int)
    for name in ("energy", "maha"):
        s = np.array([b["scores"][name] for b in matched])
        m = entry["scores"][name]
        assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
        assert (m["n_id"], m["n_ood"]) == (int((y == 0).sum()), int((y == 1).sum()))
        assert {"fpr95", "fpr95_first", "aupr_in", "aupr_out"} <= set(m)
    flags = np.array([b["flag"] for b in matched])
    assert entry["rule"]["ood_flag_rate"] == pytest.approx(flags[y == 1].mean())
    assert entry["rule"]["id_tpr"] == pytest.approx(1 - flags[y == 0].mean())
    summary = (result.out_dir / "summary.txt").read_text()
    assert "OOD mixed (gt-matched)" in summary and "ID-matched" in summary
    assert "| mixed (gt-matched) | energy |" in (result.out_dir / "report.md").read_text()
