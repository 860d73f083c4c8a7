"""certood's Python API (certood.api): results equal ``certood check``'s boxes.jsonl, batch and
single-image calls agree, attaching checks the weights, streams equal the offline temporal
check frame by frame on DigitsDet-Video, and the example runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import certood
from certood.api import BoxResult, ImageResult, aggregate_step, as_image_tensor, state_dict_sha256
from certood.check import run_check
from certood.data.coco import read_image
from certood.errors import ArtifactError, UsageError
from certood.monitor import load_dataset
from certood.spec import load_spec_text

REPO = Path(__file__).resolve().parent.parent
SCORE_TOL = dict(rel=1e-4, abs=1e-4)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]


def _pair(online: tuple[BoxResult, ...], offline: list[dict]) -> list[tuple[BoxResult, dict]]:
    """Online boxes paired with the offline records of the same image: same label, nearest box
    and detector score (an optimal assignment; near ties may come in either order)."""
    from scipy.optimize import linear_sum_assignment

    assert len(online) == len(offline), f"{len(online)} online vs {len(offline)} offline boxes"
    if not online:
        return []
    cost = np.array([[max(abs(x - y) for x, y in zip(a.box, b["box"])) + abs(a.det_score - b["det_score"])
                      + (1e6 if a.label != b["label"] else 0.0) for b in offline] for a in online])
    rows, cols = linear_sum_assignment(cost)
    pairs = [(online[r], offline[c]) for r, c in zip(rows, cols)]
    for a, b in pairs:  # boxes.jsonl rounds boxes to 0.01 px and detector scores to 1e-5
        assert a.label == b["label"] and max(abs(x - y) for x, y in zip(a.box, b["box"])) <= 0.02
        assert a.det_score == pytest.approx(b["det_score"], abs=2e-5)
    return pairs


def _same_results(a: list[ImageResult], b: list[ImageResult]) -> None:
    for ra, rb in zip(a, b, strict=True):
        pairs = _pair(ra.boxes, [x.to_dict() for x in rb.boxes])
        for x, y in pairs:
            assert x.flag == y["flag"]
            for k, v in x.scores.items():
                assert v == pytest.approx(y["scores"][k], **SCORE_TOL)


# =========================================================================== tiny fixtures
@pytest.fixture(scope="module")
def checked(make_tiny_spec, tmp_path_factory):
    spec = make_tiny_spec()
    out = tmp_path_factory.mktemp("api-check") / "out"
    run_check(spec, out)
    return spec, out, certood.load(out / "monitor", spec=spec)


@pytest.fixture(scope="module")
def id_images(checked):
    spec, _, _ = checked
    dataset = load_dataset(spec.data.id_test, "id_test")
    return dataset, [(r, read_image(r.path)) for r in dataset.records[:4]]


def test_results_equal_the_box_records_of_check(checked, id_images):
    spec, out, mon = checked
    records = [r for r in _records(out) if r["dataset"] == "id_test"]
    _, images = id_images
    results = mon([im for _, im in images], image_ids=[r.image_id for r, _ in images])
    n = 0
    for result in results:
        offline = [r for r in records if r["image_id"] == result.image_id]
        for box, rec in _pair(result.boxes, offline):
            n += 1
            assert box.category_id == rec["category_id"] and box.flag == rec["flag"]
            assert set(box.scores) == set(rec["scores"]) == {"energy", "maha"}
            for k in box.scores:
                assert box.scores[k] == pytest.approx(rec["scores"][k], **SCORE_TOL)
            assert set(box.to_dict()) <= set(rec)  # the same field names as boxes.jsonl
    assert n > 20


def test_batch_and_single_image_calls_give_the_same_numbers(checked, id_images):
    _, _, mon = checked
    images = [im for _, im in id_images[1]]
    batch = mon(images)
    single = [mon(im) for im in images]
    stacked = mon(torch.stack(images))  # a 4-d tensor is a batch too
    assert isinstance(single[0], ImageResult) and [r.image_id for r in batch] == [0, 1, 2, 3]
    _same_results(batch, single)
    _same_results(stacked, single)


def test_tensor_numpy_and_pil_inputs_give_identical_results(checked, id_images):
    _, _, mon = checked
    record, tensor = id_images[1][0]
    with Image.open(record.path) as img:
        pil = img.convert("RGB")
    results = [mon(x).to_dict() for x in (tensor, np.asarray(pil), pil)]
    assert results[0] == results[1] == results[2] and results[0]["boxes"]
    with pytest.raises(UsageError, match="uint8"):
        mon(np.asarray(pil).astype(np.float32))
    with pytest.raises(UsageError, match="3 channels"):
        mon(torch.rand(1, 32, 32))
    with pytest.raises(UsageError, match=r"values in \[0, 1\]"):
        mon(tensor * 255)
    with pytest.raises(UsageError, match="found str"):
        mon("image.png")


def test_results_serialise_as_dicts_and_coco_results(checked, id_images):
    _, _, mon = checked
    [result] = mon([id_images[1][0][1]], image_ids=[7])
    d = result.to_dict()
    assert d["image_id"] == 7 and "weights_mismatch" not in d
    assert json.loads(json.dumps(d)) == d
    b = result.boxes[0]
    assert set(d["boxes"][0]) == {"box", "box_format", "label", "category_id", "det_score", "scores", "flag"}
    [coco, *_] = result.to_coco_results()
    assert coco["image_id"] == 7 and coco["category_id"] == b.category_id and coco["score"] == b.det_score
    assert coco["bbox"] == pytest.approx([b.box[0], b.box[1], b.box[2] - b.box[0], b.box[3] - b.box[1]])


def test_compile_calibrate_save_load_round_trip(checked, id_images, tmp_path):
    spec, _, loaded = checked
    mon = certood.compile(spec)
    assert not mon.calibrated
    with pytest.raises(UsageError, match="not calibrated"):
        mon(id_images[1][0][1])
    assert mon.calibrate() is mon and mon.calibrated
    assert mon.thresholds == pytest.approx(loaded.thresholds) and mon.detector_threshold == loaded.detector_threshold
    mon.save(tmp_path / "monitor")
    again = certood.load(tmp_path / "monitor", spec=spec)
    images = [im for _, im in id_images[1]]
    _same_results(again(images), loaded(images))


def test_load_finds_the_spec_the_manifest_names(make_tiny_spec, tmp_path):
    from certood.spec import load_spec

    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(make_tiny_spec().raw))  # the tiny spec as written (JSON is YAML)
    mon = certood.compile(path).calibrate()
    mon.save(tmp_path / "monitor")
    loaded = certood.load(tmp_path / "monitor")
    assert loaded.spec.fingerprint() == load_spec(path).fingerprint() and loaded.thresholds == mon.thresholds
    path.rename(tmp_path / "moved.yaml")
    with pytest.raises(ArtifactError, match="pass spec="):
        certood.load(tmp_path / "monitor")


# =========================================================================== attach
def _user_model(weights: Path):
    """The user's own in-memory model: built and loaded outside certood's loader."""
    from safetensors.torch import load_file

    from certood.detectors.torchvision_frcnn import digits_fasterrcnn

    model = digits_fasterrcnn(6, box_score_thresh=0.0)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def test_state_dict_hash_is_canonical():
    a = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([1, 2])}
    same = {"a": torch.tensor([1, 2]), "b": torch.arange(6.0).reshape(3, 2).T.contiguous().T.reshape(2, 3)}
    assert state_dict_sha256(a) == state_dict_sha256(same)
    changed = {**a, "b": a["b"].clone()}
    changed["b"][1, 2] += 1e-6
    assert state_dict_sha256(changed) != state_dict_sha256(a)
    assert state_dict_sha256({**a, "b": a["b"].double()}) != state_dict_sha256(a)
    assert state_dict_sha256({**a, "b": a["b"].reshape(3, 2)}) != state_dict_sha256(a)


def test_attach_to_an_in_memory_model_with_the_calibrated_weights(checked, id_images, random_weights):
    _, _, mon = checked
    attached = certood.attach(_user_model(random_weights), mon)
    assert attached.weights_mismatch is None
    images = [im for _, im in id_images[1]]
    _same_results(attached(images), mon(images))
    assert attached.fitted.detector_sha256 == mon.fitted.detector_sha256


def test_attach_refuses_other_weights_naming_both_hashes_unless_overridden(checked, id_images, random_weights):
    _, _, mon = checked
    model = _user_model(random_weights)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] += 0.5
    got = state_dict_sha256(model.state_dict())
    from certood.detectors.torchvision_frcnn import load_state_dict

    expected = state_dict_sha256(load_state_dict(random_weights))
    with pytest.raises(ArtifactError) as err:
        certood.attach(model, mon)
    assert got in str(err.value) and expected in str(err.value) and "allow_weight_mismatch" in str(err.value)
    attached = certood.attach(model, mon, allow_weight_mismatch=True)
    results = attached([im for _, im in id_images[1]])
    record = {"allow_weight_mismatch": True, "model_sha256": got, "calibrated_sha256": expected}
    assert all(r.weights_mismatch == record and r.to_dict()["weights_mismatch"] == record for r in results)
    with pytest.raises(UsageError, match="torchvision detection model"):
        certood.attach(torch.nn.Linear(2, 2), mon)


def test_attach_to_an_onnx_runtime_session(digitsdet_root, random_weights, tmp_path):
    import warnings

    import onnxruntime as ort

    from certood.detectors.torchvision_frcnn import export_two_stage_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's control flow
        tensors = export_two_stage_onnx(_user_model(random_weights), tmp_path / "frcnn.onnx")
        other = _user_model(random_weights)
        with torch.no_grad():
            other.roi_heads.box_predictor.cls_score.bias[1] += 0.5
        export_two_stage_onnx(other, tmp_path / "other.onnx")
    data = "\n".join(f"  {k}: {{annotations: {digitsdet_root}/{f}.json, images: {digitsdet_root}/{f}, max_images: 4}}"
                     for k, f in (("fit", "train"), ("calibration", "val"), ("id_test", "test")))
    spec = load_spec_text(
        "version: 1\ndetector:\n  kind: onnx\n  path: frcnn.onnx\n  num_classes: 6\n  score_thresh: 0.0\n"
        "  tensors: {" + ", ".join(f'{k}: "{v}"' for k, v in tensors.items()) + "}\n"
        f"data:\n{data}\n"
        "taps: {penultimate: box_head.output, logits: cls_logits}\n"
        "scores: {energy: {tap: logits}, maha: {kind: mahalanobis, tap: penultimate}}\n"
        "threshold: {tpr: 0.9, detector_score: 0.0}\n", base_dir=tmp_path)
    mon = certood.compile(spec).calibrate()
    images = [read_image(r.path) for r in load_dataset(spec.data.id_test, "id_test").records[:2]]
    from_path = certood.attach(ort.InferenceSession(str(tmp_path / "frcnn.onnx")), mon)
    from_bytes = certood.attach(ort.InferenceSession((tmp_path / "frcnn.onnx").read_bytes()), mon)
    _same_results(from_path(images), mon(images))
    _same_results(from_bytes(images), mon(images))
    with pytest.raises(ArtifactError, match="differ from the calibrated"):
        certood.attach(ort.InferenceSession(str(tmp_path / "other.onnx")), mon)


# =========================================================================== streams
def test_aggregate_steps_equal_the_offline_aggregates():
    from certood.temporal import aggregate_scores

    x = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    tracks, frames = torch.zeros(30, dtype=torch.long), torch.arange(30)
    for method in ("mean", "ema", "max", "cusum"):
        params = dict(alpha=0.3, k=0.5, mean=0.4, std=2.0)
        offline = aggregate_scores(x, tracks, frames, method, **params)
        state, online = None, []
        for v in x.tolist():
            state, a = aggregate_step(method, state, v, **params)
            online.append(a)
        torch.testing.assert_close(torch.tensor(online, dtype=torch.float64), offline, rtol=1e-12, atol=1e-12)


VIDEO_SPEC = """\
version: 1
detector: {kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn", num_classes: 6,
           min_size: 128, max_size: 128}
