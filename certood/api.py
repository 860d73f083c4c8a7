"""certood's public Python API: a calibrated monitor attached to a detector, inside your program.

Four calls and two result types::

    import certood
    mon = certood.load("runs/demo/monitor")         # or certood.compile("specs/demo.yaml").calibrate()
    result = mon(image)                              # float CHW tensor in [0, 1], HWC uint8 array, PIL
    for box in result.boxes:                         # BoxResult: the fields of a boxes.jsonl line
        box.box, box.label, box.det_score, box.scores, box.flag, box.certificate
    mon = certood.attach(my_model, mon)              # your in-memory Faster R-CNN / ORT session
    stream = mon.stream()                            # one video: tracker state across frames
    for frame in video:
        for box in stream(frame).boxes:
            box.track_id, box.track_scores, box.track_flag

Every call runs the stages ``certood check`` runs, on one batch (:class:`certood.stages.BatchRunner`):
the detector through :func:`certood.extract.detect_batch` (with the detector-score cut), the fitted scores and
the rule (:class:`certood.monitor.Monitor`), certificates (:class:`certood.certify.Certifier`)
and, in a stream, the tracker of :mod:`certood.temporal` with its aggregates updated frame by
frame (the same numbers as the offline aggregates, which see a track's past only).

Attaching a monitor to a model whose weights are not the calibrated ones is refused with both
hashes named (``allow_weight_mismatch=True`` overrides, and every result then records it).

>>> mon = load("runs/demo/monitor")  # doctest: +SKIP
>>> [b.flag for b in mon(torch.rand(3, 128, 128)).boxes]  # doctest: +SKIP
[False, True]
"""
from __future__ import annotations

import copy
import hashlib
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from certood.errors import ArtifactError, CertoodError, UsageError
from certood.monitor import Monitor as FittedMonitor
from certood.monitor import head_if_needed
from certood.spec import Spec

__all__ = ["BoxResult", "ImageResult", "Monitor", "Stream", "attach", "compile", "load",
           "state_dict_sha256"]


# =========================================================================== results
@dataclass(frozen=True)
class BoxResult:
    """One monitored box; the field names are those of a ``boxes.jsonl`` line.

    ``box``: xyxy pixels of the input image (``box_format``); ``label``: detector label
    (1..C-1); ``category_id``: the ID dataset's category of that label; ``det_score``: the
    detector's confidence; ``scores``: every OOD score of the spec (higher = more OOD);
    ``flag``: the rule's verdict (True = OOD). ``certificate`` (specs with ``certify``) is the
    dict boxes.jsonl carries. In a stream: ``track_id``, ``track_scores`` (aggregates along the
    track), ``track_flag`` and, with ``temporal.certified``, ``track_certified_ood``.
    """

    box: tuple[float, float, float, float]
    label: int
    category_id: int
    det_score: float
    scores: dict[str, float]
    flag: bool
    box_format: str = "xyxy"
    certificate: dict | None = None
    frame_id: int | None = None
    track_id: int | None = None
    track_scores: dict[str, float] | None = None
    track_flag: bool | None = None
    track_certified_ood: bool | None = None

    def to_dict(self) -> dict:
        """JSON-ready, as in boxes.jsonl: unset optional fields (None) are left out."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = list(value) if f.name == "box" else dict(value) if isinstance(value, dict) else value
        return out


@dataclass(frozen=True)
class ImageResult:
    """The monitored boxes of one image (detector score at or above the calibrated cut).

    ``image_id``: the caller's id, else the image's position in the call (0-based);
    ``weights_mismatch``: set only when the monitor was attached with
    ``allow_weight_mismatch=True`` to weights other than the calibrated ones (both hashes).
    """

    image_id: int
    boxes: tuple[BoxResult, ...]
    frame_id: int | None = None
    weights_mismatch: dict | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def flagged(self) -> tuple[BoxResult, ...]:
        """The boxes the rule flags as OOD."""
        return tuple(b for b in self.boxes if b.flag)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"image_id": self.image_id, "boxes": [b.to_dict() for b in self.boxes]}
        if self.frame_id is not None:
            out["frame_id"] = self.frame_id
        if self.weights_mismatch is not None:
            out["weights_mismatch"] = dict(self.weights_mismatch)
        return out

    def to_coco_results(self, image_id: int | None = None) -> list[dict]:
        """The boxes in the COCO results format (``bbox`` xywh, ``score`` = detector score),
        each with the monitor's ``ood_flag`` (pycocotools ignores extra keys)."""
        image_id = self.image_id if image_id is None else int(image_id)
        return [{"image_id": image_id, "category_id": b.category_id,
                 "bbox": [b.box[0], b.box[1], b.box[2] - b.box[0], b.box[3] - b.box[1]],
                 "score": b.det_score, "ood_flag": b.flag} for b in self.boxes]


