"""The stages a batch of images goes through, shared by every way of running a monitor.

``monitor(images)`` (:mod:`certood.api`), ``certood check`` (:mod:`certood.check`) and the Ray
workers (:mod:`certood.distributed`) all call :meth:`BatchRunner.run`: the detector pass with
the monitor's tap points (:func:`certood.extract.detect_batch`), the detector-score cut, every
score and the rule (:class:`certood.monitor.Monitor`), the best-overlapping ground truth when
the images have annotations, and certificates when the spec certifies
(:class:`certood.certify.Certifier`, built once per runner).

``certood check`` runs them per *shard* (:func:`run_shard`): ``run.shard_images`` consecutive
images of a data set, decoded ahead of the detector by DataLoader workers
(:mod:`certood.data.batches`), whose per-box results go to one file on disk
(:mod:`certood.shards`); metrics are computed from the shards, so memory does not grow with
the number of images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from certood.extract import DatasetDetections, concat_detections, detect_batch


@dataclass
class BatchResult:
    """One batch through the monitor.

    ``dets``: the monitored boxes (detector score at or above the monitor's cut) with their
    features at ``keep_points``; ``all_dets`` (only when asked: ID mAP needs every detection)
    every box, without features; ``gt``: per monitored box the best-overlapping ground-truth
    label (-1: none), ``gt_match`` its gt_matched-protocol status, both None without
    annotations; ``certificates`` None when the spec does not certify."""

    dets: DatasetDetections
    values: dict[str, torch.Tensor]
    flags: torch.Tensor
    gt: torch.Tensor | None = None
    gt_match: torch.Tensor | None = None
    certificates: list | None = None
    certify_features: torch.Tensor | None = None  # [N, D] at the certify tap (monitored boxes)
    all_dets: DatasetDetections | None = None
    detector_seconds: float = 0.0  # the forward pass alone
    score_seconds: float = 0.0  # scores and rule, with the extra passes some scores take
    certify_seconds: float = 0.0
    issues: list[str] = field(default_factory=list)


class BatchRunner:
    """A calibrated monitor (:class:`certood.monitor.Monitor`) and its detector, run batch by
    batch. ``keep_points``: tap points whose features the results keep beyond what the scores
    read (``certood check --save-features``)."""

    def __init__(self, monitor, detector, keep_points: Sequence[str] = ()):
        self.monitor, self.detector = monitor, detector
        self.points = sorted(set(monitor.tap_points) | set(keep_points))
        self.keep_points = tuple(sorted(set(keep_points)))
        spec = monitor.spec
        self.certify_point = spec.taps[spec.certify.tap] if spec.certify is not None else None
        self._certifier = None
        self._certifier_dim = None

    def run(self, images: list[torch.Tensor], image_ids: Sequence[int], *, name: str = "images",
            records: Sequence | None = None, gt_matched: bool = False, keep_all: bool = False) -> BatchResult:
        """The stages on ``images`` (float CHW tensors, ids ``image_ids``). ``records`` (their
        CocoDataset records): match each box to the ground truth, and with ``gt_matched`` give
        its gt_matched status; ``keep_all``: keep every detection (for mAP)."""
        from certood.monitor import RecordSet, gt_match_dataset, match_dataset

        monitor = self.monitor
        found = detect_batch(self.detector, list(images), list(image_ids), self.points,
                             min_score=monitor.detector_threshold, name=name)
        dets = found.select(found.det_scores >= monitor.detector_threshold)
        start = time.perf_counter()
        if images:
            values = monitor.score_boxes(dets)
            flags = monitor.flag(values, dets.labels)
        else:  # every image of the batch unreadable: no feature widths to score
            values = {k: torch.zeros(0, dtype=torch.float64) for k in monitor.spec.scores}
            flags = torch.zeros(0, dtype=torch.bool)
        score_seconds = time.perf_counter() - start + found.optional_seconds
        result = BatchResult(dets, values, flags, detector_seconds=found.seconds - found.optional_seconds,
                             score_seconds=score_seconds)
        if records is not None:
            subset = RecordSet(records)
            result.gt = match_dataset(dets, subset, monitor.label_to_category, same_class=False)
            if gt_matched:
                result.gt_match = gt_match_dataset(dets, subset, monitor.label_to_category)
        if keep_all:
            result.all_dets = found.select(torch.ones(len(found), dtype=torch.bool), points=())
        if self.certify_point is not None:
            result.certificates = []
        if self.certify_point is not None and images:
            start = time.perf_counter()
            result.certify_features = dets.taps[self.certify_point].detach().flatten(1)
            result.certificates = self.certify(result.certify_features, values, flags, dets.labels)
            result.certify_seconds = time.perf_counter() - start
        # the features kept: those asked for, not every score's input
        result.dets = dets.select(torch.ones(len(dets), dtype=torch.bool), points=self.keep_points)
        return result

    def certify(self, features: torch.Tensor, values: dict[str, torch.Tensor], flags: torch.Tensor,
                labels: torch.Tensor) -> list:
        """Certificates of boxes with ``features`` at the certify tap, in chunks of
        ``CHUNK_BOXES``, with one Certifier kept for the runner's lifetime."""
        from certood.certify import CHUNK_BOXES, Certifier, certify_head

        if not len(features):
            return []
        monitor = self.monitor
        if self._certifier is None or self._certifier_dim != features.shape[1]:
            head = certify_head(self.detector, self.certify_point)
            self._certifier = Certifier(monitor.spec, monitor.scores, monitor.thresholds, head,
                                        monitor.spec.certify, features.shape[1], None, monitor.class_thresholds)
            self._certifier_dim = features.shape[1]
        out = []
        for s in range(0, len(features), CHUNK_BOXES):
            sl = slice(s, s + CHUNK_BOXES)
            out += self._certifier.certify(features[sl], {k: v[sl] for k, v in values.items()}, flags[sl],
                                           labels[sl])
        return out


def merge_results(parts: list[BatchResult], name: str) -> BatchResult:
    """The batches of one shard as one result, rows in batch order."""
    def cat(get):
        got = [get(p) for p in parts]
        return None if any(g is None for g in got) else torch.cat(got) if got else None

    features = [p.certify_features for p in parts if p.certify_features is not None]
    dets = concat_detections([p.dets for p in parts], name)
    values = {k: torch.cat([p.values[k] for p in parts]) for k in parts[0].values}
    certificates = None if parts[0].certificates is None else [c for p in parts for c in p.certificates]
    all_parts = [p.all_dets for p in parts if p.all_dets is not None]
    return BatchResult(
        dets, values, torch.cat([p.flags for p in parts]), gt=cat(lambda p: p.gt), gt_match=cat(lambda p: p.gt_match),
        certificates=certificates, certify_features=torch.cat(features) if features else None,
        all_dets=concat_detections(all_parts, name) if all_parts else None,
        detector_seconds=sum(p.detector_seconds for p in parts), score_seconds=sum(p.score_seconds for p in parts),
        certify_seconds=sum(p.certify_seconds for p in parts), issues=[m for p in parts for m in p.issues])


def shard_batches(positions: Sequence[int], batch_size: int) -> list[list[int]]:
    """``positions`` cut into detector batches of ``batch_size``."""
    return [list(positions[s:s + batch_size]) for s in range(0, len(positions), batch_size)]


def run_shard(runner: BatchRunner, dataset, positions: Sequence[int], batches, *, name: str,
              gt_matched: bool = False, keep_all: bool = False,
              tick: Callable[[int], None] | None = None) -> BatchResult:
    """One shard: the images of ``dataset.records`` at ``positions``, arriving as
    :class:`certood.data.batches.ImageBatch` from ``batches`` (an iterator already positioned
    at this shard's first batch), through the runner. ``tick(n)`` is called after each batch
    with the number of images it held (progress)."""
    parts = []
    wanted = len(positions)
    while wanted > 0:
        batch = next(batches)
        wanted -= len(batch.indices)
        part = runner.run(batch.images, [r.image_id for r in batch.records], name=name, records=batch.records,
                          gt_matched=gt_matched, keep_all=keep_all)
        part.issues = list(batch.issues)
        parts.append(part)
        if tick is not None:
            tick(len(batch.indices))
    return merge_results(parts, name)
