"""`certood check` with a `temporal` block, end to end on a tiny DigitsDet-Video with a random
detector: calibration stores track thresholds, boxes.jsonl gets track ids, metrics.json a
`temporal` section whose counts agree with the box records."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from certood.artifacts import read_manifest
from certood.check import run_check
from certood.data.digitsdet_video import generate_digitsdet_video
from certood.spec import load_spec_text

SPEC = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: {weights}, num_classes: 6, score_thresh: 0.0}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train, max_images: 10}}
  calibration: {{annotations: {video}/video-val.json, images: {video}/video-val}}
  id_test:     {{annotations: {video}/video-test.json, images: {video}/video-test}}
  ood:
    video: {{annotations: {video}/video-ood.json, images: {video}/video-ood}}
    still: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 3}}
taps: {{penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: 0.95, detector_score: 0.0}}
temporal: {{tracker: {{iou: 0.3, max_age: 2}}, aggregate: {aggregate}, certified: {{k: 2, n: 3}}}}
"""


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    return generate_digitsdet_video(tmp_path_factory.mktemp("video") / "root", seed=0,
                                    sizes={"video-val": 2, "video-test": 2, "video-ood": 2}, n_frames=8)


@pytest.fixture(scope="module")
def checked(tmp_path_factory, video_root, digitsdet_root, random_weights):
    spec = load_spec_text(SPEC.format(weights=random_weights, root=digitsdet_root, video=video_root,
                                      aggregate="ema"))
    out = tmp_path_factory.mktemp("check") / "out"
    return spec, run_check(spec, out), out


def test_calibration_stores_track_thresholds_in_the_monitor(checked):
    spec, result, out = checked
    temporal = read_manifest(out / "monitor")["calibration"]["temporal"]
    assert temporal["aggregate"] == "ema" and set(temporal["thresholds"]) == {"energy", "maha"}
    assert temporal["n_frames"] == 16 and temporal["n_boxes"] > 0 and temporal["quantile"] == 0.95
    assert result.metrics["temporal"]["thresholds"] == temporal["thresholds"]


def test_box_records_carry_track_ids_and_track_scores(checked):
    spec, result, out = checked
    records = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    video = [r for r in records if r["dataset"] in ("id_test", "ood/video")]
    still = [r for r in records if r["dataset"] == "ood/still"]
    assert video and all({"track_id", "video_id", "frame_id", "track_scores", "track_flag"} <= set(r) for r in video)
    assert all("track_id" not in r for r in still)
    for r in video:
        assert set(r["track_scores"]) == {"energy", "maha"}
    # one box per track and frame
    per_frame = Counter((r["dataset"], r["track_id"], r["video_id"], r["frame_id"]) for r in video)
    assert max(per_frame.values()) == 1
    # track ids never span two videos
    videos_of = {}
    for r in video:
        videos_of.setdefault((r["dataset"], r["track_id"]), set()).add(r["video_id"])
    assert all(len(v) == 1 for v in videos_of.values())


def test_metrics_have_a_temporal_section_consistent_with_the_records(checked):
    spec, result, out = checked
    section = json.loads((out / "metrics.json").read_text())["temporal"]
    records = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert section["tracker"] == {"iou": 0.3, "max_age": 2} and section["aggregate"] == "ema"
    assert "ood/still" in section["skipped"] and "video_id" in section["skipped"]["ood/still"]
    id_test = section["id_test"]
    id_records = [r for r in records if r["dataset"] == "id_test"]
    assert id_test["n_frames"] == 16 and id_test["n_boxes"] == len(id_records)
    assert id_test["n_tracks"] == len({r["track_id"] for r in id_records})
    fa = id_test["false_alarms_per_1000_frames"]
    assert fa["frame"]["rule"] == pytest.approx(1000 * sum(r["flag"] for r in id_records) / 16)
    assert fa["track"]["rule"] == pytest.approx(1000 * sum(r["track_flag"] for r in id_records) / 16)
    ood = section["ood"]["video"]
    assert ood["n_unknown_objects"] == 2 and ood["n_frames"] == 16
    assert sum(ood["n_tracks"].values()) == len({r["track_id"] for r in records if r["dataset"] == "ood/video"})
    for level in ("frame", "track"):
        for key in ("energy", "maha", "rule"):
            summary = ood["delay"][level][key]
            assert summary["n_objects"] == 2 and 0 <= summary["detected_rate"] <= 1
    for score in ("energy", "maha"):
        assert set(ood["scores"][score]) == {"frame", "track_box", "track"}
    assert "## Temporal (track level)" in (out / "report.md").read_text()
