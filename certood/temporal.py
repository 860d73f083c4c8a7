"""Temporal monitoring: boxes linked into tracks across video frames, OOD confidence per track.

A per-box OOD score is noisy from frame to frame, while an unknown object stays unknown
for as long as it is in view. This module

1. links the boxes of each video into tracks (:class:`IouTracker`): the IoU of each track's
   constant-velocity prediction with the new boxes, an optimal one-to-one assignment
   (``scipy.optimize.linear_sum_assignment``), a new track for every unmatched box, and the
   end of a track after ``max_age`` consecutive frames without a box;
2. aggregates any per-box score along each track, causally (a box sees its track's past and
   present, never its future, as an online monitor would): running mean, exponential
   smoothing, running max, and one-sided CUSUM on standardised scores;
3. aggregates per-box certificates: a box is "certified OOD in k of the last n frames" when
   at least ``k`` of its track's frames in ``(frame - n, frame]`` carry ``certified_ood``;
4. sets track-level thresholds on the calibration (ID) videos and measures, beside the
   frame-level numbers, track-level AUROC / FPR95, detection delay and false alarms per
   1,000 ID frames (:func:`temporal_check`, called by ``certood check``).

Scores keep certood's convention: higher = more OOD; an aggregate is too. A box's track flag
is the spec's rule evaluated on the aggregates against the track thresholds (with ``cusum``,
numbers written in the rule compare with CUSUM statistics, not raw scores).

>>> ids = assign_tracks(torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2]),
...                     torch.tensor([[0., 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10]]))
>>> ids.tolist(), running_mean(torch.tensor([1.0, 3.0, 5.0])).tolist()
([0, 0, 0], [1.0, 2.0, 3.0])
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from certood.errors import CertoodError, DataError
from certood.metrics import box_iou, ood_metrics

AGGREGATES = ("mean", "ema", "max", "cusum")
CERTIFIED_OOD = "certified_ood"
GT_IOU = 0.5  # a box shows a ground-truth object when their IoU is at least this

PROTOCOL = (
    "temporal: boxes linked into tracks per video (IoU of constant-velocity predictions, optimal "
    "assignment); scores aggregated causally along tracks; track thresholds set on the calibration "
    "videos. A box is OOD if it overlaps (IoU >= 0.5) an object of an unknown category, ID if it "
    "overlaps a known one; a track takes the object most of its boxes overlap, and its score is the "
    "peak of its aggregate. Detection delay: frames from an unknown object's entry to its first "
    "flagged box (objects never flagged count as missed). False alarms: flagged boxes on the ID "
    "test videos per 1,000 frames.")


# =========================================================================== tracking
@dataclass
class _Track:
    id: int
    box: np.ndarray  # last matched box, xyxy
    velocity: np.ndarray  # per frame, all four coordinates
    frame: int  # frame of the last match


class IouTracker:
    """Online IoU tracker over the frames of one video.

    Each live track predicts its box at the new frame from its last box and velocity; boxes
    and predictions are paired by maximal total IoU (``linear_sum_assignment``), a pair counts
    when its IoU is at least ``iou``. Unpaired boxes start new tracks. A track missed in more
    than ``max_age`` consecutive frames ends (as in SORT); frames need not be contiguous.
    Association ignores class labels: an unknown object's label often flips.

    >>> t = IouTracker(iou=0.3, max_age=1)
    >>> t.update(0, torch.tensor([[0., 0, 10, 10]])).tolist()
    [0]
    >>> t.update(2, torch.tensor([[1., 0, 11, 10]])).tolist()  # missed 1 frame: continues
    [0]
    >>> t.update(5, torch.tensor([[1., 0, 11, 10]])).tolist()  # missed 2 frames > max_age: new track
    [1]
    """

    def __init__(self, iou: float = 0.3, max_age: int = 3) -> None:
        if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0 < iou <= 1:
            raise CertoodError(f"tracker.iou: expected a number in (0, 1], found {iou!r}")
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
            raise CertoodError(f"tracker.max_age: expected an integer >= 0, found {max_age!r}")
        self.iou, self.max_age = float(iou), max_age
        self._tracks: list[_Track] = []
        self._next_id = 0
        self._frame: int | None = None

    def update(self, frame: int, boxes: Tensor) -> Tensor:
        """Track ids (long ``[n]``) of the ``n`` xyxy ``boxes`` seen at ``frame``."""
        frame = int(frame)
        if self._frame is not None and frame <= self._frame:
            raise CertoodError(f"tracker: expected increasing frames, found {frame} after {self._frame}")
        self._frame = frame
        b = np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes, dtype=np.float64)
        b = b.reshape(-1, 4)
        self._tracks = [t for t in self._tracks if frame - t.frame - 1 <= self.max_age]
        ids = np.full(len(b), -1, dtype=np.int64)
        if self._tracks and len(b):
            pred = np.stack([t.box + t.velocity * (frame - t.frame) for t in self._tracks])
            pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2])  # a shrinking box stays a box
            iou = box_iou(pred, b)
            gain = np.where(iou >= self.iou, iou, 0.0)  # pairs below the cut gain nothing
            for r, c in zip(*_assignment(gain)):
                if iou[r, c] >= self.iou:
                    track = self._tracks[r]
                    track.velocity = (b[c] - track.box) / (frame - track.frame)
                    track.box, track.frame = b[c].copy(), frame
                    ids[c] = track.id
        for c in np.flatnonzero(ids < 0):
            self._tracks.append(_Track(self._next_id, b[c].copy(), np.zeros(4), frame))
            ids[c] = self._next_id
            self._next_id += 1
        return torch.from_numpy(ids)


def _assignment(gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(gain, maximize=True)


def track_video(frame_ids: Tensor, boxes: Tensor, iou: float = 0.3, max_age: int = 3) -> Tensor:
    """Track ids (0, 1, ...) of the boxes of one video; rows may come in any order.

    >>> track_video(torch.tensor([1, 0]), torch.tensor([[1., 0, 11, 10], [0., 0, 10, 10]])).tolist()
    [0, 0]
    """
    frames = torch.as_tensor(frame_ids).long().reshape(-1)
    boxes = torch.as_tensor(boxes).reshape(-1, 4)
    if len(frames) != len(boxes):
        raise CertoodError(f"frame_ids: expected {len(boxes)} entries (one per box), found {len(frames)}")
    tracker = IouTracker(iou, max_age)
    out = torch.full((len(frames),), -1, dtype=torch.long)
    for frame in torch.unique(frames).tolist():  # sorted
        rows = torch.nonzero(frames == frame).flatten()
        out[rows] = tracker.update(frame, boxes[rows])
    return out


def assign_tracks(video_ids: Tensor, frame_ids: Tensor, boxes: Tensor, iou: float = 0.3,
                  max_age: int = 3) -> Tensor:
    """Track ids over many videos, unique across them (videos in increasing id order)."""
    videos = torch.as_tensor(video_ids).long().reshape(-1)
    frames = torch.as_tensor(frame_ids).long().reshape(-1)
    out = torch.full((len(videos),), -1, dtype=torch.long)
    offset = 0
    for video in torch.unique(videos).tolist():
        rows = torch.nonzero(videos == video).flatten()
        ids = track_video(frames[rows], boxes[rows], iou, max_age)
        out[rows] = ids + offset
        offset += int(ids.max()) + 1
    return out


# =========================================================================== aggregation
def running_mean(x: Tensor) -> Tensor:
    """Mean of ``x[:t+1]`` at every t.

    >>> running_mean(torch.tensor([2.0, 4.0, 0.0])).tolist()
    [2.0, 3.0, 2.0]
    """
    x = x.double()
    return torch.cumsum(x, 0) / torch.arange(1, len(x) + 1, dtype=torch.float64)


def ema(x: Tensor, alpha: float) -> Tensor:
    """Exponential smoothing: ``e_0 = x_0``, ``e_t = alpha x_t + (1 - alpha) e_{t-1}``.

    >>> ema(torch.tensor([0.0, 1.0, 1.0]), alpha=0.5).tolist()
    [0.0, 0.5, 0.75]
    """
    if not 0 < alpha <= 1:
        raise CertoodError(f"alpha: expected a number in (0, 1], found {alpha!r}")
    x = x.double()
    out = torch.empty_like(x)
    for t in range(len(x)):
        out[t] = x[t] if t == 0 else alpha * x[t] + (1 - alpha) * out[t - 1]
    return out


def running_max(x: Tensor) -> Tensor:
    """Max of ``x[:t+1]`` at every t.

    >>> running_max(torch.tensor([1.0, 0.0, 2.0])).tolist()
    [1.0, 1.0, 2.0]
    """
    return torch.cummax(x.double(), 0).values if len(x) else x.double()


def cusum(z: Tensor, k: float) -> Tensor:
    """One-sided (upper) CUSUM of standardised scores: ``C_t = max(0, C_{t-1} + z_t - k)``,
    ``C_{-1} = 0``; ``k`` is the drift allowance in standard deviations.

    >>> cusum(torch.tensor([1.0, 1.0, -3.0, 2.0]), k=0.5).tolist()
    [0.5, 1.0, 0.0, 1.5]
    """
    z = z.double()
    out = torch.empty_like(z)
    c = 0.0
    for t in range(len(z)):
        c = max(0.0, c + float(z[t]) - k)
        out[t] = c
    return out


def k_of_n(flags: Tensor, frame_ids: Tensor, k: int, n: int) -> Tensor:
    """True at a box when at least ``k`` of the track's boxes in frames ``(frame - n, frame]``
    are flagged (frames without a box count as not flagged). One track, any row order.

    >>> k_of_n(torch.tensor([True, False, True, True]), torch.tensor([0, 1, 2, 5]), k=2, n=3).tolist()
    [False, False, True, False]
    """
    if not 1 <= k <= n:
        raise CertoodError(f"certified: expected 1 <= k <= n, found k={k}, n={n}")
    flags = torch.as_tensor(flags).bool().reshape(-1)
    frames = torch.as_tensor(frame_ids).long().reshape(-1)
    window = (frames[None, :] <= frames[:, None]) & (frames[None, :] > frames[:, None] - n)
    return (window & flags[None, :]).sum(1) >= k


def along_tracks(fn: Callable[[Tensor], Tensor], values: Tensor, track_ids: Tensor,
                 frame_ids: Tensor) -> Tensor:
    """Apply a sequence function to every track's values in frame order; rows stay in place.

    >>> along_tracks(running_max, torch.tensor([1., 5., 2., 0.]), torch.tensor([0, 1, 0, 0]),
    ...              torch.tensor([0, 0, 2, 1])).tolist()
    [1.0, 5.0, 2.0, 1.0]
    """
    values = torch.as_tensor(values)
    tracks = torch.as_tensor(track_ids).long().reshape(-1)
    frames = torch.as_tensor(frame_ids).long().reshape(-1)
    if not len(values) == len(tracks) == len(frames):
        raise CertoodError(f"along_tracks: expected one track id and frame per value ({len(values)}), "
                           f"found {len(tracks)} and {len(frames)}")
    out = torch.zeros(len(values), dtype=torch.float64)
    order = np.lexsort((frames.numpy(), tracks.numpy()))  # by track, then frame
    sorted_tracks = tracks.numpy()[order]
    cuts = np.flatnonzero(np.diff(sorted_tracks)) + 1
    for seg in np.split(order, cuts):
        if len(seg):
            idx = torch.from_numpy(seg)
            out[idx] = fn(values[idx]).double()
    return out


def aggregate_scores(values: Tensor, track_ids: Tensor, frame_ids: Tensor, method: str,
                     alpha: float = 0.5, k: float = 0.5, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """The track-level aggregate of a per-box score at every box (causal).

    ``cusum`` first standardises with the ID ``mean`` and ``std`` of the score.

    >>> t = torch.tensor
    >>> aggregate_scores(t([1.0, 3.0]), t([0, 0]), t([0, 1]), "mean").tolist()
    [1.0, 2.0]
    """
    if method == "mean":
        fn = running_mean
    elif method == "ema":
        fn = lambda x: ema(x, alpha)  # noqa: E731
    elif method == "max":
        fn = running_max
    elif method == "cusum":
        values = (torch.as_tensor(values).double() - mean) / (std if std > 0 else 1.0)
        fn = lambda z: cusum(z, k)  # noqa: E731
    else:
        raise CertoodError(f"aggregate: expected one of {', '.join(AGGREGATES)}, found {method!r}")
    return along_tracks(fn, values, track_ids, frame_ids)


def track_peaks(values: Tensor, track_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(track ids, the largest value of each track): a track is flagged iff its peak is.

    >>> [t.tolist() for t in track_peaks(torch.tensor([1., 4., 2.]), torch.tensor([3, 3, 7]))]
    [[3, 7], [4.0, 2.0]]
    """
    tracks = torch.as_tensor(track_ids).long()
    ids, inverse = torch.unique(tracks, return_inverse=True)
    peaks = torch.full((len(ids),), -torch.inf, dtype=torch.float64)
    peaks = peaks.scatter_reduce(0, inverse, torch.as_tensor(values).double(), reduce="amax")
    return ids, peaks


