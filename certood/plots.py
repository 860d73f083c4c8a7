"""Figures of a check and its self-contained HTML report.

``write_visual_report`` writes, next to ``report.md``:

- ``plots/roc_<ood set>.png``        ROC curve of every score on one OOD set (OOD positive);
- ``plots/hist_<score>.png``         ID vs OOD score histograms, the calibrated threshold drawn, on a
                                     log x axis when a positive score spans decades (max / median
                                     > 100) and a symlog one when a signed score does;
- ``plots/certificates.png``         certificate verdict counts per data set (when certified);
- ``plots/examples_<score>.png``     per score (the first MAX_EXAMPLE_GRIDS): example images, boxes
                                     coloured by the rule's flag: that score's worst false alarms
                                     (ID boxes it finds most OOD) and worst misses (OOD boxes it
                                     finds most ID-like);
- ``report.html``                    one file, every figure embedded as a base64 PNG, with the
                                     metrics tables.

At most MAX_HISTOGRAMS histograms (the first scores, in the spec's order), MAX_ROC_FIGURES ROC
figures (the first OOD sets) and MAX_ROC_CURVES curves on one ROC are drawn: each figure costs
a fraction of a second and a report of hundreds is read by no one (a check with 10,000
scores spent its time drawing). What is left out is named in ``metrics["issues"]``.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display,
no global backend switch). Each figure is drawn on its own: one that fails is named in
``metrics["issues"]`` and the others, and every other output of the check, are still written.

Example ranking, per score: a box's ID rank under that score alone, the share of ID test boxes
with a value at or above it (an empirical p-value, comparable across scores; a margin in ID
standard deviations combined by the largest let a heavy-tailed score such as Mahalanobis
saturate it, so every example showed the same margin). The calibration set's values are not in
what check passes to the plots, so the ID test boxes are the reference.
"""
from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

VERDICTS = ("certified_ood", "certified_id", "undecided")
FLAG_COLOURS = {True: "#d62728", False: "#2ca02c"}  # flagged OOD: red; kept as ID: green
EXAMPLES_PER_KIND = 4
MAX_HISTOGRAMS = 16
MAX_ROC_FIGURES = 16
MAX_ROC_CURVES = 16
MAX_EXAMPLE_GRIDS = 8


@dataclass(frozen=True)
class Plot:
    """One figure written under ``plots/``: its file (relative to the check's out dir) and title."""

    file: str
    title: str
    caption: str = ""

    def to_dict(self) -> dict:
        return {"file": self.file, "title": self.title, "caption": self.caption}


@dataclass(frozen=True)
class Example:
    """One box picked for the example grid."""

    kind: str  # "false alarm" (an ID box) or "miss" (an OOD box)
    dataset: str  # "id_test" or "ood/<name>"
    row: int  # row in per_set[dataset]["dets"]
    image_id: int
    margin: float  # the score's ID rank (id_rank): share of ID test boxes at or above it


# ----------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def roc_figure(set_name: str, id_values: Mapping[str, np.ndarray], ood_values: Mapping[str, np.ndarray],
               aurocs: Mapping[str, float] | None = None):
    """ROC curves (OOD boxes positive, higher score = more OOD) of every score on one OOD set."""
    from sklearn.metrics import roc_curve

    fig = _figure(5.0, 4.2)
    ax = fig.add_subplot()
    for name in id_values:
        s_id, s_ood = _np(id_values[name]), _np(ood_values[name])
        y = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
        fpr, tpr, _ = roc_curve(y, np.r_[s_id, s_ood])
        label = name if not aurocs or name not in aurocs else f"{name} (AUROC {aurocs[name]:.3f})"
        ax.plot(fpr, tpr, label=label, lw=1.6)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="ID boxes flagged (FPR)", ylabel="OOD boxes flagged (TPR)",
           title=f"ROC, ID test vs OOD {set_name}")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def histogram_axis(values: np.ndarray, threshold: float | None = None, decades: float = 100.0) -> tuple[str, float]:
    """The x axis a score's histogram needs, decided from the data: ``("log", 0)`` when every
    value is positive and the range spans decades (max / median > ``decades``), ``("symlog", c)``
    when values can be negative or zero and the magnitudes span decades (max |v| / median |v| >
    ``decades``; linear within +-c, c = the median |v|), else ``("linear", 0)``.

    >>> histogram_axis(np.array([1.0, 2.0, 3.0]))
    ('linear', 0.0)
    >>> histogram_axis(np.r_[np.ones(9), 1e4])
    ('log', 0.0)
    """
    v = _np(values)
    v = v[np.isfinite(v)]
    if threshold is not None and np.isfinite(threshold):
        v = np.r_[v, threshold]
    if v.size < 2:
        return "linear", 0.0
    if v.min() > 0:
        return ("log", 0.0) if v.max() / np.median(v) > decades else ("linear", 0.0)
    mag = np.abs(v)
    med = float(np.median(mag[mag > 0])) if (mag > 0).any() else 0.0
    return ("symlog", med) if med > 0 and mag.max() / med > decades else ("linear", 0.0)


