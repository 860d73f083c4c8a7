"""Monitor spec v1: every key, type, default and choice, in one declarative table.

The loader validates against `SPEC` and `json_schema()` is generated from it.
Adding a score kind is one entry in `SCORE_KIND_TABLE`.

>>> sorted(json_schema()["$defs"]["complete"]["required"])
['data', 'detector', 'scores', 'taps', 'version']
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from certood.spec import model
from certood.spec.schema import AnyOf, Enum, Field, Float, Int, List, Map, Record, Str, Tagged, factor_repeats

SUPPORTED_VERSIONS = (1,)

# Where a tap reads a detector, and what kind of value it yields there.
TAP_POINTS: dict[str, str] = {
    "box_head.input": "features",  # pooled ROI features entering the box head
    "box_head.output": "features",  # the box head's output (penultimate features)
    "cls_logits": "logits",  # class logits, background included
    # two-stage: class logits of the box and of 8 jittered copies of it (certood.scores.jitter_kl)
    "box_jitter.logits": "jitter_logits",
    # one-stage detectors (RetinaNet, FCOS, SSDlite): read at the detection's anchor and location
    "head.input": "features",  # the pyramid feature entering the head (uniform-width levels only)
    "head.cls_features": "features",  # the classification tower's output (RetinaNet, FCOS)
}
ARCHS = ("digits_fasterrcnn", "fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
         "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
         "ssdlite320_mobilenet_v3_large")
BUILTIN_WEIGHTS = {"digits_fasterrcnn": "digits_fasterrcnn"}  # builtin name -> the arch it fits
DIGITSDET_SPLITS = ("train", "val", "test", "ood-near", "ood-far", "mixed",
                    "video-val", "video-test", "video-ood")  # video-*: DigitsDet-Video
VIDEO_SPLITS = ("video-val", "video-test", "video-ood")
DEVICES = ("cpu", "cuda", "auto")

NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
# Score names appear in rules, so they are identifiers other than the rule's own words.
SCORE_NAME = r"(?!(?:and|or|not|t)$)[A-Za-z_][A-Za-z0-9_]*"
MAX_SCORES = 64  # scores of one spec: each is extracted, calibrated and plotted; 10,000 ran for hours
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
    # (lo, hi) every value of the score lies in; None: unbounded on that side; "log(C)": the
    # log of the number of foreground classes. The rule's consistency check relies on it, so
    # declare only what holds for every input.
    value_range: tuple = (None, None)


LOG_CLASSES = "log(C)"  # a value_range bound: log of the number of foreground classes

# How ID-calibrated p-values are formed and combined: pvalue_fusion and fusion alike.
PVALUE_PARAMS = {
    "combine": Field(Enum(("fisher", "stouffer", "min", "hmp")), default="fisher",
                     description="how p-values are combined (hmp: harmonic mean p-value)"),
    "class_conditional": Field(Enum((False, True)), default=True,
                               description="p-values against the predicted class's ID boxes"),
    "folds": Field(Int(min=2, max=20), default=5, description="cross-fitting folds of the reference"),
    "min_class_boxes": Field(Int(min=1), default=50,
                             description="fewer reference boxes of a class: use the pooled reference"),
    "seed": Field(Int(min=0), default=0, description="seed of the fold split"),
}

SCORE_KIND_TABLE: dict[str, ScoreKind] = {
    "energy": ScoreKind(
        params={"temperature": Field(Float(gt=0), default=1.0, description="softmax temperature T")},
        tap_point="logits",
        description="-T * logsumexp(logits / T) over foreground classes; higher = more OOD",
    ),
    "mahalanobis": ScoreKind(
        value_range=(0.0, None),
        needs_fit=True,
        description="min over classes of the Mahalanobis distance to class means (shared "
        "covariance) fitted on data.fit; higher = more OOD",
    ),
    "msp": ScoreKind(
        value_range=(-1.0, 0.0),
        params={"temperature": Field(Float(gt=0), default=1.0, description="softmax temperature T")},
        tap_point="logits",
        description="-max softmax(logits / T) over foreground classes; higher = more OOD",
    ),
    "max_logit": ScoreKind(
        tap_point="logits",
        description="-max foreground logit; higher = more OOD",
    ),
    "entropy": ScoreKind(
        value_range=(0.0, LOG_CLASSES),
        tap_point="logits",
        description="entropy of the softmax over foreground logits; higher = more OOD",
    ),
    "odin": ScoreKind(
        value_range=(-1.0, 0.0),
        params={"temperature": Field(Float(gt=0), default=1000.0, description="softmax temperature T"),
                "eps": Field(Float(ge=0), default=0.0014,
                             description="perturbation step on the RoI features")},
        tap_point="features",
        description="ODIN at box_head.input through the box head (needs the head; not saved): "
        "-max softmax(head(x') / T) after a signed-gradient step; higher = more OOD",
    ),
    "relative_mahalanobis": ScoreKind(
        params={"num_classes": Field(AnyOf((Int(min=1), Enum((None,)))), default=None,
                                     description="number of classes; null: max label + 1")},
        needs_fit=True,
        description="min over classes of the class Mahalanobis distance minus the background one "
        "(Ren et al. 2021), fitted on data.fit; higher = more OOD",
    ),
    "knn": ScoreKind(
        value_range=(0.0, 2.0),
        params={"k": Field(Int(min=1), default=50, description="which nearest neighbour")},
        needs_fit=True,
        description="distance of the L2-normalised features to the k-th nearest normalised fit "
        "feature (Sun et al. 2022); higher = more OOD",
    ),
    "vim": ScoreKind(
        params={"dim": Field(AnyOf((Int(min=1), Enum((None,)))), default=None,
                             description="principal subspace dimension; null: D // 2")},
        tap_point="features",
        needs_fit=True,
        description="ViM on penultimate features (needs the classifier): alpha * residual norm "
        "minus logsumexp of the logits (Wang et al. 2022); higher = more OOD",
    ),
    "react": ScoreKind(
        params={"percentile": Field(Float(ge=0, le=100), default=90.0,
                                    description="clip at this percentile (percent) of fit activations")},
        tap_point="features",
        needs_fit=True,
        description="energy of the classifier on penultimate features clipped at a fit percentile "
        "(Sun et al. 2021); higher = more OOD",
    ),
    "ash": ScoreKind(
        params={"percentile": Field(Float(ge=0, lt=100), default=90.0,
                                    description="percent of the smallest activations set to zero")},
        tap_point="features",
        description="energy of the classifier on ASH-S shaped penultimate features "
        "(Djurisic et al. 2023); higher = more OOD",
    ),
    "dice": ScoreKind(
        params={"percentile": Field(Float(ge=0, lt=100), default=90.0,
                                    description="percent of classifier weights masked, by fit contribution")},
        tap_point="features",
        needs_fit=True,
        description="energy of the classifier sparsified by fit contributions (Sun & Li 2022); "
        "higher = more OOD",
    ),
    "gradnorm": ScoreKind(
        value_range=(None, 0.0),
        params={"temperature": Field(Float(gt=0), default=1.0, description="softmax temperature T")},
        tap_point="features",
        description="minus the L1 norm of the last layer's gradient of KL(uniform || softmax), "
        "closed form (Huang et al. 2021); higher = more OOD",
    ),
    "mc_dropout": ScoreKind(
        params={"samples": Field(Int(min=2), default=20, description="stochastic passes T"),
                "p": Field(Float(ge=0, lt=1), default=0.5, description="dropout probability"),
                "seed": Field(Int(min=0), default=0, description="seed of the dropout masks"),
                "output": Field(Enum(("entropy", "mutual_information", "variance", "max_softmax")),
                                default="entropy", description="what to read from the passes")},
        tap_point="features",
        description="MC dropout on penultimate features through the classifier, masks fixed by "
        "the seed; higher = more OOD",
    ),
    "larem": ScoreKind(
        value_range=(0.0, None),
        params={"shrinkage": Field(AnyOf((Enum(("ledoit_wolf",)), Float(ge=0, le=1))),
                                   default="ledoit_wolf", description="covariance shrinkage"),
                "num_classes": Field(AnyOf((Int(min=1), Enum((None,)))), default=None,
                                     description="number of classes; null: max label + 1")},
        needs_fit=True,
        description="min over classes of the Mahalanobis distance with per-class shrunk "
        "covariances (LaREM), fitted on data.fit; higher = more OOD",
    ),
    "lared": ScoreKind(
        params={"shrinkage": Field(AnyOf((Enum(("ledoit_wolf",)), Float(ge=0, le=1))),
                                   default="ledoit_wolf", description="covariance shrinkage"),
                "num_classes": Field(AnyOf((Int(min=1), Enum((None,)))), default=None,
                                     description="number of classes; null: max label + 1")},
        needs_fit=True,
        description="minus the log-density under the most likely per-class Gaussian (LaRED), "
        "fitted on data.fit; higher = more OOD",
    ),
    "box_abstraction": ScoreKind(
        value_range=(0.0, None),
        params={"k": Field(Int(min=1), default=3, description="k-means clusters (boxes) per class"),
                "gamma": Field(Float(ge=0), default=0.0, description="box enlargement, times its width"),
                "norm": Field(Enum(("linf", "l2")), default="linf", description="distance outside a box"),
                "seed": Field(Int(min=0), default=0, description="k-means seed")},
        needs_fit=True,
        description="distance outside the nearest of k boxes per class fitted by k-means "
        "(0 inside); higher = more OOD",
    ),
    "activation_pattern": ScoreKind(
        value_range=(0.0, None),
        tap_point="features",
        needs_fit=True,
        description="Hamming distance of the penultimate ReLU pattern to the nearest fit pattern "
        "of the predicted class (needs the classifier); higher = more OOD",
    ),
    "particul": ScoreKind(
        value_range=(-1.0, 0.0),
        params={"parts": Field(Int(min=1), default=6, description="part detectors"),
                "channels": Field(Int(min=1), default=64, description="channels of the RoI map"),
                "epochs": Field(Int(min=0), default=10, description="training passes over data.fit"),
                "seed": Field(Int(min=0), default=0, description="seed of weights and batch order"),
                "unicity": Field(Float(ge=0), default=1.0, description="weight of the unicity loss")},
        tap_point="features",
        needs_fit=True,
        description="minus the mean calibrated confidence of PARTICUL part detectors trained on "
        "box_head.input maps; higher = more OOD",
    ),
    "pvalue_fusion": ScoreKind(
        params={"components": Field(List(Enum(("energy", "mahalanobis", "knn", "residual")), min_items=1),
                                    default=("energy", "mahalanobis"),
                                    description="scores combined (distinct): energy, mahalanobis, knn, residual"),
                **PVALUE_PARAMS},
        tap_point="features",
        needs_fit=True,
        description="class-conditional ID-calibrated p-values of energy and Mahalanobis (and optionally "
        "kNN, ViM residual) on penultimate features (needs the classifier), combined by Fisher's "
        "method; higher = more OOD",
    ),
    "residual": ScoreKind(
        value_range=(0.0, None),
        params={"dim": Field(Int(min=1, max=100_000), default=64,
                             description="principal directions of the fit features kept")},
        tap_point="features",
        needs_fit=True,
        description="norm of the feature outside the top-dim principal subspace of the fit features "
        "(ViM's residual alone; meant for the RoI tap); higher = more OOD",
    ),
    "jitter_kl": ScoreKind(
        value_range=(0.0, None),
        tap_point="jitter_logits",
        description="mean KL divergence from the box's class distribution to those of its jittered "
        "copies (tap box_jitter.logits); higher = more OOD",
    ),
    "fusion": ScoreKind(
        params={"of": Field(List(Str(SCORE_NAME, "a score name"), min_items=2), required=True,
                            description="names of other scores of this spec to combine (at least 2, no fusion)"),
                **PVALUE_PARAMS,
                "size_bins": Field(Int(min=1, max=10), default=1,
                                   description="also condition the reference on the box size: this many "
                                   "quantile bins of sqrt(width * height) of the fit boxes (1: class only)")},
        tap_point="logits",
        needs_fit=True,
        description="class-conditional ID-calibrated p-values of other scores of the spec (out of fold "
        "on data.fit; the class from this tap's logits), combined by Fisher's method (or Stouffer's, or the "
        "minimum); higher = more OOD",
    ),
}
SCORE_KINDS: tuple[str, ...] = tuple(SCORE_KIND_TABLE)


def _score_record(kind: ScoreKind) -> Record:
    return Record({
        "kind": Field(Enum(SCORE_KINDS), description="score kind; defaults to the score's name"),
        "tap": Field(Str(NAME, "the name of a tap"), required=True, description="tap the score reads"),
        **kind.params,
    }, description=kind.description)


TORCHVISION_DETECTOR = Record({
    "kind": Field(Enum(("torchvision",)), description="detector kind (DETECTOR requires it)"),
    "arch": Field(Enum(ARCHS), required=True),
    "weights": Field(
        Str(WEIGHTS, " or ".join(f"builtin:{w}" for w in BUILTIN_WEIGHTS)
            + " or a path ending in .safetensors, .pt or .pth"),
        required=True, description="builtin weights or a path relative to the spec file",
    ),
    "num_classes": Field(Int(min=2, max=100_000), description="number of classes, background included"),
    "min_size": Field(Int(min=1, max=100_000), description="shorter image side after resizing (default: "
                      "800; digits_fasterrcnn 128; ssdlite320 takes none: it resizes to 320x320)"),
    "max_size": Field(Int(min=1, max=100_000), description="longest image side after resizing at most "
                      "(default: 1333; digits_fasterrcnn 128)"),
    "score_thresh": Field(Float(ge=0, lt=1), default=model.DEFAULT_SCORE_THRESH,
                          description="detections below this detector score are dropped"),
    "batch_size": Field(Int(min=1, max=1024), description="images per forward pass (default: as many "
                        "as fit 1/8 of the RAM at about 640 bytes per resized input pixel, at most 8)"),
    "device": Field(Enum(DEVICES), default=model.DEFAULT_DEVICE),
})

ONNX_LAYOUTS = ("two_stage", "yolo", "rtdetr", "detr")  # certood.detectors.onnx_detector documents each
TAP_POINT_KEY = "|".join(re.escape(p) for p in TAP_POINTS)
ONNX_DETECTOR = Record({
    "kind": Field(Enum(("onnx",)), description="detector kind (DETECTOR requires it)"),
    "path": Field(Str(r"[^\x00]*\.onnx", "a path ending in .onnx"), required=True,
                  description="the ONNX model, relative to the spec file (run with ONNX Runtime)"),
    "layout": Field(Enum(ONNX_LAYOUTS), default="two_stage",
                    description="which outputs the graph has and how detections tie to tapped rows"),
    "tensors": Field(Map(AnyOf((Str(r".+", "a graph tensor name"),
                                List(Str(r".+", "a graph tensor name"), min_items=1))),
                         TAP_POINT_KEY, "a tap point (one of: " + ", ".join(TAP_POINTS) + ")"),
                     default={}, description="tap point -> the graph tensor read there (added as an output), "
                     "or a list of per-level maps [1, C, H_i, W_i] concatenated along the candidates"),
    "input": Field(Str(r".+", "a graph input name"), description="the image input (default: the only one)"),
    "outputs": Field(Map(Str(r".+", "a graph output name"), NAME, "a layout output name"), default={},
                     description="renamed layout outputs, e.g. {predictions: output0}, {rows: keep_index}"),
    "num_classes": Field(Int(min=2, max=100_000),
                         description="number of classes, background included (default: from the graph)"),
    "score_thresh": Field(Float(ge=0, lt=1), default=model.DEFAULT_SCORE_THRESH,
                          description="detections below this detector score are dropped"),
    "nms_thresh": Field(Float(gt=0, le=1), default=0.5, description="yolo layout: NMS IoU threshold"),
    "multi_label": Field(Enum((False, True)), default=False,
                         description="yolo layout: a candidate per (anchor, class) above score_thresh, as "
                         "ultralytics' val (default: the best class per anchor, as its predict)"),
    "max_detections": Field(Int(min=1, max=100_000), default=100,
                            description="yolo, rtdetr, detr layouts: detections kept per image"),
    "activation": Field(Enum(("softmax", "sigmoid")), default="softmax",
                        description="detr layout: softmax (no-object class last) or sigmoid (no such class)"),
    "preprocess": Field(Enum(("resize", "letterbox")), default="resize",
                        description="fixed-size graphs: resize to the input, or letterbox (aspect kept, grey "
                        "padding, as ultralytics)"),
    "batch_size": Field(Int(min=1, max=1024), default=8, description="images per detector call"),
    "device": Field(Enum(DEVICES), default=model.DEFAULT_DEVICE),
}, description="an ONNX detector (certood.detectors.onnx_detector)")

DETECTOR = Tagged({"torchvision": TORCHVISION_DETECTOR, "onnx": ONNX_DETECTOR},
                  description="the detector: torchvision (arch + weights) or onnx (path + layout)")

DATA_SOURCE = Record({
    "digitsdet": Field(Enum(DIGITSDET_SPLITS), description="a split of the bundled DigitsDet dataset"),
    "annotations": Field(Str(PATH, "a path"), description="COCO annotations JSON, relative to the spec file"),
    "images": Field(Str(PATH, "a path"), description="image directory, relative to the spec file"),
    "max_images": Field(Int(min=1, max=1_000_000_000), description="use at most this many images"),
}, one_of=(("digitsdet",), ("annotations", "images")))

# How an OOD set's boxes are labelled (certood.check): "box", every monitored box on its images
# is OOD (the published VOS protocol); "gt_matched", a box is OOD only if it overlaps
# (IoU >= 0.5) an object of a category outside the ID ones, ID if it overlaps an ID object,
# and otherwise left out (counted as unmatched): for sets mixing ID and unknown objects.
OOD_PROTOCOLS = ("box", "gt_matched")
OOD_SOURCE = Record({
    **DATA_SOURCE.fields,
    "protocol": Field(Enum(OOD_PROTOCOLS), default="box",
                      description="box: every box on these images is OOD (VOS); gt_matched: OOD only if it "
                      "overlaps an unknown-class object, ID if it overlaps an ID object, else unmatched"),
}, one_of=DATA_SOURCE.one_of, description="an OOD data set and how its boxes are labelled")

FIT_SOURCE = Record({
    **DATA_SOURCE.fields,
    "max_boxes": Field(Int(min=1, max=1_000_000_000),
                       description="fit on at most this many boxes: a seeded reservoir sample (seed 0) of the "
                       "set's monitored boxes on ground-truth objects, drawn as images stream by, so memory "
                       "is bounded by it and not by the set's size"),
}, one_of=DATA_SOURCE.one_of, description="ID data the scores are fitted on")

DATA = Record({
    "fit": Field(FIT_SOURCE, description="ID data the scores are fitted on"),
    "calibration": Field(DATA_SOURCE, required=True, description="ID data the thresholds are set on"),
    "id_test": Field(DATA_SOURCE, description="held-out ID data for metrics"),
    "ood": Field(Map(OOD_SOURCE, NAME, f"a name matching {NAME}"), description="OOD data sets by name"),
    "ood_validation": Field(Map(DATA_SOURCE, NAME, f"a name matching {NAME}"),
                            description="OOD validation sets by name, for threshold: {fpr, on}; every "
                            "monitored box on them counts as OOD; never the same data as an OOD test set"),
})

THRESHOLD = Record({
    "tpr": Field(Float(gt=0, lt=1), default=model.DEFAULT_TPR,
                 description="ID true-positive rate kept by each score threshold, on the calibration ID boxes"),
    "fpr": Field(Float(gt=0, lt=1), description="instead of tpr: at most this fraction of the boxes of "
                 "the OOD validation set `on` stays below each score threshold (unflagged)"),
    "on": Field(Str(NAME, "the name of a data.ood_validation set"),
                description="with fpr: the data.ood_validation set the thresholds are set on"),
    "fixed": Field(Map(Float(), SCORE_NAME, "a score name", min_items=1),
                   description="instead of tpr: every score's threshold, given (not calibrated)"),
    "per_class": Field(Enum((False, True)), default=False,
                       description="also calibrate a threshold per predicted class (t.NAME[class] in the rule), "
                       f"at the same target on that class's boxes; a class with fewer than "
                       f"{model.MIN_CLASS_BOXES} boxes gets the global threshold"),
    "detector_score": Field(AnyOf((Enum(("f1",)), Float(ge=0, le=1))), default=model.DEFAULT_DETECTOR_SCORE,
                            description="detector score cut: 'f1' (F1-optimal on calibration data) or a number"),
}, one_of=(("tpr",), ("fpr", "on"), ("fixed",)), one_of_required=False,
   description="how score thresholds are set: tpr (default), fpr on an OOD validation set, or fixed")


@dataclass(frozen=True)
class GateMetric:
    """A metric a gate policy can bound: how details name it, which data sets it exists on
    ("ood": each OOD set, "id_test": the ID test set, "any": either), whether it is read per
    score, and its direction (baseline policies must limit the harmful one)."""

    label: str
    datasets: str
    per_score: bool
    higher_is_better: bool
    description: str = ""


# Every metric lies in [0, 1]. Read from `certood check`'s metrics.json (certificates: from
# metrics["certificates"][DATASET] once certification writes it).
GATE_METRIC_TABLE: dict[str, GateMetric] = {
    "auroc": GateMetric("AUROC", "ood", True, True, "box-level AUROC, OOD boxes positive"),
    "aupr_in": GateMetric("AUPR-In", "ood", True, True, "AUPR with ID boxes positive"),
    "aupr_out": GateMetric("AUPR-Out", "ood", True, True, "AUPR with OOD boxes positive"),
    "fpr95": GateMetric("FPR95", "ood", True, False, "OOD boxes accepted at 95% ID TPR"),
    "fpr95_first": GateMetric("FPR95 (first)", "ood", True, False, "FPR95, first threshold reaching 95%"),
    "rule_ood_flag_rate": GateMetric("rule OOD flag rate", "ood", False, True, "OOD boxes the rule flags"),
    "rule_id_tpr": GateMetric("rule ID TPR", "ood", False, True, "ID test boxes the rule does not flag"),
    "map": GateMetric("mAP", "id_test", False, True, "COCO mAP@[.5:.95] on id_test"),
    "map50": GateMetric("mAP50", "id_test", False, True, "COCO mAP@.5 on id_test"),
    "map75": GateMetric("mAP75", "id_test", False, True, "COCO mAP@.75 on id_test"),
    "certified_rate": GateMetric("certified rate", "any", False, True, "boxes with a certified verdict"),
    "undecided_rate": GateMetric("undecided rate", "any", False, False, "boxes left undecided"),
}
GATE_METRICS: tuple[str, ...] = tuple(GATE_METRIC_TABLE)
GATE_OPS = (">=", "<=", ">", "<")
GATE_ID_TEST = "id_test"  # the dataset name that means data.id_test in a policy

GATE_POLICY = Record({
    "name": Field(Str(r"[^\x00-\x1f\x7f]+", "a one-line name"), description="shown in reports; default: derived"),
    "metric": Field(Enum(GATE_METRICS), required=True),
    "score": Field(Str(SCORE_NAME, "the name of a score"),
                   description="a score of the spec (per-score metrics); default: every score"),
    "dataset": Field(Str(NAME, f"an OOD set name or {GATE_ID_TEST}"),
                     description=f"an OOD set of data.ood, or {GATE_ID_TEST}; default: every set the metric exists on"),
    "op": Field(Enum(GATE_OPS), description="how the observed value must compare with value"),
    "value": Field(Float(ge=0, le=1), description="absolute threshold"),
    "baseline": Field(
        Record({"max_drop": Field(Float(ge=0, le=1), description="largest allowed fall from the baseline"),
                "max_rise": Field(Float(ge=0, le=1), description="largest allowed rise from the baseline")},
               one_of=(("max_drop",), ("max_rise",))),
        description="a limit relative to the baseline results (certood gate --baseline DIR)"),
    "warn": Field(Float(gt=0, le=1), description="a passing value within this margin of the limit is WARN"),
}, one_of=(("op", "value"), ("baseline",)), description="one gate policy")

GATE = List(GATE_POLICY, min_items=1, description="release gate policies (certood gate)")

# Certificates: which taps a region can sit at (the bounded head starts there).
CERTIFY_TAP_POINTS = ("box_head.input", "box_head.output")
CERTIFY = Record({
    "tap": Field(Str(NAME, "the name of a tap"), required=True,
                 description="tap whose features are perturbed; it must point at "
                 + " or ".join(CERTIFY_TAP_POINTS)),
    "norm": Field(Enum(("inf", 2)), default="inf", description="norm of the region: inf or 2"),
    "eps": Field(Float(gt=0), required=True, description="radius of the region around each box's feature"),
    "method": Field(Enum(("ibp", "crown", "alpha-crown", "bab")), default="crown",
                    description="bound propagation; alpha-crown is tighter and slower; bab: CROWN, then "
                    "branch and bound over unstable ReLUs (verifiers/bab.py) for the boxes left undecided "
                    "without a counterexample, within timeout_s seconds and 64 subdomains per box"),
    "engine": Field(Enum(("auto", "auto_lirpa")), default="auto",
                    description="auto: certood's sparse CROWN (verifiers/sparse_crown.py, auto_LiRPA's relaxation) "
                    "for IBP and CROWN on Linear/ReLU heads under the L-inf norm, auto_LiRPA otherwise; "
                    "auto_lirpa: always auto_LiRPA"),
    "exact": Field(Enum(("none", "z3")), default="none",
                   description="z3: decide the rule exactly under the score bounds when intervals cannot"),
    "timeout_s": Field(Float(gt=0), default=2.0, description="time limit of each exact decision, seconds"),
    "radius": Field(Enum((False, True)), default=False,
                    description="also search (doubling, bisection) the largest eps at which each verdict holds"),
    "domain": Field(Enum(("nonnegative", "any")), default="nonnegative",
                    description="nonnegative: intersect the region with z' >= 0 (post-ReLU features)"),
}, description="certificates: what the rule says over a region around each box's feature")

RUN = Record({
    "workers": Field(Int(min=0, max=256), default=model.DEFAULT_RUN_WORKERS,
                     description="DataLoader worker processes decoding images for the detector (0: decode "
                     "in the main process)"),
    "shard_images": Field(Int(min=1, max=1_000_000), default=model.DEFAULT_SHARD_IMAGES,
                          description="images per on-disk shard: the unit a killed check resumes from "
                          "(`certood check --resume`)"),
    "ray": Field(Record({
        "address": Field(Str(r".+", "a Ray address"), description="an existing cluster (ray://host:10001 or "
                         "host:6379); default: start a local Ray instance"),
        "workers": Field(Int(min=1, max=100_000), default=2,
                         description="detector actors (one per CPU or GPU slot)"),
        "gpus_per_worker": Field(Float(ge=0, le=64), default=0.0, description="GPUs each actor reserves"),
    }), description="run extraction, scoring and certification on Ray (pip install certood[ray])"),
}, description="execution of `certood check`")

# A policy file for `certood gate --policy FILE`: the same policies, outside the spec.
POLICY_FILE = Record({
    "version": Field(Enum(SUPPORTED_VERSIONS), description="policy file format version"),
    "gate": Field(GATE, required=True),
}, description="certood gate policy file")

TEMPORAL = Record({
    "tracker": Field(Record({
        "iou": Field(Float(gt=0, le=1), default=model.DEFAULT_TRACK_IOU,
                     description="least IoU of a box with a track's predicted box to continue it"),
        "max_age": Field(Int(min=0, max=100_000), default=model.DEFAULT_MAX_AGE,
                         description="consecutive frames a track may miss before it ends"),
    }), description="IoU tracker linking boxes across frames (optimal assignment)"),
    "aggregate": Field(Enum(model.AGGREGATES), default=model.DEFAULT_AGGREGATE,
                       description="how a score is aggregated along a track, causally: running mean, "
                       "exponential smoothing (ema), running max, or CUSUM of standardised scores"),
    "alpha": Field(Float(gt=0, le=1), default=model.DEFAULT_ALPHA,
                   description="ema: weight of the newest frame"),
    "cusum": Field(Record({
        "k": Field(Float(ge=0), default=model.DEFAULT_CUSUM_K,
                   description="drift allowance, in ID standard deviations of the score"),
        "target_false_alarm_rate": Field(Float(gt=0, lt=1), default=model.DEFAULT_CUSUM_RATE,
                                         description="fraction of calibration ID boxes above the CUSUM threshold"),
    }), description="cusum: drift and the false-alarm rate its threshold is calibrated to"),
    "certified": Field(Record({
        "k": Field(Int(min=1, max=100_000), required=True, description="certified_ood frames needed"),
        "n": Field(Int(min=1, max=100_000), required=True, description="window of the last n frames"),
    }), description="a track is certified OOD at a frame when >= k of its last n frames are"),
}, description="track-level monitoring of video (needs COCO-video data: images with video_id, frame_id)")

SPEC = Record({
    "extends": Field(Str(PATH, "a path to a spec file"),
                     description="a spec file (relative to this one) this spec starts from: its mappings "
                     "merge under this file's, recursively; lists and other values are replaced; null "
                     "removes an inherited mapping or list"),
    "version": Field(Enum(SUPPORTED_VERSIONS), required=True, description="spec format version"),
    "detector": Field(DETECTOR, required=True),
    "data": Field(DATA, required=True),
    "taps": Field(Map(Enum(tuple(TAP_POINTS)), NAME, f"a name matching {NAME}", min_items=1),
                  required=True, description="named points of the detector to read features from"),
    "scores": Field(
        Map(Tagged({k: _score_record(v) for k, v in SCORE_KIND_TABLE.items()}), SCORE_NAME,
            "an identifier ([A-Za-z_][A-Za-z0-9_]*) other than and, or, not, t", min_items=1,
            max_items=MAX_SCORES, max_hint="each score is extracted, calibrated and plotted: split the spec"),
        required=True, description=f"named OOD scores, each reading one tap (at most {MAX_SCORES})",
    ),
    "threshold": Field(THRESHOLD),
    "rule": Field(Str(), description="when to flag a box, e.g. 'energy > t.energy or maha > t.maha'; "
                  "default: every score above its threshold, or-ed"),
    "output": Field(Record({"dir": Field(Str(PATH, "a path"), description="relative to the spec file")})),
    "run": Field(RUN, description="how `certood check` runs: image-decoding workers, shard size, a Ray "
                 "cluster; results do not depend on it (not part of the fingerprint)"),
    "gate": Field(GATE, description="release gate policies checked by `certood gate`"),
    "certify": Field(CERTIFY),
    "temporal": Field(TEMPORAL, description="track-level OOD confidence on video (certood check)"),
}, description="certood monitor spec")


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of spec v1, generated from `SPEC` (a fresh dict each call).

    A spec with `extends` may leave anything to its parent, so the top level checks keys and
    types only ("required" and one-of groups dropped), and the complete schema applies to
    specs without `extends`.
    """
    full = SPEC.json()
    return factor_repeats({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "certood monitor spec v1",
        **_partial(full),
        "if": {"required": ["extends"]},
        "else": {"$ref": "#/$defs/complete"},
        "$defs": {"complete": full},
    })


def _partial(schema, root: bool = True):
    """`schema` for a spec that extends another: nothing required (it may be inherited), and
    a mapping or list may be null (which removes the inherited one)."""
    if isinstance(schema, list):
        return [_partial(s, False) for s in schema]
    if not isinstance(schema, dict):
        return schema
    drop = {"required", "oneOf", "dependentRequired", "minProperties"}
    # "not" (at most one of a record's key groups) still holds in a spec that extends another
    out = {k: v if k == "not" else _partial(v, False) for k, v in schema.items() if k not in drop}
    if not root and out.get("type") in ("object", "array"):
        out["type"] = [out["type"], "null"]
    elif not root and "anyOf" in out and all(o.get("type") == ["object", "null"] for o in out["anyOf"]):
        out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    return out