# =========================================================================== video datasets
@dataclass(frozen=True)
class TrackedBoxes:
    """The boxes of one video dataset with their tracks and ground truth (row = one box).

    ``instance_ids``: the object a box overlaps (IoU >= 0.5, best), -1 if none;
    ``box_unknown``: 1 if that object's category is unknown, 0 if known, -1 if none;
    ``track_unknown``: the same for the object most of the box's track overlaps;
    ``entries``: every unknown object -> the frame it enters (its ``ood_entry_frame``, else
    the first frame it is annotated in), and ``entry_video`` its video.
    """

    video_ids: Tensor
    frame_ids: Tensor
    track_ids: Tensor
    instance_ids: Tensor
    box_unknown: Tensor
    track_unknown: Tensor
    entries: dict[int, int]
    entry_video: dict[int, int]
    n_frames: int

    @property
    def n_tracks(self) -> int:
        return int(torch.unique(self.track_ids).numel())


def video_frames(dataset) -> dict[int, tuple[int, int]]:
    """image id -> (video id, frame id) of a COCO-video dataset; DataError if images lack them."""
    out, missing = {}, 0
    for im in dataset.coco.get("images", []):
        if "video_id" in im and "frame_id" in im:
            out[int(im["id"])] = (int(im["video_id"]), int(im["frame_id"]))
        else:
            missing += 1
    if missing:
        raise DataError(f"{dataset.name}: {missing} of {len(dataset.coco.get('images', []))} images "
                        "have no video_id/frame_id; temporal monitoring needs video frames "
                        "(COCO-video layout, e.g. digitsdet: video-test)")
    return out


