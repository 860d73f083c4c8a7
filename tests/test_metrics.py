"""certood.metrics against references: scikit-learn, the published FPR95 code, pycocotools."""
from __future__ import annotations

import contextlib
import copy
import doctest
import io

import numpy as np
import pytest
import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import certood.metrics as M
from certood.errors import CertoodError


def published_fpr_at_recall(y_true, y_score, recall_level=0.95):
    """Step-by-step restatement of ``fpr_and_fdr_at_recall`` (hendrycks/outlier-exposure,
    utils/display_results.py; reused by VOS): distinct cutoffs in stable descending order, curve
    cut at the first full-recall cutoff and read backwards with a (recall 1, fp 0) point
    appended, then argmin |recall - level| (first hit wins)."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order] == 1
    idx = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[idx]
    fps = 1 + idx - tps
    recall = tps / tps[-1]
    last = tps.searchsorted(tps[-1])
    recall, fps = np.r_[recall[last::-1], 1], np.r_[fps[last::-1], 0]
    return fps[np.argmin(np.abs(recall - recall_level))] / np.sum(~y_true)


def reference_views(s_id, s_ood):
    """Hendrycks/VOS layout: ID positive (label 1) with confidence -score."""
    y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
    return y, -np.r_[s_id, s_ood]


def random_case(seed, ties):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(1, 300, size=2)
    s_id, s_ood = rng.normal(0, 1, n_id), rng.normal(rng.uniform(0, 2), 1.5, n_ood)
    if ties:  # few distinct values: ties within and across the two sets
        s_id, s_ood = np.round(s_id, 0), np.round(s_ood, 0)
    return s_id, s_ood


CASES = [(seed, ties) for seed in range(25) for ties in (False, True)]


@pytest.mark.parametrize("seed,ties", CASES)
def test_auroc_and_aupr_match_sklearn(seed, ties):
    s_id, s_ood = random_case(seed, ties)
    y, conf = reference_views(s_id, s_ood)
    assert M.auroc(s_id, s_ood) == pytest.approx(roc_auc_score(y, conf), abs=1e-12)
    assert M.aupr_in(s_id, s_ood) == pytest.approx(average_precision_score(y, conf), abs=1e-12)
    ref_out = average_precision_score(1 - y, -conf)  # OOD positive, confidence = score
    assert M.aupr_out(s_id, s_ood) == pytest.approx(ref_out, abs=1e-12)


@pytest.mark.parametrize("seed,ties", CASES)
@pytest.mark.parametrize("tpr", [0.95, 0.8, 0.5])
def test_fpr_nearest_matches_published_code(seed, ties, tpr):
    s_id, s_ood = random_case(seed, ties)
    y, conf = reference_views(s_id, s_ood)
    assert M.fpr_at_tpr(s_id, s_ood, tpr) == published_fpr_at_recall(y, conf, tpr)


@pytest.mark.parametrize("seed,ties", CASES)
@pytest.mark.parametrize("tpr", [0.95, 0.8, 0.5])
def test_fpr_first_matches_sklearn_roc_curve(seed, ties, tpr):
    s_id, s_ood = random_case(seed, ties)
    fpr, tpr_curve, _ = roc_curve(*reference_views(s_id, s_ood), drop_intermediate=False)
    expected = fpr[np.searchsorted(tpr_curve, tpr, side="left")]
    assert M.fpr_at_tpr(s_id, s_ood, tpr, convention="first") == pytest.approx(expected, abs=1e-15)


def test_fpr_conventions_differ_by_hand():
    # ID 1..10, OOD {10, 20}: cutoff 9 keeps 90% ID and no OOD, cutoff 10 keeps all ID and one
    # OOD. |0.9 - 0.95| < |1.0 - 0.95| in floating point, so "nearest" reads cutoff 9.
    s_id, s_ood = np.arange(1, 11), np.array([10, 20])
    assert M.fpr_at_tpr(s_id, s_ood) == 0.0
    assert M.fpr_at_tpr(s_id, s_ood, convention="first") == 0.5
    # equal recall at several cutoffs: the published code takes the loosest one (ID 1..10,
    # OOD 9.2 and 9.7 both between the 9th and 10th ID box) -> both OOD boxes accepted.
    assert M.fpr_at_tpr(s_id, [9.2, 9.7, 30]) == pytest.approx(2 / 3)


def test_tiny_hand_cases():
    assert M.auroc([0, 1], [2, 3]) == 1.0 and M.auroc([2, 3], [0, 1]) == 0.0
    assert M.auroc([1, 1], [1]) == 0.5  # all tied
    assert M.auroc([0.1, 0.2], [0.3, 0.2]) == 0.875  # 3 wins + 1 tie of 4 pairs
    assert M.fpr_at_tpr([0, 1], [2, 3]) == 0.0 and M.fpr_at_tpr([2, 3], [0, 1]) == 1.0
    assert M.aupr_in([0, 1], [2, 3]) == 1.0 and M.aupr_out([0, 1], [2, 3]) == 1.0
    # ID positive, order by -score: ID(0.1), OOD(0.2), ID(0.3) -> AP = 1/2 * 1 + 1/2 * 2/3
    assert M.aupr_in([0.1, 0.3], [0.2]) == pytest.approx(0.5 + 1 / 3)


def test_ood_metrics_dict_and_inputs():
    s_id, s_ood = random_case(3, False)
    m = M.ood_metrics(torch.tensor(s_id), list(s_ood))
    assert set(m) == {"auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_first", "n_id", "n_ood"}
    assert m["n_id"] == len(s_id) and m["n_ood"] == len(s_ood)
    assert m["auroc"] == M.auroc(s_id, s_ood) and m["fpr95"] == M.fpr_at_tpr(s_id, s_ood)
    assert m["fpr95_first"] == M.fpr_at_tpr(s_id, s_ood, convention="first")
    assert all(type(v) in (float, int) for v in m.values())


@pytest.mark.parametrize("args,match", [
    (([], [1.0]), "id_scores: expected at least one box, found 0"),
    (([1.0], []), "ood_scores: expected at least one box, found 0"),
    (([1.0, float("nan")], [1.0]), "NaN"),
    (([[1.0, 2.0]], [1.0]), r"expected a 1-D array, found shape \(1, 2\)"),
])
def test_ood_metrics_rejects_bad_input(args, match):
    with pytest.raises(CertoodError, match=match):
        M.ood_metrics(*args)


def test_fpr_rejects_bad_options():
    with pytest.raises(CertoodError, match="expected one of nearest, first, found 'last'"):
        M.fpr_at_tpr([1], [2], convention="last")
    with pytest.raises(CertoodError, match=r"tpr: expected a number in \(0, 1\]"):
        M.fpr_at_tpr([1], [2], tpr=95)


# --------------------------------------------------------------------------- bootstrap
def grouped_case(seed=0, n_groups=40, per_group=5):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per_group)
    image_shift = np.repeat(rng.normal(0, 1, n_groups), per_group)  # boxes of one image correlate
    s = image_shift + rng.normal(0, 0.3, len(groups))
    is_ood = np.repeat(np.arange(n_groups) % 2 == 1, per_group)
    s = s + 1.0 * is_ood
    return s[~is_ood], s[is_ood], groups[~is_ood], groups[is_ood]


def test_bootstrap_is_deterministic_and_contains_estimate():
    s_id, s_ood, g_id, g_ood = grouped_case()
    ci = M.bootstrap_ci(s_id, s_ood, g_id, g_ood, n_boot=300, seed=1)
    assert ci == M.bootstrap_ci(s_id, s_ood, g_id, g_ood, n_boot=300, seed=1)
    assert ci != M.bootstrap_ci(s_id, s_ood, g_id, g_ood, n_boot=300, seed=2)
    assert ci[0] < M.auroc(s_id, s_ood) < ci[1]
    lo, hi = M.bootstrap_ci(s_id, s_ood, g_id, g_ood, metric="fpr95", n_boot=300)
    assert 0 <= lo <= M.fpr_at_tpr(s_id, s_ood) <= hi <= 1


def test_bootstrap_resamples_groups_not_boxes():
    # Correlated boxes within an image: treating every box as its own group understates the
    # spread, so the image-level interval must be clearly wider.
    s_id, s_ood, g_id, g_ood = grouped_case()
    by_image = M.bootstrap_ci(s_id, s_ood, g_id, g_ood, n_boot=500)
    own_id, own_ood = np.arange(len(s_id)), 10_000 + np.arange(len(s_ood))
    by_box = M.bootstrap_ci(s_id, s_ood, own_id, own_ood, n_boot=500)
    assert by_image[1] - by_image[0] > 1.5 * (by_box[1] - by_box[0])
    # one group holding everything: every replicate is the original sample
    one = M.bootstrap_ci(s_id, s_ood, np.zeros(len(s_id)), np.zeros(len(s_ood)), n_boot=20)
    assert one[0] == pytest.approx(M.auroc(s_id, s_ood)) and one[1] == pytest.approx(one[0])


def test_bootstrap_accepts_string_groups_and_rejects_bad_input():
    lo, hi = M.bootstrap_ci([0.1, 0.2, 0.3], [0.5, 0.6], ["a", "a", "b"], ["c", "b"], n_boot=50)
    assert 0 <= lo <= hi <= 1
    with pytest.raises(CertoodError, match="metric: expected one of auroc"):
        M.bootstrap_ci([0.1], [0.2], [0], [1], metric="auc")
    with pytest.raises(CertoodError, match=r"id_groups: expected 2 entries \(one per ID score\)"):
        M.bootstrap_ci([0.1, 0.2], [0.3], [0], [1])


# --------------------------------------------------------------------------- boxes and matching
def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 3, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_box_iou_matches_torchvision():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 30), random_boxes(rng, 20)
    b[:5] = a[:5] + rng.normal(0, 2, (5, 4)).clip(-0.5, 0.5)  # some overlaps
    ref = torchvision.ops.box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(M.box_iou(a, b), ref, atol=1e-12)
    assert M.box_iou(a, np.zeros((0, 4))).shape == (30, 0)
    assert M.box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]]).tolist() == [[0.0]]  # empty boxes: 0, not NaN
    with pytest.raises(CertoodError, match="x2 >= x1"):
        M.box_iou([[2, 0, 1, 1]], [[0, 0, 1, 1]])
    with pytest.raises(CertoodError, match=r"expected shape \[N, 4\]"):
        M.box_iou([[0, 0, 1]], [[0, 0, 1, 1]])


def test_match_detections_hand_example():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    gt_labels = [1, 2]
    preds = [[0, 0, 10, 9],     # 0: IoU .9 with gt0, label 1, score .7 -> TP (gt0)
             [0, 0, 10, 10],    # 1: IoU 1 with gt0, label 1, score .6 -> FP: gt0 already taken by 0
             [20, 20, 30, 30],  # 2: perfect box for gt1 but label 1 -> FP (wrong class)
             [21, 21, 30, 30],  # 3: IoU .81 with gt1, label 2 -> TP (gt1)
             [50, 50, 60, 60]]  # 4: no overlap -> FP
    scores = [0.7, 0.6, 0.95, 0.5, 0.99]
    labels = [1, 1, 1, 2, 2]
    is_tp, idx = M.match_detections(preds, scores, labels, gt, gt_labels)
    assert is_tp.tolist() == [True, False, False, True, False]
    assert idx.tolist() == [0, -1, -1, 1, -1]
    # raising the IoU bar to .85 loses the .81 match only
    strict = M.match_detections(preds, scores, labels, gt, gt_labels, iou=0.85)[1]
    assert strict.tolist() == [0, -1, -1, -1, -1]
    is_tp, idx = M.match_detections(np.zeros((0, 4)), [], [], gt, gt_labels)
    assert is_tp.shape == (0,) and idx.shape == (0,)
    with pytest.raises(CertoodError, match=r"pred_scores: expected 5 entries \(one per pred box\)"):
        M.match_detections(preds, scores[:4], labels, gt, gt_labels)


@pytest.mark.parametrize("seed", range(5))
def test_match_detections_agrees_with_cocoeval(seed):
    rng = np.random.default_rng(seed)
    gt = random_boxes(rng, 8)
    gt_labels = rng.integers(1, 3, 8)
    pick = rng.integers(0, 8, 15)
    preds = gt[pick] + rng.normal(0, 3, (15, 4))
    preds[:, 2:] = np.maximum(preds[:, 2:], preds[:, :2] + 1)
    labels = np.where(rng.random(15) < 0.8, gt_labels[pick], 3 - gt_labels[pick])
    scores = rng.random(15)
    is_tp, _ = M.match_detections(preds, scores, labels, gt, gt_labels)

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    anns = [{"id": i + 1, "image_id": 1, "category_id": int(c), "bbox": xywh(b), "area": 1.0,
             "iscrowd": 0} for i, (b, c) in enumerate(zip(gt, gt_labels))]
    data = {"images": [{"id": 1}], "categories": [{"id": 1}, {"id": 2}], "annotations": anns}
    dets = [{"image_id": 1, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
            for b, c, s in zip(preds, labels, scores)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.evaluate()
    coco_tp = np.zeros(15, dtype=bool)
    for e in ev.evalImgs:
        if e is not None:
            for det_id, gt_id in zip(e["dtIds"], e["dtMatches"][0]):  # row 0: IoU 0.5
                coco_tp[det_id - 1] = gt_id > 0
    assert is_tp.tolist() == coco_tp.tolist()


def test_match_to_any_class_ignores_class():
    gt, gt_labels = [[0, 0, 10, 10], [20, 20, 30, 30]], [3, 4]
    preds = [[0, 0, 10, 9], [19, 19, 30, 30], [0, 0, 10, 10], [50, 50, 51, 51], [0, 0, 4, 10]]
    assert M.match_to_any_class(preds, gt, gt_labels).tolist() == [3, 4, 3, -1, -1]
    assert M.match_to_any_class(preds, np.zeros((0, 4)), []).tolist() == [-1] * 5
    no_preds = M.match_to_any_class(torch.zeros(0), torch.tensor(gt), torch.tensor(gt_labels))
    assert no_preds.shape == (0,)
    with pytest.raises(CertoodError, match=r"iou: expected a number in \[0, 1\], found 50"):
        M.match_to_any_class(preds, gt, gt_labels, iou=50)


# --------------------------------------------------------------------------- F1 threshold
@pytest.mark.parametrize("seed", range(10))
def test_f1_optimal_threshold_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    scores = np.round(rng.random(n), 1)  # ties
    is_tp = rng.random(n) < scores
    is_tp[0] = True
    n_gt = int(is_tp.sum() + rng.integers(0, 10))
    best, best_f1 = None, -1.0
    for c in sorted(set(scores), reverse=True):  # highest cutoff wins ties
        keep = scores >= c
        p, r = is_tp[keep].sum() / keep.sum(), is_tp[keep].sum() / n_gt
        f1 = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = c, f1
    assert M.f1_optimal_threshold(scores, is_tp, n_gt) == best


def test_f1_optimal_threshold_errors():
    with pytest.raises(CertoodError, match="found none"):
        M.f1_optimal_threshold([0.5], [False], 1)
    with pytest.raises(CertoodError, match="n_gt: expected a positive number"):
        M.f1_optimal_threshold([0.5], [True], 0)


# --------------------------------------------------------------------------- COCO mAP
def coco_case(seed=0, n_images=6):
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for img in range(1, n_images + 1):
        images.append({"id": img, "width": 128, "height": 128})
        for _ in range(int(rng.integers(1, 4))):
            (x, y), (w, h) = rng.uniform(0, 90, 2), rng.uniform(10, 38, 2)
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            noisy = [x + rng.normal(0, 3), y + rng.normal(0, 3), w * rng.uniform(0.8, 1.2), h]
            dets.append({"image_id": img, "category_id": cat if rng.random() < 0.8 else 4 - cat,
                         "bbox": noisy, "score": float(rng.random())})
        dets.append({"image_id": img, "category_id": 1, "bbox": [1.0, 1.0, 20.0, 20.0],
                     "score": 0.3})  # a false positive per image
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    return gt, dets


def test_coco_map_perfect_detections():
    gt, _ = coco_case()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in gt["annotations"]]
    m = M.coco_map(gt, perfect)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(1.0)
    assert m["n_images"] == 6 and m["n_detections"] == len(perfect)


def test_coco_map_matches_cocoeval_and_is_silent(capsys):
    gt, dets = coco_case(1, n_images=12)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    m = M.coco_map(gt, dets)
    assert capsys.readouterr().out == ""
    assert gt == gt_before and dets == dets_before  # inputs untouched
    assert (m["map"], m["map50"], m["map75"]) == _cocoeval_stats(gt, dets)
    assert 0 < m["map"] < m["map50"] < 1
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    assert M.coco_map(coco, dets)["map"] == m["map"]  # a COCO object works as well


def test_coco_map_empty_and_bad_input():
    gt, _ = coco_case()
    m = M.coco_map(gt, [])
    assert (m["map"], m["map50"], m["map75"], m["n_detections"]) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(CertoodError, match="image_id: expected an image id of the ground truth"):
        M.coco_map(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(CertoodError, match="missing"):
        M.coco_map({"images": []}, [])
    with pytest.raises(CertoodError, match=r"detections\[0\]: expected a dict with image_id"):
        M.coco_map(gt, [{"image_id": 1}])


def test_docstring_examples():
    assert doctest.testmod(M).failed == 0


def _cocoeval_stats(gt: dict, dets: list[dict]) -> tuple[float, float, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return tuple(float(v) for v in ev.stats[:3])


def test_coco_map_over_some_images_equals_cocoeval_on_the_reduced_set():
    # an image that could not be read leaves the evaluation: its ground truth is not a miss
    gt, dets = coco_case(2, n_images=8)
    read = [1, 2, 4, 5, 7, 8]
    m = M.coco_map(gt, [d for d in dets if d["image_id"] in read], image_ids=read)
    reduced = {**gt, "images": [im for im in gt["images"] if im["id"] in read],
               "annotations": [a for a in gt["annotations"] if a["image_id"] in read]}
    expected = _cocoeval_stats(reduced, [d for d in dets if d["image_id"] in read])
    assert (m["map"], m["map50"], m["map75"]) == pytest.approx(expected, abs=1e-12)
    assert m["n_images"] == 6
    everything = M.coco_map(gt, [d for d in dets if d["image_id"] in read])  # the old, wrong way
    assert everything["map50"] < m["map50"]  # the unread images' objects counted as misses
    with pytest.raises(CertoodError, match="image_ids: expected image ids of the ground truth"):
        M.coco_map(gt, dets, image_ids=[1, 99])
    with pytest.raises(CertoodError, match="of the images evaluated"):  # a detection on an unread image
        M.coco_map(gt, dets, image_ids=read)
