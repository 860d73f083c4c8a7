"""Box-level OOD metrics, detection matching and COCO mAP.

Convention (used everywhere in certood): an OOD score is **higher = more OOD**. The box-level
metrics follow the published detection-OOD code (Hendrycks et al.'s outlier-exposure
``get_measures``, reused by VOS): **ID is the positive class** and its confidence is
``-score``. So

- ``auroc``: P(an OOD box scores higher than an ID box), ties count one half;
- ``aupr_in``: average precision with ID boxes positive (confidence ``-score``);
- ``aupr_out``: average precision with OOD boxes positive (confidence ``score``);
- ``fpr_at_tpr``: the fraction of OOD boxes accepted as ID (``score <= cutoff``) at the cutoff
  where 95% of ID boxes are accepted. Two conventions: ``"nearest"`` reproduces the published
  ``fpr_and_fdr_at_recall`` (the cutoff whose ID recall is nearest to 0.95, scanning from the
  loosest full-recall cutoff down, so equal distances go to the looser cutoff) and is what the
  published tables report; ``"first"`` takes the strictest cutoff whose ID recall is >= 0.95.

Inputs may be numpy arrays, torch tensors or lists; results are python floats or numpy arrays.
Bad input raises :class:`certood.errors.CertoodError` saying what was expected and found.

>>> round(auroc([0.1, 0.2, 0.3], [0.25, 0.9]), 4)
0.8333
"""
from __future__ import annotations

import contextlib
import copy
import io
import numbers
from typing import Any, Callable

import numpy as np

from certood.errors import CertoodError, DataError

__all__ = [
    "auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "ood_metrics", "bootstrap_ci", "bootstrap_diff_ci",
    "box_iou", "match_detections", "match_to_any_class", "f1_optimal_threshold", "coco_map",
    "GT_MATCH", "gt_match_status", "gt_matched_metrics",
]

FPR_CONVENTIONS = ("nearest", "first")


