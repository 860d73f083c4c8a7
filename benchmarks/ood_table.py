"""Every OOD score kind of certood on one detector, under both detection-OOD protocols.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ood_table.py          # DigitsDet, ~5-8 min on 2 cores

Default (DigitsDet, the bundled demo detector): scores are fitted on ``train`` (600 images),
the detector threshold (F1-optimal) and the score thresholds are set on ``val``; the table
reports, on ``test`` (ID) against ``ood-near`` (unseen digits 5-9) and ``ood-far`` (font
letters) under the box-level (VOS) protocol, and on ``mixed`` (ID and unseen digits on the same
canvases) under the ground-truth-matched protocol (certood.check):

- AUROC, AUPR-In and FPR95 (nearest convention; "first" in the JSON) with 95% percentile
  bootstrap intervals over images (``certood.metrics.bootstrap_ci``, ``--n-boot`` replicates);
- boxes per set (monitored boxes, boxes per image, ground-truth objects the detector puts a
  box on at IoU >= 0.5) so that a set on which the detector hardly fires is visible;
- each score's cost: the wall time of its ``score()`` over every monitored box of the
  evaluated sets (best of ``--timing-repeats``) divided by the detector's time on those images,
  measured in the same run; ODIN, GradNorm and MC dropout (several passes or gradients) are
  reported on their own, the single-pass scores also as a sum;
- a **worst-set** summary: each score's minimum AUROC over the OOD sets, the table ranked by it
  (a score that is good on one kind of OOD only is not ranked by its best set);
- the enhancement (``fusion``, certood.scores.fusion, its components and combination chosen on
  ID-only proxies by benchmarks/select_fusion_families.py) against the best **published** score
  of each set (certood's own scores, PUBLISHED below, are left out of that comparison; the
  fusion's components are reported apart): separate intervals and a paired bootstrap of the
  difference.

Extra OOD sets: ``--ood NAME=ANNOTATIONS:IMAGES`` (repeatable) adds a user's COCO-format OOD set
to the default DigitsDet sets as well (box-level protocol, or ``--gt-matched NAME``), e.g. held-out
objects rendered in DigitsDet's canvas style.

Features are extracted once per data set (``certood.monitor.calibrate`` for fit and calibration
data, ``certood.extract.extract_detections`` for the rest) and every score is fitted and
evaluated on them.

Public benchmark (VOC as ID; COCO and OpenImages OOD subsets, as in the published VOS
tables) with a torchvision Faster R-CNN checkpoint::

    .venv/bin/python benchmarks/ood_table.py \\
        --fit-annotations voc/voc0712_train_all.json --fit-images voc/JPEGImages \\
        --id-annotations voc/val_coco_format.json --id-images voc/JPEGImages \\
        --ood coco=coco/instances_val2017_ood_rm_overlap.json:coco/val2017 \\
        --ood openimages=openimages/ood_classes_rm_overlap/COCO-Format/val_coco_format.json:openimages/images \\
        --arch fasterrcnn_resnet50_fpn --weights ckpt.pth --num-classes 21 --out benchmarks/results/voc_table

``--cal-annotations/--cal-images`` set the calibration data (default: the fit data; never the
ID test set). ``--gt-matched NAME`` evaluates OOD set NAME under the ground-truth-matched
protocol (its annotations must then hold ID and unknown objects).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from certood.check import load_spec_detector
from certood.extract import extract_detections
from certood.metrics import GT_MATCH, bootstrap_ci, bootstrap_diff_ci, box_iou, ood_metrics
from certood.monitor import calibrate, gt_match_dataset, is_fusion, load_dataset, score_input
from certood.scores import SCORE_CLASSES
from certood.spec import load_spec_text

REPO = Path(__file__).resolve().parent.parent
# The enhancement: the fusion chosen on ID-only proxies by its worst view, confidence-matched
# views included (round 5: benchmarks/select_fusion_matched.py, results/fusion_matched.md).
FUSION = "fusion"
FUSION_OF = ["energy", "lared"]
FUSION_COMBINE = "min"
# certood's own scores (new here, not published): left out of "the best published score"
OWN_KINDS = ("fusion", "pvalue_fusion", "residual", "jitter_kl")
# several passes or a gradient: cost reported alone (jitter_kl: 8 more box-head passes per box);
# the fusion too: its cost includes the scores it reads
MULTI_PASS = ("odin", "gradnorm", "mc_dropout", "jitter_kl", FUSION)
ROI_KINDS = ("odin", "particul", "residual")  # read box_head.input (the RoI features)
LOGIT_KINDS = ("energy", "msp", "max_logit", "entropy", "fusion")  # read cls_logits (a fusion: its class)
JITTER_KINDS = ("jitter_kl",)  # read box_jitter.logits
TAPS = {"roi": "box_head.input", "penultimate": "box_head.output", "logits": "cls_logits",
        "jitter": "box_jitter.logits"}
# Extra rows beside one row per kind (default parameters): the fusion's ablations, and
# components of the fusion read at another tap than their kind's (ROW_TAPS).
VARIANTS = {"pvalue_fusion_pooled": ("pvalue_fusion", {"class_conditional": False}),
            # the previous default (rounds 1-3, chosen by the mean over stroke-made proxies)
            "fusion_round2": ("fusion", {"of": ["energy", "residual", "jitter_kl"], "combine": "fisher"}),
            # round 4's default (worst of nine plain proxy families; select_fusion_families.py)
            "fusion_round4": ("fusion", {"of": ["energy", "lared"], "combine": "hmp"})}
ROW_TAPS: dict[str, str] = {}
METRICS = ("auroc", "aupr_in", "fpr95")
LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "fpr95": "FPR95"}


def score_rows(roi_channels: int, residual_dim: int = 64) -> dict[str, tuple[str, dict]]:
    """Table row name -> (score kind, parameters): every registered kind, then the variants."""
    params = {"particul": {"channels": roi_channels}, "residual": {"dim": residual_dim},
              FUSION: {"of": FUSION_OF, "combine": FUSION_COMBINE}}
    rows = {kind: (kind, params.get(kind, {})) for kind in sorted(SCORE_CLASSES)}
    rows.update(VARIANTS)
    return rows


def tap_of(kind: str, row: str | None = None) -> str:
    if row in ROW_TAPS:
        return ROW_TAPS[row]
    if kind in JITTER_KINDS:
        return "jitter"
    return "roi" if kind in ROI_KINDS else "logits" if kind in LOGIT_KINDS else "penultimate"


def build_spec(detector: dict, data: dict, rows: dict[str, tuple[str, dict]], detector_score="f1"):
    """A certood spec (as data) holding every score row; validated like any user spec."""
    spec = {"version": 1, "detector": detector, "data": data,
            "taps": TAPS,
            "scores": {name: {"kind": kind, "tap": tap_of(kind, name), **params}
                       for name, (kind, params) in rows.items()},
            "threshold": {"tpr": 0.95, "detector_score": detector_score}}
    return load_spec_text(json.dumps(spec), filename="<ood_table>")


def object_coverage(dets, dataset) -> float | None:
    """Fraction of ground-truth objects with a monitored box at IoU >= 0.5 (None: no objects)."""
    covered = total = 0
    for r in dataset.records:
        if not len(r.gt_boxes):
            continue
        total += len(r.gt_boxes)
        mine = dets.boxes[dets.image_ids == r.image_id]
        if len(mine):
            covered += int((box_iou(r.gt_boxes, mine) >= 0.5).any(axis=1).sum())
    return covered / total if total else None


def timed_scores(monitor, dets, repeats: int) -> tuple[dict, dict]:
    """Every score on every box of ``dets`` and its best wall time over ``repeats`` runs (a
    fusion: its own time, after the scores it reads)."""
    values, seconds = {}, {}
    order = sorted(monitor.scores, key=lambda n: is_fusion(monitor.spec, n))
    for name in order:
        score = monitor.scores[name]
        x = score_input(monitor.spec, name, dets, values)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            v = score.score(x)
            best = min(best, time.perf_counter() - start)
        values[name], seconds[name] = v.detach().double(), best
    return {n: values[n] for n in monitor.scores}, seconds


def ci_entry(id_s, ood_s, id_g, ood_g, n_boot: int) -> dict:
    m = ood_metrics(id_s, ood_s)
    out = {k: m[k] for k in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_first", "n_id", "n_ood")}
    for k in METRICS:
        out[f"{k}_ci"] = list(bootstrap_ci(id_s, ood_s, id_g, ood_g, metric=k, n_boot=n_boot))
    return out


def evaluate_sets(monitor, detector, sources: dict, repeats: int, progress=None) -> dict:
    """Detect once per evaluated set, score every box, time scores and the detector."""
    out = {}
    for name, source in sources.items():
        dataset = load_dataset(source, name)
        dets_all = extract_detections(detector, dataset, monitor.tap_points, progress=progress,
                                      min_score=monitor.detector_threshold)
        dets = dets_all.select(dets_all.det_scores >= monitor.detector_threshold)
        values, seconds = timed_scores(monitor, dets, repeats)
        part = {"dets": dets, "values": values, "score_seconds": seconds,
                "detector_seconds": dets_all.seconds - dets_all.optional_seconds,
                "optional_seconds": dets_all.optional_seconds,
                "n_images": dets_all.n_images, "coverage": object_coverage(dets, dataset),
                "protocol": source.protocol}
        if source.protocol == "gt_matched":
            part["gt_match"] = gt_match_dataset(dets, dataset, monitor.label_to_category).numpy()
        out[name] = part
        print(f"  {name}: {dets_all.n_images} images, {len(dets)} monitored boxes, detector "
              f"{dets_all.seconds:.1f} s", file=sys.stderr, flush=True)
    return out


def set_pairs(parts: dict, id_name: str = "id_test"):
    """(set name, protocol, ID rows selector, OOD rows selector) of every evaluated OOD set:
    yields per set a function giving (id scores, ood scores, id groups, ood groups) per score."""
    id_part = parts[id_name]
    for name, part in parts.items():
        if name == id_name:
            continue
        if part["protocol"] == "gt_matched":
            status, img = part["gt_match"], part["dets"].image_ids.numpy()
            is_id, is_ood = status == GT_MATCH["id"], status == GT_MATCH["ood"]

            def get(score, part=part, is_id=is_id, is_ood=is_ood, img=img):
                v = part["values"][score].numpy()
                return v[is_id], v[is_ood], img[is_id], img[is_ood]
        else:
            id_img = np.array([f"id/{i}" for i in id_part["dets"].image_ids.tolist()])
            ood_img = np.array([f"{name}/{i}" for i in part["dets"].image_ids.tolist()])

            def get(score, part=part, id_img=id_img, ood_img=ood_img):
                return id_part["values"][score].numpy(), part["values"][score].numpy(), id_img, ood_img
        yield name, part, get


def set_summary(name: str, part: dict) -> dict:
    n = len(part["dets"])
    out = {"protocol": part["protocol"], "n_images": part["n_images"], "n_boxes": n,
           "boxes_per_image": n / max(1, part["n_images"]), "object_coverage": part["coverage"]}
    if "gt_match" in part:
        st = part["gt_match"]
        out["counts"] = {"id_matched": int((st == GT_MATCH["id"]).sum()),
                         "ood_matched": int((st == GT_MATCH["ood"]).sum()),
                         "unmatched": int((st == GT_MATCH["unmatched"]).sum())}
    return out


def is_published(row: str, kinds: dict[str, str]) -> bool:
    """Whether a table row is a published score (not one of certood's own kinds)."""
    return kinds.get(row, row) not in OWN_KINDS


def worst_set(results: dict, metric: str = "auroc") -> dict:
    """Per score: its minimum ``metric`` over the OOD sets it was measured on, and that set;
    ranked best first (ties: by name).

    >>> worst_set({"a": {"x": {"auroc": 0.9}, "y": {"auroc": 0.7}}, "b": {"x": {"auroc": 0.8}}})
    {'x': {'worst': 0.8, 'worst_set': 'b', 'rank': 1}, 'y': {'worst': 0.7, 'worst_set': 'a', 'rank': 2}}
    """
    scores = sorted({k for per_score in results.values() for k in per_score})
    worst = {}
    for k in scores:
        by_set = {s: per_score[k][metric] for s, per_score in results.items() if k in per_score}
        name = min(by_set, key=by_set.get)
        worst[k] = {"worst": by_set[name], "worst_set": name}
    ranked = sorted(scores, key=lambda k: (-worst[k]["worst"], k))
    return {k: {**worst[k], "rank": i + 1} for i, k in enumerate(ranked)}


def compare_fusion(results: dict, getters: dict, n_boot: int, kinds: dict[str, str] | None = None) -> dict:
    """Per set: the fusion against the best published score (by AUROC, then by FPR95); the
    fusion's own components, published or not, are listed apart with their AUROC."""
    kinds = kinds or {}
    out = {}
    for set_name, per_score in results.items():
        others = {k: v for k, v in per_score.items() if is_published(k, kinds)}
        if FUSION not in per_score or not others:
            continue
        entry = {}
        for metric, better in (("auroc", max), ("fpr95", min)):
            best = better(others, key=lambda k: others[k][metric])
            f, b = per_score[FUSION], others[best]
            (fi, fo, gi, go), (bi, bo, _, _) = getters[set_name](FUSION), getters[set_name](best)
            diff = bootstrap_diff_ci(fi, fo, bi, bo, gi, go, metric=metric, n_boot=n_boot)
            ci_f, ci_b = f[f"{metric}_ci"], b[f"{metric}_ci"]
            if metric == "auroc":
                separated = ci_f[0] > ci_b[1]
                paired_better = diff[0] > 0
            else:
                separated = ci_f[1] < ci_b[0]
                paired_better = diff[1] < 0
            entry[metric] = {"best_other": best, "best_other_value": b[metric], "fusion_value": f[metric],
                             "fusion_ci": ci_f, "best_other_ci": ci_b, "cis_disjoint_in_favour": bool(separated),
                             "paired_diff_ci": list(diff), "paired_better": bool(paired_better)}
        entry["components"] = {c: per_score[c]["auroc"] for c in FUSION_OF if c in per_score}
        out[set_name] = entry
    return out


def fusion_verdict(fusion: dict, worst: dict | None = None) -> dict:
    """Whether the fusion beats the best published score on every OOD set (AUROC: disjoint
    intervals; paired interval above 0), and whether it has the highest worst-set AUROC."""
    present = list(fusion)
    worst = worst or {}
    return {"sets": present,
            "disjoint_auroc_every_set": bool(present) and all(
                fusion[s]["auroc"]["cis_disjoint_in_favour"] for s in present),
            "paired_auroc_every_set": bool(present) and all(fusion[s]["auroc"]["paired_better"] for s in present),
            "paired_auroc_by_set": {s: "yes" if e["auroc"]["paired_better"] else "no" for s, e in fusion.items()},
            "worst_set_rank": worst.get(FUSION, {}).get("rank")}


def costs(parts: dict) -> dict:
    det = sum(p["detector_seconds"] for p in parts.values())
    n_boxes = sum(len(p["dets"]) for p in parts.values())
    n_images = sum(p["n_images"] for p in parts.values())
    names = list(next(iter(parts.values()))["score_seconds"])
    per = {k: sum(p["score_seconds"][k] for p in parts.values()) for k in names}
    if "jitter_kl" in per:  # its extra box-head passes ran inside the detector call: charged here
        per["jitter_kl"] += sum(p.get("optional_seconds", 0.0) for p in parts.values())
    if FUSION in per:  # a fusion costs what it reads, plus its own lookup
        per[FUSION] += sum(per[c] for c in FUSION_OF if c in per)
    ratio = {k: v / det for k, v in per.items()}
    single = [k for k in names if k not in MULTI_PASS and k not in VARIANTS]
    return {"detector_seconds": det, "images": n_images, "boxes": n_boxes,
            "detector_ms_per_image": 1000 * det / max(1, n_images),
            "score_seconds": per, "ratio": ratio,
            "single_pass_sum_ratio": sum(ratio[k] for k in single), "single_pass_scores": single,
            "multi_pass": {k: ratio[k] for k in names if k in MULTI_PASS}}


def _src(source: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in source.items())


def _ci(v: float, ci: list, digits: int = 3) -> str:
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def render_markdown(record: dict) -> str:
    lines = ["# OOD scores on one detector: box-level and ground-truth-matched protocols", "",
             f"Command: `{record['command']}` ({record['seconds']:.0f} s on {record['machine']}).  ",
             f"Detector: {record['detector']['arch']} `{record['detector']['weights']}` (sha256 "
             f"`{record['detector_sha256'][:16]}`), detector threshold {record['detector_threshold']:.3f} "
             f"({record['detector_threshold_rule']}).  ",
             f"Fit: `{_src(record['data']['fit'])}`; calibration: `{_src(record['data']['calibration'])}`; "
             f"ID test: `{_src(record['data']['id_test'])}`.  ",
             f"Intervals: 95% percentile bootstrap over images, {record['n_boot']} replicates. "
             "FPR95: OOD boxes accepted at the cutoff nearest 95% ID recall (the published convention); "
             "AUPR-In: ID boxes positive. Higher AUROC/AUPR-In, lower FPR95 are better.", "",
             "## Data sets and boxes", "",
             "| set | protocol | images | monitored boxes | boxes / image | objects with a box (IoU>=0.5) | "
             "ID-matched | OOD-matched | unmatched |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in record["sets"].items():
        c = s.get("counts") or {}
        cov = "-" if s["object_coverage"] is None else f"{s['object_coverage']:.2f}"
        lines.append(f"| {name} | {s['protocol']} | {s['n_images']} | {s['n_boxes']} | {s['boxes_per_image']:.2f} | "
                     f"{cov} | {c.get('id_matched', '-')} | {c.get('ood_matched', '-')} | {c.get('unmatched', '-')} |")
    worst, ood_sets = record.get("worst_set") or {}, list(record["results"])
    if worst:
        kinds = {k: v["kind"] for k, v in record["scores"].items()}
        lines += ["", "## Every score ranked by its worst OOD set (AUROC)", "",
                  "Worst set: the score's minimum AUROC over the OOD sets. *own*: certood's own scores (not "
                  "published; left out of the enhancement's \"best published\" comparison).", "",
                  "| rank | score | " + " | ".join(ood_sets) + " | worst | worst set |",
                  "|---|---|" + "---|" * len(ood_sets) + "---|---|"]
        for score in sorted(worst, key=lambda k: worst[k]["rank"]):
            cells = " | ".join(f"{record['results'][s][score]['auroc']:.3f}" if score in record["results"][s] else "-"
                               for s in ood_sets)
            mark = "**" if score == FUSION else ""
            own = "" if is_published(score, kinds) else " *own*"
            lines.append(f"| {worst[score]['rank']} | {mark}{score}{mark}{own} | {cells} | "
                         f"{mark}{worst[score]['worst']:.3f}{mark} | {worst[score]['worst_set']} |")
    for set_name, per_score in record["results"].items():
        proto = record["sets"][set_name]["protocol"]
        what = ("ID test boxes vs this set's boxes" if proto == "box"
                else "this set's ID-matched vs OOD-matched boxes")
        lines += ["", f"## {set_name} ({proto}: {what})", "",
                  "| score | AUROC | AUPR-In | FPR95 | FPR95 (first) | cost / detector |",
                  "|---|---|---|---|---|---|"]
        best_auroc = max(v["auroc"] for v in per_score.values())
        for score, m in sorted(per_score.items(), key=lambda kv: -kv[1]["auroc"]):
            mark = "**" if m["auroc"] == best_auroc else ""
            lines.append(f"| {mark}{score}{mark} | {_ci(m['auroc'], m['auroc_ci'])} | "
                         f"{_ci(m['aupr_in'], m['aupr_in_ci'])} | {_ci(m['fpr95'], m['fpr95_ci'])} | "
                         f"{m['fpr95_first']:.3f} | {100 * record['cost']['ratio'][score]:.2f}% |")
    c = record["cost"]
    lines += ["", "## Cost", "",
              f"Detector: {c['detector_ms_per_image']:.1f} ms per image over {c['images']} images "
              f"({c['boxes']} monitored boxes). Each score: best of {record['timing_repeats']} timed runs of "
              "`score()` over all those boxes, divided by the detector's time on the same images.", "",
              f"Sum over the {len(c['single_pass_scores'])} single-pass scores: "
              f"**{100 * c['single_pass_sum_ratio']:.2f}%** of the detector (target <= 5%). "
              "Several passes / gradients, reported alone: "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in c["multi_pass"].items()) + ".", ""]
    if record.get("fusion"):
        lines += [f"## The enhancement ({FUSION} of {', '.join(FUSION_OF)}, combine {FUSION_COMBINE}) vs the best "
                  "published score", "",
                  "| set | metric | best published | its value [CI] | fusion [CI] | CIs disjoint, fusion better | "
                  "paired diff (fusion - other) [CI] |", "|---|---|---|---|---|---|---|"]
        for set_name, e in record["fusion"].items():
            for metric, d in e.items():
                if metric == "components":
                    continue
                lines.append(f"| {set_name} | {LABELS[metric]} | {d['best_other']} | "
                             f"{_ci(d['best_other_value'], d['best_other_ci'])} | "
                             f"{_ci(d['fusion_value'], d['fusion_ci'])} | {'yes' if d['cis_disjoint_in_favour'] else 'no'} | "
                             f"{d['fusion_value'] - d['best_other_value']:+.3f} [{d['paired_diff_ci'][0]:+.3f}, "
                             f"{d['paired_diff_ci'][1]:+.3f}] |")
        comp = [c for c in FUSION_OF if any(c in e["components"] for e in record["fusion"].values())]
        if comp:
            lines += ["", "The fusion's components alone (AUROC), reported apart:", "",
                      "| set | " + " | ".join(comp) + " | fusion |", "|---|" + "---|" * (len(comp) + 1)]
            for set_name, e in record["fusion"].items():
                lines.append(f"| {set_name} | " + " | ".join(f"{e['components'].get(c, float('nan')):.3f}" for c in comp)
                             + f" | {e['auroc']['fusion_value']:.3f} |")
        v = record["fusion_verdict"]
        lines += ["", f"Beats the best published score on every OOD set with disjoint 95% intervals "
                      f"(AUROC): **{'yes' if v['disjoint_auroc_every_set'] else 'no'}**; with a paired "
                      f"interval of the AUROC difference above 0: "
                      f"**{'yes' if v['paired_auroc_every_set'] else 'no'}** "
                      f"(per set: {', '.join(f'{k} {x}' for k, x in v['paired_auroc_by_set'].items())}). "
                      f"Rank by worst-set AUROC: **{v['worst_set_rank']}** of {len(worst)}.", ""]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="digits_fasterrcnn")
    p.add_argument("--weights", default="builtin:digits_fasterrcnn")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--min-size", type=int, default=None)
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--score-thresh", type=float, default=0.05, help="detector's own box score floor")
    p.add_argument("--residual-dim", type=int, default=64,
                   help="principal directions of the residual score (fewer than the fit boxes)")
    p.add_argument("--detector-score", default="f1",
                   help="monitored boxes: 'f1' (F1-optimal cut on calibration data) or a fixed score cut")
    p.add_argument("--fit-annotations", type=Path)
    p.add_argument("--fit-images", type=Path)
    p.add_argument("--cal-annotations", type=Path)
    p.add_argument("--cal-images", type=Path)
    p.add_argument("--id-annotations", type=Path)
    p.add_argument("--id-images", type=Path)
    p.add_argument("--ood", action="append", default=[], metavar="NAME=ANN:IMAGES",
                   help="an OOD set (repeatable); with DigitsDet: added to its near, far and mixed sets")
    p.add_argument("--gt-matched", action="append", default=[], metavar="NAME",
                   help="evaluate OOD set NAME under the ground-truth-matched protocol")
    p.add_argument("--fit-images-max", type=int, default=600, help="fit images used (DigitsDet default 600)")
    p.add_argument("--max-images", type=int, default=None, help="cap every other set (quick runs)")
    p.add_argument("--scores", default=None, metavar="ROW,ROW",
                   help="only these table rows (score kinds or variants); default: all")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ood_table")
    return p.parse_args(argv)