# =========================================================================== images
def as_image_tensor(image) -> torch.Tensor:
    """One image as the float CHW RGB tensor in [0, 1] certood's detectors take.

    Accepts that tensor itself, a numpy ``HxWx3`` (or ``HxW``) uint8 array, or a PIL image
    (decoded as :func:`certood.data.coco.image_to_rgb` decodes image files, so an image
    monitored here and the same file read by ``certood check`` give the same numbers).

    >>> as_image_tensor(np.full((2, 3, 3), 255, np.uint8)).shape
    torch.Size([3, 2, 3])
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        from certood.data.coco import image_to_rgb

        return torch.from_numpy(np.ascontiguousarray(image_to_rgb(image))).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UsageError(f"image: expected a uint8 numpy array (HxWx3), found dtype {image.dtype}; "
                             "pass floats as a CHW torch tensor in [0, 1]")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise UsageError(f"image: expected a numpy array of shape HxWx3 (RGB), found {image.shape}")
        return torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
            raise UsageError(f"image: expected a float CHW tensor with 3 channels, found "
                             f"{image.dtype} of shape {tuple(image.shape)}")
        lo, hi = (float(v) for v in torch.aminmax(image.detach()))  # 0-255 floats would pass silently
        if not (0.0 <= lo and hi <= 1.0):
            raise UsageError(f"image: expected values in [0, 1], found [{lo:.4g}, {hi:.4g}] (divide 0-255 "
                             "pixels by 255)")
        return image
    raise UsageError(f"image: expected a float CHW torch tensor, a uint8 HxWx3 numpy array or a PIL "
                     f"image, found {type(image).__name__}")


def _as_batch(images) -> tuple[list[torch.Tensor], bool]:
    """(image tensors, whether one image was given)."""
    if isinstance(images, (list, tuple)):
        return [as_image_tensor(im) for im in images], False
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0)), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [as_image_tensor(im) for im in images], False
    return [as_image_tensor(images)], True


# =========================================================================== weights
def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A canonical sha256 of a state dict: for each key in sorted order its name, dtype, shape
    and raw bytes. Equal for the same weights however they were loaded (file, module, device).

    >>> a = state_dict_sha256({"w": torch.ones(2)})
    >>> a == state_dict_sha256({"w": torch.ones(2)}), a == state_dict_sha256({"w": torch.ones(2).double()})
    (True, False)
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CertoodError(f"state dict entry {key!r}: expected a tensor, found {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        h.update(key.encode("utf-8") + b"\0" + str(t.dtype).encode() + b"\0"
                 + ",".join(map(str, t.shape)).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibrated_weights_sha256(spec: Spec, manifest_sha256: str) -> str:
    """The hash an attached model must have: the canonical state-dict hash of the spec's
    weights file (torchvision) or the file's sha256 (ONNX), after checking that the file is
    still the one the monitor was calibrated with (``manifest_sha256``)."""
    from certood.detectors.base import file_sha256
    from certood.detectors.torchvision_frcnn import load_state_dict, resolve_weights

    path = resolve_weights(spec.detector.weights)
    if not path.exists():
        raise ArtifactError(f"the spec's detector weights {path} are missing: cannot verify what the "
                            "monitor was calibrated on")
    on_disk = file_sha256(path)
    if on_disk != manifest_sha256:
        raise ArtifactError(f"{path}: changed since calibration (sha256 {on_disk[:12]}, the monitor "
                            f"was calibrated with {manifest_sha256[:12]}); recalibrate")
    return on_disk if spec.detector.kind == "onnx" else state_dict_sha256(load_state_dict(path))


# =========================================================================== the monitor
class Monitor:
    """A monitor spec compiled for one detector: ``calibrate()``, ``save(dir)``, ``monitor(images)``.

    Build one with :func:`compile` (uncalibrated), :func:`load` (a calibrated directory) or
    :func:`attach` (onto your own model). Calling it runs the detector and every stage of
    ``certood check`` on the images and returns :class:`ImageResult` (one image in) or a list of
    them (a list or a 4-d batch in); batch and single-image calls give the same numbers (up to
    float summation order).
    """

    def __init__(self, spec: Spec, detector=None, fitted: FittedMonitor | None = None,
                 weights_mismatch: dict | None = None):
        self.spec = spec
        self._detector = detector
        self.fitted = fitted
        self.weights_mismatch = weights_mismatch
        self._runner = None  # certood.stages.BatchRunner, built on first use

    def __repr__(self) -> str:
        state = "calibrated" if self.calibrated else "uncalibrated"
        where = f" from {self.spec.path}" if self.spec.path else ""
        return f"<certood.Monitor {state}{where}: scores {', '.join(self.spec.scores)}; rule {self.spec.rule.source!r}>"

    # ------------------------------------------------------------------ state
    @property
    def detector(self):
        """The detector adapter (the spec's, loaded on first use, or the attached model's)."""
        if self._detector is None:
            from certood.check import load_spec_detector

            self._detector = load_spec_detector(self.spec)
        return self._detector

    @property
    def calibrated(self) -> bool:
        return self.fitted is not None

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self._require_fitted().thresholds)

    @property
    def detector_threshold(self) -> float:
        return float(self._require_fitted().detector_threshold)

    def _require_fitted(self) -> FittedMonitor:
        if self.fitted is None:
            raise UsageError("the monitor is not calibrated: call .calibrate() or certood.load(DIR)")
        return self.fitted

    def calibrate(self, progress=None) -> "Monitor":
        """Fit every score and threshold of the spec on its calibration data (as
        ``certood calibrate``) with this monitor's detector; returns ``self``."""
        from certood.monitor import calibrate

        self.fitted, _ = calibrate(self.spec, self.detector, self.detector.num_classes, progress=progress)
        self._runner = None
        return self

    def save(self, out_dir: str | Path) -> Path:
        """Write the calibrated monitor (manifest.json + scores.safetensors) into ``out_dir``."""
        from certood.artifacts import save_monitor

        return save_monitor(self._require_fitted(), Path(out_dir))

    # ------------------------------------------------------------------ running
    def __call__(self, images, image_ids: Sequence[int] | None = None):
        """Monitor one image (-> :class:`ImageResult`) or a batch (-> list of them)."""
        batch, single = _as_batch(images)
        results = self.run(batch, image_ids)
        return results[0] if single else results

    def run(self, images: list[torch.Tensor], image_ids: Sequence[int] | None = None,
            frame_id: int | None = None) -> list[ImageResult]:
        """The stages of ``certood check`` on one batch of image tensors."""
        fitted = self._require_fitted()
        if image_ids is not None and len(image_ids) != len(images):
            raise UsageError(f"image_ids: expected {len(images)} ids (one per image), found {len(image_ids)}")
        if not images:
            return []
        dets, values, flags, certificates = self.monitor_batch(images)
        ids = dets.image_ids.tolist()
        boxes = dets.boxes.tolist()
        labels = dets.labels.tolist()
        det_scores = dets.det_scores.tolist()
        values_rows = {k: v.tolist() for k, v in values.items()}
        flags_rows = flags.tolist()
        per_image: list[list[BoxResult]] = [[] for _ in images]
        cats = fitted.label_to_category
        for i, image in enumerate(ids):
            per_image[image].append(BoxResult(
                box=tuple(boxes[i]), label=labels[i], category_id=cats[labels[i] - 1],
                det_score=det_scores[i], scores={k: float(v[i]) for k, v in values_rows.items()},
                flag=bool(flags_rows[i]), frame_id=frame_id,
                certificate=certificates[i].to_json() if certificates is not None else None))
        return [ImageResult(image_id=int(image_ids[j]) if image_ids is not None else j,
                            boxes=tuple(per_image[j]), frame_id=frame_id,
                            weights_mismatch=self.weights_mismatch) for j in range(len(images))]

    def monitor_batch(self, images: list[torch.Tensor]):
        """(monitored detections, score values, flags, certificates or None) of a batch: the
        stages of ``certood check`` (:class:`certood.stages.BatchRunner`, one kept for the
        monitor's lifetime) on images numbered 0..len-1."""
        from certood.stages import BatchRunner

        fitted = self._require_fitted()
        if self._runner is None or self._runner.monitor is not fitted or self._runner.detector is not self.detector:
            self._runner = BatchRunner(fitted, self.detector)
        result = self._runner.run(list(images), list(range(len(images))))
        return result.dets, result.values, result.flags, result.certificates

    def stream(self) -> "Stream":
        """Online monitoring of one video: feed its frames in order (see :class:`Stream`)."""
        self._require_fitted()
        return Stream(self)


