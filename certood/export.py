"""Export a calibrated monitor as one ONNX graph: tapped features in, scores and flag out.

The graph has one input per tap point the scores read, named by the tap point and shaped as
in :class:`~certood.detectors.base.Detections` (``cls_logits`` ``[N, C]`` with the background
column first, ``box_head.output`` ``[N, D]``, ...; ``N`` is dynamic), and these outputs:

- ``score/<name>`` float ``[N]`` for every score of the spec (higher = more OOD);
- ``flag`` bool ``[N]``: the spec's rule over the calibrated thresholds.

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

    def forward(self, *features):
        values = {}
        for name, read, fg, head in zip(self.score_names, self.reads, self.foreground, self.heads):
            x = features[read].flatten(1)
            values[name] = head(x[:, 1:] if fg else x)  # logit taps: foreground columns only
        flag = self.rule.evaluate(values, self.thresholds)
        return (*(values[n] for n in self.score_names), flag)


def check_exportable(monitor) -> None:
    """Raise (a usage error: the spec asks for it) naming every score whose kind has no ONNX
    form, and the kinds that have one."""
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


def export_monitor_onnx(monitor, out: str | Path, feature_shapes: dict[str, tuple[int, ...]] | None = None,
                        opset: int = OPSET) -> ExportResult:
    """Write the monitor of ``monitor`` as ONNX to ``out``; checked with ``onnx.checker``.

    ``feature_shapes`` gives each tap point's per-box shape (``{"cls_logits": (6,)}``); by
    default it is read from the fitted scores (feature width), and logit taps are one column
    per detector label plus the background.
    """
    import onnx

    from certood.artifacts import atomic_write_bytes, versions

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
    outputs = [f"score/{n}" for n in graph.score_names] + ["flag"]
    buf = _export_bytes(graph, examples, list(graph.points), outputs, opset)
    model = onnx.load_from_string(buf)
    metadata = {
        "certood.format": "certood-monitor-onnx/1",
        "certood.spec_fingerprint": spec.fingerprint(),
        "certood.detector_sha256": monitor.detector_sha256,
        "certood.detector_threshold": repr(float(monitor.detector_threshold)),
        "certood.thresholds": json.dumps(monitor.thresholds),
        "certood.rule": spec.rule.source,
        "certood.taps": json.dumps({p: list(shapes[p]) for p in graph.points}),
        "certood.versions": json.dumps(versions()),
    }
    for k, v in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    model.doc_string = ("certood monitor: tapped per-box features -> OOD scores (higher = more OOD) "
                        "and the rule's flag")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - ValidationError / InferenceError
        raise CertoodError(f"export: the exported graph does not pass onnx.checker ({e})") from None
    atomic_write_bytes(Path(out), model.SerializeToString())
    return ExportResult(Path(out), {p: [None, *shapes[p]] for p in graph.points}, outputs, metadata)


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
    feed = {i.name: features[i.name].detach().cpu().float().numpy() for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return {n: torch.from_numpy(v) for n, v in zip(names, session.run(names, feed))}
