"""Box-jitter consistency OOD scores, judged ONLY on ID-derived proxy OOD sets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explore/jitter_candidates.py

For every kept detection (score >= the F1-optimal detector threshold on ``val``) the RoI feature
is re-pooled at K=8 jittered copies of its final box, from the detector's own backbone feature
map (computed once per image) with ``roi_heads.box_roi_pool``, then ``box_head`` and
``box_predictor.cls_score``. Jitter set at magnitude s (s=0.1 is the primary setting, s=0.2 a
sensitivity setting, both declared before any number was seen):

    x +- s*w, y +- s*h (4 shifts), scale 1-s and 1+s about the centre (2),
    aspect (w*(1+s), h*(1-s)) and (w*(1-s), h*(1+s)) about the centre (2); clipped to the image.

Data are the same as ``proxy_candidates.py``: ``train`` (600 images, fit), ``val`` (ID) and the
ID-derived proxies ``synth-chimera`` / ``synth-scrambled`` from ``select_fusion.py``. No other
split is loaded. Fusion = proxy_candidates.Fusion (class-conditional, out-of-fold, Fisher),
which that script checks against certood's PValueFusion.

Pre-declared rule: winner = highest mean AUROC over the two proxies among all variants; among
variants within 0.005 of the best, fewest components then fewest hyperparameters.
Jitter features are cached in /tmp/certood_explore/jitter.pt.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import proxy_candidates as pc  # noqa: E402
from proxy_candidates import (  # noqa: E402
    SYNTH, Comp, Energy, Fusion, PenMaha, RoiClassPCAResidual, RoiKNN, RoiResidual, extract_all,
    features, paired_delta_ci,
)

from certood.check import load_spec_detector  # noqa: E402
from certood.detectors.torchvision_frcnn import postprocess_with_rows, run_backbone, _resize_boxes  # noqa: E402
from certood.metrics import ood_metrics  # noqa: E402
from certood.monitor import load_dataset  # noqa: E402
from certood.scores.energy import energy_score  # noqa: E402
from certood.scores.mahalanobis import mahalanobis_score  # noqa: E402

OUT = Path("/tmp/certood_explore")
CACHE = OUT / "jitter.pt"
MAGS = (0.1, 0.2)
K = 8
SETS = ("fit", "val") + SYNTH


def jitter_boxes(b: torch.Tensor, s: float, size: tuple[int, int]) -> torch.Tensor:
    """[N, 4] xyxy -> [N, K, 4] jittered copies, clipped to the image (h, w)."""
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    # (dx in w, dy in h, w factor, h factor)
    table = [(s, 0, 1, 1), (-s, 0, 1, 1), (0, s, 1, 1), (0, -s, 1, 1),
             (0, 0, 1 - s, 1 - s), (0, 0, 1 + s, 1 + s), (0, 0, 1 + s, 1 - s), (0, 0, 1 - s, 1 + s)]
    out = []
    for dx, dy, fw, fh in table:
        ncx, ncy, nw, nh = cx + dx * w, cy + dy * h, w * fw, h * fh
        out.append(torch.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], 1))
    j = torch.stack(out, 1)
    H, W = size
    j[..., 0::2] = j[..., 0::2].clamp(0, W)
    j[..., 1::2] = j[..., 1::2].clamp(0, H)
    return j


def head(rh, features, boxes, image_sizes):
    """(penultimate, all logits) of boxes [M, 4] in one image's resized frame."""
    roi = rh.box_roi_pool(features, [boxes], image_sizes)
    pen = rh.box_head(roi)
    return roi.flatten(1), pen, rh.box_predictor.cls_score(pen)


