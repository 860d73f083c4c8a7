"""ONNX detectors, run with ONNX Runtime; features tapped by exposing intermediate tensors.

A tap is any named tensor of the graph (``/box_head/Relu_1_output_0``, ...). The adapter adds
each tapped tensor to the graph's outputs (an ONNX value is readable once it is an output),
runs one image at a time, and ties every kept detection to its row of each tapped tensor, so
per-box features mean exactly what they mean in the PyTorch adapters.

Input (every layout): one float32 image ``[1, 3, H, W]``, RGB in [0, 1]; normalisation, if
any, lives inside the graph. With dynamic ``H``/``W`` the image goes in at its own size; with
fixed ones it is resized (bilinear) to them and boxes are mapped back to the original pixels.

Layouts (``layout=``), i.e. which graph outputs the adapter reads and how rows are tied:

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

``yolo`` (one-stage, NMS outside the graph)
    output ``predictions`` float ``[1, A, 4 + K]`` (or ``[1, 4 + K, A]``, as YOLOv8 exports it):
    per anchor/location ``a``, the box ``cx, cy, w, h`` in input pixels and ``K`` per-class
    scores in [0, 1] (sigmoid probabilities; objectness already multiplied in). The adapter keeps
    anchors whose best class score is >= ``score_thresh``, runs class-wise NMS (``nms_thresh``)
    and keeps ``max_detections``; a detection's row is its anchor ``a``. Tapped tensors have one
    row per anchor, ``[A, ...]`` or ``[1, A, ...]``. Logits: the ``cls_logits`` tap ``[A, K]``
    when given (the class logits before the sigmoid), else ``logit(score)``; a background
    column of zeros is put first, so labels are 1..K as everywhere in certood.

``detr`` (set prediction, no NMS)
    outputs ``pred_logits`` float ``[1, Q, K + 1]`` (the "no object" class last) and
    ``pred_boxes`` float ``[1, Q, 4]`` (``cx, cy, w, h`` normalised to [0, 1] of the input).
    Per query, score = max foreground softmax probability, label = its class + 1; queries with
    score >= ``score_thresh`` are kept (best ``max_detections``), row = query. Logits are
    ``pred_logits`` with the no-object column moved first (certood's background-first
    convention); tapped tensors have one row per query, ``[Q, ...]`` or ``[1, Q, ...]``.

Every tapped tensor is flattened per row, ``[N, D]``, in :class:`Detections`; the
``cls_logits`` tap is always there and equals the detections' logits (background first).
The spec names the tensors under ``detector.tensors`` (tap point -> graph tensor name; list a
graph's names with ``[n.output[0] for n in onnx.load(path).graph.node]``).

``monitored_head(start)`` extracts the subgraph from the ``start`` tap to the logits (two_stage:
the ``cls_logits`` tensor; detr: ``pred_logits``, columns reordered background first) and
converts it with onnx2torch: an ``nn.Sequential`` ending with the classifier as ``nn.Linear``
when the graph ends with a Gemm (or MatMul + Add), so certificates bound the same function ONNX
Runtime runs. The yolo layout has none (an anchor's logits come from a neighbourhood).

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

LAYOUTS = ("two_stage", "yolo", "detr")
LAYOUT_OUTPUTS = {
    "two_stage": ("boxes", "labels", "scores", "rows"),
    "yolo": ("predictions",),
    "detr": ("pred_logits", "pred_boxes"),
}
LOGITS_TAP = "cls_logits"
REGION_TAP = "box_head.input"


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


def _static_shape(model, name: str) -> list[int | None] | None:
    """The shape of value ``name`` by ONNX shape inference (None for unknown dims)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is best effort
        return None
    g = inferred.graph
    for info in list(g.value_info) + list(g.output) + list(g.input):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None
                    for d in info.type.tensor_type.shape.dim]
    return None


