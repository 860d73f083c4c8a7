"""calibrate: thresholds are the tpr quantile of calibration ID boxes; run_check end to end on
a tiny DigitsDet with a random detector, a corrupt OOD image included."""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from certood.check import load_spec_detector, run_check
from certood.monitor import calibrate

BOX_KEYS = {"dataset", "image_id", "box", "box_format", "label", "category_id", "det_score", "scores",
            "flag", "gt_category_id"}


@pytest.fixture(scope="module")
def spec(make_tiny_spec):
    return make_tiny_spec()


@pytest.fixture(scope="module")
def detector(spec):
    return load_spec_detector(spec)


@pytest.fixture(scope="module")
def calibrated(spec, detector):
    monitor, extracted = calibrate(spec, detector, detector.num_classes)
    return monitor, extracted["calibration"]


def _assert_threshold_keeps_tpr(values: torch.Tensor, threshold: float, tpr: float) -> None:
    v = values.double().numpy()
    n = len(v)
    # sound: at least a fraction tpr of the ID boxes is not flagged (score <= threshold) ...
    assert np.sum(v <= threshold) >= tpr * n, (np.sum(v <= threshold), tpr * n)
    # ... and tight: not more boxes below it than that fraction needs
    assert np.sum(v < threshold) <= math.ceil(tpr * n), (np.sum(v < threshold), tpr * n)


def test_calibration_sets_detector_cut_and_counts(calibrated, spec):
    monitor, cal = calibrated
    assert monitor.detector_threshold == 0.0
    assert len(cal) == monitor.calibration["calibration_boxes"] >= 100
    assert monitor.calibration["calibration_images"] == cal.n_images == 10
    assert 0 < monitor.calibration["fit_boxes"] <= 10 * 100
    assert monitor.label_to_category == [1, 2, 3, 4, 5]
    assert set(monitor.thresholds) == set(spec.scores) == {"energy", "maha"}
    assert all(math.isfinite(t) for t in monitor.thresholds.values())


def test_thresholds_are_the_tpr_quantile_of_calibration_scores(calibrated, spec):
    monitor, cal = calibrated
    values = monitor.score_boxes(cal)
    for name, v in values.items():
        assert v.shape == (len(cal),)
        _assert_threshold_keeps_tpr(v, monitor.thresholds[name], spec.threshold.tpr)
    # the energy score is recomputable from the tapped logits alone (foreground columns)
    logits = cal.taps["cls_logits"][:, 1:].double()
    energy = -torch.logsumexp(logits, dim=1)
    torch.testing.assert_close(values["energy"].double(), energy, rtol=1e-5, atol=1e-5)
    _assert_threshold_keeps_tpr(energy, monitor.thresholds["energy"], spec.threshold.tpr)


def test_thresholds_keep_tpr_when_tpr_times_n_is_fractional(make_tiny_spec, detector):
    spec = make_tiny_spec(tpr=0.9555)
    monitor, extracted = calibrate(spec, detector, detector.num_classes)
    values = monitor.score_boxes(extracted["calibration"])
    assert len(values["energy"]) == 1000  # so tpr * n = 955.5
    _assert_threshold_keeps_tpr(values["energy"], monitor.thresholds["energy"], 0.9555)


def test_flag_is_the_rule_over_the_thresholds(calibrated):
    monitor, cal = calibrated
    values = monitor.score_boxes(cal)
    t = monitor.thresholds
    expected = (values["energy"].double() > t["energy"]) | (values["maha"].double() > t["maha"])
    flags = monitor.flag(values)
    assert flags.dtype == torch.bool and flags.shape == (len(cal),)
    assert 0 < int(flags.sum()) <= 2 * (1 - 0.95) * len(cal) + 2
    near = ((values["energy"].double() - t["energy"]).abs() < 1e-5) | \
           ((values["maha"].double() - t["maha"]).abs() < 1e-4)  # float32 vs float64 at the cut
    assert torch.equal(flags[~near], expected[~near])


# ----------------------------------------------------------------------------- run_check
CORRUPT_IMAGE = "000003.png"


@pytest.fixture(scope="module")
def checked(tmp_path_factory, digitsdet_root, make_tiny_spec):
    """run_check with ood-far copied aside and one of its first 10 images truncated."""
    far = tmp_path_factory.mktemp("far")
    shutil.copytree(digitsdet_root / "ood-far", far / "ood-far")
    shutil.copy(digitsdet_root / "ood-far.json", far / "ood-far.json")
    png = far / "ood-far" / CORRUPT_IMAGE
    png.write_bytes(png.read_bytes()[:200])
    spec = make_tiny_spec(far=far)
    out = tmp_path_factory.mktemp("check") / "out"
    result = run_check(spec, out)
    return spec, result, out


