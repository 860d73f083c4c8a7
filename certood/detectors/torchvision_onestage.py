"""torchvision one-stage detectors (RetinaNet, FCOS, SSD / SSDlite) with per-detection features.

A one-stage detector scores anchors (or locations) of a feature pyramid; each kept detection
comes from one anchor ``a`` at one location ``(y, x)`` of one level. Tap points, read at that
anchor and location:

- ``head.input``        the pyramid feature vector at the location (what the classification
  head reads there); only when every level has the same width (RetinaNet, FCOS: the FPN's
  channels; not SSDlite, whose levels are 672, 480, 512, 256, 256, 128 wide);
- ``head.cls_features`` the classification tower's output at the location (RetinaNet, FCOS:
  the last features before the class-logit convolution);
- ``cls_logits``        the anchor's class logits ``[K]``. RetinaNet and FCOS score classes with
  sigmoids and keep torchvision's class 0 (background, never a positive) as column 0; SSD uses
  a softmax over classes with background in column 0. FCOS's detection score is
  ``sqrt(sigmoid(logit) * sigmoid(centerness))``; the centerness is not part of the logits.

The forward pass is written out (transform, backbone, head with its tower kept, anchors) and the
postprocessing carries each candidate's anchor row through the score filter, top-k, NMS and
``detections_per_img``, exactly as torchvision indexes them, so boxes, scores and labels equal
``model(images)``. Detections labelled 0 (the background class, which sigmoid heads can still
score above the threshold) are dropped: certood's labels are 1..C-1.

One-stage heads compute an anchor's logits with a 3x3 convolution over a neighbourhood of the
tower's map, so the logits are not a function of one box's feature vector: there is no
``monitored_head`` and these detectors take no certificates.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

from certood.detectors.base import Detections
from certood.detectors.torchvision_frcnn import run_backbone
from certood.errors import CertoodError

ONESTAGE_ARCHS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
                  "ssdlite320_mobilenet_v3_large")


def family(model: nn.Module) -> str:
    if isinstance(model, detection.RetinaNet):
        return "retinanet"
    if isinstance(model, detection.FCOS):
        return "fcos"
    if isinstance(model, SSD):
        return "ssd"
    raise CertoodError(f"not a torchvision one-stage detector: {type(model).__name__} "
                       "(expected RetinaNet, FCOS or SSD)")


def build_onestage(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """A randomly initialised torchvision one-stage detector (no downloads)."""
    if arch not in ONESTAGE_ARCHS:
        raise CertoodError(f"unknown one-stage arch {arch!r}; expected one of: {', '.join(ONESTAGE_ARCHS)}")
    if arch.startswith("ssdlite"):
        kwargs.pop("min_size", None), kwargs.pop("max_size", None)  # SSDlite resizes to 320x320
    builder = getattr(detection, arch)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def _per_anchor(x: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, A * K, H, W) -> (N, H * W * A, K), torchvision's anchor order (y, x, a)."""
    n, _, h, w = x.shape
    return x.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)