def _bins(lo: float, hi: float, axis: str, linthresh: float, n: int = 40) -> np.ndarray:
    """``n`` bins of equal width on the drawn axis."""
    if hi <= lo:
        hi = lo + (abs(lo) if axis == "log" and lo > 0 else 1.0)
    if axis == "log":
        return np.geomspace(lo, hi, n + 1)
    if axis == "symlog":
        from matplotlib.scale import SymmetricalLogTransform

        forward = SymmetricalLogTransform(10, linthresh, 1.0)
        a, b = forward.transform(np.array([lo, hi]))
        return forward.inverted().transform(np.linspace(a, b, n + 1))
    return np.linspace(lo, hi, n + 1)


def histogram_figure(score_name: str, id_values: np.ndarray | None, ood_values: Mapping[str, np.ndarray],
                     threshold: float | None):
    """Histograms of one score on ID and on each OOD set, with the calibrated threshold, on the
    x axis :func:`histogram_axis` picks from the values (named in the axis label)."""
    fig = _figure(5.6, 3.8)
    ax = fig.add_subplot()
    series = ([("ID test", _np(id_values))] if id_values is not None else []) + \
             [(f"OOD {k}", _np(v)) for k, v in ood_values.items()]
    series = [(label, v[np.isfinite(v)]) for label, v in series]
    everything = np.concatenate([v for _, v in series] + [np.zeros(0)])
    drawn = threshold if threshold is not None and np.isfinite(threshold) else None
    axis, linthresh = histogram_axis(everything, drawn) if everything.size else ("linear", 0.0)
    if everything.size:
        lo, hi = float(everything.min()), float(everything.max())
        if drawn is not None:
            lo, hi = min(lo, drawn), max(hi, drawn)
        bins = _bins(lo, hi, axis, linthresh)
        for label, v in series:
            if v.size:
                ax.hist(v, bins=bins, density=axis == "linear", alpha=0.45, label=f"{label} ({v.size})")
    if drawn is not None:
        ax.axvline(drawn, color="black", ls="--", lw=1.2, label=f"threshold {drawn:.3g}")
    if axis == "log":
        ax.set_xscale("log")
        note = "log x axis"
    elif axis == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh)
        note = f"symlog x axis, linear within ±{linthresh:.3g}"
    else:
        note = "linear x axis"
    ax.set(xlabel=f"{score_name} (higher = more OOD; {note})",
           ylabel="density" if axis == "linear" else "boxes per bin (bins equal on this axis)",
           title=f"{score_name}: ID vs OOD")
    ax.legend(fontsize=8)
    return fig


def verdict_counts(entry: Mapping) -> dict[str, int] | None:
    """Verdict counts of one data set's certificate summary, whatever form it takes.

    Accepts ``{"counts": {verdict: n}}``, the verdicts as top-level integer keys, or rates
    (``certified_ood_rate``..., or ``certified_rate`` + ``undecided_rate``) with ``n_boxes``.
    """
    if not isinstance(entry, Mapping):
        return None
    counts = entry.get("counts")
    if isinstance(counts, Mapping) and all(isinstance(v, (int, float)) for v in counts.values()):
        return {str(k): int(v) for k, v in counts.items()}
    direct = {v: entry[v] for v in VERDICTS if isinstance(entry.get(v), (int, float))
              and not isinstance(entry.get(v), bool)}
    if direct:
        return {k: int(v) for k, v in direct.items()}
    n = entry.get("n_boxes")
    if not isinstance(n, (int, float)):
        return None
    rates = {v: entry[f"{v}_rate"] for v in VERDICTS if isinstance(entry.get(f"{v}_rate"), (int, float))}
    if not (set(rates) - {"undecided"}) and isinstance(entry.get("certified_rate"), (int, float)):
        rates = {"certified": entry["certified_rate"]}
        if isinstance(entry.get("undecided_rate"), (int, float)):
            rates["undecided"] = entry["undecided_rate"]
    return {k: int(round(float(r) * n)) for k, r in rates.items()} or None