def _boxes(out) -> list[dict]:
    return [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]


def test_run_check_writes_every_output(checked):
    _, result, out = checked
    for name in ("boxes.jsonl", "metrics.json", "report.md", "summary.txt", "monitor/manifest.json",
                 "monitor/scores.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    leftovers = [p.name for p in out.rglob(".*")]
    assert leftovers == []  # no temp files of the atomic writes
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result.metrics))


def test_boxes_jsonl_has_one_valid_line_per_monitored_box(checked):
    spec, result, out = checked
    boxes = _boxes(out)
    metrics = result.metrics
    n_expected = metrics["id_test"]["n_boxes"] + sum(e["n_boxes"] for e in metrics["ood"].values())
    assert len(boxes) == result.n_boxes == n_expected > 0
    assert {b["dataset"] for b in boxes} == {"id_test", "ood/near", "ood/far"}
    thresholds = metrics["monitor"]["thresholds"]
    for b in boxes:
        assert set(b) == BOX_KEYS
        x0, y0, x1, y1 = b["box"]
        assert b["box_format"] == "xyxy" and 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 128
        assert 1 <= b["label"] <= 5 and b["category_id"] == b["label"]  # categories 1..5, in order
        assert b["det_score"] >= metrics["monitor"]["detector_threshold"]
        assert set(b["scores"]) == {"energy", "maha"} and all(map(math.isfinite, b["scores"].values()))
        assert b["gt_category_id"] in (None, 1, 2, 3, 4, 5)
        margins = [b["scores"][k] - thresholds[k] for k in ("energy", "maha")]
        if all(abs(m) > 1e-4 for m in margins):
            assert b["flag"] == any(m > 0 for m in margins), b
    per_set = {name: sum(b["dataset"] == f"ood/{name}" for b in boxes) for name in ("near", "far")}
    assert per_set == {name: metrics["ood"][name]["n_boxes"] for name in per_set}


def test_metrics_have_finite_auroc_that_matches_sklearn(checked):
    _, result, out = checked
    boxes = _boxes(out)
    metrics = result.metrics
    assert set(metrics["ood"]) == {"near", "far"}
    for ood_name, entry in metrics["ood"].items():
        assert set(entry["scores"]) == {"energy", "maha"}
        for score, m in entry["scores"].items():
            assert math.isfinite(m["auroc"]) and 0.0 <= m["auroc"] <= 1.0
            assert 0.0 <= m["fpr95"] <= 1.0 and 0.0 <= m["aupr_in"] <= 1.0
            id_scores = [b["scores"][score] for b in boxes if b["dataset"] == "id_test"]
            ood_scores = [b["scores"][score] for b in boxes if b["dataset"] == f"ood/{ood_name}"]
            assert (m["n_id"], m["n_ood"]) == (len(id_scores), len(ood_scores))
            reference = roc_auc_score([0] * len(id_scores) + [1] * len(ood_scores), id_scores + ood_scores)
            assert m["auroc"] == pytest.approx(reference, abs=1e-6), (ood_name, score)
    id_part = metrics["id_test"]
    assert id_part["n_images"] == 10 and 0.0 <= id_part["map"] <= 1.0


def test_corrupt_ood_image_is_listed_in_issues_and_the_run_completes(checked):
    _, result, out = checked
    assert result.metrics["ood"]["far"]["n_images"] == 9
    assert result.metrics["ood"]["near"]["n_images"] == 10
    bad = [m for m in result.metrics["issues"] if CORRUPT_IMAGE in m]
    assert len(bad) == 1 and bad[0].startswith("ood/far:")
    assert result.issues == result.metrics["issues"]
    assert CORRUPT_IMAGE in (out / "report.md").read_text() + (out / "summary.txt").read_text()


def test_run_check_records_fingerprints_and_the_monitor(checked, random_weights):
    spec, result, out = checked
    sha = hashlib.sha256(random_weights.read_bytes()).hexdigest()
    manifest = json.loads((out / "monitor" / "manifest.json").read_text())
    assert result.metrics["detector_sha256"] == manifest["detector_sha256"] == sha
    assert result.metrics["spec_fingerprint"] == manifest["spec_fingerprint"] == spec.fingerprint()
    assert manifest["thresholds"] == result.metrics["monitor"]["thresholds"]
    summary = (out / "summary.txt").read_text()
    report = (out / "report.md").read_text()
    for text in (summary, report):
        assert "near" in text and "far" in text
    auroc = result.metrics["ood"]["near"]["scores"]["energy"]["auroc"]
    assert f"{auroc:.3f}" in report