data:
  fit:         {digitsdet: train, max_images: 60}
  calibration: {digitsdet: video-val, max_images: 48}
  id_test:     {digitsdet: video-test, max_images: 48}
  ood:
    video: {digitsdet: video-ood, max_images: 48}
taps: {roi: box_head.input, penultimate: box_head.output, logits: cls_logits}
scores:
  energy: {tap: logits}
  maha:   {kind: mahalanobis, tap: penultimate}
threshold: {tpr: 0.95, detector_score: f1}
rule: "energy > t.energy or maha > t.maha"
temporal: {tracker: {iou: 0.3, max_age: 3}, aggregate: ema, alpha: 0.3, certified: {k: 3, n: 5}}
certify: {tap: roi, norm: inf, eps: 0.005, method: crown, exact: z3, timeout_s: 2}
"""


@pytest.fixture(scope="module")
def video_checked(tmp_path_factory):
    """specs/video.yaml's monitor with certificates, on the first two videos of DigitsDet-Video's
    video-test and video-ood (48 frames each), checked offline."""
    spec = load_spec_text(VIDEO_SPEC)
    out = tmp_path_factory.mktemp("api-video") / "out"
    run_check(spec, out)
    return spec, out, certood.load(out / "monitor", spec=spec)


@pytest.mark.parametrize("dataset_name, source", [("id_test", "id_test"), ("ood/video", "video")])
def test_stream_equals_the_offline_check_frame_by_frame(video_checked, dataset_name, source):
    spec, out, mon = video_checked
    records = [r for r in _records(out) if r["dataset"] == dataset_name]
    dataset = load_dataset(spec.data.id_test if source == "id_test" else spec.data.ood[source], dataset_name)
    frames = {int(im["id"]): (int(im["video_id"]), int(im["frame_id"])) for im in dataset.coco["images"]}
    streams, first_track, n_boxes, seen = {}, {}, 0, set()
    for record, image in dataset.iter_images():
        video, frame = frames[record.image_id]
        stream = streams.setdefault(video, mon.stream())
        result = stream(image, frame_id=frame)
        assert result.frame_id == frame
        offline = [r for r in records if r["image_id"] == record.image_id]
        for box, rec in _pair(result.boxes, offline):
            n_boxes += 1
            assert (rec["video_id"], rec["frame_id"]) == (video, frame)
            # track ids: offline ones are offset per video (unique across videos), online start at 0
            offset = first_track.setdefault(video, min(r["track_id"] for r in records if r["video_id"] == video))
            assert box.track_id == rec["track_id"] - offset
            assert box.flag == rec["flag"] and box.track_flag == rec["track_flag"]
            assert box.certificate["verdict"] == rec["certificate"]["verdict"]
            assert box.track_certified_ood == rec["track_certified_ood"]
            for k in ("energy", "maha"):
                assert box.scores[k] == pytest.approx(rec["scores"][k], **SCORE_TOL)
                assert box.track_scores[k] == pytest.approx(rec["track_scores"][k], **SCORE_TOL)
            assert set(box.to_dict()) <= set(rec)
            seen |= {("flag", box.flag), ("track_flag", box.track_flag), ("verdict", box.certificate["verdict"])}
    assert len(streams) == 2 and n_boxes == len(records) > 50
    assert {("track_flag", True), ("track_flag", False), ("flag", True)} <= seen  # not vacuous
    if source == "video":
        assert ("verdict", "certified_ood") in seen


def test_a_stream_takes_one_frame_at_a_time_in_order(video_checked):
    _, _, mon = video_checked
    stream = mon.stream()
    frame = torch.zeros(3, 128, 128)
    assert stream(frame).frame_id == 0 and stream(frame).frame_id == 1
    with pytest.raises(certood.CertoodError, match="increasing frames"):
        stream(frame, frame_id=1)
    with pytest.raises(UsageError, match="one frame per call"):
        stream([frame, frame])


# =========================================================================== the example
def test_the_example_runs(tmp_path):
    """examples/monitor_from_python.py, on the bundled demo detector with small data sets."""
    spec = tmp_path / "small-demo.yaml"
    spec.write_text(f"extends: {REPO / 'specs' / 'demo.yaml'}\n"
                    "data:\n  fit: {digitsdet: train, max_images: 60}\n"
                    "  calibration: {digitsdet: val, max_images: 60}\n  id_test: {digitsdet: test, max_images: 4}\n")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "monitor_from_python.py"), "--spec", str(spec),
                           "--images", "4"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "certood.Monitor calibrated" in done.stdout and "weights verified" in done.stdout
    assert "frame 3: track ids" in done.stdout


def test_docstring_examples_run():
    import doctest

    import certood.api

    result = doctest.testmod(certood.api)
    assert result.failed == 0 and result.attempted >= 5
