"""The spec's detector block reaches the adapters: ONNX layout options (rtdetr, activation,
preprocess, tap lists), batch sizes, and torchvision input sizes."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from certood.detectors import detector_from_spec
from certood.detectors.torchvision_frcnn import default_batch_size
from certood.errors import UsageError
from certood.extract import extract_detections
from certood.spec import load_spec_text

SPEC = """\
version: 1
detector: {detector}
data:
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 3}}
  id_test: {{annotations: {root}/test.json, images: {root}/test, max_images: 3}}
taps: {{logits: cls_logits}}
scores:
  energy: {{tap: logits}}
threshold: {{tpr: 0.95, detector_score: 0.0}}
rule: "energy > t.energy"
"""


class Detr(nn.Module):
    """pred_logits [1, Q, K] (sigmoid head) and pred_boxes [1, Q, 4] from a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, 8)
        self.cls, self.box = nn.Linear(8, 5), nn.Linear(8, 4)

    def forward(self, x):
        f = self.conv(x).flatten(2).transpose(1, 2)
        return self.cls(f), torch.sigmoid(self.box(f))


def _spec(root, detector: str):
    return load_spec_text(SPEC.format(detector=detector, root=root))


def test_onnx_options_reach_the_adapter(digitsdet_root, tmp_path):
    path = tmp_path / "detr.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Detr().eval(), (torch.rand(1, 3, 64, 64),), str(path), dynamo=False,
                          input_names=["images"], output_names=["pred_logits", "pred_boxes"])
    spec = _spec(digitsdet_root, f"{{kind: onnx, path: {path}, layout: detr, activation: sigmoid, "
                                 "preprocess: letterbox, batch_size: 3, score_thresh: 0.0}")
    det = detector_from_spec(spec.detector, spec.taps)
    assert (det.layout, det.activation, det.preprocess, det.batch_size) == ("detr", "sigmoid", "letterbox", 3)
    assert det.num_classes == 6  # 5 sigmoid classes + certood's background column
    calls = []
    detect = det.detect
    det.detect = lambda images: calls.append(len(images)) or detect(images)
    from certood.data.coco import CocoDataset

    dataset = CocoDataset.load(digitsdet_root / "val.json", digitsdet_root / "val", max_images=7, name="val")
    dets = extract_detections(det, dataset, ["cls_logits"])
    assert calls == [3, 3, 1] and dets.n_images == 7 and len(dets) == 7 * 64


def test_spec_validates_the_new_detector_keys(digitsdet_root):
    from certood.errors import SpecError

    for bad, where in (("layout: rtdetr, activation: tanh", "activation"), ("preprocess: crop", "preprocess"),
                       ("batch_size: 0", "batch_size"), ("tensors: {head.input: []}", "head.input")):
        with pytest.raises(SpecError, match=where):
            _spec(digitsdet_root, f"{{kind: onnx, path: m.onnx, {bad}}}")
    spec = _spec(digitsdet_root, "{kind: onnx, path: m.onnx, layout: rtdetr, "
                                 "tensors: {head.cls_features: [a, b, c]}}")
    assert spec.detector.layout == "rtdetr" and spec.detector.tensors == {"head.cls_features": ["a", "b", "c"]}
    assert (spec.detector.activation, spec.detector.preprocess, spec.detector.batch_size) == \
        ("softmax", "resize", 8)
    assert _spec(digitsdet_root, "{kind: onnx, path: m.onnx, layout: yolo, multi_label: true}").detector.multi_label


def test_torchvision_batch_size_from_the_spec_or_the_input_size(digitsdet_root, random_weights):
    base = f"{{kind: torchvision, arch: digits_fasterrcnn, weights: {random_weights}, num_classes: 6"
    assert detector_from_spec(_spec(digitsdet_root, base + "}").detector).batch_size == 8  # 128 px
    assert detector_from_spec(_spec(digitsdet_root, base + ", batch_size: 2}").detector).batch_size == 2
    with pytest.raises(UsageError, match="resizes every image to 320x320"):
        detector_from_spec(_spec(digitsdet_root, "{kind: torchvision, arch: ssdlite320_mobilenet_v3_large, "
                                                 f"weights: {random_weights}, num_classes: 6, min_size: 64}}").detector)


def test_default_batch_size_follows_pixels_and_memory():
    gb = 1 << 30
    assert default_batch_size(128, 128, 24 * gb) == 8  # capped at 8 (what extraction always used)
    # 1/8 of RAM (0.5-4 GB) over 640 bytes per resized input pixel: R50-FPN at 800 x 1333
    assert default_batch_size(800, 1333, 24 * gb) == (3 * gb) // (640 * 800 * 1333) == 4
    assert default_batch_size(800, 1333, 128 * gb) == 6
    assert default_batch_size(800, 1333, 2 * gb) == 1  # never below one image
    assert default_batch_size(4000, 4000, 256 * gb) == 1
