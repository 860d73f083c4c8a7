"""``certood check``: run a monitor over ID and OOD datasets, write per-box results and metrics.

Outputs in ``out_dir`` (each written atomically):

- ``boxes.jsonl``   one line per monitored box: dataset, image, box, label, detector score,
  every score, the rule's flag, and the best-overlapping ground-truth category;
- ``metrics.json``  ID mAP / mAP50 (pycocotools) and, per OOD set and score, AUROC, AUPR and
  FPR95 under the published box-level protocol;
- with a ``temporal`` block: track ids and track-level scores on each box record, and a
  ``temporal`` section in metrics.json (:func:`certood.temporal.temporal_check`);
- ``summary.txt``, ``report.md`` human-readable renderings of the same numbers;
- ``report.html``, ``plots/`` ROC curves, score histograms, examples (``certood.plots``);
- ``monitor/``      the calibrated monitor, when none was given;
- with a ``certify`` block: a ``certificate`` per box in boxes.jsonl, ``certificates`` (rates
  per data set) and ``certify`` (options, cost) in metrics.json, and
  ``certify_features.safetensors`` for ``certood recheck`` (certood.certify, certood.recheck).

Box-level protocol (VOS): a box is monitored when its detector score is at or above the
threshold set on calibration data (F1-optimal by default); monitored boxes on ID test images
are ID, those on OOD images are OOD.

Ground-truth-matched protocol (``data.ood.<name>.protocol: gt_matched``, for sets whose images
hold ID and unknown objects, e.g. DigitsDet ``mixed``): among that set's monitored boxes, one
is OOD only if it overlaps (IoU >= 0.5) an object whose category is not an ID category, ID if
it overlaps an ID object, and otherwise unmatched (background or poorly localised: counted,
left out of the metrics). The metrics compare the set's ID-matched with its OOD-matched boxes;
boxes.jsonl gives each box's ``gt_match`` there. Thresholds come from calibration data only.

``save_features`` (``certood check --save-features``) also writes ``features.safetensors``:
for every data set, each monitored box's tapped features and class logits under
``<dataset>/<tap point>`` (``cls_logits`` background column first, as the detector gives it)
and ``<dataset>/box_index``, the box's line number (0-based) in boxes.jsonl, so that any score
can be recomputed outside certood.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from certood import plots, report
from certood.artifacts import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, check_manifest_fits, die_here_for_tests, load_monitor,
    read_manifest, save_monitor, stage_results, versions, write_results_marker,
)
from certood.certify import certify_detections, certify_head, certify_metrics
from certood.recheck import FEATURES_FILE, certify_features_blob
from certood.errors import CertoodError, UsageError
from certood.extract import DatasetDetections, ProgressFactory, extract_detections
from certood.metrics import GT_MATCH, coco_map, gt_matched_metrics, ood_metrics
from certood.monitor import CALIBRATION_SETS, Monitor, calibrate, gt_match_dataset, match_dataset, spec_datasets
from certood.spec import Spec

PROTOCOL = ("box-level (VOS): boxes with detector score >= the calibrated detector threshold; "
            "boxes on ID test images are ID, boxes on OOD images are OOD; ID is the positive "
            "class for AUPR-In and FPR95; scores are higher = more OOD")
GT_MATCHED_PROTOCOL = ("ground-truth matched: among one set's boxes with detector score >= the calibrated "
                       "detector threshold, a box is OOD if its best-overlapping object (IoU >= 0.5) has a "
                       "category outside the ID ones, ID if that object is an ID one, else unmatched "
                       "(counted, not scored); ID is the positive class for AUPR-In and FPR95")
FEATURES_EXPORT_FILE = "features.safetensors"


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
    from certood.detectors import detector_from_spec

    return detector_from_spec(spec.detector, spec.taps)


def _box_records(dataset_name: str, dets: DatasetDetections, values: dict[str, torch.Tensor],
                 flags: torch.Tensor, gt_labels: torch.Tensor, monitor: Monitor,
                 certified=None, gt_match: torch.Tensor | None = None) -> list[str]:
    lines = []
    cats = monitor.label_to_category
    for i in range(len(dets)):
        label = int(dets.labels[i])
        gt = int(gt_labels[i])
        extra = {"certificate": certified.certificates[i].to_json()} if certified is not None else {}
        if gt_match is not None:  # protocol gt_matched: "id", "ood" or "unmatched"
            extra["gt_match"] = _GT_MATCH_NAMES[int(gt_match[i])]
        lines.append(json.dumps({
            "dataset": dataset_name, "image_id": int(dets.image_ids[i]),
            "box": [round(float(v), 2) for v in dets.boxes[i]], "box_format": "xyxy",
            "label": label, "category_id": cats[label - 1], "det_score": round(float(dets.det_scores[i]), 5),
            "scores": {k: float(v[i]) for k, v in values.items()}, "flag": bool(flags[i]),
            "gt_category_id": cats[gt - 1] if gt > 0 else None, **extra,
        }))
    return lines


_GT_MATCH_NAMES = {code: name for name, code in GT_MATCH.items()}


def _gt_matched_entry(part: dict, score_names, base: dict) -> dict:
    """metrics.json entry of a gt_matched OOD set: counts, then per-score metrics on its
    ID-matched vs OOD-matched boxes (skipped, saying why, when either side is empty)."""
    status = part["gt_match"]
    entry = {**base, "protocol": "gt_matched", "scores": {}}
    for score_name in score_names:
        m = gt_matched_metrics(part["values"][score_name], status)
        entry["counts"] = m["counts"]
        if m["metrics"] is not None:
            entry["scores"][score_name] = m["metrics"]
    if "counts" not in entry:
        entry["counts"] = gt_matched_metrics([], [])["counts"]
    c = entry["counts"]
    if not (c["id_matched"] and c["ood_matched"]):
        entry["skipped"] = (f"protocol gt_matched needs boxes matched to ID and to unknown objects, found "
                            f"{c['id_matched']} ID-matched and {c['ood_matched']} OOD-matched")
    else:
        is_id, is_ood = status == GT_MATCH["id"], status == GT_MATCH["ood"]
        entry["rule"] = _rule_rates(part["flags"][is_id], part["flags"][is_ood])
    return entry


def _features_blob(parts: dict, spec: Spec, detector_sha256: str) -> bytes:
    """features.safetensors: per data set, every monitored box's tapped features (and logits)
    keyed ``<dataset>/<tap point>``, and ``<dataset>/box_index`` (lines of boxes.jsonl)."""
    from safetensors.torch import save

    tensors = {}
    for name, (dets, first_line) in parts.items():
        for point, values in dets.taps.items():
            tensors[f"{name}/{point}"] = values.detach().float().contiguous()
        tensors[f"{name}/box_index"] = torch.arange(first_line, first_line + len(dets), dtype=torch.long)
    meta = {"format": "certood features v1", "spec_fingerprint": spec.fingerprint(),
            "detector_sha256": detector_sha256, "taps": json.dumps(spec.taps, sort_keys=True),
            "layout": "<dataset>/<tap point>: [N, ...] float32 rows aligned with <dataset>/box_index "
                      "(0-based line numbers of boxes.jsonl); cls_logits keeps the background column "
                      "first; scores read foreground columns only"}
    return save(tensors, metadata=meta)


def _ood_matched_only(part: dict) -> dict:
    """A gt_matched set's OOD-matched boxes, for the figures, with its ID-matched boxes'
    values as ``id_values`` (its ROC is drawn within the set, as its metrics are computed)."""
    keep = part["gt_match"] == GT_MATCH["ood"]
    same_set_id = part["gt_match"] == GT_MATCH["id"]
    return {**part, "dets": part["dets"].select(keep), "values": {k: v[keep] for k, v in part["values"].items()},
            "flags": part["flags"][keep], "id_values": {k: v[same_set_id] for k, v in part["values"].items()}}


def _rule_rates(flags_id: torch.Tensor, flags_ood: torch.Tensor) -> dict:
    return {"id_tpr": float((~flags_id).float().mean()) if len(flags_id) else None,
            "ood_flag_rate": float(flags_ood.float().mean()) if len(flags_ood) else None}


def run_check(spec: Spec, out_dir: Path, monitor_dir: Path | None = None,
              progress: ProgressFactory | None = None, save_features: bool = False) -> CheckResult:
    """Calibrate (or load) the monitor, score every dataset of the spec, write the outputs
    (with ``save_features``, also features.safetensors: see the module docstring).

    The outputs replace ``out_dir`` whole: built in a staging directory beside it, closed by
    certood-results.json, swapped in at the end (certood.artifacts), so a failed or killed run
    leaves the previous complete results. An ``out_dir`` that is not empty and holds files
    certood did not write is refused (UsageError) before any work; a monitor given from
    ``out_dir/monitor`` is carried into the new results.
    """
    out_dir = Path(out_dir)
    if not spec.data.id_test and not spec.data.ood:
        raise UsageError(f"{spec.path or 'the spec'}: names no data.id_test or data.ood set: nothing to check")
    if monitor_dir is not None:  # fail fast, before the output is touched and the detector loads
        check_manifest_fits(monitor_dir, read_manifest(monitor_dir), spec)
    with stage_results(out_dir) as staged:
        die_here_for_tests("staged")
        try:
            result = _check_into(spec, staged.path, monitor_dir, progress, save_features)
            _carry_monitor(monitor_dir, out_dir, staged.path)
            write_results_marker(staged.path, spec_fingerprint=spec.fingerprint(),
                                 detector_sha256=result.metrics["detector_sha256"])
            die_here_for_tests("written")
            staged.commit()
        except OSError as e:
            if not str(e.filename or "").startswith(str(staged.path)):
                raise
            raise CertoodError(f"{out_dir}: cannot write the results ({e.strerror or e}); "
                               "the previous results, if any, are unchanged") from None
    return CheckResult(out_dir, result.metrics, result.n_boxes)


def _carry_monitor(monitor_dir: Path | None, out_dir: Path, staging: Path) -> None:
    """A run reusing ``out_dir/monitor`` keeps it: the new results replace ``out_dir`` whole."""
    import shutil

    if monitor_dir is not None and Path(monitor_dir).resolve() == (out_dir / "monitor").resolve():
        shutil.copytree(monitor_dir, staging / "monitor")


def _check_into(spec: Spec, out_dir: Path, monitor_dir: Path | None, progress: ProgressFactory | None,
                save_features: bool) -> CheckResult:
    """run_check's work, every output written into ``out_dir`` (the staging directory)."""
    # every annotation file the run reads, checked before the detector loads (images: lazily)
    datasets = spec_datasets(spec, calibration=monitor_dir is None, test=True)
    detector = load_spec_detector(spec)
    if monitor_dir is not None:
        monitor = load_monitor(monitor_dir, spec, detector.weights_sha256, detector.foreground_head(),
                               num_classes=detector.num_classes)
    else:
        monitor, _ = calibrate(spec, detector, detector.num_classes, progress=progress, datasets=datasets)
        save_monitor(monitor, out_dir / "monitor")
        die_here_for_tests("calibrated")

    sources = ([("id_test", spec.data.id_test)] if spec.data.id_test else []) + \
              [(f"ood/{name}", src) for name, src in spec.data.ood.items()]
    issues = [m if m.startswith(CALIBRATION_SETS) else f"calibration: {m}"  # older monitors: unnamed
              for m in monitor.calibration.get("calibration_issues", [])]
    lines: list[str] = []
    per_set: dict[str, dict] = {}
    detector_seconds, images_seen = 0.0, 0
    score_seconds, boxes_scored = 0.0, 0
    certify_parts: dict = {}  # data set -> CertifyResult
    certify_features: dict = {}  # box index in boxes.jsonl -> feature at the certify tap
    id_map = None
    points = set(monitor.tap_points)
    if save_features and "cls_logits" in detector.tap_points:
        points.add("cls_logits")  # the logits always travel with the exported features
    exported: dict = {}  # data set -> (monitored detections, their first line in boxes.jsonl)
    for name, source in sources:
        dataset = datasets[name]
        dets_all = extract_detections(detector, dataset, points, progress=progress,
                                      min_score=monitor.detector_threshold)
        detector_seconds += dets_all.seconds - dets_all.optional_seconds  # the forward pass alone
        score_seconds += dets_all.optional_seconds  # extra passes for scores (box jitter) are theirs
        images_seen += dets_all.n_images
        if name == "id_test":
            id_map = coco_map(dataset.coco, dets_all.coco_results(monitor.label_to_category),
                              image_ids=dets_all.read_image_ids)  # unread images leave the evaluation
        dets = dets_all.select(dets_all.det_scores >= monitor.detector_threshold)
        start = time.perf_counter()
        values = monitor.score_boxes(dets)
        flags = monitor.flag(values, dets.labels)
        score_seconds += time.perf_counter() - start
        boxes_scored += len(dets)
        gt = match_dataset(dets, dataset, monitor.label_to_category, same_class=False)
        gt_match = gt_match_dataset(dets, dataset, monitor.label_to_category) \
            if getattr(source, "protocol", "box") == "gt_matched" else None
        certified = None
        if spec.certify is not None:  # certificates per box (certood.certify)
            certified = certify_detections(monitor, detector, dets, values, flags, progress)
            certify_parts[name] = certified
            certify_features.update({len(lines) + i: certified.features[i]
                                     for i, c in enumerate(certified.certificates) if c.verdict != "undecided"})
        exported[name] = (dets, len(lines))
        lines += _box_records(name, dets, values, flags, gt, monitor, certified, gt_match)
        per_set[name] = {"dets": dets, "values": values, "flags": flags, "dataset": dataset}
        if gt_match is not None:
            per_set[name]["gt_match"] = gt_match
        issues += [f"{name}: {m}" for m in dataset.issues]

    metrics = {
        "spec": str(spec.path) if spec.path else None,
        "spec_fingerprint": spec.fingerprint(),
        "detector_sha256": detector.weights_sha256,
        "protocol": PROTOCOL,
        "protocols": {"box": PROTOCOL, "gt_matched": GT_MATCHED_PROTOCOL},
        "monitor": {"detector_threshold": monitor.detector_threshold, "thresholds": monitor.thresholds,
                    "tpr": spec.threshold.tpr, "rule": spec.rule.source,
                    "threshold_method": spec.threshold.describe(),  # + "threshold": the record (calibration)
                    "class_thresholds": monitor.class_thresholds, **monitor.calibration},
        "id_test": None,
        "ood": {},
        # ratios over the same images: all scores of all monitored boxes of an image vs its forward pass
        "cost": {"detector_seconds_per_image": detector_seconds / max(1, images_seen),
                 "score_seconds_per_box": score_seconds / max(1, boxes_scored),
                 "score_to_detector_ratio": score_seconds / max(1e-12, detector_seconds)},
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
        if "gt_match" in part:  # protocol gt_matched: ID and OOD boxes both come from this set
            metrics["ood"][name.split("/", 1)[1]] = _gt_matched_entry(part, spec.scores, entry)
            continue
        entry["protocol"] = "box"
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
            spec.certify, certify_parts, detector_seconds)
    if spec.temporal is not None:  # track ids on the box records, track-level metrics
        from certood.temporal import temporal_check

        lines, metrics["temporal"] = temporal_check(spec, monitor, per_set, lines)

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "boxes.jsonl", "".join(line + "\n" for line in lines))
    if spec.certify is not None:  # what `certood recheck` re-verifies certificates from
        atomic_write_bytes(out_dir / FEATURES_FILE, certify_features_blob(
            monitor, certify_head(detector, spec.taps[spec.certify.tap]), spec.certify, certify_features,
            detector.weights_sha256, monitor_dir=monitor_dir))
    if save_features:
        atomic_write_bytes(out_dir / FEATURES_EXPORT_FILE, _features_blob(exported, spec, detector.weights_sha256))
    plot_sets = {k: _ood_matched_only(v) if "gt_match" in v else v for k, v in per_set.items()}
    plots.write_visual_report(out_dir, metrics, plot_sets, spec)  # plots/*.png, report.html; never raises
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "summary.txt", report.summary_text(metrics))
    atomic_write_text(out_dir / "report.md", report.report_markdown(metrics))
    return CheckResult(out_dir, metrics, len(lines))
