"""torchvision Faster R-CNN adapter: detections with per-box features at named taps.

Tap points (where a monitor can read features), in forward order:

- ``box_head.input``  the RoIAlign feature of the box's proposal, flattened (the region
  that certificates perturb);
- ``box_head.output`` the box-head MLP output (penultimate features);
- ``cls_logits``      the class logits, background column first;
- ``box_jitter.logits`` (computed only when a monitor reads it) the class logits of the
  detection itself (its ``cls_logits``, pooled at its proposal), then of ``JITTERS`` (8)
  jittered copies of its final, regressed box re-pooled from the same feature maps through
  the same box head: ``[N, (K + 1) * C]``. A detection-specific signal: the box head of an object it knows keeps
  its class distribution when the box moves a little; on unknown objects it does not
  (certood.scores.jitter_kl). Costs K extra box-head passes per box, no backbone pass.

The forward pass is written out stage by stage (transform, backbone, RPN, RoI pooling,
box head, predictor) instead of hooked, and NMS carries each proposal's row index through
every filter, so each kept detection is tied to the exact feature row that produced it.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops

from certood.detectors.base import Detections, file_sha256
from certood.errors import CertoodError, DataError
from certood.scores.jitter_kl import JITTERS
from certood.spec.v1 import ARCHS, BUILTIN_WEIGHTS as SPEC_BUILTIN_WEIGHTS

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TAP_POINTS = ("box_head.input", "box_head.output", "cls_logits")  # the two-stage taps of the spec
JITTER_TAP = "box_jitter.logits"
JITTER_SCALE = 0.2  # shifts by 20% of the box's width / height, scales 0.8 and 1.2, aspect 1.2:0.8
BUILTIN_WEIGHTS = {name: ASSETS / f"{name}.safetensors" for name in SPEC_BUILTIN_WEIGHTS}


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def digits_fasterrcnn(num_classes: int = 6, **kwargs) -> detection.FasterRCNN:
    """The demo detector: the standard two-stage Faster R-CNN on a 4-layer conv backbone.

    About 1.0M parameters (stride 8, one feature map, anchors 16-48 px, RoIAlign 7x7,
    TwoMLPHead 3136 -> 256 -> 256), sized for 128x128 DigitsDet canvases.

    >>> model = digits_fasterrcnn(num_classes=6).eval()
    """
    backbone = nn.Sequential(_conv(3, 32, 2), _conv(32, 64, 2), _conv(64, 64, 2), _conv(64, 64, 1))
    backbone.out_channels = 64
    anchors = AnchorGenerator(sizes=((16, 24, 32, 48),), aspect_ratios=((0.5, 1.0, 2.0),))
    options = dict(min_size=128, max_size=128, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                   rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150)
    options.update(kwargs)
    return detection.FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(64 * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        **options,
    )


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """A randomly initialised detector of a supported architecture (no downloads)."""
    from certood.detectors.torchvision_onestage import ONESTAGE_ARCHS, build_onestage

    if arch == "digits_fasterrcnn":
        return digits_fasterrcnn(num_classes, **kwargs)
    if arch in ONESTAGE_ARCHS:
        return build_onestage(arch, num_classes, **kwargs)
    if arch in ARCHS:
        builder = getattr(detection, arch)
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    raise CertoodError(f"unknown detector arch {arch!r}; expected one of: {', '.join(ARCHS)}")


def resolve_weights(weights: str) -> Path:
    if weights.startswith("builtin:"):
        name = weights.split(":", 1)[1]
        if name not in BUILTIN_WEIGHTS:
            raise CertoodError(f"unknown builtin weights {name!r}; expected one of: "
                               f"{', '.join(BUILTIN_WEIGHTS)}")
        return BUILTIN_WEIGHTS[name]
    return Path(weights)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a torch file read with ``weights_only=True`` (no pickle code)."""
    if not path.exists():
        raise CertoodError(f"detector weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CertoodError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise CertoodError(f"{path}: cannot be read as plain tensors with weights_only=True "
                           f"(certood never unpickles code from files); re-save it as a state "
                           f"dict or as safetensors ({type(e).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CertoodError(f"{path}: expected a state dict, found {type(state).__name__}")
    # weights_only=True also lets ints, lists and nested dicts through: a state dict is tensors
    bad = next(((k, v) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        raise DataError(f"{path}: key {bad[0]!r}: expected a tensor, found {type(bad[1]).__name__} "
                        "(a state dict maps parameter names to tensors)")
    return state


def postprocess_with_rows(roi_heads, class_logits: torch.Tensor, box_regression: torch.Tensor,
                          proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]):
    """torchvision's ``RoIHeads.postprocess_detections``, also returning each kept box's row.

    The row indexes ``class_logits`` (and every tapped feature): one proposal can yield boxes
    of several classes, all pointing at the same row.
    """
    num_classes = class_logits.shape[-1]
    per_image = [p.shape[0] for p in proposals]
    pred_boxes = roi_heads.box_coder.decode(box_regression, proposals)
    pred_scores = F.softmax(class_logits, -1)
    rows_all = torch.arange(class_logits.shape[0], device=class_logits.device)
    out = []
    for boxes, scores, rows, shape in zip(pred_boxes.split(per_image), pred_scores.split(per_image),
                                          rows_all.split(per_image), image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, shape)
        labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
        rows = rows.view(-1, 1).expand_as(scores)
        boxes, scores, labels, rows = boxes[:, 1:], scores[:, 1:], labels[:, 1:], rows[:, 1:]
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        labels, rows = labels.reshape(-1), rows.reshape(-1)
        keep = torch.where(scores > roi_heads.score_thresh)[0]
        boxes, scores, labels, rows = boxes[keep], scores[keep], labels[keep], rows[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, rows = boxes[keep], scores[keep], labels[keep], rows[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, roi_heads.nms_thresh)
        keep = keep[: roi_heads.detections_per_img]
        out.append((boxes[keep], scores[keep], labels[keep], rows[keep]))
    return out


def jitter_boxes(boxes: torch.Tensor, image_size: tuple[int, int], s: float = JITTER_SCALE) -> torch.Tensor:
    """``[N, 4]`` xyxy boxes -> ``[N, 8, 4]`` jittered copies, clipped to ``image_size`` (h, w):
    shifted by ``s`` times the width right and left and the height down and up, scaled by
    ``1 + s`` and ``1 - s`` about the centre, and stretched ``(1 + s, 1 - s)`` and
    ``(1 - s, 1 + s)`` in (width, height).

    >>> jitter_boxes(torch.tensor([[10., 10., 20., 30.]]), (100, 100), 0.1)[0, :2].tolist()
    [[11.0, 10.0, 21.0, 30.0], [9.0, 10.0, 19.0, 30.0]]
    """
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    moves = [(s, 0, 1, 1), (-s, 0, 1, 1), (0, s, 1, 1), (0, -s, 1, 1),  # (dx/w, dy/h, w scale, h scale)
             (0, 0, 1 + s, 1 + s), (0, 0, 1 - s, 1 - s), (0, 0, 1 + s, 1 - s), (0, 0, 1 - s, 1 + s)]
    out = []
    for dx, dy, sw, sh in moves:
        x, y, hw, hh = cx + dx * w, cy + dy * h, w * sw / 2, h * sh / 2
        out.append(torch.stack([x - hw, y - hh, x + hw, y + hh], dim=1))
    jittered = torch.stack(out, dim=1)
    return box_ops.clip_boxes_to_image(jittered.reshape(-1, 4), image_size).reshape(jittered.shape)


class TorchvisionFasterRCNN:
    """Adapter around a torchvision ``FasterRCNN``: images in, :class:`Detections` out.

    >>> det = TorchvisionFasterRCNN(digits_fasterrcnn(6))
    >>> [d] = det.detect([torch.rand(3, 128, 128)])
    >>> sorted(d.taps)
    ['box_head.input', 'box_head.output', 'cls_logits']
    """

    tap_points = TAP_POINTS + (JITTER_TAP,)
    optional_tap_points = (JITTER_TAP,)  # computed only when asked for (detect(optional=...))

    def __init__(self, model: detection.FasterRCNN, weights_sha256: str = "", device: str = "cpu"):
        self.model = model.eval().to(device)
        self.weights_sha256 = weights_sha256
        self.device = device
        self.optional_seconds = 0.0  # time spent on optional tap points, for cost ratios

    @property
    def num_classes(self) -> int:
        return int(self.model.roi_heads.box_predictor.cls_score.out_features)

    def monitored_head(self, start: str = "box_head.input") -> nn.Module:
        """The part of the network between the ``start`` tap and ``cls_logits``: box head +
        classifier from ``box_head.input``, the classifier alone from ``box_head.output``
        (an ``nn.Sequential`` ending with the classifier's Linear layer either way)."""
        cls_score = self.model.roi_heads.box_predictor.cls_score
        if start == "box_head.input":
            return nn.Sequential(self.model.roi_heads.box_head, cls_score)
        if start == "box_head.output":
            return nn.Sequential(cls_score)
        raise CertoodError(f"monitored_head: expected start box_head.input or box_head.output, found {start!r}")

    def foreground_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [C-1, D], b [C-1]): the classifier rows of the foreground classes."""
        layer = self.model.roi_heads.box_predictor.cls_score
        return layer.weight.detach()[1:].cpu(), layer.bias.detach()[1:].cpu()

    def foreground_head(self):
        """Callable: ``box_head.input`` features [N, 3136] -> foreground logits [N, C-1]."""
        head = self.monitored_head().cpu().eval()
        return lambda x: head(x)[:, 1:]

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor], optional: tuple[str, ...] | list[str] = (),
               min_score: float | None = None) -> list[Detections]:
        """Run the detector on float CHW images in [0, 1]; one :class:`Detections` per image,
        with the optional tap points in ``optional`` too (``box_jitter.logits``), computed for
        the boxes scoring at least ``min_score`` (NaN rows for the others)."""
        m = self.model
        batch, features, original_sizes = run_backbone(m, images, self.device)
        proposals, _ = m.rpn(batch, features)
        rh = m.roi_heads
        roi = rh.box_roi_pool(features, proposals, batch.image_sizes)
        penultimate = rh.box_head(roi)
        class_logits, box_regression = rh.box_predictor(penultimate)
        taps = {"box_head.input": roi.flatten(1), "box_head.output": penultimate,
                "cls_logits": class_logits}
        results = []
        kept = postprocess_with_rows(rh, class_logits, box_regression, proposals, batch.image_sizes)
        jitter = None
        if JITTER_TAP in optional:
            start = time.perf_counter()
            jitter = self._jitter_logits(features, kept, batch.image_sizes, min_score)
            self.optional_seconds += time.perf_counter() - start
        for i, ((boxes, scores, labels, rows), resized, original) in enumerate(
                zip(kept, batch.image_sizes, original_sizes)):
            boxes = _resize_boxes(boxes, resized, original)
            image_taps = {k: v[rows].cpu() for k, v in taps.items()}
            if jitter is not None:
                image_taps[JITTER_TAP] = torch.cat([class_logits[rows], jitter[i]], dim=1).cpu()
            results.append(Detections(
                boxes=boxes.cpu(), labels=labels.cpu(), scores=scores.cpu(),
                logits=class_logits[rows].cpu(), taps=image_taps,
            ))
        return results

    def _jitter_logits(self, features, kept, image_sizes, min_score: float | None = None) -> list[torch.Tensor]:
        """Per image ``[n, K * C]``: class logits at the jittered copies of each kept box
        (in the transformed image's coordinates, where the feature maps live); NaN for boxes
        scoring below ``min_score``."""
        rh = self.model.roi_heads
        wanted = [scores >= min_score if min_score is not None else torch.ones_like(scores, dtype=torch.bool)
                  for _, scores, *_ in kept]
        jittered = [jitter_boxes(boxes[w], size).reshape(-1, 4)
                    for (boxes, *_), w, size in zip(kept, wanted, image_sizes)]
        logits, _ = rh.box_predictor(rh.box_head(rh.box_roi_pool(features, jittered, image_sizes)))
        out = []
        for w, part in zip(wanted, logits.split([len(j) for j in jittered])):
            rows = torch.full((len(w), JITTERS * logits.shape[1]), math.nan, dtype=logits.dtype, device=logits.device)
            rows[w] = part.reshape(int(w.sum()), JITTERS * logits.shape[1])
            out.append(rows)
        return out


def run_backbone(model, images: list[torch.Tensor], device: str):
    """torchvision's transform + backbone: (image batch, feature maps by name, original sizes)."""
    images = [img.to(device) for img in images]
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    return batch, features, original_sizes


def _resize_boxes(boxes: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    ry = original[0] / resized[0]
    rx = original[1] / resized[1]
    return boxes * torch.tensor([rx, ry, rx, ry], dtype=boxes.dtype, device=boxes.device)


BYTES_PER_INPUT_PIXEL = 640  # peak RSS per image per resized input pixel (see default_batch_size)
MAX_DEFAULT_BATCH = 8


def default_batch_size(min_size: int, max_size: int, memory_bytes: int | None = None) -> int:
    """Images per forward pass when the spec sets none: as many as fit a memory budget of
    1/8 of the machine's RAM (0.5 to 4 GB), at most 8, at least 1.

    An image is resized to at most ``min_size x max_size`` pixels; one measurement sets the cost
    per pixel: R50-FPN at 800x1067 in batches of 8 peaked at 4.7 GB RSS, about 640 bytes per
    input pixel per image. So the demo detector (128x128) keeps batches of 8, and an R50-FPN at
    torchvision's default 800/1333 runs 4 images per batch on a 24 GB machine, 6 on 128 GB.

    >>> default_batch_size(128, 128), default_batch_size(800, 1333, memory_bytes=24 << 30)
    (8, 4)
    """
    import os

    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
            memory_bytes = 8 << 30
    budget = min(max(memory_bytes // 8, 512 << 20), 4 << 30)
    per_image = BYTES_PER_INPUT_PIXEL * min_size * max_size
    return int(min(MAX_DEFAULT_BATCH, max(1, budget // per_image)))


def input_size_of(model: nn.Module) -> tuple[int, int]:
    """``(min_size, max_size)`` of a torchvision detector's resizing transform."""
    t = model.transform
    min_size = t.min_size[-1] if isinstance(t.min_size, (tuple, list)) else t.min_size
    return int(min_size), int(t.max_size)


def load_detector(arch: str, weights: str, num_classes: int | None = None,
                  device: str = "cpu", batch_size: int | None = None, **options):
    """Build ``arch``, load ``weights`` strictly, and wrap it in the adapter (Faster R-CNN:
    :class:`TorchvisionFasterRCNN`; RetinaNet, FCOS, SSDlite: ``TorchvisionOneStage``).

    ``options`` go to the builder (``min_size``, ``max_size``: the resized image's shorter side
    and its longest side at most; torchvision's defaults 800 / 1333, the demo detector's 128 /
    128, SSDlite fixed at 320 x 320). ``batch_size``: images per forward pass in extraction
    (default :func:`default_batch_size` of that size)."""
    from certood.detectors.torchvision_onestage import ONESTAGE_ARCHS, TorchvisionOneStage

    path = resolve_weights(weights)
    state = load_state_dict(path)
    if num_classes is None:
        key = "roi_heads.box_predictor.cls_score.weight"
        if arch in ONESTAGE_ARCHS or key not in state:
            raise CertoodError(f"{path}: cannot infer num_classes (no {key}); set detector.num_classes")
        num_classes = int(state[key].shape[0])
    model = build_model(arch, num_classes, **options)
    expected = model.state_dict()
    problems = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "shape mismatch (file vs model)": [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
                                           for k, v in state.items()
                                           if k in expected and v.shape != expected[k].shape],
    }
    if any(problems.values()):
        detail = "; ".join(f"{kind}: {', '.join(items[:3])}{'...' if len(items) > 3 else ''}"
                           for kind, items in problems.items() if items)
        raise CertoodError(f"{path}: weights do not fit arch {arch!r} with num_classes={num_classes}: "
                           f"{detail}")
    model.load_state_dict(state, strict=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = TorchvisionOneStage if arch in ONESTAGE_ARCHS else TorchvisionFasterRCNN
    det = adapter(model, file_sha256(path), device)
    det.batch_size = int(batch_size) if batch_size else default_batch_size(*input_size_of(model))
    return det


class TwoStageOnnxModule(nn.Module):
    """A torchvision Faster R-CNN in the ``two_stage`` ONNX layout (certood.detectors.onnx_detector):
    image ``[1, 3, H, W]`` in; ``boxes``, ``labels``, ``scores`` and each detection's proposal
    ``rows`` out. The transform is left out: the image must already be at the model's size and
    normalisation (the demo detector's transform is the identity at 128 px)."""

    def __init__(self, model: detection.FasterRCNN):
        super().__init__()
        self.backbone = model.backbone
        self.rpn = model.rpn
        self.box_roi_pool = model.roi_heads.box_roi_pool
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor
        self.roi_heads = model.roi_heads

    def forward(self, image: torch.Tensor):
        from torchvision.models.detection.image_list import ImageList

        batch = ImageList(image, [tuple(image.shape[-2:])])
        features = self.backbone(image)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = self.rpn(batch, features)
        roi = self.box_roi_pool(features, proposals, batch.image_sizes)
        logits, regression = self.box_predictor(self.box_head(roi))
        [(boxes, scores, labels, rows)] = postprocess_with_rows(self.roi_heads, logits, regression,
                                                                proposals, batch.image_sizes)
        return boxes, labels, scores, rows


def export_two_stage_onnx(model: detection.FasterRCNN, path: str | Path, size: tuple[int, int] = (128, 128),
                          dynamic: bool = True, opset: int = 17) -> dict[str, str]:
    """Export ``model`` in the ``two_stage`` ONNX layout; returns the spec's ``detector.tensors``
    (tap point -> graph tensor): the box head's input and output, the class logits.

    TorchScript exporter (``dynamo=False``): its graphs convert back with onnx2torch (certificates).

    >>> tensors = export_two_stage_onnx(digits_fasterrcnn(6).eval(), "frcnn.onnx")  # doctest: +SKIP
    """
    import io
    import warnings

    import onnx

    module = TwoStageOnnxModule(model.eval()).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's python control flow
        torch.onnx.export(module, (torch.rand(1, 3, *size),), buf, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["boxes", "labels", "scores", "rows"],
                          dynamic_axes={"images": {2: "height", 3: "width"}} if dynamic else None)
    graph = onnx.load_from_string(buf.getvalue()).graph
    first = {}
    for node in graph.node:
        scope = node.name.split("/")[1] if node.name.startswith("/") else ""
        first.setdefault(scope, node)
    cls_score = [n for n in graph.node if n.name.startswith("/box_predictor/cls_score/")]
    if "box_head" not in first or "box_predictor" not in first or len(cls_score) != 1:
        raise CertoodError("export: cannot find the box head and classifier in the exported graph")
    Path(path).write_bytes(buf.getvalue())
    return {"box_head.input": first["box_head"].input[0], "box_head.output": first["box_predictor"].input[0],
            "cls_logits": cls_score[0].output[0]}
