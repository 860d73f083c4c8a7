"""Human-readable renderings of a check's metrics (plain text and Markdown)."""
from __future__ import annotations


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _set_label(set_name: str, entry: dict) -> str:
    """The set's name, marked when its boxes are labelled by ground-truth matching."""
    return f"{set_name} (gt-matched)" if entry.get("protocol") == "gt_matched" else set_name


def _rows(metrics: dict):
    for set_name, entry in metrics["ood"].items():
        for score_name, m in entry["scores"].items():
            yield _set_label(set_name, entry), score_name, m, entry


def _threshold_method(mon: dict) -> str:
    """How the score thresholds were set, in words (older metrics.json: the ID TPR only)."""
    return mon.get("threshold_method") or f"{mon['tpr']:.0%} ID TPR on calibration boxes"


def summary_text(metrics: dict) -> str:
    """A short summary: ID mAP, then AUROC / FPR95 per OOD set and score."""
    out = []
    mon = metrics["monitor"]
    out.append(f"detector threshold {mon['detector_threshold']:.3f} (calibration), "
               f"score thresholds at {_threshold_method(mon)}: "
               + ", ".join(f"{k}={v:.3f}" for k, v in mon["thresholds"].items()))
    if mon.get("plumbing"):  # certood.monitor.plumbing_notes: the numbers below test the pipeline only
        out.append("plumbing run: " + "; ".join(mon["plumbing"]))
    id_test = metrics.get("id_test")
    if id_test:
        out.append(f"ID test: mAP {id_test['map']:.3f}, mAP50 {id_test['map50']:.3f} "
                   f"({id_test['n_images']} images, {id_test['n_boxes']} monitored boxes)")
    for set_name, entry in metrics["ood"].items():
        head = f"OOD {_set_label(set_name, entry)}: {entry['n_boxes']} boxes on {entry['n_images']} images"
        if entry.get("counts"):
            c = entry["counts"]
            head += f" ({c['id_matched']} ID-matched, {c['ood_matched']} OOD-matched, {c['unmatched']} unmatched)"
        if "skipped" in entry:
            out.append(f"{head}: skipped ({entry['skipped']})")
            continue
        out.append(head)
        for score_name, m in entry["scores"].items():
            out.append(f"  {score_name:<12} AUROC {m['auroc']:.3f}  AUPR-In {m['aupr_in']:.3f}  "
                       f"FPR95 {m['fpr95']:.3f}")
        if entry.get("rule"):
            r = entry["rule"]
            out.append(f"  {'rule':<12} flags {_fmt(r['ood_flag_rate'])} of OOD boxes, "
                       f"keeps {_fmt(r['id_tpr'])} of ID boxes")
    out += certificate_lines(metrics)
    if metrics["issues"]:
        out.append(f"{len(metrics['issues'])} data issue(s) reported and skipped (see metrics.json)")
    return "\n".join(out) + "\n"


def report_markdown(metrics: dict) -> str:
    """A Markdown report: the protocol, ID quality, and the OOD metrics table."""
    lines = ["# certood check report", "", f"Spec: `{metrics['spec']}`  ", 
             f"Spec fingerprint: `{metrics['spec_fingerprint'][:16]}`, detector sha256: "
             f"`{metrics['detector_sha256'][:16]}`", "", f"Protocol: {metrics['protocol']}.", ""]
    if any(e.get("protocol") == "gt_matched" for e in metrics["ood"].values()):
        lines += [f"Sets marked (gt-matched): {metrics['protocols']['gt_matched']}.", ""]
    id_test = metrics.get("id_test")
    if id_test:
        lines += ["## ID detection quality", "", "| mAP | mAP50 | mAP75 | images | monitored boxes |",
                  "|---|---|---|---|---|",
                  f"| {id_test['map']:.3f} | {id_test['map50']:.3f} | {id_test['map75']:.3f} | "
                  f"{id_test['n_images']} | {id_test['n_boxes']} |", ""]
    lines += ["## OOD detection (box level)", "",
              "| OOD set | score | AUROC | AUPR-In | AUPR-Out | FPR95 | FPR95 (first) | ID boxes | OOD boxes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for set_name, score_name, m, _ in _rows(metrics):
        lines.append(f"| {set_name} | {score_name} | {m['auroc']:.3f} | {m['aupr_in']:.3f} | "
                     f"{m['aupr_out']:.3f} | {m['fpr95']:.3f} | {m['fpr95_first']:.3f} | "
                     f"{m['n_id']} | {m['n_ood']} |")
    if metrics.get("temporal"):
        from certood.temporal import temporal_report_lines

        lines += [""] + temporal_report_lines(metrics["temporal"])
    mon = metrics["monitor"]
    lines += ["", "## Monitor", "", f"Rule: `{mon['rule']}`  ",
              f"Detector threshold: {mon['detector_threshold']:.4f}  ",
              "Score thresholds (" + f"{_threshold_method(mon)}): "
              + ", ".join(f"`{k}` {v:.4f}" for k, v in mon["thresholds"].items()), ""]
    if metrics.get("plots"):
        lines += ["## Figures", "", "Also in `report.html` (self-contained).", ""]
        lines += [f"![{p['title']}]({p['file']})" for p in metrics["plots"]] + [""]
    certs = metrics.get("certificates")
    if certs:
        lines += ["## Certificates", "", _certify_head(metrics.get("certify") or {}) + "  ",
                  "certified_ood: the rule flags every point of the region; certified_id: none of it.", "",
                  "| data set | boxes | certified | certified OOD | certified ID | undecided | s/box |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in certs.items():
            c = e.get("counts", {})
            lines.append(f"| {name} | {e['n_boxes']} | {_fmt(e['certified_rate'])} | "
                         f"{c.get('certified_ood', '-')} | {c.get('certified_id', '-')} | "
                         f"{c.get('undecided', '-')} | {_fmt(e.get('seconds_per_box'), 4)} |")
        lines.append("")
    if metrics["issues"]:
        lines += ["## Data issues (skipped)", ""] + [f"- {m}" for m in metrics["issues"][:50]] + [""]
    return "\n".join(lines)


def _certify_head(c: dict) -> str:
    norm = "L-inf" if str(c.get("norm")) == "inf" else f"L{c.get('norm')}"
    ratio = c.get("to_detector_ratio")
    cost = f", {ratio:.1f}x the detector's time per image" if isinstance(ratio, (int, float)) else ""
    return (f"{c.get('method')}, {norm} eps {c.get('eps')} at tap {c.get('tap')} ({c.get('domain')}), "
            f"exact: {c.get('exact')}{cost}")


def certificate_lines(metrics: dict) -> list[str]:
    """Verdict counts per data set, for the text summary (empty without certificates)."""
    certs = metrics.get("certificates")
    if not certs:
        return []
    out = ["certificates: " + _certify_head(metrics.get("certify") or {})]
    for name, e in certs.items():
        c = e.get("counts", {})
        reasons = ", ".join(f"{k} {v}" for k, v in (e.get("undecided_reasons") or {}).items())
        out.append(f"  {name:<12} {e['n_boxes']} boxes: certified {_fmt(e['certified_rate'])} "
                   f"(OOD {c.get('certified_ood', 0)}, ID {c.get('certified_id', 0)}), "
                   f"undecided {c.get('undecided', 0)}" + (f" ({reasons})" if reasons else ""))
    return out