def verdict_figure(certificates: Mapping[str, Mapping]):
    """Stacked bars: certificate verdict counts per data set."""
    table = {name: verdict_counts(entry) for name, entry in certificates.items()}
    table = {k: v for k, v in table.items() if v}
    if not table:
        return None
    verdicts = list(dict.fromkeys(v for counts in table.values() for v in counts))
    colours = {"certified_ood": "#d62728", "certified_id": "#2ca02c", "undecided": "#9e9e9e",
               "certified": "#1f77b4"}
    fig = _figure(1.6 + 1.1 * len(table), 3.8)
    ax = fig.add_subplot()
    names = list(table)
    bottom = np.zeros(len(names))
    for verdict in verdicts:
        heights = np.array([table[n].get(verdict, 0) for n in names], dtype=float)
        ax.bar(names, heights, bottom=bottom, label=verdict, color=colours.get(verdict))
        bottom += heights
    ax.set(ylabel="boxes", title="certificate verdicts")
    ax.legend(fontsize=8)
    return fig


def examples_figure(panels: list[dict]):
    """A grid of images; every monitored box drawn, red = flagged, green = kept; the example
    box of each panel drawn thick.

    A panel: ``{"title", "image" (HxWx3 float array or None), "boxes" [K, 4] xyxy,
    "flags" [K] bool, "focus" (index into boxes)}``.
    """
    from matplotlib.patches import Rectangle

    cols = min(4, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = _figure(2.6 * cols, 2.9 * rows)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = panel.get("image")
        boxes = np.asarray(panel["boxes"], dtype=float).reshape(-1, 4)
        if image is not None:
            ax.imshow(image)
        else:
            ax.set_facecolor("#eeeeee")
            ax.text(0.5, 0.5, "image unavailable", ha="center", va="center", transform=ax.transAxes)
            if boxes.size:
                ax.set(xlim=(0, boxes[:, 2].max() * 1.05), ylim=(boxes[:, 3].max() * 1.05, 0))
        for j, (box, flag) in enumerate(zip(boxes, panel["flags"])):
            focus = j == panel["focus"]
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor=FLAG_COLOURS[bool(flag)], lw=2.6 if focus else 0.7,
                                   alpha=1.0 if focus else 0.6, zorder=3 if focus else 2))
        ax.set_title(panel["title"], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


# ----------------------------------------------------------------------------- examples
def id_rank(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each value's normalised margin under one score: the fraction of reference ID boxes whose
    value is at or above it, ``(1 + #{ref >= v}) / (n + 1)`` (an empirical p-value: near 0 for a
    box more OOD than every ID box, 1 for one below every ID box). Unlike a margin in standard
    deviations it cannot saturate one score against another: it is a rank on every score.

    >>> id_rank(np.array([0.0, 2.5, 9.0]), np.array([1.0, 2.0, 3.0]))
    array([1.  , 0.5 , 0.25])
    """
    ref = np.sort(_np(reference)[np.isfinite(_np(reference))])
    v = _np(values)
    at_or_above = ref.size - np.searchsorted(ref, v, side="left")
    out = (1.0 + at_or_above) / (ref.size + 1.0)
    return np.where(np.isfinite(v), out, np.nan)


def select_examples(per_set: Mapping[str, Mapping], score: str,
                    k: int = EXAMPLES_PER_KIND) -> list[Example]:
    """For one score, the ``k`` worst false alarms (ID test boxes the score finds most OOD) and
    the ``k`` worst misses (OOD boxes it finds most ID-like), at most one per image, false
    alarms first. Ranked by :func:`id_rank` among the ID test boxes' values of that score (the
    margin of each Example); ties by the raw value."""
    ref = per_set.get("id_test")
    reference = _np(ref["values"][score]) if ref is not None and score in ref["values"] else \
        np.concatenate([_np(p["values"][score]) for p in per_set.values() if score in p["values"]] + [np.zeros(0)])

    def pick(kind: str, names: list[str], alarm: bool) -> list[Example]:
        rows = []
        for name in names:
            if score not in per_set[name]["values"]:
                continue
            raw = _np(per_set[name]["values"][score])
            rows += [(float(p), float(x), name, i) for i, (p, x) in enumerate(zip(id_rank(raw, reference), raw))
                     if np.isfinite(p)]
        # false alarms: smallest p-value (most OOD), largest raw; misses: largest p-value, smallest raw
        rows.sort(key=lambda r: (r[0], -r[1]) if alarm else (-r[0], r[1]))
        chosen, seen = [], set()
        for p, _, name, i in rows:
            image_id = int(per_set[name]["dets"].image_ids[i])
            if (name, image_id) in seen:
                continue
            seen.add((name, image_id))
            chosen.append(Example(kind, name, i, image_id, p))
            if len(chosen) == k:
                break
        return chosen

    ood = [n for n in per_set if n.startswith("ood/")]
    ids = [n for n in per_set if n == "id_test"]
    return pick("false alarm", ids, True) + pick("miss", ood, False)


def _example_panels(examples: list[Example], score: str, per_set: Mapping[str, Mapping],
                    image_paths: Callable[[str], Mapping[int, Path]], issues: list[str]) -> list[dict]:
    from certood.data.coco import read_image

    panels = []
    for ex in examples:
        dets = per_set[ex.dataset]["dets"]
        flags = per_set[ex.dataset]["flags"]
        rows = torch.nonzero(dets.image_ids == ex.image_id).flatten()
        focus = int((rows == ex.row).nonzero().flatten()[0])
        image = None
        try:
            path = image_paths(ex.dataset).get(ex.image_id)
        except Exception as e:  # noqa: BLE001 - a missing image costs one panel, not the report
            path = None
            issues.append(f"plots: examples: images of {ex.dataset} unavailable ({type(e).__name__}: {e})")
        if path is not None:
            loaded = read_image(Path(path))
            if isinstance(loaded, str):
                issues.append(f"plots: examples: {loaded}")
            else:
                image = loaded.permute(1, 2, 0).numpy()
        flag = bool(flags[ex.row])
        panels.append({
            "title": f"{ex.kind} ({'flagged' if flag else 'kept'}): {ex.dataset} image {ex.image_id}\n"
                     f"{score}: ID rank p = {ex.margin:.3g}",
            "image": image, "boxes": dets.boxes[rows].numpy(), "flags": flags[rows].numpy(), "focus": focus,
        })
    return panels


def spec_image_paths(spec) -> Callable[[str], dict[int, Path]]:
    """``dataset name -> {image id: path}`` for the data sets of ``spec`` (loaded on demand)."""
    from certood.monitor import load_dataset

    cache: dict[str, dict[int, Path]] = {}

    def paths(name: str) -> dict[int, Path]:
        if name not in cache:
            source = spec.data.id_test if name == "id_test" else spec.data.ood[name.split("/", 1)[1]]
            cache[name] = {r.image_id: r.path for r in load_dataset(source, name).records}
        return cache[name]

    return paths


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.6em 0 1.4em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
code{background:#f3f3f3;padding:0 3px}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:0.85em;color:#555;max-width:560px}img{max-width:100%;border:1px solid #ddd}
.issues li{font-family:monospace;font-size:0.85em}
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, digits: int = 3) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else \
        (f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}")


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(metrics: Mapping, figures: list[tuple[Plot, bytes]]) -> str:
    """The whole report as one HTML document; figures are embedded as base64 PNG."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>certood check report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>certood check report</h1>",
             f"<p>Spec: <code>{_esc(metrics.get('spec'))}</code><br>Spec fingerprint: "
             f"<code>{_esc(str(metrics.get('spec_fingerprint', ''))[:16])}</code>, detector sha256: "
             f"<code>{_esc(str(metrics.get('detector_sha256', ''))[:16])}</code></p>",
             f"<p>Protocol: {_esc(metrics.get('protocol', ''))}.</p>"]
    id_test = metrics.get("id_test")
    if id_test:
        parts += ["<h2>ID detection quality</h2>", _table(
            ["mAP", "mAP50", "mAP75", "images", "monitored boxes"],
            [[_num(id_test.get("map")), _num(id_test.get("map50")), _num(id_test.get("map75")),
              _num(id_test.get("n_images")), _num(id_test.get("n_boxes"))]])]
    rows = []
    for set_name, entry in (metrics.get("ood") or {}).items():
        if "skipped" in entry:
            rows.append([set_name, "(skipped)", entry["skipped"], "", "", "", "", "", ""])
        for score_name, m in entry.get("scores", {}).items():
            rows.append([set_name, score_name] + [_num(m.get(k)) for k in
                                                  ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_first")]
                        + [_num(m.get("n_id")), _num(m.get("n_ood"))])
    parts += ["<h2>OOD detection (box level)</h2>", _table(
        ["OOD set", "score", "AUROC", "AUPR-In", "AUPR-Out", "FPR95", "FPR95 (first)", "ID boxes",
         "OOD boxes"], rows)]
    rule_rows = [[k, _num(e["rule"].get("ood_flag_rate")), _num(e["rule"].get("id_tpr"))]
                 for k, e in (metrics.get("ood") or {}).items() if e.get("rule")]
    mon = metrics.get("monitor") or {}
    parts += ["<h2>Monitor</h2>", f"<p>Rule: <code>{_esc(mon.get('rule'))}</code><br>"
              f"Detector threshold: {_num(mon.get('detector_threshold'), 4)}</p>",
              _table(["score", "threshold"], [[k, _num(v, 4)] for k, v in (mon.get("thresholds") or {}).items()])]
    if rule_rows:
        parts.append(_table(["OOD set", "rule flags (OOD)", "rule keeps (ID)"], rule_rows))
    certs = metrics.get("certificates")
    if isinstance(certs, Mapping) and certs:
        counts = {k: verdict_counts(v) or {} for k, v in certs.items()}
        verdicts = list(dict.fromkeys(v for c in counts.values() for v in c))
        parts += ["<h2>Certificates</h2>", _table(["data set"] + verdicts,
                                                  [[k] + [_num(c.get(v)) for v in verdicts]
                                                   for k, c in counts.items()])]
    if figures:
        parts.append("<h2>Figures</h2>")
        for plot, png in figures:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(plot.title)}">'
                         f"<figcaption><b>{_esc(plot.title)}</b>. {_esc(plot.caption)}</figcaption></figure>")
    issues = metrics.get("issues") or []
    if issues:
        parts += [f"<h2>Issues ({len(issues)})</h2>", '<ul class="issues">']
        parts += [f"<li>{_esc(m)}</li>" for m in issues[:200]]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- driver
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _left_out(what: str, names: list[str], limit: int) -> str | None:
    """The issue naming what a figure limit left out (None when nothing was).

    >>> _left_out("score histograms", ["a", "b", "c"], 2)
    'plots: score histograms drawn for the first 2 of 3; not drawn: c'
    """
    rest = names[limit:]
    if not rest:
        return None
    shown = ", ".join(rest[:5]) + (f" and {len(rest) - 5:,} more" if len(rest) > 5 else "")
    return f"plots: {what} drawn for the first {limit} of {len(names):,}; not drawn: {shown}"


