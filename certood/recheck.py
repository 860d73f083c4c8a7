"""Re-prove stored certificates independently: ``certood recheck RESULTS_DIR``.

A certificate in boxes.jsonl is a claim: *over the region* ``||z' - z||_norm <= eps`` *(with*
``z' >= 0`` *for domain nonnegative) around this box's feature at tap* ``tap``, *the scores lie
in* ``score_bounds`` *and the rule's verdict is* ``verdict`` (and, with ``radius``, the verdict
also holds at that radius). The recheck re-proves that claim, as written, against the
detector and the monitor the results were made with -- not against copies that could have
been altered.

What ``certood check`` writes for it (``certify_features.safetensors``): the feature of every
certified box at the certify tap (``box/<index>``, the box's line in boxes.jsonl, 0-based),
the monitored head as Linear/ReLU layers (``head/<i>/weight``, ``head/<i>/bias``), every
score's fitted tensors (``score/<name>/<tensor>``) and, in the metadata, the detector (its
spec block and weights sha256), the monitor directory, the data sets, the taps, scores,
rule, thresholds, certify options, a sha256 of each tensor group and a manifest sha256 over
all of that (:func:`features_blob`).

What is checked:

1. *Sources.* The manifest sha256 and the group hashes are recomputed. The detector is
   loaded from its recorded spec block: its weights sha256 must be the one recorded (and the
   monitor's), and the head tensors taken from it must hash to the stored ones. The monitor
   directory (``monitor/`` of the results, or the ``--monitor`` directory of the check):
   scores.safetensors must match its manifest's sha256 and the stored score tensors,
   ``manifest.json`` thresholds, class thresholds, detector threshold and score kinds must
   be those the certificates were made under, and metrics.json must say the same rule,
   certify options and verdict counts; a box whose feature is stored (the check certified
   it) must still be certified in boxes.jsonl. Any mismatch is a disagreement naming both
   sides (hashes or values). The re-proof itself always uses the detector's head and the
   monitor's tensors and thresholds, never the stored copies.
2. *The claim on file.* A certificate's eps, norm, domain, tap, method and exact must be the
   check's certify options (a certificate claiming another region, another domain or
   another method was not produced by that check).
3. *The box.* Its stored feature must be finite, of the head's width and, for domain
   nonnegative, nonnegative; the box's own scores recomputed from it in float64 must be the
   ones boxes.jsonl records (relative 1e-4 + absolute 1e-5 * (1 + |score|), float32 vs
   float64), its flag the rule's on those scores under the monitor's thresholds.
4. *The stored bounds.* They must decide the claimed verdict (with the stored margin) and
   contain the box's own scores.
5. *The re-proof.* The score bounds are recomputed in float64 with certood's own bound code
   (``certood.verifiers.reference``; IBP and CROWN, intersected), the rule is decided under
   them (z3 when the certificate says ``exact: z3``), and the verdict must be the claimed one;
   the stored bounds must contain the re-proven ones (a stored interval narrower than what
   the recheck proves, by more than :data:`BOUND_SLACK` relative, was not proven); a stored
   radius is re-proven at that radius.
6. *From the images* (``from_images``): the detector is run again on every image that has a
   certified box; each such box is found among the detections (same label, box within
   :data:`BOX_TOLERANCE_PX`) and its feature at the certify tap must equal the stored one to
   :data:`FEATURE_RTOL` / :data:`FEATURE_ATOL` (float32 re-runs in other batches differ in
   the last bits); scores read before the certify tap are compared with the record too.

Outcomes per box: ``confirmed`` (every check passes), ``unconfirmed`` (only for methods
tighter than the recheck's CROWN, alpha-CROWN and branch and bound: nothing contradicts it, but the float64
re-proof, or the stored bounds' containment, fails where the tighter method may succeed) and
``contradicted`` (any check failed). With ``allow_unconfirmed`` the recheck attacks every
unconfirmed certificate (``certood.verifiers.attack``: samples, then PGD on the rule's
margin and on each score, in float64): a point whose flag contradicts the verdict, or whose
scores leave the stored bounds, makes it contradicted; one that survives passes.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import stat
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from certood.errors import ArtifactError, CertoodError

FEATURES_FILE = "certify_features.safetensors"
FORMAT = "certood-certify-features"
FORMAT_VERSION = 2
MONITOR_SUBDIR = "monitor"  # where `certood check` saves the monitor it calibrates
MAX_FILE_BYTES = 2 * 2**30  # boxes.jsonl, the features file, metrics.json: refused above this
SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-5  # record (float32) vs float64 recompute: |d| <= rtol|s| + atol(1+|s|)
FEATURE_RTOL, FEATURE_ATOL = 1e-4, 1e-5  # --from-images: |z_new - z| <= atol + rtol |z| per coordinate
BOUND_SLACK = 1e-6  # stored bounds may be narrower than the re-proven ones by this * (1 + |b|)
BOX_TOLERANCE_PX = 0.02  # --from-images: boxes.jsonl rounds coordinates to 0.01 px
TIGHTER_METHODS = ("alpha-crown", "bab")  # methods that may prove what the recheck's CROWN cannot
RECHECK_METHODS = ("ibp", "crown")
ATTACK = {"n_samples": 200, "steps": 30, "restarts": 2, "seed": 0}  # --allow-unconfirmed
CLAIM_FIELDS = ("eps", "norm", "domain", "method", "exact")
TEXT_BOX_LINES = 50  # text output lists this many disagreeing boxes (json: all)


# --- writing: the features file ------------------------------------------------------------------
def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order: the same for
    the same tensors whatever file (or order) they come from."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def head_tensors(head: nn.Module) -> tuple[list[str] | None, dict[str, Tensor]]:
    """``(layer kinds, {head/<i>/weight|bias: float32})`` of a Linear/ReLU head, as the
    features file stores it; ``(None, {})`` for another network (not recheckable)."""
    from certood.verifiers.reference import mlp_layers

    try:
        layers = mlp_layers(head)
    except CertoodError:
        return None, {}
    out = {}
    for i, layer in enumerate(layers):
        if layer[0] == "linear":
            out[f"head/{i}/weight"] = layer[1].float().contiguous()
            out[f"head/{i}/bias"] = layer[2].float().contiguous()
    return [layer[0] for layer in layers], out


def _group(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _group_digests(tensors: dict[str, Tensor]) -> dict[str, str]:
    """sha256 of each tensor group: ``head`` (keys without ``head/``), ``scores`` (keys
    ``<score>/<tensor>``, as monitor/scores.safetensors names them), ``features``."""
    return {"head": tensor_digest(_group(tensors, "head/")), "scores": tensor_digest(_group(tensors, "score/")),
            "features": tensor_digest(_group(tensors, "box/"))}


def manifest_sha256(meta: dict) -> str:
    """sha256 of the metadata (which holds the group digests) without its own hash."""
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def features_blob(tensors: dict[str, Tensor], meta: dict) -> bytes:
    """The file's bytes: ``tensors``, and ``meta`` with the group digests and the manifest
    sha256 filled in (over what the recheck relies on)."""
    from safetensors.torch import save

    meta = {**meta, "sha256": _group_digests(tensors)}
    meta["manifest_sha256"] = manifest_sha256(meta)
    return save(tensors, metadata={"certood": json.dumps(meta)})


def _plain(value):
    """JSON-ready copy of spec dataclass fields (paths as strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def certify_features_blob(monitor, head: nn.Module, options, features: dict[int, Tensor],
                          detector_sha256: str = "", monitor_dir: str | Path | None = None) -> bytes:
    """The bytes of ``certify_features.safetensors`` (see the module docstring).

    ``monitor_dir``: the monitor directory the check loaded (``--monitor``), or None when it
    calibrated one (saved under ``monitor/`` of the results, which the recheck reads first, so
    a copied results directory is rechecked against its own copy).
    """
    tensors = {f"box/{i}": f.detach().cpu().float().contiguous().flatten() for i, f in features.items()}
    kinds, head_t = head_tensors(head)
    tensors.update(head_t)
    spec = monitor.spec
    for name, score in monitor.scores.items():
        for key, t in score.state_tensors().items():
            tensors[f"score/{name}/{key}"] = t.detach().cpu().contiguous()
    data = {}
    if spec.data.id_test is not None:
        data["id_test"] = _plain(asdict(spec.data.id_test))
    data.update({f"ood/{name}": _plain(asdict(src)) for name, src in spec.data.ood.items()})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "detector_sha256": detector_sha256,
        "detector": _plain(asdict(spec.detector)),
        "monitor_dir": None if monitor_dir is None else str(Path(monitor_dir).resolve()),
        "spec_fingerprint": spec.fingerprint(), "data": data,
        "detector_threshold": float(monitor.detector_threshold),
        "taps": dict(spec.taps), "rule": spec.rule.source, "thresholds": dict(monitor.thresholds),
        "class_thresholds": {k: [float(x) for x in v]
                             for k, v in (getattr(monitor, "class_thresholds", None) or {}).items()},
        "scores": {n: {"kind": s.kind, "tap": s.tap, "params": monitor.scores[n].params()}
                   for n, s in spec.scores.items()},
        "certify": asdict(options), "head_layers": kinds,
    }
    return features_blob(tensors, meta)


