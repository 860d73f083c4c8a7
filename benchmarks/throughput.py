"""How fast and how big `certood check` runs (issue 15): throughput against the detector alone,
peak memory against the test set's size, Ray workers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/throughput.py            # the recorded run
    .venv/bin/python benchmarks/throughput.py --quick                      # a smoke run (minutes)

1. **Throughput ratio**: images/s of `certood check` (a calibrated monitor given with
   ``--monitor``: no calibration in the timing; images decoded by ``run.workers`` DataLoader
   processes, stages, shards on disk, metrics, report) over images/s of the detector alone on
   the same images (decoded the same way, fed to ``detector.detect`` in the same batches,
   nothing else), in the same run, alternating, best of ``--repeats``. On the demo detector
   (specs/demo.yaml's sets and scores) and on a torchvision ``fasterrcnn_resnet50_fpn`` (random
   init, seed 0; nothing downloaded) on DigitsDet canvases upscaled to 800x800, with the demo
   spec's kinds of scores (energy on the logits, Mahalanobis on the box head's output), every box
   the detector keeps monitored (``detector_score: 0.0``: a random head has no F1 cut).
2. **Peak memory**: the peak RSS (``ru_maxrss``) of a ``certood check`` subprocess with the
   demo monitor on generated DigitsDet test splits of 1k, 4k and 16k images (``--sizes``).
3. **Ray**: the demo check on a local Ray instance with 1 and 2 workers (when ``ray`` is
   installed), images/s.

Writes ``benchmarks/results/throughput.{json,md}`` (``--out``) with the command that made them
and the load average around each measurement: the machines are shared, the ratios are what to
read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from certood.check import load_spec_detector, run_check  # noqa: E402
from certood.data.batches import image_batches  # noqa: E402
from certood.monitor import spec_datasets  # noqa: E402
from certood.spec import load_spec, load_spec_text  # noqa: E402
from certood.stages import shard_batches  # noqa: E402

DEMO = REPO / "specs" / "demo.yaml"


def load() -> float:
    return os.getloadavg()[0]


def test_sets(spec):
    """(name, CocoDataset) of every test set of ``spec`` (what check streams)."""
    datasets = spec_datasets(spec, calibration=False, test=True)
    names = (["id_test"] if spec.data.id_test else []) + [f"ood/{n}" for n in spec.data.ood]
    return [(n, datasets[n]) for n in names]


def detector_only(spec, detector, sets, workers: int) -> tuple[int, float]:
    """Images and seconds of the detector alone over ``sets``: decoded by ``workers`` DataLoader
    processes, fed in the check's batches, nothing else done with the results."""
    batch_size = getattr(detector, "batch_size", None) or 8
    n, start = 0, time.perf_counter()
    for _, dataset in sets:
        batches = shard_batches(list(range(len(dataset.records))), batch_size)
        for batch in image_batches(dataset.records, batches, workers=workers):
            if batch.images:
                with torch.inference_mode():
                    detector.detect(batch.images)
            n += len(batch.images)
    return n, time.perf_counter() - start


def check_once(spec, monitor_dir: Path, out: Path) -> tuple[int, float, dict]:
    """Images and seconds of one ``certood check`` (in process) with a calibrated monitor."""
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    result = run_check(spec, out, monitor_dir=monitor_dir)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    del result
    return _images_of(metrics), seconds, metrics


def _images_of(metrics: dict) -> int:
    n = metrics["id_test"]["n_images"] if metrics.get("id_test") else 0
    return n + sum(part["n_images"] for part in metrics["ood"].values())


def with_workers(spec, workers: int):
    from dataclasses import replace

    return replace(spec, run=replace(spec.run, workers=workers))


