"""Round 3: five more kinds of detection evidence against the chosen fusion, on ID-made proxies only.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/explore/round3_candidates.py     # ~5 min on 2 cores

The chosen fusion (energy + RoI residual + box-jitter KL, ``benchmarks/select_fusion.py``) wins
on far OOD with disjoint intervals but not on near. This screen asks whether any further kind of
evidence adds to it on *near-type* outliers, judged on proxies made from ID digits only (the
held-out splits ``ood-near``, ``ood-far`` and ``mixed`` are never loaded):

- four proxy families, each composed on canvases as DigitsDet does: ``mix_tb`` (top half of one ID
  digit over the bottom half of another class), ``mix_lr`` (the same, left/right), ``jigsaw``
  (the 16 2x2 blocks shuffled), ``rot`` (rotated by 90 or 270 degrees). ``mix_*`` are the
  near-type families (new arrangements of ID strokes). Evaluation outliers come from ``val``
  digits; the outlier-exposure candidates train on the same families made from ``train`` digits
  (disjoint source images), **leaving out the family they are judged on**;
- candidates: (1) outlier exposure, a classifier of ID fit boxes vs synthetic-outlier boxes on
  penultimate features (+ the fusion's component scores); (2) PaDiM-style per-cell Gaussians on
  the 7x7 RoI grid (the box as a canonical frame, cells as parts); (3) the detector's own
  object-vs-background belief (background probability, detection score, background under
  jitter); (4) image-level test-time augmentation (KL of the box's class distribution after a
  3-pixel shift or a 0.8x / 1.25x rescale of the image, re-pooled at the same box: one backbone
  pass per transform); (5) an ensemble of five box heads trained on the frozen RoI features of
  sampled proposals (bootstrap, different seeds): predictive entropy / mutual information.
- each candidate alone and fused with the fusion (Fisher's method on ID-rank p-values against
  the val boxes, the same for every candidate).

Rule, written down after the prototypes (so it is stated, not pre-registered): a candidate would
enter the fusion only if, fused, it raised the mean AUROC over the near-type families by at least
0.01 without lowering the mean over all four. Results: ``benchmarks/results/screen_round3.{md,json}``.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
sys.path.insert(0, str(HERE.parent))

from certood.check import load_spec_detector  # noqa: E402
from certood.data.coco import CocoDataset  # noqa: E402
from certood.data.digitsdet import (  # noqa: E402
    CANVAS, ID_DIGITS, UNKNOWN_CATEGORY_ID, Glyph, ensure_digitsdet, load_glyphs, split_paths,
    write_canvases,
)
from certood.detectors.torchvision_frcnn import run_backbone  # noqa: E402
from certood.extract import extract_detections  # noqa: E402
from certood.metrics import ood_metrics  # noqa: E402
from certood.monitor import calibrate, load_dataset  # noqa: E402
from certood.spec import load_spec_text  # noqa: E402

FAMILIES = ("mix_tb", "mix_lr", "jigsaw", "rot")
NEAR_TYPE = ("mix_tb", "mix_lr")
CACHE = Path("/tmp/certood_explore/round3.pt")
TTA = (("shift", 3, 3), ("shift", -3, 2), ("scale", 1.25), ("scale", 0.8))
HEADS, HEAD_IMAGES, BG_PER_IMAGE = 5, 1000, 24
SEED = 0


# ---------------------------------------------------------------------------------------------
# proxy families from ID digits
# ---------------------------------------------------------------------------------------------
def make_glyph(family: str, pool: list[Glyph], rng: np.random.Generator) -> Glyph:
    a = pool[int(rng.integers(len(pool)))]
    if family in ("mix_tb", "mix_lr"):
        others = [g for g in pool if g.name != a.name]
        b = others[int(rng.integers(len(others)))]
        axis = 0 if family == "mix_tb" else 1
        px = np.concatenate([np.split(a.pixels, 2, axis)[0], np.split(b.pixels, 2, axis)[1]], axis=axis)
        return Glyph(np.ascontiguousarray(px), f"{family}:{a.source}+{b.source}", f"{a.name}/{b.name}")
    if family == "jigsaw":
        blocks = a.pixels.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 2, 2)
        px = blocks[rng.permutation(16)].reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(8, 8)
        return Glyph(np.ascontiguousarray(px), f"jigsaw:{a.source}", f"~{a.name}")
    k = 1 if rng.random() < 0.5 else 3
    return Glyph(np.ascontiguousarray(np.rot90(a.pixels, k)), f"rot{90 * k}:{a.source}", f"r{a.name}")


def write_family(out: Path, family: str, split: str, n_images: int) -> CocoDataset:
    folder, ann = out / f"{split}-{family}", out / f"{split}-{family}.json"
    if not ann.exists():
        pool = [g for g in load_glyphs(SEED)[split] if int(g.name) in ID_DIGITS]
        rng = np.random.default_rng([SEED, FAMILIES.index(family), 7 if split == "train" else 11])
        images, annotations = write_canvases(
            folder, n_images, lambda r: [make_glyph(family, pool, r) for _ in range(int(r.integers(1, 5)))], rng,
            lambda g: UNKNOWN_CATEGORY_ID)
        cats = [{"id": d + 1, "name": str(d)} for d in ID_DIGITS] + [{"id": UNKNOWN_CATEGORY_ID, "name": "unknown"}]
        ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return CocoDataset.load(ann, folder, name=f"{split}-{family}")


# ---------------------------------------------------------------------------------------------
# extraction: monitor scores + raw features for every set, TTA logits, head training proposals
# ---------------------------------------------------------------------------------------------
def screen_spec():
    return load_spec_text(json.dumps({
        "version": 1,
        "detector": {"kind": "torchvision", "arch": "digits_fasterrcnn", "weights": "builtin:digits_fasterrcnn",
                     "num_classes": 6, "min_size": 128, "max_size": 128},
        "data": {"fit": {"digitsdet": "train", "max_images": 600}, "calibration": {"digitsdet": "val"}},
        "taps": {"roi": "box_head.input", "penultimate": "box_head.output", "logits": "cls_logits",
                 "jitter": "box_jitter.logits"},
        "scores": {"energy": {"kind": "energy", "tap": "logits"},
                   "residual": {"kind": "residual", "tap": "roi"},
                   "jitter_kl": {"kind": "jitter_kl", "tap": "jitter"},
                   "vim": {"kind": "vim", "tap": "penultimate"},
                   "fusion": {"kind": "fusion", "tap": "logits", "of": ["energy", "residual", "jitter_kl"]}},
    }), filename="<round3_candidates>")


@torch.no_grad()
def tta_kl(model, dataset: CocoDataset, boxes: torch.Tensor, image_ids: torch.Tensor,
           logits: torch.Tensor) -> torch.Tensor:
    """[N, len(TTA)]: KL from each box's class distribution to the one re-pooled at the same box
    of the transformed image (canvas size = the detector's input size, so no resize)."""
    rh = model.roi_heads
    out = torch.full((len(boxes), len(TTA)), float("nan"), dtype=torch.float64)
    for record, image in dataset.iter_images():
        rows = torch.nonzero(image_ids == record.image_id).flatten()
        if len(rows) == 0:
            continue
        p0 = torch.log_softmax(logits[rows].double(), 1)
        for k, t in enumerate(TTA):
            x, b = image[None], boxes[rows]
            if t[0] == "shift":
                x = torch.roll(x, (t[2], t[1]), (2, 3))
                b = b + torch.tensor([t[1], t[2], t[1], t[2]], dtype=b.dtype)
            else:
                size = int(round(CANVAS * t[1]))
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                b = b * (size / CANVAS)
            xn = model.transform.normalize(x[0])[None]
            feats = model.backbone(xn)
            feats = {"0": feats} if isinstance(feats, torch.Tensor) else feats
            lt, _ = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, [b], [tuple(xn.shape[-2:])])))
            pt = torch.log_softmax(lt.double(), 1)
            out[rows, k] = (p0.exp() * (p0 - pt)).sum(1)
    return out


