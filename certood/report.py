"""Human-readable renderings of a check's metrics (plain text and Markdown)."""
from __future__ import annotations


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rows(metrics: dict):
    for set_name, entry in metrics["ood"].items():
        for score_name, m in entry["scores"].items():
            yield set_name, score_name, m, entry


def summary_text(metrics: dict) -> str:
    """A short summary: ID mAP, then AUROC / FPR95 per OOD set and score."""
    out = []
    mon = metrics["monitor"]
    out.append(f"detector threshold {mon['detector_threshold']:.3f} (calibration), "
               f"score thresholds at {mon['tpr']:.0%} ID TPR: "
               + ", ".join(f"{k}={v:.3f}" for k, v in mon["thresholds"].items()))
    id_test = metrics.get("id_test")
    if id_test:
        out.append(f"ID test: mAP {id_test['map']:.3f}, mAP50 {id_test['map50']:.3f} "
                   f"({id_test['n_images']} images, {id_test['n_boxes']} monitored boxes)")
    for set_name, entry in metrics["ood"].items():
        head = f"OOD {set_name}: {entry['n_boxes']} boxes on {entry['n_images']} images"
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
    if metrics["issues"]:
        out.append(f"{len(metrics['issues'])} data issue(s) reported and skipped (see metrics.json)")
    return "\n".join(out) + "\n"


def report_markdown(metrics: dict) -> str:
    """A Markdown report: the protocol, ID quality, and the OOD metrics table."""
    lines = ["# certood check report", "", f"Spec: `{metrics['spec']}`  ", 
             f"Spec fingerprint: `{metrics['spec_fingerprint'][:16]}`, detector sha256: "
             f"`{metrics['detector_sha256'][:16]}`", "", f"Protocol: {metrics['protocol']}.", ""]
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
              "Score thresholds (" + f"{mon['tpr']:.0%} ID TPR on calibration boxes): "
              + ", ".join(f"`{k}` {v:.4f}" for k, v in mon["thresholds"].items()), ""]
    if metrics.get("plots"):
        lines += ["## Figures", "", "Also in `report.html` (self-contained).", ""]
        lines += [f"![{p['title']}]({p['file']})" for p in metrics["plots"]] + [""]
    if metrics["issues"]:
        lines += ["## Data issues (skipped)", ""] + [f"- {m}" for m in metrics["issues"][:50]] + [""]
    return "\n".join(lines)
