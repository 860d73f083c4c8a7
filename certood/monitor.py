"""The compiled monitor: taps + fitted scores + calibrated thresholds + the rule.

``calibrate`` turns a :class:`~certood.spec.Spec` and a detector into a :class:`Monitor`:

1. the detector-score threshold is the F1-optimal cutoff on the calibration (ID) set, the
   rule of the published box-level protocol: only boxes at or above it are monitored;
2. each score is fitted on ID boxes of the ``fit`` set (default: the calibration set),
   labelled by their best-overlapping ground-truth object (IoU >= 0.5);
3. each score's threshold is its ``tpr`` quantile on the calibration ID boxes, so that a
   fraction ``tpr`` of ID boxes is below it (flag = score > threshold); or set at an OOD
   ``fpr`` on an OOD validation set, or fixed; with ``per_class``, also one per predicted
   class (:mod:`certood.thresholds`);
4. with a ``temporal`` block, the track-level thresholds are set on the calibration videos
   (:func:`certood.temporal.calibrate_temporal`).

Logit taps feed scores their foreground columns only (torchvision puts background first).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from certood.data.coco import CocoDataset
from certood.errors import CertoodError, DataError
from certood.extract import DatasetDetections, Detector, ProgressFactory, extract_detections
from certood.metrics import f1_optimal_threshold, gt_match_status, match_detections, match_to_any_class
from certood.scores import Score, build_score
from certood.spec import TAP_POINTS, Spec, class_key
from certood.spec.model import MIN_CLASS_BOXES
from certood.thresholds import compute_thresholds


@dataclass
class Monitor:
    """Fitted scores, thresholds and the rule, bound to one spec and one detector."""

    spec: Spec
    scores: dict[str, Score]
    thresholds: dict[str, float]
    detector_threshold: float
    label_to_category: list[int]  # detector label l (1-based) -> category id label_to_category[l-1]
    detector_sha256: str
    calibration: dict = field(default_factory=dict)  # box counts and dataset names, for reports
    # per predicted class thresholds (threshold.per_class): score -> table indexed by detector label
    class_thresholds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def tap_points(self) -> set[str]:
        """Tap points to extract: every score's, and the certify region's (certood.certify)."""
        points = {self.spec.taps[s.tap] for s in self.spec.scores.values()}
        if getattr(self.spec, "certify", None) is not None:
            points.add(self.spec.taps[self.spec.certify.tap])
        return points

    def score_boxes(self, dets: DatasetDetections) -> dict[str, torch.Tensor]:
        """Every score of the spec on every box of ``dets`` (higher = more OOD)."""
        return score_values(self.spec, self.scores, dets)

    def flag(self, values: dict[str, torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        """The rule's verdict per box (True = flagged as OOD); ``labels``, each box's predicted
        label, is needed by rules with per-class thresholds (``t.NAME[class]``)."""
        thresholds = {**self.thresholds, **{class_key(k): v for k, v in self.class_thresholds.items()}}
        return self.spec.rule.evaluate(values, thresholds, labels)


def is_fusion(spec: Spec, name: str) -> bool:
    """Whether score ``name`` combines other scores of the spec (kind ``fusion``)."""
    return spec.scores[name].kind == "fusion"


def score_input(spec: Spec, score_name: str, dets: DatasetDetections,
                values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The features a score reads: its tap, foreground columns only for logit taps. A fusion
    reads the ``values`` of the scores it combines, each box's size ``sqrt(width * height)``,
    then its tap's foreground logits."""
    point = spec.taps[spec.scores[score_name].tap]
    x = dets.taps[point].float()
    if TAP_POINTS[point] == "logits":
        x = x[:, 1:]
    x = x.flatten(1)
    if not is_fusion(spec, score_name):
        return x
    of = spec.scores[score_name].params["of"]
    if values is None or any(c not in values for c in of):
        raise CertoodError(f"score {score_name}: a fusion reads the values of {', '.join(of)}: compute them first")
    wh = (dets.boxes[:, 2:] - dets.boxes[:, :2]).double().clamp(min=0)
    size = (wh[:, 0] * wh[:, 1]).sqrt()
    return torch.cat([torch.stack([values[c].double() for c in of], dim=1), size[:, None], x.double()], dim=1)