@torch.no_grad()
def head_training_set(model, dataset: CocoDataset, label_of: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """RoI features of proposals sampled as torchvision trains its box head (IoU >= 0.5: the
    object's class, else background), all foreground and up to BG_PER_IMAGE background per image."""
    rh = model.roi_heads
    gen = torch.Generator().manual_seed(SEED)
    xs, ys = [], []
    for record, image in dataset.iter_images():
        if len(record.gt_boxes) == 0:
            continue
        labels = torch.tensor([label_of[int(c)] for c in record.gt_categories])
        batch, feats, _ = run_backbone(model, [image], "cpu")
        proposals, _ = model.rpn(batch, feats)
        proposals = [torch.cat([proposals[0], record.gt_boxes.float()])]
        iou = box_iou(proposals[0], record.gt_boxes.float())
        best, idx = iou.max(1)
        y = torch.where(best >= 0.5, labels[idx], torch.zeros_like(idx))
        bg = torch.nonzero(best < 0.5).flatten()
        keep = torch.cat([torch.nonzero(best >= 0.5).flatten(), bg[torch.randperm(len(bg), generator=gen)[:BG_PER_IMAGE]]])
        xs.append(rh.box_roi_pool(feats, [proposals[0][keep]], batch.image_sizes).flatten(1))
        ys.append(y[keep])
    return torch.cat(xs), torch.cat(ys)


def extract_all() -> dict:
    if CACHE.exists():
        return torch.load(CACHE, weights_only=True)  # our own cache: tensors only
    root = ensure_digitsdet()
    out = root.parent / f"{root.name}-round3-families"
    spec = screen_spec()
    detector = load_spec_detector(spec)
    monitor, extracted = calibrate(spec, detector, detector.num_classes)
    thr = monitor.detector_threshold
    datasets = {"val": load_dataset(spec.data.calibration, "val")}
    datasets.update({f"train-{f}": write_family(out, f, "train", 300) for f in FAMILIES})
    datasets.update({f"val-{f}": write_family(out, f, "val", 150) for f in FAMILIES})
    fit_set = load_dataset(spec.data.fit, "fit")

    def pack(d, dataset):
        v = monitor.score_boxes(d)
        logits = d.taps["cls_logits"].float()
        return {"pen": d.taps["box_head.output"].float(), "full_logits": logits,
                "roi": d.taps["box_head.input"].float().flatten(1), "jitter": d.taps["box_jitter.logits"].float(),
                "det_scores": d.det_scores.float(), "labels": d.labels,
                "tta": tta_kl(detector.model, dataset, d.boxes.float(), d.image_ids, logits) if dataset else None,
                **{k: v[k].double() for k in v}}

    sets = {"fit": pack(extracted_fit(detector, fit_set, monitor, thr), None)}
    sets["val"] = pack(extracted["calibration"], datasets["val"])
    for name, ds in datasets.items():
        if name != "val":
            d = extract_detections(detector, ds, monitor.tap_points, min_score=thr)
            sets[name] = pack(d.select(d.det_scores >= thr), ds if name.startswith("val-") else None)
    for s in sets.values():
        if s["tta"] is None:
            del s["tta"]
    head_set = CocoDataset.load(*split_paths(root, "train"), max_images=HEAD_IMAGES, name="heads")
    cats = sorted(c for c in head_set.category_ids if c != UNKNOWN_CATEGORY_ID)
    x, y = head_training_set(detector.model, head_set, {c: i + 1 for i, c in enumerate(cats)})
    sets["head_train"] = {"roi": x, "labels": y}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sets, CACHE)
    return sets


