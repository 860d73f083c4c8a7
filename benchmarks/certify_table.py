"""Certificates: how many boxes each bound method certifies, how tight, and at what cost.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/certify_table.py [--images 100]
        [--eps 0.001,0.003,0.005,0.01,0.02] [--alpha-eps 0.005] [--alpha-boxes 8]
        [--bab-eps 0.005,0.01] [--bab-timeout 1.0]

On the demo (``specs/certified.yaml``: builtin detector, energy-or-Mahalanobis rule, L-inf
region at the RoI tap), with the first ``--images`` images of id_test and of each OOD set:

- per eps, the fraction of boxes (all boxes, and the flagged ones) certified by IBP, by CROWN
  with the interval Mahalanobis bound (squares of the whitened coordinates' interval bounds
  summed: certood before the coupled bound), by CROWN (certood's production path: IBP for
  every box, CROWN only where the rule is still open, the coupled Mahalanobis bound of
  certood.verifiers.quadratic where it is still open after that) and,
  on ``--alpha-boxes`` boxes per set at ``--alpha-eps``, by alpha-CROWN (with CROWN on the same
  boxes beside it);
- with ``--bab-eps``, the same for ``certify.method: bab`` (CROWN, then branch and bound over
  the head's ReLUs for boxes left undecided without a counterexample, ``--bab-timeout``
  seconds and 64 subdomains per box), and per eps the share of CROWN's undecided boxes that
  carry a counterexample (certood.verifiers.witness: no method can certify those);
- next to them the PGD upper bound: the fraction of boxes whose own verdict (flagged or not) an
  attack could not flip inside the region (uniform and vertex samples, then PGD on the rule's
  margin, certood.verifiers.attack). No complete method can certify more than that;
- cost: certify seconds per box and per image over the detector's seconds per image, both
  measured in this run on the same images and threads; at the spec's eps also the same staged
  CROWN through auto_LiRPA (``certify.engine: auto_lirpa``) with the number of verdicts that
  differ from certood's sparse CROWN (expected: 0), and the floor: the wide products' multiply-adds
  per box over this machine's float32 GEMM rate (what any exact CROWN of these rows must spend);
- on small random heads (benchmarks/exact_heads.py instances, where a MILP completes) the lower
  bound of the top-logit margin over the region by IBP and CROWN (certood.verifiers.reference)
  next to the exact minimum (HiGHS MILP, certood.verifiers.milp).

Writes benchmarks/results/certify_table.json and .md (with the command).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from certood.certify import certify_boxes, certify_head  # noqa: E402
from certood.check import load_spec_detector  # noqa: E402
from certood.extract import extract_detections  # noqa: E402
from certood.monitor import calibrate, load_dataset  # noqa: E402
from certood.spec import load_spec  # noqa: E402
from certood.verifiers.attack import attack_certificates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "certify_table"
SMALL_SIZES = [(8, 16, 16, 2), (16, 32, 32, 2), (16, 32, 32, 4)]


def interval_backend(engine: str = "auto"):
    """certood's backend without per-box specifications: the Mahalanobis score keeps its
    interval bound (what the coupled bound is measured against)."""
    from certood.certify import default_backend

    make = default_backend(engine)

    def build(composite, region):
        run = make(composite, region)

        def plain(*args, **kwargs):
            return run(*args, **kwargs)

        plain.staged = getattr(run, "staged", False)
        return plain

    return build


def crown_floor(spec, monitor, head, parts, eps) -> dict:
    """The multiply-adds of the wide products per box that certood's sparse CROWN performs on
    every box (unstaged; at eps where IBP decides no box, staging skips none) over this
    machine's float32 GEMM rate on a product of about that shape, measured now: what the
    products alone take, a floor for this engine."""
    from certood.certify import Certifier
    from certood.verifiers.reference import mlp_layers
    from certood.verifiers.sparse_crown import SparseCrown

    o = dataclasses.replace(spec.certify, eps=eps)
    z = torch.cat([p["z"] for p in parts.values()])
    c = Certifier(spec, monitor.scores, monitor.thresholds, head, o, z.shape[1])
    crown = SparseCrown(mlp_layers(c.composite))
    from certood.verifiers.reference import Region

    zd = z.double()
    crown(*Region(zd, eps, lower=torch.zeros_like(zd) if o.domain == "nonnegative" else None).box())
    macs = crown.stats["wide_macs"] / len(z)
    rows = c.composite[-1].out_features
    a, b = torch.randn(rows, 96), torch.randn(96, z.shape[1])
    a @ b
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    rate = 20 * rows * 96 * z.shape[1] / (time.perf_counter() - t)
    return {"output_rows": rows, "rows_per_box": crown.stats["rows"] / len(z), "wide_macs_per_box": macs,
            "gemm_macs_per_second": rate, "floor_seconds_per_box": macs / rate}


def rates(verdicts, flags) -> dict:
    n = len(verdicts)
    cert = [v != "undecided" for v in verdicts]
    flagged = [c for c, f in zip(cert, flags) if f]
    return {"n": n, "certified": sum(cert) / n if n else None,
            "n_flagged": len(flagged), "certified_flagged": sum(flagged) / len(flagged) if flagged else None,
            "certified_ood": sum(v == "certified_ood" for v in verdicts) / n if n else None,
            "certified_id": sum(v == "certified_id" for v in verdicts) / n if n else None}


def pgd_upper(spec, monitor, head, point, part, eps, norm, nonneg, steps, samples) -> dict:
    """Boxes whose own verdict (flag) survived the attack: an upper bound on any certificate."""
    flags = part["flags"]
    target = ["certified_ood" if bool(f) else "certified_id" for f in flags]
    a = attack_certificates(spec, monitor.scores, monitor.thresholds, head, point, part["z"], target,
                            part["values"], eps, norm, nonneg, n_samples=samples, steps=steps, restarts=1,
                            labels=part["labels"], class_thresholds=getattr(monitor, "class_thresholds", None))
    flipped = torch.zeros(len(flags), dtype=torch.bool)
    for v in a.violations:
        flipped[int(v["box"])] = True
    kept = ~flipped
    fl = flags.bool()
    return {"unflipped": float(kept.double().mean()) if len(kept) else None,
            "unflipped_flagged": float(kept[fl].double().mean()) if fl.any() else None}


def small_heads(per_size: int, timeout: float) -> list[dict]:
    from exact_heads import instance

    from certood.verifiers.milp import decide_relu_head_milp
    from certood.verifiers.reference import Region, crown_bounds, evaluate, ibp_bounds

    rows = []
    for sizes in SMALL_SIZES:
        for seed in range(per_size):
            layers, x, c, eps15 = instance(sizes, seed)
            for factor in (0.5, 1.0):  # CROWN's radius x 0.75 and x 1.5 (instance gives x 1.5)
                eps = eps15 * factor
                spec_layers = layers + [("linear", c.reshape(1, -1), torch.zeros(1, dtype=torch.float64))]
                region = Region(x.reshape(1, -1), eps)
                crown_lo = float(crown_bounds(spec_layers, region)[0][0, 0])
                ibp_lo = float(ibp_bounds(spec_layers, region)[0][0, 0])
                centre = float(evaluate(spec_layers, x.reshape(1, -1))[0, 0])
                # d = -centre makes the property false at the centre: the MILP's optimum is then
                # returned as the counterexample, and its value + centre is the exact minimum
                d = decide_relu_head_milp(layers, x - eps, x + eps, c, -centre, timeout_s=timeout)
                exact = d.value + centre if d.status == "counterexample" and d.seconds < timeout else None
                rows.append({"sizes": list(sizes), "seed": seed, "eps": eps, "radius_factor": 1.5 * factor,
                             "centre": centre,
                             "ibp": ibp_lo, "crown": crown_lo, "exact": exact,
                             "milp_seconds": round(d.seconds, 3)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "certified.yaml")
    parser.add_argument("--images", type=int, default=100, help="images per data set")
    parser.add_argument("--eps", default="0.001,0.003,0.005,0.01,0.02")
    parser.add_argument("--alpha-eps", default="0.005")
    parser.add_argument("--alpha-boxes", type=int, default=8, help="boxes per set for alpha-CROWN")
    parser.add_argument("--bab-eps", default="", help="eps at which to run certify.method bab (all boxes)")
    parser.add_argument("--bab-timeout", type=float, default=1.0, help="branch and bound seconds per box")
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--pgd-samples", type=int, default=100)
    parser.add_argument("--small-per-size", type=int, default=5)
    parser.add_argument("--milp-timeout", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    argv_list = argv if argv is not None else sys.argv[1:]
    start = time.perf_counter()
    eps_list = [float(e) for e in args.eps.split(",")]
    alpha_eps = [float(e) for e in args.alpha_eps.split(",") if e]
    bab_eps = [float(e) for e in args.bab_eps.split(",") if e]

    spec = load_spec(args.spec)
    o = spec.certify
    detector = load_spec_detector(spec)
    monitor, _ = calibrate(spec, detector, detector.num_classes)
    point = spec.taps[o.tap]
    head = certify_head(detector, point)
    norm = math.inf if o.norm == "inf" else float(o.norm)
    nonneg = o.domain == "nonnegative"
    parts, det_seconds, n_images = {}, 0.0, 0
    sets = [("id_test", spec.data.id_test)] + [(k, v) for k, v in spec.data.ood.items()]
    for name, source in sets:
        source = dataclasses.replace(source, max_images=min(args.images, source.max_images or args.images))
        dets = extract_detections(detector, load_dataset(source, name), monitor.tap_points)
        det_seconds += dets.seconds
        n_images += dets.n_images
        dets = dets.select(dets.det_scores >= monitor.detector_threshold)
        values = monitor.score_boxes(dets)
        parts[name] = {"z": dets.taps[point].flatten(1), "values": values, "flags": monitor.flag(values, dets.labels),
                       "labels": dets.labels, "n_images": dets.n_images}
        print(f"{name}: {dets.n_images} images, {len(dets)} boxes", file=sys.stderr)
    det_per_image = det_seconds / n_images
    n_boxes = sum(len(p["z"]) for p in parts.values())

    last = {}

    def certify(part, eps, method, engine="auto", sl=slice(None)):
        backend, extra = None, {}
        if method == "crown_interval":
            method, backend = "crown", interval_backend(engine)
        if method == "bab":
            extra = {"timeout_s": args.bab_timeout}
        opts = dataclasses.replace(o, eps=eps, method=method, engine=engine, **extra)
        t = time.perf_counter()
        r = certify_boxes(monitor, head, part["z"][sl], {k: v[sl] for k, v in part["values"].items()},
                          part["flags"][sl], opts, labels=part["labels"][sl], backend=backend)
        undecided = [c for c in r.certificates if c.verdict == "undecided"]
        last["with_witness"] = (sum(c.witness is not None for c in undecided) / len(undecided)
                                if undecided else None)
        return [c.verdict for c in r.certificates], time.perf_counter() - t

    table = []
    for eps in eps_list:
        row = {"eps": eps, "sets": {}, "cost": {}}
        crown_verdicts = {}
        for method in ("ibp", "crown_interval", "crown") + (("bab",) if eps in bab_eps else ()):
            seconds = 0.0
            for name, part in parts.items():
                verdicts, s = certify(part, eps, method)
                seconds += s
                row["sets"].setdefault(name, {})[method] = rates(verdicts, part["flags"].tolist())
                if method == "crown":
                    crown_verdicts[name] = verdicts
                    row["sets"][name]["crown"]["undecided_with_witness"] = last["with_witness"]
            row["cost"][method] = {"seconds_per_box": seconds / n_boxes, "seconds_per_image": seconds / n_images,
                                   "to_detector": seconds / n_images / det_per_image}
        if eps == o.eps:  # the same CROWN through auto_LiRPA (staged alike): cost, and the same verdicts?
            seconds, differ = 0.0, 0
            for name, part in parts.items():
                verdicts, s = certify(part, eps, "crown", engine="auto_lirpa")
                seconds += s
                differ += sum(a != b for a, b in zip(verdicts, crown_verdicts[name]))
            row["cost"]["crown_auto_lirpa"] = {"seconds_per_box": seconds / n_boxes,
                                               "seconds_per_image": seconds / n_images,
                                               "to_detector": seconds / n_images / det_per_image,
                                               "verdicts_differing_from_crown": differ}
            floor = crown_floor(spec, monitor, head, parts, eps)
            row["crown_floor"] = {**floor, "to_detector": floor["floor_seconds_per_box"] * n_boxes / n_images
                                  / det_per_image}
        if eps in alpha_eps:
            seconds, nb = 0.0, 0
            for name, part in parts.items():
                sl = slice(0, args.alpha_boxes)
                flags = part["flags"][sl].tolist()
                verdicts, s = certify(part, eps, "alpha-crown", sl=sl)
                seconds += s
                nb += len(verdicts)
                row["sets"][name]["alpha_crown_subsample"] = rates(verdicts, flags)
                row["sets"][name]["crown_subsample"] = rates(certify(part, eps, "crown", sl=sl)[0], flags)
            row["cost"]["alpha_crown"] = {"seconds_per_box": seconds / max(1, nb)}
        for name, part in parts.items():
            row["sets"][name]["pgd_upper_bound"] = pgd_upper(spec, monitor, head, point, part, eps, norm, nonneg,
                                                             args.pgd_steps, args.pgd_samples)
        table.append(row)
        print(f"eps {eps}: " + ", ".join(f"{n} ibp {s['ibp']['certified']:.3f} crown {s['crown']['certified']:.3f} "
                                         f"pgd {s['pgd_upper_bound']['unflipped']:.3f}"
                                         for n, s in row["sets"].items())
              + f"; crown/detector {row['cost']['crown']['to_detector']:.2f}", file=sys.stderr)

    small = small_heads(args.small_per_size, args.milp_timeout)
    out = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/certify_table.py " + " ".join(argv_list),
           "spec": str(args.spec.relative_to(ROOT) if args.spec.is_absolute() else args.spec),
           "detector_sha256": detector.weights_sha256, "rule": spec.rule.source,
           "region": {"tap": o.tap, "norm": o.norm, "domain": o.domain, "exact": o.exact},
           "images_per_set": {n: p["n_images"] for n, p in parts.items()},
           "boxes_per_set": {n: len(p["z"]) for n, p in parts.items()},
           "detector_seconds_per_image": det_per_image, "table": table, "small_heads": small,
           "input_dim": int(next(iter(parts.values()))["z"].shape[1]), "threads": torch.get_num_threads(),
           "pgd": {"steps": args.pgd_steps, "restarts": 1, "samples_per_box": args.pgd_samples},
           "total_seconds": round(time.perf_counter() - start, 1),
           "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads",
           "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(out))
    print(render(out))
    return 0


# columns shown when the run measured them: (key, title); the first sits before CROWN
OPTIONAL_COLUMNS = [("crown_interval", "CROWN, interval Mahalanobis"), ("bab", "BaB")]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render(out: dict) -> str:
    sets = list(out["boxes_per_set"])
    lines = ["# Certificates: coverage, tightness, cost\n",
             f"`{out['command']}` ({out['date']}, {out['machine']}, {out['total_seconds']} s). "
             f"Spec `{out['spec']}`, rule `{out['rule']}`, L-{out['region']['norm']} region at the "
             f"{out['region']['tap']} tap ({out['region']['domain']}), exact: {out['region']['exact']}. "
             f"Images per set: {out['images_per_set']}; boxes: {out['boxes_per_set']}. "
             f"Detector: {1000 * out['detector_seconds_per_image']:.1f} ms per image in this run.\n",
             "## Certified boxes (%): all boxes / flagged boxes\n",
             "PGD = boxes whose own verdict the attack could not flip: an upper bound on what any "
             "complete method could certify. CROWN is certood's production path (IBP first, CROWN "
             "where the rule is still open, then the coupled Mahalanobis bound where it is still open); "
             "CROWN, interval Mahalanobis: the same without the coupled bound.\n",
             ]
    measured = {k for row in out["table"] for s in row["sets"].values() for k in s}
    optional = [(k, title) for k, title in OPTIONAL_COLUMNS if k in measured]
    methods = ["ibp"] + [k for k, _ in optional[:1]] + ["crown"] + [k for k, _ in optional[1:]]
    titles = {"ibp": "IBP", "crown": "CROWN", **dict(optional)}
    lines += ["| eps | set | " + " | ".join(titles[m] for m in methods) + " | PGD upper bound | "
              "CROWN / detector (per image) |", "|---|---|" + "---|" * (len(methods) + 2)]
    for row in out["table"]:
        for name in sets:
            s = row["sets"][name]
            cells = " | ".join(f"{_pct(s[m]['certified'])} / {_pct(s[m]['certified_flagged'])}" if m in s else "-"
                               for m in methods)
            lines.append(f"| {row['eps']:g} | {name} | {cells} | {_pct(s['pgd_upper_bound']['unflipped'])} / "
                         f"{_pct(s['pgd_upper_bound']['unflipped_flagged'])} | "
                         f"{row['cost']['crown']['to_detector']:.2f}x |")
    witnessed = [r for r in out["table"] if "undecided_with_witness" in r["sets"][sets[0]]["crown"]]
    if witnessed:
        lines += ["", "Undecided boxes (CROWN) with a counterexample in their region (%, "
                  + " / ".join(sets) + "): "
                  + "; ".join(f"eps {r['eps']:g}: " + " / ".join(_pct(r["sets"][n]["crown"]["undecided_with_witness"])
                                                           for n in sets) for r in witnessed) + "."]
    alpha = [r for r in out["table"] if "alpha_crown" in r["cost"]]
    if alpha:
        lines += ["", "## alpha-CROWN on a subsample (certified %, all / flagged)\n",
                  "| eps | set | boxes | CROWN | alpha-CROWN | alpha-CROWN s/box |", "|---|---|---|---|---|---|"]
        for row in alpha:
            for name in sets:
                s = row["sets"][name]
                lines.append(f"| {row['eps']:g} | {name} | {s['crown_subsample']['n']} | "
                             f"{_pct(s['crown_subsample']['certified'])} / {_pct(s['crown_subsample']['certified_flagged'])}"
                             f" | {_pct(s['alpha_crown_subsample']['certified'])} / "
                             f"{_pct(s['alpha_crown_subsample']['certified_flagged'])} | "
                             f"{row['cost']['alpha_crown']['seconds_per_box']:.2f} |")
    lines += ["", "## Cost (all boxes of the evaluated images)\n",
              "| eps | method | s per box | s per image | / detector per image |", "|---|---|---|---|---|"]
    for row in out["table"]:
        for m, c in row["cost"].items():
            if "seconds_per_image" in c:
                lines.append(f"| {row['eps']:g} | {m} | {c['seconds_per_box']:.4f} | {c['seconds_per_image']:.4f} | "
                             f"{c['to_detector']:.2f}x |")
    floors = [r for r in out["table"] if "crown_floor" in r]
    for row in floors:
        f, c = row["crown_floor"], row["cost"]
        lines += ["", f"CROWN at eps {row['eps']:g}: {f['output_rows']} output rows (logit rows and the "
                  f"Mahalanobis whitening rows), {f['rows_per_box']:.0f} rows back-substituted per box "
                  f"(with the intermediate ones), {f['wide_macs_per_box'] / 1e6:.0f}M multiply-adds per box in "
                  f"the products with the {out['input_dim']}-wide first layer; at this machine's float32 GEMM "
                  f"rate ({f['gemm_macs_per_second'] / 1e9:.0f}G multiply-adds/s, {out['threads']} thread(s)) that alone is "
                  f"{1000 * f['floor_seconds_per_box']:.2f} ms per box, **{f['to_detector']:.2f}x** the detector "
                  f"per image. auto_LiRPA's CROWN (same staging): {c['crown_auto_lirpa']['to_detector']:.2f}x, "
                  f"{c['crown_auto_lirpa']['verdicts_differing_from_crown']} verdicts differing."]
    small = out["small_heads"]
    if small:
        lines += ["", "## Small heads: lower bound of the top-logit margin vs the exact minimum (MILP)\n",
                  "Looseness = (exact min - bound) / (centre - exact min), median over instances "
                  "(0 = exact). eps: 0.75x and 1.5x the largest radius CROWN proves.\n",
                  "| head | eps | instances (exact solved) | IBP looseness | CROWN looseness | median MILP s |",
                  "|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in small:
            groups.setdefault(("-".join(map(str, r["sizes"])), r["radius_factor"]), []).append(r)
        for (sz, f), rs in groups.items():
            ok = [r for r in rs if r["exact"] is not None]

            def loose(key):
                vals = [(r["exact"] - r[key]) / max(1e-12, r["centre"] - r["exact"]) for r in ok]
                return f"{statistics.median(vals):.3f}" if vals else "-"
            secs = statistics.median(r["milp_seconds"] for r in rs)
            lines.append(f"| {sz} | {f:g}x | {len(rs)} ({len(ok)}) | {loose('ibp')} | {loose('crown')} | {secs:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