def _figure_jobs(metrics: Mapping, per_set: Mapping[str, Mapping],
                 image_paths: Callable[[str], Mapping[int, Path]] | None, issues: list[str]):
    """(Plot, zero-argument function returning a Figure or None) for every figure to draw,
    within the figure limits (what they leave out is appended to `issues`)."""
    thresholds = (metrics.get("monitor") or {}).get("thresholds") or {}
    id_part = per_set.get("id_test")
    ood_parts = {n.split("/", 1)[1]: p for n, p in per_set.items() if n.startswith("ood/")}
    score_names = list(thresholds) or sorted({k for p in per_set.values() for k in p["values"]})
    curve_names = score_names[:MAX_ROC_CURVES]
    issues.extend(m for m in (_left_out("ROC figures (OOD sets)", list(ood_parts), MAX_ROC_FIGURES),
                              _left_out("ROC curves (scores)", score_names, MAX_ROC_CURVES),
                              _left_out("score histograms", score_names, MAX_HISTOGRAMS)) if m)
    jobs = []
    for set_name, part in list(ood_parts.items())[:MAX_ROC_FIGURES]:
        # box protocol: against the ID test boxes; gt_matched: the set's own ID-matched boxes
        within = "id_values" in part
        id_values = part["id_values"] if within else (id_part["values"] if id_part is not None else None)
        if not len(part["dets"]) or id_values is None or not all(len(id_values[k]) for k in curve_names):
            continue
        aurocs = {k: m["auroc"] for k, m in ((metrics.get("ood") or {}).get(set_name, {})
                                              .get("scores", {})).items()}
        title = (f"ROC: ID-matched vs OOD-matched boxes of {set_name}" if within
                 else f"ROC: ID test vs OOD {set_name}")
        jobs.append((Plot(f"plots/roc_{_slug(set_name)}.png", title,
                          "Box level; a curve per score, OOD boxes positive."),
                     lambda s=set_name, i=id_values, p=part, a=aurocs: roc_figure(
                         s, {k: i[k] for k in curve_names}, {k: p["values"][k] for k in curve_names}, a)))
    for name in score_names[:MAX_HISTOGRAMS]:
        jobs.append((Plot(f"plots/hist_{_slug(name)}.png", f"Score histogram: {name}",
                          "ID test vs each OOD set; dashed: the threshold calibrated on ID boxes."),
                     lambda n=name: histogram_figure(
                         n, id_part["values"][n] if id_part is not None else None,
                         {k: p["values"][n] for k, p in ood_parts.items()}, thresholds.get(n))))
    certs = metrics.get("certificates")
    if isinstance(certs, Mapping) and certs:
        jobs.append((Plot("plots/certificates.png", "Certificate verdicts",
                          "certified_ood: the rule flags the whole region; certified_id: flags none of it."),
                     lambda: verdict_figure(certs)))
    example_scores = [n for n in score_names if any(n in p["values"] for p in per_set.values())]
    if any(len(p["dets"]) for p in per_set.values()):
        left = _left_out("example grids (scores)", example_scores, MAX_EXAMPLE_GRIDS)
        if left:
            issues.append(left)
        for name in example_scores[:MAX_EXAMPLE_GRIDS]:
            def examples(n=name):
                chosen = select_examples(per_set, n)
                if not chosen:
                    return None
                paths = image_paths or (lambda _: {})
                return examples_figure(_example_panels(chosen, n, per_set, paths, issues))
            jobs.append((Plot(f"plots/examples_{_slug(name)}.png", f"Examples by {name}: worst false alarms, "
                              "then worst misses",
                              f"Red boxes are flagged by the rule, green ones kept; the thick box is the example. "
                              f"Ranked by {name} alone: p = share of ID test boxes with {name} at or above the "
                              f"box's (false alarms: the ID boxes with the smallest p; misses: the OOD boxes "
                              f"with the largest p)."),
                         examples))
    return jobs


