"""Export a calibrated monitor as one ONNX graph: tapped features in, scores and flag out.

``export_detector_monitor_onnx`` prepends an ONNX detector (two_stage layout): image in,
detections and their scores and flag out, one graph.

The monitor graph has one input per tap point the scores read, named by the tap point and shaped as
in :class:`~certood.detectors.base.Detections` (``cls_logits`` ``[N, C]`` with the background
column first, ``box_head.output`` ``[N, D]``, ...; ``N`` is dynamic), and these outputs:

- ``score/<name>`` float ``[N]`` for every score of the spec (higher = more OOD);
- ``flag`` bool ``[N]``: the spec's rule over the calibrated thresholds.

A rule with per-class thresholds (``t.NAME[class]``) adds an input ``labels`` int64 ``[N]``, each
box's predicted label (what :meth:`Monitor.flag` takes as ``labels``).

It computes exactly what :meth:`Monitor.score_boxes` and :meth:`Monitor.flag` compute; the
detector-score cut (only boxes at or above ``detector_threshold`` are monitored) stays with
the caller and is recorded in the graph's metadata with the thresholds, the spec fingerprint
and the detector's sha256. Exportable score kinds: ``EXPORTABLE_KINDS``.

>>> export_monitor_onnx(monitor, "monitor.onnx")  # doctest: +SKIP
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from certood.errors import CertoodError, UsageError
from certood.spec import TAP_POINTS

EXPORTABLE_KINDS = ("energy", "max_logit", "msp", "mahalanobis")
OPSET = 17  # what ONNX Runtime runs and onnx2torch reads back (FACTS.md)


class _EnergyHead(nn.Module):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits):
        return -self.temperature * torch.logsumexp(logits / self.temperature, dim=-1)


class _MaxLogitHead(nn.Module):
    def forward(self, logits):
        return -logits.max(dim=-1).values


class _MspHead(nn.Module):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits):
        return -torch.softmax(logits / self.temperature, dim=-1).max(dim=-1).values


class _MahalanobisHead(nn.Module):
    """``min_c ||x L - mu_c L||^2`` with ``P = L L^T``: :func:`mahalanobis_score` with the
    eigendecomposition done once here (ONNX has no ``eigh``), float64 inside."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        precision = precision.to(torch.float64)
        means = means.to(torch.float64)
        means = means[torch.isfinite(means).all(dim=1)]
        if len(means) == 0:
            raise CertoodError("mahalanobis: no class with a finite mean; nothing to export")
        w, v = torch.linalg.eigh(precision)
        factor = v * w.clamp(min=0).sqrt()
        self.register_buffer("factor", factor)
        self.register_buffer("projected_means", means @ factor)

    def forward(self, x):
        xl = x.to(torch.float64) @ self.factor
        dist = ((xl.unsqueeze(1) - self.projected_means.unsqueeze(0)) ** 2).sum(dim=2)
        return dist.min(dim=1).values.to(x.dtype)


def _score_head(name: str, kind: str, score) -> nn.Module:
    if kind == "energy":
        return _EnergyHead(score.temperature)
    if kind == "max_logit":
        return _MaxLogitHead()
    if kind == "msp":
        return _MspHead(score.temperature)
    if kind == "mahalanobis":
        return _MahalanobisHead(score.means, score.precision)
    raise AssertionError(kind)  # unreachable: checked by exportable()


class MonitorGraph(nn.Module):
    """The monitor as a torch module of the tapped features (what is exported)."""

    def __init__(self, monitor):
        super().__init__()
        spec = monitor.spec
        check_exportable(monitor)
        self.score_names = list(spec.scores)
        self.points = sorted({spec.taps[s.tap] for s in spec.scores.values()})
        self.reads = [self.points.index(spec.taps[s.tap]) for s in spec.scores.values()]
        self.foreground = [TAP_POINTS[spec.taps[s.tap]] == "logits" for s in spec.scores.values()]
        self.heads = nn.ModuleList(_score_head(n, s.kind, monitor.scores[n]) for n, s in spec.scores.items())
        self.rule = spec.rule
        self.thresholds = dict(monitor.thresholds)
        # rules with t.NAME[class]: per-class tables indexed by each box's predicted label
        self.per_class = bool(spec.rule.class_threshold_names())
        if self.per_class:
            from certood.spec.rule import class_key

            self.thresholds.update({class_key(k): torch.tensor(v, dtype=torch.float64)
                                    for k, v in getattr(monitor, "class_thresholds", {}).items()})

    @property
    def input_names(self) -> list[str]:
        return self.points + (["labels"] if self.per_class else [])

    def forward(self, *inputs):
        features, labels = (inputs[:-1], inputs[-1]) if self.per_class else (inputs, None)
        values = {}
        for name, read, fg, head in zip(self.score_names, self.reads, self.foreground, self.heads):
            x = features[read].flatten(1)
            values[name] = head(x[:, 1:] if fg else x)  # logit taps: foreground columns only
        flag = self.rule.evaluate(values, self.thresholds, labels) if self.per_class \
            else self.rule.evaluate(values, self.thresholds)
        return (*(values[n] for n in self.score_names), flag)