def score_values(spec: Spec, scores: dict[str, Score], dets: DatasetDetections) -> dict[str, torch.Tensor]:
    """Every score of ``spec`` on the boxes of ``dets``, fusions after the scores they read;
    in the spec's order."""
    values: dict[str, torch.Tensor] = {}
    for fusions in (False, True):
        for name in spec.scores:
            if is_fusion(spec, name) == fusions:
                values[name] = scores[name].score(score_input(spec, name, dets, values))
    return {name: values[name] for name in spec.scores}


def fusion_reference(spec: Spec, name: str, fusion: Score, scores: dict[str, Score], fit: DatasetDetections,
                     fit_labels: torch.Tensor, detector) -> torch.Tensor:
    """The reference rows a fusion is fitted on: every fused score's values on the fit boxes
    **out of fold** (a fitted score is refitted on the other folds of ``fusion.fold_of``
    and scores the held-out one; a score without fitted state is evaluated as it is), then
    the fusion's own foreground logits."""
    fold = fusion.fold_of(len(fit))
    columns: dict[str, torch.Tensor] = {}
    for other in spec.scores[name].params["of"]:
        s, fitted = spec.scores[other], scores[other]
        x = score_input(spec, other, fit)
        if not fitted.needs_fit:  # nothing learnt from data (a classifier or head at most): as it is
            columns[other] = fitted.score(x)
            continue
        extras = detector_extras(fitted, detector)
        column = torch.empty(len(fit), dtype=torch.float64)
        for f in range(fusion.folds):
            held = fold == f
            part = build_score(s.kind, s.params)
            with warnings.catch_warnings():  # a class missing from a fold: the full fit warns already
                warnings.simplefilter("ignore", UserWarning)
                part.fit(x[~held], fit_labels[~held], **extras)
            column[held] = part.score(x[held]).double()
        columns[other] = column
    return score_input(spec, name, fit, columns)


def load_dataset(source, name: str) -> CocoDataset:
    """A spec data source as a dataset (DigitsDet is generated on first use)."""
    if source.digitsdet is not None and source.digitsdet.startswith("video-"):
        from certood.data.digitsdet_video import ensure_digitsdet_video, split_paths

        annotations, images = split_paths(ensure_digitsdet_video(), source.digitsdet)
    elif source.digitsdet is not None:
        from certood.data.digitsdet import ensure_digitsdet, split_paths

        annotations, images = split_paths(ensure_digitsdet(), source.digitsdet)
    else:
        annotations, images = source.annotations, source.images
    return CocoDataset.load(annotations, images, max_images=source.max_images, name=name)


CALIBRATION_SETS = ("calibration", "fit", "ood_validation/")  # the names (prefixes) calibrate reads


def spec_datasets(spec: Spec, calibration: bool = True, test: bool = False) -> dict[str, CocoDataset]:
    """Every data set a run reads, loaded and checked up front, before the detector runs, so
    that a broken annotation file of an OOD set fails the run at once and not after
    calibration (images are still read lazily). ``calibration``: the sets calibrate reads
    (``calibration``, ``fit``, the ``ood_validation/<name>`` thresholds are set on);
    ``test``: those check reads (``id_test``, ``ood/<name>``). A set listing no usable image
    raises DataError naming it and its file."""
    sources = []
    if calibration:
        sources.append(("calibration", spec.data.calibration))
        if spec.data.fit is not None:
            sources.append(("fit", spec.data.fit))
        if spec.threshold.method == "fpr":
            sources.append((f"ood_validation/{spec.threshold.on}", spec.data.ood_validation[spec.threshold.on]))
    if test:
        sources += ([("id_test", spec.data.id_test)] if spec.data.id_test else []) + \
                   [(f"ood/{name}", src) for name, src in spec.data.ood.items()]
    datasets = {}
    for name, source in sources:
        dataset = load_dataset(source, name)
        if not dataset.records:
            why = f" ({len(dataset.issues)} issue(s), first: {dataset.issues[0]})" if dataset.issues else ""
            raise DataError(f"{dataset.source}: lists no usable image{why}")
        datasets[name] = dataset
    return datasets


def id_label_map(dataset: CocoDataset, num_classes: int) -> list[int]:
    """Detector labels 1..C-1 map to the ID dataset's category ids in increasing order."""
    ids = dataset.category_ids
    if len(ids) != num_classes - 1:
        raise DataError(f"{dataset.name}: expected {num_classes - 1} categories (detector has "
                        f"{num_classes} classes incl. background), found {len(ids)}: {ids}")
    return ids