def write_visual_report(out_dir: Path, metrics: dict, per_set: Mapping[str, Mapping], spec=None, *,
                        image_paths: Callable[[str], Mapping[int, Path]] | None = None) -> list[Plot]:
    """Draw every figure into ``out_dir/plots`` and write ``out_dir/report.html``.

    ``per_set[name]`` holds ``dets`` (DatasetDetections), ``values`` (score -> [N]) and
    ``flags`` ([N] bool) for ``id_test`` and each ``ood/<name>``. Images for the example grid
    come from ``image_paths(name) -> {image id: path}``, or from ``spec``'s data sets.

    Records the figures written in ``metrics["plots"]`` (for report.md) and appends every
    failure to ``metrics["issues"]``; never raises for a figure that cannot be drawn.
    """
    from certood.artifacts import atomic_write_bytes, atomic_write_text

    out_dir = Path(out_dir)
    issues: list[str] = []
    if image_paths is None and spec is not None:
        image_paths = spec_image_paths(spec)
    written: list[tuple[Plot, bytes]] = []
    try:
        jobs = _figure_jobs(metrics, per_set, image_paths, issues)
    except Exception as e:  # noqa: BLE001 - plots never cost the check its other outputs
        jobs = []
        issues.append(f"plots: not drawn ({type(e).__name__}: {e})")
    for plot, draw in jobs:
        try:
            fig = draw()
            if fig is None:
                continue
            png = _png(fig)
            atomic_write_bytes(out_dir / plot.file, png)
            written.append((plot, png))
        except Exception as e:  # noqa: BLE001 - one failed figure is reported, the rest are drawn
            issues.append(f"plots: {plot.file} not drawn ({type(e).__name__}: {e})")
    metrics["plots"] = [p.to_dict() for p, _ in written]
    metrics.setdefault("issues", []).extend(issues)
    try:
        atomic_write_text(out_dir / "report.html", render_html(metrics, written))
    except Exception as e:  # noqa: BLE001
        metrics["issues"].append(f"plots: report.html not written ({type(e).__name__}: {e})")
    return [p for p, _ in written]