def check_exportable(monitor) -> None:
    """Raise (a usage error: the spec asks for it) naming every score whose kind has no ONNX
    form, and the kinds that have one."""
    # per-class thresholds (t.NAME[class]) are exportable: the graph then takes the labels
    bad = [f"{name} ({s.kind})" for name, s in monitor.spec.scores.items() if s.kind not in EXPORTABLE_KINDS]
    if bad:
        raise UsageError(f"cannot export to ONNX: score(s) {', '.join(bad)} have no ONNX form; "
                           f"exportable kinds: {', '.join(EXPORTABLE_KINDS)}")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    inputs: dict[str, list]  # input name -> shape (None: dynamic)
    outputs: list[str]
    metadata: dict[str, str]


def monitor_model(monitor, feature_shapes: dict[str, tuple[int, ...]] | None = None, opset: int = OPSET):
    """The monitor as an ``onnx.ModelProto`` (metadata included) and its per-box input shapes."""
    import onnx

    from certood.artifacts import versions

    graph = MonitorGraph(monitor).eval()
    shapes = dict(feature_shapes or {})
    spec = monitor.spec
    for name, s in spec.scores.items():
        point = spec.taps[s.tap]
        dim = getattr(monitor.scores[name], "feature_dim", None)
        if point not in shapes and dim:
            shapes[point] = (dim + (TAP_POINTS[point] == "logits"),)
        if point not in shapes and TAP_POINTS[point] == "logits":  # C - 1 labels + background
            shapes[point] = (len(monitor.label_to_category) + 1,)
    missing = [p for p in graph.points if p not in shapes]
    if missing:
        raise CertoodError(f"export: the per-box width of tap point(s) {', '.join(missing)} is unknown; "
                           "pass feature_shapes (e.g. {'cls_logits': (6,)})")
    examples = tuple(torch.randn(3, *shapes[p]) for p in graph.points)
    if graph.per_class:
        examples += (torch.ones(3, dtype=torch.long),)
    outputs = [f"score/{n}" for n in graph.score_names] + ["flag"]
    model = onnx.load_from_string(_export_bytes(graph, examples, graph.input_names, outputs, opset))
    metadata = {
        "certood.format": "certood-monitor-onnx/1",
        "certood.spec_fingerprint": spec.fingerprint(),
        "certood.detector_sha256": monitor.detector_sha256,
        "certood.detector_threshold": repr(float(monitor.detector_threshold)),
        "certood.thresholds": json.dumps(monitor.thresholds),
        "certood.class_thresholds": json.dumps(getattr(monitor, "class_thresholds", {})),
        "certood.rule": spec.rule.source,
        "certood.taps": json.dumps({p: list(shapes[p]) for p in graph.points}),
        "certood.versions": json.dumps(versions()),
    }
    _set_metadata(model, metadata)
    model.doc_string = ("certood monitor: tapped per-box features -> OOD scores (higher = more OOD) "
                        "and the rule's flag")
    return model, {p: shapes[p] for p in graph.points}


def _set_metadata(model, metadata: dict[str, str]) -> None:
    import onnx

    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def _check_and_write(model, out: Path) -> None:
    import onnx

    from certood.artifacts import atomic_write_bytes

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - ValidationError / InferenceError
        raise CertoodError(f"export: the exported graph does not pass onnx.checker ({e})") from None
    atomic_write_bytes(Path(out), model.SerializeToString())


def export_monitor_onnx(monitor, out: str | Path, feature_shapes: dict[str, tuple[int, ...]] | None = None,
                        opset: int = OPSET) -> ExportResult:
    """Write the monitor of ``monitor`` as ONNX to ``out``; checked with ``onnx.checker``.

    ``feature_shapes`` gives each tap point's per-box shape (``{"cls_logits": (6,)}``); by
    default it is read from the fitted scores (feature width), and logit taps are one column
    per detector label plus the background.
    """
    model, shapes = monitor_model(monitor, feature_shapes, opset)
    _check_and_write(model, Path(out))
    return ExportResult(Path(out), {p: [None, *v] for p, v in shapes.items()},
                        [o.name for o in model.graph.output], {p.key: p.value for p in model.metadata_props})