def _instance_key(ann: dict) -> int:
    for key in ("instance_id", "track_id"):
        if ann.get(key) is not None:
            return int(ann[key])
    return -int(ann["id"])  # a still annotation: an object of its own


def track_detections(dets, dataset, label_to_category: list[int], iou: float = 0.3,
                     max_age: int = 3) -> TrackedBoxes:
    """Tracks and ground truth of ``dets`` (a :class:`~certood.extract.DatasetDetections`)."""
    frames_of = video_frames(dataset)
    image_ids = dets.image_ids.tolist()
    video_ids = torch.tensor([frames_of[i][0] for i in image_ids], dtype=torch.long)
    frame_ids = torch.tensor([frames_of[i][1] for i in image_ids], dtype=torch.long)
    track_ids = assign_tracks(video_ids, frame_ids, dets.boxes, iou, max_age)

    known = set(int(c) for c in label_to_category)
    by_image: dict[int, list[dict]] = {}
    category: dict[int, int] = {}
    entries: dict[int, int] = {}
    entry_video: dict[int, int] = {}
    for a in dataset.coco.get("annotations", []):
        key = _instance_key(a)
        by_image.setdefault(int(a["image_id"]), []).append(a)
        category[key] = int(a["category_id"])
        if int(a["category_id"]) in known or int(a["image_id"]) not in frames_of:
            continue
        video, frame = frames_of[int(a["image_id"])]
        entry = a.get("ood_entry_frame")
        entry = int(entry) if entry is not None else frame
        entries[key] = min(entries.get(key, entry), entry)
        entry_video[key] = video

    instance_ids = torch.full((len(dets),), -1, dtype=torch.long)
    box_unknown = torch.full((len(dets),), -1, dtype=torch.long)
    for image_id in set(image_ids):
        anns = by_image.get(image_id, [])
        if not anns:
            continue
        rows = torch.nonzero(dets.image_ids == image_id).flatten()
        gt = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
              for a in anns]
        ious = box_iou(dets.boxes[rows], gt)
        best = ious.argmax(axis=1)
        for r, j, ok in zip(rows.tolist(), best.tolist(), (ious.max(axis=1) >= GT_IOU).tolist()):
            if ok:
                key = _instance_key(anns[j])
                instance_ids[r] = key
                box_unknown[r] = int(category[key] not in known)

    track_unknown = torch.full((len(dets),), -1, dtype=torch.long)
    for track in torch.unique(track_ids).tolist():
        rows = torch.nonzero(track_ids == track).flatten()
        matched = instance_ids[rows][instance_ids[rows] != -1]
        if len(matched):
            key = int(torch.mode(matched).values)  # ties: the smallest id
            track_unknown[rows] = int(category[key] not in known)
    return TrackedBoxes(video_ids, frame_ids, track_ids, instance_ids, box_unknown, track_unknown,
                        entries, entry_video, n_frames=int(dets.n_images))


