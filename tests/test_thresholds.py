"""Threshold methods: the pure math (tpr / fpr quantiles, per-class fallback) and calibrate
with per_class, fpr on an OOD validation set, and fixed values, end to end on tiny DigitsDet."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from certood.artifacts import load_monitor, read_manifest, save_monitor
from certood.check import load_spec_detector, run_check
from certood.errors import DataError
from certood.monitor import calibrate
from certood.spec import ThresholdSpec, load_spec_text
from certood.thresholds import compute_thresholds, fpr_threshold, tpr_threshold


# --- the math ------------------------------------------------------------------------------
@pytest.mark.parametrize("n, fpr", [(100, 0.05), (7, 0.05), (20, 0.5), (1, 0.3), (55, 0.123)])
def test_fpr_threshold_is_the_largest_keeping_at_most_fpr(n, fpr):
    gen = torch.Generator().manual_seed(n)
    values = torch.randint(0, 5, (n,), generator=gen).double()  # many ties
    t = fpr_threshold(values, fpr)
    v = values.numpy()
    assert np.sum(v <= t) <= fpr * n  # at most a fraction fpr accepted (not flagged)
    above = v[v > t]
    assert len(above) == 0 or np.sum(v <= above.min()) > fpr * n  # and no larger threshold would do


def test_tpr_threshold_matches_numpy_and_refuses_no_boxes():
    values = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    assert tpr_threshold(values, 0.6) == float(np.quantile(values.numpy(), 0.6, method="higher"))
    with pytest.raises(DataError, match="no monitored box"):
        tpr_threshold(torch.empty(0), 0.95)
    with pytest.raises(DataError, match="no monitored box"):
        fpr_threshold(torch.empty(0), 0.05)


def test_per_class_thresholds_fall_back_below_min_boxes():
    values = {"e": torch.cat([torch.arange(30.0), 100 + torch.arange(5.0)])}
    labels = torch.tensor([1] * 30 + [3] * 5)
    t = compute_thresholds(ThresholdSpec(tpr=0.9, per_class=True), values, labels, num_labels=4, min_boxes=20)
    glob = tpr_threshold(values["e"], 0.9)
    assert t.values == {"e": glob}
    assert t.per_class["e"] == [glob, tpr_threshold(torch.arange(30.0), 0.9), glob, glob]
    assert t.record["classes"] == {"1": {"boxes": 30, "fallback": False}, "2": {"boxes": 0, "fallback": True},
                                   "3": {"boxes": 5, "fallback": True}}
    assert t.record["method"] == "tpr" and t.record["per_class"] is True and t.record["min_class_boxes"] == 20


def test_fixed_thresholds_are_taken_as_given():
    t = compute_thresholds(ThresholdSpec(tpr=None, fixed={"e": -3.2}), {}, torch.empty(0), 3, 20)
    assert t.values == {"e": -3.2} and t.per_class == {} and t.record == {"method": "fixed", "per_class": False}


# --- calibrate end to end ------------------------------------------------------------------
TEMPLATE = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: {weights}, num_classes: 6, score_thresh: 0.0}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train, max_images: 10}}
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 10}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test, max_images: 4}}
  ood:
    far:  {{annotations: {root}/ood-far.json, images: {root}/ood-far, max_images: 4}}
  ood_validation:
    near: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 6}}
taps: {{penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {threshold}
rule: "{rule}"
"""


@pytest.fixture(scope="module")
def make(digitsdet_root, random_weights):
    def build(threshold: str, rule: str = "energy > t.energy or maha > t.maha"):
        return load_spec_text(TEMPLATE.format(weights=random_weights, root=digitsdet_root, threshold=threshold,
                                              rule=rule))
    return build


@pytest.fixture(scope="module")
def detector(make):
    return load_spec_detector(make("{tpr: 0.95, detector_score: 0.0}"))


@pytest.fixture(scope="module")
def per_class(make, detector):
    spec = make("{tpr: 0.9, per_class: true, detector_score: 0.0}", "energy > t.energy[class] or maha > t.maha[class]")
    monitor, extracted = calibrate(spec, detector, detector.num_classes)
    return spec, monitor, extracted["calibration"]


