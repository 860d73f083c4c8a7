"""Run a detector over a dataset once and keep what every score and metric needs.

Features are extracted once per dataset and shared by every score (STYLE.md). Only the
tap points the monitor reads are kept, so a 3,136-dim RoI feature is stored only when a
score or a certificate asks for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch

from certood.data.coco import CocoDataset
from certood.detectors.base import Detections
from certood.errors import DataError

ProgressFactory = Callable[[Iterable, int, str], Iterable]


class Detector(Protocol):
    tap_points: tuple[str, ...]
    weights_sha256: str

    def detect(self, images: list[torch.Tensor]) -> list[Detections]: ...


@dataclass(frozen=True)
class DatasetDetections:
    """All detections of one dataset, flattened over images (row = one box)."""

    name: str
    image_ids: torch.Tensor  # long [N]
    boxes: torch.Tensor  # float [N, 4] xyxy
    labels: torch.Tensor  # long [N]
    det_scores: torch.Tensor  # float [N]
    taps: dict[str, torch.Tensor]  # tap point -> [N, ...]
    n_images: int  # images actually processed (unreadable ones are skipped)
    seconds: float  # detector wall time, for cost ratios
    optional_seconds: float = 0.0  # of which on optional tap points (box_jitter.logits): not the forward pass
    read_image_ids: tuple[int, ...] = ()  # the images read, in order: what mAP is computed over

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, keep: torch.Tensor, points: Iterable[str] | None = None) -> "DatasetDetections":
        """The rows ``keep`` selects; ``points``: only these taps' features (default: all)."""
        taps = self.taps if points is None else {k: self.taps[k] for k in points if k in self.taps}
        return DatasetDetections(self.name, self.image_ids[keep], self.boxes[keep], self.labels[keep],
                                 self.det_scores[keep], {k: v[keep] for k, v in taps.items()},
                                 self.n_images, self.seconds, self.optional_seconds, self.read_image_ids)

    def coco_results(self, label_to_category: list[int]) -> list[dict]:
        """Detections in the COCO results format (for pycocotools)."""
        out = []
        for image_id, box, label, score in zip(self.image_ids.tolist(), self.boxes.tolist(),
                                               self.labels.tolist(), self.det_scores.tolist()):
            out.append({"image_id": image_id, "category_id": label_to_category[label - 1],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
        return out


def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def detect_batch(detector: Detector, images: list[torch.Tensor], image_ids: list[int], points: list[str],
                 min_score: float | None = None, name: str = "images") -> DatasetDetections:
    """One detector call on ``images`` (ids ``image_ids``), flattened to one row per box with
    the features at ``points``: the unit every way of running a monitor shares (certood.stages).

    ``min_score``: optional tap points (``box_jitter.logits``, extra passes) are computed only
    for boxes scoring at least that; their rows for the others are NaN."""
    points = sorted(set(points))
    optional = [p for p in points if p in getattr(detector, "optional_tap_points", ())]
    optional_start = getattr(detector, "optional_seconds", 0.0)
    start = time.perf_counter()
    if not images:
        results = []
    elif optional:  # tap points the detector computes only on request
        results = detector.detect(list(images), optional=optional, min_score=min_score)
    else:
        results = detector.detect(list(images))
    seconds = time.perf_counter() - start
    optional_seconds = getattr(detector, "optional_seconds", 0.0) - optional_start
    return _flatten(name, list(zip(image_ids, results)), points, seconds, optional_seconds)


def _flatten(name: str, per_image: list[tuple[int, Detections]], points: list[str], seconds: float,
             optional_seconds: float) -> DatasetDetections:
    ids = [torch.full((len(det),), image_id, dtype=torch.long) for image_id, det in per_image]
    if not per_image:  # no image: zero rows (of unknown widths: no feature columns)
        empty = torch.zeros(0)
        return DatasetDetections(name, empty.long(), torch.zeros(0, 4), empty.long(), empty,
                                 {p: torch.zeros(0, 0) for p in points}, 0, seconds,
                                 optional_seconds, ())
    return DatasetDetections(name, torch.cat(ids), torch.cat([d.boxes for _, d in per_image]),
                             torch.cat([d.labels for _, d in per_image]), torch.cat([d.scores for _, d in per_image]),
                             {p: torch.cat([d.taps[p] for _, d in per_image]) for p in points},
                             len(per_image), seconds, optional_seconds, tuple(i for i, _ in per_image))


def concat_detections(parts: list[DatasetDetections], name: str | None = None) -> DatasetDetections:
    """Rows of ``parts`` one after another (taps: the points all parts carry)."""
    if not parts:
        raise ValueError("concat_detections: no parts")
    points = set(parts[0].taps).intersection(*(p.taps for p in parts[1:]))
    with_rows = [p for p in parts if len(p)] or parts[:1]
    return DatasetDetections(
        name or parts[0].name, torch.cat([p.image_ids for p in parts]), torch.cat([p.boxes for p in parts]),
        torch.cat([p.labels for p in parts]), torch.cat([p.det_scores for p in parts]),
        {k: torch.cat([p.taps[k] for p in with_rows]) for k in sorted(points)},
        sum(p.n_images for p in parts), sum(p.seconds for p in parts), sum(p.optional_seconds for p in parts),
        tuple(i for p in parts for i in p.read_image_ids))


def extract_detections(detector: Detector, dataset: CocoDataset, points: Iterable[str],
                       batch_size: int | None = None, progress: ProgressFactory | None = None,
                       min_score: float | None = None) -> DatasetDetections:
    """Detect on every readable image of ``dataset`` keeping the features at ``points``, in
    memory (calibration reads its sets this way; ``certood check`` streams: certood.stages).

    ``min_score`` (the monitor's detector threshold, when known): optional tap points
    (``box_jitter.logits``, extra passes) are computed only for boxes scoring at least that;
    their rows for the others are NaN (those boxes are never monitored).

    Raises DataError, naming the data set and its annotation file, when it lists no image or
    none can be read (an empty result would carry no feature widths for the scores). Images
    read on which the detector finds nothing give rows of the right widths, zero of them."""
    points = sorted(set(points))
    issues_before = len(dataset.issues)  # the first image issue names why nothing could be read
    images: Iterable = dataset.iter_images()
    if progress is not None:
        images = progress(images, len(dataset.records), dataset.name)
    # images per detector call: the detector's own (spec detector.batch_size, or its default
    # from the input size and memory: certood.detectors), else 8
    batch_size = batch_size or getattr(detector, "batch_size", None) or 8
    parts = [detect_batch(detector, [image for _, image in batch], [record.image_id for record, _ in batch],
                          points, min_score, dataset.name)
             for batch in _batches(images, batch_size)]
    if not parts:
        if not dataset.records:
            raise DataError(f"{dataset.source}: lists no usable image")
        first = f" (first: {dataset.issues[issues_before]})" if len(dataset.issues) > issues_before else ""
        raise DataError(f"{dataset.source}: none of its {len(dataset.records)} images could be read{first}")
    return concat_detections(parts, dataset.name)
