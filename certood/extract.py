"""Run a detector over a dataset once and keep what every score and metric needs.

Features are extracted once per dataset and shared by every score (STYLE.md). Only the
tap points the monitor reads are kept, so a 3,136-dim RoI feature is stored only when a
score or a certificate asks for it.
"""
from __future__ import annotations

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

    def select(self, keep: torch.Tensor) -> "DatasetDetections":
        return DatasetDetections(self.name, self.image_ids[keep], self.boxes[keep], self.labels[keep],
                                 self.det_scores[keep], {k: v[keep] for k, v in self.taps.items()},
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


def extract_detections(detector: Detector, dataset: CocoDataset, points: Iterable[str],
                       batch_size: int | None = None, progress: ProgressFactory | None = None,
                       min_score: float | None = None) -> DatasetDetections:
    """Detect on every readable image of ``dataset`` keeping the features at ``points``.

    ``min_score`` (the monitor's detector threshold, when known): optional tap points
    (``box_jitter.logits``, extra passes) are computed only for boxes scoring at least that;
    their rows for the others are NaN (those boxes are never monitored).

    Raises DataError, naming the data set and its annotation file, when it lists no image or
    none can be read (an empty result would carry no feature widths for the scores). Images
    read on which the detector finds nothing give rows of the right widths, zero of them."""
    import time

    points = sorted(set(points))
    issues_before = len(dataset.issues)  # the first image issue names why nothing could be read
    images: Iterable = dataset.iter_images()
    if progress is not None:
        images = progress(images, len(dataset.records), dataset.name)
    ids, boxes, labels, scores = [], [], [], []
    taps: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    read_ids: list[int] = []
    seconds = 0.0
    optional = [p for p in points if p in getattr(detector, "optional_tap_points", ())]
    optional_start = getattr(detector, "optional_seconds", 0.0)
    # images per detector call: the detector's own (spec detector.batch_size, or its default
    # from the input size and memory: certood.detectors), else 8
    batch_size = batch_size or getattr(detector, "batch_size", None) or 8
    for batch in _batches(images, batch_size):
        start = time.perf_counter()
        if optional:  # tap points the detector computes only on request
            results = detector.detect([image for _, image in batch], optional=optional, min_score=min_score)
        else:
            results = detector.detect([image for _, image in batch])
        seconds += time.perf_counter() - start
        for (record, _), det in zip(batch, results):
            read_ids.append(record.image_id)
            ids.append(torch.full((len(det),), record.image_id, dtype=torch.long))
            boxes.append(det.boxes)
            labels.append(det.labels)
            scores.append(det.scores)
            for p in points:
                taps[p].append(det.taps[p])
    optional_seconds = getattr(detector, "optional_seconds", 0.0) - optional_start
    if not read_ids:
        if not dataset.records:
            raise DataError(f"{dataset.source}: lists no usable image")
        first = f" (first: {dataset.issues[issues_before]})" if len(dataset.issues) > issues_before else ""
        raise DataError(f"{dataset.source}: none of its {len(dataset.records)} images could be read{first}")
    return DatasetDetections(dataset.name, torch.cat(ids), torch.cat(boxes), torch.cat(labels),
                             torch.cat(scores), {p: torch.cat(v) for p, v in taps.items()},
                             len(read_ids), seconds, optional_seconds, tuple(read_ids))
