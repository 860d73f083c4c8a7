"""The ``yolo`` and ``detr`` ONNX layouts on small models built and exported here: detections
equal a reference decoding of the PyTorch model's own outputs, and each detection carries the
features of the anchor / query that produced it."""
from __future__ import annotations

import math
import warnings

import onnx
import pytest
import torch
from torch import nn
from torchvision.ops import batched_nms, box_iou

from certood.detectors.onnx_detector import OnnxDetector
from certood.errors import CertoodError

K = 5  # foreground classes
SIZE = 64


class TinyYolo(nn.Module):
    """YOLOv8-style output ``[1, 4 + K, A]``: per location (stride 4) cx, cy, w, h in pixels and
    K sigmoid class scores; 1x1 heads, so an anchor's logits depend on its own features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.cls = nn.Conv2d(32, K, 1)
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        f = self.stem(x)
        _, _, h, w = f.shape
        feats = f.flatten(2).transpose(1, 2)  # [1, A, 32]
        logits = self.cls(f).flatten(2).transpose(1, 2)  # [1, A, K]
        raw = self.box(f).flatten(2).transpose(1, 2)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], dim=1)[None]
        centre = (grid + 0.5 + torch.tanh(raw[..., :2])) * 4.0
        size = torch.exp(raw[..., 2:].clamp(-2, 2)) * 12.0
        return torch.cat([centre, size, torch.sigmoid(logits)], dim=-1).transpose(1, 2), feats


class TinyDetr(nn.Module):
    """DETR-style set prediction: Q learned queries attend to the image features; outputs
    ``pred_logits [1, Q, K + 1]`` (no-object last) and ``pred_boxes [1, Q, 4]`` (normalised cxcywh)."""

    def __init__(self, queries: int = 12, dim: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, dim, 3, 2, 1), nn.ReLU())
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.class_embed = nn.Linear(dim, K + 1)
        self.bbox_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))

    def forward(self, x):
        f = self.stem(x).flatten(2).transpose(1, 2)  # [1, HW, D]
        attn = torch.softmax(self.query @ f.transpose(1, 2) / math.sqrt(f.shape[-1]), dim=-1)
        hs = self.decoder(attn @ f + self.query)  # [1, Q, D]: the per-query features
        return self.class_embed(hs), torch.sigmoid(self.bbox_embed(hs))


def _export(module, path, outputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=outputs)
    return onnx.load(str(path))


def _producer_input(model, op_type: str, weight_shape=None) -> str:
    """The data input of the (only) node of ``op_type`` [whose weight has ``weight_shape``]."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    [node] = [n for n in model.graph.node if n.op_type == op_type
              and (weight_shape is None or inits.get(n.input[1]) == weight_shape)]
    return node.input[0]


def _images(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=g), torch.rand(3, 48, 80, generator=g)]