def extracted_fit(detector, fit_set, monitor, thr):
    d = extract_detections(detector, fit_set, monitor.tap_points, min_score=thr)
    return d.select(d.det_scores >= thr)


# ---------------------------------------------------------------------------------------------
# candidates: name -> fn(S, family) -> (val scores, val-family scores), higher = more OOD
# ---------------------------------------------------------------------------------------------
def _oe(view, model: str):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fn(S, f):
        x_id = view(S["fit"])
        x_out = np.concatenate([view(S[f"train-{g}"]) for g in FAMILIES if g != f])  # leave f out
        if model == "logreg":
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        else:
            clf = make_pipeline(StandardScaler(), MLPClassifier((64,), alpha=1e-2, max_iter=500,
                                                                random_state=SEED, early_stopping=True))
        clf.fit(np.concatenate([x_id, x_out]), np.r_[np.zeros(len(x_id)), np.ones(len(x_out))])
        return clf.predict_proba(view(S["val"]))[:, 1], clf.predict_proba(view(S[f"val-{f}"]))[:, 1]
    return fn


def _pen(s):
    return s["pen"].double().numpy()


def _pen_scores(s):
    return np.concatenate([_pen(s), torch.stack([s["energy"], s["residual"], s["jitter_kl"]], 1).numpy()], 1)