# =========================================================================== streams
def aggregate_step(method: str, state: dict | None, x: float, alpha: float = 0.5, k: float = 0.5,
                   mean: float = 0.0, std: float = 1.0) -> tuple[dict, float]:
    """One frame of a track-level aggregate: ``(new state, aggregate at this box)``; the same
    numbers as :func:`certood.temporal.aggregate_scores` over the track's boxes so far.

    >>> s, a = aggregate_step("ema", None, 0.0, alpha=0.5); s, b = aggregate_step("ema", s, 1.0, alpha=0.5)
    >>> a, b
    (0.0, 0.5)
    """
    x = float(x)
    if method == "mean":
        state = {"sum": (state or {"sum": 0.0})["sum"] + x, "n": (state or {"n": 0})["n"] + 1}
        return state, state["sum"] / state["n"]
    if method == "ema":
        value = x if state is None else alpha * x + (1 - alpha) * state["value"]
    elif method == "max":
        value = x if state is None else max(state["value"], x)
    elif method == "cusum":
        z = (x - mean) / (std if std > 0 else 1.0)
        value = max(0.0, (0.0 if state is None else state["value"]) + z - k)
    else:
        from certood.temporal import AGGREGATES

        raise CertoodError(f"aggregate: expected one of {', '.join(AGGREGATES)}, found {method!r}")
    return {"value": value}, value