# --------------------------------------------------------------------------- input checks
def _as_array(x: Any, name: str, ndim: int | None = 1, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise CertoodError(f"{name}: expected numbers, found {type(x).__name__} ({e})") from None
    if ndim == 1 and arr.ndim == 0:
        arr = arr.reshape(1)
    if ndim is not None and arr.ndim != ndim:
        raise CertoodError(f"{name}: expected a {ndim}-D array, found shape {tuple(arr.shape)}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise CertoodError(f"{name}: expected no NaN, found {int(np.isnan(arr).sum())} NaN values")
    return arr


def _scores(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    s_id, s_ood = _as_array(id_scores, "id_scores"), _as_array(ood_scores, "ood_scores")
    for name, s in (("id_scores", s_id), ("ood_scores", s_ood)):
        if s.size == 0:
            raise CertoodError(f"{name}: expected at least one box, found 0")
    return s_id, s_ood


def _boxes(x: Any, name: str) -> np.ndarray:
    b = _as_array(x, name, ndim=None)
    b = b.reshape(0, 4) if b.size == 0 else b
    if b.ndim != 2 or b.shape[1] != 4:
        raise CertoodError(f"{name}: expected shape [N, 4] (x1, y1, x2, y2), "
                           f"found {tuple(b.shape)}")
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CertoodError(f"{name}: expected xyxy boxes with x2 >= x1 and y2 >= y1, "
                           f"found {b[i].tolist()} at row {i} ({int(bad.sum())} such rows)")
    return b


def _check_fraction(x: Any, name: str, lo_open: bool = True) -> float:
    number = isinstance(x, numbers.Real) and not isinstance(x, bool)
    if not (number and (0 < x <= 1 if lo_open else 0 <= x <= 1)):
        interval = "(0, 1]" if lo_open else "[0, 1]"
        raise CertoodError(f"{name}: expected a number in {interval}, found {x!r}")
    return float(x)


def _same_length(n: int, name_n: str, x: np.ndarray, name: str) -> None:
    if len(x) != n:
        raise CertoodError(f"{name}: expected {n} entries (one per {name_n}), found {len(x)}")


# --------------------------------------------------------------------------- OOD metrics
def _auroc(s_id: np.ndarray, s_ood: np.ndarray) -> float:
    # Mann-Whitney: count, for every ID box, OOD boxes scoring above it (ties count 1/2).
    s = np.sort(s_ood)
    right = np.searchsorted(s, s_id, side="right")
    left = np.searchsorted(s, s_id, side="left")
    above = (len(s) - right).sum(dtype=np.float64)
    ties = (right - left).sum(dtype=np.float64)
    return float((above + 0.5 * ties) / (len(s_id) * len(s_ood)))


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    # AP = sum_k (R_k - R_{k-1}) P_k over distinct confidence cutoffs, highest first.
    cut = np.unique(np.concatenate([pos, neg]))[::-1]
    tp = len(pos) - np.searchsorted(np.sort(pos), cut, side="left")
    fp = len(neg) - np.searchsorted(np.sort(neg), cut, side="left")
    precision = tp / (tp + fp)
    recall_gain = np.diff(np.concatenate([[0], tp])) / len(pos)
    return float(np.sum(recall_gain * precision))


def _fpr(s_id: np.ndarray, s_ood: np.ndarray, tpr: float, convention: str) -> float:
    # Cutoffs t over distinct scores, loosest last; a box is accepted as ID if score <= t.
    cut = np.unique(np.concatenate([s_id, s_ood]))
    tp = np.searchsorted(np.sort(s_id), cut, side="right").astype(np.float64)
    fp = np.searchsorted(np.sort(s_ood), cut, side="right")
    recall = tp / tp[-1]
    if convention == "first":
        i = int(np.argmax(recall >= tpr))
    else:  # published: only up to the first full-recall cutoff; ties -> looser cutoff
        k = int(np.argmax(tp == tp[-1]))
        dist = np.abs(recall[: k + 1] - tpr)
        i = int(np.flatnonzero(dist == dist.min())[-1])
    return float(fp[i] / len(s_ood))


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """Area under the ROC curve of ID-vs-OOD; 1.0 when every OOD box scores above every ID box.

    >>> auroc([0.1, 0.2], [0.3, 0.2])
    0.875
    """
    return _auroc(*_scores(id_scores, ood_scores))


def aupr_in(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with ID boxes as positives (confidence ``-score``).

    >>> aupr_in([0.1, 0.2], [0.3, 0.4])
    1.0
    """
    s_id, s_ood = _scores(id_scores, ood_scores)
    return _average_precision(-s_id, -s_ood)


def aupr_out(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with OOD boxes as positives (confidence ``score``).

    >>> aupr_out([0.1, 0.2], [0.3, 0.4])
    1.0
    """
    s_id, s_ood = _scores(id_scores, ood_scores)
    return _average_precision(s_ood, s_id)


def fpr_at_tpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95,
               convention: str = "nearest") -> float:
    """Fraction of OOD boxes accepted as ID at the cutoff keeping ``tpr`` of the ID boxes.

    ``convention``: ``"nearest"`` (published ``fpr_and_fdr_at_recall``) or ``"first"``
    (strictest cutoff with ID recall >= ``tpr``); see the module docstring.

    >>> fpr_at_tpr([1, 2, 3, 4], [2.5, 5], tpr=0.75)
    0.5
    """
    if convention not in FPR_CONVENTIONS:
        raise CertoodError(f"convention: expected one of {', '.join(FPR_CONVENTIONS)}, "
                           f"found {convention!r}")
    tpr = _check_fraction(tpr, "tpr")
    return _fpr(*_scores(id_scores, ood_scores), tpr, convention)


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": _auroc,
    "aupr_in": lambda i, o: _average_precision(-i, -o),
    "aupr_out": lambda i, o: _average_precision(o, i),
    "fpr95": lambda i, o: _fpr(i, o, 0.95, "nearest"),
    "fpr95_first": lambda i, o: _fpr(i, o, 0.95, "first"),
}


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float | int]:
    """All box-level metrics at once.

    >>> m = ood_metrics([0.1, 0.2, 0.3], [0.25, 0.9])
    >>> sorted(m), m["n_ood"]
    (['aupr_in', 'aupr_out', 'auroc', 'fpr95', 'fpr95_first', 'n_id', 'n_ood'], 2)
    """
    s_id, s_ood = _scores(id_scores, ood_scores)
    out: dict[str, float | int] = {k: f(s_id, s_ood) for k, f in _METRICS.items()}
    out.update(n_id=len(s_id), n_ood=len(s_ood))
    return out


def bootstrap_ci(id_scores: Any, ood_scores: Any, id_groups: Any, ood_groups: Any,
                 metric: str = "auroc", n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric``, resampling groups (images), not boxes.

    Boxes of one image are correlated, so each replicate draws images with replacement from
    the union of ``id_groups`` and ``ood_groups`` (an image may hold ID and OOD boxes) and
    keeps all their boxes. Replicates without ID or without OOD boxes are skipped.

    >>> lo, hi = bootstrap_ci([.1, .2, .3, .4], [.35, .5, .6], [0, 0, 1, 2], [3, 3, 4], n_boot=200)
    >>> 0 <= lo <= hi <= 1
    True
    """
    s_id, s_ood = _scores(id_scores, ood_scores)
    stats = _bootstrap_stats([(s_id, s_ood)], id_groups, ood_groups, metric, n_boot, level, seed)
    lo, hi = np.quantile(stats[:, 0], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_diff_ci(id_a: Any, ood_a: Any, id_b: Any, ood_b: Any, id_groups: Any, ood_groups: Any,
                      metric: str = "auroc", n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Paired percentile bootstrap interval of ``metric(a) - metric(b)``: two scores of the
    same boxes, each replicate drawing the same images for both (as :func:`bootstrap_ci`, whose
    replicates it reproduces for the same ``seed``). An interval above 0 says score ``a`` has
    the higher metric beyond resampling noise; it is narrower than comparing two separate
    intervals, because image difficulty is shared.

    >>> lo, hi = bootstrap_diff_ci([.1, .2, .3], [.9, .8], [.3, .2, .1], [.15, .25],
    ...                            [0, 1, 2], [3, 4], n_boot=200)
    >>> 0 <= lo <= hi <= 1
    True
    """
    pairs = [_scores(id_a, ood_a), _scores(id_b, ood_b)]
    if len(pairs[0][0]) != len(pairs[1][0]) or len(pairs[0][1]) != len(pairs[1][1]):
        raise CertoodError(f"bootstrap_diff_ci: expected two scores of the same boxes, found "
                           f"{len(pairs[0][0])}/{len(pairs[0][1])} and {len(pairs[1][0])}/{len(pairs[1][1])} "
                           "ID/OOD boxes")
    stats = _bootstrap_stats(pairs, id_groups, ood_groups, metric, n_boot, level, seed)
    lo, hi = np.quantile(stats[:, 0] - stats[:, 1], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _bootstrap_stats(pairs: list[tuple[np.ndarray, np.ndarray]], id_groups: Any, ood_groups: Any,
                     metric: str, n_boot: int, level: float, seed: int) -> np.ndarray:
    """``[replicates, len(pairs)]``: ``metric`` of each (ID, OOD) score pair on the same draws."""
    if metric not in _METRICS:
        raise CertoodError(f"metric: expected one of {', '.join(_METRICS)}, found {metric!r}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise CertoodError(f"n_boot: expected a positive integer, found {n_boot!r}")
    if not (isinstance(level, numbers.Real) and 0 < level < 1):
        raise CertoodError(f"level: expected a number in (0, 1), found {level!r}")
    n_id, n_ood = len(pairs[0][0]), len(pairs[0][1])
    g_id, g_ood = (np.asarray(g.detach().cpu() if hasattr(g, "detach") else g).reshape(-1)
                   for g in (id_groups, ood_groups))
    _same_length(n_id, "ID score", g_id, "id_groups")
    _same_length(n_ood, "OOD score", g_ood, "ood_groups")
    try:
        uniq, inv = np.unique(np.concatenate([g_id, g_ood]), return_inverse=True)
    except TypeError as e:
        raise CertoodError(f"id_groups/ood_groups: expected comparable ids of one type, "
                           f"found mixed ids ({e})") from None
    inv_id, inv_ood = inv[:n_id], inv[n_id:]
    rng = np.random.default_rng(seed)
    fn, stats = _METRICS[metric], []
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
        w_id, w_ood = counts[inv_id], counts[inv_ood]
        if w_id.sum() and w_ood.sum():
            stats.append([fn(np.repeat(s_id, w_id), np.repeat(s_ood, w_ood)) for s_id, s_ood in pairs])
    if len(stats) < max(1, n_boot // 2):
        raise CertoodError(f"bootstrap: expected most replicates to hold both ID and OOD boxes, "
                           f"found {len(stats)} of {n_boot} ({len(uniq)} groups)")
    return np.asarray(stats, dtype=np.float64)


# --------------------------------------------------------------------------- matching
def box_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, ``[N, 4] x [M, 4] -> [N, M]``; two empty boxes give 0.

    >>> box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2], [5, 5, 6, 6]]).round(4).tolist()
    [[0.3333, 0.0]]
    """
    a, b = _boxes(a, "boxes a"), _boxes(b, "boxes b")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (np.minimum(a[:, None, 2:], b[None, :, 2:])
          - np.maximum(a[:, None, :2], b[None, :, :2])).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _labels(x: Any, name: str, n: int, n_name: str) -> np.ndarray:
    lab = _as_array(x, name, dtype=np.float64)
    if not np.all(lab == np.round(lab)):
        raise CertoodError(f"{name}: expected integer class ids, "
                           f"found {lab[lab != np.round(lab)][:3].tolist()}")
    _same_length(n, n_name, lab, name)
    return lab.astype(np.int64)


def match_detections(pred_boxes: Any, pred_scores: Any, pred_labels: Any, gt_boxes: Any,
                     gt_labels: Any, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """COCO-style greedy matching of one image's detections to its ground truth.

    Detections are visited by descending score (stable for ties); each takes the unmatched
    ground-truth box of the same label with the highest IoU >= ``iou`` (lowest index on ties).
    Returns ``(is_tp bool[N], gt_index int[N])``, ``gt_index`` -1 when unmatched.

    >>> match_detections([[0, 0, 2, 2], [0, 0, 2, 2]], [0.6, 0.9], [1, 1], [[0, 0, 2, 2]], [1])
    (array([False,  True]), array([-1,  0]))
    """
    iou = _check_fraction(iou, "iou", lo_open=False)
    pb, gb = _boxes(pred_boxes, "pred_boxes"), _boxes(gt_boxes, "gt_boxes")
    ps = _as_array(pred_scores, "pred_scores")
    _same_length(len(pb), "pred box", ps, "pred_scores")
    pl = _labels(pred_labels, "pred_labels", len(pb), "pred box")
    gl = _labels(gt_labels, "gt_labels", len(gb), "gt box")
    ious = box_iou(pb, gb)
    gt_index = np.full(len(pb), -1, dtype=np.int64)
    taken = np.zeros(len(gb), dtype=bool)
    for i in np.argsort(-ps, kind="mergesort"):
        cand = np.where((gl == pl[i]) & ~taken & (ious[i] >= iou), ious[i], -1.0)
        if len(cand) and cand.max() >= 0:
            j = int(np.argmax(cand))
            gt_index[i], taken[j] = j, True
    return gt_index >= 0, gt_index


def match_to_any_class(pred_boxes: Any, gt_boxes: Any, gt_labels: Any,
                       iou: float = 0.5) -> np.ndarray:
    """Label of the best-IoU ground-truth box of any class per detection, -1 below ``iou``.

    Not one-to-one: used to label detections for fitting class-conditional scores.

    >>> match_to_any_class([[0, 0, 2, 2], [5, 5, 6, 6]], [[0, 0, 2, 3]], [4]).tolist()
    [4, -1]
    """
    iou = _check_fraction(iou, "iou", lo_open=False)
    pb, gb = _boxes(pred_boxes, "pred_boxes"), _boxes(gt_boxes, "gt_boxes")
    gl = _labels(gt_labels, "gt_labels", len(gb), "gt box")
    out = np.full(len(pb), -1, dtype=np.int64)
    if len(gb) and len(pb):
        ious = box_iou(pb, gb)
        best = ious.argmax(axis=1)
        ok = ious[np.arange(len(pb)), best] >= iou
        out[ok] = gl[best[ok]]
    return out


# --------------------------------------------------------------------------- GT-matched protocol
# Per-box status under the ground-truth-matched protocol (gt_match_status's codes).
GT_MATCH = {"unmatched": 0, "id": 1, "ood": 2}


def gt_match_status(pred_boxes: Any, gt_boxes: Any, gt_known: Any, iou: float = 0.5) -> np.ndarray:
    """Status of each detection under the ground-truth-matched protocol, as ``GT_MATCH`` codes.

    A detection takes the ground-truth object it overlaps most (any class, known or not). With
    IoU >= ``iou`` it is **ID** (code 1) if that object's category is one of the ID categories
    (``gt_known`` True), **OOD** (code 2) if it is an unknown-class object; below ``iou`` it
    is **unmatched** (code 0: background or a poorly localised box), which the protocol leaves
    out of the OOD metrics and only counts. Not one-to-one: every box the detector puts on an
    object counts, as in the box-level protocol (a detector may put several labels on one
    object). Ties in IoU go to the lowest-index object.

    >>> gt_match_status([[0, 0, 2, 2], [5, 5, 7, 7], [9, 9, 10, 10]],
    ...                 [[0, 0, 2, 2], [5, 5, 7, 8]], [True, False]).tolist()
    [1, 2, 0]
    """
    iou = _check_fraction(iou, "iou", lo_open=False)
    pb, gb = _boxes(pred_boxes, "pred_boxes"), _boxes(gt_boxes, "gt_boxes")
    known = _as_array(gt_known, "gt_known", dtype=bool)
    _same_length(len(gb), "gt box", known, "gt_known")
    out = np.full(len(pb), GT_MATCH["unmatched"], dtype=np.int64)
    if len(gb) and len(pb):
        ious = box_iou(pb, gb)
        best = ious.argmax(axis=1)
        ok = ious[np.arange(len(pb)), best] >= iou
        out[ok] = np.where(known[best[ok]], GT_MATCH["id"], GT_MATCH["ood"])
    return out


def gt_matched_metrics(scores: Any, status: Any) -> dict[str, Any]:
    """OOD metrics of one data set under the ground-truth-matched protocol.

    ID boxes are those matched to an ID object, OOD boxes those matched to an unknown-class
    object (``status`` from :func:`gt_match_status`); unmatched boxes are only counted. The
    metrics (as :func:`ood_metrics`) are ``None`` when either side has no box.

    >>> m = gt_matched_metrics([0.1, 0.9, 0.5, 0.2], [1, 2, 0, 1])
    >>> m["counts"], m["metrics"]["auroc"]
    ({'id_matched': 2, 'ood_matched': 1, 'unmatched': 1}, 1.0)
    """
    s = _as_array(scores, "scores")
    st = _as_array(status, "status", dtype=np.int64)
    _same_length(len(s), "score", st, "status")
    bad = ~np.isin(st, list(GT_MATCH.values()))
    if bad.any():
        raise CertoodError(f"status: expected codes {GT_MATCH}, found {sorted(set(st[bad].tolist()))[:5]}")
    is_id, is_ood = st == GT_MATCH["id"], st == GT_MATCH["ood"]
    counts = {"id_matched": int(is_id.sum()), "ood_matched": int(is_ood.sum()),
              "unmatched": int((st == GT_MATCH["unmatched"]).sum())}
    metrics = ood_metrics(s[is_id], s[is_ood]) if is_id.any() and is_ood.any() else None
    return {"counts": counts, "metrics": metrics}


def f1_optimal_threshold(det_scores: Any, is_tp: Any, n_gt: int) -> float:
    """Detector-score cutoff maximising F1 of the detections with ``score >= cutoff``.

    ``is_tp`` comes from :func:`match_detections` over all images and ``n_gt`` is the number
    of ground-truth boxes. F1 = 2 TP / (kept + n_gt); ties go to the highest cutoff. This is
    the VOS protocol's rule for which detections count as boxes.

    >>> f1_optimal_threshold([0.9, 0.8, 0.3], [True, True, False], n_gt=2)
    0.8
    """
    s = _as_array(det_scores, "det_scores")
    tp = _as_array(is_tp, "is_tp", dtype=bool)
    _same_length(len(s), "detection score", tp, "is_tp")
    if not (isinstance(n_gt, (int, np.integer)) and n_gt >= 1):
        raise CertoodError(f"n_gt: expected a positive number of ground-truth boxes, "
                           f"found {n_gt!r}")
    if int(tp.sum()) > n_gt:
        raise CertoodError(f"is_tp: expected at most n_gt={n_gt} true positives, "
                           f"found {int(tp.sum())}")
    if not tp.any():
        raise CertoodError(f"is_tp: expected at least one true positive among {len(s)} "
                           "detections, found none (F1 is 0 at every cutoff)")
    cut = np.unique(s)[::-1]  # highest first so argmax breaks ties towards it
    kept = len(s) - np.searchsorted(np.sort(s), cut, side="left")
    n_tp = int(tp.sum()) - np.searchsorted(np.sort(s[tp]), cut, side="left")
    f1 = 2.0 * n_tp / (kept + n_gt)
    return float(cut[int(np.argmax(f1))])


# --------------------------------------------------------------------------- COCO mAP
def coco_map(gt: Any, detections: list[dict], image_ids: Any = None) -> dict[str, float | int]:
    """COCO bbox mAP (IoU .50:.95), mAP50 and mAP75 through pycocotools' ``COCOeval``.

    ``gt`` is a COCO-format dict or a ``pycocotools.coco.COCO``; ``detections`` are dicts with
    ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` and ``score``. A ``gt`` dict and
    the detections are not modified (a ``COCO`` object gets pycocotools' usual ``ignore``
    keys). Annotations without ``area`` get ``w * h``. pycocotools' prints are swallowed. No
    detections gives zeros; pycocotools' -1 (no ground truth at all) is passed through.

    ``image_ids``: evaluate over these images only (``COCOeval.params.imgIds``), the ones the
    detector actually ran on; the ground truth of an image that could not be read must not
    count as missed. Default: every image of ``gt``. The result is the same as evaluating a
    ``gt`` reduced to those images.

    >>> gt = {"images": [{"id": 1}], "categories": [{"id": 1}],
    ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}]}
    >>> det = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.9}
    >>> round(coco_map(gt, [det])["map"], 6)
    1.0
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco(gt, COCO)
    evaluated = _evaluated_images(image_ids, coco_gt.getImgIds())
    dets = _coco_detections(detections, set(evaluated))
    out: dict[str, float | int] = {"map": 0.0, "map50": 0.0, "map75": 0.0,
                                   "n_images": len(evaluated),
                                   "n_detections": len(dets)}
    if not dets:
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType="bbox")
        ev.params.imgIds = evaluated
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out.update(map=float(ev.stats[0]), map50=float(ev.stats[1]), map75=float(ev.stats[2]))
    return out


def _evaluated_images(image_ids: Any, gt_ids: list) -> list:
    """The sorted image ids to evaluate: ``image_ids`` (each an image of the ground truth), or all."""
    if image_ids is None:
        return sorted(gt_ids)
    known = set(gt_ids)
    ids = sorted({int(i) for i in (image_ids.tolist() if hasattr(image_ids, "tolist") else image_ids)})
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DataError(f"image_ids: expected image ids of the ground truth, found {len(unknown)} others "
                        f"(first {unknown[:5]})")
    return ids


def _coco(gt: Any, COCO: type) -> Any:
    if isinstance(gt, COCO):
        return gt
    if not isinstance(gt, dict):
        raise DataError(f"gt: expected a COCO-format dict or pycocotools COCO, "
                        f"found {type(gt).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise DataError(f"gt: expected COCO keys images, annotations, categories; "
                        f"missing {missing}")
    data = copy.deepcopy(gt)  # COCOeval writes 'ignore' into annotations
    for i, ann in enumerate(data["annotations"]):
        if not {"id", "image_id", "category_id", "bbox"} <= set(ann):
            raise DataError(f"gt.annotations[{i}]: expected keys id, image_id, category_id, "
                            f"bbox; found {sorted(ann)}")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))  # bbox-only sets
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_detections(detections: Any, image_ids: set) -> list[dict]:
    if not isinstance(detections, (list, tuple)):
        raise DataError(f"detections: expected a list of dicts, "
                        f"found {type(detections).__name__}")
    out = []
    for i, d in enumerate(detections):
        if not isinstance(d, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(d):
            found = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise DataError(f"detections[{i}]: expected a dict with image_id, category_id, "
                            f"bbox, score; found {found}")
        if d["image_id"] not in image_ids:
            raise DataError(f"detections[{i}].image_id: expected an image id of the ground "
                            f"truth (of the images evaluated), found {d['image_id']!r}")
        if len(d["bbox"]) != 4:
            raise DataError(f"detections[{i}].bbox: expected [x, y, w, h], found {d['bbox']!r}")
        out.append({"image_id": d["image_id"], "category_id": d["category_id"],
                    "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])})
    return out
