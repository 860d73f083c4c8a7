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


@dataclass(frozen=True)
class DetectorSpec:
    """Which detector to monitor. `weights` is "builtin:NAME" or an absolute path."""

    kind: str
    arch: str
    weights: str
    num_classes: int | None = None  # including background
    min_size: int | None = None
    max_size: int | None = None
    score_thresh: float = DEFAULT_SCORE_THRESH
    device: str = DEFAULT_DEVICE


@dataclass(frozen=True)
class DataSource:
    """A dataset: a bundled DigitsDet split, or COCO `annotations` + `images` paths."""

    digitsdet: str | None = None
    annotations: Path | None = None
    images: Path | None = None
    max_images: int | None = None


@dataclass(frozen=True)
class DataSpec:
    fit: DataSource | None  # where scores are fitted (None when no score needs fitting)
    calibration: DataSource  # where thresholds are set
    id_test: DataSource | None = None
    ood: dict[str, DataSource] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreSpec:
    """One score: its kind, the tap it reads, and the kind's parameters with defaults filled."""

    kind: str
    tap: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ThresholdSpec:
    tpr: float = DEFAULT_TPR  # ID true-positive rate each score threshold keeps
    detector_score: str | float = DEFAULT_DETECTOR_SCORE  # "f1" or a fixed detector score cut


@dataclass(frozen=True)
class OutputSpec:
    dir: Path | None = None


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

    def fingerprint(self) -> str:
        """sha256 of what determines a calibration: version, detector, fit and calibration
        data, taps, scores and threshold, as written. Rule, output, id_test and ood are left
        out, so editing them keeps a calibrated monitor usable."""
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
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
