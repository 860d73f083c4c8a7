"""A DigitsDet-trained ultralytics YOLOv8n, monitored by certood from its stock ONNX export.

Ultralytics is AGPL-3.0: it runs in a venv of its own (benchmarks/make_ultralytics_fixtures.py
creates it), certood never imports it, and the trained weights stay in the cache directory
(never committed, never shipped). Status: the training stage ran as a smoke test (``--smoke``:
1 epoch on 5% of train, 3 min on a shared 2-core machine); the full run and its results file
have not been made yet. Steps:

1. DigitsDet (train, val, test) converted to ultralytics' YOLO format (labels/*.txt);
2. ``YOLO('yolov8n.yaml').train(data=..., epochs=8, imgsz=128, batch=16, seed=0)`` on CPU
   (about 20 min on 2 cores), then ultralytics' own ``val`` on val and test (mAP50, its NMS:
   conf 0.001, IoU 0.7) and ``export(format='onnx')``;
3. ``certood check`` on the export as it comes (layout yolo, no ``outputs:``, taps on the
   ``[1, K, A]`` class logits and the per-level class features) with ultralytics' NMS
   settings: ID mAP and per-score AUROC / FPR95 on ood-near and ood-far;
4. benchmarks/results/ultralytics_yolov8n.{json,md}.

    .venv/bin/python benchmarks/ultralytics_yolov8n_digitsdet.py [--venv DIR] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_ultralytics_fixtures import DEFAULT_VENV, ensure_venv, offline_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = DEFAULT_VENV.parent / "ultralytics-digitsdet"
EPOCHS, IMGSZ, BATCH, SEED = 8, 128, 16, 0

TRAIN = r'''
import json, sys
from pathlib import Path
from ultralytics import YOLO
job = json.loads(Path(sys.argv[1]).read_text())
work = Path(job["work"])
model = YOLO("yolov8n.yaml")
model.train(data=job["data"], epochs=job["epochs"], imgsz=job["imgsz"], batch=job["batch"], seed=job["seed"],
            fraction=job["fraction"],
            deterministic=True, workers=0, device="cpu", plots=False, project=str(work), name="train",
            exist_ok=True, verbose=False)
own = {}
for split in ("val", "test"):
    m = model.val(data=job["data"], split=split, imgsz=job["imgsz"], batch=job["batch"], device="cpu",
                  plots=False, verbose=False, project=str(work), name=f"val-{split}", exist_ok=True)
    own[split] = {"map50": float(m.box.map50), "map": float(m.box.map), "conf": 0.001, "iou": 0.7}
onnx = model.export(format="onnx", imgsz=job["imgsz"], device="cpu")
print(json.dumps({"ultralytics_val": own, "onnx": str(Path(onnx).resolve())}))
'''

SPEC = """\
version: 1
detector:
  kind: onnx
  path: {onnx}
  layout: yolo
  score_thresh: 0.001   # ultralytics' val settings
  nms_thresh: 0.7
  max_detections: 300
  multi_label: true
  tensors:
    cls_logits: /model.22/Concat_1_output_0
    head.cls_features: [/model.22/cv3.0/cv3.0.1/act/Mul_output_0, /model.22/cv3.1/cv3.1.1/act/Mul_output_0,
                        /model.22/cv3.2/cv3.2.1/act/Mul_output_0]
data:
  fit:         {{digitsdet: train, max_images: 600}}
  calibration: {{digitsdet: val}}
  id_test:     {{digitsdet: test}}
  ood:
    near: {{digitsdet: ood-near}}
    far:  {{digitsdet: ood-far}}
taps: {{logits: cls_logits, features: head.cls_features}}
scores:
  energy:    {{tap: logits}}
  msp:       {{tap: logits}}
  max_logit: {{tap: logits}}
  maha:      {{kind: mahalanobis, tap: features}}
  knn:       {{kind: knn, tap: features}}
