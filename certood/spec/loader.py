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
    CertifySpec, DataSource, DataSpec, DetectorSpec, GatePolicy, OutputSpec, RaySpec, RunSpec, ScoreSpec, Spec,
    TemporalSpec, ThresholdSpec,
)
from certood.spec.consistency import check_rule_consistency, describe_range, score_ranges
from certood.spec.extends import read_spec_document, rebase_paths
from certood.spec.model import DEFAULT_DETECTOR_SCORE, DEFAULT_TPR
from certood.spec.policy import GateNames, build_policies, check_policy_entries, conflicts
from certood.spec.rule import ClassThresholdRef, Rule, check_rule
from certood.spec.schema import Collector, Problem, closest, did_you_mean
from certood.spec.files import UnreadableFile, read_spec_bytes
from certood.spec.source import LINE_BREAK, Document, Loc, key_path_str, read_yaml
from certood.spec.v1 import (
    BUILTIN_WEIGHTS, CERTIFY_TAP_POINTS, POLICY_FILE, SCORE_KIND_TABLE, SCORE_NAME, SPEC, TAP_POINTS, VIDEO_SPLITS,
)

MAX_ISSUES = 100  # issues shown per report; the rest are counted (see cap_issues)


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
        data = read_spec_bytes(path, "spec file")
    except UnreadableFile as e:
        return None, [SpecIssue(str(path), 1, 1, "", f"a readable {e.what}", e.reason, e.hint)]
    absolute = Path(os.path.abspath(path))
    spec, issues = _check_text(data, str(path), absolute.parent, str(absolute))
    return (spec and dataclasses.replace(spec, path=absolute)), issues


def cap_issues(issues: list[SpecIssue], limit: int = MAX_ISSUES) -> list[SpecIssue]:
    """The first `limit` issues, then one that counts the rest: a file with thousands of
    mistakes is fixed from its first ones, and printing them all costs more than reading it.

    >>> many = [SpecIssue("m.yaml", n, 1, "", "x", "y") for n in range(1, 6)]
    >>> [str(i) for i in cap_issues(many, 2)][2]
    'm.yaml:3:1: expected at most 2 issues in one report, found 3 more (3 errors), not shown (hint: fix the ones above first)'
    """
    if len(issues) <= limit:
        return issues
    rest = issues[limit:]
    errors = sum(i.severity == "error" for i in rest)
    counts = ", ".join(f"{n:,} {word}{'s' if n != 1 else ''}" for n, word in
                       ((errors, "error"), (len(rest) - errors, "warning")) if n)
    first = rest[0]
    summary = SpecIssue(first.file, first.line, first.column, "", f"at most {limit} issues in one report",
                        f"{len(rest):,} more ({counts}), not shown", "fix the ones above first",
                        "error" if errors else "warning")
    return issues[:limit] + [summary]


def check_spec_text(text: str | bytes, filename: str = "<string>",
                    base_dir: Path | None = None) -> tuple[Spec | None, list[SpecIssue]]:
    """(spec or None, all issues sorted by file and position); the spec is None iff there are
    errors. `extends` resolves against `base_dir` (default: the current directory)."""
    return _check_text(text, filename, base_dir, None)


def _check_text(text: str | bytes, filename: str, base_dir: Path | None,
                real_path: str | None) -> tuple[Spec | None, list[SpecIssue]]:
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd()))
    doc, parents = read_spec_document(text, filename, base, real_path)
    if doc.value is None:
        return None, cap_issues(doc.issues)
    ctx = Collector()
    norm = SPEC.validate(doc.value, (), ctx)
    threshold_warnings = _check_threshold(norm, ctx)
    _cross_check(norm, doc.value, ctx)
    _check_certify(norm, doc.value, ctx)
    temporal_warnings = _check_temporal(norm, doc.value, ctx) + _protocol_warnings(norm)
    gate = _check_gate(norm, doc, filename, GateNames.from_raw(doc.value), ctx)
    issues = doc.issues + [_locate(p, doc, filename) for p in ctx.problems]
    issues += [_locate(p, doc, filename, "warning") for p in temporal_warnings]
    issues += [_locate(p, doc, filename, "warning") for p in threshold_warnings]
    rule, rule_issues = _check_rule(norm, doc, filename)
    # the spec's own issues first, then each inherited file's (extends), by position
    issues = sorted(issues + rule_issues, key=lambda i: (i.file != filename, i.file, i.line, i.column))
    if rule is None or any(i.severity == "error" for i in issues):
        return None, cap_issues(issues)
    warnings = tuple(i for i in issues if i.severity == "warning")
    norm = rebase_paths(norm, doc, parents)
    return dataclasses.replace(_build(norm, doc.value, rule, base, warnings), gate=gate), issues


