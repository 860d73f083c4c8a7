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

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from certood import plots, report
from certood.artifacts import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, check_manifest_fits, die_here_for_tests, is_monitor_dir,
    load_monitor, read_manifest, save_monitor, stage_results, versions, write_results_marker,
)
from certood.certify import CertifyResult, certify_head, certify_metrics
from certood.data.batches import image_batches
from certood.recheck import FEATURES_FILE, certify_features_blob
from certood.errors import CertoodError, DataError, UsageError
from certood.extract import DatasetDetections, ProgressFactory, concat_detections
from certood.metrics import GT_MATCH, coco_map, gt_matched_metrics, ood_metrics
from certood.monitor import CALIBRATION_SETS, Monitor, calibrate, head_if_needed, spec_datasets
from certood.shards import Shard, ShardStore, make_shard
from certood.spec import Spec
from certood.stages import BatchRunner, run_shard, shard_batches

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


def with_run_options(spec: Spec, workers: int | None = None, ray_address: str | None = None) -> Spec:
    """``spec`` with its run block overridden from the command line: ``workers`` DataLoader
    processes; ``ray_address`` ``"local"`` (a local Ray instance) or a cluster's address."""
    from dataclasses import replace

    from certood.spec.model import RaySpec

    run = spec.run
    if workers is not None:
        run = replace(run, workers=workers)
    if ray_address is not None:
        ray = run.ray or RaySpec()
        run = replace(run, ray=replace(ray, address=None if ray_address == "local" else ray_address))
    return replace(spec, run=run)


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


@dataclass(frozen=True)
class _StoredCertificate:
    """A certificate as its shard stores it (the JSON boxes.jsonl carries): what the box
    records and the rates per data set read."""

    data: dict

    @property
    def verdict(self) -> str:
        return self.data["verdict"]

    @property
    def reason(self) -> str | None:
        return self.data.get("reason")

    @property
    def radius(self) -> float | None:
        return self.data.get("radius")

    def to_json(self) -> dict:
        return self.data


def _certified_set(certificates: list[dict], seconds: float) -> CertifyResult:
    return CertifyResult([_StoredCertificate(c) for c in certificates], torch.zeros(0, 0), seconds)


def _with_features(shard: Shard) -> DatasetDetections:
    """A shard's monitored boxes with the features it stores (``--save-features``)."""
    dets = shard.dets()
    taps = {k.removeprefix("feature/"): v for k, v in shard.tensors.items() if k.startswith("feature/")}
    return DatasetDetections(dets.name, dets.image_ids, dets.boxes, dets.labels, dets.det_scores, taps,
                             dets.n_images, dets.seconds, 0.0, dets.read_image_ids)


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
              progress: ProgressFactory | None = None, save_features: bool = False,
              resume: bool = False) -> CheckResult:
    """Calibrate (or load) the monitor, score every dataset of the spec, write the outputs
    (with ``save_features``, also features.safetensors: see the module docstring).

    The outputs replace ``out_dir`` whole: built in a staging directory beside it, closed by
    certood-results.json, swapped in at the end (certood.artifacts), so a failed or killed run
    leaves the previous complete results. An ``out_dir`` that is not empty and holds files
    certood did not write is refused (UsageError) before any work; a monitor given from
    ``out_dir/monitor`` is carried into the new results.

    Data sets are processed in shards (certood.shards) written as they finish, so memory does
    not grow with the number of images. ``resume``: a check of the same ``out_dir`` that was
    killed (or interrupted) left its staging directory; continue there, redoing no shard it
    finished (its calibrated monitor is reused too), as long as the spec, detector and
    monitor are the same. Without ``resume`` such leftovers are removed.
    """
    out_dir = Path(out_dir)
    if not spec.data.id_test and not spec.data.ood:
        raise UsageError(f"{spec.path or 'the spec'}: names no data.id_test or data.ood set: nothing to check")
    if monitor_dir is not None:  # fail fast, before the output is touched and the detector loads
        check_manifest_fits(monitor_dir, read_manifest(monitor_dir), spec)
    with stage_results(out_dir, resume=resume) as staged:
        staged.keep_on_interrupt = "shards"
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


def _monitor_for(spec: Spec, detector, out_dir: Path, monitor_dir: Path | None, progress, datasets) -> Monitor:
    """The monitor the check runs: from ``monitor_dir``; else one an interrupted run of this
    check calibrated (``--resume``: ``out_dir/monitor`` of the adopted staging directory, when
    it fits the spec and the detector); else calibrated now and saved to ``out_dir/monitor``."""
    head, sha = head_if_needed(spec, detector), detector.weights_sha256
    if monitor_dir is not None:
        return load_monitor(monitor_dir, spec, sha, head, num_classes=detector.num_classes)
    if is_monitor_dir(out_dir / "monitor"):
        try:
            return load_monitor(out_dir / "monitor", spec, sha, head, num_classes=detector.num_classes)
        except CertoodError:
            pass  # another spec's or detector's: calibrate anew, over it
    monitor, _ = calibrate(spec, detector, detector.num_classes, progress=progress, datasets=datasets)
    save_monitor(monitor, out_dir / "monitor")
    die_here_for_tests("calibrated")
    return monitor