def _source(ann: Path, images: Path, max_images: int | None, protocol: str | None = None) -> dict:
    out = {"annotations": str(Path(ann).resolve()), "images": str(Path(images).resolve())}
    if max_images:
        out["max_images"] = max_images
    if protocol:
        out["protocol"] = protocol
    return out


DIGITSDET_OOD = {"near": ("ood-near", None), "far": ("ood-far", None), "mixed": ("mixed", "gt_matched")}


def data_block(args) -> dict:
    """The spec's data block: DigitsDet by default (its near, far and mixed sets, plus any
    ``--ood`` sets given), or the COCO-format paths given."""
    cap = {"max_images": args.max_images} if args.max_images else {}
    if args.id_annotations is None:
        ood = {name: {"digitsdet": split, **({"protocol": proto} if proto else {}), **cap}
               for name, (split, proto) in DIGITSDET_OOD.items()}
        taken = sorted(set(ood) & {item.partition("=")[0] for item in args.ood})
        if taken:
            raise SystemExit(f"--ood: {', '.join(taken)} name DigitsDet's own sets; expected another name")
        ood.update(parse_ood(args))
        return {"fit": {"digitsdet": "train", "max_images": args.fit_images_max},
                "calibration": {"digitsdet": "val", **cap}, "id_test": {"digitsdet": "test", **cap}, "ood": ood}
    if args.fit_annotations is None or args.fit_images is None or args.id_images is None or not args.ood:
        raise SystemExit("public benchmark: give --fit-annotations/--fit-images (ID training data), "
                         "--id-annotations/--id-images (ID test) and at least one --ood NAME=ANN:IMAGES")
    fit = _source(args.fit_annotations, args.fit_images, args.fit_images_max)
    cal = fit if args.cal_annotations is None else _source(args.cal_annotations, args.cal_images, args.max_images)
    return {"fit": fit, "calibration": cal,
            "id_test": _source(args.id_annotations, args.id_images, args.max_images), "ood": parse_ood(args)}


