"""ONNX detectors, run with ONNX Runtime; features tapped by exposing intermediate tensors.

A tap is any named tensor of the graph (``/box_head/Relu_1_output_0``, ...), or a list of them
(per-level maps of a one-stage head, concatenated along the candidates in list order). The
adapter adds each tapped tensor to the graph's outputs (an ONNX value is readable once it is an
output), runs one image at a time, and ties every kept detection to its row of each tapped
tensor, so per-box features mean exactly what they mean in the PyTorch adapters.

A tapped tensor is read as one row per candidate (proposal, anchor, query) in any of these
shapes (``N`` candidates, ``C`` channels): ``[N, ...]``, ``[1, N, ...]`` (rows first), or
channels first, as one-stage exports write their heads: ``[1, C, N]``, ``[C, N]``, or a feature
map ``[1, C, H, W]`` with ``H * W = N`` (row-major, as ``view(1, C, -1)`` flattens it). A list of
maps ``[1, C, H_i, W_i]`` gives ``N = sum H_i W_i`` rows, level after level, which is the order
in which YOLO heads concatenate their anchors.

Input (every layout): one float32 image ``[1, 3, H, W]``, RGB in [0, 1]; normalisation, if
any, lives inside the graph. With dynamic ``H``/``W`` the image goes in at its own size; with
fixed ones it is resized to them (``preprocess: resize``, bilinear, aspect ratio not kept) or
letterboxed (``preprocess: letterbox``: scaled to fit, aspect ratio kept, centred on grey 114/255
padding, as ultralytics trains and evaluates), and boxes are mapped back to the original pixels.

Layouts (``layout=``), i.e. which graph outputs the adapter reads and how rows are tied. A
layout with a single output reads the graph's single output when the graph has one (a stock
export's ``output0``); ``outputs`` renames them otherwise (``{predictions: output0}``).

``two_stage`` (Faster R-CNN style, NMS inside the graph)
    outputs ``boxes`` float ``[N, 4]`` xyxy in input pixels, ``labels`` int ``[N]`` (1..C-1,
    0 is background), ``scores`` float ``[N]``, and ``rows`` int ``[N]``: the proposal row of
    each detection in every per-proposal tensor (one proposal may give several detections).
    Tapped tensors are per proposal, ``[P, ...]``; the ``cls_logits`` tap ``[P, C]`` (background
    column first) is required: it is the detections' logits. How to produce ``rows``: carry the
    proposal index through the score filter, small-box removal, NMS and top-k, as
    :func:`certood.detectors.torchvision_frcnn.postprocess_with_rows` does; export that module
    with ``torch.onnx.export(..., dynamo=False)`` (onnx2torch reads the TorchScript exporter's
    opsets back, not the dynamo exporter's).

``yolo`` (one-stage, NMS outside the graph: ultralytics YOLOv5u/v8/11/26 ``format='onnx'``)
    output ``predictions`` float ``[1, 4 + K, A]`` (a stock export's ``output0``) or
    ``[1, A, 4 + K]``: per anchor/location ``a``, the box ``cx, cy, w, h`` in input pixels and
    ``K`` per-class scores in [0, 1] (sigmoid probabilities; objectness already multiplied in).
    The adapter keeps anchors whose best class score is >= ``score_thresh`` (with
    ``multi_label``: every (anchor, class) pair whose score is, as ultralytics' val does), runs
    class-wise NMS (``nms_thresh``) and keeps ``max_detections``; a detection's row is its
    anchor ``a`` (with ``multi_label`` one anchor may give several detections).
    Logits: the ``cls_logits`` tap ``[A, K]`` when given (the class logits before the sigmoid),
    else ``logit(score)``; a background column of zeros is put first, so labels are 1..K as
    everywhere in certood. In a stock ultralytics export (detect head ``/model.22`` in YOLOv8n,
    ``/model.23`` in YOLO11n; check with :func:`graph_tensors`) the taps are ``cls_logits``:
    ``/model.22/Concat_1_output_0`` ``[1, K, A]``, the input of the ``Sigmoid`` that makes the
    scores; ``head.cls_features``: the list of the three per-level inputs of the class branch's
    last 1x1 conv, ``/model.22/cv3.{i}/cv3.{i}.1/act/Mul_output_0`` for i = 0, 1, 2 (YOLO11n:
    ``/model.23/cv3.{i}/cv3.{i}.1/cv3.{i}.1.1/act/Mul_output_0``), ``[1, 64, H_i, W_i]``: through
    that conv they are exactly the anchor's logits. The maps entering the head differ in width
    per level (64, 128, 256 in YOLOv8n), so they make no ``head.input``.

    ID mAP against ultralytics' own ``val``: the same boxes need ``preprocess: letterbox`` (for
    non-square images), ``score_thresh: 0.001``, ``nms_thresh: 0.7``, ``max_detections: 300``
    and ``multi_label: true``; what then remains is the AP itself: certood's is pycocotools'
    (101 recall points, precision averaged, at most 100 detections per image), ultralytics
    integrates its interpolated 101-point curve with the trapezoid rule over its own matching.

``rtdetr`` (set prediction, top-k inside the graph: ultralytics RT-DETR ``format='onnx'``)
    output ``predictions`` float ``[1, R, 6]`` (ultralytics 8.4): the ``R`` best (query, class)
    pairs, best first, as ``cx, cy, w, h`` normalised to [0, 1] of the input, score, class
    index. A row's query is read inside the graph (the ``GatherElements`` indices that pick its
    box, or ``outputs: {rows: ...}``), and so are the per-query class logits ``[1, Q, K]`` (the
    input of the ``Sigmoid`` the last ``TopK`` ranks, or the ``cls_logits`` tap): label = class
    index + 1, logits = the query's, background zeros first; tapped tensors have one row per
    query (one query may give several detections). Per-query features: the input of the last
    decoder layer's class head, ``/model.<i>/decoder/layers.<L-1>/norm3/LayerNormalization_output_0``
    ``[1, Q, D]``. The older form ``[1, Q, 4 + K]`` (K sigmoid scores per query) is read per query:
    score = best class score, logits as in ``yolo``. Rows with score >= ``score_thresh`` are kept
    (best ``max_detections``, no NMS).

``detr`` (set prediction, no NMS: DETR, Deformable-DETR, HF transformers exports)
    outputs ``pred_logits`` float ``[1, Q, K + 1]`` and ``pred_boxes`` float ``[1, Q, 4]``
    (``cx, cy, w, h`` normalised to [0, 1] of the input). ``activation`` says how the head was
    trained: ``softmax`` (DETR: the "no object" class last; score = max foreground softmax
    probability, logits with the no-object column moved first) or ``sigmoid`` (Deformable DETR,
    focal-loss heads: ``pred_logits [1, Q, K]``, no no-object column; score = max sigmoid,
    logits with a background column of zeros first). Label = the best class + 1; queries with
    score >= ``score_thresh`` are kept (best ``max_detections``), row = query; tapped tensors
    have one row per query.

Every tapped tensor is flattened per row, ``[N, D]``, in :class:`Detections`; the
``cls_logits`` tap is always there and equals the detections' logits (background first).
The spec names the tensors under ``detector.tensors`` (tap point -> graph tensor name(s));
:func:`graph_tensors` lists a graph's tensors with their shapes.

``monitored_head(start)`` extracts the subgraph from the ``start`` tap to the logits (two_stage:
the ``cls_logits`` tensor; detr: ``pred_logits``, columns reordered background first) and
converts it with onnx2torch: an ``nn.Sequential`` ending with the classifier as ``nn.Linear``
when the graph ends with a Gemm (or MatMul + Add), so certificates bound the same function ONNX
Runtime runs. The yolo and rtdetr layouts have none (an anchor's logits come from a
neighbourhood; an RT-DETR query's from attention over the image).

>>> det = OnnxDetector("frcnn.onnx", {"cls_logits": "/box_predictor/cls_score/Gemm_output_0"})  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certood.detectors.base import Detections, file_sha256
from certood.errors import CertoodError

LAYOUTS = ("two_stage", "yolo", "rtdetr", "detr")
LAYOUT_OUTPUTS = {
    "two_stage": ("boxes", "labels", "scores", "rows"),
    "yolo": ("predictions",),
    "rtdetr": ("predictions",),
    "detr": ("pred_logits", "pred_boxes"),
}
OPTIONAL_OUTPUTS = {"rtdetr": ("rows",)}  # discovered in a stock export when not named
ACTIVATIONS = ("softmax", "sigmoid")  # detr layout: how the class head was trained
PREPROCESS = ("resize", "letterbox")  # fixed-size graphs: how an image is fitted to the input
LETTERBOX_FILL = 114 / 255  # ultralytics' padding grey
LOGITS_TAP = "cls_logits"
REGION_TAP = "box_head.input"
LISTED = 8  # tensors named in an error message, at most


def _load_onnx(path: Path):
    import onnx

    if not path.exists():
        raise CertoodError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - DecodeError, OSError, ...: all mean "not a model"
        raise CertoodError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def _value_names(model) -> set[str]:
    g = model.graph
    return ({i.name for i in g.input} | {i.name for i in g.initializer}
            | {o for n in g.node for o in n.output})


def _inferred_shapes(model) -> dict[str, list[int | None]]:
    """Every value's shape by ONNX shape inference (None for unknown dims); {} when it fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is best effort
        return {}
    g = inferred.graph
    shapes = {}
    for info in list(g.value_info) + list(g.output) + list(g.input):
        if info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None
                                 for d in info.type.tensor_type.shape.dim]
    return shapes