def export_detector_monitor_onnx(detector, monitor, out: str | Path) -> ExportResult:
    """One graph from the image to the detections and the monitor's verdicts on each of them.

    ``detector`` is an :class:`~certood.detectors.onnx_detector.OnnxDetector` with the
    ``two_stage`` layout (NMS inside the graph; its ``rows`` output ties each detection to the
    tapped tensors). Outputs: the detector's ``boxes``, ``labels``, ``scores``, ``rows``, then
    ``score/<name>`` and ``flag`` per detection, computed as :meth:`Monitor.score_boxes` on the
    detector's taps. Boxes stay in the graph input's pixels (the caller resizes a fixed-size
    input, as :class:`OnnxDetector` does).
    """
    import onnx
    from onnx import compose, helper

    if getattr(detector, "layout", None) != "two_stage":
        raise UsageError("export with the detector: only ONNX detectors with the two_stage layout (detections "
                         "and their rows inside the graph); export the monitor alone instead")
    det = onnx.ModelProto()
    det.CopyFrom(detector.model)
    opsets = {o.domain: o.version for o in det.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx", OPSET))
    mon, shapes = monitor_model(monitor, opset=opset)
    mon.ir_version = det.ir_version
    o = detector.outputs
    missing = [p for p in shapes if p not in detector.tensors]
    if missing:
        raise UsageError(f"export with the detector: the monitor reads tap point(s) {', '.join(missing)} "
                         f"that detector.tensors does not map (mapped: {', '.join(detector.tensors)})")
    io_map = [(o["labels"], "monitor/labels")] if any(i.name == "labels" for i in mon.graph.input) else []
    for point in shapes:
        tensor = detector.tensors[point]
        gathered, flat = f"certood/{point}/rows", f"certood/{point}"
        det.graph.node.extend([
            helper.make_node("Gather", [tensor, o["rows"]], [gathered], axis=0, name=f"certood_gather_{point}"),
            helper.make_node("Flatten", [gathered], [flat], axis=1, name=f"certood_flatten_{point}"),
        ])
        det.graph.output.append(onnx.ValueInfoProto(name=flat))
        io_map.append((flat, f"monitor/{point}"))
    mon = compose.add_prefix(mon, "monitor/")
    keep = [o["boxes"], o["labels"], o["scores"], o["rows"]]
    merged = compose.merge_models(det, mon, io_map=io_map,
                                  outputs=keep + [out.name for out in mon.graph.output],
                                  name="certood detector + monitor")
    outputs = keep + [f"score/{n}" for n in monitor.spec.scores] + ["flag"]
    for out_info in merged.graph.output:  # monitor/score/energy -> score/energy
        if out_info.name.startswith("monitor/"):
            _rename_value(merged.graph, out_info.name, out_info.name.removeprefix("monitor/"))
    metadata = {p.key: p.value for p in mon.metadata_props}
    metadata.update({"certood.format": "certood-detector-monitor-onnx/1",
                     "certood.detector_onnx_sha256": detector.weights_sha256})
    _set_metadata(merged, metadata)
    merged.doc_string = "certood: image -> detections (two_stage) -> OOD scores and flag per detection"
    _check_and_write(merged, Path(out))
    inputs = {i.name: [d.dim_param or d.dim_value or None for d in i.type.tensor_type.shape.dim]
              for i in merged.graph.input}
    return ExportResult(Path(out), inputs, outputs, metadata)


def _rename_value(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for info in list(graph.output) + list(graph.value_info):
        if info.name == old:
            info.name = new


def _export_bytes(module: nn.Module, examples, input_names, output_names, opset) -> bytes:
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on python scalars (thresholds are constants)
        torch.onnx.export(module, examples, buf, dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes={n: {0: "boxes"} for n in input_names + output_names})
    return buf.getvalue()


def run_monitor_onnx(path: str | Path, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run an exported monitor with ONNX Runtime: ``{tap point: [N, ...]}`` in, outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: (features[i.name].detach().cpu().long().numpy() if i.name == "labels"
                     else features[i.name].detach().cpu().float().numpy()) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return {n: torch.from_numpy(v) for n, v in zip(names, session.run(names, feed))}
