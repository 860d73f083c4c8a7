"""Re-verify stored certificates independently: ``certood recheck RESULTS_DIR``.

``certood check`` writes, beside boxes.jsonl, ``certify_features.safetensors``: the features
of every certified box at the certify tap (key ``box/<index>``, the box's line in
boxes.jsonl, 0-based), the monitored head as Linear/ReLU layers (``head/<i>/weight``,
``head/<i>/bias``), every score's fitted tensors (``score/<name>/<tensor>``) and, in the
metadata, the taps, scores, rule, thresholds and certify options. The recheck needs nothing
else: no detector, no spec, no auto_LiRPA.

For each certified box it recomputes the score bounds in float64 with certood's own bound
code (``certood.verifiers.reference``): IBP first, then CROWN for what IBP is too loose to
prove, decides the rule again and compares. It also checks, per box, that

- the stored verdict follows from the stored score bounds (the rule decision itself);
- the box's own scores, recomputed in float64 from its feature, lie inside the stored bounds;
- the stored bounds meet the recomputed ones (both contain the true range);
- a stored radius is re-verified at that radius.

Outcomes: ``confirmed`` (re-proven, every check passes), ``unconfirmed`` (nothing
contradicts the certificate, but the float64 reference could not re-prove it: a tighter
method, alpha-CROWN, made it), ``contradicted`` (a check failed). Any box not confirmed is
a disagreement.
"""
from __future__ import annotations

import json
import math
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from certood.errors import ArtifactError, CertoodError

FEATURES_FILE = "certify_features.safetensors"
FORMAT = "certood-certify-features"
FORMAT_VERSION = 1


def certify_features_blob(monitor, head: nn.Module, options, features: dict[int, Tensor],
                          detector_sha256: str = "") -> bytes:
    """The bytes of ``certify_features.safetensors`` (see the module docstring)."""
    from safetensors.torch import save

    from certood.verifiers.reference import mlp_layers

    tensors = {f"box/{i}": f.detach().cpu().float().contiguous().flatten() for i, f in features.items()}
    try:
        layers = mlp_layers(head)
    except CertoodError:
        layers = None  # not an MLP: the recheck will say so
    kinds = []
    for i, layer in enumerate(layers or []):
        kinds.append(layer[0])
        if layer[0] == "linear":
            tensors[f"head/{i}/weight"] = layer[1].float().contiguous()
            tensors[f"head/{i}/bias"] = layer[2].float().contiguous()
    spec = monitor.spec
    for name, score in monitor.scores.items():
        for key, t in score.state_tensors().items():
            tensors[f"score/{name}/{key}"] = t.detach().cpu().contiguous()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "detector_sha256": detector_sha256,
        "taps": dict(spec.taps), "rule": spec.rule.source, "thresholds": dict(monitor.thresholds),
        "class_thresholds": {k: [float(x) for x in v]
                             for k, v in (getattr(monitor, "class_thresholds", None) or {}).items()},
        "scores": {n: {"kind": s.kind, "tap": s.tap, "params": monitor.scores[n].params()}
                   for n, s in spec.scores.items()},
        "certify": asdict(options), "head_layers": kinds if layers is not None else None,
    }
    return save(tensors, metadata={"certood": json.dumps(meta)})


@dataclass(frozen=True)
class BoxRecheck:
    index: int
    dataset: str
    verdict: str
    outcome: str  # confirmed | unconfirmed | contradicted
    by: str | None = None  # the method that re-proved it
    detail: str = ""


@dataclass
class RecheckReport:
    results_dir: Path
    boxes: list[BoxRecheck] = field(default_factory=list)
    n_boxes: int = 0  # boxes in boxes.jsonl

    @property
    def counts(self) -> dict[str, int]:
        out = {"confirmed": 0, "unconfirmed": 0, "contradicted": 0}
        for b in self.boxes:
            out[b.outcome] += 1
        return out

    @property
    def ok(self) -> bool:
        return all(b.outcome == "confirmed" for b in self.boxes)

    def passes(self, allow_unconfirmed: bool = False) -> bool:
        """Every certificate re-proven; with ``allow_unconfirmed``, none contradicted (boxes the
        float64 IBP/CROWN re-check is too loose for, e.g. alpha-CROWN certificates, pass)."""
        return self.counts["contradicted"] == 0 if allow_unconfirmed else self.ok

    def to_json(self) -> dict:
        return {"results_dir": str(self.results_dir), "n_boxes": self.n_boxes,
                "n_certified": len(self.boxes), "counts": self.counts, "ok": self.ok,
                "confirmed_by": {m: sum(b.by == m for b in self.boxes) for m in ("ibp", "crown")},
                "disagreements": [asdict(b) for b in self.boxes if b.outcome != "confirmed"]}