def _cells(s) -> torch.Tensor:  # [N, 49, 64]: the 7x7 RoI grid, 64 channels per cell
    r = s["roi"].double()
    return r.reshape(len(r), 64, 49).transpose(1, 2)


def _padim(agg: str, alpha: float = 0.5):
    def fn(S, f):
        x, y = _cells(S["fit"]), S["fit"]["labels"] - 1
        mu = torch.stack([x[y == c].mean(0) for c in range(int(y.max()) + 1)])
        r = x - mu[y]
        cov = torch.einsum("npi,npj->pij", r, r) / len(x)
        cov = (1 - alpha) * cov + alpha * cov.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(64, dtype=cov.dtype)
        prec = torch.linalg.inv(cov)

        def score(s):
            r = _cells(s) - mu[s["labels"] - 1]
            d = torch.einsum("npi,pij,npj->np", r, prec, r)
            return (d.max(1).values if agg == "max" else d.mean(1)).numpy()
        return score(S["val"]), score(S[f"val-{f}"])
    return fn


def _plain(fn1):
    return lambda S, f: (fn1(S["val"]).numpy(), fn1(S[f"val-{f}"]).numpy())


def _jitter_bg(s):
    j = s["jitter"].double().reshape(len(s["labels"]), -1, s["full_logits"].shape[1])
    return torch.softmax(j, 2)[:, :, 0].mean(1)