threshold: {{tpr: 0.95, detector_score: f1}}
rule: "energy > t.energy or maha > t.maha"
"""


def write_yolo_dataset(out: Path) -> Path:
    """DigitsDet train / val / test in ultralytics' layout (images/<split>, labels/<split>:
    one ``class cx cy w h`` line per object, normalised), and its data.yaml."""
    from certood.data.digitsdet import ensure_digitsdet, split_paths

    root = ensure_digitsdet()
    names = None
    for split in ("train", "val", "test"):
        annotations, images = split_paths(root, split)
        coco = json.loads(annotations.read_text())
        categories = sorted(c["id"] for c in coco["categories"])
        names = [next(c["name"] for c in coco["categories"] if c["id"] == i) for i in categories]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        per_image: dict[int, list[str]] = {im["id"]: [] for im in coco["images"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for a in coco["annotations"]:
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            per_image[a["image_id"]].append(f"{categories.index(a['category_id'])} {(x + bw / 2) / w:.6f} "
                                            f"{(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        for im in coco["images"]:
            link = out / "images" / split / im["file_name"]
            if not link.exists():
                link.symlink_to(images / im["file_name"])
            (out / "labels" / split / Path(im["file_name"]).with_suffix(".txt").name).write_text(
                "\n".join(per_image[im["id"]]) + "\n")
    data = out / "data.yaml"
    data.write_text(json.dumps({"path": str(out), "train": "images/train", "val": "images/val",
                                "test": "images/test", "names": dict(enumerate(names))}))
    return data


def train(python: Path, work: Path, epochs: int = EPOCHS, fraction: float = 1.0) -> dict:
    record = work / ("trained.json" if (epochs, fraction) == (EPOCHS, 1.0) else "trained-smoke.json")
    if record.exists():  # trained before: reuse (delete the file to train again)
        return json.loads(record.read_text())
    data = write_yolo_dataset(work / "yolo")
    job = work / "job.json"
    job.write_text(json.dumps({"work": str(work), "data": str(data), "epochs": epochs, "imgsz": IMGSZ,
                               "batch": BATCH, "seed": SEED, "fraction": fraction}))
    (work / "train.py").write_text(TRAIN)
    start = time.time()
    done = subprocess.run([str(python), str(work / "train.py"), str(job)], cwd=work,
                          env=offline_env(work / "cfg"), capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(3)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["train_seconds"] = round(time.time() - start, 1)
    record.write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--work", type=Path, default=WORK, help="dataset copy, training runs, weights")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on 5%% of train, no results written")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    trained = train(ensure_venv(args.venv), args.work, *((1, 0.05) if args.smoke else (EPOCHS, 1.0)))
    if args.smoke:
        print(json.dumps(trained))
        return 0

    from certood.check import run_check
    from certood.spec import load_spec_text

    spec = load_spec_text(SPEC.format(onnx=trained["onnx"]))
    with tempfile.TemporaryDirectory(prefix="certood-yolov8n-") as tmp:
        result = run_check(spec, Path(tmp) / "check")
    m = result.metrics
    record = {
        "detector": "ultralytics YOLOv8n (yolov8n.yaml), trained on DigitsDet train",
        "training": {"epochs": EPOCHS, "imgsz": IMGSZ, "batch": BATCH, "seed": SEED, "device": "cpu",
                     "seconds": trained["train_seconds"]},
        "ultralytics_val": trained["ultralytics_val"],
        "certood": {"id_test": m["id_test"], "detector_threshold": m["monitor"]["detector_threshold"],
                    "ood": {name: {"n_boxes": e["n_boxes"], "boxes_per_image": e["boxes_per_image"],
                                   "scores": e.get("scores", {})} for name, e in m["ood"].items()}},
        "spec": SPEC.format(onnx="<cache>/yolov8n-digitsdet.onnx"),
        "versions": m["versions"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ultralytics_yolov8n.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# certood on a stock ultralytics YOLOv8n export (DigitsDet)", "",
             f"Trained by `benchmarks/ultralytics_yolov8n_digitsdet.py` ({EPOCHS} epochs, {IMGSZ} px, seed {SEED}, "
             f"CPU, {trained['train_seconds'] / 60:.0f} min); weights not shipped (AGPL-3.0).", "",
             f"ID test mAP50: ultralytics val {trained['ultralytics_val']['test']['map50']:.3f}, certood "
             f"{m['id_test']['map50']:.3f} (same NMS: conf 0.001, IoU 0.7, 300 per image; certood resizes "
             f"128 px images to the 128 px input, no letterbox needed).", "",
             "| OOD set | boxes | score | AUROC | FPR95 |", "|---|---|---|---|---|"]
    for name, e in m["ood"].items():
        for score, s in e.get("scores", {}).items():
            lines.append(f"| {name} | {e['n_boxes']} | {score} | {s['auroc']:.3f} | {s['fpr95']:.3f} |")
    (RESULTS / "ultralytics_yolov8n.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