def _resized(image):
    return torch.nn.functional.interpolate(image[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- yolo
@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyYolo().eval()
        with torch.no_grad():
            model.cls.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("yolo") / "yolo.onnx"
    graph = _export(model, path, ["predictions", "features_out"])
    tensors = {"cls_logits": _producer_input(graph, "Sigmoid"), "head.input": "features_out"}
    det = OnnxDetector(path, tensors, layout="yolo", score_thresh=0.3, nms_thresh=0.5, max_detections=40)
    return model, det


def test_yolo_detections_follow_the_reference_decoding(yolo):
    model, det = yolo
    assert det.num_classes == K + 1 and det.input_size == (SIZE, SIZE)
    for image in _images(1):
        [d] = det.detect([image])
        with torch.no_grad():
            pred, feats = model(_resized(image))
        pred, feats = pred[0].T, feats[0]  # [A, 4 + K], [A, 32]
        boxes = torch.cat([pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2], dim=1).clamp(0, SIZE)
        scores, cls = pred[:, 4:].max(dim=1)
        rows = torch.nonzero(scores >= 0.3).flatten()
        keep = rows[batched_nms(boxes[rows], scores[rows], cls[rows], 0.5)][:40]
        scale = torch.tensor([image.shape[2] / SIZE, image.shape[1] / SIZE] * 2)
        assert 5 <= len(d) == len(keep)
        torch.testing.assert_close(d.scores, scores[keep], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d.boxes, boxes[keep] * scale, rtol=1e-5, atol=1e-3)
        assert torch.equal(d.labels, cls[keep] + 1)
        # each detection's features are those of its own anchor, its logits background-first
        torch.testing.assert_close(d.taps["head.input"], feats[keep], rtol=1e-5, atol=1e-5)
        assert torch.equal(d.logits[:, 0], torch.zeros(len(d))) and d.logits.shape == (len(d), K + 1)
        torch.testing.assert_close(torch.sigmoid(d.logits[torch.arange(len(d)), d.labels]), d.scores,
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(d.taps["cls_logits"], d.logits)
        same = d.labels[:, None] == d.labels[None]
        iou = box_iou(d.boxes / scale, d.boxes / scale).fill_diagonal_(0)
        assert float(iou[same].max()) <= 0.5 + 1e-4  # NMS happened (the diagonal is 0)


def test_yolo_has_no_monitored_head(yolo):
    with pytest.raises(CertoodError, match="layout yolo: no monitored head"):
        yolo[1].monitored_head("head.input")


# ----------------------------------------------------------------------------- detr
@pytest.fixture(scope="module")
def detr(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyDetr().eval()
        with torch.no_grad():
            model.class_embed.weight.mul_(6.0)  # spread the class probabilities
    path = tmp_path_factory.mktemp("detr") / "detr.onnx"
    graph = _export(model, path, ["pred_logits", "pred_boxes"])
    hs = _producer_input(graph, "MatMul", (32, K + 1))  # the class head reads the decoder output
    det = OnnxDetector(path, {"box_head.output": hs}, layout="detr", score_thresh=0.2, max_detections=8)
    return model, det


def test_detr_detections_follow_the_reference_decoding(detr):
    model, det = detr
    assert det.num_classes == K + 1 and set(det.tap_points) == {"box_head.output", "cls_logits"}
    for image in _images(2):
        [d] = det.detect([image])
        captured = []
        hook = model.decoder.register_forward_hook(lambda module, args, out: captured.append(out[0]))
        with torch.no_grad():
            logits, boxes = (t[0] for t in model(_resized(image)))
        hook.remove()
        [hs] = captured
        probs = logits.softmax(-1)[:, :-1]
        scores, cls = probs.max(dim=1)
        keep = torch.nonzero(scores >= 0.2).flatten()
        keep = keep[scores[keep].argsort(descending=True, stable=True)][:8]
        h, w = image.shape[1:]
        c = boxes[keep]
        expected = torch.stack([(c[:, 0] - c[:, 2] / 2) * w, (c[:, 1] - c[:, 3] / 2) * h,
                                (c[:, 0] + c[:, 2] / 2) * w, (c[:, 1] + c[:, 3] / 2) * h], dim=1)
        assert 1 <= len(d) == len(keep)
        torch.testing.assert_close(d.scores, scores[keep], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d.boxes, expected, rtol=1e-5, atol=1e-3)
        assert torch.equal(d.labels, cls[keep] + 1)
        torch.testing.assert_close(d.taps["box_head.output"], hs[keep], rtol=1e-4, atol=1e-5)
        # logits background (no-object) first: softmax at the label is the detection score
        torch.testing.assert_close(d.logits[:, 0], logits[keep, -1])
        torch.testing.assert_close(d.logits.softmax(-1)[torch.arange(len(d)), d.labels], d.scores,
                                   rtol=1e-5, atol=1e-6)


def test_detr_monitored_head_is_the_class_head_background_first(detr):
    model, det = detr
    [d] = det.detect(_images(3)[:1])
    head = det.monitored_head("box_head.output")
    assert isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(head(d.taps["box_head.output"]), d.logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- stock-export shapes
class ChannelsFirstYolo(TinyYolo):
    """TinyYolo as ultralytics exports it: one output only (``output0``), and every per-anchor
    tensor inside the graph channels first: the feature map ``[1, 32, h, w]`` and the class
    logits ``[1, K, A]``."""

    def forward(self, x):
        pred, _ = super().forward(x)
        return pred


@pytest.fixture(scope="module")
def stock_yolo(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ChannelsFirstYolo().eval()
        with torch.no_grad():
            model.cls.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("stock") / "yolo.onnx"
    graph = _export(model, path, ["output0"])
    cls_conv = [n for n in graph.graph.node if n.op_type == "Conv" and n.input[1].startswith("cls")]
    [stem_out] = [n.output[0] for n in graph.graph.node if n.op_type == "Relu"][-1:]
    return model, path, {"cls_logits": cls_conv[0].output[0], "head.input": stem_out}


def test_channels_first_taps_and_the_single_output_of_a_stock_export(stock_yolo):
    """No ``outputs:`` and taps on ``[1, C, h, w]`` / ``[1, K, h, w]`` maps: the detections and
    per-anchor features equal the reference read of the same anchors."""
    model, path, tensors = stock_yolo
    det = OnnxDetector(path, tensors, layout="yolo", score_thresh=0.3, max_detections=40)
    assert det.outputs == {"predictions": "output0"} and det.num_classes == K + 1
    image = _images(4)[0]
    [d] = det.detect([image])
    with torch.no_grad():
        f = model.stem(_resized(image))
        pred = model(_resized(image))[0].T
    feats = f.flatten(2)[0].T  # [A, 32], anchors row-major over the map, as view(1, C, -1)
    logits = model.cls(f).flatten(2)[0].T
    boxes = torch.cat([pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2], dim=1).clamp(0, SIZE)
    scores, cls = pred[:, 4:].max(dim=1)
    rows = torch.nonzero(scores >= 0.3).flatten()
    keep = rows[batched_nms(boxes[rows], scores[rows], cls[rows], 0.5)][:40]
    assert len(d) == len(keep) >= 5
    torch.testing.assert_close(d.taps["head.input"], feats[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.logits[:, 1:], logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.scores, scores[keep], rtol=1e-5, atol=1e-6)


def test_a_list_of_levels_is_concatenated_along_the_anchors(stock_yolo):
    """Two taps of the same map as two levels give 2A rows: the adapter refuses them for the A
    anchors, naming the shapes it found and the tensors that do have one row per anchor."""
    _, path, tensors = stock_yolo
    det = OnnxDetector(path, {"head.input": [tensors["head.input"]] * 2}, layout="yolo", score_thresh=0.3)
    with pytest.raises(CertoodError, match=r"found shape \(\(1, 32, 16, 16\), \(1, 32, 16, 16\)\); tensors "
                                           r"with one row per candidate \(256\): .*output0 \[1, 9, 256\]"):
        det.detect(_images(4)[:1])
    from certood.detectors.onnx_detector import _levels_as_rows

    a, b = torch.rand(1, 3, 2, 2).numpy(), torch.rand(1, 3, 1, 1).numpy()
    rows = _levels_as_rows([a, b])
    assert rows.shape == (5, 3)
    torch.testing.assert_close(rows[:4], torch.from_numpy(a)[0].reshape(3, 4).T)
    torch.testing.assert_close(rows[4], torch.from_numpy(b)[0, :, 0, 0])


def test_errors_list_the_graph_outputs_and_close_tensor_names(stock_yolo):
    _, path, tensors = stock_yolo
    with pytest.raises(CertoodError, match=r"no tensor for: output predictions .*graph outputs: output0 "
                                           r"\[1, 9, 256\]"):
        OnnxDetector(path, tensors, layout="yolo", outputs={"predictions": "predictions"})
    typo = tensors["head.input"].replace("Relu", "Relv")
    with pytest.raises(CertoodError, match=rf"head.input -> {typo}.*close tensor names: .*"
                                           rf"{tensors['head.input']} \[1, 32, 16, 16\]"):
        OnnxDetector(path, {"head.input": typo}, layout="yolo")


def test_class_count_of_a_channels_first_logits_tap(stock_yolo):
    """``[1, K, A]`` logits: K classes, not A (the old reading gave A + 1 and a misleading
    'expected A categories' later)."""
    _, path, tensors = stock_yolo
    det = OnnxDetector(path, tensors, layout="yolo")
    shapes = {tensors["cls_logits"]: [1, K, 256]}
    assert det._infer_num_classes(shapes.get) == K + 1
    assert det._infer_num_classes({**shapes, "output0": [1, 4 + K, 256]}.get) == K + 1


def test_letterbox_maps_boxes_back_through_the_padding(stock_yolo):
    """``preprocess: letterbox`` on a 48x80 image: the graph sees it scaled by 0.8 to 38x64 and
    centred on grey (13 rows above), and boxes come back in the image's pixels."""
    model, path, tensors = stock_yolo
    det = OnnxDetector(path, {}, layout="yolo", score_thresh=0.3, preprocess="letterbox", max_detections=40)
    image = _images(5)[1]  # 48 x 80
    [d] = det.detect([image])
    canvas = torch.full((3, SIZE, SIZE), 114 / 255)
    canvas[:, 13:13 + 38] = torch.nn.functional.interpolate(image[None], size=(38, 64), mode="bilinear",
                                                            align_corners=False)[0]
    with torch.no_grad():
        pred = model(canvas[None])[0].T
    boxes = torch.cat([pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2], dim=1).clamp(0, SIZE)
    scores, cls = pred[:, 4:].max(dim=1)
    rows = torch.nonzero(scores >= 0.3).flatten()
    keep = rows[batched_nms(boxes[rows], scores[rows], cls[rows], 0.5)][:40]
    expected = (boxes[keep] - torch.tensor([0.0, 13.0, 0.0, 13.0])) / 0.8
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 80)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 48)
    assert len(d) == len(keep) >= 3
    torch.testing.assert_close(d.boxes, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(d.scores, scores[keep], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- sigmoid set heads
class SigmoidDetr(TinyDetr):
    """A Deformable-DETR-style head: ``pred_logits [1, Q, K]``, sigmoid scores, no no-object class."""

    def __init__(self):
        super().__init__()
        self.class_embed = nn.Linear(32, K)


class TinyRtdetr(TinyDetr):
    """The older ultralytics RT-DETR output: ``[1, Q, 4 + K]`` (normalised cxcywh, sigmoid scores)."""

    def __init__(self):
        super().__init__()
        self.class_embed = nn.Linear(32, K)

    def forward(self, x):
        logits, boxes = super().forward(x)
        return torch.cat([boxes, torch.sigmoid(logits)], dim=-1)


def _set_reference(scores_q, boxes_q, image, thresh, top):
    scores, cls = scores_q.max(dim=1)
    keep = torch.nonzero(scores >= thresh).flatten()
    keep = keep[scores[keep].argsort(descending=True, stable=True)][:top]
    h, w = image.shape[1:]
    c = boxes_q[keep]
    boxes = torch.stack([(c[:, 0] - c[:, 2] / 2) * w, (c[:, 1] - c[:, 3] / 2) * h,
                         (c[:, 0] + c[:, 2] / 2) * w, (c[:, 1] + c[:, 3] / 2) * h], dim=1)
    return keep, scores[keep], cls[keep], boxes


@pytest.mark.parametrize("arch", ["detr_sigmoid", "rtdetr"])
def test_sigmoid_set_heads_follow_the_reference_decoding(arch, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = (SigmoidDetr() if arch == "detr_sigmoid" else TinyRtdetr()).eval()
        with torch.no_grad():
            model.class_embed.weight.mul_(6.0)
    path = tmp_path / f"{arch}.onnx"
    graph = _export(model, path, ["pred_logits", "pred_boxes"] if arch == "detr_sigmoid" else ["output0"])
    hs = _producer_input(graph, "MatMul", (32, K))
    if arch == "detr_sigmoid":
        det = OnnxDetector(path, {"box_head.output": hs}, layout="detr", activation="sigmoid", score_thresh=0.2,
                           max_detections=8)
    else:
        det = OnnxDetector(path, {"box_head.output": hs}, layout="rtdetr", score_thresh=0.2, max_detections=8)
        assert det.outputs == {"predictions": "output0"}
    assert det.num_classes == K + 1
    image = _images(6)[1]
    [d] = det.detect([image])
    captured = []
    hook = model.decoder.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    with torch.no_grad():
        if arch == "detr_sigmoid":
            logits, boxes = (t[0] for t in model(_resized(image)))
        else:
            out = model(_resized(image))[0]
            boxes, logits = out[:, :4], torch.logit(out[:, 4:].double(), eps=1e-7).float()
    hook.remove()
    keep, scores, cls, expected = _set_reference(logits.sigmoid(), boxes, image, 0.2, 8)
    assert 2 <= len(d) == len(keep)
    torch.testing.assert_close(d.scores, scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.boxes, expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(d.labels, cls + 1)
    torch.testing.assert_close(d.taps["box_head.output"], captured[0][keep], rtol=1e-4, atol=1e-5)
    assert torch.equal(d.logits[:, 0], torch.zeros(len(d)))  # background zeros first
    torch.testing.assert_close(d.logits[:, 1:], logits[keep], rtol=1e-4, atol=1e-4)
    if arch == "detr_sigmoid":  # the certified head: the class layer with a zero background row
        head = det.monitored_head("box_head.output")
        with torch.no_grad():
            torch.testing.assert_close(head(d.taps["box_head.output"]), d.logits, rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(CertoodError, match="layout rtdetr: no monitored head"):
            det.monitored_head("box_head.output")


def test_activation_applies_to_detr_only(stock_yolo):
    with pytest.raises(CertoodError, match="only the detr layout"):
        OnnxDetector(stock_yolo[1], {}, layout="yolo", activation="sigmoid")
    with pytest.raises(CertoodError, match="unknown activation 'relu'"):
        OnnxDetector(stock_yolo[1], {}, layout="detr", activation="relu")


def test_multi_label_keeps_every_anchor_class_pair_above_the_cut(stock_yolo):
    """``multi_label``: candidates are (anchor, class) pairs, as ultralytics' val NMS; one anchor
    may give detections of several classes, each with its anchor's logits."""
    model, path, _ = stock_yolo
    det = OnnxDetector(path, {}, layout="yolo", score_thresh=0.2, multi_label=True, max_detections=300)
    image = _images(4)[0]
    [d] = det.detect([image])
    with torch.no_grad():
        pred = model(_resized(image))[0].T
    boxes = torch.cat([pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2], dim=1).clamp(0, SIZE)
    anchors, cls = torch.nonzero(pred[:, 4:] >= 0.2, as_tuple=True)
    scores = pred[anchors, 4 + cls]
    keep = batched_nms(boxes[anchors], scores, cls, 0.5)[:300]
    assert len(d) == len(keep) > len(torch.unique(anchors[keep]))  # some anchor gave two classes
    torch.testing.assert_close(d.scores, scores[keep], rtol=1e-5, atol=1e-6)
    assert torch.equal(d.labels, cls[keep] + 1)
    torch.testing.assert_close(torch.sigmoid(d.logits[:, 1:]), pred[anchors[keep], 4:], rtol=1e-4, atol=1e-5)
    with pytest.raises(CertoodError, match="multi_label: only the yolo layout"):
        OnnxDetector(path, {}, layout="rtdetr", multi_label=True)