def detection_delays(flags: Tensor, tb: TrackedBoxes) -> dict[int, float]:
    """Unknown object -> frames from its entry to its first flagged box (``inf``: never).

    >>> t = torch.tensor
    >>> tb = TrackedBoxes(video_ids=t([0, 0, 0]), frame_ids=t([3, 5, 4]), track_ids=t([0, 0, 1]),
    ...                   instance_ids=t([7, 7, 8]), box_unknown=t([1, 1, 1]), track_unknown=t([1, 1, 1]),
    ...                   entries={7: 0, 8: 0, 9: 2}, entry_video={7: 0, 8: 0, 9: 0}, n_frames=6)
    >>> detection_delays(t([False, True, True]), tb)
    {7: 5.0, 8: 4.0, 9: inf}
    """
    flags = torch.as_tensor(flags).bool()
    out = {}
    for key, entry in tb.entries.items():
        hit = (tb.instance_ids == key) & flags & (tb.frame_ids >= entry)
        out[key] = float(tb.frame_ids[hit].min() - entry) if bool(hit.any()) else float("inf")
    return out


def delay_summary(delays: dict[int, float]) -> dict:
    """Counts, detected rate and mean / median / max delay (frames) of the detected objects.

    >>> delay_summary({1: 0.0, 2: 2.0, 3: float("inf")})["mean"]
    1.0
    """
    d = np.array(list(delays.values()), dtype=np.float64)
    hit = d[np.isfinite(d)]
    return {"n_objects": int(len(d)), "detected_rate": float(len(hit) / len(d)) if len(d) else None,
            "mean": float(hit.mean()) if len(hit) else None,
            "median": float(np.median(hit)) if len(hit) else None,
            "max": float(hit.max()) if len(hit) else None}


