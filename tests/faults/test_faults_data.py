"""Fault injection: broken images and annotation files under `certood check` (issue 19, items
2, 4, the image/annotation part of 5, and 7's last point).

Small broken data sets are copied from the tiny DigitsDet fixture (never modified in place) and
checked with the bundled trained detector through the CLI. What must hold:

- an image that cannot be read faithfully (truncated, zero bytes, text named .png, a FIFO, a
  decompression bomb) is reported, naming the data set, the file and what, and skipped; the
  run goes on (exit 0) and mAP is computed over the images read only (pycocotools on the
  reduced set gives the same numbers);
- 16-bit and palette images are read as the pixels they hold (the detector finds the digits);
- bad boxes, unknown categories, declared sizes that differ from the file, and every issue of
  the fit, calibration, id_test and OOD sets reach metrics.json;
- an annotation file that is not a regular file, gives two images one id, or lists no image,
  and a set with no readable image, end the run with exit 3 and one located message, no
  traceback; annotation files are all checked before the detector loads.
"""
from __future__ import annotations

import copy
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import certood.check as check_module
from certood.cli import main

SPEC = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn", num_classes: 6,
            min_size: 128, max_size: 128}}
data:
  fit:         {{annotations: {fit}, images: {root}/fit}}
  calibration: {{annotations: {cal}, images: {root}/cal}}
  id_test:     {{annotations: {test}, images: {root}/test}}
  ood:
    near: {{annotations: {near}, images: {root}/near}}
taps: {{penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: 0.95, detector_score: f1}}
rule: "energy > t.energy or maha > t.maha"
"""
GUARD_S = 60.0  # a hang guard, not a speed test: before the fix a FIFO blocked for ever


def copy_split(src: Path, split: str, dest: Path, name: str, n: int) -> dict:
    """The first ``n`` images of DigitsDet ``split`` copied to ``dest/name`` with their
    annotations (``dest/name.json`` is written by :func:`write`)."""
    coco = json.loads((src / f"{split}.json").read_text())
    images = coco["images"][:n]
    (dest / name).mkdir(parents=True)
    for im in images:
        shutil.copyfile(src / split / im["file_name"], dest / name / im["file_name"])
    ids = {im["id"] for im in images}
    return {"images": images, "categories": coco["categories"],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def write(dest: Path, name: str, coco: dict) -> Path:
    path = dest / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


def run_cli(*args: str, seconds: float = GUARD_S):
    """``certood`` in-process, in a thread so that a blocked read fails the test, not the run."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(r=CliRunner().invoke(main, list(args))), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"certood {' '.join(args)} still running after {seconds} s (blocked?)")
    result = box["r"]
    text = result.output  # stdout and stderr, as a terminal shows them
    assert "Traceback" not in text and "internal error" not in text, text
    return result, text


@pytest.fixture(scope="module")
def dataset_files(digitsdet_root, tmp_path_factory) -> dict:
    """Clean copies: fit (8 train images), cal (10 val), test (12 test), near (6 ood-near)."""
    dest = tmp_path_factory.mktemp("clean")
    parts = {"fit": ("train", 8), "cal": ("val", 10), "test": ("test", 12), "near": ("ood-near", 6)}
    cocos = {name: copy_split(digitsdet_root, split, dest, name, n) for name, (split, n) in parts.items()}
    return {"root": dest, "coco": cocos}


def clone(dataset_files, tmp_path: Path) -> tuple[Path, dict]:
    """A private copy of the clean sets to break (the shared one stays clean)."""
    root = tmp_path / "data"
    shutil.copytree(dataset_files["root"], root)
    return root, copy.deepcopy(dataset_files["coco"])


def spec_file(root: Path, cocos: dict, **paths: str) -> Path:
    """Annotation files written from ``cocos``; ``paths`` replace some (a device, a FIFO)."""
    files = {name: paths.get(name) or write(root, name, coco) for name, coco in cocos.items()}
    spec = root / "spec.yaml"
    spec.write_text(SPEC.format(root=root, **files))
    return spec


