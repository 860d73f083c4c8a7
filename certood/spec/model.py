"""The validated monitor spec as frozen dataclasses (what the rest of certood codes against).

Paths are absolute (resolved against the spec file's directory); `Spec.raw` keeps the
values exactly as written, which is what the fingerprint hashes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from certood.errors import SpecIssue
from certood.spec.rule import Rule

DEFAULT_SCORE_THRESH = 0.05
DEFAULT_DEVICE = "cpu"
DEFAULT_TPR = 0.95
DEFAULT_DETECTOR_SCORE = "f1"
MIN_CLASS_BOXES = 20  # per-class thresholds: fewer calibration boxes of a class, use the global one
AGGREGATES = ("mean", "ema", "max", "cusum")
DEFAULT_TRACK_IOU = 0.3
DEFAULT_MAX_AGE = 3
DEFAULT_AGGREGATE = "ema"
DEFAULT_ALPHA = 0.3
DEFAULT_CUSUM_K = 0.5
DEFAULT_CUSUM_RATE = 0.05


@dataclass(frozen=True)
class DetectorSpec:
    """Which detector to monitor. `weights` is "builtin:NAME" or an absolute path (for kind
    onnx, the model file; `arch` is then "")."""

    kind: str
    arch: str
    weights: str
    num_classes: int | None = None  # including background
    min_size: int | None = None
    max_size: int | None = None
    score_thresh: float = DEFAULT_SCORE_THRESH
    device: str = DEFAULT_DEVICE
    # kind onnx (``weights`` is then the .onnx file): certood.detectors.onnx_detector
    layout: str | None = None
    tensors: dict = field(default_factory=dict)  # tap point -> graph tensor
    input: str | None = None
    outputs: dict = field(default_factory=dict)
    nms_thresh: float = 0.5
    multi_label: bool = False  # yolo layout: one candidate per (anchor, class) pair
    max_detections: int = 100
    activation: str = "softmax"  # detr layout: softmax or sigmoid class head
    preprocess: str = "resize"  # fixed-size graphs: resize or letterbox
    batch_size: int | None = None  # images per detector call (None: the adapter's default)


@dataclass(frozen=True)
class DataSource:
    """A dataset: a bundled DigitsDet split, or COCO `annotations` + `images` paths."""

    digitsdet: str | None = None
    annotations: Path | None = None
    images: Path | None = None
    max_images: int | None = None
    max_boxes: int | None = None  # fit set only: a seeded reservoir of at most this many boxes
    protocol: str = "box"  # OOD sets only: "box" (VOS) or "gt_matched" (certood.check)


@dataclass(frozen=True)
class DataSpec:
    fit: DataSource | None  # where scores are fitted (None when no score needs fitting)
    calibration: DataSource  # where thresholds are set
    id_test: DataSource | None = None
    ood: dict[str, DataSource] = field(default_factory=dict)
    ood_validation: dict[str, DataSource] = field(default_factory=dict)  # for threshold: {fpr, on}


@dataclass(frozen=True)
class ScoreSpec:
    """One score: its kind, the tap it reads, and the kind's parameters with defaults filled."""

    kind: str
    tap: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ThresholdSpec:
    """How score thresholds are set (`method`): at an ID true-positive rate `tpr` on the
    calibration boxes, at an OOD false-positive rate `fpr` on the OOD validation set `on`, or
    `fixed` per score; `per_class` adds per predicted class thresholds at the same target.

    >>> ThresholdSpec().method, ThresholdSpec(tpr=None, fpr=0.05, on="near_val").method
    ('tpr', 'fpr')
    """

    tpr: float | None = DEFAULT_TPR  # ID true-positive rate each score threshold keeps (method tpr)
    detector_score: str | float = DEFAULT_DETECTOR_SCORE  # "f1" or a fixed detector score cut
    fpr: float | None = None  # OOD boxes of `on` left unflagged by each threshold, at most (method fpr)
    on: str | None = None  # a data.ood_validation set (method fpr)
    fixed: dict[str, float] = field(default_factory=dict)  # score -> threshold (method fixed)
    per_class: bool = False

    @property
    def method(self) -> str:
        return "fixed" if self.fixed else "fpr" if self.fpr is not None else "tpr"

    def describe(self) -> str:
        """The method in words, for reports.

        >>> ThresholdSpec(tpr=0.95, per_class=True).describe()
        '95% ID TPR on calibration boxes, per predicted class'
        """
        if self.method == "fixed":
            text = "fixed values"
        elif self.method == "fpr":
            text = f"{self.fpr:.0%} OOD FPR on OOD validation set {self.on}"
        else:
            text = f"{self.tpr:.0%} ID TPR on calibration boxes"
        return text + (", per predicted class" if self.per_class else "")


@dataclass(frozen=True)
class OutputSpec:
    dir: Path | None = None


DEFAULT_RUN_WORKERS = 0
DEFAULT_SHARD_IMAGES = 256


@dataclass(frozen=True)
class RaySpec:
    """Where and how wide a Ray run is (certood.distributed)."""

    address: str | None = None  # None: a local Ray instance
    workers: int = 2
    gpus_per_worker: float = 0.0