def false_alarms_per_1000(flags: Tensor, n_frames: int) -> float | None:
    """Flagged boxes per 1,000 frames (of ID video).

    >>> false_alarms_per_1000(torch.tensor([True, False, True]), 500)
    4.0
    """
    return 1000.0 * float(torch.as_tensor(flags).sum()) / n_frames if n_frames else None


# =========================================================================== calibration
def _params(temporal) -> dict:
    return {"alpha": temporal.alpha, "k": temporal.cusum_k}


def calibrate_temporal(temporal, dets, dataset, values: dict[str, Tensor], label_to_category: list[int],
                       tpr: float) -> dict:
    """Track-level thresholds on the calibration (ID) videos, JSON-ready.

    mean / ema / max: the ``tpr`` quantile of the aggregate over the calibration boxes, like
    the per-box thresholds; cusum: its ``1 - target_false_alarm_rate`` quantile, after
    standardising each score with its calibration mean and standard deviation.
    """
    tb = track_detections(dets, dataset, label_to_category, temporal.iou, temporal.max_age)
    standardize, thresholds = {}, {}
    quantile = 1.0 - temporal.cusum_false_alarm_rate if temporal.aggregate == "cusum" else tpr
    for name, v in values.items():
        v = v.double()
        mean, std = (float(v.mean()), float(v.std())) if len(v) > 1 else (0.0, 1.0)
        standardize[name] = {"mean": mean, "std": std if std > 0 else 1.0}
        agg = aggregate_scores(v, tb.track_ids, tb.frame_ids, temporal.aggregate, **_params(temporal),
                               **standardize[name])
        thresholds[name] = (float(torch.quantile(agg, quantile, interpolation="higher"))
                            if len(agg) else float("inf"))
    return {"aggregate": temporal.aggregate, "thresholds": thresholds, "standardize": standardize,
            "quantile": quantile, "n_boxes": len(dets), "n_tracks": tb.n_tracks, "n_frames": tb.n_frames}


def aggregate_all(temporal, calibration: dict, values: dict[str, Tensor],
                  tb: TrackedBoxes) -> dict[str, Tensor]:
    """Every score's track-level aggregate at every box of ``tb``."""
    return {name: aggregate_scores(v, tb.track_ids, tb.frame_ids, temporal.aggregate, **_params(temporal),
                                   **calibration["standardize"][name])
            for name, v in values.items()}