def run_key(spec: Spec, monitor: Monitor, save_features: bool) -> dict:
    """What a run's shards depend on: the spec as written (its run, gate and output blocks
    aside), the detector, the fitted monitor, the exported features and the shard size."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("run", "gate", "output")}
    state = {"thresholds": monitor.thresholds, "detector_threshold": monitor.detector_threshold,
             "class_thresholds": monitor.class_thresholds,
             "scores": {n: s.state_tensors() for n, s in monitor.scores.items()}}
    h = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode())
    for name in sorted(state["scores"]):
        for key, t in sorted(state["scores"][name].items()):
            h.update(f"{name}/{key}".encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: v for k, v in state.items() if k != "scores"}, sort_keys=True).encode())
    return {"format": "certood check run v1", "spec_and_monitor_sha256": h.hexdigest(),
            "detector_sha256": monitor.detector_sha256, "save_features": bool(save_features),
            "shard_images": spec.run.shard_images}


def shard_plan(dataset, shard_images: int) -> list[list[int]]:
    """Positions in ``dataset.records`` of each shard's images: consecutive runs of ``shard_images``."""
    n = len(dataset.records)
    return [list(range(s, min(n, s + shard_images))) for s in range(0, n, shard_images)]


def _run_shards(runner: BatchRunner, spec: Spec, sources, datasets, store: ShardStore, progress,
                device: str | None) -> dict[str, int]:
    """Every shard of every data set not already on disk, through the runner (in this process,
    images decoded by ``run.workers`` DataLoader workers; or on Ray with ``run.ray``). Returns
    shards per data set."""
    counts = {}
    pending = []
    for name, source in sources:
        plan = shard_plan(datasets[name], spec.run.shard_images)
        counts[name] = len(plan)
        records = datasets[name].records
        todo = [(k, pos) for k, pos in enumerate(plan)
                if not store.done(name, k, [records[i].image_id for i in pos])]
        pending.append((name, source, todo))
    if spec.run.ray is not None:
        from certood.distributed import run_shards_on_ray

        run_shards_on_ray(spec, runner, pending, datasets, store, progress)
        return counts
    batch_size = getattr(runner.detector, "batch_size", None) or 8
    for name, source, todo in pending:
        if not todo:
            continue
        dataset = datasets[name]
        batches = [b for _, pos in todo for b in shard_batches(pos, batch_size)]
        stream = image_batches(dataset.records, batches, workers=spec.run.workers,
                               pin_memory=str(device or "").startswith("cuda"))
        tick = _ticker(progress, sum(len(pos) for _, pos in todo), name)
        for k, pos in todo:
            result = run_shard(runner, dataset, pos, stream, name=name,
                               gt_matched=getattr(source, "protocol", "box") == "gt_matched",
                               keep_all=name == "id_test", tick=tick)
            store.write(make_shard(result, dataset=name, index=k,
                                   image_ids=[dataset.records[i].image_id for i in pos],
                                   read_image_ids=result.dets.read_image_ids))
            die_here_for_tests("shard")
    return counts


def _ticker(progress, total: int, desc: str):
    """``tick(n)``: advance ``progress`` (a ProgressFactory) by ``n`` images."""
    if progress is None:
        return None
    bar = iter(progress(iter(range(total)), total, desc))

    def tick(n: int) -> None:
        for _ in range(n):
            next(bar, None)
    return tick