def _gt_labels(dataset: CocoDataset, label_to_category: list[int]) -> dict[int, tuple]:
    cat_to_label = {c: i + 1 for i, c in enumerate(label_to_category)}
    out = {}
    for r in dataset.records:
        labels = torch.tensor([cat_to_label.get(int(c), -1) for c in r.gt_categories], dtype=torch.long)
        out[r.image_id] = (r.gt_boxes, labels)
    return out


def match_dataset(dets: DatasetDetections, dataset: CocoDataset, label_to_category: list[int],
                  same_class: bool = True) -> torch.Tensor:
    """Per box: TP flag (``same_class``) or the best-overlapping GT label (-1 if none)."""
    gt = _gt_labels(dataset, label_to_category)
    out = torch.full((len(dets),), -1, dtype=torch.long)
    for image_id in dets.image_ids.unique().tolist():
        rows = torch.nonzero(dets.image_ids == image_id).flatten()
        gt_boxes, gt_labels = gt[image_id]
        known = gt_labels >= 0
        if same_class:
            is_tp, _ = match_detections(dets.boxes[rows], dets.det_scores[rows], dets.labels[rows],
                                        gt_boxes[known], gt_labels[known])
            out[rows] = torch.from_numpy(is_tp.astype(np.int64))
        else:
            out[rows] = torch.from_numpy(match_to_any_class(dets.boxes[rows], gt_boxes[known],
                                                            gt_labels[known]))
    return out


def gt_match_dataset(dets: DatasetDetections, dataset: CocoDataset, label_to_category: list[int],
                     iou: float = 0.5) -> torch.Tensor:
    """Per box, its status under the ground-truth-matched protocol (``metrics.GT_MATCH`` codes):
    ID when its best-overlapping object (IoU >= ``iou``) has an ID category, OOD when that
    object's category is not an ID one (e.g. DigitsDet's ``unknown``), else unmatched."""
    known_categories = set(label_to_category)
    out = torch.zeros(len(dets), dtype=torch.long)
    records = {r.image_id: r for r in dataset.records}
    for image_id in dets.image_ids.unique().tolist():
        rows = torch.nonzero(dets.image_ids == image_id).flatten()
        r = records[image_id]
        known = [int(c) in known_categories for c in r.gt_categories.tolist()]
        out[rows] = torch.from_numpy(gt_match_status(dets.boxes[rows], r.gt_boxes, known, iou))
    return out


def count_known_gt(dataset: CocoDataset, label_to_category: list[int]) -> int:
    known = set(label_to_category)
    return sum(int(c) in known for r in dataset.records for c in r.gt_categories.tolist())


def detector_threshold(spec: Spec, cal: DatasetDetections, cal_set: CocoDataset,
                       label_to_category: list[int]) -> float:
    """The spec's fixed detector-score cut, or the F1-optimal one on the calibration set."""
    if spec.threshold.detector_score != "f1":
        return float(spec.threshold.detector_score)
    n_gt = count_known_gt(cal_set, label_to_category)
    is_tp = match_dataset(cal, cal_set, label_to_category, same_class=True).bool()
    if len(cal) == 0 or not bool(is_tp.any()):
        raise DataError(f"{cal_set.source}: the detector found no true positive among {len(cal)} "
                        f"boxes on {cal.n_images} images; cannot set a detector threshold")
    return f1_optimal_threshold(cal.det_scores.numpy(), is_tp.numpy(), n_gt)


def plumbing_notes(cal: DatasetDetections, fit: DatasetDetections, det_threshold: float) -> list[str]:
    """Why a calibration measures the plumbing and not the detector (empty when it does measure
    it): no calibration box at the detector threshold, or no fit box on a ground-truth object.
    Such a run goes on when its scores and thresholds need none (an untrained or random
    detector in a pipeline test), and its summary says so."""
    notes = []
    if len(cal) == 0:
        notes.append(f"the detector found no box at detector score >= {det_threshold:g} on the "
                     f"{cal.n_images} calibration images")
    if len(fit) == 0:
        notes.append(f"no detection of the fit set ({fit.n_images} images) overlaps a ground-truth object "
                     "(no true positive): no score was fitted")
    return notes


FIT_SEED = 0  # the reservoir of data.fit.max_boxes