def throughput(label: str, spec, work: Path, workers_list, repeats: int) -> list[dict]:
    """The ratio rows for one detector: per worker count, best-of-``repeats`` detector-only and
    check times on the same images, alternating."""
    print(f"[{label}] calibrating once ...", flush=True)
    cal = work / f"{label}-calibrated"
    start = time.perf_counter()
    run_check(spec, cal)
    calibration_seconds = time.perf_counter() - start
    detector = load_spec_detector(spec)
    sets = test_sets(spec)
    rows = []
    for workers in workers_list:
        s = with_workers(spec, workers)
        det, chk, loads = [], [], []
        for r in range(repeats):
            loads.append(load())
            n_det, t_det = detector_only(s, detector, sets, workers)
            n_chk, t_chk, metrics = check_once(s, cal / "monitor", work / f"{label}-check")
            det.append(t_det)
            chk.append(t_chk)
            print(f"[{label}] workers {workers} repeat {r}: detector {n_det / t_det:.2f} img/s, "
                  f"check {n_chk / t_chk:.2f} img/s, ratio {t_det / t_chk:.3f} (load {loads[-1]:.2f})", flush=True)
        assert n_det == n_chk, (n_det, n_chk)
        rows.append({"detector": label, "workers": workers, "images": n_chk,
                     "detector_images_per_s": n_det / min(det), "check_images_per_s": n_chk / min(chk),
                     "ratio": min(det) / min(chk), "detector_seconds": det, "check_seconds": chk,
                     "load_before": loads, "boxes": (metrics["id_test"] or {}).get("n_boxes"),
                     "calibration_seconds": calibration_seconds,
                     "cost": metrics["cost"]})
    return rows


def upscaled_digitsdet(root: Path, size: int, counts: dict[str, int]) -> Path:
    """DigitsDet canvases (the demo's splits) resized to ``size`` x ``size``, boxes scaled with
    them, as COCO files under ``root``: an 800-px workload without a dataset download."""
    from PIL import Image

    base = load_spec(DEMO)
    datasets = spec_datasets(base, calibration=True, test=True)
    pick = {"train": datasets["fit"], "val": datasets["calibration"], "test": datasets["id_test"]}
    for split, n in counts.items():
        src = pick[split]
        (root / split).mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": src.coco["categories"]}
        for r in src.records[:n]:
            name = f"{r.image_id:06d}.png"
            Image.open(r.path).convert("RGB").resize((size, size), Image.BILINEAR).save(root / split / name)
            coco["images"].append({"id": r.image_id, "file_name": name, "width": size, "height": size})
            sx, sy = size / r.width, size / r.height
            for box, cat in zip(r.gt_boxes.tolist(), r.gt_categories.tolist()):
                x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": r.image_id,
                                            "category_id": int(cat), "bbox": [x0, y0, x1 - x0, y1 - y0],
                                            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        (root / f"{split}.json").write_text(json.dumps(coco))
    return root


def r50_spec(work: Path, counts: dict[str, int]):
    """A spec for a random-init torchvision R50-FPN (seed 0) on upscaled 800-px canvases."""
    from safetensors.torch import save_file
    from torchvision.models import detection

    torch.manual_seed(0)
    model = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=6)
    weights = work / "r50_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    root = upscaled_digitsdet(work / "digits800", 800, counts)
    pseudo_label_fit_set(root, weights)
    text = f"""
version: 1
detector: {{kind: torchvision, arch: fasterrcnn_resnet50_fpn, weights: {weights}, num_classes: 6,
           min_size: 800, max_size: 800}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train}}
  calibration: {{annotations: {root}/val.json, images: {root}/val}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test}}
taps: {{penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: 0.95, detector_score: 0.0}}
rule: "energy > t.energy or maha > t.maha"
"""
    return load_spec_text(text, filename="<throughput r50>")


def demo_with_test_set(root: Path) -> str:
    """specs/demo.yaml's text with its test sets replaced by ``root``'s test split alone."""
    import yaml

    raw = yaml.safe_load(DEMO.read_text())
    raw["data"] = {k: v for k, v in raw["data"].items() if k in ("fit", "calibration")}
    raw["data"]["id_test"] = {"annotations": str(root / "test.json"), "images": str(root / "test")}
    raw.pop("output", None)
    return yaml.safe_dump(raw, sort_keys=False)


