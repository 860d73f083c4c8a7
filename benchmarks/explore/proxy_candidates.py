"""Detection-specific OOD score candidates, judged ONLY on ID-derived proxy OOD sets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explore/proxy_candidates.py

Data: ``train`` (600 images, fit), ``val`` (ID boxes, detector threshold F1-optimal), and the two
synthetic proxies built by ``benchmarks/select_fusion.py`` from val digits (``synth-chimera``,
``synth-scrambled``). The held-out OOD splits of DigitsDet are never loaded.

Every candidate is scored alone (raw score) and fused with energy + mahalanobis(penultimate) by a
re-implementation of ``pvalue_fusion`` (5-fold out-of-fold reference scores on the fit boxes,
p-values conditioned on the predicted class, >= 50 reference boxes per class else pooled, Fisher).
The re-implementation is checked against ``certood.scores.PValueFusion`` (em_fisher_cc).

Pre-declared rule: winner = highest mean AUROC over the two proxies; among variants within 0.005
of the best, the simplest (fewest components, then fewest hyperparameters).
Features are cached in /tmp/certood_explore/feats.pt.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from select_fusion import SYNTH, write_synthetic  # noqa: E402

from certood.check import load_spec_detector  # noqa: E402
from certood.data.digitsdet import ensure_digitsdet  # noqa: E402
from certood.extract import extract_detections  # noqa: E402
from certood.metrics import ood_metrics  # noqa: E402
from certood.monitor import detector_threshold, id_label_map, load_dataset, match_dataset  # noqa: E402
from certood.scores import PValueFusion  # noqa: E402
from certood.scores.energy import energy_score  # noqa: E402
from certood.scores.knn import knn_score, l2_normalise  # noqa: E402
from certood.scores.mahalanobis import fit_class_gaussians, mahalanobis_score, precision_factor  # noqa: E402
from certood.spec import load_spec_text  # noqa: E402

CACHE = Path("/tmp/certood_explore/feats.pt")
RESULTS = HERE.parent / "results"
TAPS = ("box_head.input", "box_head.output", "cls_logits")
FOLDS, MIN_CLASS_BOXES, SEED = 5, 50, 0
torch.manual_seed(SEED)


# ---------------------------------------------------------------------------------------------
# extraction (train fit boxes with labels, val boxes, synth boxes), cached
# ---------------------------------------------------------------------------------------------
def proxy_spec(filename: str):
    """The exploration spec: the demo detector, train (fit), val and the two synthetic proxies."""
    root = ensure_digitsdet()
    synth = write_synthetic(root.parent / f"{root.name}-synthetic-ood-150", 150)
    return load_spec_text(json.dumps({
        "version": 1,
        "detector": {"kind": "torchvision", "arch": "digits_fasterrcnn", "weights": "builtin:digits_fasterrcnn",
                     "num_classes": 6, "min_size": 128, "max_size": 128},
        "data": {"fit": {"digitsdet": "train", "max_images": 600}, "calibration": {"digitsdet": "val"},
                 "ood": {s: {"annotations": str(synth / f"{s}.json"), "images": str(synth / s)} for s in SYNTH}},
        "taps": {"roi": "box_head.input", "penultimate": "box_head.output", "logits": "cls_logits"},
        "scores": {"energy": {"kind": "energy", "tap": "logits"}},
    }), filename=filename)


def extract_all() -> dict:
    if CACHE.exists():
        return torch.load(CACHE, weights_only=True)  # our own cache: tensors, numbers, strings
    spec = proxy_spec("<proxy_candidates>")
    detector = load_spec_detector(spec)
    cal_set = load_dataset(spec.data.calibration, "calibration")
    l2c = id_label_map(cal_set, detector.num_classes)
    cal = extract_detections(detector, cal_set, TAPS)
    thr = detector_threshold(spec, cal, cal_set, l2c)
    cal = cal.select(cal.det_scores >= thr)
    fit_set = load_dataset(spec.data.fit, "fit")
    fit = extract_detections(detector, fit_set, TAPS)
    fit = fit.select(fit.det_scores >= thr)
    y = match_dataset(fit, fit_set, l2c, same_class=False)
    fit = fit.select(y >= 0)
    y = y[y >= 0] - 1
    bp = detector.model.roi_heads.box_predictor
    out = {"threshold": float(thr), "sha": detector.weights_sha256,
           "W": bp.cls_score.weight.detach()[1:].clone(), "b": bp.cls_score.bias.detach()[1:].clone(),
           "Wbox": bp.bbox_pred.weight.detach().clone(), "bbox_b": bp.bbox_pred.bias.detach().clone(),
           "sets": {}}

    def pack(d, labels=None):
        r = {"roi": d.taps["box_head.input"].float().flatten(1), "pen": d.taps["box_head.output"].float(),
             "logits": d.taps["cls_logits"].float(), "boxes": d.boxes.float(), "labels": d.labels,
             "det_scores": d.det_scores.float(), "image_ids": d.image_ids}
        if labels is not None:
            r["y"] = labels
        return r
    out["sets"]["fit"] = pack(fit, y)
    out["sets"]["val"] = pack(cal)
    for s in SYNTH:
        ds = load_dataset(spec.data.ood[s], s)
        d = extract_detections(detector, ds, TAPS)
        out["sets"][s] = pack(d.select(d.det_scores >= thr))
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, CACHE)
    return out


# ---------------------------------------------------------------------------------------------
# component scores: fit(F, y) -> parts ; score(F, parts) -> [N] float64 (higher = more OOD)
# F is a dict of per-box float64 tensors: roi [N,3136], pen [N,256], fg logits [N,5], ...
# ---------------------------------------------------------------------------------------------
def pca(x: torch.Tensor, d: int):
    mu = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mu, full_matrices=False)
    return mu, vt[:d].T.contiguous()  # [D], [D, d]


def shrunk_gaussians(z, y, alpha):
    means, _ = fit_class_gaussians(z, y, int(y.max()) + 1)
    c = z - means[y]
    cov = c.T @ c / z.shape[0]
    cov = (1 - alpha) * cov + alpha * cov.diagonal().mean() * torch.eye(z.shape[1], dtype=z.dtype)
    prec = torch.linalg.inv(cov)
    return means, prec, precision_factor(prec)


def maha_on(z, parts):
    return mahalanobis_score(z, parts["means"], parts["prec"], parts["factor"])


def roi_pool(roi):  # channel-wise mean over the 7x7 grid -> [N, 64]
    return roi.reshape(roi.shape[0], 64, 49).mean(2)


class Comp:
    """A component: view(F) picks/derives the vector; fit/score work on the view."""
    n_hyper = 0

    def fit(self, F, y):
        return {}

    def score(self, F, parts):
        raise NotImplementedError


class Energy(Comp):
    def score(self, F, parts):
        return energy_score(F["fg"])


class PenMaha(Comp):  # == pvalue_fusion's mahalanobis component (pinv, no shrinkage)
    def fit(self, F, y):
        m, p = fit_class_gaussians(F["pen"], y, int(y.max()) + 1)
        return {"means": m, "prec": p, "factor": precision_factor(p)}

    def score(self, F, parts):
        return maha_on(F["pen"], parts)


class PenResidual(Comp):  # ViM residual on penultimate, D//2 directions (pvalue_fusion's residual)
    n_hyper = 1

    def fit(self, F, y):
        mu, v = pca(F["pen"], F["pen"].shape[1] // 2)
        return {"mu": mu, "v": v}

    def score(self, F, parts):
        c = F["pen"] - parts["mu"]
        return (c - (c @ parts["v"]) @ parts["v"].T).norm(dim=1)


class RoiMahaPCA(Comp):
    n_hyper = 2  # d, shrinkage

    def __init__(self, d, alpha=0.01, pooled=False):
        self.d, self.alpha, self.pooled = d, alpha, pooled

    def _x(self, F):
        return roi_pool(F["roi"]) if self.pooled else F["roi"]

    def fit(self, F, y):
        x = self._x(F)
        if self.d is None:
            mu, v = x.mean(0), None
            z = x - mu
        else:
            mu, v = pca(x, self.d)
            z = (x - mu) @ v
        m, p, f = shrunk_gaussians(z, y, self.alpha)
        return {"mu": mu, "v": v, "means": m, "prec": p, "factor": f}

    def score(self, F, parts):
        z = self._x(F) - parts["mu"]
        if parts["v"] is not None:
            z = z @ parts["v"]
        return maha_on(z, parts)


class RoiResidual(Comp):
    n_hyper = 1

    def __init__(self, d, normalise=False):
        self.d, self.normalise = d, normalise

    def _x(self, F):
        return l2_normalise(F["roi"]) if self.normalise else F["roi"]

    def fit(self, F, y):
        mu, v = pca(self._x(F), self.d)
        return {"mu": mu, "v": v}

    def score(self, F, parts):
        c = self._x(F) - parts["mu"]
        return (c - (c @ parts["v"]) @ parts["v"].T).norm(dim=1)


class RoiKNN(Comp):
    n_hyper = 1

    def __init__(self, k=10, d=None, tap="roi"):
        self.k, self.d, self.tap = k, d, tap
        self.n_hyper = 1 if d is None else 2

    def fit(self, F, y):
        x = F[self.tap]
        if self.d is None:
            return {"mu": None, "v": None, "bank": l2_normalise(x.float()).contiguous()}
        mu, v = pca(x, self.d)
        return {"mu": mu, "v": v, "bank": l2_normalise(((x - mu) @ v).float()).contiguous()}

    def score(self, F, parts):
        x = F[self.tap]
        if parts["v"] is not None:
            x = (x - parts["mu"]) @ parts["v"]
        return knn_score(x.float(), parts["bank"], self.k).double()


class BoxDeltaNorm(Comp):  # norm of the predicted class's regression deltas (from penultimate)
    def score(self, F, parts):
        d = F["deltas"]  # [N, C, 4] foreground
        c = F["fg"].argmax(1)
        return d[torch.arange(len(c)), c].norm(dim=1)


class BoxDeltaStd(Comp):  # disagreement of the foreground classes' box deltas
    def score(self, F, parts):
        return F["deltas"].std(dim=1).norm(dim=1)


class NegBoxDeltaStd(BoxDeltaStd):  # POST-HOC sign flip (box_delta_std came out < 0.5); excluded from the rule
    def score(self, F, parts):
        return -super().score(F, parts)


def auroc(i, o):
    from scipy.stats import rankdata
    r = rankdata(np.concatenate([i, o]))
    return (r[len(i):].sum() - len(o) * (len(o) + 1) / 2) / (len(i) * len(o))


def paired_delta_ci(a, b, groups, n_boot=1000, seed=0):
    """95% percentile interval of AUROC(a) - AUROC(b) per proxy, resampling images (val and proxy
    images independently, the same draw for both variants). a, b: {set: values}; groups: {set: image ids}."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in SYNTH:
        gi, go = groups["val"], groups[s]
        ui, uo = np.unique(gi), np.unique(go)
        idx_i = {g: np.nonzero(gi == g)[0] for g in ui}
        idx_o = {g: np.nonzero(go == g)[0] for g in uo}
        d = []
        for _ in range(n_boot):
            ri = np.concatenate([idx_i[g] for g in rng.choice(ui, len(ui))])
            ro = np.concatenate([idx_o[g] for g in rng.choice(uo, len(uo))])
            d.append(auroc(a["val"][ri], a[s][ro]) - auroc(b["val"][ri], b[s][ro]))
        out[s] = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5)))
    return out