def fit_boxes(detector: Detector, dataset: CocoDataset, points, det_threshold: float,
              label_to_category: list[int], max_boxes: int | None = None, seed: int = FIT_SEED,
              progress: ProgressFactory | None = None) -> tuple[DatasetDetections, torch.Tensor]:
    """The boxes scores are fitted on, streamed batch by batch: every monitored box of
    ``dataset`` on a ground-truth object, with the label of that object (1-based).

    ``max_boxes``: at most that many, a reservoir sample drawn as the images stream by: each box
    gets a uniform key from a generator seeded with ``seed`` in image order and the
    ``max_boxes`` smallest keys are kept (a uniform sample without replacement, the same for the
    same data and seed), in their image order; memory holds at most ``max_boxes`` + one batch."""
    from certood.extract import _batches, concat_detections, detect_batch

    gen = torch.Generator().manual_seed(seed)
    kept: DatasetDetections | None = None
    kept_labels, kept_keys = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    images = dataset.iter_images()
    if progress is not None:
        images = progress(images, len(dataset.records), dataset.name)
    for batch in _batches(images, getattr(detector, "batch_size", None) or 8):
        found = detect_batch(detector, [im for _, im in batch], [r.image_id for r, _ in batch], points,
                             min_score=det_threshold, name=dataset.name)
        dets = found.select(found.det_scores >= det_threshold)
        labels = match_dataset(dets, RecordSet([r for r, _ in batch]), label_to_category, same_class=False)
        dets, labels = dets.select(labels >= 0), labels[labels >= 0]
        kept = dets if kept is None else concat_detections([kept, dets])
        kept_labels = torch.cat([kept_labels, labels])
        kept_keys = torch.cat([kept_keys, torch.rand(len(dets), generator=gen)])
        if max_boxes is not None and len(kept_keys) > max_boxes:
            keep = kept_keys.topk(max_boxes, largest=False).indices.sort().values  # in image order
            kept, kept_labels, kept_keys = kept.select(keep), kept_labels[keep], kept_keys[keep]
    if kept is None:
        first = f" (first: {dataset.issues[-1]})" if dataset.issues else ""
        raise DataError(f"{dataset.source}: none of its {len(dataset.records)} images could be read{first}")
    return kept, kept_labels


@dataclass(frozen=True)
class RecordSet:
    """Image records shaped like the part of a CocoDataset the ground-truth matchers read
    (:func:`match_dataset`, :func:`gt_match_dataset`): one batch's, not the whole set's."""

    records: Sequence


def detector_extras(score: Score, detector) -> dict:
    """What a score needs from the detector itself: the classifier, or the head as code."""
    extras = {}
    if score.needs_classifier:
        extras["classifier"] = detector.foreground_classifier()
    if score.needs_head:
        extras["head"] = detector.foreground_head()
    return extras


def head_if_needed(spec: Spec, detector):
    """The detector's head as code when one of ``spec``'s scores reads it (else None: detectors
    such as ONNX exports have none to give)."""
    needs = any(build_score(s.kind, s.params).needs_head for s in spec.scores.values())
    return detector.foreground_head() if needs else None