@dataclass
class _TrackState:
    last_frame: int
    aggregates: dict[str, dict] = field(default_factory=dict)  # score -> aggregate_step state
    verdicts: deque = field(default_factory=deque)  # (frame, certified_ood) of the last n frames


class Stream:
    """One video, frame by frame: per-box results plus track ids and track-level scores.

    The tracker is :class:`certood.temporal.IouTracker` with the spec's ``temporal.tracker``
    options; each score's aggregate (``temporal.aggregate``) is updated per track as its boxes
    arrive, and the track flag is the rule on the aggregates against the track thresholds set
    at calibration; with ``temporal.certified: {k, n}`` and certificates, ``track_certified_ood``
    says whether k of the track's last n frames were ``certified_ood``. These are the values
    ``certood check`` writes for the same video (its aggregates are causal). A spec without a
    ``temporal`` block still gets track ids (default tracker), no track scores.

    >>> stream = mon.stream()  # doctest: +SKIP
    >>> [b.track_id for b in stream(frame).boxes]  # doctest: +SKIP
    [0, 1]
    """

    def __init__(self, monitor: Monitor):
        from certood.spec.model import DEFAULT_MAX_AGE, DEFAULT_TRACK_IOU
        from certood.temporal import IouTracker

        self.monitor = monitor
        self.temporal = monitor.spec.temporal
        iou = self.temporal.iou if self.temporal else DEFAULT_TRACK_IOU
        self.max_age = self.temporal.max_age if self.temporal else DEFAULT_MAX_AGE
        self.tracker = IouTracker(iou, self.max_age)
        self.calibration = (monitor.fitted.calibration.get("temporal") or None) if self.temporal else None
        if self.temporal is not None and self.calibration is None:
            raise ArtifactError("the monitor has no temporal calibration; recalibrate with the temporal block set")
        self._tracks: dict[int, _TrackState] = {}
        self._next_frame = 0

    def __call__(self, frame, frame_id: int | None = None) -> ImageResult:
        """Monitor the next frame of the video (frame ids must increase; default: 0, 1, ...)."""
        batch, single = _as_batch(frame)
        if not single:
            raise UsageError(f"stream: expected one frame per call, found a batch of {len(batch)}")
        frame_id = self._next_frame if frame_id is None else int(frame_id)
        [result] = self.monitor.run(batch, [frame_id], frame_id=frame_id)
        ids = self.tracker.update(frame_id, torch.tensor([list(b.box) for b in result.boxes],
                                                         dtype=torch.float32).reshape(-1, 4))
        self._next_frame = frame_id + 1
        self._forget_ended(frame_id)
        boxes = tuple(self._track_box(box, int(track), frame_id) for box, track in zip(result.boxes, ids.tolist()))
        return ImageResult(result.image_id, boxes, frame_id, result.weights_mismatch)

    def _forget_ended(self, frame: int) -> None:
        """Drop the state of tracks the tracker has ended (missed more than max_age frames)."""
        for track in [t for t, s in self._tracks.items() if frame - s.last_frame - 1 > self.max_age]:
            del self._tracks[track]

    def _track_box(self, box: BoxResult, track: int, frame: int) -> BoxResult:
        state = self._tracks.setdefault(track, _TrackState(frame))
        state.last_frame = frame
        if self.temporal is None:
            return replace(box, track_id=track)
        t = self.temporal
        track_scores = {}
        for name, x in box.scores.items():
            standardize = self.calibration["standardize"][name]
            state.aggregates[name], track_scores[name] = aggregate_step(
                t.aggregate, state.aggregates.get(name), x, t.alpha, t.cusum_k, standardize["mean"],
                standardize["std"])
        values = {k: torch.tensor([v], dtype=torch.float64) for k, v in track_scores.items()}
        track_flag = bool(self.monitor.spec.rule.evaluate(values, self.calibration["thresholds"])[0])
        certified = None
        if t.certified_k is not None and box.certificate is not None:
            state.verdicts.append((frame, box.certificate.get("verdict") == "certified_ood"))
            while state.verdicts and state.verdicts[0][0] <= frame - t.certified_n:
                state.verdicts.popleft()
            certified = sum(v for _, v in state.verdicts) >= t.certified_k
        return replace(box, track_id=track, track_scores=track_scores, track_flag=track_flag,
                       track_certified_ood=certified)


