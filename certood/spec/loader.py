"""Load a monitor spec: strict YAML -> schema validation -> cross-checks -> `Spec`.

Every problem of a file is collected and located (file, line, column, key path) before
anything is raised, so one run of `certood validate` shows them all.

>>> spec = load_spec_text('''
... version: 1
... detector: {kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn"}
... data: {calibration: {digitsdet: val}}
... taps: {logits: cls_logits}
... scores: {energy: {tap: logits}}
... ''')
>>> spec.scores["energy"].params, spec.rule.source
({'temperature': 1.0}, 'energy > t.energy')
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from certood.errors import SpecError, SpecIssue
from certood.spec.model import (
    CertifySpec, DataSource, DataSpec, DetectorSpec, GatePolicy, OutputSpec, ScoreSpec, Spec, TemporalSpec,
    ThresholdSpec,
)
from certood.spec.policy import GateNames, build_policies, check_policy_entries, conflicts
from certood.spec.rule import Rule, RuleProblem, check_rule
from certood.spec.schema import Collector, Problem, did_you_mean
from certood.spec.source import LINE_BREAK, Document, Loc, key_path_str, read_yaml
from certood.spec.v1 import (
    BUILTIN_WEIGHTS, CERTIFY_TAP_POINTS, POLICY_FILE, SCORE_KIND_TABLE, SCORE_NAME, SPEC, TAP_POINTS, VIDEO_SPLITS,
)

def load_spec(path: str | Path) -> Spec:
    """Load and validate a spec file; raises SpecError listing every error in it."""
    spec, issues = _check_file(path)
    if spec is None:
        raise SpecError([i for i in issues if i.severity == "error"])
    return spec


def load_spec_text(text: str | bytes, filename: str = "<string>", base_dir: Path | None = None) -> Spec:
    """Like `load_spec` for text in memory; relative paths resolve against `base_dir`
    (default: the current directory)."""
    spec, issues = check_spec_text(text, filename, base_dir)
    if spec is None:
        raise SpecError([i for i in issues if i.severity == "error"])
    return spec


def check_spec_file(path: str | Path) -> list[SpecIssue]:
    """Every issue (errors and warnings) of a spec file; never raises for bad content."""
    return _check_file(path)[1]


def _check_file(path: str | Path) -> tuple[Spec | None, list[SpecIssue]]:
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        found = getattr(e, "strerror", None) or str(e)
        return None, [SpecIssue(str(path), 1, 1, "", "a readable spec file", found)]
    absolute = Path(os.path.abspath(path))
    spec, issues = check_spec_text(data, str(path), absolute.parent)
    return (spec and dataclasses.replace(spec, path=absolute)), issues


def check_spec_text(text: str | bytes, filename: str = "<string>",
                    base_dir: Path | None = None) -> tuple[Spec | None, list[SpecIssue]]:
    """(spec or None, all issues sorted by position); the spec is None iff there are errors."""
    doc = read_yaml(text, filename)
    if doc.value is None:
        return None, doc.issues
    ctx = Collector()
    norm = SPEC.validate(doc.value, (), ctx)
    _cross_check(norm, doc.value, ctx)
    _check_certify(norm, doc.value, ctx)
    temporal_warnings = _check_temporal(norm, doc.value, ctx)
    gate = _check_gate(norm, doc, filename, GateNames.from_raw(doc.value), ctx)
    issues = doc.issues + [_locate(p, doc, filename) for p in ctx.problems]
    issues += [_locate(p, doc, filename, "warning") for p in temporal_warnings]
    rule, rule_issues = _check_rule(norm, doc, filename)
    issues = sorted(issues + rule_issues, key=lambda i: (i.line, i.column))
    if rule is None or any(i.severity == "error" for i in issues):
        return None, issues
    warnings = tuple(i for i in issues if i.severity == "warning")
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd()))
    return dataclasses.replace(_build(norm, doc.value, rule, base, warnings), gate=gate), issues


# --- gate policies: in the spec, or in a policy file (certood gate --policy FILE) -----------
def load_policy_file(path: str | Path, spec: Spec) -> tuple[GatePolicy, ...]:
    """The policies of a policy file checked against `spec` (its names, and its own gate
    policies for contradictions); raises SpecError listing every error, located."""
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError) as e:
        found = getattr(e, "strerror", None) or str(e)
        raise SpecError([SpecIssue(str(path), 1, 1, "", "a readable policy file", found)]) from None
    policies, issues = check_policy_text(data, spec, str(path))
    if policies is None:
        raise SpecError([i for i in issues if i.severity == "error"])
    return policies


def check_policy_text(text: str | bytes, spec: Spec,
                      filename: str = "<string>") -> tuple[tuple[GatePolicy, ...] | None, list[SpecIssue]]:
    """(policies or None, every issue): a policy file is `gate: [...]` (and an optional
    `version: 1`), read and located as strictly as a spec."""
    doc = read_yaml(text, filename)
    if doc.value is None:
        return None, doc.issues
    ctx = Collector()
    norm = POLICY_FILE.validate(doc.value, (), ctx)
    policies = _check_gate(norm, doc, filename, GateNames.from_spec(spec), ctx, earlier=spec.gate)
    issues = sorted(doc.issues + [_locate(p, doc, filename) for p in ctx.problems], key=lambda i: (i.line, i.column))
    return (None if any(i.severity == "error" for i in issues) else policies), issues


def _check_gate(norm, doc: Document, file: str, names: GateNames, ctx: Collector,
                earlier: tuple[GatePolicy, ...] = ()) -> tuple[GatePolicy, ...]:
    """Cross-check the `gate` list of `norm`; the policies built from its valid entries."""
    entries = norm.get("gate") if isinstance(norm, dict) else None
    if not isinstance(entries, list):
        return ()
    check_policy_entries(entries, names, ctx)
    bad = {p.path[1] for p in ctx.problems if len(p.path) > 1 and p.path[0] == "gate"}
    built = build_policies(entries, doc.values, file, bad)
    ctx.problems.extend(conflicts([(None, p) for p in earlier] + built, names))
    return tuple(p for _, p in built)


# --- locating ------------------------------------------------------------------------------
def _locate(problem: Problem, doc: Document, file: str, severity: str = "error") -> SpecIssue:
    """Attach a position: the key or value at the problem's path, else its nearest ancestor."""
    path = problem.path
    loc = (doc.keys.get(path) if problem.at_key else None) or doc.values.get(path)
    while loc is None and path:
        path = path[:-1]
        loc = doc.keys.get(path) or doc.values.get(path)
    loc = loc or Loc(1, 1)
    return SpecIssue(file, loc.line, loc.column, key_path_str(problem.path),
                     problem.expected, problem.found, problem.hint, severity)