# ----------------------------------------------------------------------------- one run, many faults
@pytest.fixture(scope="module")
def broken_run(dataset_files, tmp_path_factory, bomb_png):
    root, cocos = clone(dataset_files, tmp_path_factory.mktemp("broken"))
    test_dir, names = root / "test", [im["file_name"] for im in cocos["test"]["images"]]
    broken = {}
    whole = (test_dir / names[0]).read_bytes()
    (test_dir / names[0]).write_bytes(whole[: len(whole) // 2])
    broken[names[0]] = "unreadable image"  # truncated
    (test_dir / names[1]).write_bytes(b"")
    broken[names[1]] = "unreadable image"  # zero bytes
    (test_dir / names[2]).write_text("this is not a PNG")
    broken[names[2]] = "unreadable image"
    (test_dir / names[3]).unlink()
    os.mkfifo(test_dir / names[3])
    broken[names[3]] = "expected a regular image file, found a FIFO"
    bomb_png(test_dir / names[4], 9000, 9000)
    broken[names[4]] = "9000x9000 = 81,000,000 pixels is over the limit"
    gray = np.asarray(Image.open(test_dir / names[5]))
    Image.fromarray(gray.astype(np.uint16) * 257).save(test_dir / names[5])  # 16-bit, same picture
    Image.open(test_dir / names[6]).convert("P").save(test_dir / names[6])  # palette
    cocos["test"]["images"][7]["width"] = 160  # declared size != file
    cocos["test"]["annotations"] += [
        {"id": 900, "image_id": cocos["test"]["images"][8]["id"], "category_id": 1, "bbox": [200, 10, 20, 20]},
        {"id": 901, "image_id": cocos["test"]["images"][9]["id"], "category_id": 77, "bbox": [10, 10, 20, 20]}]
    fit_dir = root / "fit"
    fit_name = cocos["fit"]["images"][0]["file_name"]
    (fit_dir / fit_name).write_bytes((fit_dir / fit_name).read_bytes()[:100])
    cocos["cal"]["annotations"].append(
        {"id": 902, "image_id": cocos["cal"]["images"][0]["id"], "category_id": 2, "bbox": [130, 5, 10, 10]})
    near_name = cocos["near"]["images"][0]["file_name"]
    (root / "near" / near_name).write_bytes(b"")
    spec = spec_file(root, cocos)
    out = root / "out"
    start = time.perf_counter()
    result, text = run_cli("check", str(spec), "--out", str(out))
    return {"result": result, "text": text, "out": out, "root": root, "names": names, "broken": broken,
            "spec": spec, "fit_name": fit_name, "near_name": near_name, "seconds": time.perf_counter() - start}


def test_bad_images_are_reported_with_set_file_and_why_and_the_run_goes_on(broken_run):
    assert broken_run["result"].exit_code == 0, broken_run["text"]
    metrics = json.loads((broken_run["out"] / "metrics.json").read_text())
    issues = metrics["issues"]
    test_dir = broken_run["root"] / "test"
    for name, what in broken_run["broken"].items():
        hits = [m for m in issues if m.startswith(f"id_test: {test_dir / name}: ") and what in m]
        assert len(hits) == 1 and hits[0].endswith("skipped"), (name, what, issues)
    assert metrics["id_test"]["n_images"] == 12 - len(broken_run["broken"])
    summary = (broken_run["out"] / "summary.txt").read_text()
    assert f"{len(issues)} data issue(s)" in summary


def test_issues_of_every_data_set_reach_metrics_json(broken_run):
    issues = json.loads((broken_run["out"] / "metrics.json").read_text())["issues"]
    root, names = broken_run["root"], broken_run["names"]

    def one(prefix: str, *parts: str) -> None:
        assert sum(m.startswith(prefix) and all(p in m for p in parts) for m in issues) == 1, (prefix, parts, issues)

    one(f"fit: {root / 'fit' / broken_run['fit_name']}: ", "unreadable image")
    one(f"ood/near: {root / 'near' / broken_run['near_name']}: ", "unreadable image")
    one(f"calibration: {root / 'cal.json'}: ", "lies outside the 128x128 image; skipped")
    one(f"id_test: {root / 'test.json'}: ", "bbox [200.0, 10.0, 20.0, 20.0] lies outside the 128x128 image")
    one(f"id_test: {root / 'test.json'}: ", "category id 77, not one of the file's categories")
    one(f"id_test: {root / 'test' / names[7]}: ", "declared 160x128 in the annotations, the file is 128x128")


def test_16_bit_and_palette_images_are_read_as_the_pictures_they_hold(broken_run):
    issues = json.loads((broken_run["out"] / "metrics.json").read_text())["issues"]
    names = broken_run["names"]
    assert not [m for m in issues if names[5] in m or names[6] in m]
    test = json.loads((broken_run["root"] / "test.json").read_text())
    ids = {test["images"][5]["id"], test["images"][6]["id"]}
    boxes = [json.loads(line) for line in (broken_run["out"] / "boxes.jsonl").read_text().splitlines()]
    found = {b["image_id"] for b in boxes if b["dataset"] == "id_test" and b["gt_category_id"] is not None}
    assert ids <= found  # a near-white (clipped) 16-bit image gives no box on a digit


def test_map_is_computed_over_the_images_read_only(broken_run):
    """metrics.json's mAP equals pycocotools on the annotation file reduced to the images read;
    on the whole file (the old way) the unread images' objects would count as misses."""
    import contextlib

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from certood.check import load_spec_detector
    from certood.data.coco import CocoDataset
    from certood.extract import extract_detections
    from certood.spec import load_spec

    metrics = json.loads((broken_run["out"] / "metrics.json").read_text())
    root = broken_run["root"]
    dataset = CocoDataset.load(root / "test.json", root / "test", name="id_test")
    dets = extract_detections(load_spec_detector(load_spec(broken_run["spec"])), dataset, [])
    results = dets.coco_results(dataset.category_ids)
    read = set(dets.read_image_ids)
    assert len(read) == metrics["id_test"]["n_images"] == 7

    def cocoeval(images: set) -> list[float]:
        gt = {**dataset.coco, "images": [im for im in dataset.coco["images"] if im["id"] in images],
              "annotations": [{**a} for a in dataset.coco["annotations"] if a["image_id"] in images]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return [float(v) for v in ev.stats[:3]]

    expected = cocoeval(read)
    got = [metrics["id_test"][k] for k in ("map", "map50", "map75")]
    assert got == pytest.approx(expected, abs=1e-9)
    assert expected[1] > 0.9  # the trained detector on the images it saw
    whole = cocoeval({im["id"] for im in dataset.coco["images"]})
    assert whole[1] < expected[1] - 0.2  # 5 of 12 images' objects all missed


# ----------------------------------------------------------------------------- faults that end the run
@pytest.fixture()
def no_detector(monkeypatch):
    """Counts detector loads: a bad annotation file must stop the run before the first."""
    loads = []

    def refuse(spec):
        loads.append(spec)
        raise AssertionError("the detector was loaded before the data were checked")

    monkeypatch.setattr(check_module, "load_spec_detector", refuse)
    return loads


def _exit_3(result, text, *parts: str) -> None:
    assert result.exit_code == 3, text
    error_lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and all(p in error_lines[0] for p in parts), (parts, text)


def test_duplicate_image_ids_end_the_run_before_the_detector_loads(dataset_files, tmp_path, no_detector):
    root, cocos = clone(dataset_files, tmp_path)
    near = cocos["near"]["images"]
    near[3]["id"] = near[1]["id"]
    result, text = run_cli("check", str(spec_file(root, cocos)), "--out", str(tmp_path / "out"))
    _exit_3(result, text, f"{root / 'near.json'}: image ids must be unique", f"repeats image id {near[1]['id']}",
            near[3]["file_name"], near[1]["file_name"])
    assert no_detector == []


@pytest.mark.parametrize("kind", ["/dev/zero", "/dev/urandom", "fifo", "directory"])
def test_an_annotation_file_that_is_not_a_regular_file_ends_the_run_at_once(dataset_files, tmp_path,
                                                                            no_detector, kind):
    root, cocos = clone(dataset_files, tmp_path)
    if kind == "fifo":  # opening it for reading would block for ever
        target, found = root / "near-fifo.json", "a FIFO"
        os.mkfifo(target)
    elif kind == "directory":
        target, found = root / "near", "a directory"
    else:  # reading it never ends (MemoryError before the fix)
        target, found = Path(kind), "a character device"
    spec = spec_file(root, cocos, near=str(target))
    start = time.perf_counter()
    result, text = run_cli("check", str(spec), "--out", str(tmp_path / "out"))
    _exit_3(result, text, f"{target}: expected a regular annotation file, found {found}")
    assert no_detector == [] and time.perf_counter() - start < GUARD_S


def test_an_empty_split_is_a_data_error_naming_the_set_and_its_file(dataset_files, tmp_path, no_detector):
    root, cocos = clone(dataset_files, tmp_path)
    cocos["test"]["images"], cocos["test"]["annotations"] = [], []
    result, text = run_cli("check", str(spec_file(root, cocos)), "--out", str(tmp_path / "out"))
    _exit_3(result, text, f"id_test ({root / 'test.json'}): lists no usable image")
    assert no_detector == []


def test_a_split_with_no_readable_image_is_a_data_error_naming_the_set_and_its_file(dataset_files, tmp_path):
    root, cocos = clone(dataset_files, tmp_path)
    for im in cocos["near"]["images"]:
        (root / "near" / im["file_name"]).write_bytes(b"")
    result, text = run_cli("check", str(spec_file(root, cocos)), "--out", str(tmp_path / "out"))
    _exit_3(result, text, f"ood/near ({root / 'near.json'}): none of its 6 images could be read",
            f"first: {root / 'near' / cocos['near']['images'][0]['file_name']}: unreadable image")


def test_issues_of_the_ood_validation_set_reach_the_monitor_and_the_results(dataset_files, tmp_path):
    """Thresholds at an FPR on an OOD validation set: its bad image is reported (it was not)."""
    root, cocos = clone(dataset_files, tmp_path)
    bad = root / "near" / cocos["near"]["images"][2]["file_name"]
    bad.write_text("not an image")
    spec = spec_file(root, cocos)
    text = spec.read_text().replace("  ood:\n    near:", "  ood_validation:\n    near:")
    spec.write_text(text.replace("threshold: {tpr: 0.95, detector_score: f1}",
                                 "threshold: {fpr: 0.1, on: near, detector_score: f1}"))
    result, out = run_cli("calibrate", str(spec), "-o", str(tmp_path / "monitor"))
    assert result.exit_code == 0, out
    issues = json.loads((tmp_path / "monitor" / "manifest.json").read_text())["calibration"]["calibration_issues"]
    assert [m for m in issues if m.startswith(f"ood_validation/near: {bad}: unreadable image")], issues
