"""One-stage adapters (RetinaNet, FCOS, SSDlite): detections equal torchvision's forward, and
every kept detection's features are those of the anchor and location that produced it,
found independently from the model's own head outputs."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.ssdlite import SSDLiteHead

from certood.detectors.torchvision_onestage import ONESTAGE_ARCHS, TorchvisionOneStage, build_onestage
from certood.errors import CertoodError

SIZE = 64
COMMON = dict(image_mean=[0.0] * 3, image_std=[1.0] * 3, score_thresh=0.0)


class TinyPyramid(nn.Module):
    """Two pyramid levels (strides 4 and 8), 32 channels each."""

    out_channels = 32

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        a = self.stem(x)
        return OrderedDict([("0", a), ("1", self.down(a))])


def tiny_model(kind: str):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "retinanet":
            anchors = AnchorGenerator(((8, 12), (16, 24)), ((0.5, 1.0, 2.0),) * 2)
            model = detection.RetinaNet(TinyPyramid(), 6, min_size=SIZE, max_size=SIZE,
                                        anchor_generator=anchors, **COMMON)
            weight = model.head.classification_head.cls_logits.weight
        elif kind == "fcos":
            anchors = AnchorGenerator(((8,), (16,)), ((1.0,),) * 2)
            model = detection.FCOS(TinyPyramid(), 6, min_size=SIZE, max_size=SIZE, anchor_generator=anchors,
                                   **COMMON)
            weight = model.head.classification_head.cls_logits.weight
        else:
            anchors = DefaultBoxGenerator([[2], [2, 3]])
            head = SSDLiteHead([32, 32], anchors.num_anchors_per_location(), 6,
                               partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
            model = SSD(TinyPyramid(), anchors, (SIZE, SIZE), 6, head=head, **COMMON)
            weight = model.head.classification_head.module_list[0][1].weight  # the 1x1 projection
        with torch.no_grad():
            weight.mul_(50.0)  # spread the random class scores so labels and scores vary
    return model.eval()


def _images(seed=1, sizes=((SIZE, SIZE), (48, SIZE))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.fixture(scope="module", params=["retinanet", "fcos", "ssd"])
def run(request):
    model = tiny_model(request.param)
    det = TorchvisionOneStage(model)
    images = _images()
    return request.param, model, det, images, [det.detect([im])[0] for im in images]


def test_tap_points_per_family(run):
    kind, _, det, _, dets = run
    expected = {"retinanet": {"cls_logits", "head.cls_features", "head.input"},
                "fcos": {"cls_logits", "head.cls_features", "head.input"},
                "ssd": {"cls_logits", "head.input"}}[kind]
    assert set(det.tap_points) == expected and det.num_classes == 6
    for d in dets:
        assert len(d) >= 20 and set(d.taps) == expected
        assert bool((d.labels >= 1).all()) and len(d.labels.unique()) >= 2
        assert d.logits.shape == (len(d), 6)
        for point in expected - {"cls_logits"}:
            assert d.taps[point].shape == (len(d), 32)


def test_detections_equal_torchvision_forward(run):
    _, model, _, images, dets = run
    for image, d in zip(images, dets):
        with torch.no_grad():
            [ref] = model([image])
        fg = ref["labels"] > 0  # certood drops the background class
        assert torch.equal(d.boxes, ref["boxes"][fg])
        assert torch.equal(d.scores, ref["scores"][fg])
        assert torch.equal(d.labels, ref["labels"][fg])


def _reference_anchors(kind, model, image):
    """Every anchor's score per class, box, logits, location features and tower features,
    from the model's own head forward (independent of the adapter's code)."""
    with torch.no_grad():
        batch, _ = model.transform([image])
        feats = list(model.backbone(batch.tensors).values())
        out = model.head(feats)
        anchors = model.anchor_generator(batch, feats)[0]
        logits = out["cls_logits"][0]
        regression = out["bbox_regression"][0]
        if kind == "retinanet":
            scores, boxes = torch.sigmoid(logits), model.box_coder.decode_single(regression, anchors)
        elif kind == "fcos":
            scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(out["bbox_ctrness"][0]))
            boxes = model.box_coder.decode(regression, anchors)
        else:
            scores, boxes = F.softmax(logits, -1), model.box_coder.decode_single(regression, anchors)
        h, w = batch.image_sizes[0]
        boxes = boxes.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        boxes = boxes * torch.tensor([image.shape[2] / w, image.shape[1] / h] * 2)
        towers = [model.head.classification_head.conv(f) for f in feats] if kind != "ssd" else None
        location_feature, tower_feature = [], []
        for level, f in enumerate(feats):
            hh, ww = f.shape[2:]
            n_rows = {"retinanet": 6, "fcos": 1}.get(kind)  # anchors per location: 2 sizes x 3 ratios
            if kind == "ssd":
                n_rows = [4, 6][level]  # DefaultBoxGenerator([[2], [2, 3]]): 2 + 2 * len(ratios)
            for loc in range(hh * ww):
                y, x = divmod(loc, ww)
                for _ in range(n_rows):
                    location_feature.append(f[0, :, y, x])
                    if towers is not None:
                        tower_feature.append(towers[level][0, :, y, x])
    return scores, boxes, logits, torch.stack(location_feature), (torch.stack(tower_feature) if towers else None)


def test_every_detection_carries_the_features_of_its_own_anchor(run):
    kind, model, _, images, dets = run
    for image, d in zip(images, dets):
        scores, boxes, logits, location, tower = _reference_anchors(kind, model, image)
        assert location.shape[0] == logits.shape[0]  # the reference walks every anchor once
        for i in range(len(d)):
            label = int(d.labels[i])
            match = torch.nonzero(((scores[:, label] - d.scores[i]).abs() <= 1e-7)
                                  & ((boxes - d.boxes[i]).abs().amax(dim=1) <= 1e-3)).flatten()
            assert len(match) >= 1, (kind, i)
            row = int(match[0])
            torch.testing.assert_close(d.taps["cls_logits"][i], logits[row], rtol=0, atol=1e-6)
            torch.testing.assert_close(d.taps["head.input"][i], location[row], rtol=0, atol=1e-6)
            if tower is not None:
                torch.testing.assert_close(d.taps["head.cls_features"][i], tower[row], rtol=0, atol=1e-6)


def test_detector_score_follows_from_the_logits(run):
    kind, _, _, _, dets = run
    for d in dets:
        at_label = d.logits[torch.arange(len(d)), d.labels]
        if kind == "retinanet":
            torch.testing.assert_close(torch.sigmoid(at_label), d.scores, rtol=0, atol=1e-6)
        elif kind == "ssd":
            torch.testing.assert_close(F.softmax(d.logits, -1)[torch.arange(len(d)), d.labels], d.scores,
                                       rtol=0, atol=1e-6)
        else:  # FCOS: score^2 = sigmoid(logit) * sigmoid(centerness) <= sigmoid(logit)
            assert bool((d.scores ** 2 <= torch.sigmoid(at_label) + 1e-6).all())


def test_one_stage_detectors_take_no_certificates(run):
    _, _, det, _, _ = run
    with pytest.raises(CertoodError, match="3x3"):
        det.monitored_head()


@pytest.mark.parametrize("arch", ONESTAGE_ARCHS[::-1])
def test_torchvision_architectures_build_and_detect(arch):
    """The spec's arch values at random init on a tiny image: equal to torchvision's forward."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_onestage(arch, 4, min_size=SIZE, max_size=SIZE, score_thresh=0.0,
                               detections_per_img=20).eval()
    det = TorchvisionOneStage(model)
    [image] = _images(3, ((SIZE, SIZE),))
    [d] = det.detect([image])
    with torch.no_grad():
        [ref] = model([image])
    fg = ref["labels"] > 0
    assert len(d) == int(fg.sum()) > 0 and torch.equal(d.boxes, ref["boxes"][fg])
    assert torch.equal(d.labels, ref["labels"][fg]) and d.logits.shape == (len(d), 4)
    assert ("head.input" in det.tap_points) == (not arch.startswith("ssdlite"))