def _rows_first(t: torch.Tensor, n_rows: int, name: str, tensor: str) -> torch.Tensor:
    """A tapped tensor as ``[R, ...]``: a leading batch dimension of 1 is dropped."""
    if t.ndim >= 2 and t.shape[0] == 1 and t.shape[1] == n_rows and n_rows != 1:
        t = t[0]
    if t.ndim == 0 or t.shape[0] != n_rows:
        raise CertoodError(f"tap {name!r} ({tensor}): expected one row per candidate ({n_rows}), "
                           f"found shape {tuple(t.shape)}")
    return t


class OnnxDetector:
    """A detector exported to ONNX: images in, :class:`Detections` out (see the module doc).

    ``tensors`` maps certood tap points to graph tensor names; ``cls_logits`` is required for
    the ``two_stage`` layout. ``outputs`` renames the layout's outputs
    (``{"rows": "keep_index"}``).
    """

    def __init__(self, path: str | Path, tensors: Mapping[str, str], layout: str = "two_stage",
                 *, input_name: str | None = None, outputs: Mapping[str, str] | None = None,
                 num_classes: int | None = None, score_thresh: float = 0.0, nms_thresh: float = 0.5,
                 max_detections: int = 100, device: str = "cpu"):
        import onnx
        import onnxruntime as ort

        if layout not in LAYOUTS:
            raise CertoodError(f"unknown ONNX layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
        self.path = Path(path)
        self.layout = layout
        self.model = _load_onnx(self.path)
        self.weights_sha256 = file_sha256(self.path)
        self.tensors = dict(tensors)
        self.outputs = {k: (outputs or {}).get(k, k) for k in LAYOUT_OUTPUTS[layout]}
        unknown_out = sorted(set(outputs or {}) - set(LAYOUT_OUTPUTS[layout]))
        if unknown_out:
            raise CertoodError(f"outputs: unknown names {unknown_out} for layout {layout!r}; expected "
                               f"some of: {', '.join(LAYOUT_OUTPUTS[layout])}")
        self.score_thresh, self.nms_thresh, self.max_detections = score_thresh, nms_thresh, max_detections
        if layout == "two_stage" and LOGITS_TAP not in self.tensors:
            raise CertoodError(f"layout two_stage: expected a {LOGITS_TAP!r} tensor (per-proposal class "
                               f"logits, background first) among the taps, found: "
                               f"{', '.join(self.tensors) or 'none'}")
        graph_inputs = [i for i in self.model.graph.input
                        if i.name not in {t.name for t in self.model.graph.initializer}]
        if input_name is None:
            if len(graph_inputs) != 1:
                raise CertoodError(f"{self.path}: expected one graph input (the image), found "
                                   f"{[i.name for i in graph_inputs]}; name it with input_name")
            input_name = graph_inputs[0].name
        self.input_name = input_name
        names = _value_names(self.model)
        missing = [f"{k} -> {v}" for k, v in self.tensors.items() if v not in names]
        missing += [f"output {v}" for v in self.outputs.values()
                    if v not in {o.name for o in self.model.graph.output}]
        if input_name not in {i.name for i in graph_inputs}:
            missing.append(f"input {input_name}")
        if missing:
            raise CertoodError(f"{self.path}: the graph has no tensor for: {', '.join(missing)} "
                               f"(layout {layout!r}; see certood.detectors.onnx_detector)")
        dims = next(i for i in graph_inputs if i.name == input_name).type.tensor_type.shape.dim
        self.input_size = None
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            self.input_size = (int(dims[2].dim_value), int(dims[3].dim_value))

        tapped = onnx.ModelProto()
        tapped.CopyFrom(self.model)
        present = {o.name for o in tapped.graph.output}
        for name in dict.fromkeys(self.tensors.values()):
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
        self._fetch = list(dict.fromkeys(list(self.outputs.values()) + list(self.tensors.values())))
        self.tap_points = tuple(dict.fromkeys([*self.tensors, LOGITS_TAP]))
        self._num_classes = num_classes
        self._row_shapes: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of classes, background included: the logits' width (two_stage), the tapped
        logits' or the predictions' width + 1 (yolo: attributes are fewer than anchors), the
        width of ``pred_logits`` (detr). Read from the graph, else from one run on a blank image."""
        if self._num_classes is None:
            self._num_classes = self._infer_num_classes(_static_shape) or \
                self._infer_num_classes(lambda model, name: self._dry_run_shapes().get(name))
            if self._num_classes is None:
                raise CertoodError(f"{self.path}: cannot infer the number of classes from the graph; "
                                   "pass num_classes")
        return self._num_classes

    def _infer_num_classes(self, shape_of) -> int | None:
        if LOGITS_TAP in self.tensors:
            shape = shape_of(self.model, self.tensors[LOGITS_TAP])
            if shape and shape[-1]:
                return int(shape[-1]) + (self.layout == "yolo")
        if self.layout == "detr":
            shape = shape_of(self.model, self.outputs["pred_logits"])
            return int(shape[-1]) if shape and shape[-1] else None
        if self.layout == "yolo":
            shape = shape_of(self.model, self.outputs["predictions"])
            if shape and len(shape) == 3 and shape[1] and shape[2]:
                return int(min(shape[1], shape[2])) - 4 + 1
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
    def _run(self, image: torch.Tensor) -> tuple[dict[str, np.ndarray], tuple[int, int], tuple[int, int]]:
        original = tuple(image.shape[-2:])
        x = image.float()
        if self.input_size is not None and original != self.input_size:
            x = F.interpolate(x[None], size=self.input_size, mode="bilinear", align_corners=False)[0]
        size = tuple(x.shape[-2:])
        try:
            values = self.session.run(self._fetch, {self.input_name: x[None].contiguous().numpy()})
        except Exception as e:  # noqa: BLE001
            raise CertoodError(f"{self.path}: ONNX Runtime failed on an image of size {original} "
                               f"({type(e).__name__}: {e})") from None
        return dict(zip(self._fetch, values)), size, original

    def detect(self, images: list[torch.Tensor]) -> list[Detections]:
        """Run on float CHW images in [0, 1]; one :class:`Detections` per image."""
        out = []
        for image in images:
            values, size, original = self._run(image.detach().cpu())
            decode = {"two_stage": self._decode_two_stage, "yolo": self._decode_yolo,
                      "detr": self._decode_detr}[self.layout]
            boxes, labels, scores, logits, rows, n_rows = decode(values, size)
            taps = {}
            for point, tensor in self.tensors.items():
                t = _rows_first(torch.from_numpy(np.asarray(values[tensor])), n_rows, point, tensor)
                self._row_shapes[point] = tuple(t.shape[1:])
                taps[point] = t[rows].reshape(len(rows), int(np.prod(t.shape[1:]))).float()
            taps[LOGITS_TAP] = logits.float()  # Detections.logits: background first, every layout
            ry, rx = original[0] / size[0], original[1] / size[1]
            boxes = boxes * torch.tensor([rx, ry, rx, ry], dtype=boxes.dtype)
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

    def _decode_yolo(self, values, size):
        from torchvision.ops import batched_nms

        pred = torch.from_numpy(np.asarray(values[self.outputs["predictions"]], dtype=np.float32))
        if pred.ndim == 3 and pred.shape[0] == 1:
            pred = pred[0]
        if pred.ndim != 2:
            raise CertoodError(f"{self.path}: layout yolo: expected predictions [1, A, 4 + K], "
                               f"found {tuple(pred.shape)}")
        k = self.num_classes - 1
        if pred.shape[1] != 4 + k and pred.shape[0] == 4 + k:
            pred = pred.T  # [4 + K, A] -> [A, 4 + K]
        if pred.shape[1] != 4 + k:
            raise CertoodError(f"{self.path}: layout yolo: expected 4 + {k} values per anchor, "
                               f"found predictions of shape {tuple(pred.shape)}")
        n_rows = pred.shape[0]
        cxcywh, class_scores = pred[:, :4], pred[:, 4:]
        boxes = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
        scores, cls = class_scores.max(dim=1)
        rows = torch.nonzero(scores >= self.score_thresh).flatten()
        keep = batched_nms(boxes[rows], scores[rows], cls[rows], self.nms_thresh)[: self.max_detections]
        rows = rows[keep]
        if LOGITS_TAP in self.tensors:
            logits = _rows_first(torch.from_numpy(np.asarray(values[self.tensors[LOGITS_TAP]])), n_rows,
                                 LOGITS_TAP, self.tensors[LOGITS_TAP])[rows].float()
        else:
            logits = torch.logit(class_scores[rows].double(), eps=1e-7).float()
        logits = torch.cat([torch.zeros(len(rows), 1), logits], dim=1)
        return boxes[rows], cls[rows] + 1, scores[rows], logits, rows, n_rows

    def _decode_detr(self, values, size):
        logits_q = torch.from_numpy(np.asarray(values[self.outputs["pred_logits"]], dtype=np.float32))
        boxes_q = torch.from_numpy(np.asarray(values[self.outputs["pred_boxes"]], dtype=np.float32))
        logits_q = logits_q[0] if logits_q.ndim == 3 else logits_q
        boxes_q = boxes_q[0] if boxes_q.ndim == 3 else boxes_q
        if logits_q.ndim != 2 or boxes_q.shape != (logits_q.shape[0], 4):
            raise CertoodError(f"{self.path}: layout detr: expected pred_logits [1, Q, K + 1] and "
                               f"pred_boxes [1, Q, 4], found {tuple(logits_q.shape)} and "
                               f"{tuple(boxes_q.shape)}")
        n_rows = logits_q.shape[0]
        probs = logits_q.softmax(dim=-1)[:, :-1]
        scores, cls = probs.max(dim=1)
        rows = torch.nonzero(scores >= self.score_thresh).flatten()
        rows = rows[scores[rows].argsort(descending=True, stable=True)][: self.max_detections]
        h, w = size
        c = boxes_q[rows]
        boxes = torch.stack([(c[:, 0] - c[:, 2] / 2) * w, (c[:, 1] - c[:, 3] / 2) * h,
                             (c[:, 0] + c[:, 2] / 2) * w, (c[:, 1] + c[:, 3] / 2) * h], dim=1)
        logits = torch.cat([logits_q[rows, -1:], logits_q[rows, :-1]], dim=1)
        return boxes, cls[rows] + 1, scores[rows], logits, rows, n_rows

    # ------------------------------------------------------------------ certificates
    def monitored_head(self, start: str = REGION_TAP) -> nn.Module:
        """The subgraph from the ``start`` tap to ``cls_logits`` as torch modules (onnx2torch).

        It takes the flattened per-box tap ``[N, D]`` (as in :class:`Detections`) and returns
        the logits ``[N, C]``; like the PyTorch adapter's, it is an ``nn.Sequential`` ending with
        the classifier's ``nn.Linear`` when the graph ends with a plain Gemm. Raises when the
        subgraph reads anything besides the tap (then it is not a function of the box's feature).
        """
        if self.layout == "yolo":
            raise CertoodError("layout yolo: no monitored head (a one-stage head computes an anchor's "
                               "logits from a neighbourhood of its feature map); certificates need the "
                               "two_stage or detr layout")
        if self.layout == "detr":  # pred_logits, with the no-object column moved first
            tensors = {**self.tensors, LOGITS_TAP: self.outputs["pred_logits"]}
            head = extract_head(self.model, tensors, start, LOGITS_TAP, self._row_shapes.get(start),
                                str(self.path))
            if not isinstance(head[-1], nn.Linear):
                raise CertoodError(f"{self.path}: layout detr: the class head is not a plain linear layer "
                                   "(Gemm, or MatMul + Add); its columns cannot be put background first")
            order = [head[-1].out_features - 1, *range(head[-1].out_features - 1)]
            with torch.no_grad():
                head[-1].weight.copy_(head[-1].weight[order].clone())
                if head[-1].bias is not None:
                    head[-1].bias.copy_(head[-1].bias[order].clone())
            return head
        return extract_head(self.model, self.tensors, start, LOGITS_TAP, self._row_shapes.get(start),
                            str(self.path))


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
