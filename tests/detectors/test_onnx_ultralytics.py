"""Stock ultralytics exports (YOLOv8n, YOLO11n, a small RT-DETR; random weights, made by
benchmarks/make_ultralytics_fixtures.py and committed under tests/data/ultralytics/) run as
they come: no ``outputs:``, taps on the channels-first class logits and the per-level class
features, every score that needs no box head, and a plumbing ``check`` on DigitsDet."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from certood.detectors.onnx_detector import OnnxDetector, _gemm_as_linear, graph_tensors
from certood.errors import DataError
from certood.scores import build_score

DATA = Path(__file__).resolve().parents[1] / "data" / "ultralytics"
RECORD = json.loads((DATA / "fixtures.json").read_text())
K = 5  # the fixtures' classes (DigitsDet's ID digits)

# The taps of a stock export, by the names ultralytics' exporter gives the detect head's tensors
# (module index 22 in YOLOv8n, 23 in YOLO11n): the class logits [1, K, A] entering the score
# Sigmoid, and the three per-level inputs [1, 64, H_i, W_i] of the class branch's last 1x1 conv.
YOLO_TAPS = {
    "yolov8n": {"cls_logits": "/model.22/Concat_1_output_0",
                "head.cls_features": [f"/model.22/cv3.{i}/cv3.{i}.1/act/Mul_output_0" for i in range(3)]},
    "yolo11n": {"cls_logits": "/model.23/Concat_1_output_0",
                "head.cls_features": [f"/model.23/cv3.{i}/cv3.{i}.1/cv3.{i}.1.1/act/Mul_output_0" for i in range(3)]},
}
YOLO_CLS_CONVS = {"yolov8n": "/model.22/cv3.{i}/cv3.{i}.2/Conv", "yolo11n": "/model.23/cv3.{i}/cv3.{i}.2/Conv"}
# RT-DETR: the per-query input of the last decoder layer's class head (a Gemm)
RTDETR_FEATURES = "/model.12/decoder/layers.1/norm3/LayerNormalization_output_0"
RTDETR_CLASS_HEAD = "/model.12/decoder/dec_score_head.1/MatMul_output_0"


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 128, 128, generator=g) for _ in range(n)]


def test_fixtures_are_the_recorded_exports():
    """Each committed graph is the file the script recorded (sha256), small, and exported by a
    recorded ultralytics version with the stock single output."""
    assert RECORD["versions"]["ultralytics"] and RECORD["command"].startswith("python benchmarks/")
    total = 0
    for name, entry in RECORD["models"].items():
        data = (DATA / f"{name}.onnx").read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert len(data) == entry["bytes"] <= 15_000_000
        total += len(data)
        assert list(entry["outputs"]) == ["output0"] and entry["nc"] == K
    assert total <= 30_000_000
    assert RECORD["models"]["yolov8n"]["outputs"]["output0"] == [1, 4 + K, 84]  # 8x8 + 4x4 + 2x2 anchors
    assert RECORD["models"]["rtdetr-tiny"]["outputs"]["output0"] == [1, 300, 6]  # top-k (query, class) rows


@pytest.fixture(scope="module", params=["yolov8n", "yolo11n"])
def yolo(request):
    """Every anchor kept (score 0, NMS at IoU 1.0: a random head puts all boxes on the image)."""
    name = request.param
    det = OnnxDetector(DATA / f"{name}.onnx", YOLO_TAPS[name], layout="yolo", score_thresh=0.0,
                       nms_thresh=1.0, max_detections=84)
    return name, det, det.detect(_images(3))


def test_a_stock_yolo_export_runs_with_its_taps(yolo):
    name, det, dets = yolo
    assert det.outputs == {"predictions": "output0"} and det.num_classes == K + 1
    model = onnx.load(str(DATA / f"{name}.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    convs = {n.name: n for n in model.graph.node}
    levels = []  # each level's final 1x1 class conv as (W [K, 64], b [K])
    for i in range(3):
        node = convs[YOLO_CLS_CONVS[name].format(i=i)]
        w, b = (torch.from_numpy(onnx.numpy_helper.to_array(inits[t]).copy()) for t in node.input[1:3])
        levels.append((w.reshape(K, -1), b))
    for d in dets:
        assert len(d) == 84 and d.taps["head.cls_features"].shape == (84, 64)
        # the logits tap is the pre-sigmoid class half of the head: sigmoid gives the scores
        torch.testing.assert_close(torch.sigmoid(d.logits[torch.arange(84), d.labels]), d.scores,
                                   rtol=1e-5, atol=1e-6)
        # each detection's class features are those of its own anchor: one level's 1x1 conv maps
        # them exactly to the detection's logits (levels concatenated in the head's order)
        f = d.taps["head.cls_features"].double()
        residual = torch.stack([(f @ w.double().T + b.double() - d.logits[:, 1:].double()).abs().amax(1)
                                for w, b in levels]).amin(0)
        assert float(residual.max()) < 1e-4
        assert len(d.boxes.unique(dim=0)) >= 1 and float(d.boxes.min()) >= 0 and float(d.boxes.max()) <= 128


def test_every_score_without_a_box_head_runs_on_the_tapped_features(yolo):
    """Logit scores equal their formulas on the logits tap; fitted feature scores fit on two
    images' per-anchor class features and score the third."""
    _, _, dets = yolo
    fit, test = dets[:2], dets[2]
    fit_features = torch.cat([d.taps["head.cls_features"] for d in fit])
    # a random head gives (nearly) every anchor one class: spread the fit boxes over the K
    # classes instead, so class-conditional scores have K classes to condition on
    fit_labels = torch.arange(len(fit_features)) % K
    logits = test.logits[:, 1:]
    torch.testing.assert_close(build_score("energy", {"temperature": 1.0}).score(logits),
                               -torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(build_score("max_logit", {}).score(logits), -logits.max(dim=1).values)
    torch.testing.assert_close(build_score("msp", {"temperature": 1.0}).score(logits),
                               -logits.softmax(dim=1).max(dim=1).values)
    p = logits.softmax(dim=1)
    torch.testing.assert_close(build_score("entropy", {}).score(logits), -(p * p.log()).sum(1),
                               rtol=1e-5, atol=1e-6)
    fitted = {"mahalanobis": {}, "relative_mahalanobis": {"num_classes": None}, "knn": {"k": 5},
              "larem": {"shrinkage": "ledoit_wolf", "num_classes": None},
              "lared": {"shrinkage": "ledoit_wolf", "num_classes": None},
              "box_abstraction": {"k": 3, "gamma": 0.0, "norm": "linf", "seed": 0}, "residual": {"dim": 8}}
    for kind, params in fitted.items():
        score = build_score(kind, params).fit(fit_features, fit_labels)
        values = score.score(test.taps["head.cls_features"])
        assert values.shape == (len(test),) and bool(torch.isfinite(values).all()), kind
        assert float(values.std()) > 0, kind  # the anchors' features differ, so do their scores


def test_a_stock_rtdetr_export_ties_rows_to_queries():
    """Ultralytics' RT-DETR output [1, 300, 6] ranks (query, class) pairs; the adapter finds the
    query of each row and the per-query class logits inside the graph. Checked against the
    graph itself: the rows' boxes and scores, and the class head applied to each detection's
    per-query features gives its logits."""
    path = DATA / "rtdetr-tiny.onnx"
    det = OnnxDetector(path, {"box_head.output": RTDETR_FEATURES}, layout="rtdetr", score_thresh=0.0,
                       max_detections=300)
    assert det.num_classes == K + 1 and det.outputs == {"predictions": "output0"}
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == RTDETR_CLASS_HEAD)
    head = _gemm_as_linear(node, {i.name: i for i in model.graph.initializer})
    import onnxruntime as ort

    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for image in _images(2, seed=1):
        [d] = det.detect([image])
        x = torch.nn.functional.interpolate(image[None], size=(160, 160), mode="bilinear", align_corners=False)
        [rows] = plain.run(["output0"], {"images": x.numpy()})
        rows = torch.from_numpy(rows[0])
        assert len(d) == 300
        torch.testing.assert_close(d.scores, rows[:, 4], rtol=0, atol=1e-6)  # best first, as the graph ranks
        assert torch.equal(d.labels, rows[:, 5].long() + 1)
        c = rows[:, :4] * 128  # normalised cxcywh of the 160 px input, back on the 128 px image
        expected = torch.cat([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], dim=1)
        torch.testing.assert_close(d.boxes, expected, rtol=1e-5, atol=1e-3)
        with torch.no_grad():
            torch.testing.assert_close(head(d.taps["box_head.output"]), d.logits[:, 1:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.sigmoid(d.logits[torch.arange(300), d.labels]), d.scores,
                                   rtol=1e-5, atol=1e-6)


def test_graph_tensors_lists_the_taps_with_their_shapes():
    shapes = dict(graph_tensors(DATA / "yolov8n.onnx"))
    assert shapes["/model.22/Concat_1_output_0"] == [1, K, 84]
    assert [shapes[n] for n in YOLO_TAPS["yolov8n"]["head.cls_features"]] == \
        [[1, 64, 8, 8], [1, 64, 4, 4], [1, 64, 2, 2]]


# ----------------------------------------------------------------------------- plumbing check
SPEC = """\
version: 1
detector: {{kind: onnx, path: {path}, layout: yolo, score_thresh: 0.0,
           tensors: {{cls_logits: /model.22/Concat_1_output_0}}}}
data:{fit}
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 4}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test, max_images: 4}}
  ood:
    near: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 4}}
taps: {{logits: cls_logits}}
scores: {{{scores}}}
threshold: {threshold}
rule: "energy > t.energy"
"""


def _spec(root, threshold: str, scores: str = "energy: {tap: logits}, msp: {tap: logits}", fit: bool = False):
    from certood.spec import load_spec_text

    fit_line = f"\n  fit: {{annotations: {root}/train.json, images: {root}/train, max_images: 4}}" if fit else ""
    return load_spec_text(SPEC.format(path=DATA / "yolov8n.onnx", root=root, threshold=threshold, scores=scores,
                                      fit=fit_line))


def test_a_plumbing_check_runs_on_a_random_yolo_and_says_so(digitsdet_root, tmp_path):
    """A random YOLOv8n boxes whole images: no true positive on calibration. With a fixed
    detector cut and logit scores the check runs and its summary says it tested plumbing; with
    the cut above every score (no box at all) and fixed thresholds too."""
    from certood.check import run_check
    from certood.report import summary_text

    result = run_check(_spec(digitsdet_root, "{tpr: 0.95, detector_score: 0.0}"), tmp_path / "a")
    mon = result.metrics["monitor"]
    assert mon["plumbing"] == ["no detection of the fit set (4 images) overlaps a ground-truth object "
                               "(no true positive): no score was fitted"]
    assert result.metrics["id_test"]["n_boxes"] == 4 and result.metrics["id_test"]["map50"] == 0.0
    assert "plumbing run: no detection of the fit set" in summary_text(result.metrics)
    assert "plumbing run:" in (tmp_path / "a" / "summary.txt").read_text()

    result = run_check(_spec(digitsdet_root, "{fixed: {energy: 0.0, msp: -0.5}, detector_score: 0.5}"),
                       tmp_path / "b")
    assert result.metrics["monitor"]["plumbing"][0] == \
        "the detector found no box at detector score >= 0.5 on the 4 calibration images"
    assert result.metrics["id_test"]["n_boxes"] == 0 and result.n_boxes == 0


def test_a_plumbing_run_refuses_what_needs_boxes(digitsdet_root, tmp_path):
    from certood.check import run_check

    with pytest.raises(DataError, match=r"cannot fit scores maha \(a plumbing run: fix threshold.detector_score"):
        run_check(_spec(digitsdet_root, "{tpr: 0.95, detector_score: 0.0}",
                        "energy: {tap: logits}, maha: {kind: mahalanobis, tap: logits}", fit=True), tmp_path / "a")
    with pytest.raises(DataError, match=r"found no box at detector score >= 0.5 on 4 images; thresholds at "
                                         r"an ID TPR need calibration boxes"):
        run_check(_spec(digitsdet_root, "{tpr: 0.95, detector_score: 0.5}"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_letterbox_on_a_stock_export_keeps_boxes_on_the_image():
    det = OnnxDetector(DATA / "yolov8n.onnx", {}, layout="yolo", score_thresh=0.0, nms_thresh=1.0,
                       max_detections=84, preprocess="letterbox")
    g = torch.Generator().manual_seed(3)
    [d] = det.detect([torch.rand(3, 96, 160, generator=g)])
    assert len(d) == 84
    assert float(d.boxes[:, 0::2].max()) <= 160 and float(d.boxes[:, 1::2].max()) <= 96
    assert float(d.boxes.min()) >= 0 and np.isfinite(d.scores.numpy()).all()