def extract_jitter(data: dict) -> dict:
    if CACHE.exists():
        return torch.load(CACHE, weights_only=True)  # our own cache: tensors, numbers, strings
    torch.set_num_threads(1)
    spec = pc.proxy_spec("<jitter_candidates>")  # identical to proxy_candidates.extract_all
    detector = load_spec_detector(spec)
    assert detector.weights_sha256 == data["sha"]
    m = detector.model.eval()
    rh = m.roi_heads
    datasets = {"fit": load_dataset(spec.data.fit, "fit"), "val": load_dataset(spec.data.calibration, "calibration")}
    for s in SYNTH:
        datasets[s] = load_dataset(spec.data.ood[s], s)
    out = {"sets": {}, "timing": {}}
    for name in SETS:
        S = data["sets"][name]
        n = len(S["image_ids"])
        res = {"clog": torch.zeros(n, 6), "cpen": torch.zeros(n, 256),
               **{f"jlog{s}": torch.zeros(n, K, 6) for s in MAGS},
               **{f"jpen{s}": torch.zeros(n, K, 256) for s in MAGS},
               "prop_tap_diff": torch.zeros(n), "found": torch.zeros(n, dtype=torch.bool)}
        t_full, t_detect, t_jit, n_img, n_box = 0.0, 0.0, {s: 0.0 for s in MAGS}, 0, 0
        with torch.no_grad():
            for record, image in datasets[name].iter_images():
                rows = torch.nonzero(S["image_ids"] == record.image_id).flatten()
                if name != "val" and len(rows) == 0:
                    continue
                # the detector's full forward, batch 1 (stage by stage, as TorchvisionFasterRCNN.detect)
                t0 = time.perf_counter()
                batch, feats, orig = run_backbone(m, [image], "cpu")
                proposals, _ = m.rpn(batch, feats)
                roi = rh.box_roi_pool(feats, proposals, batch.image_sizes)
                pen = rh.box_head(roi)
                logits, reg = rh.box_predictor(pen)
                [(boxes, scores, labels, prow)] = postprocess_with_rows(rh, logits, reg, proposals, batch.image_sizes)
                t_full += time.perf_counter() - t0
                if name == "val":  # the adapter's own call, for the cost ratio
                    t0 = time.perf_counter()
                    detector.detect([image])
                    t_detect += time.perf_counter() - t0
                n_img += 1
                if len(rows) == 0:
                    continue
                ob = _resize_boxes(boxes, batch.image_sizes[0], orig[0])
                cb = S["boxes"][rows]
                d = (cb[:, None, :] - ob[None, :, :]).abs().amax(2)
                d[S["labels"][rows][:, None] != labels[None, :]] = float("inf")
                mi = d.argmin(1)
                ok = d[torch.arange(len(rows)), mi] < 1e-3
                res["found"][rows] = ok
                fb = boxes[mi]  # final boxes in the resized frame
                res["prop_tap_diff"][rows] = (roi.flatten(1)[prow[mi]] - S["roi"][rows]).abs().amax(1)
                _, cpen, clog = head(rh, feats, fb, batch.image_sizes)
                res["clog"][rows], res["cpen"][rows] = clog, cpen
                for s in MAGS:
                    jb = jitter_boxes(fb, s, batch.image_sizes[0]).reshape(-1, 4)
                    t0 = time.perf_counter()
                    _, jpen, jlog = head(rh, feats, jb, batch.image_sizes)
                    t_jit[s] += time.perf_counter() - t0
                    res[f"jlog{s}"][rows] = jlog.reshape(len(rows), K, 6)
                    res[f"jpen{s}"][rows] = jpen.reshape(len(rows), K, 256)
                n_box += len(rows)
        out["sets"][name] = res
        out["timing"][name] = {"full_forward_s": t_full, "detect_s": t_detect, "jitter_s": t_jit,
                               "n_images": n_img, "n_boxes": n_box}
        print(f"  {name}: {n_img} images, {n_box} boxes, found {int(res['found'].sum())}/{n}, "
              f"forward {1000 * t_full / n_img:.2f} ms/img, jitter(K={K}) "
              + ", ".join(f"s={s}: {1000 * t_jit[s] / max(n_box, 1):.3f} ms/box" for s in MAGS), flush=True)
    torch.save(out, CACHE)
    return out