def test_a_spec_names_a_one_stage_arch_and_only_its_tap_points(tmp_path):
    from safetensors.torch import save_file

    from certood.check import load_spec_detector
    from certood.errors import UsageError
    from certood.spec import load_spec_text

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_onestage("ssdlite320_mobilenet_v3_large", 6)
    save_file(model.state_dict(), str(tmp_path / "ssd.safetensors"))
    text = ("version: 1\ndetector: {kind: torchvision, arch: ssdlite320_mobilenet_v3_large, "
            "weights: ssd.safetensors, num_classes: 6, score_thresh: 0.0}\n"
            "data: {calibration: {digitsdet: val}}\ntaps: {logits: cls_logits%s}\n"
            "scores: {energy: {tap: logits}}\n")
    det = load_spec_detector(load_spec_text(text % "", base_dir=tmp_path))
    assert isinstance(det, TorchvisionOneStage) and det.model.score_thresh == 0.0
    [d] = det.detect(_images(4, ((96, 128),)))
    assert len(d) > 0 and float(d.boxes[:, 2].max()) <= 128 and float(d.boxes[:, 3].max()) <= 96
    with pytest.raises(UsageError, match=r"feat \(head.input\).*offers: cls_logits"):
        load_spec_detector(load_spec_text(text % ", feat: head.input", base_dir=tmp_path))