# =========================================================================== certood check
def _metrics_or_reason(id_values: Tensor, ood_values: Tensor) -> dict:
    if len(id_values) == 0 or len(ood_values) == 0:
        return {"skipped": f"{len(id_values)} ID and {len(ood_values)} OOD entries: need both"}
    return ood_metrics(id_values, ood_values)


def _verdicts(records: list[dict]) -> Tensor | None:
    """certified_ood per box from ``certificate.verdict`` (None when no box has one)."""
    verdicts = [(r.get("certificate") or {}).get("verdict") if isinstance(r.get("certificate"), dict)
                else None for r in records]
    if all(v is None for v in verdicts):
        return None
    return torch.tensor([v == CERTIFIED_OOD for v in verdicts], dtype=torch.bool)


def temporal_check(spec, monitor, per_set: dict[str, dict], lines: list[str]) -> tuple[list[str], dict]:
    """Track the boxes of every data set, add track ids and track-level scores to the box
    records (``lines``, JSON, in ``per_set`` order), and return the metrics.json section.

    ``per_set``: name -> {"dets", "values", "flags", "dataset"} as built by ``run_check``.
    """
    temporal = spec.temporal
    calibration = monitor.calibration.get("temporal")
    if not calibration:
        raise CertoodError("the monitor has no temporal calibration; recalibrate with the temporal block set")
    t_track = calibration["thresholds"]
    records = [json.loads(line) for line in lines]
    section: dict = {
        "protocol": PROTOCOL,
        "tracker": {"iou": temporal.iou, "max_age": temporal.max_age},
        "aggregate": temporal.aggregate, "params": _params(temporal),
        "thresholds": t_track,
        "calibration": {k: calibration[k] for k in ("n_boxes", "n_tracks", "n_frames", "quantile")},
        "id_test": None, "ood": {}, "skipped": {},
    }
    parts = {}
    for name, part in per_set.items():
        rows = [i for i, r in enumerate(records) if r.get("dataset") == name]
        try:
            tb = track_detections(part["dets"], part["dataset"], monitor.label_to_category,
                                  temporal.iou, temporal.max_age)
        except DataError as e:
            section["skipped"][name] = str(e)
            continue
        agg = aggregate_all(temporal, calibration, part["values"], tb)
        flags = spec.rule.evaluate(agg, t_track)
        verdicts = _verdicts([records[i] for i in rows])
        certified = None
        if verdicts is not None and temporal.certified_k is not None:
            certified = _k_of_n_tracks(verdicts, tb, temporal.certified_k, temporal.certified_n)
        for j, i in enumerate(rows):
            rec = records[i]
            rec.update(video_id=int(tb.video_ids[j]), frame_id=int(tb.frame_ids[j]),
                       track_id=int(tb.track_ids[j]),
                       track_scores={k: float(v[j]) for k, v in agg.items()}, track_flag=bool(flags[j]))
            if certified is not None:
                rec["track_certified_ood"] = bool(certified[j])
        parts[name] = {**part, "tb": tb, "agg": agg, "track_flags": flags, "certified": certified}

    def frame_flags(part) -> dict[str, Tensor]:
        return {**{s: part["values"][s] > monitor.thresholds[s] for s in spec.scores}, "rule": part["flags"]}

    def track_flags(part) -> dict[str, Tensor]:
        return {**{s: part["agg"][s] > t_track[s] for s in spec.scores}, "rule": part["track_flags"]}

    id_part = parts.get("id_test")
    if id_part is not None:
        section["id_test"] = {
            "n_frames": id_part["tb"].n_frames, "n_boxes": len(id_part["dets"]),
            "n_tracks": id_part["tb"].n_tracks,
            "false_alarms_per_1000_frames": {
                level: {k: false_alarms_per_1000(f, id_part["tb"].n_frames) for k, f in fl(id_part).items()}
                for level, fl in (("frame", frame_flags), ("track", track_flags))},
        }
    for name, part in parts.items():
        if not name.startswith("ood/"):
            continue
        tb = part["tb"]
        entry: dict = {"n_frames": tb.n_frames, "n_boxes": len(part["dets"]),
                       "n_tracks": {"id": _count_tracks(tb, 0), "ood": _count_tracks(tb, 1),
                                    "unmatched": _count_tracks(tb, -1)},
                       "n_unknown_objects": len(tb.entries), "scores": {}}
        pools = [p for p in (id_part, part) if p is not None]
        for s in spec.scores:
            raw_id = torch.cat([p["values"][s][p["tb"].box_unknown == 0].double() for p in pools])
            agg_id = torch.cat([p["agg"][s][p["tb"].box_unknown == 0] for p in pools])
            ood_box = tb.box_unknown == 1
            peaks_id = torch.cat([_peaks(p["agg"][s], p["tb"], 0) for p in pools])
            entry["scores"][s] = {
                "frame": _metrics_or_reason(raw_id, part["values"][s][ood_box].double()),
                "track_box": _metrics_or_reason(agg_id, part["agg"][s][ood_box]),
                "track": _metrics_or_reason(peaks_id, _peaks(part["agg"][s], tb, 1)),
            }
        entry["delay"] = {level: {k: delay_summary(detection_delays(f, tb)) for k, f in fl(part).items()}
                          for level, fl in (("frame", frame_flags), ("track", track_flags))}
        if part["certified"] is not None:
            entry["certified"] = {"k": temporal.certified_k, "n": temporal.certified_n,
                                  "delay": delay_summary(detection_delays(part["certified"], tb))}
        section["ood"][name.split("/", 1)[1]] = entry
    if id_part is not None and id_part["certified"] is not None:
        section["id_test"]["false_alarms_per_1000_frames"]["certified"] = false_alarms_per_1000(
            id_part["certified"], id_part["tb"].n_frames)
    return [json.dumps(r) for r in records], section