def _check_into(spec: Spec, out_dir: Path, monitor_dir: Path | None, progress: ProgressFactory | None,
                save_features: bool) -> CheckResult:
    """run_check's work, every output written into ``out_dir`` (the staging directory): the
    monitor, then per data set its shards (certood.shards), then the outputs from the shards."""
    # every annotation file the run reads, checked before the detector loads (images: lazily)
    datasets = spec_datasets(spec, calibration=monitor_dir is None, test=True)
    detector = load_spec_detector(spec)
    monitor = _monitor_for(spec, detector, out_dir, monitor_dir, progress, datasets)

    sources = ([("id_test", spec.data.id_test)] if spec.data.id_test else []) + \
              [(f"ood/{name}", src) for name, src in spec.data.ood.items()]
    export_points = set()
    if save_features:
        export_points = set(monitor.tap_points)
        if "cls_logits" in detector.tap_points:
            export_points.add("cls_logits")  # the logits always travel with the exported features
    runner = BatchRunner(monitor, detector, keep_points=sorted(export_points))
    store = ShardStore(out_dir / "shards")
    resumed = store.open(run_key(spec, monitor, save_features))
    counts = _run_shards(runner, spec, sources, datasets, store, progress, getattr(spec.detector, "device", None))

    issues = [m if m.startswith(CALIBRATION_SETS) else f"calibration: {m}"  # older monitors: unnamed
              for m in monitor.calibration.get("calibration_issues", [])]
    temporal = spec.temporal is not None
    lines: list[str] = []  # kept only for the temporal pass (it adds track fields to every line)
    n_lines = 0
    per_set: dict[str, dict] = {}
    detector_seconds, images_seen = 0.0, 0
    score_seconds, boxes_scored = 0.0, 0
    certify_parts: dict = {}  # data set -> CertifyResult (verdict summaries)
    certify_features: dict = {}  # box index in boxes.jsonl -> feature at the certify tap
    id_map = None
    exported: dict = {}  # data set -> (monitored detections with features, their first line in boxes.jsonl)
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes_file = open(out_dir / "boxes.jsonl", "w", encoding="utf-8")
    with boxes_file:
        for name, source in sources:
            dataset = datasets[name]
            prefixes = ("box/", "value/", "all/") + (("feature/",) if save_features else ())
            shards = list(store.iter(name, counts[name], prefixes))
            for shard in shards:
                dataset.issues.extend(shard.meta["issues"])
            dets = concat_detections([_with_features(sh) for sh in shards], name) if shards else None
            if dets is None or dets.n_images == 0:
                first = f" (first: {dataset.issues[0]})" if dataset.issues else ""
                raise DataError(f"{dataset.source}: none of its {len(dataset.records)} images could be read{first}")
            values = {k: torch.cat([sh.values()[k] for sh in shards]) for k in spec.scores}
            flags = torch.cat([sh.tensors["box/flag"] for sh in shards]).bool()
            gt = torch.cat([sh.tensors["box/gt"] for sh in shards])
            gt_match = torch.cat([sh.tensors["box/gt_match"] for sh in shards]) \
                if getattr(source, "protocol", "box") == "gt_matched" else None
            detector_seconds += sum(sh.meta["detector_seconds"] for sh in shards)
            score_seconds += sum(sh.meta["score_seconds"] for sh in shards)
            images_seen += dets.n_images
            boxes_scored += len(dets)
            if name == "id_test":
                all_dets = concat_detections([sh.all_dets() for sh in shards], name)
                id_map = coco_map(dataset.coco, all_dets.coco_results(monitor.label_to_category),
                                  image_ids=dets.read_image_ids)  # unread images leave the evaluation
            certified = None
            if spec.certify is not None:  # certificates per box (certood.certify), from the shards
                certs = [c for sh in shards for c in sh.meta["certificates"]]
                certified = _certified_set(certs, sum(sh.meta["certify_seconds"] for sh in shards))
                certify_parts[name] = certified
                offset = n_lines
                for sh in store.iter(name, counts[name], ("certify/",)):
                    if "certify/row" in sh.tensors:
                        for row, f in zip(sh.tensors["certify/row"].tolist(), sh.tensors["certify/feature"]):
                            certify_features[offset + row] = f
                    offset += len(sh.meta["certificates"])
            if save_features:
                exported[name] = (dets, n_lines)
            part_lines = _box_records(name, dets, values, flags, gt, monitor, certified, gt_match)
            n_lines += len(part_lines)
            if temporal:
                lines += part_lines
            else:
                boxes_file.write("".join(line + "\n" for line in part_lines))
            per_set[name] = {"dets": dets.select(torch.ones(len(dets), dtype=torch.bool), points=()),
                             "values": values, "flags": flags, "dataset": dataset}
            if gt_match is not None:
                per_set[name]["gt_match"] = gt_match
            issues += [f"{name}: {m}" for m in dataset.issues]
        if temporal:  # track ids on the box records, track-level metrics
            from certood.temporal import temporal_check

            lines, temporal_metrics = temporal_check(spec, monitor, per_set, lines)
            boxes_file.write("".join(line + "\n" for line in lines))
    shutil.rmtree(store.root)  # the shards are this run's own; the results hold what they carried

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
    if temporal:
        metrics["temporal"] = temporal_metrics
    metrics["run"] = {"shards": sum(counts.values()), "shards_resumed": resumed, "workers": spec.run.workers,
                      "ray": None if spec.run.ray is None else asdict(spec.run.ray)}
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
    return CheckResult(out_dir, metrics, n_lines)