def test_run_check_with_the_saved_monitor_gives_the_same_boxes(checked, tmp_path):
    spec, result, out = checked
    again = run_check(spec, tmp_path / "again", monitor_dir=out / "monitor")
    assert not (tmp_path / "again" / "monitor").exists()
    assert (tmp_path / "again" / "boxes.jsonl").read_text() == (out / "boxes.jsonl").read_text()
    assert again.metrics["ood"] == result.metrics["ood"]


def test_run_check_writes_the_html_report_and_the_figures(checked):
    from html.parser import HTMLParser

    from PIL import Image

    _, result, out = checked
    plots = result.metrics["plots"]
    files = {p["file"] for p in plots}
    assert {"plots/roc_near.png", "plots/roc_far.png", "plots/hist_energy.png", "plots/hist_maha.png",
            "plots/examples_energy.png", "plots/examples_maha.png"} <= files
    assert not [m for m in result.issues if m.startswith("plots:")]
    for f in files:
        with Image.open(out / f) as im:
            im.verify()
    images = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                images.append(dict(attrs)["src"])

    Parser().feed((out / "report.html").read_text())
    assert len(images) == len(files) and all(s.startswith("data:image/png;base64,") for s in images)
    report = (out / "report.md").read_text()
    assert all(f"({f})" in report for f in files)


# ------------------------------------------------------------------ fit set, streamed (issue 15)
def _fit_reference(detector, dataset, points, threshold, label_to_category):
    """The fit rows the way calibration read them before streaming: the whole set in memory."""
    from certood.extract import extract_detections
    from certood.monitor import match_dataset

    dets = extract_detections(detector, dataset, points, min_score=threshold)
    dets = dets.select(dets.det_scores >= threshold)
    labels = match_dataset(dets, dataset, label_to_category, same_class=False)
    return dets.select(labels >= 0), labels[labels >= 0]


def test_fit_boxes_stream_the_fit_set_and_reservoir_sample_it(spec, detector, calibrated):
    from certood.monitor import fit_boxes, spec_datasets

    calibrated = calibrated[0]
    dataset = spec_datasets(spec)["fit"]
    points = sorted(calibrated.tap_points)
    args = (detector, dataset, points, calibrated.detector_threshold, calibrated.label_to_category)
    ref, ref_labels = _fit_reference(*args)
    assert len(ref) >= 20
    dets, labels = fit_boxes(*args)  # no cap: every row, in image order, as before
    assert torch.equal(labels, ref_labels) and torch.equal(dets.image_ids, ref.image_ids)
    for p in points:
        torch.testing.assert_close(dets.taps[p], ref.taps[p], rtol=1e-5, atol=1e-5)
    # capped: max_boxes rows of the full set, in image order; the same for the same seed
    k = len(ref) // 3
    a, a_labels = fit_boxes(*args, max_boxes=k)
    b, _ = fit_boxes(*args, max_boxes=k)
    c, _ = fit_boxes(*args, max_boxes=k, seed=1)
    assert len(a) == k and torch.equal(a.boxes, b.boxes) and not torch.equal(a.boxes, c.boxes)
    rows = [int(torch.nonzero((ref.boxes == box).all(1) & (ref.image_ids == i)).flatten()[0])
            for box, i in zip(a.boxes, a.image_ids)]
    assert rows == sorted(rows) and len(set(rows)) == k
    assert torch.equal(a_labels, ref_labels[rows])


def test_max_boxes_is_a_key_of_the_fit_set_only(tmp_path, make_tiny_spec):
    from certood.errors import SpecError
    from certood.spec import load_spec_text

    import yaml

    raw = dict(make_tiny_spec().raw)
    raw["data"] = {**raw["data"], "fit": {**raw["data"]["fit"], "max_boxes": 5}}
    assert load_spec_text(yaml.safe_dump(raw)).data.fit.max_boxes == 5
    raw["data"] = {**raw["data"], "id_test": {**raw["data"]["id_test"], "max_boxes": 5}}
    with pytest.raises(SpecError, match="max_boxes"):
        load_spec_text(yaml.safe_dump(raw))
