"""The ONNX adapter on an ONNX export of the demo Faster R-CNN (random weights, made here):
detections, per-box features and OOD scores equal the PyTorch adapter's, and the monitored
head converted back with onnx2torch computes the same logits."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from certood.detectors.onnx_detector import OnnxDetector
from certood.detectors.torchvision_frcnn import (
    TorchvisionFasterRCNN, digits_fasterrcnn, postprocess_with_rows,
)
from certood.errors import CertoodError
from certood.scores import Energy, Mahalanobis

# the graph tensors the TorchScript exporter names after the modules of TwoStageExport below
FRCNN_TENSORS = {"box_head.input": "/box_roi_pool/RoiAlign_output_0",
                 "box_head.output": "/box_head/Relu_1_output_0",
                 "cls_logits": "/box_predictor/cls_score/Gemm_output_0"}


class TwoStageExport(nn.Module):
    """The demo Faster R-CNN in certood's ``two_stage`` layout: the torchvision stages (its
    transform is the identity at 128 px) and NMS carrying each proposal's row."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        self.rpn = model.rpn
        self.box_roi_pool = model.roi_heads.box_roi_pool
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor
        self.roi_heads = model.roi_heads

    def forward(self, image):
        batch = ImageList(image, [tuple(image.shape[-2:])])
        features = OrderedDict([("0", self.backbone(image))])
        proposals, _ = self.rpn(batch, features)
        roi = self.box_roi_pool(features, proposals, batch.image_sizes)
        logits, regression = self.box_predictor(self.box_head(roi))
        [(boxes, scores, labels, rows)] = postprocess_with_rows(self.roi_heads, logits, regression,
                                                                proposals, batch.image_sizes)
        return boxes, labels, scores, rows


def _random_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_fasterrcnn(6, box_score_thresh=0.0)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(40.0)
    return model.eval()


def export_two_stage(model, path, dynamic: bool = True):
    torch.onnx.export(TwoStageExport(model), (torch.rand(1, 3, 128, 128),), str(path), dynamo=False,
                      opset_version=17, input_names=["images"],
                      output_names=["boxes", "labels", "scores", "rows"],
                      dynamic_axes={"images": {2: "height", 3: "width"}} if dynamic else None)
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


def test_onnx_detections_equal_the_pytorch_adapter(detections):
    for a, b in zip(*detections):
        assert len(a) == len(b) >= 50
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
        assert set(b.taps) == set(FRCNN_TENSORS)
        for point in FRCNN_TENSORS:
            assert b.taps[point].shape == a.taps[point].shape  # RoI features flattened per box
            torch.testing.assert_close(b.taps[point], a.taps[point], rtol=1e-4, atol=1e-4)


def test_per_box_ood_scores_equal_the_pytorch_path(detections):
    torch_dets, onnx_dets = detections
    fit = torch.cat([d.taps["box_head.output"] for d in torch_dets])
    _, classes = torch.cat([d.labels for d in torch_dets]).unique(return_inverse=True)
    maha = Mahalanobis().fit(fit, classes)
    energy = Energy()
    for a, b in zip(torch_dets, onnx_dets):
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