@dataclass(frozen=True)
class RunSpec:
    """How ``certood check`` executes; never changes its results (not in the fingerprint)."""

    workers: int = DEFAULT_RUN_WORKERS  # DataLoader worker processes decoding images
    shard_images: int = DEFAULT_SHARD_IMAGES  # images per on-disk shard (the unit of --resume)
    ray: RaySpec | None = None


@dataclass(frozen=True)
class CertifySpec:
    """Certificates (certood.certify): the region ``||z' - z||_norm <= eps`` around each box's
    feature at tap `tap` (a tap at box_head.input or box_head.output), intersected with
    ``z' >= 0`` when `domain` is "nonnegative"; bounded with `method` (by `engine`); rules decided exactly
    with z3 within `timeout_s` when `exact` is "z3"; `radius`: also search the largest eps."""

    tap: str
    eps: float
    norm: str = "inf"  # "inf" or "2"
    method: str = "crown"  # ibp | crown | alpha-crown
    engine: str = "auto"  # auto | auto_lirpa
    exact: str = "none"  # none | z3
    timeout_s: float = 2.0
    radius: bool = False
    domain: str = "nonnegative"  # nonnegative | any


@dataclass(frozen=True)
class GatePolicy:
    """One release-gate policy: bound `metric` absolutely (`op` + `value`) or relative to a
    baseline run (`max_drop` or `max_rise`). `score`/`dataset` None mean every score / every
    data set the metric exists on. `file`, `line`, `column` say where it is written.

    >>> GatePolicy("auroc", op=">=", value=0.9, score="energy", dataset="near").describe()
    'auroc[energy] on near >= 0.9'
    """

    metric: str
    op: str | None = None  # ">=", "<=", ">", "<"; None for a baseline policy
    value: float | None = None
    score: str | None = None
    dataset: str | None = None  # an OOD set name, or "id_test"
    max_drop: float | None = None
    max_rise: float | None = None
    warn: float | None = None  # a passing value within this margin of the limit is WARN
    name: str | None = None
    file: str = "<string>"
    line: int = 1
    column: int = 1

    @property
    def is_baseline(self) -> bool:
        return self.op is None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def describe(self) -> str:
        """The policy in one line, as written (its name is separate)."""
        head = self.metric + (f"[{self.score}]" if self.score else "") + (f" on {self.dataset}" if self.dataset else "")
        if self.is_baseline:
            limit = f"max_drop {self.max_drop:g}" if self.max_drop is not None else f"max_rise {self.max_rise:g}"
            return f"{head} vs baseline, {limit}"
        return f"{head} {self.op} {self.value:g}"


@dataclass(frozen=True)
class TemporalSpec:
    """Track-level monitoring of video: the tracker, how scores are aggregated along a
    track, and how per-box certificates are (k of the last n frames; None: not aggregated)."""

    iou: float = DEFAULT_TRACK_IOU
    max_age: int = DEFAULT_MAX_AGE
    aggregate: str = DEFAULT_AGGREGATE
    alpha: float = DEFAULT_ALPHA
    cusum_k: float = DEFAULT_CUSUM_K
    cusum_false_alarm_rate: float = DEFAULT_CUSUM_RATE
    certified_k: int | None = None
    certified_n: int | None = None


@dataclass(frozen=True)
class Spec:
    """A validated monitor spec; build one with `certood.spec.load_spec`.

    `spec.fingerprint()` identifies what a calibration depends on (see there).
    """

    path: Path | None
    version: int
    detector: DetectorSpec
    data: DataSpec
    taps: dict[str, str]
    scores: dict[str, ScoreSpec]
    threshold: ThresholdSpec
    rule: Rule
    output: OutputSpec
    warnings: tuple[SpecIssue, ...]
    raw: dict
    gate: tuple[GatePolicy, ...] = ()  # release gate policies; not part of the fingerprint
    certify: CertifySpec | None = None  # certificates; not part of the fingerprint
    temporal: TemporalSpec | None = None  # track-level monitoring of video, when set
    run: RunSpec = field(default_factory=RunSpec)  # execution of `certood check`; not in the fingerprint

    def fingerprint(self) -> str:
        """sha256 of what determines a calibration: version, detector, fit and calibration
        data, taps, scores, threshold (and the OOD validation set it names) and temporal, as
        written (after `extends` is merged). Rule, output, gate, id_test and ood are
        left out, so editing them keeps a calibrated monitor (and its check results) usable."""
        raw, data = self.raw, self.raw.get("data") or {}
        payload = {
            "version": raw.get("version"),
            "detector": raw.get("detector"),
            "data.fit": data.get("fit"),
            "data.calibration": data.get("calibration"),
            "taps": raw.get("taps"),
            "scores": raw.get("scores"),
            "threshold": raw.get("threshold"),
        }
        if "temporal" in raw:  # track thresholds are calibrated too; absent: hash as before
            payload["temporal"] = raw["temporal"]
        on = (raw.get("threshold") or {}).get("on")
        if on is not None:  # thresholds set on an OOD validation set depend on its data
            payload["data.ood_validation"] = (data.get("ood_validation") or {}).get(on)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
