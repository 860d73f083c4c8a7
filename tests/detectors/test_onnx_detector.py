"""The ONNX adapter on an ONNX export of the demo Faster R-CNN (random weights, made here):
detections, per-box features and OOD scores equal the PyTorch adapter's, and the monitored
head converted back with onnx2torch computes the same logits."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from certood.detectors.onnx_detector import OnnxDetector
from certood.detectors.torchvision_frcnn import (
    TorchvisionFasterRCNN, digits_fasterrcnn, export_two_stage_onnx,
)
from certood.errors import CertoodError
from certood.scores import Energy, Mahalanobis

# the graph tensors the TorchScript exporter names after the modules of TwoStageOnnxModule
FRCNN_TENSORS = {"box_head.input": "/box_roi_pool/RoiAlign_output_0",
                 "box_head.output": "/box_head/Relu_1_output_0",
                 "cls_logits": "/box_predictor/cls_score/Gemm_output_0"}


def _random_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_fasterrcnn(6, box_score_thresh=0.0)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(40.0)
    return model.eval()


def export_two_stage(model, path, dynamic: bool = True):
    assert export_two_stage_onnx(model, path, dynamic=dynamic) == FRCNN_TENSORS
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import warnings

    model = _random_model()
    path = tmp_path_factory.mktemp("onnx") / "frcnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's python control flow
        export_two_stage(model, path)
    return TorchvisionFasterRCNN(model), OnnxDetector(path, FRCNN_TENSORS)


@pytest.fixture(scope="module")
def detections(pair):
    torch_det, onnx_det = pair
    g = torch.Generator().manual_seed(1)
    # sizes multiple of 32 and one image per call: torchvision pads a batch to its largest image
    # (and every image to a multiple of 32), which changes the backbone's features at the border
    images = [torch.rand(3, h, w, generator=g) for h, w in ((128, 128), (96, 128), (128, 96))]
    return [torch_det.detect([im])[0] for im in images], onnx_det.detect(images)


def test_onnx_detections_equal_the_pytorch_adapter(detections, same_detections):
    for a, b in zip(*detections):
        assert len(a) >= 50 and set(b.taps) == set(FRCNN_TENSORS)
        for point in FRCNN_TENSORS:
            assert b.taps[point].shape == a.taps[point].shape  # RoI features flattened per box
        # two runtimes sum in different orders: equal to tolerance, near ties in any order
        same_detections(a, b, box_atol=1e-3, score_atol=1e-4, tap_rtol=1e-4, tap_atol=1e-4,
                        taps=FRCNN_TENSORS)


def test_per_box_ood_scores_equal_the_pytorch_path(detections, pair_detections):
    torch_dets, onnx_dets = detections
    fit = torch.cat([d.taps["box_head.output"] for d in torch_dets])
    _, classes = torch.cat([d.labels for d in torch_dets]).unique(return_inverse=True)
    maha = Mahalanobis().fit(fit, classes)
    energy = Energy()
    for a, b in zip(torch_dets, onnx_dets):
        rows, cols = pair_detections(a, b, box_atol=1e-3, score_atol=1e-4)
        a, b = a.select(rows), b.select(cols)
        torch.testing.assert_close(energy.score(b.logits[:, 1:]), energy.score(a.logits[:, 1:]),
                                   rtol=1e-4, atol=1e-4)
        ref = maha.score(a.taps["box_head.output"])
        torch.testing.assert_close(maha.score(b.taps["box_head.output"]), ref, rtol=1e-3,
                                   atol=1e-3 * float(ref.abs().max()))


def test_monitored_head_converted_with_onnx2torch_matches(pair, detections):
    torch_det, onnx_det = pair
    head = onnx_det.monitored_head()
    reference = torch_det.monitored_head().eval()
    # like the PyTorch head: a Sequential ending with the classifier (certificates split there)
    assert isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear)
    assert torch.equal(head[-1].weight, torch_det.model.roi_heads.box_predictor.cls_score.weight)
    for d in detections[1]:
        x = d.taps["box_head.input"]
        with torch.no_grad():
            logits, ref = head(x), reference(x)
        torch.testing.assert_close(logits, d.taps["cls_logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # the head is differentiable torch (what bound propagation and attacks need)
    x = detections[1][0].taps["box_head.input"][:3].clone().requires_grad_(True)
    head(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_monitored_head_from_the_penultimate_tap_is_the_classifier(pair, detections):
    _, onnx_det = pair
    head = onnx_det.monitored_head("box_head.output")
    assert isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear)  # after a Flatten
    d = detections[1][0]
    with torch.no_grad():
        torch.testing.assert_close(head(d.taps["box_head.output"]), d.logits, rtol=1e-5, atol=1e-5)


def test_a_head_that_reads_more_than_the_tap_is_refused(pair):
    _, onnx_det = pair
    tensors = {**FRCNN_TENSORS, "boxes": "boxes"}
    from certood.detectors.onnx_detector import extract_head

    with pytest.raises(CertoodError, match="not a function of the region's tap alone"):
        extract_head(onnx_det.model, tensors, "box_head.input", "boxes", (64, 7, 7))


def test_num_classes_and_tap_points_come_from_the_graph(pair):
    _, onnx_det = pair
    assert onnx_det.num_classes == 6
    assert set(onnx_det.tap_points) == set(FRCNN_TENSORS)
    assert len(onnx_det.weights_sha256) == 64


def test_fixed_size_inputs_are_resized_and_boxes_mapped_back(tmp_path):
    import warnings

    model = _random_model()
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_two_stage(model, path, dynamic=False)
    det = OnnxDetector(path, FRCNN_TENSORS, score_thresh=0.2)
    assert det.input_size == (128, 128)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    [d] = det.detect([image])
    [ref] = det.detect([torch.nn.functional.interpolate(image[None], size=(128, 128), mode="bilinear",
                                                        align_corners=False)[0]])
    assert len(d) == len(ref) > 0 and bool((d.scores >= 0.2).all())
    torch.testing.assert_close(d.boxes * 2, ref.boxes)


def test_configuration_errors_name_what_is_missing(pair, tmp_path):
    _, onnx_det = pair
    with pytest.raises(CertoodError, match=r"no tensor for: box_head.output -> /nope"):
        OnnxDetector(onnx_det.path, {**FRCNN_TENSORS, "box_head.output": "/nope"})
    with pytest.raises(CertoodError, match="expected a 'cls_logits' tensor"):
        OnnxDetector(onnx_det.path, {"box_head.output": FRCNN_TENSORS["box_head.output"]})
    with pytest.raises(CertoodError, match="unknown ONNX layout"):
        OnnxDetector(onnx_det.path, FRCNN_TENSORS, layout="ssd")
    with pytest.raises(CertoodError, match="no tensor for: output keep"):
        OnnxDetector(onnx_det.path, FRCNN_TENSORS, outputs={"rows": "keep"})
    with pytest.raises(CertoodError, match="not found"):
        OnnxDetector(tmp_path / "absent.onnx", FRCNN_TENSORS)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(CertoodError, match="junk.onnx"):
        OnnxDetector(tmp_path / "junk.onnx", FRCNN_TENSORS)


def test_bounds_on_the_converted_head_equal_those_on_the_pytorch_head(pair, detections):
    """What certificates compute: auto_LiRPA bounds over an eps-box around RoI features."""
    import copy

    from certood.verifiers import bound_module  # auto_LiRPA, patched for torch 2

    torch_det, onnx_det = pair
    z = detections[1][0].taps["box_head.input"][:3].double()
    for method in ("ibp", "crown"):
        got, ref = (bound_module(copy.deepcopy(h).double().eval(), z, 0.01, norm=float("inf"), method=method,
                                 x_lower=torch.zeros_like(z))
                    for h in (onnx_det.monitored_head(), torch_det.monitored_head()))
        torch.testing.assert_close(got.lower, ref.lower, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got.upper, ref.upper, rtol=1e-9, atol=1e-9)


def test_certood_check_with_an_onnx_detector_spec_matches_the_torchvision_spec(
        tmp_path, digitsdet_root, random_weights):
    """A spec with ``kind: onnx`` runs end to end and gives the torchvision spec's boxes and scores."""
    import json
    import warnings

    from certood.check import run_check
    from certood.detectors.torchvision_frcnn import load_detector
    from certood.spec import load_spec_text

    model = load_detector("digits_fasterrcnn", str(random_weights), 6, box_score_thresh=0.0).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_two_stage(model, tmp_path / "demo.onnx")
    data = "\n".join(f"  {k}: {{annotations: {digitsdet_root}/{f}.json, images: {digitsdet_root}/{f}, max_images: 4}}"
                     for k, f in (("fit", "train"), ("calibration", "val"), ("id_test", "test")))
    rest = (f"data:\n{data}\n  ood:\n    near: {{annotations: {digitsdet_root}/ood-near.json, "
            f"images: {digitsdet_root}/ood-near, max_images: 4}}\n"
            "taps: {penultimate: box_head.output, logits: cls_logits}\n"
            "scores: {energy: {tap: logits}, maha: {kind: mahalanobis, tap: penultimate}}\n"
            "threshold: {tpr: 0.9, detector_score: 0.0}\n")
    onnx_detector = ("detector:\n  kind: onnx\n  path: demo.onnx\n  num_classes: 6\n  score_thresh: 0.0\n"
                     "  tensors: {" + ", ".join(f'{k}: "{v}"' for k, v in FRCNN_TENSORS.items()) + "}\n")
    torch_detector = (f"detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: {random_weights}, "
                      "num_classes: 6, score_thresh: 0.0}\n")
    results = {}
    for name, detector in (("onnx", onnx_detector), ("torch", torch_detector)):
        spec = load_spec_text("version: 1\n" + detector + rest, base_dir=tmp_path)
        result = run_check(spec, tmp_path / name)
        boxes = [json.loads(line) for line in (tmp_path / name / "boxes.jsonl").read_text().splitlines()]
        results[name] = (result, boxes)
    (onnx_result, onnx_boxes), (torch_result, torch_boxes) = results["onnx"], results["torch"]
    assert len(onnx_boxes) == len(torch_boxes) > 100
    by_image = {}
    for b in torch_boxes:
        by_image.setdefault((b["dataset"], b["image_id"], b["label"]), []).append(b)
    for a in onnx_boxes:  # the same box (to 0.01 px) of the same class on the same image
        [b] = [b for b in by_image[(a["dataset"], a["image_id"], a["label"])]
               if max(abs(x - y) for x, y in zip(a["box"], b["box"])) <= 0.011]
        for score in ("energy", "maha"):
            assert a["scores"][score] == pytest.approx(b["scores"][score], rel=1e-3, abs=1e-3)
    for score in ("energy", "maha"):
        assert onnx_result.metrics["ood"]["near"]["scores"][score]["auroc"] == pytest.approx(
            torch_result.metrics["ood"]["near"]["scores"][score]["auroc"], abs=1e-3)
    assert onnx_result.metrics["detector_sha256"] != torch_result.metrics["detector_sha256"]


