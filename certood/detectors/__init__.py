"""Detector adapters: each yields :class:`~certood.detectors.base.Detections` with the features
at its tap points. ``detector_from_spec`` builds the one a spec names."""
from __future__ import annotations

from certood.errors import UsageError


def detector_from_spec(detector, taps: dict[str, str] | None = None):
    """The detector of a spec's ``detector:`` block (a ``DetectorSpec``), loaded.

    torchvision Faster R-CNN -> ``TorchvisionFasterRCNN``; RetinaNet, FCOS, SSDlite ->
    ``TorchvisionOneStage``; kind onnx -> ``OnnxDetector``. With ``taps`` (the spec's
    name -> tap point), refuses a detector that has no such tap point.
    """
    d = detector
    if d.kind == "onnx":
        from certood.detectors.onnx_detector import OnnxDetector

        det = OnnxDetector(d.weights, d.tensors, d.layout or "two_stage", input_name=d.input,
                           outputs=d.outputs or None, num_classes=d.num_classes, score_thresh=d.score_thresh,
                           nms_thresh=d.nms_thresh, max_detections=d.max_detections,
                           multi_label=getattr(d, "multi_label", False),
                           activation=d.activation, preprocess=d.preprocess, batch_size=d.batch_size or 8,
                           device=d.device)
        what = "detector.tensors"
    else:
        from certood.detectors.torchvision_frcnn import load_detector
        from certood.detectors.torchvision_onestage import ONESTAGE_ARCHS

        options = {k: v for k, v in (("min_size", d.min_size), ("max_size", d.max_size)) if v is not None}
        if options and d.arch.startswith("ssdlite"):
            raise UsageError(f"detector.{', '.join(options)}: arch {d.arch} resizes every image to 320x320; "
                             "min_size and max_size do not apply to it")
        options["score_thresh" if d.arch in ONESTAGE_ARCHS else "box_score_thresh"] = d.score_thresh
        det = load_detector(d.arch, d.weights, d.num_classes, device=d.device,
                            batch_size=getattr(d, "batch_size", None), **options)
        what = f"arch {d.arch}"
    missing = sorted({f"{name} ({point})" for name, point in (taps or {}).items()
                      if point not in det.tap_points})
    if missing:
        raise UsageError(f"taps {', '.join(missing)}: the detector has no such tap point ({what} offers: "
                         f"{', '.join(det.tap_points) or 'none'})")
    return det
