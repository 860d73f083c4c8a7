"""Soundness of certificates at scale: attack every certified box of the demo.

    .venv/bin/python benchmarks/certify_soundness.py [--spec specs/certified.yaml]
        [--monitor DIR] [--images 60] [--points 100000]

Runs the spec's detector on the first ``--images`` images of id_test and of each OOD set,
certifies every monitored box (the spec's certify block), then attacks each certified box
from outside the bound code (certood.verifiers.attack): uniform samples of its region (half
of them box vertices for L-inf) and PGD (50 steps, 2 restarts) toward the opposite verdict,
every point judged by the monitor's own float32 scores and rule. Samples per box are set so
that at least ``--points`` points are attacked in all. Prints and records
benchmarks/results/certify_soundness.json (with the command); exit 1 on any violation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from certood.artifacts import load_monitor
from certood.certify import certify_detections, certify_metrics
from certood.check import load_spec_detector
from certood.extract import extract_detections
from certood.monitor import calibrate, load_dataset
from certood.spec import load_spec
from certood.verifiers.attack import attack_certificates

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "certify_soundness.json"
STEPS, RESTARTS = 50, 2


def shrink_bounds(fraction: float) -> None:
    """Replace every score bound by one ``fraction`` of its width too tight at each end."""
    from certood import certify

    for kind, sound in list(certify.BOUNDERS.items()):
        def bound(score, lo, hi, dim, _sound=sound):
            a, b = _sound.bound(score, lo, hi, dim)
            return a + fraction * (b - a), b - fraction * (b - a)
        certify.BOUNDERS[kind] = certify.ScoreBounder(sound.rows, bound, sound.abs_pad)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "certified.yaml")
    parser.add_argument("--monitor", type=Path, default=None, help="a calibrated monitor (default: calibrate)")
    parser.add_argument("--images", type=int, default=60, help="images per data set")
    parser.add_argument("--points", type=int, default=100_000, help="attacked points in all, at least")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--shrink", type=float, default=0.0,
                        help="make every score bound unsound on purpose: shrink it by this fraction of its "
                             "width (the attack must then find violations)")
    args = parser.parse_args(argv)
    if args.shrink:
        shrink_bounds(args.shrink)

    start = time.perf_counter()
    spec = load_spec(args.spec)
    if spec.certify is None:
        print(f"{args.spec}: no certify block", file=sys.stderr)
        return 2
    detector = load_spec_detector(spec)
    if args.monitor is not None:
        head = getattr(detector, "foreground_head", lambda: None)()
        monitor = load_monitor(args.monitor, spec, detector.weights_sha256, head)
    else:
        monitor, _ = calibrate(spec, detector, detector.num_classes)
    o = spec.certify
    point = spec.taps[o.tap]
    sets = ([("id_test", spec.data.id_test)] if spec.data.id_test else []) + \
           [(f"ood/{k}", v) for k, v in spec.data.ood.items()]
    parts, results, det_seconds, n_images = {}, {}, 0.0, 0
    for name, source in sets:
        source = dataclasses.replace(source, max_images=min(args.images, source.max_images or args.images))
        dataset = load_dataset(source, name)
        dets = extract_detections(detector, dataset, monitor.tap_points)
        det_seconds += dets.seconds
        n_images += dets.n_images
        dets = dets.select(dets.det_scores >= monitor.detector_threshold)
        values = monitor.score_boxes(dets)
        flags = monitor.flag(values, dets.labels)
        result = certify_detections(monitor, detector, dets, values, flags)
        results[name] = result
        parts[name] = (dets, values, result)
        print(f"{name}: {len(dets)} boxes, {result.summary()['counts']}", file=sys.stderr)

    n_certified = sum(sum(c.verdict != "undecided" for c in r.certificates) for r in results.values())
    per_box = STEPS * RESTARTS
    n_samples = max(500, math.ceil(args.points / max(1, n_certified)) - per_box)
    head = detector.monitored_head(point)
    norm = math.inf if o.norm == "inf" else float(o.norm)
    attacked = {"n_boxes": 0, "n_points": 0, "n_violations": 0, "violations": []}
    attack_start = time.perf_counter()
    for name, (dets, values, result) in parts.items():
        a = attack_certificates(spec, monitor.scores, monitor.thresholds, head, point, dets.taps[point],
                                [c.verdict for c in result.certificates], values, o.eps, norm,
                                o.domain == "nonnegative", n_samples=n_samples, steps=STEPS, restarts=RESTARTS,
                                labels=dets.labels, class_thresholds=getattr(monitor, "class_thresholds", None))
        attacked["n_boxes"] += a.n_boxes
        attacked["n_points"] += a.n_points
        attacked["n_violations"] += a.n_violations
        attacked["violations"] += [{"dataset": name, **v} for v in a.violations[:20]]
        print(f"{name}: attacked {a.n_boxes} certified boxes, {a.n_points} points, "
              f"{a.n_violations} violations", file=sys.stderr)
    per_set, about = certify_metrics(o, results, det_seconds)
    out = {
        "command": "python benchmarks/certify_soundness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "spec": str(args.spec), "detector_sha256": detector.weights_sha256, "certify": about,
        "images_per_set": args.images, "shrink": args.shrink, "certificates": per_set, "samples_per_box": n_samples,
        "pgd": {"steps": STEPS, "restarts": RESTARTS}, "attack": attacked,
        "attack_seconds": round(time.perf_counter() - attack_start, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{attacked['n_points']} points attacked on {attacked['n_boxes']} certified boxes: "
          f"{attacked['n_violations']} violations")
    return 1 if attacked["n_violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