def _static_shape(model, name: str) -> list[int | None] | None:
    """The shape of value ``name`` by ONNX shape inference (None for unknown dims)."""
    return _inferred_shapes(model).get(name)


def graph_tensors(model) -> list[tuple[str, list[int | None] | None]]:
    """``(name, shape)`` of every tensor a node of ``model`` (an ``onnx.ModelProto`` or a path)
    produces, in graph order: the names a spec's ``detector.tensors`` can tap.

    >>> [n for n, s in graph_tensors("tests/data/ultralytics/yolov8n.onnx") if s == [1, 5, 84]]  # doctest: +SKIP
    ['/model.22/Concat_1_output_0', '/model.22/Sigmoid_output_0']
    """
    if isinstance(model, (str, Path)):
        model = _load_onnx(Path(model))
    shapes = _inferred_shapes(model)
    return [(o, shapes.get(o)) for n in model.graph.node for o in n.output if o]


def _shape_text(shape) -> str:
    return "[?]" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _listing(items: list[tuple[str, list | None]], what: str) -> str:
    if not items:
        return f"{what}: none"
    shown = ", ".join(f"{n} {_shape_text(s)}" for n, s in items[:LISTED])
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"{what}: {shown}{more}"


def _names(tensor: str | tuple[str, ...]) -> tuple[str, ...]:
    return (tensor,) if isinstance(tensor, str) else tuple(tensor)