def _position_in_string(loc: Loc, value: str, offset: int) -> tuple[int, int]:
    """Source position of `value[offset]` for a single-line plain or quoted scalar without
    escapes; otherwise (folded, block, escaped) the scalar's own start."""
    src = loc.source
    if not LINE_BREAK.search(src):
        if src == value:
            return loc.line, loc.column + offset
        if len(src) >= 2 and src[0] in "'\"" and src[-1] == src[0] and src[1:-1] == value:
            return loc.line, loc.column + 1 + offset
    return loc.line, loc.column


# --- cross-checks: relations between keys that a per-key schema cannot see -----------------
def _cross_check(norm, raw: dict, ctx: Collector) -> None:
    if not isinstance(norm, dict):
        return
    _check_weights(norm.get("detector"), ctx)
    taps_raw, data_raw = raw.get("taps"), raw.get("data")
    taps = norm.get("taps") if isinstance(norm.get("taps"), dict) else {}
    fitted = []
    scores = norm.get("scores") if isinstance(norm.get("scores"), dict) else {}
    for name, score in scores.items():
        if not isinstance(score, dict):
            continue
        kind = SCORE_KIND_TABLE[score["kind"]]
        if kind.needs_fit:
            fitted.append(f"'{name}' ({score['kind']})")
        tap = score.get("tap")
        if not isinstance(tap, str) or not isinstance(taps_raw, dict) or not taps_raw:
            continue
        if tap not in taps_raw:
            ctx.add(("scores", name, "tap"), f"a tap defined under taps (one of: {', '.join(taps_raw)})",
                    repr(tap), did_you_mean(tap, taps_raw) or "define it under taps")
        elif kind.tap_point and taps.get(tap) in TAP_POINTS and TAP_POINTS[taps[tap]] != kind.tap_point:
            _wrong_tap_point(name, score["kind"], tap, taps, kind.tap_point, ctx)
    if fitted and isinstance(data_raw, dict) and "fit" not in data_raw:
        ctx.add(("data", "fit"), f"a data source the scores {', '.join(fitted)} are fitted on",
                "nothing", "add e.g. fit: {digitsdet: train}")