def _heads():
    import torch.nn as nn
    cache: dict = {}

    def heads(S):
        if "heads" not in cache:
            x, y = S["head_train"]["roi"], S["head_train"]["labels"]
            nets = []
            for k in range(HEADS):
                gen = torch.Generator().manual_seed(k)
                torch.manual_seed(k)
                net = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                    nn.Linear(128, int(y.max()) + 1))
                opt = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
                boot = torch.randint(len(x), (len(x),), generator=gen)
                with torch.enable_grad():
                    train_epochs(net, opt, x, y, boot, gen)
                nets.append(net.eval())
            cache["heads"] = nets
        return cache["heads"]

    def train_epochs(net, opt, x, y, boot, gen):
        for _ in range(6):
            for b in boot[torch.randperm(len(boot), generator=gen)].split(256):
                loss = nn.functional.cross_entropy(net(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()

    def probs(S, s):
        with torch.no_grad():
            return torch.stack([torch.softmax(s["full_logits"].double(), 1)]
                               + [torch.softmax(h(s["roi"]).double(), 1) for h in heads(S)])

    def ent(p):
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    def make(kind):
        def one(S, s):
            p = probs(S, s)
            return (ent(p.mean(0)) - ent(p).mean(0)) if kind == "mi" else ent(p.mean(0))
        return lambda S, f: (one(S, S["val"]).numpy(), one(S, S[f"val-{f}"]).numpy())
    return make


HEAD_SCORES = _heads()
CANDIDATES = {
    "OE logreg pen": _oe(_pen, "logreg"),
    "OE mlp pen": _oe(_pen, "mlp"),
    "OE logreg pen+scores": _oe(_pen_scores, "logreg"),
    "OE mlp pen+scores": _oe(_pen_scores, "mlp"),
    "PaDiM cells mean": _padim("mean"),
    "PaDiM cells max": _padim("max"),
    "p(background)": _plain(lambda s: torch.softmax(s["full_logits"].double(), 1)[:, 0]),
    "-detection score": _plain(lambda s: -s["det_scores"].double()),
    "p(background) under jitter": _plain(_jitter_bg),
    "TTA shift KL": _plain(lambda s: s["tta"][:, :2].mean(1)),
    "TTA rescale KL": _plain(lambda s: s["tta"][:, 2:].mean(1)),
    "head ensemble entropy": HEAD_SCORES("entropy"),
    "head ensemble MI": HEAD_SCORES("mi"),
}
REFERENCE = ("fusion", "energy", "residual", "jitter_kl", "vim")


def rank_p(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Right-tail p-value of each x among the ID reference values."""
    ref = np.sort(reference)
    return (len(ref) - np.searchsorted(ref, x, side="left") + 1) / (len(ref) + 1)


def auroc(id_s, ood_s) -> float:
    return ood_metrics(torch.as_tensor(np.asarray(id_s, dtype=np.float64)),
                       torch.as_tensor(np.asarray(ood_s, dtype=np.float64)))["auroc"]


def main() -> int:
    start = time.perf_counter()
    cached = CACHE.exists()
    S = extract_all()
    fusion_id = S["val"]["fusion"].numpy()
    rows = {}
    for k in REFERENCE:
        rows[k] = {"alone": {f: auroc(S["val"][k], S[f"val-{f}"][k]) for f in FAMILIES}}
    for name, fn in CANDIDATES.items():
        alone, fused = {}, {}
        for f in FAMILIES:
            s_id, s_out = fn(S, f)
            alone[f] = auroc(s_id, s_out)
            fusion_out = S[f"val-{f}"]["fusion"].numpy()
            fused[f] = auroc(-np.log(rank_p(fusion_id, fusion_id)) - np.log(rank_p(s_id, s_id)),
                             -np.log(rank_p(fusion_out, fusion_id)) - np.log(rank_p(s_out, s_id)))
        rows[name] = {"alone": alone, "with fusion": fused}
        print(f"{name}: alone {np.mean(list(alone.values())):.3f}, with fusion {np.mean(list(fused.values())):.3f}",
              flush=True)
    base = rows["fusion"]["alone"]

    def mean(r, fams=FAMILIES):
        return float(np.mean([r[f] for f in fams]))
    verdicts = {name: (mean(r["with fusion"], NEAR_TYPE) >= mean(base, NEAR_TYPE) + 0.01
                       and mean(r["with fusion"]) >= mean(base)) for name, r in rows.items() if "with fusion" in r}
    record = {"command": "OMP_NUM_THREADS=2 .venv/bin/python benchmarks/explore/round3_candidates.py",
              "seconds": round(time.perf_counter() - start, 1), "features_from_cache": cached,
              "boxes": {k: len(v["labels"]) for k, v in S.items()}, "families": FAMILIES,
              "near_type": NEAR_TYPE, "rows": rows, "enters_fusion": verdicts,
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "screen_round3.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Round 3: more detection evidence vs the chosen fusion (ID-made proxies only)", "",
             f"Command: `{record['command']}` ({record['seconds']:.0f} s{', features cached' if cached else ''}; rule and candidates in the script's docstring). "
             "No ood-near/ood-far/mixed data loaded.", "",
             "Boxes: " + ", ".join(f"{k} {v}" for k, v in record["boxes"].items()) + ".", "",
             "| evidence | " + " | ".join(FAMILIES) + " | near-type mean | all mean | with fusion: "
             + " | ".join(FAMILIES) + " | near-type mean | all mean | enters |",
             "|---|" + "---|" * (2 * len(FAMILIES) + 5)]
    for name, r in rows.items():
        a = r["alone"]
        cells = [f"{a[f]:.3f}" for f in FAMILIES] + [f"{mean(a, NEAR_TYPE):.3f}", f"{mean(a):.3f}"]
        w = r.get("with fusion")
        cells += ([f"{w[f]:.3f}" for f in FAMILIES] + [f"{mean(w, NEAR_TYPE):.3f}", f"{mean(w):.3f}",
                                                       "yes" if verdicts[name] else "no"]) if w else ["-"] * 7
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "screen_round3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