# --- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxRecheck:
    index: int
    dataset: str
    verdict: str
    outcome: str  # confirmed | unconfirmed | contradicted
    by: str | None = None  # the method that re-proved it
    detail: str = ""
    attacked_points: int = 0  # points of its region the attack evaluated (--allow-unconfirmed)


@dataclass
class RecheckReport:
    results_dir: Path
    boxes: list[BoxRecheck] = field(default_factory=list)
    n_boxes: int = 0  # boxes in boxes.jsonl
    problems: list[str] = field(default_factory=list)  # disagreements of the sources (not one box's)
    detector_sha256: str = ""
    from_images: bool = False

    @property
    def counts(self) -> dict[str, int]:
        out = {"confirmed": 0, "unconfirmed": 0, "contradicted": 0}
        for b in self.boxes:
            out[b.outcome] += 1
        return out

    @property
    def ok(self) -> bool:
        return not self.problems and all(b.outcome == "confirmed" for b in self.boxes)

    def passes(self, allow_unconfirmed: bool = False) -> bool:
        """Every certificate re-proven and the sources agree; with ``allow_unconfirmed``, also
        unconfirmed certificates (a method tighter than the recheck's) that were attacked and
        survived."""
        if not allow_unconfirmed:
            return self.ok
        return not self.problems and all(
            b.outcome == "confirmed" or (b.outcome == "unconfirmed" and b.attacked_points > 0) for b in self.boxes)

    def to_json(self) -> dict:
        return {"results_dir": str(self.results_dir), "n_boxes": self.n_boxes,
                "n_certified": len(self.boxes), "counts": self.counts, "ok": self.ok,
                "detector_sha256": self.detector_sha256, "from_images": self.from_images,
                "problems": list(self.problems),
                "confirmed_by": {m: sum(b.by == m for b in self.boxes) for m in RECHECK_METHODS},
                "disagreements": [asdict(b) for b in self.boxes if b.outcome != "confirmed"]}


def render_text(report: RecheckReport) -> str:
    c = report.counts
    how = "from the images, " if report.from_images else ""
    lines = [f"{len(report.boxes)} certified box(es) of {report.n_boxes} rechecked {how}in float64 against "
             f"detector {report.detector_sha256[:16]}: {c['confirmed']} confirmed, {c['unconfirmed']} "
             f"unconfirmed, {c['contradicted']} contradicted"]
    lines += [f"  {p}" for p in report.problems]
    bad = [b for b in report.boxes if b.outcome != "confirmed"]
    for b in bad[:TEXT_BOX_LINES]:
        lines.append(f"  box {b.index} ({b.dataset}, {b.verdict}): {b.outcome}: {b.detail}")
    if len(bad) > TEXT_BOX_LINES:
        lines.append(f"  ... {len(bad) - TEXT_BOX_LINES} more (--format json lists every one)")
    lines.append("all certificates re-verified" if report.ok else "DISAGREEMENT: not every certificate re-verified")
    return "\n".join(lines) + "\n"