def _check_temporal(norm, raw: dict, ctx: Collector) -> list[Problem]:
    """Errors (into ctx) and warnings (returned) of the `temporal` block: certified k <= n,
    parameters of another aggregate, and DigitsDet data that is not video."""
    temporal = norm.get("temporal") if isinstance(norm, dict) else None
    if not isinstance(temporal, dict):
        return []
    warnings = []
    certified = temporal.get("certified")
    if isinstance(certified, dict) and isinstance(certified.get("k"), int) and isinstance(certified.get("n"), int) \
            and certified["k"] > certified["n"]:
        ctx.add(("temporal", "certified", "k"), f"k <= n (n = {certified['n']})", f"k = {certified['k']}",
                "k certified frames must fit in the window of the last n frames")
    aggregate, written = temporal.get("aggregate"), raw.get("temporal") or {}
    for key, owner in (("alpha", "ema"), ("cusum", "cusum")):
        if key in written and isinstance(aggregate, str) and aggregate != owner:
            warnings.append(Problem(("temporal", key), f"'{key}' only with aggregate: {owner}",
                                    f"aggregate: {aggregate}", f"remove '{key}', or set aggregate: {owner}",
                                    at_key=True))
    data = norm.get("data") if isinstance(norm.get("data"), dict) else {}
    sources = [(("data", "calibration"), data.get("calibration"), True),
               (("data", "id_test"), data.get("id_test"), False)]
    sources += [(("data", "ood", k), v, False) for k, v in (data.get("ood") or {}).items()] \
        if isinstance(data.get("ood"), dict) else []
    for path, source, required in sources:
        split = source.get("digitsdet") if isinstance(source, dict) else None
        if isinstance(split, str) and split not in VIDEO_SPLITS:
            problem = (path + ("digitsdet",), f"a video split ({', '.join(VIDEO_SPLITS)}) when temporal is set",
                       repr(split), "track thresholds are calibrated on video" if required
                       else "still images give no tracks: this set is skipped by the temporal metrics")
            if required:
                ctx.add(*problem)
            else:
                warnings.append(Problem(*problem))
    return warnings


def _wrong_tap_point(name: str, kind: str, tap: str, taps: dict, need: str, ctx: Collector) -> None:
    points = [p for p, t in TAP_POINTS.items() if t == need]
    fitting = [t for t, p in taps.items() if p in points]
    hint = (f"taps at {need} points: {', '.join(fitting)}" if fitting
            else f"define one, e.g. {need}: {points[0]}")
    ctx.add(("scores", name, "tap"), f"a tap at a {need} point ({', '.join(points)}) for score kind {kind}",
            f"'{tap}' at {taps[tap]} ({TAP_POINTS[taps[tap]]})", hint)


def _check_weights(detector, ctx: Collector) -> None:
    if not isinstance(detector, dict):
        return
    weights, arch = detector.get("weights"), detector.get("arch")
    if isinstance(weights, str) and weights.startswith("builtin:") and isinstance(arch, str):
        fits = BUILTIN_WEIGHTS[weights.removeprefix("builtin:")]
        if fits != arch:
            ctx.add(("detector", "weights"), f"weights for arch {arch}",
                    f"'{weights}', which is for arch {fits}", f"set arch: {fits}, or give a weights path")


def _check_rule(norm, doc: Document, file: str) -> tuple[Rule | None, list[SpecIssue]]:
    """Parse the rule (or build the default one) and locate its problems inside the string."""
    raw = doc.value
    scores_raw = raw.get("scores")
    defined = ([k for k in scores_raw if re.fullmatch(SCORE_NAME, k)] if isinstance(scores_raw, dict) else [])
    if "rule" not in raw:
        source = " or ".join(f"{n} > t.{n}" for n in defined)
        return (check_rule(source, set(defined))[0] if defined else None), []
    source = norm.get("rule") if isinstance(norm, dict) else None
    if not isinstance(source, str):
        return None, []
    rule, problems = check_rule(source, set(defined) if isinstance(scores_raw, dict) else None)
    loc = doc.values[("rule",)]
    issues = [_rule_issue(p, loc, source, file) for p in problems]
    if rule is not None:
        for name in (n for n in defined if n not in rule.names()):
            unused = Problem(("scores", name), "a score the rule reads", f"score '{name}' unused by the rule",
                             "use it in rule, or remove it", at_key=True)
            issues.append(_locate(unused, doc, file, "warning"))
    return rule, issues


def _rule_issue(problem: RuleProblem, loc: Loc, source: str, file: str) -> SpecIssue:
    line, column = _position_in_string(loc, source, problem.pos)
    return SpecIssue(file, line, column, "rule", problem.expected, problem.found, problem.hint)