def _k_of_n_tracks(verdicts: Tensor, tb: TrackedBoxes, k: int, n: int) -> Tensor:
    out = torch.zeros(len(verdicts), dtype=torch.bool)
    for track in torch.unique(tb.track_ids).tolist():
        rows = torch.nonzero(tb.track_ids == track).flatten()
        out[rows] = k_of_n(verdicts[rows], tb.frame_ids[rows], k, n)
    return out


def _count_tracks(tb: TrackedBoxes, label: int) -> int:
    return int(torch.unique(tb.track_ids[tb.track_unknown == label]).numel())


def _peaks(agg: Tensor, tb: TrackedBoxes, label: int) -> Tensor:
    keep = tb.track_unknown == label
    if not bool(keep.any()):
        return torch.zeros(0, dtype=torch.float64)
    return track_peaks(agg[keep], tb.track_ids[keep])[1]


def temporal_report_lines(section: dict) -> list[str]:
    """Markdown lines of the ``temporal`` section of metrics.json (for report.md)."""
    def f(x, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    lines = ["## Temporal (track level)", "",
             f"Tracker IoU {section['tracker']['iou']}, max_age {section['tracker']['max_age']}; "
             f"aggregate `{section['aggregate']}`; track thresholds: "
             + ", ".join(f"`{k}` {v:.4f}" for k, v in section["thresholds"].items()), ""]
    id_test = section.get("id_test")
    if id_test:
        fa = id_test["false_alarms_per_1000_frames"]
        lines += [f"False alarms per 1,000 ID frames ({id_test['n_frames']} frames, "
                  f"{id_test['n_tracks']} tracks): "
                  + ", ".join(f"{k} {f(fa['frame'].get(k), 1)} per frame -> "
                              f"{f(fa['track'].get(k), 1)} per track" for k in fa["frame"]), ""]
    if section["ood"]:
        lines += ["| OOD set | score | box AUROC frame | box AUROC track | track AUROC | box FPR95 frame | "
                  "box FPR95 track | track FPR95 | caught frame / track | mean delay frame / track |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in section["ood"].items():
        for score, m in entry["scores"].items():
            fr, tb, tr = m["frame"], m["track_box"], m["track"]
            df, dt = entry["delay"]["frame"][score], entry["delay"]["track"][score]
            lines.append(f"| {name} | {score} | {f(fr.get('auroc'))} | {f(tb.get('auroc'))} | "
                         f"{f(tr.get('auroc'))} | "
                         f"{f(fr.get('fpr95'))} | {f(tb.get('fpr95'))} | {f(tr.get('fpr95'))} | "
                         f"{f(df['detected_rate'], 2)} / {f(dt['detected_rate'], 2)} | "
                         f"{f(df['mean'], 2)} / {f(dt['mean'], 2)} |")
    for name, reason in section.get("skipped", {}).items():
        lines.append(f"- {name}: skipped ({reason})")
    return lines + [""]