class BgProb(Comp):  # detector's own background probability (softmax over all 6 logits)
    def score(self, F, parts):
        return torch.softmax(F["all_logits"], 1)[:, 0]


class Margin(Comp):  # negative top1-top2 foreground logit margin
    def score(self, F, parts):
        t = F["fg"].topk(2, dim=1).values
        return -(t[:, 0] - t[:, 1])


class RoiNorm(Comp):  # negative RoI feature norm (weak activation = unfamiliar)
    def score(self, F, parts):
        return -F["roi"].norm(dim=1)


class BoxGeomMaha(Comp):  # class-conditional Gaussian on (log w, log h, aspect)
    def fit(self, F, y):
        m, p, f = shrunk_gaussians(F["geom"], y, 0.01)
        return {"means": m, "prec": p, "factor": f}

    def score(self, F, parts):
        return maha_on(F["geom"], parts)


class RoiClassPCAResidual(Comp):  # residual outside the predicted class's own top-d RoI subspace
    n_hyper = 1

    def __init__(self, d):
        self.d = d

    def fit(self, F, y):
        out = {}
        for c in range(int(y.max()) + 1):
            out[c] = pca(F["roi"][y == c], self.d)
        return {"sub": out}

    def score(self, F, parts):
        pred = F["fg"].argmax(1)
        s = torch.empty(len(pred), dtype=torch.float64)
        for c, (mu, v) in parts["sub"].items():
            r = pred == c
            x = F["roi"][r] - mu
            s[r] = (x - (x @ v) @ v.T).norm(dim=1)
        return s