def calibrate(spec: Spec, detector: Detector, num_classes: int, progress: ProgressFactory | None = None,
              datasets: dict[str, CocoDataset] | None = None) -> tuple[Monitor, dict[str, DatasetDetections]]:
    """Fit every score and threshold of ``spec``; also returns the extracted detections.
    ``datasets``: those of :func:`spec_datasets` when already loaded (else loaded here, all
    before the first image is read). The monitor's ``calibration_issues`` are the data issues
    of every set read here, each prefixed with the set's name."""
    taps = {spec.taps[s.tap] for s in spec.scores.values()}
    datasets = datasets if datasets is not None else spec_datasets(spec)
    cal_set = datasets["calibration"]
    label_to_category = id_label_map(cal_set, num_classes)
    fixed = spec.threshold.detector_score if spec.threshold.detector_score != "f1" else None  # else: set on cal
    cal = extract_detections(detector, cal_set, taps, progress=progress,
                             min_score=None if fixed is None else float(fixed))
    det_threshold = detector_threshold(spec, cal, cal_set, label_to_category)
    cal = cal.select(cal.det_scores >= det_threshold)

    if spec.data.fit is not None:
        fit_set = datasets["fit"]
        fit, fit_labels = fit_boxes(detector, fit_set, taps, det_threshold, label_to_category,
                                    spec.data.fit.max_boxes, progress=progress)
    else:
        fit_set = cal_set
        fit_labels = match_dataset(cal, cal_set, label_to_category, same_class=False)
        fit = cal.select(fit_labels >= 0)
        fit_labels = fit_labels[fit_labels >= 0]
    fit_labels = fit_labels - 1  # contiguous 0..C-2 for class-conditional scores
    built = {name: build_score(s.kind, s.params) for name, s in spec.scores.items() if not is_fusion(spec, name)}
    fitted = [name for name, score in built.items()
              if score.needs_fit or score.needs_classifier or score.needs_head] + \
        [name for name in spec.scores if is_fusion(spec, name)]
    plumbing = plumbing_notes(cal, fit, det_threshold)
    if len(cal) == 0 and spec.threshold.method == "tpr":
        raise DataError(f"{cal_set.source}: the detector found no box at detector score >= {det_threshold:g} "
                        f"on {cal.n_images} images; thresholds at an ID TPR need calibration boxes (a plumbing "
                        "run: set threshold: {fixed: {...}})")
    if len(fit) == 0 and fitted:  # scores that need no fitting run on a detector that finds nothing yet
        raise DataError(f"{fit_set.source}: no detection overlaps a ground-truth object; cannot fit scores "
                        f"{', '.join(fitted)} (a plumbing run: fix threshold.detector_score and use scores "
                        "that need no fitting, e.g. energy, msp, max_logit)")

    scores = {}
    for name, score in built.items():  # fusions after the scores they combine
        extras = detector_extras(score, detector)
        if score.needs_fit or extras:
            score.fit(score_input(spec, name, fit), fit_labels, **extras)
        scores[name] = score
    for name, s in spec.scores.items():
        if is_fusion(spec, name):
            fusion = build_score(s.kind, s.params)
            scores[name] = fusion.fit(fusion_reference(spec, name, fusion, scores, fit, fit_labels, detector))
    scores = {name: scores[name] for name in spec.scores}
    cal_values = score_values(spec, scores, cal)
    set_on = set_thresholds(spec, detector, scores, cal, cal_values, det_threshold, taps, progress, datasets)
    thresholds = compute_thresholds(spec.threshold, set_on[0], set_on[1], len(label_to_category) + 1,
                                    MIN_CLASS_BOXES, spec.threshold.on or "calibration")
    monitor = Monitor(
        spec=spec, scores=scores, thresholds=thresholds.values, detector_threshold=float(det_threshold),
        label_to_category=label_to_category, detector_sha256=detector.weights_sha256,
        calibration={"calibration_boxes": len(cal), "calibration_images": cal.n_images,
                     "fit_boxes": len(fit), "fit_images": fit.n_images,
                     "calibration_issues": [m for name, ds in datasets.items() if name.startswith(CALIBRATION_SETS)
                                            for m in ds.named_issues()],
                     "threshold": thresholds.record, **({"plumbing": plumbing} if plumbing else {})},
        class_thresholds=thresholds.per_class)
    if spec.temporal is not None:  # track thresholds, on the calibration videos
        from certood.temporal import calibrate_temporal

        monitor.calibration["temporal"] = calibrate_temporal(
            spec.temporal, cal, cal_set, cal_values, label_to_category, spec.threshold.tpr)
    return monitor, {"calibration": cal}


def set_thresholds(spec: Spec, detector: Detector, scores: dict[str, Score], cal: DatasetDetections,
                   cal_values: dict[str, torch.Tensor], det_threshold: float, taps: set[str],
                   progress: ProgressFactory | None,
                   datasets: dict[str, CocoDataset] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The scores and predicted labels of the boxes thresholds are set on: the calibration ID
    boxes, or for ``threshold: {fpr, on}`` the monitored boxes of that OOD validation set
    (from ``datasets`` when loaded there)."""
    if spec.threshold.method != "fpr":
        return cal_values, cal.labels
    name = f"ood_validation/{spec.threshold.on}"
    dataset = datasets[name] if datasets and name in datasets else \
        load_dataset(spec.data.ood_validation[spec.threshold.on], name)
    dets = extract_detections(detector, dataset, taps, progress=progress, min_score=det_threshold)
    dets = dets.select(dets.det_scores >= det_threshold)
    return score_values(spec, scores, dets), dets.labels