# ---------------------------------------------------------------------------------------------
# jitter components (higher = more OOD); n_hyper = 2 (K and magnitude)
# ---------------------------------------------------------------------------------------------
def fgj(F, s):
    return F[f"jlog{s}"][..., 1:]


class JComp(Comp):
    n_hyper = 2

    def __init__(self, s):
        self.s = s


class JEnergyMean(JComp):
    def __init__(self, s, centre=False):
        super().__init__(s)
        self.centre = centre

    def score(self, F, parts):
        e = energy_score(fgj(F, self.s))  # [N, K]
        if self.centre:
            e = torch.cat([e, energy_score(F["clog"][:, 1:])[:, None]], 1)
        return e.mean(1)


class JEnergyStd(JComp):
    def score(self, F, parts):
        return energy_score(fgj(F, self.s)).std(1)


class JLogitStd(JComp):  # std of the detection's own class logit
    def score(self, F, parts):
        lab = F["lab"]
        z = fgj(F, self.s)[torch.arange(len(lab)), :, lab]
        return z.std(1)


class JKL(JComp):  # mean KL(p_det || p_jitter) over foreground softmax; p_det from the detection's logits
    def score(self, F, parts):
        lp = torch.log_softmax(F["fg"], 1)[:, None, :]
        lq = torch.log_softmax(fgj(F, self.s), 2)
        return (lp.exp() * (lp - lq)).sum(2).mean(1)


class JFlip(JComp):  # fraction of jitters whose foreground argmax differs from the detection's label
    def score(self, F, parts):
        return (fgj(F, self.s).argmax(2) != F["lab"][:, None]).double().mean(1)


class JMahaMean(JComp):  # mean penultimate Mahalanobis over jitters (Gaussians fit on the train taps)
    def fit(self, F, y):
        return PenMaha().fit(F, y)

    def score(self, F, parts):
        z = F[f"jpen{self.s}"]
        n = z.shape[0]
        return mahalanobis_score(z.reshape(n * K, -1), parts["means"], parts["prec"], parts["factor"]).reshape(n, K).mean(1)


