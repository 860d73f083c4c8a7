"""``certood check``: run a monitor over ID and OOD datasets, write per-box results and metrics.

Outputs in ``out_dir`` (each written atomically):

- ``boxes.jsonl``   one line per monitored box: dataset, image, box, label, detector score,
  every score, the rule's flag, and the best-overlapping ground-truth category;
- ``metrics.json``  ID mAP / mAP50 (pycocotools) and, per OOD set and score, AUROC, AUPR and
  FPR95 under the published box-level protocol;
- ``summary.txt``, ``report.md`` human-readable renderings of the same numbers;
- ``report.html``, ``plots/`` ROC curves, score histograms, examples (``certood.plots``);
- ``monitor/``      the calibrated monitor, when none was given;
- with a ``certify`` block: a ``certificate`` per box in boxes.jsonl, ``certificates`` (rates
  per data set) and ``certify`` (options, cost) in metrics.json, and
  ``certify_features.safetensors`` for ``certood recheck`` (certood.certify, certood.recheck).

Box-level protocol (VOS): a box is monitored when its detector score is at or above the
threshold set on calibration data (F1-optimal by default); monitored boxes on ID test images
are ID, those on OOD images are OOD.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from certood import plots, report
from certood.artifacts import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, load_monitor, read_manifest, save_monitor, versions,
)
from certood.certify import certify_detections, certify_head, certify_metrics
from certood.recheck import FEATURES_FILE, certify_features_blob
from certood.errors import CertoodError
from certood.extract import DatasetDetections, ProgressFactory, extract_detections
from certood.metrics import coco_map, ood_metrics
from certood.monitor import Monitor, calibrate, load_dataset, match_dataset
from certood.spec import Spec

PROTOCOL = ("box-level (VOS): boxes with detector score >= the calibrated detector threshold; "
            "boxes on ID test images are ID, boxes on OOD images are OOD; ID is the positive "
            "class for AUPR-In and FPR95; scores are higher = more OOD")


@dataclass(frozen=True)
class CheckResult:
    out_dir: Path
    metrics: dict
    n_boxes: int

    @property
    def issues(self) -> list[str]:
        return self.metrics["issues"]


def load_spec_detector(spec: Spec):
    """The spec's detector, built and loaded (weights hashed for the artifact checks)."""
    from certood.detectors.torchvision_frcnn import load_detector

    d = spec.detector
    options = {k: v for k, v in (("min_size", d.min_size), ("max_size", d.max_size)) if v is not None}
    options["box_score_thresh"] = d.score_thresh
    return load_detector(d.arch, d.weights, d.num_classes, device=d.device, **options)


def _box_records(dataset_name: str, dets: DatasetDetections, values: dict[str, torch.Tensor],
                 flags: torch.Tensor, gt_labels: torch.Tensor, monitor: Monitor,
                 certified=None) -> list[str]:
    lines = []
    cats = monitor.label_to_category
    for i in range(len(dets)):
        label = int(dets.labels[i])
        gt = int(gt_labels[i])
        extra = {"certificate": certified.certificates[i].to_json()} if certified is not None else {}
        lines.append(json.dumps({
            "dataset": dataset_name, "image_id": int(dets.image_ids[i]),
            "box": [round(float(v), 2) for v in dets.boxes[i]], "box_format": "xyxy",
            "label": label, "category_id": cats[label - 1], "det_score": round(float(dets.det_scores[i]), 5),
            "scores": {k: float(v[i]) for k, v in values.items()}, "flag": bool(flags[i]),
            "gt_category_id": cats[gt - 1] if gt > 0 else None, **extra,
        }))
    return lines


def _rule_rates(flags_id: torch.Tensor, flags_ood: torch.Tensor) -> dict:
    return {"id_tpr": float((~flags_id).float().mean()) if len(flags_id) else None,
            "ood_flag_rate": float(flags_ood.float().mean()) if len(flags_ood) else None}