def parse_ood(args) -> dict:
    """The ``--ood NAME=ANNOTATIONS:IMAGES`` sets as spec data sources (``--gt-matched`` names:
    that protocol); a DigitsDet name among ``--gt-matched`` is allowed only for ``mixed``."""
    ood = {}
    for item in args.ood:
        name, sep, paths = item.partition("=")
        cut = paths.find(".json:")  # a path may hold ':' itself; the annotation file ends in .json
        ann, sep2, images = (paths[:cut + 5], ":", paths[cut + 6:]) if cut >= 0 else paths.partition(":")
        if not (sep and sep2 and name and ann and images):
            raise SystemExit(f"--ood: expected NAME=ANNOTATIONS:IMAGES, found {item!r}")
        if name in ood:
            raise SystemExit(f"--ood: the name {name!r} is given twice")
        ood[name] = _source(Path(ann), Path(images), args.max_images,
                            "gt_matched" if name in args.gt_matched else None)
    own = {"mixed"} if args.id_annotations is None else set()
    unknown = sorted(set(args.gt_matched) - set(ood) - own)
    if unknown:
        raise SystemExit(f"--gt-matched: expected names of --ood sets ({', '.join(ood)}), found {unknown}")
    return ood


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    detector_block = {"kind": "torchvision", "arch": args.arch, "weights": args.weights,
                      "score_thresh": args.score_thresh}
    for key in ("num_classes", "min_size", "max_size"):
        if getattr(args, key) is not None:
            detector_block[key] = getattr(args, key)
    if args.arch == "digits_fasterrcnn":
        detector_block.setdefault("min_size", 128)
        detector_block.setdefault("max_size", 128)
    data = data_block(args)
    cut = args.detector_score if args.detector_score == "f1" else float(args.detector_score)
    probe = build_spec(detector_block, data, {"energy": ("energy", {})}, cut)
    detector = load_spec_detector(probe)
    rows = score_rows(int(detector.model.backbone.out_channels), args.residual_dim)
    if args.scores:
        wanted = args.scores.split(",")
        unknown = sorted(set(wanted) - set(rows))
        if unknown:
            raise SystemExit(f"--scores: expected rows among {', '.join(rows)}, found {unknown}")
        rows = {k: v for k, v in rows.items() if k in wanted}
    spec = build_spec(detector_block, data, rows, cut)
    print(f"calibrating {len(rows)} scores ...", file=sys.stderr, flush=True)
    monitor, _ = calibrate(spec, detector, detector.num_classes)
    fitted = time.perf_counter() - start
    sources = {"id_test": spec.data.id_test, **spec.data.ood}
    parts = evaluate_sets(monitor, detector, sources, args.timing_repeats)
    results, getters = {}, {}
    for set_name, part, get in set_pairs(parts):
        getters[set_name] = get
        results[set_name] = {}
        for score in rows:
            id_s, ood_s, id_g, ood_g = get(score)
            if len(id_s) == 0 or len(ood_s) == 0:
                continue
            results[set_name][score] = ci_entry(id_s, ood_s, id_g, ood_g, args.n_boot)
        print(f"  metrics {set_name} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    command = "OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ood_table.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    record = {
        "command": command.strip(), "seconds": round(time.perf_counter() - start, 1),
        "fit_and_calibration_seconds": round(fitted, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "detector": {"arch": args.arch, "weights": args.weights, "num_classes": detector.num_classes},
        "detector_sha256": detector.weights_sha256, "detector_threshold": monitor.detector_threshold,
        "detector_threshold_rule": "F1-optimal on the calibration set" if cut == "f1" else "fixed",
        "data": data,
        "calibration": {k: v for k, v in monitor.calibration.items() if k != "calibration_issues"},
        "scores": {name: {"kind": kind, "tap": spec.taps[tap_of(kind, name)], "params": monitor.scores[name].params()}
                   for name, (kind, _) in rows.items()},
        "n_boot": args.n_boot, "timing_repeats": args.timing_repeats,
        "sets": {name: set_summary(name, part) for name, part in parts.items()},
        "results": results, "cost": costs(parts),
        "fusion": compare_fusion(results, getters, args.n_boot, {k: kind for k, (kind, _) in rows.items()}),
        "worst_set": worst_set(results),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    record["fusion_verdict"] = fusion_verdict(record["fusion"], record["worst_set"])
    record["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render_markdown(record))
    print(render_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
