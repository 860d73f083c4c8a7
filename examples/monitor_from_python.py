"""Use certood from Python: calibrate a monitor (or load one), run it on images, attach it to
your own in-memory model, and stream a video through it.

    python examples/monitor_from_python.py                       # specs/demo.yaml, calibrated here
    python examples/monitor_from_python.py --monitor runs/demo/monitor   # a calibrated directory

The images are the first ``--images`` of the spec's ``id_test`` set (DigitsDet's test split for
the demo spec), opened with PIL as an application would; any float CHW tensor in [0, 1] or
HxWx3 uint8 array works the same.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import certood
from certood.detectors.torchvision_frcnn import build_model, load_state_dict, resolve_weights
from certood.monitor import load_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(Path(__file__).resolve().parent.parent / "specs" / "demo.yaml"))
    parser.add_argument("--monitor", default=None, help="a calibrated monitor directory (default: calibrate)")
    parser.add_argument("--images", type=int, default=8, help="how many id_test images to monitor")
    args = parser.parse_args(argv)

    # 1. a calibrated monitor: loaded from its directory, or compiled from the spec and calibrated
    if args.monitor:
        mon = certood.load(args.monitor)
    else:
        mon = certood.compile(args.spec).calibrate()
    print(mon)
    print(f"detector threshold {mon.detector_threshold:.3f}; score thresholds "
          + ", ".join(f"{k}={v:.3f}" for k, v in mon.thresholds.items()))

    paths = [r.path for r in load_dataset(mon.spec.data.id_test, "id_test").records[: args.images]]
    images = [Image.open(p).convert("RGB") for p in paths]

    # 2. one image, or a batch: per-image results, one BoxResult per monitored box
    result = mon(images[0])
    for box in result.boxes:
        print(f"label {box.label} det {box.det_score:.2f} box {[round(v, 1) for v in box.box]} "
              f"scores {({k: round(v, 3) for k, v in box.scores.items()})} flag {box.flag}")
    results = mon(images)
    print(f"{sum(len(r.boxes) for r in results)} boxes on {len(results)} images, "
          f"{sum(len(r.flagged) for r in results)} flagged OOD")
    coco = [d for r in results for d in r.to_coco_results()]  # COCO results format, for pycocotools

    # 3. your own model, in memory: attached after checking its weights are the calibrated ones
    d = mon.spec.detector
    model = build_model(d.arch, d.num_classes, min_size=d.min_size or 128, max_size=d.max_size or 128)
    model.load_state_dict(load_state_dict(resolve_weights(d.weights)))
    attached = certood.attach(model.eval(), mon)
    same = attached(images[0])
    print(f"attached model: {len(same.boxes)} boxes on the first image (weights verified)")

    # 4. a video, frame by frame (here the same images as HxWx3 uint8 arrays): the stream keeps
    #    the tracker's state; with a spec's temporal block, boxes also get track scores and flags
    stream = mon.stream()
    for frame in images:
        out = stream(np.asarray(frame))
        print(f"frame {out.frame_id}: track ids {[b.track_id for b in out.boxes]}")
    print(f"{len(coco)} COCO result rows")


if __name__ == "__main__":
    main()