def run_check(spec: Spec, out_dir: Path, monitor_dir: Path | None = None,
              progress: ProgressFactory | None = None) -> CheckResult:
    """Calibrate (or load) the monitor, score every dataset of the spec, write the outputs."""
    out_dir = Path(out_dir)
    if monitor_dir is not None:
        read_manifest(monitor_dir)  # fail fast, before the detector loads
    detector = load_spec_detector(spec)
    if monitor_dir is not None:
        monitor = load_monitor(monitor_dir, spec, detector.weights_sha256, detector.foreground_head())
    else:
        monitor, _ = calibrate(spec, detector, detector.num_classes, progress=progress)
        save_monitor(monitor, out_dir / "monitor")

    sources = ([("id_test", spec.data.id_test)] if spec.data.id_test else []) + \
              [(f"ood/{name}", src) for name, src in spec.data.ood.items()]
    issues = [f"calibration: {m}" for m in monitor.calibration.get("calibration_issues", [])]
    lines: list[str] = []
    per_set: dict[str, dict] = {}
    detector_seconds, images_seen = 0.0, 0
    score_seconds, boxes_scored = 0.0, 0
    certify_parts: dict = {}  # data set -> CertifyResult
    certify_features: dict = {}  # box index in boxes.jsonl -> feature at the certify tap
    id_map = None
    for name, source in sources:
        dataset = load_dataset(source, name)
        dets_all = extract_detections(detector, dataset, monitor.tap_points, progress=progress)
        detector_seconds += dets_all.seconds
        images_seen += dets_all.n_images
        if name == "id_test":
            id_map = coco_map(dataset.coco, dets_all.coco_results(monitor.label_to_category))
        dets = dets_all.select(dets_all.det_scores >= monitor.detector_threshold)
        start = time.perf_counter()
        values = monitor.score_boxes(dets)
        flags = monitor.flag(values)
        score_seconds += time.perf_counter() - start
        boxes_scored += len(dets)
        gt = match_dataset(dets, dataset, monitor.label_to_category, same_class=False)
        certified = None
        if spec.certify is not None:  # certificates per box (certood.certify)
            certified = certify_detections(monitor, detector, dets, values, flags, progress)
            certify_parts[name] = certified
            certify_features.update({len(lines) + i: certified.features[i]
                                     for i, c in enumerate(certified.certificates) if c.verdict != "undecided"})
        lines += _box_records(name, dets, values, flags, gt, monitor, certified)
        per_set[name] = {"dets": dets, "values": values, "flags": flags, "dataset": dataset}
        issues += [f"{name}: {m}" for m in dataset.issues]

    metrics = {
        "spec": str(spec.path) if spec.path else None,
        "spec_fingerprint": spec.fingerprint(),
        "detector_sha256": detector.weights_sha256,
        "protocol": PROTOCOL,
        "monitor": {"detector_threshold": monitor.detector_threshold, "thresholds": monitor.thresholds,
                    "tpr": spec.threshold.tpr, "rule": spec.rule.source, **monitor.calibration},
        "id_test": None,
        "ood": {},
        "cost": {"detector_seconds_per_image": detector_seconds / max(1, images_seen),
                 "score_seconds_per_box": score_seconds / max(1, boxes_scored),
                 "score_to_detector_ratio": (score_seconds / max(1, boxes_scored))
                 / max(1e-12, detector_seconds / max(1, images_seen))},
        "issues": issues,
        "versions": versions(),
    }
    id_part = per_set.get("id_test")
    if id_part is not None:
        metrics["id_test"] = {**{k: id_map[k] for k in ("map", "map50", "map75")},
                              "n_images": id_part["dets"].n_images, "n_boxes": len(id_part["dets"])}
    for name, part in per_set.items():
        if not name.startswith("ood/"):
            continue
        entry = {"n_images": part["dets"].n_images, "n_boxes": len(part["dets"]),
                 "boxes_per_image": len(part["dets"]) / max(1, part["dets"].n_images), "scores": {}}
        if id_part is None or len(id_part["dets"]) == 0 or len(part["dets"]) == 0:
            entry["skipped"] = "no ID test boxes" if id_part is None or not len(id_part["dets"]) \
                else "the detector fired on no box of this set at the detector threshold"
        else:
            for score_name in spec.scores:
                entry["scores"][score_name] = ood_metrics(id_part["values"][score_name],
                                                          part["values"][score_name])
            entry["rule"] = _rule_rates(id_part["flags"], part["flags"])
        metrics["ood"][name.split("/", 1)[1]] = entry
    if spec.certify is not None:
        metrics["certificates"], metrics["certify"] = certify_metrics(
            spec.certify, certify_parts, detector_seconds / max(1, images_seen))
    if spec.temporal is not None:  # track ids on the box records, track-level metrics
        from certood.temporal import temporal_check

        lines, metrics["temporal"] = temporal_check(spec, monitor, per_set, lines)

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "boxes.jsonl", "".join(line + "\n" for line in lines))
    if spec.certify is not None:  # what `certood recheck` re-verifies certificates from
        atomic_write_bytes(out_dir / FEATURES_FILE, certify_features_blob(
            monitor, certify_head(detector, spec.taps[spec.certify.tap]), spec.certify, certify_features,
            detector.weights_sha256))
    plots.write_visual_report(out_dir, metrics, per_set, spec)  # plots/*.png, report.html; never raises
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "summary.txt", report.summary_text(metrics))
    atomic_write_text(out_dir / "report.md", report.report_markdown(metrics))
    if not lines and not per_set:
        raise CertoodError("the spec names no id_test or ood data set: nothing to check")
    return CheckResult(out_dir, metrics, len(lines))