@pytest.mark.parametrize("rule", ["energy > t.energy or maha > t.maha", "energy > t.energy[class] or maha > t.maha"])
def test_detector_and_monitor_export_as_one_graph(pair, detections, tmp_path, rule):
    """Image in; boxes, scores and flag out; equal to OnnxDetector.detect + Monitor.score_boxes/flag."""
    import onnxruntime as ort

    from certood.export import export_detector_monitor_onnx
    from certood.extract import DatasetDetections
    from certood.monitor import Monitor, score_input
    from certood.scores import build_score
    from certood.spec import load_spec_text

    _, onnx_det = pair
    spec = load_spec_text(
        'version: 1\ndetector: {kind: onnx, path: x.onnx}\ndata: {fit: {digitsdet: train}, calibration: '
        '{digitsdet: val}}\ntaps: {penultimate: box_head.output, logits: cls_logits}\nscores:\n'
        '  energy: {tap: logits}\n  msp: {tap: logits, temperature: 2.0}\n'
        '  maha: {kind: mahalanobis, tap: penultimate}\nrule: "%s"\n' % rule)

    def as_dataset(dets):
        return DatasetDetections("x", torch.zeros(sum(map(len, dets)), dtype=torch.long),
                                 torch.cat([d.boxes for d in dets]), torch.cat([d.labels for d in dets]),
                                 torch.cat([d.scores for d in dets]),
                                 {p: torch.cat([d.taps[p] for d in dets]) for p in FRCNN_TENSORS}, 1, 0.0)

    fit = as_dataset(detections[1])
    scores = {}
    for name, s in spec.scores.items():
        scores[name] = build_score(s.kind, s.params)
        if scores[name].needs_fit:
            scores[name].fit(score_input(spec, name, fit), fit.labels.unique(return_inverse=True)[1])
    monitor = Monitor(spec, scores, {}, 0.0, [1, 2, 3, 4, 5], onnx_det.weights_sha256)
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(11))
    [d] = onnx_det.detect([image])
    expected = monitor.score_boxes(as_dataset([d]))
    monitor.thresholds.update({k: float(torch.quantile(v.double(), 0.7)) for k, v in expected.items()})
    if "[class]" in rule:  # a table indexed by the predicted label (0 = background, unused)
        monitor.class_thresholds["energy"] = [monitor.thresholds["energy"] + 0.01 * k for k in range(6)]

    result = export_detector_monitor_onnx(onnx_det, monitor, tmp_path / "all.onnx")
    assert result.outputs == ["boxes", "labels", "scores", "rows", "score/energy", "score/msp", "score/maha", "flag"]
    session = ort.InferenceSession(str(tmp_path / "all.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(result.outputs, session.run(result.outputs, {"images": image[None].numpy()})))
    torch.testing.assert_close(torch.from_numpy(got["boxes"]), d.boxes)
    for name, v in expected.items():
        torch.testing.assert_close(torch.from_numpy(got[f"score/{name}"]).double(), v.double(), rtol=1e-5, atol=1e-5)
    flags = monitor.flag(expected, d.labels)
    near = torch.zeros(len(d), dtype=torch.bool)
    for name, v in expected.items():
        near |= (v.double() - monitor.thresholds[name]).abs() < 1e-4
    assert torch.equal(torch.from_numpy(got["flag"])[~near], flags[~near]) and 0 < int(flags.sum()) < len(d)
