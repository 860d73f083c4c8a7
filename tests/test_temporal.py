"""Temporal monitoring: the IoU tracker on synthetic boxes, aggregations against hand
computations, and the metrics of ``temporal_check`` on a scene whose answers are known."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from certood.data.coco import CocoDataset
from certood.errors import CertoodError, DataError
from certood.extract import DatasetDetections
from certood.spec.model import TemporalSpec
from certood.spec.rule import parse_rule
from certood.temporal import (
    IouTracker, aggregate_scores, along_tracks, assign_tracks, calibrate_temporal, cusum, delay_summary,
    detection_delays, ema, false_alarms_per_1000, k_of_n, running_max, running_mean, temporal_check,
    track_detections, track_peaks, track_video,
)

t = torch.tensor


def box(x: float, y: float, w: float = 20, h: float = 20) -> list[float]:
    return [x, y, x + w, y + h]


# =========================================================================== tracking
def test_crossing_objects_keep_their_ids():
    """Two objects cross at 10 px/frame, 8 px apart vertically. At the crossing, the other
    object's last box overlaps more than the object's own (IoU 0.43 vs 0.33): the velocity
    prediction keeps the identities where last-box IoU alone would swap them."""
    tracker = IouTracker(iou=0.3, max_age=3)
    a_ids, b_ids = [], []
    for f in range(9):
        a, b = box(5 + 10 * f, 50), box(95 - 10 * f, 58)  # frame 4 -> 5: a 45 -> 55, b 55 -> 45
        rows = [b, a] if f % 2 else [a, b]  # detector order changes from frame to frame
        ids = tracker.update(f, t(rows)).tolist()
        b_id, a_id = (ids if f % 2 else ids[::-1])
        a_ids.append(a_id)
        b_ids.append(b_id)
    assert len(set(a_ids)) == 1 and len(set(b_ids)) == 1 and a_ids[0] != b_ids[0]


def test_a_missed_frame_within_max_age_continues_the_track_beyond_it_starts_a_new_one():
    frames = [0, 1, 2, 6, 7, 12]  # gaps: 3 missed frames (3..5), then 4 missed (8..11)
    boxes = t([box(10 + 2 * f, 10) for f in frames])
    ids = track_video(t(frames), boxes, iou=0.3, max_age=3).tolist()
    assert ids == [0, 0, 0, 0, 0, 1]
    assert track_video(t(frames), boxes, iou=0.3, max_age=2).tolist() == [0, 0, 0, 1, 1, 2]


def test_the_prediction_follows_a_fast_object_through_a_gap():
    """6 px/frame on a 20 px box: after 3 missed frames the object is 24 px away from its
    last box (IoU 0), yet at the predicted place."""
    frames = [0, 1, 2, 6]
    ids = track_video(t(frames), t([box(6 * f, 0) for f in frames]), iou=0.3, max_age=3)
    assert ids.tolist() == [0, 0, 0, 0]


def test_births_deaths_and_one_box_per_track_per_frame():
    rows = [(0, box(0, 0)), (0, box(60, 60)), (1, box(1, 0)), (1, box(61, 60)), (1, box(100, 0)),
            (2, box(2, 0)), (2, box(3, 1))]  # frame 2: two boxes on one object
    frames, boxes = t([f for f, _ in rows]), t([b for _, b in rows])
    ids = track_video(frames, boxes, iou=0.3, max_age=0).tolist()
    assert ids[:5] == [0, 1, 0, 1, 2]  # the box at x=100 is born at frame 1
    assert ids[5] == 0 and ids[6] not in (0, 1, 2)  # one-to-one: the duplicate starts a track
    # frame 2 has no box near track 1: with max_age 0 it ends, a box there later is new
    more = track_video(t([*frames.tolist(), 3]), t([*boxes.tolist(), box(62, 60)]), iou=0.3, max_age=0)
    assert more[-1].item() not in ids


def test_track_ids_do_not_depend_on_row_order_and_are_unique_across_videos():
    frames = t([0, 0, 1, 1, 2, 2])
    boxes = t([box(0, 0), box(50, 50), box(2, 0), box(52, 50), box(4, 0), box(54, 50)])
    perm = t([5, 2, 0, 3, 1, 4])
    ids = track_video(frames, boxes)
    assert (track_video(frames[perm], boxes[perm]) == ids[perm]).all()
    videos = t([1, 1, 2, 2, 2, 2])
    both = assign_tracks(videos, t([0, 1, 0, 0, 1, 1]), boxes)
    assert both.tolist() == [0, 1, 2, 3, 2, 3]  # video 1: two tracks (no overlap), video 2: two more


def test_tracker_rejects_bad_input():
    with pytest.raises(CertoodError, match="iou"):
        IouTracker(iou=0)
    with pytest.raises(CertoodError, match="max_age"):
        IouTracker(max_age=-1)
    tracker = IouTracker()
    tracker.update(3, t([box(0, 0)]))
    with pytest.raises(CertoodError, match="increasing frames"):
        tracker.update(3, t([box(0, 0)]))
    assert tracker.update(4, torch.zeros(0, 4)).tolist() == []


# =========================================================================== aggregation
def test_aggregations_match_hand_computations():
    x = t([1.0, 3.0, -1.0, 5.0])
    assert running_mean(x).tolist() == [1.0, 2.0, 1.0, 2.0]
    assert running_max(x).tolist() == [1.0, 3.0, 3.0, 5.0]
    # e0 = 1; e1 = .25*3 + .75*1 = 1.5; e2 = .25*-1 + .75*1.5 = .875; e3 = .25*5 + .75*.875 = 1.90625
    assert ema(x, 0.25).tolist() == [1.0, 1.5, 0.875, 1.90625]
    assert ema(x, 1.0).tolist() == x.tolist()
    # C = max(0, C + x - 1): 0, 2, 0, 4
    assert cusum(x, k=1.0).tolist() == [0.0, 2.0, 0.0, 4.0]
    assert cusum(t([0.2, 0.2]), k=0.5).tolist() == [0.0, 0.0]
    with pytest.raises(CertoodError, match="alpha"):
        ema(x, 0.0)


def test_aggregation_runs_per_track_in_frame_order():
    values = t([5.0, 1.0, 7.0, 3.0, 2.0])
    tracks = t([1, 0, 1, 0, 0])
    frames = t([1, 2, 0, 0, 1])  # track 0: frames 0,1,2 -> values 3,2,1; track 1: 7,5
    mean = aggregate_scores(values, tracks, frames, "mean")
    assert mean.tolist() == [6.0, 2.0, 7.0, 3.0, 2.5]
    assert aggregate_scores(values, tracks, frames, "max").tolist() == [7.0, 3.0, 7.0, 3.0, 3.0]
    # cusum on (v - 2) / 2 with k = 0: track 0: .5, .5 + 0 = .5, .5 - .5 = 0; track 1: 2.5, 4
    cs = aggregate_scores(values, tracks, frames, "cusum", k=0.0, mean=2.0, std=2.0)
    assert cs.tolist() == [4.0, 0.0, 2.5, 0.5, 0.5]
    assert along_tracks(lambda v: v * 0 + len(v), values, tracks, frames).tolist() == [2, 3, 2, 3, 3]
    with pytest.raises(CertoodError, match="aggregate"):
        aggregate_scores(values, tracks, frames, "median")


def test_k_of_n_counts_flags_in_the_frame_window():
    flags = t([True, True, False, True, True, False])
    frames = t([0, 1, 2, 3, 4, 8])
    assert k_of_n(flags, frames, k=3, n=4).tolist() == [False, False, False, True, True, False]
    assert k_of_n(flags, frames, k=1, n=1).tolist() == flags.tolist()
    with pytest.raises(CertoodError):
        k_of_n(flags, frames, k=3, n=2)


def test_track_peaks_delays_and_false_alarms():
    ids, peaks = track_peaks(t([1.0, 4.0, 2.0, -1.0]), t([5, 5, 9, 2]))
    assert ids.tolist() == [2, 5, 9] and peaks.tolist() == [-1.0, 4.0, 2.0]
    assert false_alarms_per_1000(t([True] * 3 + [False] * 7), 200) == 15.0
    s = delay_summary({1: 0.0, 2: 4.0, 3: 1.0, 4: float("inf")})
    assert s == {"n_objects": 4, "detected_rate": 0.75, "mean": 5 / 3, "median": 1.0, "max": 4.0}


# =========================================================================== a known scene
def _dataset(name: str, videos: dict[int, dict[int, list[tuple]]]) -> CocoDataset:
    """videos: video -> frame -> [(instance, category, xywh, entry)] (10 frames per video)."""
    images, anns = [], []
    for vid, frames in videos.items():
        for f in range(10):
            image_id = vid * 100 + f
            images.append({"id": image_id, "file_name": f"{vid}/{f}.png", "width": 128, "height": 128,
                           "video_id": vid, "frame_id": f})
            for inst, cat, xywh, entry in frames.get(f, []):
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": xywh,
                             "instance_id": inst, "ood_entry_frame": entry})
    cats = [{"id": c, "name": str(c)} for c in (1, 2, 3, 4, 5, 99)]
    return CocoDataset(name, {"images": images, "annotations": anns, "categories": cats}, [])


def _dets(name: str, rows: list[tuple[int, list[float], float]], n_images: int) -> DatasetDetections:
    """rows: (image id, xyxy, score)."""
    return DatasetDetections(name, t([r[0] for r in rows]), t([r[1] for r in rows]), torch.ones(len(rows)).long(),
                             torch.ones(len(rows)), {}, n_images, 0.0)


@pytest.fixture
def scene():
    """ID test video: one ID object, score 0 but one spike of 3 at frame 6.
    OOD video: an ID object (score 0) and an unknown entering at frame 4 with scores
    1.5, 2.5, 3, 3, 3, 3. Frame threshold 2, track threshold (running mean) 1."""
    id_gt = {f: [(1, 1, [10 + f, 10, 20, 20], None)] for f in range(10)}
    ood_gt = {f: [(10, 2, [10 + f, 10, 20, 20], None)] + ([(11, 99, [80, 60 + f, 20, 20], 4)] if f >= 4 else [])
              for f in range(10)}
    id_set, ood_set = _dataset("id_test", {1: id_gt}), _dataset("ood/video", {1: ood_gt})
    id_rows = [(100 + f, box(10 + f, 10), 3.0 if f == 6 else 0.0) for f in range(10)]
    ood_rows = [(100 + f, box(10 + f, 10), 0.0) for f in range(10)]
    ood_rows += [(100 + f, box(80, 60 + f), s) for f, s in zip(range(4, 10), [1.5, 2.5, 3, 3, 3, 3])]
    ood_rows.sort(key=lambda r: r[0])
    parts = {}
    for name, rows, ds in (("id_test", id_rows, id_set), ("ood/video", ood_rows, ood_set)):
        dets = _dets(name, rows, 10)
        values = {"s": t([r[2] for r in rows], dtype=torch.float32)}
        parts[name] = {"dets": dets, "values": values, "flags": values["s"] > 2.0, "dataset": ds}
    temporal = TemporalSpec(iou=0.3, max_age=3, aggregate="mean", certified_k=2, certified_n=3)
    spec = SimpleNamespace(temporal=temporal, scores={"s": None}, rule=parse_rule("s > t.s"))
    calibration = {"thresholds": {"s": 1.0}, "standardize": {"s": {"mean": 0.0, "std": 1.0}},
                   "n_boxes": 0, "n_tracks": 0, "n_frames": 0, "quantile": 0.95}
    monitor = SimpleNamespace(calibration={"temporal": calibration}, thresholds={"s": 2.0},
                              label_to_category=[1, 2, 3, 4, 5])
    lines = []
    for name, part in parts.items():
        for i in range(len(part["dets"])):
            rec = {"dataset": name, "image_id": int(part["dets"].image_ids[i])}
            unknown_box = name.startswith("ood") and float(part["dets"].boxes[i, 0]) == 80
            frame = int(part["dets"].image_ids[i]) % 100
            if unknown_box and frame >= 5:
                rec["certificate"] = {"verdict": "certified_ood"}
            elif name == "id_test":  # one certified spike, never 2 of 3 frames
                rec["certificate"] = {"verdict": "certified_ood" if frame == 6 else "certified_id"}
            lines.append(json.dumps(rec))
    return spec, monitor, parts, lines


def test_track_detections_labels_boxes_and_tracks(scene):
    spec, monitor, parts, _ = scene
    tb = track_detections(parts["ood/video"]["dets"], parts["ood/video"]["dataset"], monitor.label_to_category)
    assert tb.n_tracks == 2 and tb.n_frames == 10
    assert tb.entries == {11: 4} and tb.entry_video == {11: 1}
    unknown = tb.instance_ids == 11
    assert int(unknown.sum()) == 6 and (tb.box_unknown[unknown] == 1).all() and (tb.box_unknown[~unknown] == 0).all()
    assert (tb.track_unknown == tb.box_unknown).all()
    assert tb.frame_ids[unknown].tolist() == [4, 5, 6, 7, 8, 9]


def test_temporal_check_numbers_on_a_known_scene(scene):
    spec, monitor, parts, lines = scene
    new_lines, section = temporal_check(spec, monitor, parts, lines)
    records = [json.loads(line) for line in new_lines]
    assert len(records) == len(lines) and all("track_id" in r and "track_flag" in r for r in records)
    unknown = [r for r in records if r["dataset"] == "ood/video" and r.get("certificate")]
    assert [r["track_certified_ood"] for r in unknown] == [False, True, True, True, True]
    assert len({r["track_id"] for r in unknown}) == 1
    # false alarms on 10 ID frames: the frame-level spike at frame 6 is one; its running mean
    # (3/7) stays below the track threshold
    fa = section["id_test"]["false_alarms_per_1000_frames"]
    assert fa["frame"] == {"s": 100.0, "rule": 100.0} and fa["track"] == {"s": 0.0, "rule": 0.0}
    ood = section["ood"]["video"]
    assert ood["n_tracks"] == {"id": 1, "ood": 1, "unmatched": 0} and ood["n_unknown_objects"] == 1
    # the unknown enters at 4: frame level flags it from 5 (2.5 > 2), track level from 4 (1.5 > 1)
    assert ood["delay"]["frame"]["s"]["mean"] == 1.0 and ood["delay"]["track"]["s"]["mean"] == 0.0
    assert ood["delay"]["track"]["rule"]["detected_rate"] == 1.0
    # certified at 5..9: 2 of the last 3 frames first at 6
    assert ood["certified"]["delay"]["mean"] == 2.0
    assert section["id_test"]["false_alarms_per_1000_frames"]["certified"] == 0.0
    # track unit: ID tracks' peaks vs the unknown track's peak; both separate perfectly here
    assert ood["scores"]["s"]["track"]["auroc"] == 1.0 and ood["scores"]["s"]["track"]["n_id"] == 2
    # box unit, frame-level: the ID spike (3) ties the unknown's top scores
    frame = ood["scores"]["s"]["frame"]
    id_scores = np.array([0.0] * 19 + [3.0])
    ood_scores = np.array([1.5, 2.5, 3, 3, 3, 3])
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score(np.r_[np.zeros(20), np.ones(6)], np.r_[id_scores, ood_scores])
    assert frame["auroc"] == pytest.approx(expected) and frame["n_id"] == 20 and frame["n_ood"] == 6


def test_temporal_check_skips_still_images_and_needs_a_temporal_calibration(scene):
    spec, monitor, parts, lines = scene
    still = parts["id_test"]["dataset"]
    for im in still.coco["images"]:
        del im["video_id"]
    _, section = temporal_check(spec, monitor, parts, lines)
    assert "id_test" in section["skipped"] and "video_id" in section["skipped"]["id_test"]
    assert section["id_test"] is None and section["ood"]["video"]["n_boxes"] == 16
    with pytest.raises(DataError):
        track_detections(parts["id_test"]["dets"], still, monitor.label_to_category)
    with pytest.raises(CertoodError, match="temporal calibration"):
        temporal_check(spec, SimpleNamespace(calibration={}), parts, lines)


def test_a_set_without_boxes_gives_counts_and_reasons_not_errors(scene):
    spec, monitor, parts, lines = scene
    empty = parts["ood/video"]["dets"].select(torch.zeros(16, dtype=torch.bool))
    parts["ood/video"] = {**parts["ood/video"], "dets": empty, "values": {"s": torch.zeros(0)},
                          "flags": torch.zeros(0, dtype=torch.bool)}
    lines = [line for line in lines if '"ood/video"' not in line]
    _, section = temporal_check(spec, monitor, parts, lines)
    ood = section["ood"]["video"]
    assert ood["n_boxes"] == 0 and ood["n_unknown_objects"] == 1
    assert ood["delay"]["track"]["s"] == {"n_objects": 1, "detected_rate": 0.0, "mean": None, "median": None,
                                          "max": None}
    assert "skipped" in ood["scores"]["s"]["frame"] and "skipped" in ood["scores"]["s"]["track"]


def test_calibrate_temporal_sets_quantile_thresholds(scene):
    spec, monitor, parts, _ = scene
    part = parts["id_test"]
    values = {"s": part["values"]["s"]}
    mean_cal = calibrate_temporal(TemporalSpec(aggregate="max"), part["dets"], part["dataset"], values,
                                  monitor.label_to_category, tpr=0.5)
    # running max of 0,0,0,0,0,0,3,3,3,3: the "higher" 0.5 quantile is 0
    assert mean_cal["thresholds"] == {"s": 0.0} and mean_cal["n_tracks"] == 1
    cs = calibrate_temporal(TemporalSpec(aggregate="cusum", cusum_k=0.0, cusum_false_alarm_rate=0.35),
                            part["dets"], part["dataset"], values, monitor.label_to_category, tpr=0.95)
    v = values["s"].double()
    z = (v - v.mean()) / v.std()
    expected = torch.quantile(cusum(z, 0.0), 0.65, interpolation="higher")
    assert cs["thresholds"]["s"] == pytest.approx(float(expected)) and cs["quantile"] == pytest.approx(0.65)
    assert cs["standardize"]["s"]["mean"] == pytest.approx(0.3)