def _per_candidate(t: torch.Tensor, n_rows: int) -> torch.Tensor | None:
    """``t`` as ``[n_rows, ...]`` (see the module doc for the accepted shapes), or None.

    Rows first wins where both readings fit (``[1, N, N]``): that is how the layouts' own
    outputs and the PyTorch adapters' taps are laid out."""
    shape = tuple(t.shape)
    if t.ndim >= 2 and shape[0] == 1 and shape[1] == n_rows and n_rows != 1:
        return t[0]
    if t.ndim >= 1 and shape[0] == n_rows:
        return t
    if t.ndim >= 3 and shape[0] == 1 and int(np.prod(shape[2:])) == n_rows:
        return t[0].reshape(shape[1], n_rows).T  # channels first: [1, C, N] or [1, C, H, W]
    if t.ndim == 2 and shape[1] == n_rows:
        return t.T
    return None


def _levels_as_rows(values: list[np.ndarray]) -> torch.Tensor | None:
    """Per-level channels-first maps ``[1, C, H_i, W_i]`` (or ``[1, C, n_i]``) as one
    ``[sum n_i, C]`` tensor, levels in order: how a YOLO head concatenates its anchors."""
    pieces = [torch.from_numpy(np.asarray(v)) for v in values]
    if any(p.ndim < 3 or p.shape[0] != 1 or p.shape[1] != pieces[0].shape[1] for p in pieces):
        return None
    return torch.cat([p[0].reshape(p.shape[1], -1).T for p in pieces], dim=0)