def main() -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    data = extract_all()
    print(f"features ready; threshold {data['threshold']:.3f}", flush=True)
    jit = extract_jitter(data)
    print(f"jitter features ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    W, b, Wbox, bb = data["W"], data["b"], data["Wbox"], data["bbox_b"]
    Fs = {}
    for k in SETS:
        F = features(data["sets"][k], Wbox, bb, W, b)
        J = jit["sets"][k]
        assert bool(J["found"].all()), (k, int((~J["found"]).sum()))
        F["lab"] = data["sets"][k]["labels"].long() - 1
        F["clog"] = J["clog"].double()
        for s in MAGS:
            F[f"jlog{s}"] = J[f"jlog{s}"].double()
            F[f"jpen{s}"] = J[f"jpen{s}"].double()
        Fs[k] = F
    y = data["sets"]["fit"]["y"]
    groups = {k: v["image_ids"].numpy() for k, v in data["sets"].items()}
    Ffit = Fs["fit"]

    # ---- re-pooling checks ------------------------------------------------------------------
    chk = ["re-pooling checks (all sets together):"]
    diffs = torch.cat([jit["sets"][k]["prop_tap_diff"] for k in SETS])
    chk.append(f"  pooled at the proposal vs tapped box_head.input: max |diff| {diffs.max():.2e} (exact pipeline check)")
    lab = torch.cat([Fs[k]["lab"] for k in SETS])
    tapfg = torch.cat([Fs[k]["all_logits"][:, 1:] for k in SETS])
    cfg = torch.cat([Fs[k]["clog"][:, 1:] for k in SETS])
    agree_lab = float((cfg.argmax(1) == lab).double().mean())
    agree_tap = float((cfg.argmax(1) == tapfg.argmax(1)).double().mean())
    tap_vs_lab = float((tapfg.argmax(1) == lab).double().mean())
    ed = energy_score(cfg) - energy_score(tapfg)
    corr = float(np.corrcoef(energy_score(cfg).numpy(), energy_score(tapfg).numpy())[0, 1])
    rel = float(((cfg - tapfg).norm(dim=1) / tapfg.norm(dim=1)).median())
    chk += [f"  centre (final box) argmax == detection label: {agree_lab:.4f}; == tap argmax: {agree_tap:.4f} "
            f"(tap argmax == label: {tap_vs_lab:.4f})",
            f"  energy centre vs tap: corr {corr:.4f}, median |diff| {ed.abs().median():.3f}, "
            f"median relative logit-vector diff {rel:.3f}"]
    for k in SETS:
        c = Fs[k]["clog"][:, 1:].argmax(1) == Fs[k]["lab"]
        chk.append(f"    {k}: label agreement {float(c.double().mean()):.4f} (n={len(c)})")
    passed = bool(diffs.max() < 1e-4) and agree_lab >= 0.95
    chk.append(f"  check {'PASSED' if passed else 'FAILED'} (criterion: proposal re-pool exact to 1e-4 and "
               f">= 95% label agreement at the final box)")
    print("\n".join(chk), flush=True)

    # ---- components ---------------------------------------------------------------------------
    single = {"energy": Energy(), "pen_maha": PenMaha(), "roi_resid64": RoiResidual(64),
              "roi_knn10_pca128": RoiKNN(10, 128), "roi_knn10": RoiKNN(10), "roi_cls_resid32": RoiClassPCAResidual(32)}
    jnames = []
    for s in MAGS:
        for base, c in (("jE_mean", JEnergyMean(s)), ("jE_mean_c", JEnergyMean(s, True)), ("jE_std", JEnergyStd(s)),
                        ("jlogit_std", JLogitStd(s)), ("jKL", JKL(s)), ("jflip", JFlip(s)),
                        ("jmaha_mean", JMahaMean(s))):
            nm = f"{base}@{s}"
            single[nm] = c
            jnames.append(nm)
    fusions = {"em_fisher_cc": ["energy", "pen_maha"], "e+roi_resid64": ["energy", "roi_resid64"],
               "em+roi_knn10_pca128": ["energy", "pen_maha", "roi_knn10_pca128"],
               "em+roi_cls_resid32": ["energy", "pen_maha", "roi_cls_resid32"], "e+roi_knn10": ["energy", "roi_knn10"]}
    for nm in jnames:
        fusions[f"e+{nm}"] = ["energy", nm]
        fusions[f"em+{nm}"] = ["energy", "pen_maha", nm]
        fusions[f"e+roi_resid64+{nm}"] = ["energy", "roi_resid64", nm]
    for s in MAGS:  # jitter-averaged energy in place of energy
        fusions[f"jE_mean@{s}+pen_maha"] = [f"jE_mean@{s}", "pen_maha"]
        fusions[f"jE_mean@{s}+roi_resid64"] = [f"jE_mean@{s}", "roi_resid64"]
        fusions[f"jE_mean_c@{s}+pen_maha"] = [f"jE_mean_c@{s}", "pen_maha"]
        fusions[f"jE_mean_c@{s}+roi_resid64"] = [f"jE_mean_c@{s}", "roi_resid64"]

    results, allvals, ncomp, nhyp = {}, {}, {}, {}

    def record(name, vals, nc, nh):
        allvals[name] = {k: v.numpy() for k, v in vals.items()}
        results[name] = {s: ood_metrics(allvals[name]["val"], allvals[name][s]) for s in SYNTH}
        ncomp[name], nhyp[name] = nc, nh
        r = results[name]
        print(f"{name:44s} " + " ".join(f"{r[s]['auroc']:.3f}/{r[s]['fpr95']:.3f}" for s in SYNTH)
              + f"  mean {np.mean([r[s]['auroc'] for s in SYNTH]):.3f}", flush=True)

    for name, c in single.items():
        parts = c.fit(Ffit, y)
        record(name, {k: c.score(Fs[k], parts) for k in ("val",) + SYNTH}, 1, c.n_hyper)
    for name, comps in fusions.items():
        fu = Fusion([single[c] for c in comps]).fit(Ffit, y)
        record(name, {k: fu.score(Fs[k]) for k in ("val",) + SYNTH}, len(comps), sum(single[c].n_hyper for c in comps))

    mean = {k: float(np.mean([v[s]["auroc"] for s in SYNTH])) for k, v in results.items()}
    best = max(mean.values())
    close = [k for k in results if mean[k] >= best - 0.005]
    winner = min(close, key=lambda k: (ncomp[k], nhyp[k], -mean[k]))

    # ---- cost ---------------------------------------------------------------------------------
    T = jit["timing"]
    nimg = sum(T[k]["n_images"] for k in SETS)
    nbox = sum(T[k]["n_boxes"] for k in SETS)
    fwd_ms = 1000 * sum(T[k]["full_forward_s"] for k in SETS) / nimg
    det_ms = 1000 * T["val"]["detect_s"] / T["val"]["n_images"]
    cost = [f"cost (1 thread, batch 1, same run): detector full forward {fwd_ms:.2f} ms/image "
            f"(stage-by-stage, {nimg} images; adapter detect() on val: {det_ms:.2f} ms/image)"]
    bpi = T["val"]["n_boxes"] / T["val"]["n_images"]
    for s in MAGS:
        jb = 1000 * sum(T[k]["jitter_s"][s] for k in SETS) / nbox
        cost.append(f"  K={K} jitter re-pool + box head + cls_score (s={s}): {jb:.3f} ms/box "
                    f"= {jb / fwd_ms:.3f}x forward per box; at val's {bpi:.2f} kept boxes/image "
                    f"{jb * bpi / fwd_ms:.3f}x the forward per image")

    lines = ["| variant | chimera AUROC | scrambled AUROC | mean | chimera FPR95 | scrambled FPR95 | comps | hyper |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted(results, key=lambda k: -mean[k]):
        r = results[k]
        lines.append(f"| {k} | {r[SYNTH[0]]['auroc']:.3f} | {r[SYNTH[1]]['auroc']:.3f} | {mean[k]:.3f} | "
                     f"{r[SYNTH[0]]['fpr95']:.3f} | {r[SYNTH[1]]['fpr95']:.3f} | {ncomp[k]} | {nhyp[k]} |")
    lines += ["", f"best mean {best:.3f}; within 0.005: {close}", f"winner: {winner} = "
              + (" + ".join(fusions[winner]) if winner in fusions else winner), ""]
    lines.append("paired image-bootstrap 95% CI of AUROC(winner) - AUROC(ref) (1000 reps, val and proxy images resampled):")
    for ref in ("em_fisher_cc", "e+roi_resid64"):
        if ref == winner:
            continue
        ci = paired_delta_ci(allvals[winner], allvals[ref], groups)
        lines.append(f"  vs {ref}: " + ", ".join(
            f"{s} {results[winner][s]['auroc'] - results[ref][s]['auroc']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            for s, (lo, hi) in ci.items()))
    lines += ["", *chk, "", *cost, "", f"total {time.perf_counter() - t0:.0f}s"]
    print("\n".join(lines))
    results = HERE.parent / "results"
    lines.insert(0, "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explore/jitter_candidates.py` "
                    "(a screen on ID-only proxies; no OOD split is loaded)\n")
    (results / "screen_jitter_candidates.md").write_text("\n".join(lines) + "\n")
    (results / "screen_jitter_candidates.json").write_text(json.dumps(
        {"results": results, "mean": mean, "winner": winner, "close": close, "ncomp": ncomp, "nhyper": nhyp,
         "fusions": fusions, "timing": T, "check_passed": passed}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