def features(S, Wbox, bbox_b, W, b):
    pen = S["pen"].double()
    deltas = (pen @ Wbox.double().T + bbox_b.double()).reshape(len(pen), -1, 4)[:, 1:]
    wh = (S["boxes"][:, 2:] - S["boxes"][:, :2]).clamp(min=1e-3).double()
    geom = torch.stack([wh[:, 0].log(), wh[:, 1].log(), (wh[:, 0] / wh[:, 1]).log()], 1)
    return {"roi": S["roi"].double(), "pen": pen, "fg": pen @ W.double().T + b.double(),
            "all_logits": S["logits"].double(), "deltas": deltas, "geom": geom}


def take(F, rows):
    return {k: v[rows] for k, v in F.items()}


# ---------------------------------------------------------------------------------------------
# fusion: mirror of certood.scores.pvalue_fusion (class-conditional, out-of-fold, Fisher)
# ---------------------------------------------------------------------------------------------
def empirical_pvalues(values, reference):
    ref = torch.sort(reference).values
    below = torch.searchsorted(ref, values.contiguous(), right=False)
    return (1.0 + (ref.numel() - below).double()) / (1.0 + ref.numel())


class Fusion:
    def __init__(self, comps):
        self.comps = comps

    def fit(self, F, y):
        g = torch.Generator().manual_seed(SEED)
        fold = torch.randperm(len(y), generator=g) % FOLDS
        ref = torch.empty(len(y), len(self.comps), dtype=torch.float64)
        for f in range(FOLDS):
            held = fold == f
            Ftr, Fte = take(F, ~held), take(F, held)
            for k, c in enumerate(self.comps):
                ref[held, k] = c.score(Fte, c.fit(Ftr, y[~held]))
        self.parts = [c.fit(F, y) for c in self.comps]
        self.ref, self.ref_cls = ref, F["fg"].argmax(1)
        return self

    def components(self, F):
        return torch.stack([c.score(F, p) for c, p in zip(self.comps, self.parts)], 1)

    def score(self, F):
        v, pred = self.components(F), F["fg"].argmax(1)
        p = torch.empty_like(v)
        pooled = torch.ones(len(pred), dtype=torch.bool)
        for c in pred.unique().tolist():
            rr = self.ref_cls == c
            if int(rr.sum()) < MIN_CLASS_BOXES:
                continue
            rows = pred == c
            pooled[rows] = False
            for k in range(v.shape[1]):
                p[rows, k] = empirical_pvalues(v[rows, k], self.ref[rr, k])
        if pooled.any():
            for k in range(v.shape[1]):
                p[pooled, k] = empirical_pvalues(v[pooled, k], self.ref[:, k])
        return -2.0 * torch.log(p.clamp(min=1e-300)).sum(1)