class OnnxDetector:
    """A detector exported to ONNX: images in, :class:`Detections` out (see the module doc).

    ``tensors`` maps certood tap points to graph tensor names (or lists of names, concatenated
    along the candidates); ``cls_logits`` is required for the ``two_stage`` layout. ``outputs``
    renames the layout's outputs (``{"rows": "keep_index"}``).
    """

    def __init__(self, path: str | Path, tensors: Mapping[str, str | list[str]], layout: str = "two_stage",
                 *, input_name: str | None = None, outputs: Mapping[str, str] | None = None,
                 num_classes: int | None = None, score_thresh: float = 0.0, nms_thresh: float = 0.5,
                 max_detections: int = 100, activation: str = "softmax", preprocess: str = "resize",
                 batch_size: int = 8, multi_label: bool = False, device: str = "cpu"):
        import onnx
        import onnxruntime as ort

        if layout not in LAYOUTS:
            raise CertoodError(f"unknown ONNX layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
        if activation not in ACTIVATIONS:
            raise CertoodError(f"unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}")
        if activation != "softmax" and layout != "detr":
            raise CertoodError(f"activation {activation!r}: only the detr layout has a choice (the {layout} "
                               "layout's scores are what its graph outputs)")
        if preprocess not in PREPROCESS:
            raise CertoodError(f"unknown preprocess {preprocess!r}; expected one of: {', '.join(PREPROCESS)}")
        self.path = Path(path)
        self._shapes: dict[str, list[int | None]] | None = None
        self.layout, self.activation, self.preprocess = layout, activation, preprocess
        self.batch_size = int(batch_size)  # images per detect() call in extraction (run one at a time)
        self.model = _load_onnx(self.path)
        self.weights_sha256 = file_sha256(self.path)
        self.tensors = {k: v if isinstance(v, str) else tuple(v) for k, v in tensors.items()}
        known_out = LAYOUT_OUTPUTS[layout] + OPTIONAL_OUTPUTS.get(layout, ())
        unknown_out = sorted(set(outputs or {}) - set(known_out))
        if unknown_out:
            raise CertoodError(f"outputs: unknown names {unknown_out} for layout {layout!r}; expected "
                               f"some of: {', '.join(known_out)}")
        self.outputs = self._layout_outputs({k: v for k, v in (outputs or {}).items() if k in LAYOUT_OUTPUTS[layout]})
        self._query_index = (outputs or {}).get("rows")  # rtdetr top-k exports: the query of each row
        if layout == "rtdetr":
            self._discover_rtdetr()
        self.score_thresh, self.nms_thresh, self.max_detections = score_thresh, nms_thresh, max_detections
        if multi_label and layout != "yolo":
            raise CertoodError(f"multi_label: only the yolo layout has per-anchor class scores to split "
                               f"(the {layout} layout's detections come from its graph)")
        self.multi_label = bool(multi_label)
        if layout == "two_stage" and LOGITS_TAP not in self.tensors:
            raise CertoodError(f"layout two_stage: expected a {LOGITS_TAP!r} tensor (per-proposal class "
                               f"logits, background first) among the taps, found: "
                               f"{', '.join(self.tensors) or 'none'}")
        if layout == "two_stage" and not isinstance(self.tensors[LOGITS_TAP], str):
            raise CertoodError(f"layout two_stage: the {LOGITS_TAP!r} tap is one tensor, found a list")
        graph_inputs = [i for i in self.model.graph.input
                        if i.name not in {t.name for t in self.model.graph.initializer}]
        if input_name is None:
            if len(graph_inputs) != 1:
                raise CertoodError(f"{self.path}: expected one graph input (the image), found "
                                   f"{[i.name for i in graph_inputs]}; name it with input_name")
            input_name = graph_inputs[0].name
        self.input_name = input_name
        self._check_names(graph_inputs)
        dims = next(i for i in graph_inputs if i.name == input_name).type.tensor_type.shape.dim
        self.input_size = None
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            self.input_size = (int(dims[2].dim_value), int(dims[3].dim_value))

        tapped = onnx.ModelProto()
        tapped.CopyFrom(self.model)
        present = {o.name for o in tapped.graph.output}
        extra = [n for v in self.tensors.values() for n in _names(v)] + [self._query_index or ""]
        for name in dict.fromkeys(n for n in extra if n):
            if name not in present:
                tapped.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise CertoodError("device cuda: ONNX Runtime has no CUDAExecutionProvider here")
        try:
            self.session = ort.InferenceSession(tapped.SerializeToString(), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise CertoodError(f"{self.path}: ONNX Runtime cannot load the model ({e})") from None
        self._fetch = list(dict.fromkeys(list(self.outputs.values()) + [self._query_index or self.outputs[
            LAYOUT_OUTPUTS[layout][0]]] + [n for v in self.tensors.values() for n in _names(v)]))
        self.tap_points = tuple(dict.fromkeys([*self.tensors, LOGITS_TAP]))
        self._num_classes = num_classes
        self._row_shapes: dict[str, tuple[int, ...]] = {}

    def _layout_outputs(self, renamed: Mapping[str, str]) -> dict[str, str]:
        """Layout output -> graph output: as renamed, else the same name, else (a one-output
        layout on a one-output graph: a stock export's ``output0``) the graph's only output."""
        graph_outputs = [o.name for o in self.model.graph.output]
        wanted = LAYOUT_OUTPUTS[self.layout]
        out = {k: renamed.get(k, k) for k in wanted}
        if len(wanted) == 1 and not renamed and len(graph_outputs) == 1 and out[wanted[0]] not in graph_outputs:
            out[wanted[0]] = graph_outputs[0]
        return out

    def _discover_rtdetr(self) -> None:
        """In ultralytics' top-k export (``[1, R, 6]``: cx, cy, w, h, score, class index, over the
        best (query, class) pairs), find the two tensors the output hides: the query each row
        came from (the indices of the ``GatherElements`` that picks the rows' boxes) and the
        per-query class logits (the input of the ``Sigmoid`` whose flattened output the last
        ``TopK`` ranks). Either one named in ``outputs: {rows: ...}`` / ``tensors: {cls_logits:
        ...}`` wins; neither is needed for the ``[1, Q, 4 + K]`` form."""
        g = self.model.graph
        producers = {o: n for n in g.node for o in n.output}
        if self._query_index is None:
            concat = producers.get(self.outputs["predictions"])
            gather = producers.get(concat.input[0]) if concat is not None and concat.op_type == "Concat" else None
            if gather is not None and gather.op_type == "GatherElements":
                self._query_index = gather.input[1]
        if LOGITS_TAP not in self.tensors:
            for node in reversed([n for n in g.node if n.op_type == "TopK"]):
                source = producers.get(node.input[0])
                while source is not None and source.op_type in ("Flatten", "Reshape"):
                    source = producers.get(source.input[0])
                if source is not None and source.op_type == "Sigmoid":
                    self.tensors[LOGITS_TAP] = source.input[0]
                    break

    def shapes(self) -> dict[str, list[int | None]]:
        """Inferred shapes of the graph's values (cached; for messages and class counts)."""
        if self._shapes is None:
            self._shapes = _inferred_shapes(self.model)
        return self._shapes

    def _check_names(self, graph_inputs) -> None:
        """Every tapped tensor, layout output and the input exist; else one error that lists the
        graph's outputs and the tensors whose names are close to each missing one."""
        import difflib

        names = _value_names(self.model)
        graph_outputs = [o.name for o in self.model.graph.output]
        missing, close = [], {}
        for point, tensor in self.tensors.items():
            for name in _names(tensor):
                if name not in names:
                    missing.append(f"{point} -> {name}")
                    close.update(dict.fromkeys(difflib.get_close_matches(name, sorted(names), n=3)))
        missing += [f"output {v} ({k})" if k != v else f"output {v}"
                    for k, v in self.outputs.items() if v not in graph_outputs]
        if self._query_index is not None and self._query_index not in names:
            missing.append(f"rows -> {self._query_index}")
        if self.input_name not in {i.name for i in graph_inputs}:
            missing.append(f"input {self.input_name}")
        if not missing:
            return
        shapes = self.shapes()
        hint = (f"; rename with outputs: {{{', '.join(f'{k}: ...' for k in self.outputs)}}}"
                if any(v not in graph_outputs for v in self.outputs.values()) else "")
        parts = [_listing([(o, shapes.get(o)) for o in graph_outputs], "graph outputs")]
        if close:
            parts.append(_listing([(n, shapes.get(n)) for n in close], "close tensor names"))
        raise CertoodError(f"{self.path}: the graph has no tensor for: {', '.join(missing)} "
                           f"(layout {self.layout!r}, which reads "
                           f"{', '.join(LAYOUT_OUTPUTS[self.layout])}{hint}); " + "; ".join(parts)
                           + " (certood.detectors.onnx_detector.graph_tensors lists them all)")

    def _candidates_message(self, n_rows: int) -> str:
        shapes = self.shapes()
        produced = [(o, shapes.get(o)) for node in self.model.graph.node for o in node.output if o]
        per_row = [(n, s) for n, s in produced if s and len(s) >= 2
                   and (n_rows in s[:3] or (len(s) >= 3 and s[0] == 1
                                            and None not in s[2:] and int(np.prod(s[2:])) == n_rows))]
        return _listing(per_row, f"tensors with one row per candidate ({n_rows})")

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of classes, background included: the logits' width (two_stage), the
        predictions' class columns + 1 (yolo: attributes are fewer than anchors; rtdetr), the
        width of ``pred_logits`` (detr softmax; + 1 with sigmoid). Read from the graph, else from
        one run on a blank image."""
        if self._num_classes is None:
            self._num_classes = self._infer_num_classes(lambda name: self.shapes().get(name)) or \
                self._infer_num_classes(lambda name: self._dry_run_shapes().get(name))
            if self._num_classes is None:
                raise CertoodError(f"{self.path}: cannot infer the number of classes from the graph; "
                                   "pass num_classes")
        return self._num_classes

    def _infer_num_classes(self, shape_of) -> int | None:
        if self.layout == "rtdetr" and isinstance(self.tensors.get(LOGITS_TAP), str):
            shape = shape_of(self.tensors[LOGITS_TAP])  # [1, Q, K] or [Q, K]
            if shape and shape[-1]:
                return int(shape[-1]) + 1
        if self.layout in ("yolo", "rtdetr"):
            shape = shape_of(self.outputs["predictions"])
            if shape and len(shape) == 3 and shape[1] and shape[2]:
                width = min(shape[1], shape[2]) if self.layout == "yolo" else shape[2]
                return int(width) - 4 + 1
            if LOGITS_TAP in self.tensors and isinstance(self.tensors[LOGITS_TAP], str):
                shape = shape_of(self.tensors[LOGITS_TAP])  # [A, K], [1, A, K] or [1, K, A]
                if shape and all(shape[1:]):
                    return int(min(shape[1:] if len(shape) > 2 else shape[-1:])) + 1
            return None
        if LOGITS_TAP in self.tensors:
            shape = shape_of(self.tensors[LOGITS_TAP])
            if shape and shape[-1]:
                return int(shape[-1])
        if self.layout == "detr":
            shape = shape_of(self.outputs["pred_logits"])
            return int(shape[-1]) + (self.activation == "sigmoid") if shape and shape[-1] else None
        return None

    def _dry_run_shapes(self) -> dict[str, list[int]]:
        if not hasattr(self, "_dry_shapes"):
            h, w = self.input_size or (64, 64)
            try:
                values = self.session.run(self._fetch, {self.input_name: np.zeros((1, 3, h, w), np.float32)})
                self._dry_shapes = {n: list(np.shape(v)) for n, v in zip(self._fetch, values)}
            except Exception:  # noqa: BLE001 - best effort; the caller says what to pass instead
                self._dry_shapes = {}
        return self._dry_shapes

    # ------------------------------------------------------------------ inference
    def _fit_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """The image at the graph's input size, and ``(sx, sy, ox, oy)`` mapping input pixels back
        to the image's: ``x_image = (x_input - ox) * sx``."""
        original = tuple(x.shape[-2:])
        if self.input_size is None or original == self.input_size:
            return x, (1.0, 1.0, 0.0, 0.0)
        (h, w), (H, W) = original, self.input_size
        if self.preprocess == "resize":
            x = F.interpolate(x[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            return x, (w / W, h / H, 0.0, 0.0)
        # letterbox as ultralytics' LetterBox(auto=False, center=True): scale to fit, pad evenly
        r = min(H / h, W / w)
        nh, nw = int(round(h * r)), int(round(w * r))
        top, left = int(round((H - nh) / 2 - 0.1)), int(round((W - nw) / 2 - 0.1))
        canvas = torch.full((x.shape[0], H, W), LETTERBOX_FILL, dtype=x.dtype)
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        canvas[:, top:top + nh, left:left + nw] = x
        return canvas, (1 / r, 1 / r, float(left), float(top))

    def _run(self, image: torch.Tensor):
        original = tuple(image.shape[-2:])
        x, transform = self._fit_input(image.float())
        size = tuple(x.shape[-2:])
        try:
            values = self.session.run(self._fetch, {self.input_name: x[None].contiguous().numpy()})
        except Exception as e:  # noqa: BLE001
            raise CertoodError(f"{self.path}: ONNX Runtime failed on an image of size {original} "
                               f"({type(e).__name__}: {e})") from None
        return dict(zip(self._fetch, values)), size, original, transform

    def _tapped_rows(self, values: dict, point: str, n_rows: int) -> torch.Tensor:
        """Tap ``point`` as ``[n_rows, ...]``, or an error naming the shapes that would fit."""
        tensor = self.tensors[point]
        if isinstance(tensor, str):
            t = torch.from_numpy(np.asarray(values[tensor]))
            rows = _per_candidate(t, n_rows)
            found = tuple(t.shape)
        else:
            rows = _levels_as_rows([values[n] for n in tensor])
            found = tuple(tuple(np.shape(values[n])) for n in tensor)
        if rows is None or rows.shape[0] != n_rows:
            raise CertoodError(
                f"tap {point!r} ({tensor if isinstance(tensor, str) else ', '.join(tensor)}): expected one "
                f"row per candidate ({n_rows}: [N, ...], [1, N, ...], [1, C, N], [1, C, H, W] with H*W = N, "
                f"or a list of [1, C, H_i, W_i] levels of one width C), found shape {found}; "
                + self._candidates_message(n_rows))
        return rows

    def detect(self, images: list[torch.Tensor]) -> list[Detections]:
        """Run on float CHW images in [0, 1]; one :class:`Detections` per image."""
        out = []
        for image in images:
            values, size, original, (sx, sy, ox, oy) = self._run(image.detach().cpu())
            decode = {"two_stage": self._decode_two_stage, "yolo": self._decode_yolo,
                      "rtdetr": self._decode_rtdetr, "detr": self._decode_detr}[self.layout]
            boxes, labels, scores, logits, rows, n_rows = decode(values, size)
            taps = {}
            for point in self.tensors:
                t = self._tapped_rows(values, point, n_rows)
                self._row_shapes[point] = tuple(t.shape[1:])
                taps[point] = t[rows].reshape(len(rows), int(np.prod(t.shape[1:]))).float()
            taps[LOGITS_TAP] = logits.float()  # Detections.logits: background first, every layout
            boxes = (boxes - torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)) \
                * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
            if self.preprocess == "letterbox":  # boxes reaching into the padding end at the image
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, original[1])
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, original[0])
            det = Detections(boxes.float(), labels.long(), scores.float(), logits.float(), taps)
            out.append(det.select(det.scores >= self.score_thresh) if self.score_thresh > 0 else det)
        return out

    def _decode_two_stage(self, values, size):
        o = self.outputs
        boxes = torch.from_numpy(np.asarray(values[o["boxes"]], dtype=np.float32)).reshape(-1, 4)
        labels = torch.from_numpy(np.asarray(values[o["labels"]]).astype(np.int64)).reshape(-1)
        scores = torch.from_numpy(np.asarray(values[o["scores"]], dtype=np.float32)).reshape(-1)
        rows = torch.from_numpy(np.asarray(values[o["rows"]]).astype(np.int64)).reshape(-1)
        logits_all = torch.from_numpy(np.asarray(values[self.tensors[LOGITS_TAP]]))
        n_rows = logits_all.shape[0]
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
            raise CertoodError(f"{self.path}: output {o['rows']} indexes rows "
                               f"{int(rows.min())}..{int(rows.max())} of {n_rows} proposals")
        return boxes, labels, scores, logits_all[rows].float(), rows, n_rows

    def _sigmoid_logits(self, values, class_scores: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Logits of sigmoid-scored candidates ``rows``: the ``cls_logits`` tap (checked to have
        one column per class) or ``logit(score)``, with a background column of zeros first."""
        k = class_scores.shape[1]
        if LOGITS_TAP in self.tensors:
            all_logits = self._tapped_rows(values, LOGITS_TAP, n_rows)
            if all_logits.ndim != 2 or all_logits.shape[1] != k:
                raise CertoodError(f"tap {LOGITS_TAP!r} ({self.tensors[LOGITS_TAP]}): expected {k} class "
                                   f"logits per candidate (the predictions' class columns), found "
                                   f"{tuple(all_logits.shape[1:])} per candidate")
            logits = all_logits[rows].float()
        else:
            logits = torch.logit(class_scores[rows].double(), eps=1e-7).float()
        return torch.cat([torch.zeros(len(rows), 1), logits], dim=1)

    def _decode_yolo(self, values, size):
        from torchvision.ops import batched_nms

        pred = torch.from_numpy(np.asarray(values[self.outputs["predictions"]], dtype=np.float32))
        if pred.ndim == 3 and pred.shape[0] == 1:
            pred = pred[0]
        if pred.ndim != 2:
            raise CertoodError(f"{self.path}: layout yolo: expected predictions [1, 4 + K, A] or "
                               f"[1, A, 4 + K], found {tuple(pred.shape)}")
        k = self.num_classes - 1
        if pred.shape[1] != 4 + k and pred.shape[0] == 4 + k:
            pred = pred.T  # [4 + K, A] -> [A, 4 + K]
        if pred.shape[1] != 4 + k:
            raise CertoodError(f"{self.path}: layout yolo: expected 4 + {k} values per anchor "
                               f"({k + 1} classes incl. background), found predictions of shape "
                               f"{tuple(pred.shape)}")
        n_rows = pred.shape[0]
        cxcywh, class_scores = pred[:, :4], pred[:, 4:]
        boxes = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
        if self.multi_label:  # every (anchor, class) pair above the cut, as ultralytics' val NMS
            rows, cls = torch.nonzero(class_scores >= self.score_thresh, as_tuple=True)
            scores = class_scores[rows, cls]
        else:  # the best class of each anchor, as ultralytics' predict
            scores, cls = class_scores.max(dim=1)
            rows = torch.nonzero(scores >= self.score_thresh).flatten()
            scores, cls = scores[rows], cls[rows]
        keep = batched_nms(boxes[rows], scores, cls, self.nms_thresh)[: self.max_detections]
        rows, cls, scores = rows[keep], cls[keep], scores[keep]
        logits = self._sigmoid_logits(values, class_scores, rows, n_rows)
        return boxes[rows], cls + 1, scores, logits, rows, n_rows

    def _decode_rtdetr(self, values, size):
        pred = torch.from_numpy(np.asarray(values[self.outputs["predictions"]], dtype=np.float32))
        pred = pred[0] if pred.ndim == 3 and pred.shape[0] == 1 else pred
        k = self.num_classes - 1
        topk = pred.ndim == 2 and pred.shape[1] == 6 and self._query_index is not None
        if pred.ndim != 2 or not (topk or pred.shape[1] == 4 + k):
            raise CertoodError(f"{self.path}: layout rtdetr: expected predictions [1, R, 6] (normalised "
                               f"cxcywh, score, class index; ultralytics >= 8.4) or [1, Q, 4 + {k}] "
                               f"(normalised cxcywh, {k} class scores), found {tuple(pred.shape)}")
        if topk:  # rows are (query, class) pairs, best first; taps are per query
            queries = torch.from_numpy(np.asarray(values[self._query_index]).astype(np.int64))
            queries = queries.reshape(pred.shape[0], -1)[:, 0]
            if LOGITS_TAP not in self.tensors:
                raise CertoodError(f"{self.path}: layout rtdetr: no per-query class logits found in the graph; "
                                   "name them with tensors: {cls_logits: ...} ([1, Q, K] before the sigmoid)")
            n_rows = int(np.prod(np.shape(values[self.tensors[LOGITS_TAP]])[:-1]))
            scores, cls = pred[:, 4], pred[:, 5].round().long()
            kept = torch.nonzero(scores >= self.score_thresh).flatten()
            kept = kept[scores[kept].argsort(descending=True, stable=True)][: self.max_detections]
            if len(kept) and (int(queries[kept].min()) < 0 or int(queries[kept].max()) >= n_rows
                              or int(cls[kept].min()) < 0 or int(cls[kept].max()) >= k):
                raise CertoodError(f"{self.path}: layout rtdetr: rows name queries outside 0..{n_rows - 1} "
                                   f"or classes outside 0..{k - 1}")
            rows = queries[kept]
            all_logits = self._tapped_rows(values, LOGITS_TAP, n_rows).float()
            logits = torch.cat([torch.zeros(len(rows), 1), all_logits[rows]], dim=1)
            boxes = _normalised_cxcywh_to_xyxy(pred[kept, :4], size)
            return boxes, cls[kept] + 1, scores[kept], logits, rows, n_rows
        n_rows = pred.shape[0]
        class_scores = pred[:, 4:]
        scores, cls = class_scores.max(dim=1)
        rows = torch.nonzero(scores >= self.score_thresh).flatten()
        rows = rows[scores[rows].argsort(descending=True, stable=True)][: self.max_detections]
        boxes = _normalised_cxcywh_to_xyxy(pred[rows, :4], size)
        logits = self._sigmoid_logits(values, class_scores, rows, n_rows)
        return boxes, cls[rows] + 1, scores[rows], logits, rows, n_rows

    def _decode_detr(self, values, size):
        logits_q = torch.from_numpy(np.asarray(values[self.outputs["pred_logits"]], dtype=np.float32))
        boxes_q = torch.from_numpy(np.asarray(values[self.outputs["pred_boxes"]], dtype=np.float32))
        logits_q = logits_q[0] if logits_q.ndim == 3 else logits_q
        boxes_q = boxes_q[0] if boxes_q.ndim == 3 else boxes_q
        width = "K + 1" if self.activation == "softmax" else "K"
        if logits_q.ndim != 2 or boxes_q.shape != (logits_q.shape[0], 4):
            raise CertoodError(f"{self.path}: layout detr: expected pred_logits [1, Q, {width}] and "
                               f"pred_boxes [1, Q, 4], found {tuple(logits_q.shape)} and "
                               f"{tuple(boxes_q.shape)}")
        n_rows = logits_q.shape[0]
        if self.activation == "softmax":
            probs = logits_q.softmax(dim=-1)[:, :-1]
        else:
            probs = logits_q.sigmoid()
        scores, cls = probs.max(dim=1)
        rows = torch.nonzero(scores >= self.score_thresh).flatten()
        rows = rows[scores[rows].argsort(descending=True, stable=True)][: self.max_detections]
        boxes = _normalised_cxcywh_to_xyxy(boxes_q[rows], size)
        if self.activation == "softmax":
            logits = torch.cat([logits_q[rows, -1:], logits_q[rows, :-1]], dim=1)
        else:
            logits = torch.cat([torch.zeros(len(rows), 1), logits_q[rows]], dim=1)
        return boxes, cls[rows] + 1, scores[rows], logits, rows, n_rows

    # ------------------------------------------------------------------ certificates
    def monitored_head(self, start: str = REGION_TAP) -> nn.Module:
        """The subgraph from the ``start`` tap to ``cls_logits`` as torch modules (onnx2torch).

        It takes the flattened per-box tap ``[N, D]`` (as in :class:`Detections`) and returns
        the logits ``[N, C]``; like the PyTorch adapter's, it is an ``nn.Sequential`` ending with
        the classifier's ``nn.Linear`` when the graph ends with a plain Gemm. Raises when the
        subgraph reads anything besides the tap (then it is not a function of the box's feature).
        """
        if self.layout in ("yolo", "rtdetr"):
            why = ("a one-stage head computes an anchor's logits from a neighbourhood of its feature map"
                   if self.layout == "yolo" else "an RT-DETR query's logits come from attention over the image")
            raise CertoodError(f"layout {self.layout}: no monitored head ({why}); certificates need the "
                               "two_stage or detr layout")
        if not isinstance(self.tensors.get(start, ""), str):
            raise CertoodError(f"{self.path}: monitored head: tap {start!r} is a list of tensors; a head "
                               "starts at one tensor")
        if self.layout == "detr":  # pred_logits, background first (no-object column, or zeros)
            tensors = {**self.tensors, LOGITS_TAP: self.outputs["pred_logits"]}
            head = extract_head(self.model, tensors, start, LOGITS_TAP, self._row_shapes.get(start),
                                str(self.path))
            if not isinstance(head[-1], nn.Linear):
                raise CertoodError(f"{self.path}: layout detr: the class head is not a plain linear layer "
                                   "(Gemm, or MatMul + Add); its columns cannot be put background first")
            head[-1] = _background_first(head[-1], self.activation)
            return head
        return extract_head(self.model, self.tensors, start, LOGITS_TAP, self._row_shapes.get(start),
                            str(self.path))


def _background_first(linear: nn.Linear, activation: str) -> nn.Linear:
    """The class layer with certood's background column first: softmax heads move their last
    ("no object") column first; sigmoid heads get a constant-zero column, as in ``detect``."""
    out = nn.Linear(linear.in_features, linear.out_features + (activation == "sigmoid"))
    with torch.no_grad():
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        if activation == "softmax":
            order = [linear.out_features - 1, *range(linear.out_features - 1)]
            out.weight.copy_(linear.weight[order])
            out.bias.copy_(bias[order])
        else:
            out.weight.copy_(torch.cat([torch.zeros(1, linear.in_features), linear.weight]))
            out.bias.copy_(torch.cat([torch.zeros(1), bias]))
    return out.eval()


def _normalised_cxcywh_to_xyxy(c: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``cx, cy, w, h`` in [0, 1] of an ``(h, w)`` input as xyxy input pixels."""
    h, w = size
    return torch.stack([(c[:, 0] - c[:, 2] / 2) * w, (c[:, 1] - c[:, 3] / 2) * h,
                        (c[:, 0] + c[:, 2] / 2) * w, (c[:, 1] + c[:, 3] / 2) * h], dim=1)


class _Rows(nn.Module):
    """``[N, D]`` -> ``[N, *shape]``: a flattened tap back to the tensor's per-row shape."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _matmul_add_as_linear(node, producers: dict, initializers: dict) -> tuple[nn.Linear, str] | None:
    """``Add(MatMul(A, W), b)`` with constant W ``[D, C]`` and b ``[C]`` (how the exporter writes
    a Linear on 3-D input) as a Linear, and the name of A."""
    from onnx import numpy_helper

    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for mm_name, b_name in (node.input, node.input[::-1]):
        mm = producers.get(mm_name)
        if mm is None or mm.op_type != "MatMul" or b_name not in initializers or mm.input[1] not in initializers:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(initializers[mm.input[1]]).copy())
        bias = torch.from_numpy(numpy_helper.to_array(initializers[b_name]).copy()).reshape(-1)
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            return None
        linear = nn.Linear(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            linear.weight.copy_(weight.T.float())
            linear.bias.copy_(bias.float())
        return linear, mm.input[0]
    return None


def _gemm_as_linear(node, initializers: dict) -> nn.Linear | None:
    """A Gemm ``A B^T + C`` with constant B, C (alpha = beta = 1, A not transposed) as a Linear."""
    from onnx import helper, numpy_helper

    if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    weight = torch.from_numpy(numpy_helper.to_array(initializers[node.input[1]]).copy())
    if weight.ndim != 2:
        return None
    if not attrs.get("transB", 0):
        weight = weight.T
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in initializers:
            return None
        bias = torch.from_numpy(numpy_helper.to_array(initializers[node.input[2]]).copy()).reshape(-1)
        if bias.numel() == 1:
            bias = bias.expand(weight.shape[0]).clone()
        if bias.shape != (weight.shape[0],):
            return None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


def _convert(model, src: str, dst: str, where: str) -> nn.Module:
    """onnx2torch module of the subgraph ``src -> dst``, refused if it reads more than ``src``."""
    import onnx
    from onnx.utils import Extractor

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        sub = Extractor(inferred).extract_model([src], [dst])
    except Exception as e:  # noqa: BLE001
        raise CertoodError(f"{where}: cannot extract the subgraph {src} -> {dst} "
                           f"({type(e).__name__}: {e})") from None
    produced = {o for n in sub.graph.node for o in n.output} | {i.name for i in sub.graph.initializer} | {src}
    needed = sorted({i for n in sub.graph.node for i in n.input if i} - produced)
    if needed:
        raise CertoodError(f"{where}: the subgraph {src} -> {dst} also reads {', '.join(needed)}: it is "
                           "not a function of the region's tap alone, so it cannot be certified")
    from onnx2torch import convert

    try:
        return convert(sub)
    except Exception as e:  # noqa: BLE001 - onnx2torch raises NotImplementedError, KeyError, ...
        raise CertoodError(f"{where}: onnx2torch cannot convert the subgraph {src} -> {dst} "
                           f"({type(e).__name__}: {e})") from None


def extract_head(model, tensors: Mapping[str, str], start: str, end: str = LOGITS_TAP,
                 row_shape: tuple[int, ...] | None = None, where: str = "model") -> nn.Sequential:
    """The subgraph of ``model`` between the tensors of taps ``start`` and ``end`` in torch.

    ``[_Rows(row_shape)] + [onnx2torch module] + [nn.Linear]``: the reshape only when the tap
    is not flat, the Linear when the last node is a plain Gemm (certificates split the head
    there, at the penultimate features).
    """
    for tap in (start, end):
        if tap not in tensors:
            raise CertoodError(f"{where}: monitored head: tap {tap!r} is not mapped to a graph tensor "
                               f"(mapped: {', '.join(tensors) or 'none'})")
    src, dst = tensors[start], tensors[end]
    if row_shape is None:
        shape = _static_shape(model, src)
        if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
            raise CertoodError(f"{where}: the per-box shape of {src} is unknown; run detect() once "
                               "before monitored_head()")
        row_shape = tuple(shape[1:])
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    producer = producers.get(dst)
    linear, body_end = None, dst
    if producer is not None and src != dst:
        linear = _gemm_as_linear(producer, initializers)
        if linear is not None:
            body_end = producer.input[0]
        else:
            found = _matmul_add_as_linear(producer, producers, initializers)
            if found is not None:
                linear, body_end = found
    layers: list[nn.Module] = [_Rows(row_shape)] if len(row_shape) != 1 else []
    if body_end != src:
        layers.append(_convert(model, src, body_end, where))
    if linear is not None:
        layers.append(linear)
    return nn.Sequential(*layers).eval()