# =========================================================================== entry points
def _as_spec(spec) -> Spec:
    from certood.spec import load_spec

    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    raise UsageError(f"spec: expected a path to a spec file or a certood.spec.Spec, found {type(spec).__name__}")


def compile(spec: str | Path | Spec, detector=None) -> Monitor:  # noqa: A001 - the public verb
    """An uncalibrated monitor for ``spec`` (a spec file or a loaded Spec); ``.calibrate()`` it.

    ``detector``: a certood detector adapter to use instead of the spec's (default: the spec's,
    loaded when first needed).

    >>> mon = compile("specs/demo.yaml").calibrate()  # doctest: +SKIP
    """
    return Monitor(_as_spec(spec), detector)


def load(monitor_dir: str | Path, spec: str | Path | Spec | None = None) -> Monitor:
    """The calibrated monitor in ``monitor_dir`` (``certood calibrate`` or ``Monitor.save``),
    with the spec's detector. ``spec`` defaults to the spec file the manifest names; a monitor
    made for another spec or other weights is refused (certood.artifacts.load_monitor).
    """
    from certood.artifacts import load_monitor, read_manifest

    manifest = read_manifest(Path(monitor_dir))
    if spec is None:
        if not manifest.get("spec_path"):
            raise ArtifactError(f"{monitor_dir}: the manifest names no spec file; pass spec=")
        if not Path(manifest["spec_path"]).is_file():
            raise ArtifactError(f"{monitor_dir}: the spec it was calibrated from, {manifest['spec_path']}, "
                                "is not a file here; pass spec=")
        spec = manifest["spec_path"]
    monitor = Monitor(_as_spec(spec))
    detector = monitor.detector
    monitor.fitted = load_monitor(Path(monitor_dir), monitor.spec, detector.weights_sha256,
                                  head_if_needed(monitor.spec, detector))
    return monitor


def _adapter_for(model, spec: Spec):
    """(certood detector adapter, sha256 of what it runs) for a user's model object."""
    if isinstance(model, torch.nn.Module):
        from torchvision.models import detection

        from certood.detectors.torchvision_frcnn import TorchvisionFasterRCNN
        from certood.detectors.torchvision_onestage import TorchvisionOneStage, family

        param = next(model.parameters(), None)
        device = str(param.device) if param is not None else "cpu"
        digest = state_dict_sha256(model.state_dict())
        if isinstance(model, detection.FasterRCNN):
            return TorchvisionFasterRCNN(model, digest, device), digest
        try:
            family(model)
        except CertoodError:
            raise UsageError(f"attach: expected a torchvision detection model (FasterRCNN, RetinaNet, FCOS, "
                             f"SSD) or an onnxruntime.InferenceSession, found {type(model).__name__}") from None
        return TorchvisionOneStage(model, digest, device), digest
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return _onnx_adapter(model, spec)
    raise UsageError(f"attach: expected a torchvision detection model or an onnxruntime.InferenceSession, "
                     f"found {type(model).__name__}")