# --- building the dataclasses (only for a spec without errors) ------------------------------
def _build(norm: dict, raw: dict, rule: Rule, base: Path, warnings: tuple) -> Spec:
    det, data = norm["detector"], norm["data"]
    if det["kind"] == "onnx":
        detector = DetectorSpec(
            kind="onnx", arch="", weights=str(_resolve(base, det["path"])), num_classes=det.get("num_classes"),
            score_thresh=det["score_thresh"], device=det["device"], layout=det["layout"],
            tensors=dict(det["tensors"]), input=det.get("input"), outputs=dict(det["outputs"]),
            nms_thresh=det["nms_thresh"], max_detections=det["max_detections"],
        )
    else:
        weights = det["weights"]
        if not weights.startswith("builtin:"):
            weights = str(_resolve(base, weights))
        detector = DetectorSpec(
            kind=det["kind"], arch=det["arch"], weights=weights, num_classes=det.get("num_classes"),
            min_size=det.get("min_size"), max_size=det.get("max_size"),
            score_thresh=det["score_thresh"], device=det["device"],
        )

    def source(d: dict | None) -> DataSource | None:
        if d is None:
            return None
        return DataSource(digitsdet=d.get("digitsdet"), annotations=_resolve(base, d.get("annotations")),
                          images=_resolve(base, d.get("images")), max_images=d.get("max_images"))

    return Spec(
        path=None,
        version=norm["version"],
        detector=detector,
        data=DataSpec(fit=source(data.get("fit")), calibration=source(data["calibration"]),
                      id_test=source(data.get("id_test")),
                      ood={k: source(v) for k, v in (data.get("ood") or {}).items()}),
        taps=dict(norm["taps"]),
        scores={name: ScoreSpec(kind=s["kind"], tap=s["tap"],
                                params={p: s[p] for p in SCORE_KIND_TABLE[s["kind"]].params})
                for name, s in norm["scores"].items()},
        threshold=ThresholdSpec(**norm.get("threshold", {})),
        rule=rule,
        output=OutputSpec(dir=_resolve(base, (norm.get("output") or {}).get("dir"))),
        warnings=warnings,
        raw=raw,
        temporal=_temporal(norm.get("temporal")),
        certify=_certify(norm.get("certify")),
    )


def _certify(c: dict | None) -> CertifySpec | None:
    if c is None:
        return None
    return CertifySpec(tap=c["tap"], eps=c["eps"], norm=str(c["norm"]), method=c["method"], exact=c["exact"],
                       timeout_s=c["timeout_s"], radius=c["radius"], domain=c["domain"])


def _check_certify(norm, raw: dict, ctx: Collector) -> None:
    """certify.tap must name a tap pointing at a point a region can sit at."""
    certify = norm.get("certify") if isinstance(norm, dict) else None
    taps_raw = raw.get("taps")
    if not isinstance(certify, dict) or not isinstance(certify.get("tap"), str) or not isinstance(taps_raw, dict):
        return
    tap, taps = certify["tap"], norm.get("taps") if isinstance(norm.get("taps"), dict) else {}
    fitting = [t for t, p in taps.items() if p in CERTIFY_TAP_POINTS]
    points = " or ".join(CERTIFY_TAP_POINTS)
    if tap not in taps_raw:
        hint = did_you_mean(tap, taps_raw) or (f"taps at {points}: {', '.join(fitting)}" if fitting
                                               else f"define one under taps, e.g. roi: {CERTIFY_TAP_POINTS[0]}")
        ctx.add(("certify", "tap"), f"a tap defined under taps (one of: {', '.join(taps_raw)})", repr(tap), hint)
    elif taps.get(tap) in TAP_POINTS and taps[tap] not in CERTIFY_TAP_POINTS:
        hint = (f"taps at {points}: {', '.join(fitting)}" if fitting
                else f"define one under taps, e.g. roi: {CERTIFY_TAP_POINTS[0]}")
        ctx.add(("certify", "tap"), f"a tap at {points} (where the bounded head starts)",
                f"'{tap}' at {taps[tap]}", hint)


def _temporal(t: dict | None) -> TemporalSpec | None:
    if t is None:
        return None
    tracker, cusum, certified = t.get("tracker") or {}, t.get("cusum") or {}, t.get("certified") or {}
    given = {"iou": tracker.get("iou"), "max_age": tracker.get("max_age"), "aggregate": t.get("aggregate"),
             "alpha": t.get("alpha"), "cusum_k": cusum.get("k"),
             "cusum_false_alarm_rate": cusum.get("target_false_alarm_rate"),
             "certified_k": certified.get("k"), "certified_n": certified.get("n")}
    return TemporalSpec(**{k: v for k, v in given.items() if v is not None})


def _resolve(base: Path, path: str | None) -> Path | None:
    """An absolute, normalised path; relative ones are taken from the spec's directory."""
    return None if path is None else Path(os.path.normpath(os.path.join(base, path)))