def _per_location(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H * W, C), locations in (y, x) order."""
    return x.flatten(2).transpose(1, 2)


class TorchvisionOneStage:
    """Adapter around a torchvision RetinaNet, FCOS or SSD: images in, :class:`Detections` out.

    >>> det = TorchvisionOneStage(build_onestage("ssdlite320_mobilenet_v3_large", 6))  # doctest: +SKIP
    >>> det.tap_points  # doctest: +SKIP
    ('cls_logits',)
    """

    def __init__(self, model: nn.Module, weights_sha256: str = "", device: str = "cpu"):
        self.family = family(model)
        self.model = model.eval().to(device)
        self.weights_sha256 = weights_sha256
        self.device = device
        points = ["cls_logits"]
        if self.family in ("retinanet", "fcos"):
            points.append("head.cls_features")
        if self._uniform_width() is not None:
            points.append("head.input")
        self.tap_points = tuple(points)

    def _uniform_width(self) -> int | None:
        widths = getattr(self.model.backbone, "out_channels", None)
        if isinstance(widths, int):
            return widths
        if isinstance(widths, (list, tuple)) and len(set(widths)) == 1:
            return int(widths[0])
        return None

    @property
    def num_classes(self) -> int:
        """Number of classes, background (column 0) included."""
        head = self.model.head.classification_head
        return int(head.num_classes if self.family != "ssd" else head.num_columns)

    def monitored_head(self) -> nn.Module:
        raise CertoodError(f"{self.family}: a one-stage head computes an anchor's logits from a 3x3 "
                           "neighbourhood of its feature map, not from one box's feature vector; "
                           "certificates need a two-stage detector (a box head)")

    # ------------------------------------------------------------------ forward
    def _head(self, features: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Head outputs per level ([N, H*W*A, .]), plus the classification tower per level."""
        head = self.model.head
        if self.family == "ssd":
            cls = head.classification_head(features)
            reg = head.regression_head(features)
            per_level = [_anchors_at(head.classification_head, i, f) for i, f in enumerate(features)]
            return {"cls_logits": list(cls.split(per_level, dim=1)),
                    "bbox_regression": list(reg.split(per_level, dim=1))}
        ch = head.classification_head
        tower = [ch.conv(f) for f in features]
        logits = [_per_anchor(ch.cls_logits(t), ch.num_classes) for t in tower]
        per_level = [x.shape[1] for x in logits]
        out = {"cls_logits": logits, "tower": tower}
        if self.family == "fcos":
            reg, ctr = head.regression_head(features)
            out["bbox_regression"] = list(reg.split(per_level, dim=1))
            out["bbox_ctrness"] = list(ctr.split(per_level, dim=1))
        else:
            out["bbox_regression"] = list(head.regression_head(features).split(per_level, dim=1))
        return out

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[Detections]:
        """Run the detector on float CHW images in [0, 1]; one :class:`Detections` per image."""
        m = self.model
        batch, features, original_sizes = run_backbone(m, images, self.device)
        features = list(features.values())
        head = self._head(features)
        anchors = m.anchor_generator(batch, features)
        per_level = [x.shape[1] for x in head["cls_logits"]]
        # anchor row -> location row in the concatenated per-location tables
        loc_of_row, offset = [], 0
        for f, n_rows in zip(features, per_level):
            hw = f.shape[2] * f.shape[3]
            loc_of_row.append(offset + torch.arange(n_rows, device=f.device) // (n_rows // hw))
            offset += hw
        loc_of_row = torch.cat(loc_of_row)
        tables = {}
        if "head.input" in self.tap_points:
            tables["head.input"] = torch.cat([_per_location(f) for f in features], dim=1)
        if "head.cls_features" in self.tap_points:
            tables["head.cls_features"] = torch.cat([_per_location(t) for t in head["tower"]], dim=1)
        logits_all = torch.cat(head["cls_logits"], dim=1)

        results = []
        kept = self._postprocess(head, anchors, batch.image_sizes, per_level)
        for i, ((boxes, scores, labels, rows), resized, original) in enumerate(
                zip(kept, batch.image_sizes, original_sizes)):
            fg = labels > 0
            boxes, scores, labels, rows = boxes[fg], scores[fg], labels[fg], rows[fg]
            ry, rx = original[0] / resized[0], original[1] / resized[1]
            boxes = boxes * torch.tensor([rx, ry, rx, ry], dtype=boxes.dtype, device=boxes.device)
            taps = {"cls_logits": logits_all[i, rows]}
            for point, table in tables.items():
                taps[point] = table[i, loc_of_row[rows]]
            results.append(Detections(boxes=boxes.cpu(), labels=labels.cpu(), scores=scores.cpu(),
                                      logits=taps["cls_logits"].cpu(),
                                      taps={k: v.cpu() for k, v in taps.items()}))
        return results

    # ------------------------------------------------------------------ postprocessing
    def _postprocess(self, head, anchors, image_shapes, per_level):
        if self.family == "ssd":
            return self._postprocess_ssd(head, anchors, image_shapes)
        return self._postprocess_pyramid(head, anchors, image_shapes, per_level)

    def _postprocess_pyramid(self, head, anchors, image_shapes, per_level):
        """RetinaNet's / FCOS's ``postprocess_detections``, also returning each box's anchor row."""
        m = self.model
        offsets = [sum(per_level[:k]) for k in range(len(per_level))]
        out = []
        for index, image_shape in enumerate(image_shapes):
            anchors_per_level = anchors[index].split(per_level)
            image_boxes, image_scores, image_labels, image_rows = [], [], [], []
            for level, offset in enumerate(offsets):
                logits = head["cls_logits"][level][index]
                regression = head["bbox_regression"][level][index]
                num_classes = logits.shape[-1]
                if self.family == "fcos":
                    ctr = head["bbox_ctrness"][level][index]
                    scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctr)).flatten()
                else:
                    scores = torch.sigmoid(logits).flatten()
                keep = scores > m.score_thresh
                scores = scores[keep]
                topk_idxs = torch.where(keep)[0]
                num_topk = det_utils._topk_min(topk_idxs, m.topk_candidates, 0)
                scores, idxs = scores.topk(num_topk)
                topk_idxs = topk_idxs[idxs]
                anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
                labels = topk_idxs % num_classes
                if self.family == "fcos":
                    boxes = m.box_coder.decode(regression[anchor_idxs], anchors_per_level[level][anchor_idxs])
                else:
                    boxes = m.box_coder.decode_single(regression[anchor_idxs], anchors_per_level[level][anchor_idxs])
                boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
                image_boxes.append(boxes)
                image_scores.append(scores)
                image_labels.append(labels)
                image_rows.append(anchor_idxs + offset)
            boxes, scores = torch.cat(image_boxes), torch.cat(image_scores)
            labels, rows = torch.cat(image_labels), torch.cat(image_rows)
            keep = box_ops.batched_nms(boxes, scores, labels, m.nms_thresh)[: m.detections_per_img]
            out.append((boxes[keep], scores[keep], labels[keep], rows[keep]))
        return out

    def _postprocess_ssd(self, head, anchors, image_shapes):
        """SSD's ``postprocess_detections``, also returning each box's anchor row."""
        m = self.model
        regression = torch.cat(head["bbox_regression"], dim=1)
        pred_scores = F.softmax(torch.cat(head["cls_logits"], dim=1), dim=-1)
        num_classes = pred_scores.size(-1)
        out = []
        for boxes, scores, image_anchors, image_shape in zip(regression, pred_scores, anchors, image_shapes):
            boxes = m.box_coder.decode_single(boxes, image_anchors)
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            all_rows = torch.arange(boxes.shape[0], device=boxes.device)
            image_boxes, image_scores, image_labels, image_rows = [], [], [], []
            for label in range(1, num_classes):
                score = scores[:, label]
                keep = score > m.score_thresh
                score, box, rows = score[keep], boxes[keep], all_rows[keep]
                num_topk = det_utils._topk_min(score, m.topk_candidates, 0)
                score, idxs = score.topk(num_topk)
                image_boxes.append(box[idxs])
                image_scores.append(score)
                image_labels.append(torch.full_like(score, fill_value=label, dtype=torch.int64))
                image_rows.append(rows[idxs])
            boxes, scores = torch.cat(image_boxes), torch.cat(image_scores)
            labels, rows = torch.cat(image_labels), torch.cat(image_rows)
            keep = box_ops.batched_nms(boxes, scores, labels, m.nms_thresh)[: m.detections_per_img]
            out.append((boxes[keep], scores[keep], labels[keep], rows[keep]))
        return out


def _anchors_at(scoring_head, level: int, feature: torch.Tensor) -> int:
    """Rows one level of an SSD scoring head produces (H * W * anchors of that level)."""
    module = scoring_head.module_list[level]
    out_channels = [mod.out_channels for mod in module.modules() if isinstance(mod, nn.Conv2d)][-1]
    return feature.shape[2] * feature.shape[3] * (out_channels // scoring_head.num_columns)