def _onnx_adapter(session, spec: Spec):
    """An OnnxDetector running the session's model. ONNX Runtime returns only a graph's
    outputs; when the session lacks the tapped tensors among them, the adapter runs the same
    model (same sha256) in its own session with those tensors added as outputs."""
    import tempfile

    from certood.detectors.onnx_detector import OnnxDetector

    d = spec.detector
    if d.kind != "onnx":
        raise UsageError(f"attach: the monitor's spec runs a {d.kind} detector ({d.arch}); an ONNX Runtime "
                         "session needs a spec with detector.kind onnx (same layout and tensors)")
    path, data = getattr(session, "_model_path", None), getattr(session, "_model_bytes", None)
    if not path and data is None:
        raise UsageError("attach: this InferenceSession does not say which model it runs (no path or "
                         "bytes); build it from a model file or bytes")
    options = dict(input_name=d.input, outputs=d.outputs or None, num_classes=d.num_classes,
                   score_thresh=d.score_thresh, nms_thresh=d.nms_thresh, max_detections=d.max_detections,
                   device=d.device)
    if path:
        detector = OnnxDetector(path, d.tensors, d.layout or "two_stage", **options)
    else:
        with tempfile.TemporaryDirectory(prefix="certood-attach-") as tmp:
            model_path = Path(tmp) / "model.onnx"
            model_path.write_bytes(bytes(data))
            detector = OnnxDetector(model_path, d.tensors, d.layout or "two_stage", **options)
    if set(detector._fetch) <= {o.name for o in session.get_outputs()}:
        detector.session = session  # it already returns every tapped tensor: run the caller's session
    return detector, detector.weights_sha256


def attach(model, monitor: Monitor | str | Path, *, allow_weight_mismatch: bool = False) -> Monitor:
    """``monitor`` (a calibrated Monitor or its directory) running on your own ``model``: an
    in-memory torchvision detection model (``nn.Module``, put in eval mode) or an
    ``onnxruntime.InferenceSession``.

    The model's weights must be the calibrated ones: the canonical hash of its state dict
    (:func:`state_dict_sha256`; for a session, the sha256 of its model file) is compared with
    that of the weights the spec names, themselves checked against the manifest. A mismatch is
    refused naming both hashes, unless ``allow_weight_mismatch=True``: then every result
    carries ``weights_mismatch`` with both.

    >>> mon = attach(model, load("runs/demo/monitor"))  # doctest: +SKIP
    """
    if isinstance(monitor, (str, Path)):
        monitor = load(monitor)
    if not isinstance(monitor, Monitor):
        raise UsageError(f"attach: expected a certood.Monitor or a monitor directory, found {type(monitor).__name__}")
    fitted = monitor._require_fitted()
    detector, attached = _adapter_for(model, monitor.spec)
    expected = calibrated_weights_sha256(monitor.spec, fitted.detector_sha256)
    mismatch = None
    if attached != expected:
        if not allow_weight_mismatch:
            raise ArtifactError(
                f"attach: the model's weights differ from the calibrated ones (model sha256 {attached}, "
                f"calibrated {expected}, from {monitor.spec.detector.weights}); recalibrate on this model, "
                "or pass allow_weight_mismatch=True to run anyway (recorded in every result)")
        mismatch = {"allow_weight_mismatch": True, "model_sha256": attached, "calibrated_sha256": expected}
    else:
        detector.weights_sha256 = fitted.detector_sha256  # the same weights: name them as the artifact does
    missing = sorted({f"{name} ({point})" for name, point in monitor.spec.taps.items()
                      if point not in detector.tap_points})
    if missing:
        raise UsageError(f"attach: taps {', '.join(missing)}: the model has no such tap point (it offers: "
                         f"{', '.join(detector.tap_points) or 'none'})")
    head = head_if_needed(monitor.spec, detector)
    if head is not None:  # scores that run the head (ODIN) run the attached model's, on copies
        scores = {}
        for name, score in fitted.scores.items():
            scores[name] = copy.copy(score).attach_head(head, score.feature_dim or 0) if score.needs_head else score
        fitted = replace(fitted, scores=scores)
    return Monitor(monitor.spec, detector, fitted, mismatch)