def _load(results_dir: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load

    boxes_path, feats_path = results_dir / "boxes.jsonl", results_dir / FEATURES_FILE
    try:
        lines = boxes_path.read_text(encoding="utf-8").splitlines()
        blob = feats_path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{results_dir}: cannot read {Path(e.filename or '').name or 'results'} "
                            f"({e.strerror or e}); run `certood check` with a certify block first") from None
    try:
        records = [json.loads(line) for line in lines if line.strip()]
    except ValueError as e:
        raise ArtifactError(f"{boxes_path}: not JSON lines ({e})") from None
    try:
        tensors = load(blob)
        from safetensors import safe_open  # metadata

        with safe_open(str(feats_path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("certood", "null"))
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtifactError(f"{feats_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{feats_path}: expected a {FORMAT} v{FORMAT_VERSION} file")
    return records, tensors, meta


def _rebuild(meta: dict, tensors: dict[str, Tensor]):
    from certood.certify import bounder_for
    from certood.scores import build_score
    from certood.spec.model import CertifySpec, ScoreSpec
    from certood.spec.rule import parse_rule

    if meta.get("head_layers") is None:
        raise CertoodError("recheck: the monitored head is not a Linear/ReLU network; it cannot be "
                           "rechecked from the stored file")
    modules: list[nn.Module] = []
    for i, kind in enumerate(meta["head_layers"]):
        if kind == "relu":
            modules.append(nn.ReLU())
        else:
            w, b = tensors[f"head/{i}/weight"].double(), tensors[f"head/{i}/bias"].double()
            lin = nn.Linear(w.shape[1], w.shape[0]).double()
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            modules.append(lin)
    head = nn.Sequential(*modules).eval()
    scores = {}
    for name, s in meta["scores"].items():
        if bounder_for(s["kind"]) is None:
            scores[name] = None  # never bounded: only its kind matters
            continue
        score = build_score(s["kind"], s["params"])
        prefix = f"score/{name}/"
        score.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        scores[name] = score
    spec = types.SimpleNamespace(
        taps=meta["taps"], rule=parse_rule(meta["rule"]),
        scores={n: ScoreSpec(kind=s["kind"], tap=s["tap"], params=s["params"]) for n, s in meta["scores"].items()})
    return spec, scores, head, CertifySpec(**meta["certify"])


def _point_scores(spec, scores, head: nn.Module, point: str, z: Tensor, stored: dict[str, float]) -> dict[str, float]:
    """The box's own scores recomputed in float64 from its feature (stored ones for scores
    read before the tap or without a bound)."""
    from certood.certify import TAP_ORDER, split_head

    prefix, classifier = split_head(head)
    with torch.no_grad():
        h = prefix(z) if classifier is not None else None
        logits = classifier(h) if classifier is not None else head(z)
    feats = {point: z, "box_head.output": h if h is not None else z, "cls_logits": logits[:, 1:]}
    out = {}
    for name, s in spec.scores.items():
        p = spec.taps[s.tap]
        if scores[name] is None or TAP_ORDER.index(p) < TAP_ORDER.index(point):
            out[name] = float(stored[name])
        else:
            out[name] = float(scores[name].score(feats[p] if p != point else z)[0])
    return out


def recheck(results_dir: str | Path, methods: tuple[str, ...] = ("ibp", "crown")) -> RecheckReport:
    """Re-verify every certified box of a ``certood check`` output directory (see module doc)."""
    from certood.certify import Certifier, reference_backend

    results_dir = Path(results_dir)
    records, tensors, meta = _load(results_dir)
    spec, scores, head, options = _rebuild(meta, tensors)
    thresholds = {k: float(v) for k, v in meta["thresholds"].items()}
    point = spec.taps[options.tap]
    report = RecheckReport(results_dir, n_boxes=len(records))
    certified = [(i, r) for i, r in enumerate(records)
                 if isinstance(r.get("certificate"), dict) and r["certificate"].get("verdict") != "undecided"]
    if not certified:
        return report
    some = next(f"box/{i}" for i, _ in certified if f"box/{i}" in tensors) if any(
        f"box/{i}" in tensors for i, _ in certified) else None
    if some is None:
        for i, r in certified:
            report.boxes.append(BoxRecheck(i, r.get("dataset", ""), r["certificate"]["verdict"], "contradicted",
                                           detail=f"no stored feature box/{i}"))
        return report
    dim = tensors[some].numel()
    class_thresholds = meta.get("class_thresholds") or {}
    certifiers = {m: Certifier(spec, scores, thresholds, head, options, dim, reference_backend(m), class_thresholds)
                  for m in methods}
    any_certifier = certifiers[methods[0]]
    for i, r in certified:
        cert = r["certificate"]
        verdict = cert["verdict"]
        key = f"box/{i}"
        if key not in tensors:
            report.boxes.append(BoxRecheck(i, r.get("dataset", ""), verdict, "contradicted",
                                           detail=f"no stored feature {key}"))
            continue
        z = tensors[key].double().reshape(1, -1)
        stored_scores = r.get("scores", {})
        values = {n: torch.tensor([float(stored_scores.get(n, math.nan))], dtype=torch.float64) for n in spec.scores}
        flags = torch.tensor([bool(r.get("flag"))])
        labels = torch.tensor([int(r.get("label", 0))])
        problems = _consistency(any_certifier, spec, scores, head, point, z, cert, stored_scores, labels)
        by = None
        fresh: dict[str, tuple[float, float]] = {}
        for m in methods:
            ok, bounds = _proves(certifiers[m], z, values, flags, float(cert["eps"]), verdict, labels)
            fresh = bounds
            if ok:
                by = m
                break
        problems += _overlap(cert, fresh)
        why = (f"float64 {'/'.join(methods)} bounds too loose to re-prove {verdict} "
               f"(certified with {cert.get('method')})")
        if by is not None and cert.get("radius"):
            if not any(_proves(certifiers[m], z, values, flags, float(cert["radius"]), verdict, labels)[0]
                       for m in methods):
                by, why = None, f"radius {cert['radius']:.6g} not re-proven by float64 {'/'.join(methods)}"
        if problems:
            report.boxes.append(BoxRecheck(i, r.get("dataset", ""), verdict, "contradicted", by, "; ".join(problems)))
        elif by is None:
            report.boxes.append(BoxRecheck(i, r.get("dataset", ""), verdict, "unconfirmed", None, why))
        else:
            report.boxes.append(BoxRecheck(i, r.get("dataset", ""), verdict, "confirmed", by))
    return report


def _proves(certifier, z, values, flags, eps: float, verdict: str, labels) -> tuple[bool, dict]:
    bounds = certifier.score_bounds(z, eps, values)
    verdicts, _, reasons = certifier.decide(bounds, labels)
    verdicts, _ = certifier._self_check(verdicts, reasons, bounds, values, flags)
    return verdicts[0] == verdict, {k: (float(lo[0]), float(hi[0])) for k, (lo, hi) in bounds.items()}


def _stored_bounds(cert: dict) -> dict[str, tuple[float, float]]:
    out = {}
    for name, (lo, hi) in cert.get("score_bounds", {}).items():
        out[name] = (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
    return out


def _consistency(certifier, spec, scores, head, point, z, cert, stored_scores, labels) -> list[str]:
    problems = []
    stored = _stored_bounds(cert)
    missing = sorted(set(spec.scores) - set(stored))
    if missing:
        return [f"no stored bounds for {', '.join(missing)}"]
    bounds = {k: (torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64))
              for k, (lo, hi) in stored.items()}
    verdicts, _, _ = certifier.decide(bounds, labels)
    if verdicts[0] != cert["verdict"]:
        problems.append(f"the stored bounds give {verdicts[0]}, not {cert['verdict']}")
    own = _point_scores(spec, scores, head, point, z, stored_scores)
    for name, v in own.items():
        lo, hi = stored[name]
        if not (lo <= v <= hi):
            problems.append(f"own {name} score {v:.6g} (float64) outside stored bounds [{lo:.6g}, {hi:.6g}]")
    return problems


def _overlap(cert, fresh: dict[str, tuple[float, float]]) -> list[str]:
    stored = _stored_bounds(cert)
    out = []
    for name, (lo, hi) in fresh.items():
        slo, shi = stored.get(name, (-math.inf, math.inf))
        if hi < slo or lo > shi:
            out.append(f"{name}: stored bounds [{slo:.6g}, {shi:.6g}] miss the recomputed [{lo:.6g}, {hi:.6g}]")
    return out


def render_text(report: RecheckReport) -> str:
    c = report.counts
    lines = [f"{len(report.boxes)} certified box(es) of {report.n_boxes} rechecked in float64: "
             f"{c['confirmed']} confirmed, {c['unconfirmed']} unconfirmed, {c['contradicted']} contradicted"]
    for b in report.boxes:
        if b.outcome != "confirmed":
            lines.append(f"  box {b.index} ({b.dataset}, {b.verdict}): {b.outcome}: {b.detail}")
    lines.append("all certificates re-verified" if report.ok else "DISAGREEMENT: not every certificate re-verified")
    return "\n".join(lines) + "\n"