# --- gate policies: in the spec, or in a policy file (certood gate --policy FILE) -----------
def load_policy_file(path: str | Path, spec: Spec) -> tuple[GatePolicy, ...]:
    """The policies of a policy file checked against `spec` (its names, and its own gate
    policies for contradictions); raises SpecError listing every error, located."""
    try:
        data = read_spec_bytes(path, "policy file")
    except UnreadableFile as e:
        raise SpecError([SpecIssue(str(path), 1, 1, "", f"a readable {e.what}", e.reason, e.hint)]) from None
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
        return None, cap_issues(doc.issues)
    ctx = Collector()
    norm = POLICY_FILE.validate(doc.value, (), ctx)
    policies = _check_gate(norm, doc, filename, GateNames.from_spec(spec), ctx, earlier=spec.gate)
    issues = sorted(doc.issues + [_locate(p, doc, filename) for p in ctx.problems], key=lambda i: (i.line, i.column))
    return (None if any(i.severity == "error" for i in issues) else policies), cap_issues(issues)


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
    return SpecIssue(loc.file or file, loc.line, loc.column, key_path_str(problem.path),
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
    for name, score in scores.items():
        if isinstance(score, dict) and score["kind"] == "fusion" and isinstance(score.get("of"), list):
            _check_fusion(name, score["of"], scores, ctx)
    if fitted and isinstance(data_raw, dict) and "fit" not in data_raw:
        ctx.add(("data", "fit"), f"a data source the scores {', '.join(fitted)} are fitted on",
                "nothing", "add e.g. fit: {digitsdet: train}")


def _check_fusion(name: str, of: list, scores: dict, ctx: Collector) -> None:
    """A fusion combines other, non-fusion scores of the spec, each once."""
    for i, other in enumerate(of):
        where = ("scores", name, "of", i)
        if other == name:
            ctx.add(where, "the name of another score", repr(other), "a fusion cannot read itself")
        elif other not in scores:
            ctx.add(where, f"the name of a score of this spec (one of: {', '.join(n for n in scores if n != name)})",
                    repr(other), did_you_mean(other, scores) or "define it under scores")
        elif isinstance(scores[other], dict) and scores[other].get("kind") == "fusion":
            ctx.add(where, "a score that is not itself a fusion", f"'{other}' (fusion)",
                    "list the fused scores' components instead")
        elif other in of[:i]:
            ctx.add(where, "distinct score names", f"'{other}' twice")


def _check_temporal(norm, raw: dict, ctx: Collector) -> list[Problem]:
    """Errors (into ctx) and warnings (returned) of the `temporal` block: certified k <= n,
    parameters of another aggregate, and DigitsDet data that is not video."""
    temporal = norm.get("temporal") if isinstance(norm, dict) else None
    if not isinstance(temporal, dict):
        return []
    warnings = []
    certified = temporal.get("certified")
    if isinstance(certified, dict) and isinstance(certified.get("k"), int) \
            and isinstance(certified.get("n"), int) and certified["k"] > certified["n"]:
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
            problem = (path + ("digitsdet",),
                       f"a video split ({', '.join(VIDEO_SPLITS)}) when temporal is set",
                       repr(split), "track thresholds are calibrated on video" if required
                       else "still images give no tracks: this set is skipped by the temporal metrics")
            if required:
                ctx.add(*problem)
            else:
                warnings.append(Problem(*problem))
    return warnings


def _protocol_warnings(norm) -> list[Problem]:
    """Warnings for a gt_matched OOD set that is a DigitsDet split without ID objects: every box
    there is OOD or unmatched, so the protocol has no ID boxes to compare with."""
    data = norm.get("data") if isinstance(norm, dict) else None
    ood = data.get("ood") if isinstance(data, dict) else None
    out = []
    for name, source in (ood.items() if isinstance(ood, dict) else ()):
        if isinstance(source, dict) and source.get("protocol") == "gt_matched" \
                and source.get("digitsdet") in GT_MATCHED_USELESS_SPLITS:
            out.append(Problem(("data", "ood", name, "protocol"),
                               "an OOD set holding ID and unknown objects for protocol gt_matched",
                               f"digitsdet split {source['digitsdet']!r} (no ID objects)",
                               "use digitsdet: mixed, or protocol: box"))
        elif isinstance(source, dict) and source.get("protocol") == "box" and source.get("digitsdet") == "mixed":
            out.append(Problem(("data", "ood", name, "digitsdet"),
                               "an OOD set without ID objects for protocol box (every box counts as OOD)",
                               "digitsdet split 'mixed' (ID and unknown objects)",
                               "add protocol: gt_matched to this set"))
    return out


GT_MATCHED_USELESS_SPLITS = ("ood-near", "ood-far")


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
        scores = norm.get("scores") if isinstance(norm, dict) and isinstance(norm.get("scores"), dict) else {}
        fused = {n for s in scores.values() if isinstance(s, dict) and s.get("kind") == "fusion"
                 for n in (s.get("of") if isinstance(s.get("of"), list) else [])}
        for name in (n for n in defined if n not in rule.names() and n not in fused):
            unused = Problem(("scores", name), "a score the rule reads", f"score '{name}' unused by the rule",
                             "use it in rule, or remove it", at_key=True)
            issues.append(_locate(unused, doc, file, "warning"))
        issues += [_rule_issue(p, loc, source, file, p.severity) for p in _rule_semantics(rule, norm)]
    return rule, issues


def _rule_issue(problem, loc: Loc, source: str, file: str, severity: str = "error") -> SpecIssue:
    line, column = _position_in_string(loc, source, problem.pos)
    return SpecIssue(loc.file or file, line, column, "rule", problem.expected, problem.found, problem.hint, severity)


def _rule_semantics(rule: Rule, norm) -> list:
    """Per-class thresholds the spec can provide, then consistency (z3; see
    certood.spec.consistency): problems located in the rule, each with a severity."""
    norm = norm if isinstance(norm, dict) else {}
    threshold = norm.get("threshold") if isinstance(norm.get("threshold"), dict) else None
    problems = []
    for node in (n for n in rule.nodes() if isinstance(n, ClassThresholdRef)):
        written = f"'t.{node.name}[class]'"
        if threshold is not None and threshold.get("per_class") is not True:
            problems.append(_Located(node.pos, "error", "t.NAME[class] with per-class thresholds calibrated",
                                     f"{written}, but threshold.per_class is not true",
                                     f"set threshold: {{per_class: true}}, or use t.{node.name}"))
        for block in ("temporal",):  # certify reads the box's own class threshold (a constant)
            if isinstance(norm.get(block), dict):
                problems.append(_Located(node.pos, "error", f"global thresholds only when {block} is set",
                                         written, f"{block} does not support per-class thresholds yet: "
                                         f"use t.{node.name}"))
    scores = norm.get("scores")
    if problems or not isinstance(scores, dict) or not all(isinstance(s, dict) for s in scores.values()):
        return problems
    detector = norm.get("detector") if isinstance(norm.get("detector"), dict) else {}
    ranges = score_ranges({n: s["kind"] for n, s in scores.items()}, detector.get("num_classes"))
    fixed = threshold.get("fixed") if threshold is not None else None
    fixed = fixed if isinstance(fixed, dict) and all(isinstance(v, float) for v in fixed.values()) else None
    return list(check_rule_consistency(rule, ranges, fixed))


@dataclasses.dataclass(frozen=True)
class _Located:
    pos: int
    severity: str
    expected: str
    found: str
    hint: str = ""


# --- thresholds: the method's names, OOD validation data, fixed values --------------------
def _check_threshold(norm, ctx: Collector) -> list[Problem]:
    """Errors (into ctx) and warnings (returned) of `threshold` and `data.ood_validation`:
    fpr is set on a validation set, never on an OOD test set; fixed names every score."""
    if not isinstance(norm, dict):
        return []
    data = norm.get("data") if isinstance(norm.get("data"), dict) else {}
    validation = data.get("ood_validation") if isinstance(data.get("ood_validation"), dict) else {}
    ood = data.get("ood") if isinstance(data.get("ood"), dict) else {}
    for name, source in validation.items():
        same = next((t for t, test in ood.items() if _same_data(source, test)), None)
        if same is not None:
            ctx.add(("data", "ood_validation", name), "OOD validation data distinct from the OOD test sets",
                    f"the same data as data.ood.{same} ({_describe_source(ood[same])})",
                    "thresholds set on test data overstate the test metrics: use separate data", at_key=True)
    threshold = norm.get("threshold")
    if not isinstance(threshold, dict):
        return []
    warnings = []
    on = threshold.get("on")
    if isinstance(on, str) and on not in validation:
        choices = list(validation)
        expected = "a set of data.ood_validation" + (f" (one of: {', '.join(choices)})" if choices
                                                      else " (the spec defines none)")
        if on in ood:
            ctx.add(("threshold", "on"), expected, f"'{on}', an OOD test set of data.ood",
                    "thresholds are never set on test data: add a separate set under data.ood_validation")
        else:
            ctx.add(("threshold", "on"), expected, repr(on),
                    did_you_mean(on, choices) or "add it under data.ood_validation")
    for name in validation:
        if name != on:
            warnings.append(Problem(("data", "ood_validation", name), "an OOD validation set that threshold.on names",
                                    f"'{name}', unused", "set threshold: {fpr: ..., on: " + name + "}, or remove it",
                                    at_key=True))
    fixed = threshold.get("fixed")
    scores = norm.get("scores") if isinstance(norm.get("scores"), dict) else None
    if isinstance(fixed, dict) and scores is not None:
        misspelt = set()
        for name in (n for n in fixed if n not in scores):
            misspelt.add(closest(name, scores))
            ctx.add(("threshold", "fixed", name), f"a score defined under scores (one of: {', '.join(scores)})",
                    f"'{name}'", did_you_mean(name, scores), at_key=True)
        missing = [n for n in scores if n not in fixed and n not in misspelt]  # a typo is one issue
        if missing:
            ctx.add(("threshold", "fixed"), "a threshold for every score", f"none for {', '.join(missing)}",
                    "add them: every score needs a threshold")
        detector = norm.get("detector") if isinstance(norm.get("detector"), dict) else {}
        kinds = {n: s["kind"] for n, s in scores.items() if isinstance(s, dict)}
        for name, r in score_ranges(kinds, detector.get("num_classes")).items():
            value = fixed.get(name)
            below, above = (isinstance(value, float) and r[0] is not None and value < r[0],
                            isinstance(value, float) and r[1] is not None and value >= r[1])
            if below or above:
                warnings.append(Problem(("threshold", "fixed", name),
                                        f"a threshold inside the range of {describe_range(name, r)}", f"{value:g}",
                                        f"{name} > t.{name} is then " + ("always true" if below else "never true")))
    if threshold.get("per_class") is True and isinstance(fixed, dict):
        ctx.add(("threshold", "per_class"), "per_class with calibrated thresholds (tpr or fpr)", "fixed thresholds",
                "remove per_class, or calibrate the thresholds")
    if isinstance(norm.get("temporal"), dict):
        for key in (k for k in ("fpr", "fixed") if k in threshold):
            ctx.add(("threshold", key), "threshold tpr when temporal is set", f"'{key}'",
                    "track thresholds are calibrated at the ID TPR", at_key=True)
    return warnings


def _same_data(a, b) -> bool:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    if isinstance(a.get("digitsdet"), str) and a.get("digitsdet") == b.get("digitsdet"):
        return True
    paths = [x.get("annotations") for x in (a, b)]
    return all(isinstance(p, str) for p in paths) and os.path.normpath(paths[0]) == os.path.normpath(paths[1])


def _describe_source(source: dict) -> str:
    if isinstance(source.get("digitsdet"), str):
        return f"digitsdet: {source['digitsdet']}"
    return f"annotations: {source.get('annotations')}"


def _threshold(t: dict | None) -> ThresholdSpec:
    t = t or {}
    calibrated_at_tpr = "fpr" not in t and "fixed" not in t
    return ThresholdSpec(tpr=t.get("tpr", DEFAULT_TPR) if calibrated_at_tpr else None,
                         detector_score=t.get("detector_score", DEFAULT_DETECTOR_SCORE), fpr=t.get("fpr"),
                         on=t.get("on"), fixed=dict(t.get("fixed") or {}), per_class=t.get("per_class", False))


# --- building the dataclasses (only for a spec without errors) ------------------------------
def _build(norm: dict, raw: dict, rule: Rule, base: Path, warnings: tuple) -> Spec:
    det, data = norm["detector"], norm["data"]
    if det["kind"] == "onnx":
        detector = DetectorSpec(
            kind="onnx", arch="", weights=str(_resolve(base, det["path"])), num_classes=det.get("num_classes"),
            score_thresh=det["score_thresh"], device=det["device"], layout=det["layout"],
            tensors=dict(det["tensors"]), input=det.get("input"), outputs=dict(det["outputs"]),
            nms_thresh=det["nms_thresh"], max_detections=det["max_detections"], multi_label=det["multi_label"],
            activation=det["activation"], preprocess=det["preprocess"], batch_size=det["batch_size"],
        )
    else:
        weights = det["weights"]
        if not weights.startswith("builtin:"):
            weights = str(_resolve(base, weights))
        detector = DetectorSpec(
            kind=det["kind"], arch=det["arch"], weights=weights, num_classes=det.get("num_classes"),
            min_size=det.get("min_size"), max_size=det.get("max_size"),
            score_thresh=det["score_thresh"], device=det["device"], batch_size=det.get("batch_size"),
        )

    def source(d: dict | None) -> DataSource | None:
        if d is None:
            return None
        return DataSource(digitsdet=d.get("digitsdet"), annotations=_resolve(base, d.get("annotations")),
                          images=_resolve(base, d.get("images")), max_images=d.get("max_images"),
                          protocol=d.get("protocol", "box"), max_boxes=d.get("max_boxes"))

    return Spec(
        path=None,
        version=norm["version"],
        detector=detector,
        data=DataSpec(fit=source(data.get("fit")), calibration=source(data["calibration"]),
                      id_test=source(data.get("id_test")),
                      ood={k: source(v) for k, v in (data.get("ood") or {}).items()},
                      ood_validation={k: source(v) for k, v in (data.get("ood_validation") or {}).items()}),
        taps=dict(norm["taps"]),
        scores={name: ScoreSpec(kind=s["kind"], tap=s["tap"],
                                params={p: s[p] for p in SCORE_KIND_TABLE[s["kind"]].params})
                for name, s in norm["scores"].items()},
        threshold=_threshold(norm.get("threshold")),
        rule=rule,
        output=OutputSpec(dir=_resolve(base, (norm.get("output") or {}).get("dir"))),
        warnings=warnings,
        raw=raw,
        temporal=_temporal(norm.get("temporal")),
        certify=_certify(norm.get("certify")),
        run=_run(norm.get("run")),
    )


def _run(r: dict | None) -> RunSpec:
    if r is None:
        return RunSpec()
    ray = r.get("ray")
    return RunSpec(workers=r["workers"], shard_images=r["shard_images"],
                   ray=None if ray is None else RaySpec(address=ray.get("address"), workers=ray["workers"],
                                                        gpus_per_worker=float(ray["gpus_per_worker"])))


def _certify(c: dict | None) -> CertifySpec | None:
    if c is None:
        return None
    return CertifySpec(tap=c["tap"], eps=c["eps"], norm=str(c["norm"]), method=c["method"], engine=c["engine"],
                       exact=c["exact"], timeout_s=c["timeout_s"], radius=c["radius"], domain=c["domain"])


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