def test_per_class_calibration_sets_each_class_at_its_tpr(per_class):
    spec, monitor, cal = per_class
    values, labels = monitor.score_boxes(cal), cal.labels
    record = monitor.calibration["threshold"]
    assert record["method"] == "tpr" and record["per_class"] and record["boxes"] == len(cal)
    for name, table in monitor.class_thresholds.items():
        assert len(table) == 6 and table[0] == monitor.thresholds[name]
        for c in range(1, 6):
            n = int((labels == c).sum())
            assert record["classes"][str(c)] == {"boxes": n, "fallback": n < 20}
            if n >= 20:
                v = values[name][labels == c].double().numpy()
                assert np.sum(v <= table[c]) >= 0.9 * n and np.sum(v < table[c]) <= math.ceil(0.9 * n)
            else:
                assert table[c] == monitor.thresholds[name]
    assert any(not r["fallback"] for r in record["classes"].values())


def test_flag_passes_labels_to_per_class_rules(per_class):
    spec, monitor, cal = per_class
    values = monitor.score_boxes(cal)
    flags = monitor.flag(values, cal.labels)
    table = {k: torch.tensor(v, dtype=torch.float64) for k, v in monitor.class_thresholds.items()}
    expected = (values["energy"].double() > table["energy"][cal.labels]) | \
        (values["maha"].double() > table["maha"][cal.labels])
    assert torch.equal(flags, expected)
    with pytest.raises(ValueError, match="labels"):
        monitor.flag(values)


def test_per_class_thresholds_survive_the_artifact(per_class, detector, tmp_path):
    spec, monitor, cal = per_class
    save_monitor(monitor, tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    assert manifest["class_thresholds"] == monitor.class_thresholds
    assert manifest["threshold_rule"]["method"] == "tpr" and manifest["threshold_rule"]["tpr"] == 0.9
    assert manifest["threshold_rule"]["classes"] == monitor.calibration["threshold"]["classes"]
    loaded = load_monitor(tmp_path / "m", spec, detector.weights_sha256)
    values = monitor.score_boxes(cal)
    assert torch.equal(loaded.flag(values, cal.labels), monitor.flag(values, cal.labels))


def test_fpr_calibration_on_the_ood_validation_set(make, detector):
    spec = make("{fpr: 0.1, on: near, detector_score: 0.0}")
    monitor, _ = calibrate(spec, detector, detector.num_classes)
    record = monitor.calibration["threshold"]
    assert record["method"] == "fpr" and record["target"] == 0.1 and record["on"] == "ood_validation/near boxes"
    from certood.extract import extract_detections
    from certood.monitor import load_dataset

    val = extract_detections(detector, load_dataset(spec.data.ood_validation["near"], "near"), monitor.tap_points)
    values = monitor.score_boxes(val)
    assert record["boxes"] == len(val) > 0
    for name, v in values.items():  # at most 10% of the validation OOD boxes pass unflagged, and tight
        t = monitor.thresholds[name]
        passed = int((v.double() <= t).sum())
        assert passed <= 0.1 * len(v) and int((v.double() <= torch.sort(v.double()[v.double() > t]).values[0]).sum()) > 0.1 * len(v)


def test_fixed_thresholds_and_metrics_record(make, detector, tmp_path):
    spec = make("{fixed: {energy: -1.5, maha: 300}, detector_score: 0.0}")
    result = run_check(spec, tmp_path / "out")
    monitor = json.loads((tmp_path / "out" / "metrics.json").read_text())["monitor"]
    assert monitor["thresholds"] == {"energy": -1.5, "maha": 300.0}
    assert monitor["threshold"] == {"method": "fixed", "per_class": False}
    assert monitor["threshold_method"] == "fixed values" and monitor["class_thresholds"] == {}
    assert "fixed values" in (tmp_path / "out" / "report.md").read_text()
    manifest = read_manifest(tmp_path / "out" / "monitor")
    assert manifest["threshold_rule"] == {"method": "fixed", "per_class": False}
    assert result.n_boxes > 0


def test_calibrate_command_prints_method_and_class_thresholds(digitsdet_root, random_weights, tmp_path):
    from click.testing import CliRunner

    from certood.cli import main

    spec_path = tmp_path / "m.yaml"
    spec_path.write_text(TEMPLATE.format(weights=random_weights, root=digitsdet_root,
                                         threshold="{tpr: 0.9, per_class: true, detector_score: 0.0}",
                                         rule="energy > t.energy[class] or maha > t.maha"))
    result = CliRunner().invoke(main, ["calibrate", str(spec_path), "-o", str(tmp_path / "mon")])
    assert result.exit_code == 0, result.output
    assert "thresholds at 90% ID TPR on calibration boxes, per predicted class" in result.output
    assert "energy: threshold" in result.output and "(per class: 1=" in result.output
    assert read_manifest(tmp_path / "mon")["class_thresholds"].keys() == {"energy", "maha"}