# ---------------------------------------------------------------------------------------------
def candidates():
    single = {
        "energy": Energy(), "pen_maha": PenMaha(), "pen_residual": PenResidual(),
        "pen_knn10": RoiKNN(10, None, "pen"),
        **{f"roi_maha_pca{d}": RoiMahaPCA(d) for d in (32, 64, 128)},
        "roi_maha_pool64": RoiMahaPCA(None, pooled=True),
        **{f"roi_resid{d}": RoiResidual(d) for d in (32, 64, 128)},
        "roi_resid64_l2": RoiResidual(64, normalise=True),
        "roi_knn10": RoiKNN(10), "roi_knn10_pca128": RoiKNN(10, 128),
        "box_delta_norm": BoxDeltaNorm(), "box_delta_std": BoxDeltaStd(),
        "bg_prob": BgProb(), "neg_margin": Margin(), "neg_roi_norm": RoiNorm(), "box_geom_maha": BoxGeomMaha(),
        "roi_cls_resid32": RoiClassPCAResidual(32),
    }
    return single


def main() -> int:
    t0 = time.perf_counter()
    data = extract_all()
    print(f"features ready ({time.perf_counter() - t0:.0f}s); detector threshold {data['threshold']:.3f}; boxes "
          + ", ".join(f"{k}={len(v['pen'])}" for k, v in data["sets"].items()), flush=True)
    W, b, Wbox, bb = data["W"], data["b"], data["Wbox"], data["bbox_b"]
    Fs = {k: features(v, Wbox, bb, W, b) for k, v in data["sets"].items()}
    y = data["sets"]["fit"]["y"]
    groups = {k: v["image_ids"].numpy() for k, v in data["sets"].items()}
    Ffit, Fval = Fs["fit"], Fs["val"]

    # sanity: our fusion == certood's PValueFusion on em_fisher_cc
    ref = PValueFusion(["energy", "mahalanobis"]).fit(data["sets"]["fit"]["pen"], y, classifier=(W, b))
    ours = Fusion([Energy(), PenMaha()]).fit(Ffit, y)
    for s in ("val",) + SYNTH:
        a = ref.score(data["sets"][s]["pen"]).double()
        o = ours.score(Fs[s])
        assert torch.allclose(a, o, rtol=1e-4, atol=1e-4), (s, (a - o).abs().max())
    print("re-implemented fusion matches PValueFusion(em_fisher_cc)", flush=True)

    single = candidates()
    results, timing, ncomp, nhyp = {}, {}, {}, {}

    def evaluate(name, values_of):
        results[name] = {s: ood_metrics(values_of("val"), values_of(s)) for s in SYNTH}
        r = results[name]
        m = np.mean([r[s]["auroc"] for s in SYNTH])
        print(f"{name:34s} " + " ".join(f"{r[s]['auroc']:.3f}/{r[s]['fpr95']:.3f}" for s in SYNTH)
              + f"  mean {m:.3f}", flush=True)

    # singles (raw score)
    for name, c in single.items():
        parts = c.fit(Ffit, y)
        vals = {s: c.score(Fs[s], parts) for s in ("val",) + SYNTH}
        # timing: per-box cost on val boxes (best of 3), ms per 1000 boxes
        best = float("inf")
        for _ in range(3):
            st = time.perf_counter()
            c.score(Fval, parts)
            best = min(best, time.perf_counter() - st)
        timing[name] = 1000 * best / len(Fval["pen"]) * 1000
        ncomp[name], nhyp[name] = 1, c.n_hyper
        evaluate(name, lambda s: vals[s])

    # fusions: em + X, e + X, and a few multi-layer combos
    fusions = {"em_fisher_cc": ["energy", "pen_maha"]}
    for name in single:
        if name not in ("energy", "pen_maha"):
            fusions[f"em+{name}"] = ["energy", "pen_maha", name]
    for name in ("roi_maha_pca32", "roi_maha_pca64", "roi_maha_pca128", "roi_resid64", "roi_knn10",
                 "roi_maha_pool64", "box_delta_std"):
        fusions[f"e+{name}"] = ["energy", name]
    fusions["em+roi_maha_pca64+roi_resid64"] = ["energy", "pen_maha", "roi_maha_pca64", "roi_resid64"]
    fusions["em+roi_maha_pca64+box_delta_std"] = ["energy", "pen_maha", "roi_maha_pca64", "box_delta_std"]
    fusions["em+roi_maha_pca64+roi_knn10"] = ["energy", "pen_maha", "roi_maha_pca64", "roi_knn10"]
    posthoc = {"posthoc:e+neg_box_delta_std": ["energy", "neg_box_delta_std"],
               "posthoc:e+roi_resid64+neg_box_delta_std": ["energy", "roi_resid64", "neg_box_delta_std"]}
    fusions.update(posthoc)
    single["neg_box_delta_std"] = NegBoxDeltaStd()
    allvals = {}
    for name, comps in fusions.items():
        fu = Fusion([single[c] for c in comps]).fit(Ffit, y)
        vals = {s: fu.score(Fs[s]) for s in ("val",) + SYNTH}
        allvals[name] = {k: v.numpy() for k, v in vals.items()}
        ncomp[name], nhyp[name] = len(comps), sum(single[c].n_hyper for c in comps)
        evaluate(name, lambda s: vals[s])

    mean = {k: float(np.mean([v[s]["auroc"] for s in SYNTH])) for k, v in results.items()}
    eligible = [k for k in results if not k.startswith("posthoc:")]
    best = max(mean[k] for k in eligible)
    close = [k for k in eligible if mean[k] >= best - 0.005]
    winner = min(close, key=lambda k: (ncomp[k], nhyp[k], -mean[k]))
    base = results["em_fisher_cc"]
    lines = ["| variant | chimera AUROC | scrambled AUROC | mean | chimera FPR95 | scrambled FPR95 |",
             "|---|---|---|---|---|---|"]
    for k in sorted(results, key=lambda k: -mean[k]):
        r = results[k]
        lines.append(f"| {k} | {r[SYNTH[0]]['auroc']:.3f} | {r[SYNTH[1]]['auroc']:.3f} | {mean[k]:.3f} | "
                     f"{r[SYNTH[0]]['fpr95']:.3f} | {r[SYNTH[1]]['fpr95']:.3f} |")
    lines += ["", f"best mean {best:.3f}; within 0.005: {close}", f"winner: {winner}",
              "delta vs em_fisher_cc: " + ", ".join(
                  f"{s} {results[winner][s]['auroc'] - base[s]['auroc']:+.3f}" for s in SYNTH),
              "", "paired image-bootstrap 95% CI of AUROC delta vs em_fisher_cc (1000 reps):",
              *(f"  {k}: " + ", ".join(f"{s} [{lo:+.3f}, {hi:+.3f}]" for s, (lo, hi) in paired_delta_ci(
                  allvals[k], allvals["em_fisher_cc"], groups).items())
                for k in dict.fromkeys([winner, max(eligible, key=mean.get)] + close) if k in allvals),
              "", "component cost (ms per 1000 val boxes, score only, 1 thread):",
              *(f"  {k}: {v:.2f}" for k, v in timing.items()),
              "", f"total {time.perf_counter() - t0:.0f}s"]
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines.insert(0, f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explore/proxy_candidates.py` "
                    "(a screen on ID-only proxies; no OOD split is loaded)\n")
    (RESULTS / "screen_proxy_candidates.json").write_text(json.dumps(
        {"results": results, "mean": mean, "winner": winner, "posthoc_excluded": list(posthoc), "timing_ms_per_1000": timing}, indent=1))
    (RESULTS / "screen_proxy_candidates.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
