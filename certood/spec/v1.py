"""Monitor spec v1: every key, type, default and choice, in one declarative table.

The loader validates against `SPEC` and `json_schema()` is generated from it.
Adding a score kind is one entry in `SCORE_KIND_TABLE`.

>>> sorted(json_schema()["required"])
['data', 'detector', 'scores', 'taps', 'version']
"""
from __future__ import annotations

from dataclasses import dataclass, field

from certood.spec import model
from certood.spec.schema import AnyOf, Enum, Field, Float, Int, Map, Record, Str, Tagged

SUPPORTED_VERSIONS = (1,)

# Where a tap reads a detector, and what kind of value it yields there.
TAP_POINTS: dict[str, str] = {
    "box_head.input": "features",  # pooled ROI features entering the box head
    "box_head.output": "features",  # the box head's output (penultimate features)
    "cls_logits": "logits",  # class logits, background included
}
ARCHS = ("digits_fasterrcnn", "fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn")
BUILTIN_WEIGHTS = {"digits_fasterrcnn": "digits_fasterrcnn"}  # builtin name -> the arch it fits
DIGITSDET_SPLITS = ("train", "val", "test", "ood-near", "ood-far", "mixed")
DEVICES = ("cpu", "cuda", "auto")

NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
# Score names appear in rules, so they are identifiers other than the rule's own words.
SCORE_NAME = r"(?!(?:and|or|not|t)$)[A-Za-z_][A-Za-z0-9_]*"
PATH = r"[^\x00]+"
WEIGHTS = r"builtin:(?:" + "|".join(BUILTIN_WEIGHTS) + r")|(?!builtin:)[^\x00]*\.(?:safetensors|pt|pth)"


@dataclass(frozen=True)
class ScoreKind:
    """A score kind: its parameters (with defaults), the tap point type it needs, if any,
    and whether it is fitted on `data.fit`."""

    params: dict = field(default_factory=dict)  # name -> Field
    tap_point: str | None = None  # a TAP_POINTS value ("logits"), None: any tap
    needs_fit: bool = False
    description: str = ""


SCORE_KIND_TABLE: dict[str, ScoreKind] = {
    "energy": ScoreKind(
        params={"temperature": Field(Float(gt=0), default=1.0, description="softmax temperature T")},
        tap_point="logits",
        description="-T * logsumexp(logits / T) over foreground classes; higher = more OOD",
    ),
    "mahalanobis": ScoreKind(
        needs_fit=True,
        description="min over classes of the Mahalanobis distance to class means (shared "
        "covariance) fitted on data.fit; higher = more OOD",
    ),
}
SCORE_KINDS: tuple[str, ...] = tuple(SCORE_KIND_TABLE)


def _score_record(kind: ScoreKind) -> Record:
    return Record({
        "kind": Field(Enum(SCORE_KINDS), description="score kind; defaults to the score's name"),
        "tap": Field(Str(NAME, "the name of a tap"), required=True, description="tap the score reads"),
        **kind.params,
    }, description=kind.description)


DETECTOR = Record({
    "kind": Field(Enum(("torchvision",)), required=True),
    "arch": Field(Enum(ARCHS), required=True),
    "weights": Field(
        Str(WEIGHTS, " or ".join(f"builtin:{w}" for w in BUILTIN_WEIGHTS)
            + " or a path ending in .safetensors, .pt or .pth"),
        required=True, description="builtin weights or a path relative to the spec file",
    ),
    "num_classes": Field(Int(min=2, max=100_000), description="number of classes, background included"),
    "min_size": Field(Int(min=1, max=100_000), description="shorter image side after resizing"),
    "max_size": Field(Int(min=1, max=100_000), description="longest image side after resizing"),
    "score_thresh": Field(Float(ge=0, lt=1), default=model.DEFAULT_SCORE_THRESH,
                          description="detections below this detector score are dropped"),
    "device": Field(Enum(DEVICES), default=model.DEFAULT_DEVICE),
})

DATA_SOURCE = Record({
    "digitsdet": Field(Enum(DIGITSDET_SPLITS), description="a split of the bundled DigitsDet dataset"),
    "annotations": Field(Str(PATH, "a path"), description="COCO annotations JSON, relative to the spec file"),
    "images": Field(Str(PATH, "a path"), description="image directory, relative to the spec file"),
    "max_images": Field(Int(min=1, max=1_000_000_000), description="use at most this many images"),
}, one_of=(("digitsdet",), ("annotations", "images")))

DATA = Record({
    "fit": Field(DATA_SOURCE, description="ID data the scores are fitted on"),
    "calibration": Field(DATA_SOURCE, required=True, description="ID data the thresholds are set on"),
    "id_test": Field(DATA_SOURCE, description="held-out ID data for metrics"),
    "ood": Field(Map(DATA_SOURCE, NAME, f"a name matching {NAME}"), description="OOD data sets by name"),
})

THRESHOLD = Record({
    "tpr": Field(Float(gt=0, lt=1), default=model.DEFAULT_TPR,
                 description="ID true-positive rate kept by each score threshold"),
    "detector_score": Field(AnyOf((Enum(("f1",)), Float(ge=0, le=1))), default=model.DEFAULT_DETECTOR_SCORE,
                            description="detector score cut: 'f1' (F1-optimal on calibration data) or a number"),
})

SPEC = Record({
    "version": Field(Enum(SUPPORTED_VERSIONS), required=True, description="spec format version"),
    "detector": Field(DETECTOR, required=True),
    "data": Field(DATA, required=True),
    "taps": Field(Map(Enum(tuple(TAP_POINTS)), NAME, f"a name matching {NAME}", min_items=1),
                  required=True, description="named points of the detector to read features from"),
    "scores": Field(
        Map(Tagged({k: _score_record(v) for k, v in SCORE_KIND_TABLE.items()}), SCORE_NAME,
            "an identifier ([A-Za-z_][A-Za-z0-9_]*) other than and, or, not, t", min_items=1),
        required=True, description="named OOD scores, each reading one tap",
    ),
    "threshold": Field(THRESHOLD),
    "rule": Field(Str(), description="when to flag a box, e.g. 'energy > t.energy or maha > t.maha'; "
                  "default: every score above its threshold, or-ed"),
    "output": Field(Record({"dir": Field(Str(PATH, "a path"), description="relative to the spec file")})),
}, description="certood monitor spec")


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of spec v1, generated from `SPEC` (a fresh dict each call)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "certood monitor spec v1",
        **SPEC.json(),
    }