# --- reading -----------------------------------------------------------------------------------
def _read_regular(path: Path, what: str) -> bytes:
    """A regular file's bytes (no devices, FIFOs or directories; at most MAX_FILE_BYTES)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ArtifactError(f"{path}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} read")
        return path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read {what} ({e.strerror or e}); run `certood check` with a "
                            "certify block first") from None


def _read_json(path: Path, what: str):
    try:
        return json.loads(_read_regular(path, what).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not JSON ({e})") from None


def _load(results_dir: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load

    boxes_path, feats_path = results_dir / "boxes.jsonl", results_dir / FEATURES_FILE
    text = _read_regular(boxes_path, "boxes.jsonl").decode("utf-8", errors="replace")
    blob = _read_regular(feats_path, FEATURES_FILE)
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise ArtifactError(f"{boxes_path}: not JSON lines ({e})") from None
    if not all(isinstance(r, dict) for r in records):
        raise ArtifactError(f"{boxes_path}: expected one JSON object per line")
    try:
        tensors = load(blob)
        n = int.from_bytes(blob[:8], "little")  # safetensors: u64 header length, then the JSON header
        header = json.loads(blob[8:8 + n])
        meta = json.loads((header.get("__metadata__") or {}).get("certood", "null"))
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtifactError(f"{feats_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{feats_path}: expected a {FORMAT} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{feats_path}: format version {meta.get('format_version')!r}, this recheck reads "
                            f"v{FORMAT_VERSION} (which ties certificates to the detector and the monitor); "
                            "re-run `certood check`")
    return records, tensors, meta


def _short(h: str) -> str:
    return str(h)[:16]


# --- 1. the sources: features file, monitor, detector, metrics.json -------------------------------
def _integrity_problems(meta: dict, tensors: dict[str, Tensor]) -> list[str]:
    problems = []
    recorded = meta.get("sha256") or {}
    for group, digest in _group_digests(tensors).items():
        if recorded.get(group) != digest:
            problems.append(f"{FEATURES_FILE}: {group} tensors hash to {_short(digest)}, the file records "
                            f"{_short(recorded.get(group, 'nothing'))} (altered after the check)")
    got = manifest_sha256(meta)
    if meta.get("manifest_sha256") != got:
        problems.append(f"{FEATURES_FILE}: manifest sha256 {_short(got)}, the file records "
                        f"{_short(meta.get('manifest_sha256', 'nothing'))} (altered after the check)")
    return problems


def _differing_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    """Names whose tensors are not bit for bit the same (NaN rows of unseen classes included)."""
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or tensor_digest({n: a[n]}) != tensor_digest({n: b[n]})]


@dataclass
class _Monitor:
    scores: dict  # name -> fitted Score (None: never bounded)
    thresholds: dict[str, float]
    class_thresholds: dict[str, list[float]]
    manifest: dict
    problems: list[str]


def _monitor_dir(results_dir: Path, meta: dict) -> Path:
    """``monitor/`` of the results when there is one (the check calibrated it, or carried the
    ``--monitor`` it was given from there), else the recorded ``--monitor`` directory."""
    own = results_dir / MONITOR_SUBDIR
    if own.is_dir() or not meta.get("monitor_dir"):
        return own
    return Path(str(meta["monitor_dir"]))


def _monitor(results_dir: Path, meta: dict, tensors: dict[str, Tensor]) -> _Monitor:
    """The monitor the certificates must hold for (its manifest and score tensors), with every
    way the features file disagrees with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from certood.artifacts import read_manifest
    from certood.certify import bounder_for
    from certood.scores import build_score

    mdir = _monitor_dir(results_dir, meta)
    manifest = read_manifest(mdir)  # ArtifactError (exit 3) when missing or malformed
    where = f"{mdir}/manifest.json"
    blob = _read_regular(mdir / "scores.safetensors", "the monitor's scores")
    problems = []
    got = hashlib.sha256(blob).hexdigest()
    if got != manifest.get("scores_sha256"):
        problems.append(f"{mdir}/scores.safetensors: sha256 {_short(got)}, its manifest records "
                        f"{_short(manifest.get('scores_sha256'))}")
    try:
        mtensors = load(blob)
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"{mdir}/scores.safetensors: unreadable ({e})") from None
    stored = _group(tensors, "score/")
    differ = _differing_tensors(stored, mtensors)
    if differ:
        problems.append(f"{FEATURES_FILE}: score tensors (sha256 {_short(tensor_digest(stored))}) are not the "
                        f"monitor's (sha256 {_short(tensor_digest(mtensors))}): "
                        f"{', '.join('score/' + n for n in differ[:5])} differ")
    for key, label in (("thresholds", "thresholds"), ("class_thresholds", "class thresholds")):
        mine = {k: [float(x) for x in v] if isinstance(v, list) else float(v)
                for k, v in (manifest.get(key) or {}).items()}
        theirs = {k: [float(x) for x in v] if isinstance(v, list) else float(v)
                  for k, v in (meta.get(key) or {}).items()}
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                problems.append(f"{where}: {label} {name} = {mine.get(name)!r}, the certificates were made "
                                f"under {theirs.get(name)!r} ({FEATURES_FILE})")
    if float(manifest.get("detector_threshold", math.nan)) != float(meta.get("detector_threshold", math.nan)):
        problems.append(f"{where}: detector_threshold {manifest.get('detector_threshold')!r}, the certificates "
                        f"were made under {meta.get('detector_threshold')!r}")
    if manifest.get("detector_sha256") != meta.get("detector_sha256"):
        problems.append(f"{where}: calibrated for detector {_short(manifest.get('detector_sha256'))}, the "
                        f"certificates record {_short(meta.get('detector_sha256'))}")
    if manifest.get("spec_fingerprint") != meta.get("spec_fingerprint"):
        problems.append(f"{where}: spec fingerprint {_short(manifest.get('spec_fingerprint'))}, the "
                        f"certificates record {_short(meta.get('spec_fingerprint'))}")
    scores = {}
    for name, s in meta["scores"].items():
        m = (manifest.get("scores") or {}).get(name) or {}
        if (m.get("kind"), m.get("tap"), m.get("params")) != (s["kind"], s["tap"], s["params"]):
            problems.append(f"{where}: score {name} is {m.get('kind')!r} on {m.get('tap')!r} "
                            f"{m.get('params')!r}, the certificates use {s['kind']!r} on {s['tap']!r} {s['params']!r}")
        if bounder_for(s["kind"]) is None:
            scores[name] = None  # never bounded: only its kind matters
            continue
        score = build_score(s["kind"], s["params"])
        try:
            score.load_state_tensors(_group(mtensors, f"{name}/"))
        except (CertoodError, KeyError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{mdir}/scores.safetensors: score {name}: {e}") from None
        scores[name] = score
    thresholds = {k: float(v) for k, v in (manifest.get("thresholds") or {}).items()}
    class_thresholds = {k: [float(x) for x in v] for k, v in (manifest.get("class_thresholds") or {}).items()}
    return _Monitor(scores, thresholds, class_thresholds, manifest, problems)


def _detector(meta: dict):
    """The detector of the recorded spec block, loaded (ArtifactError when it cannot be)."""
    from certood.detectors import detector_from_spec
    from certood.spec.model import DetectorSpec

    try:
        spec = DetectorSpec(**meta["detector"])
        return detector_from_spec(spec, meta.get("taps"))
    except (CertoodError, TypeError, KeyError, OSError) as e:
        raise ArtifactError(f"{FEATURES_FILE}: cannot load the detector the certificates were made for "
                            f"({meta.get('detector', {}).get('weights')!r}): {e}") from None


def _detector_problems(detector, point: str, meta: dict, tensors: dict[str, Tensor]) -> tuple[nn.Module, list[str]]:
    """The detector's own head from ``point`` (what certificates are re-proven on), and how the
    stored head and recorded weights hash disagree with it."""
    from certood.certify import certify_head

    problems = []
    sha = detector.weights_sha256
    if sha != meta.get("detector_sha256"):
        problems.append(f"detector weights {meta['detector'].get('weights')}: sha256 {_short(sha)}, the "
                        f"certificates record {_short(meta.get('detector_sha256'))}")
    head = certify_head(detector, point).cpu().eval()
    kinds, own = head_tensors(head)
    if kinds is None:
        raise CertoodError("recheck: the monitored head is not a Linear/ReLU network; it cannot be rechecked")
    stored = _group(tensors, "head/")
    differ = _differing_tensors(stored, _group(own, "head/"))
    if differ or kinds != meta.get("head_layers"):
        problems.append(f"{FEATURES_FILE}: head tensors (sha256 {_short(tensor_digest(stored))}) are not the "
                        f"detector's (sha256 {_short(tensor_digest(_group(own, 'head/')))}, weights "
                        f"{_short(sha)}): {', '.join('head/' + n for n in differ[:5]) or 'layers differ'}")
    return head, problems


def _metrics_problems(results_dir: Path, meta: dict, records: list[dict]) -> list[str]:
    """metrics.json (written by the same check) must say the same rule, thresholds, detector
    and certify options, and count the verdicts boxes.jsonl holds."""
    path = results_dir / "metrics.json"
    metrics = _read_json(path, "metrics.json")
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    problems = []

    def differs(key: str, theirs, mine) -> None:
        if theirs != mine:
            problems.append(f"metrics.json: {key} is {theirs!r}, the certificates record {mine!r}")

    differs("detector_sha256", metrics.get("detector_sha256"), meta.get("detector_sha256"))
    monitor = metrics.get("monitor") or {}
    differs("monitor.rule", monitor.get("rule"), meta.get("rule"))
    differs("monitor.thresholds", monitor.get("thresholds"), meta.get("thresholds"))
    about = metrics.get("certify") or {}
    for key in ("tap", "eps", "norm", "method", "exact", "domain", "radius"):
        differs(f"certify.{key}", about.get(key), meta["certify"].get(key))
    counted: dict[str, dict[str, int]] = {}
    for r in records:
        verdict = (r.get("certificate") or {}).get("verdict") if isinstance(r.get("certificate"), dict) else None
        per_set = counted.setdefault(str(r.get("dataset", "")).removeprefix("ood/"), {})
        per_set[str(verdict)] = per_set.get(str(verdict), 0) + 1
    for name, entry in (metrics.get("certificates") or {}).items():
        want = {k: v for k, v in ((entry or {}).get("counts") or {}).items() if v}
        held = counted.get(name, {})
        if want != held:
            problems.append(f"metrics.json: certificates.{name}.counts {want}, boxes.jsonl holds {held}")
    return problems


def _unlisted_certificates(records: list[dict], tensors: dict[str, Tensor], certified: list[int]) -> list[str]:
    """Boxes the check certified (their feature is stored) that boxes.jsonl no longer says are."""
    stored = sorted(int(k[4:]) for k in tensors if k.startswith("box/") and k[4:].isdigit())
    out = []
    for i in sorted(set(stored) - set(certified)):
        said = (records[i].get("certificate") or {}).get("verdict") if i < len(records) else "no such line"
        out.append(f"box {i}: boxes.jsonl says {said!r}, but the check certified it (box/{i} is stored)")
    return out


# --- re-proving --------------------------------------------------------------------------------
def _reference_rows(composite: nn.Module, region):
    """Row bounds by certood.verifiers.reference (float64, certify.reference_backend):
    ``method="ibp"`` or CROWN (for any other method: the tightest the recheck has)."""
    from certood.certify import reference_backend

    ibp = reference_backend("ibp")(composite, region)
    crown = reference_backend("crown")(composite, region)

    def run(z: Tensor, eps, method: str | None = None) -> tuple[Tensor, Tensor]:
        return (ibp if method == "ibp" else crown)(z, eps)

    for name in ("spec_bounds",):  # optional backend features pass through
        if hasattr(crown, name):
            setattr(run, name, getattr(crown, name))
    return run


@dataclass
class _Proof:
    verdict: str  # what the re-proven bounds decide
    by: str | None  # ibp or crown when that verdict is the claimed one
    bounds: dict[str, tuple[float, float]]  # IBP and CROWN intersected


def _reprove(certifier, z: Tensor, eps, values: dict[str, Tensor], own: dict[str, Tensor], flags: Tensor,
             labels: Tensor, claimed: list[str]) -> list[_Proof]:
    """Re-prove boxes ``z`` [N, D] at ``eps`` (float or [N]): IBP, then IBP and CROWN
    intersected; the rule decided (with the box's own float64 scores for the self-check)."""
    def verdicts_of(bounds):
        verdicts, _, reasons = certifier.decide(bounds, labels)
        return certifier._self_check(verdicts, reasons, bounds, own, flags)[0]

    if certifier._bound_rows is None:  # no score reads past the tap: nothing to propagate
        bounds = certifier.score_bounds(z, eps, values)
        ibp = tight = bounds
    else:
        ilo, ihi = certifier._bound_rows(z, eps, method="ibp")
        clo, chi = certifier._bound_rows(z, eps, method="crown")
        ibp = certifier.score_bounds(z, eps, values, (ilo, ihi))
        tight = certifier.score_bounds(z, eps, values, (torch.maximum(ilo, clo), torch.minimum(ihi, chi)))
    v_ibp, v_tight = verdicts_of(ibp), verdicts_of(tight)
    out = []
    for i in range(z.shape[0]):
        by = "ibp" if v_ibp[i] == claimed[i] else "crown" if v_tight[i] == claimed[i] else None
        out.append(_Proof(v_tight[i], by, {k: (float(lo[i]), float(hi[i])) for k, (lo, hi) in tight.items()}))
    return out


def _stored_bounds(cert: dict) -> dict[str, tuple[float, float]]:
    """Stored score bounds (``null`` = unbounded); NaN or non-numbers make them unusable."""
    out = {}
    raw = cert.get("score_bounds")
    if not isinstance(raw, dict):
        return out
    for name, pair in raw.items():
        if not (isinstance(pair, list) and len(pair) == 2):
            continue
        lo, hi = pair
        out[name] = (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
    return out


def _claim_problems(cert: dict, options, point: str) -> list[str]:
    """The certificate's region, domain, method and solver must be the check's options."""
    problems = []
    run = {"eps": float(options.eps), "norm": str(options.norm), "domain": options.domain,
           "method": options.method, "exact": options.exact, "tap": point}
    for key in (*CLAIM_FIELDS, "tap"):
        claimed = cert.get(key)
        if key == "eps":
            ok = isinstance(claimed, (int, float)) and not isinstance(claimed, bool) and float(claimed) == run[key]
        else:
            ok = claimed == run[key]
        if not ok:
            extra = f" (tap {options.tap})" if key == "tap" else ""
            problems.append(f"claims {key} {claimed!r}, but the check certified with {key} {run[key]!r}{extra}")
    radius = cert.get("radius")
    if radius is not None and not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
        problems.append(f"claims radius {radius!r}: not a nonnegative number")
    return problems


def _bounds_problems(certifier, cert: dict, stored: dict, own: dict[str, float], names, labels) -> list[str]:
    """The stored bounds exist, decide the claimed verdict and contain the box's own scores."""
    missing = sorted(set(names) - set(stored))
    if missing:
        return [f"no stored bounds for {', '.join(missing)}"]
    problems = []
    bad = [n for n, (lo, hi) in stored.items() if math.isnan(lo) or math.isnan(hi) or lo > hi]
    if bad:
        return [f"stored bounds of {', '.join(bad)} are not intervals"]
    bounds = {k: (torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64))
              for k, (lo, hi) in stored.items() if k in names}
    verdicts, margins, _ = certifier.decide(bounds, labels)
    if verdicts[0] != cert["verdict"]:
        problems.append(f"the stored bounds give {verdicts[0]}, not {cert['verdict']}")
    margin, claimed = float(margins[0]), cert.get("margin")
    same = (claimed is None and not math.isfinite(margin)) or (
        isinstance(claimed, (int, float)) and abs(float(claimed) - margin) <= 1e-9 * (1 + abs(margin)))
    if not same:
        problems.append(f"margin {claimed!r}, but the stored bounds give {margin:.9g}")
    for name, v in own.items():
        lo, hi = stored[name]
        if not (lo <= v <= hi):
            problems.append(f"own {name} score {v:.6g} (float64) outside stored bounds [{lo:.6g}, {hi:.6g}]")
    return problems


def _narrower(stored: dict, fresh: dict) -> list[str]:
    """Scores whose stored interval is narrower than the re-proven one (beyond BOUND_SLACK)."""
    out = []
    for name, (lo, hi) in fresh.items():
        slo, shi = stored[name]
        if slo > lo + BOUND_SLACK * (1 + abs(lo)) or shi < hi - BOUND_SLACK * (1 + abs(hi)):
            out.append(f"stored {name} bounds [{slo:.9g}, {shi:.9g}] are narrower than the re-proven "
                       f"[{lo:.9g}, {hi:.9g}]")
    return out


def _own_scores(spec, scores, head: nn.Module, point: str, z: Tensor, stored: dict[str, float]) -> dict[str, float]:
    """The box's own scores recomputed in float64 from its feature (the record's own for
    scores read before the tap or without a bound)."""
    from certood.certify import TAP_ORDER, split_head

    prefix, classifier = split_head(head)
    with torch.no_grad():
        h = prefix(z) if classifier is not None else None
        logits = classifier(h) if classifier is not None else head(z)
    feats = {point: z, "box_head.output": h if h is not None else z, "cls_logits": logits[:, 1:]}
    out = {}
    for name, s in spec.scores.items():
        p = spec.taps[s.tap]
        if scores[name] is None or p not in TAP_ORDER or TAP_ORDER.index(p) < TAP_ORDER.index(point):
            out[name] = float(stored.get(name, math.nan))
        else:
            out[name] = float(scores[name].score(feats[p] if p != point else z)[0])
    return out


def _record_problems(spec, own: dict[str, float], record: dict, thresholds: dict, labels) -> list[str]:
    """The record's scores are the feature's (float tolerance) and its flag is the rule's."""
    problems = []
    stored = record.get("scores") if isinstance(record.get("scores"), dict) else {}
    for name, v in own.items():
        s = stored.get(name)
        if not isinstance(s, (int, float)) or not math.isfinite(float(s)) or not math.isfinite(v):
            problems.append(f"score {name}: boxes.jsonl has {s!r}, the feature gives {v:.6g}")
        elif abs(v - s) > SCORE_RTOL * abs(s) + SCORE_ATOL * (1 + abs(s)):
            problems.append(f"score {name}: boxes.jsonl has {s:.9g}, its stored feature gives {v:.9g} (float64): "
                            "the feature is not this box's")
    if problems:
        return problems
    values = {n: torch.tensor([float(stored[n])], dtype=torch.float64) for n in spec.scores}
    flag = bool(spec.rule.evaluate(values, thresholds, labels)[0])
    if flag != bool(record.get("flag")):
        problems.append(f"flag {record.get('flag')!r}, but the rule on its scores under the monitor's thresholds "
                        f"gives {flag}")
    return problems


def _feature_problems(z: Tensor, dim: int, nonnegative: bool) -> list[str]:
    if z.numel() != dim:
        return [f"stored feature has {z.numel()} values, the head takes {dim}"]
    if not bool(torch.isfinite(z).all()):
        return ["stored feature is not finite"]
    if nonnegative and bool((z < 0).any()):
        return [f"stored feature has negative entries (min {float(z.min()):.4g}) under domain nonnegative"]
    return []


# --- from the images ---------------------------------------------------------------------------
def _image_features(detector, meta: dict, records: list[dict], indices: list[int], point: str) -> dict:
    """``{box index: (feature [D] at the certify tap, {tap point: row}) or a problem (str)}``:
    the detector run again on every image that has one of ``indices``, each box found by
    label and coordinates."""
    from certood.extract import extract_detections
    from certood.monitor import load_dataset
    from certood.spec.model import DataSource

    out: dict[int, object] = {}
    by_set: dict[str, list[int]] = {}
    for i in indices:
        by_set.setdefault(str(records[i].get("dataset")), []).append(i)
    for name, idx in by_set.items():
        raw = (meta.get("data") or {}).get(name)
        if raw is None:
            for i in idx:
                out[i] = f"data set {name!r} is not recorded: its images cannot be found"
            continue
        src = DataSource(**{k: (Path(v) if k in ("annotations", "images") and v is not None else v)
                            for k, v in raw.items()})
        dataset = load_dataset(src, name)
        wanted = {int(records[i].get("image_id", -1)) for i in idx}
        dataset = dataclasses.replace(dataset, records=[r for r in dataset.records if r.image_id in wanted])
        points = sorted({p for p in meta["taps"].values() if p in getattr(detector, "tap_points", ())} | {point})
        dets = extract_detections(detector, dataset, points, min_score=float(meta.get("detector_threshold", 0.0)))
        for i in idx:
            r = records[i]
            hit = _match(dets, r)
            if isinstance(hit, str):
                out[i] = hit
            else:
                out[i] = (dets.taps[point][hit].flatten().double(), {p: dets.taps[p][hit] for p in dets.taps})
    return out


def _match(dets, record: dict):
    """Row of ``dets`` that is ``record``'s box (same image and label, coordinates within
    BOX_TOLERANCE_PX), or why there is none."""
    box = torch.tensor([float(v) for v in record.get("box", [math.nan] * 4)], dtype=torch.float64)
    same = (dets.image_ids == int(record.get("image_id", -1))) & (dets.labels == int(record.get("label", -1)))
    rows = same.nonzero().flatten()
    if not len(rows):
        return (f"the detector finds no box of label {record.get('label')} on image {record.get('image_id')} "
                "(re-run from the images)")
    dist = (dets.boxes[rows].double() - box).abs().max(dim=1).values
    j = int(dist.argmin())
    if float(dist[j]) > BOX_TOLERANCE_PX:
        return (f"the detector's nearest box of label {record.get('label')} on image {record.get('image_id')} is "
                f"{float(dist[j]):.3g} px from the recorded {record.get('box')} (re-run from the images)")
    return int(rows[j])


def _image_problems(fresh: Tensor, z: Tensor) -> list[str]:
    if fresh.numel() != z.numel():
        return [f"the detector's feature has {fresh.numel()} values, the stored one {z.numel()}"]
    diff = (fresh - z.flatten()).abs()
    over = diff - (FEATURE_ATOL + FEATURE_RTOL * z.flatten().abs())
    if bool((over > 0).any()):
        j = int(over.argmax())
        return [f"stored feature differs from the detector's on the image: |delta| {float(diff[j]):.3g} at "
                f"coordinate {j} (max |delta| {float(diff.max()):.3g}; tolerance {FEATURE_ATOL:g} + "
                f"{FEATURE_RTOL:g}|z|), {int((over > 0).sum())} of {z.numel()} coordinates"]
    return []


# --- the recheck -------------------------------------------------------------------------------
def _spec_namespace(meta: dict):
    from certood.spec.model import ScoreSpec
    from certood.spec.rule import parse_rule

    return types.SimpleNamespace(
        taps=meta["taps"], rule=parse_rule(meta["rule"]),
        scores={n: ScoreSpec(kind=s["kind"], tap=s["tap"], params=s["params"]) for n, s in meta["scores"].items()})


def recheck(results_dir: str | Path, allow_unconfirmed: bool = False, from_images: bool = False,
            chunk: int = 16) -> RecheckReport:
    """Re-prove every certificate of a ``certood check`` output directory (see the module
    docstring); ``allow_unconfirmed`` attacks the certificates of tighter methods that the
    re-proof cannot reach, ``from_images`` re-runs the detector on their images first."""
    from certood.certify import Certifier
    from certood.spec.model import CertifySpec

    results_dir = Path(results_dir)
    records, tensors, meta = _load(results_dir)
    try:
        spec = _spec_namespace(meta)
        options = CertifySpec(**meta["certify"])
        point = spec.taps[options.tap]
    except (CertoodError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{results_dir / FEATURES_FILE}: malformed metadata ({type(e).__name__}: {e})") from None
    problems = _integrity_problems(meta, tensors)
    monitor = _monitor(results_dir, meta, tensors)
    detector = _detector(meta)
    head, head_problems = _detector_problems(detector, point, meta, tensors)
    certified = [i for i, r in enumerate(records)
                 if isinstance(r.get("certificate"), dict) and r["certificate"].get("verdict") != "undecided"]
    problems += monitor.problems + head_problems + _metrics_problems(results_dir, meta, records)
    problems += _unlisted_certificates(records, tensors, certified)
    report = RecheckReport(results_dir, n_boxes=len(records), problems=problems,
                           detector_sha256=detector.weights_sha256, from_images=from_images)
    if not certified:
        return report
    head64 = copy.deepcopy(head).double().eval()
    dim = head_layer_input(head64)
    # bound rows always by IBP and CROWN (the tightest the recheck has), whatever the claim
    certifier = Certifier(spec, monitor.scores, monitor.thresholds, head64,
                          dataclasses.replace(options, method="crown"), dim, _reference_rows,
                          monitor.class_thresholds)
    images = _image_features(detector, meta, records, [i for i in certified if f"box/{i}" in tensors], point) \
        if from_images else {}

    findings: dict[int, list[str]] = {}
    own_of: dict[int, dict[str, float]] = {}
    for i in certified:
        findings[i] = _box_problems(spec, monitor, certifier, head64, options, point, records[i],
                                    tensors.get(f"box/{i}"), images.get(i), dim, own_of, i)
    ready = [i for i in certified if i in own_of]
    proofs = _reprove_all(certifier, records, tensors, own_of, ready, float(options.eps), chunk)

    unconfirmed: dict[int, str] = {}
    for i in certified:
        r, cert = records[i], records[i]["certificate"]
        found, short, by = findings[i], [], None
        if i in proofs:  # what the re-proof falls short of (a tighter method may reach it)
            proof, radius_proof = proofs[i]
            by = proof.by
            if proof.by is None:
                short.append(f"float64 IBP/CROWN bounds give {proof.verdict}, not {cert['verdict']}")
            else:
                short += _narrower(_stored_bounds(cert), proof.bounds)
            if radius_proof is not None and radius_proof.by is None:
                short.append(f"radius {cert['radius']:.6g} not re-proven by float64 IBP/CROWN "
                             f"(they give {radius_proof.verdict})")
        if short and not found and cert.get("method") in TIGHTER_METHODS:
            unconfirmed[i] = f"{'; '.join(short)} (certified with {cert.get('method')}, tighter than the recheck)"
            continue
        found = found + short
        report.boxes.append(BoxRecheck(i, r.get("dataset", ""), str(cert.get("verdict")),
                                       "contradicted" if found else "confirmed", None if found else by,
                                       "; ".join(found)))
    if unconfirmed:
        attacked = _attack_all(spec, monitor, head64, point, options, records, tensors, unconfirmed) \
            if allow_unconfirmed else {}
        for i, why in unconfirmed.items():
            r, cert = records[i], records[i]["certificate"]
            refuted, n_points = attacked.get(i, ("", 0))
            if refuted:
                report.boxes.append(BoxRecheck(i, r.get("dataset", ""), cert["verdict"], "contradicted",
                                               detail=f"{why}; the recheck's attack refutes it: {refuted}",
                                               attacked_points=n_points))
            else:
                survived = f"; survived the recheck's attack ({n_points} points)" if n_points else ""
                report.boxes.append(BoxRecheck(i, r.get("dataset", ""), cert["verdict"], "unconfirmed",
                                               detail=why + survived, attacked_points=n_points))
    report.boxes.sort(key=lambda b: b.index)
    return report


def _box_problems(spec, monitor: _Monitor, certifier, head64, options, point: str, record: dict,
                  feature: Tensor | None, image, dim: int, own_of: dict, index: int) -> list[str]:
    """Checks 2-4 and 6 of the module docstring for one certified box. When the box can be
    re-proven (a usable feature, numeric scores, complete stored bounds), its own scores go
    to ``own_of[index]``, whatever else was found (every disagreement is reported)."""
    from certood.spec.rule import class_key

    cert = record["certificate"]
    found = [] if cert.get("verdict") in ("certified_ood", "certified_id") else \
        [f"verdict {cert.get('verdict')!r} is not a certificate verdict"]
    found += _claim_problems(cert, options, point)
    if feature is None:
        return found + [f"no stored feature box/{index}"]
    z = feature.double().reshape(1, -1)
    bad = _feature_problems(z, dim, options.domain == "nonnegative")
    if bad:
        return found + bad
    label = torch.tensor([int(record.get("label", 0))])
    recorded = record.get("scores") if isinstance(record.get("scores"), dict) else {}
    own = _own_scores(spec, monitor.scores, head64, point, z, recorded)
    if isinstance(image, str):
        found.append(image)
    elif image is not None:
        found += _image_problems(image[0], z)
        own.update(_early_scores(spec, monitor.scores, point, image[1]))
    thresholds = {**monitor.thresholds, **{class_key(k): torch.tensor(v, dtype=torch.float64)
                                           for k, v in monitor.class_thresholds.items()}}
    found += _record_problems(spec, own, record, thresholds, label)
    stored = _stored_bounds(cert)
    found += _bounds_problems(certifier, cert, stored, own, spec.scores, label)
    numeric = all(isinstance(recorded.get(n), (int, float)) and math.isfinite(recorded[n]) for n in spec.scores)
    complete = all(n in stored and stored[n][0] <= stored[n][1] for n in spec.scores)
    if numeric and complete and cert.get("verdict") in ("certified_ood", "certified_id"):
        own_of[index] = own
    return found


def head_layer_input(head: nn.Module) -> int:
    """Input width of a Linear/ReLU head (its first Linear layer)."""
    for m in head.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise CertoodError("recheck: the monitored head has no Linear layer")


def _early_scores(spec, scores, point: str, taps: dict[str, Tensor]) -> dict[str, float]:
    """Scores read before the certify tap, recomputed from the re-run detector's features
    (what the stored feature cannot give)."""
    from certood.certify import TAP_ORDER

    out = {}
    for name, s in spec.scores.items():
        p = spec.taps[s.tap]
        if scores.get(name) is None or p not in TAP_ORDER or TAP_ORDER.index(p) >= TAP_ORDER.index(point):
            continue
        f = taps[p].reshape(1, -1).double()
        out[name] = float(scores[name].score(f[:, 1:] if p == "cls_logits" else f)[0])
    return out


def _reprove_all(certifier, records, tensors, own_of, ready: list[int], eps: float, chunk: int) -> dict:
    """``{index: (proof at eps, proof at the stored radius or None)}``, in chunks of boxes."""
    names = list(certifier.spec.scores)
    out: dict[int, tuple] = {}
    for s in range(0, len(ready), chunk):
        idx = ready[s:s + chunk]
        z = torch.stack([tensors[f"box/{i}"].double().flatten() for i in idx])
        certs = [records[i]["certificate"] for i in idx]
        values = {n: torch.tensor([float(records[i]["scores"][n]) for i in idx], dtype=torch.float64) for n in names}
        own = {n: torch.tensor([own_of[i][n] for i in idx], dtype=torch.float64) for n in names}
        flags = torch.tensor([bool(records[i].get("flag")) for i in idx])
        labels = torch.tensor([int(records[i].get("label", 0)) for i in idx])
        claimed = [c["verdict"] for c in certs]
        at_eps = _reprove(certifier, z, eps, values, own, flags, labels, claimed)
        radii = {j: float(c["radius"]) for j, c in enumerate(certs) if c.get("radius")}
        # L-inf takes one radius per box; L2 one per call: group equal radii
        groups = [list(radii)] if certifier.region.norm == math.inf else \
            [[j for j in radii if radii[j] == r] for r in sorted(set(radii.values()))]
        at_radius: dict[int, _Proof] = {}
        for rows in (g for g in groups if g):
            sel = torch.tensor(rows)
            e = torch.tensor([radii[j] for j in rows], dtype=torch.float64) \
                if certifier.region.norm == math.inf else radii[rows[0]]
            got = _reprove(certifier, z[sel], e, _rows(values, rows), _rows(own, rows), flags[sel], labels[sel],
                           [claimed[j] for j in rows])
            at_radius.update(zip(rows, got))
        for j, i in enumerate(idx):
            out[i] = (at_eps[j], at_radius.get(j))
    return out


def _rows(values: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    sel = torch.tensor(rows)
    return {k: v[sel] for k, v in values.items()}


def _attack_all(spec, monitor: _Monitor, head64: nn.Module, point: str, options, records, tensors,
                unconfirmed: dict[int, str]) -> dict[int, tuple[str, int]]:
    """``{index: (why the attack refutes it or "", points evaluated)}``: float64 samples and
    PGD in each region (rule margin, then each score up and down); a point whose flag
    contradicts the verdict, or whose scores leave the stored bounds, refutes."""
    from certood.verifiers.attack import attack_certificates

    idx = sorted(unconfirmed)
    z = torch.stack([tensors[f"box/{i}"].double().flatten() for i in idx])
    verdicts = [records[i]["certificate"]["verdict"] for i in idx]
    values = {n: torch.tensor([float(records[i]["scores"][n]) for i in idx], dtype=torch.float64)
              for n in spec.scores}
    labels = torch.tensor([int(records[i].get("label", 0)) for i in idx])
    norm = math.inf if options.norm == "inf" else float(options.norm)
    nonneg = options.domain == "nonnegative"
    out = {i: ("", 0) for i in idx}

    def run(eps: float, rows: list[int], ranges: bool):
        sel = torch.tensor(rows)
        return attack_certificates(spec, monitor.scores, monitor.thresholds, head64, point, z[sel],
                                   [verdicts[j] for j in rows], _rows(values, rows), eps, norm, nonneg,
                                   labels=labels[sel], class_thresholds=monitor.class_thresholds,
                                   score_extremes=ranges, **ATTACK)

    res = run(float(options.eps), list(range(len(idx))), True)
    for j, i in enumerate(idx):
        why = []
        hits = [v for v in res.violations if v["box"] == j]
        if hits:
            why.append(f"a point of its region gives flag {hits[0]['flag']} (rule margin {hits[0]['margin']:.4g})")
        stored = _stored_bounds(records[i]["certificate"])
        for name, (lo, hi) in res.score_ranges.get(j, {}).items():
            slo, shi = stored.get(name, (-math.inf, math.inf))
            if lo < slo or hi > shi:
                why.append(f"{name} reaches [{lo:.6g}, {hi:.6g}] in the region, outside the stored "
                           f"[{slo:.6g}, {shi:.6g}]")
        out[i] = ("; ".join(why), res.points_per_box.get(j, 0))
    radius = [j for j, i in enumerate(idx) if records[i]["certificate"].get("radius")
              and not out[i][0] and float(records[i]["certificate"]["radius"]) > float(options.eps)]
    for j in radius:  # the radius claim: the verdict on the larger region
        i = idx[j]
        r = float(records[i]["certificate"]["radius"])
        res = run(r, [j], False)
        if res.violations:
            v = res.violations[0]
            out[i] = (f"at its radius {r:.6g} a point gives flag {v['flag']} (rule margin {v['margin']:.4g})",
                      out[i][1] + res.points_per_box.get(0, 0))
        else:
            out[i] = ("", out[i][1] + res.points_per_box.get(0, 0))
    return out