def pseudo_label_fit_set(root: Path, weights: Path, per_image: int = 20) -> None:
    """Replace the fit split's ground truth by the random detector's own top boxes: a random
    head's boxes overlap no real object, and the fitted scores (Mahalanobis) need fit boxes
    on annotated objects. Timing only: these statistics mean nothing."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from certood.detectors.torchvision_frcnn import load_detector

    detector = load_detector("fasterrcnn_resnet50_fpn", str(weights), num_classes=6, min_size=800, max_size=800)
    coco = json.loads((root / "train.json").read_text())
    categories = sorted(int(c["id"]) for c in coco["categories"])
    coco["annotations"] = []
    for img in coco["images"]:
        x = pil_to_tensor(Image.open(root / "train" / img["file_name"]).convert("RGB")).float() / 255
        with torch.inference_mode():
            det = detector.detect([x])[0]
        for k in det.scores.argsort(descending=True)[:per_image].tolist():
            x0, y0, x1, y1 = det.boxes[k].tolist()
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": img["id"],
                                        "category_id": categories[int(det.labels[k]) - 1],
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                        "iscrowd": 0})
    (root / "train.json").write_text(json.dumps(coco))


PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def peak_rss(sizes: list[int], work: Path, monitor_dir: Path) -> list[dict]:
    """Peak RSS of a ``certood check`` subprocess per test-set size (generated DigitsDet test
    splits, the demo monitor, no OOD sets: the test set is what grows)."""
    from certood.data.digitsdet import generate_digitsdet

    rows = []
    for n in sizes:
        root = work / f"digits-{n}"
        start = time.perf_counter()
        generate_digitsdet(root, seed=1, sizes={"test": n}, splits=("test",))
        generated = time.perf_counter() - start
        spec = work / f"rss-{n}.yaml"
        spec.write_text(demo_with_test_set(root))
        out = work / f"rss-{n}-out"
        before = load()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "certood", "check",
                               str(spec), "--monitor", str(monitor_dir), "--out", str(out)],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"check on {n} images failed:\n{proc.stderr[-3000:]}")
        kib = int(proc.stdout.strip().splitlines()[-1])
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append({"images": n, "peak_rss_mib": kib / 1024, "seconds": seconds, "load_before": before,
                     "boxes": metrics["id_test"]["n_boxes"], "generate_seconds": generated,
                     "shards": metrics["run"]["shards"]})
        print(f"[rss] {n} images: peak RSS {kib / 1024:.0f} MiB, {seconds:.0f} s, "
              f"{metrics['id_test']['n_boxes']} boxes (load {before:.2f})", flush=True)
        shutil.rmtree(out)
        shutil.rmtree(root)
    return rows


def ray_rows(spec, monitor_dir: Path, work: Path, workers_list) -> list[dict] | str:
    try:
        import ray  # noqa: F401
        import certood.distributed  # noqa: F401
    except ImportError as e:
        return f"not measured: {e}"
    from dataclasses import replace

    from certood.spec.model import RaySpec

    rows = []
    for w in workers_list:
        s = replace(spec, run=replace(spec.run, ray=RaySpec(workers=w)))
        n, t, _ = check_once(s, monitor_dir, work / f"ray-{w}")
        rows.append({"ray_workers": w, "images": n, "seconds": t, "images_per_s": n / t})
        print(f"[ray] {w} workers: {n / t:.2f} img/s ({t:.0f} s, includes starting Ray)", flush=True)
    return rows


def markdown(record: dict) -> str:
    lines = ["# `certood check` throughput and memory", "",
             f"Command: `{record['command']}` ({record['seconds']:.0f} s on {record['machine']}, "
             f"{record['threads']} torch threads, {record['cpus']} CPUs; load average "
             f"{record['load_start']:.2f} at the start). Shared machine: read the ratios "
             "(measured in the same run, alternating, best of each), not the absolute rates.", "",
             "## Throughput: check images/s over the detector's alone", "",
             "Same images, decoded by the same number of DataLoader workers, in the same batches; "
             "check = the whole `certood check --monitor` (streamed stages, shards, metrics, report; "
             "no calibration).", "",
             "| detector | workers | images | detector img/s | check img/s | ratio | score/detector cost |",
             "|---|---|---|---|---|---|---|"]
    for r in record["throughput"]:
        lines.append(f"| {r['detector']} | {r['workers']} | {r['images']} | {r['detector_images_per_s']:.2f} | "
                     f"{r['check_images_per_s']:.2f} | **{r['ratio']:.3f}** | "
                     f"{r['cost']['score_to_detector_ratio']:.3f} |")
    if record.get("peak_rss"):
        base = record["peak_rss"][0]["peak_rss_mib"]
        lines += ["", "## Peak RSS against the test set's size", "",
                  "`certood check` subprocess, the demo monitor, a generated DigitsDet test split (seed 1), "
                  "no OOD sets.", "",
                  "| test images | monitored boxes | shards | peak RSS (MiB) | vs the smallest | seconds |",
                  "|---|---|---|---|---|---|"]
        for r in record["peak_rss"]:
            lines.append(f"| {r['images']} | {r['boxes']} | {r['shards']} | {r['peak_rss_mib']:.0f} | "
                         f"{r['peak_rss_mib'] / base:.3f} | {r['seconds']:.0f} |")
    ray = record.get("ray")
    lines += ["", "## Ray (local instance)", ""]
    if isinstance(ray, list):
        lines += ["| Ray workers | images | seconds (with Ray's start) | img/s |", "|---|---|---|---|"]
        lines += [f"| {r['ray_workers']} | {r['images']} | {r['seconds']:.0f} | {r['images_per_s']:.2f} |" for r in ray]
    else:
        lines.append(str(ray))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small sets, one repeat")
    p.add_argument("--sizes", default="1000,4000,16000", help="test-set sizes for the peak RSS")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--r50-images", type=int, default=16, help="800-px test images for the R50-FPN")
    p.add_argument("--r50-workers", default="0,1", help="DataLoader worker counts to time on the R50-FPN")
    p.add_argument("--skip", default="", help="comma list of parts to skip: demo,r50,rss,ray")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "throughput")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    repeats = args.repeats
    r50_counts = {"train": 8, "val": 16, "test": args.r50_images}
    if args.quick:
        sizes, workers, repeats = [200, 400], [0, 1], 1
        r50_counts = {"train": 6, "val": 6, "test": 6}
    started = time.perf_counter()
    record = {"command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)"),
                                   ".venv/bin/python", "benchmarks/throughput.py", *(argv or sys.argv[1:])]),
              "machine": platform.machine(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_start": load(), "throughput": []}
    work = Path(tempfile.mkdtemp(prefix="certood-throughput-"))
    try:
        demo = load_spec(DEMO)
        if args.quick:
            demo = load_spec_text(f"extends: {DEMO}\ndata:\n  id_test: {{digitsdet: test, max_images: 60}}\n"
                                  "  ood: {near: {digitsdet: ood-near, max_images: 40}}\n", filename="<quick>")
        if "demo" not in skip:
            record["throughput"] += throughput("demo digits_fasterrcnn", demo, work, workers, repeats)
        if "r50" not in skip:
            r50_workers = [0, 1] if args.quick else [int(w) for w in args.r50_workers.split(",")]
            record["throughput"] += throughput("fasterrcnn_resnet50_fpn 800px", r50_spec(work, r50_counts), work,
                                               r50_workers, repeats)
        demo_monitor = work / "demo-monitor"
        if not {"rss", "ray"} <= skip:
            if not (work / "demo digits_fasterrcnn-calibrated").is_dir():
                run_check(demo, work / "demo digits_fasterrcnn-calibrated")
            shutil.copytree(work / "demo digits_fasterrcnn-calibrated" / "monitor", demo_monitor)
        if "rss" not in skip:
            record["peak_rss"] = peak_rss(sizes, work, demo_monitor)
        if "ray" not in skip:
            record["ray"] = ray_rows(demo, demo_monitor, work, [1, 2])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["seconds"] = time.perf_counter() - started
    text = markdown(record)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(record, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(text)


if __name__ == "__main__":
    main()
