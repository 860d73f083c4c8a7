"""``certood gate``: pass or fail a model release on ``certood check`` results, by policy.

A policy (the spec's ``gate:`` list, or a ``--policy`` file) bounds one metric of a check's
``metrics.json``, absolutely (``auroc >= 0.85``) or relative to a baseline run
(``max_drop: 0.02``). Each policy is evaluated on every (score, data set) it names, or
defaults to, and gets one status (the deepchecks / evidently taxonomy):

- ``PASS``    the limit holds;
- ``WARN``    it holds, but within the policy's ``warn`` margin of failing;
- ``FAIL``    it does not hold;
- ``ERROR``   the metric could not be read: a data set or score missing from the results, a
  set the check skipped, NaN, a malformed or missing results file. One policy's error never
  stops the others;
- ``SKIPPED`` nothing to judge yet: certificate metrics on results without certificates, or a
  baseline policy when no baseline was given.

Details state the observed value, the limit and the number of boxes, e.g.
``energy AUROC 0.812 < 0.850 on ood/near (1,204 ID / 880 OOD boxes)``.
Results made with another spec (fingerprint mismatch) give a WARN note, never silence.

Where certificates are read from, once certification writes them (an assumption until then)::

    metrics["certificates"][DATASET] = {"certified_rate": float, "undecided_rate": float,
                                        "n_boxes": int}    # DATASET: "id_test" or an OOD set name

Nothing here prints or exits: `evaluate_gate` returns a `GateReport`, the ``render_*``
functions turn one into text, JSON, JUnit XML, GitHub workflow commands or Markdown, and the
CLI chooses the exit code.

>>> r = PolicyResult("p", Status.FAIL, "AUROC 0.8 < 0.9", "auroc", "energy", "ood/near", ">=", 0.9, 0.8)
>>> PolicyResult.from_dict(r.to_dict()) == r
True
"""
from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

from certood.spec import Spec
from certood.spec.model import GatePolicy
from certood.spec.policy import GateNames, targets
from certood.spec.v1 import GATE_METRIC_TABLE

FORMAT = "certood-gate"
FORMAT_VERSION = 1
TOLERANCE = 1e-12  # values closer than this to a limit count as equal to it (float noise)


class Status(str, Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"

    def __str__(self) -> str:
        return self.value


# --- result objects ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """One ``certood check`` output directory as the gate read it."""

    dir: str
    spec_fingerprint: str | None = None
    detector_sha256: str | None = None
    error: str | None = None  # why its metrics.json could not be used, if it could not

    @classmethod
    def from_dict(cls, d: dict) -> RunInfo:
        return cls(**d)


@dataclass(frozen=True)
class GateNote:
    """A finding about the inputs rather than a policy (e.g. results from another spec)."""

    status: Status
    title: str
    message: str

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, d: dict) -> GateNote:
        return cls(Status(d["status"]), d["title"], d["message"])


@dataclass(frozen=True)
class PolicyResult:
    """The outcome of one policy on one (score, data set).

    `op` and `threshold` are the comparison the observed value had to satisfy: the policy's
    own for absolute policies; ``>= baseline - max_drop`` or ``<= baseline + max_rise`` for
    baseline ones (then `baseline` and `delta` = observed - baseline are set too).
    """

    name: str
    status: Status
    details: str
    metric: str
    score: str | None
    dataset: str  # "id_test" or "ood/NAME"
    op: str | None = None
    threshold: float | None = None
    observed: float | None = None
    baseline: float | None = None
    delta: float | None = None
    warn: float | None = None
    n_id: int | None = None  # ID boxes behind the value (OOD metrics)
    n_ood: int | None = None  # OOD boxes behind the value (OOD metrics)
    n_images: int | None = None  # id_test images (mAP)
    n_boxes: int | None = None  # boxes behind the value (mAP, certificates)
    policy: str = ""  # the policy as written
    where: str = ""  # file:line:column of the policy
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, d: dict) -> PolicyResult:
        return cls(**{**d, "status": Status(d["status"])})


@dataclass(frozen=True)
class GateReport:
    """Every policy result and note of one gate run, with the identity of what was compared."""

    spec_path: str | None
    spec_fingerprint: str
    candidate: RunInfo
    baseline: RunInfo | None
    notes: tuple[GateNote, ...]
    results: tuple[PolicyResult, ...]

    @property
    def statuses(self) -> list[Status]:
        return [r.status for r in self.results] + [n.status for n in self.notes]

    @property
    def status(self) -> Status:
        """FAIL > ERROR > WARN > PASS; SKIPPED only when every policy was skipped."""
        found = set(self.statuses)
        for s in (Status.FAIL, Status.ERROR, Status.WARN, Status.PASS):
            if s in found:
                return s
        return Status.SKIPPED if found else Status.PASS

    @property
    def counts(self) -> dict[str, int]:
        return {s.value: self.statuses.count(s) for s in Status}

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "status": self.status.value, "counts": self.counts,
            "spec": {"path": self.spec_path, "fingerprint": self.spec_fingerprint},
            "candidate": asdict(self.candidate),
            "baseline": asdict(self.baseline) if self.baseline else None,
            "notes": [n.to_dict() for n in self.notes],
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, d: dict) -> GateReport:
        return cls(
            spec_path=d["spec"]["path"], spec_fingerprint=d["spec"]["fingerprint"],
            candidate=RunInfo.from_dict(d["candidate"]),
            baseline=RunInfo.from_dict(d["baseline"]) if d.get("baseline") else None,
            notes=tuple(GateNote.from_dict(n) for n in d["notes"]),
            results=tuple(PolicyResult.from_dict(r) for r in d["results"]),
        )


# --- reading results -----------------------------------------------------------------------
def read_metrics(results_dir: Path) -> tuple[dict | None, str | None]:
    """(metrics.json of a complete ``certood check`` output directory, None) or (None, why not)."""
    from certood.artifacts import results_file_changed, results_incomplete

    results_dir = Path(results_dir)
    path = results_dir / "metrics.json"
    # only a complete run is judged: certood-results.json is written last and lists metrics.json's
    # sha256, so an interrupted run, an older certood's mix or an edited metrics.json is refused
    why = results_incomplete(results_dir) or results_file_changed(results_dir, "metrics.json")
    if why:
        return None, why
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{results_dir}: no metrics.json (not a `certood check` output directory)"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path}: unreadable ({e})"
    except ValueError as e:
        return None, f"{path}: not valid JSON ({e})"
    if not isinstance(metrics, dict):
        return None, f"{path}: expected a JSON object, found {type(metrics).__name__}"
    return metrics, None


class _Unavailable(Exception):
    """A metric value that cannot be judged; `status` is ERROR or SKIPPED."""

    def __init__(self, reason: str, status: Status = Status.ERROR):
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass(frozen=True)
class _Observed:
    value: float
    n_id: int | None = None
    n_ood: int | None = None
    n_images: int | None = None
    n_boxes: int | None = None


def _count(x) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _mapping(container, key: str, what: str) -> dict:
    value = container.get(key) if isinstance(container, dict) else None
    if value is None:
        raise _Unavailable(f"the results have no {what}")
    if not isinstance(value, dict):
        raise _Unavailable(f"the results' {what} is malformed (expected a JSON object)")
    return value


def _number(value, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        found = "null (not computed)" if value is None else f"{json.dumps(value)[:40]}, not a number"
        raise _Unavailable(f"{label} is {found} in the results")
    value = float(value)
    if not math.isfinite(value):
        raise _Unavailable(f"{label} is {value} in the results")
    if not 0 <= value <= 1:
        raise _Unavailable(f"{label} is {value}, outside [0, 1], in the results")
    return value


def _ood_entry(metrics: dict, dataset: str) -> dict:
    name = dataset.removeprefix("ood/")
    ood = _mapping(metrics, "ood", "'ood' section")
    if name not in ood:
        held = ", ".join(ood) or "none"
        raise _Unavailable(f"the results have no OOD set '{name}' (they hold: {held})")
    entry = ood[name]
    if not isinstance(entry, dict):
        raise _Unavailable(f"the results' entry for {dataset} is malformed (expected a JSON object)")
    if "skipped" in entry:
        raise _Unavailable(f"certood check skipped {dataset}: {entry['skipped']}")
    return entry


def observe(metrics: dict, metric: str, score: str | None, dataset: str) -> _Observed:
    """Read one metric of one (score, data set) from a metrics.json, or raise _Unavailable."""
    if metric in ("map", "map50", "map75"):
        entry = _mapping(metrics, "id_test", "id_test metrics")
        if entry.get(metric) == -1:
            raise _Unavailable(f"{metric} is -1 in the results (pycocotools: id_test has no ground truth)")
        return _Observed(_number(entry.get(metric), metric), n_images=_count(entry.get("n_images")),
                         n_boxes=_count(entry.get("n_boxes")))
    if metric in ("certified_rate", "undecided_rate"):
        if metrics.get("certificates") is None:
            raise _Unavailable("the results carry no certificates (certification did not run)", Status.SKIPPED)
        certs = _mapping(metrics, "certificates", "certificates")
        key = dataset.removeprefix("ood/")
        entry = _mapping(certs, key, f"certificates for {dataset}")
        return _Observed(_number(entry.get(metric), metric), n_boxes=_count(entry.get("n_boxes")))
    entry = _ood_entry(metrics, dataset)
    id_test = metrics.get("id_test") if isinstance(metrics.get("id_test"), dict) else {}
    if metric.startswith("rule_"):
        rule = _mapping(entry, "rule", f"rule rates for {dataset}")
        key = metric.removeprefix("rule_")
        return _Observed(_number(rule.get(key), f"rule {key}"), n_id=_count(id_test.get("n_boxes")),
                         n_ood=_count(entry.get("n_boxes")))
    scores = _mapping(entry, "scores", f"scores for {dataset}")
    if score not in scores:
        raise _Unavailable(f"the results have no score '{score}' on {dataset} "
                           f"(they hold: {', '.join(scores) or 'none'})")
    values = scores[score]
    if not isinstance(values, dict):
        raise _Unavailable(f"the results' metrics of score '{score}' on {dataset} are malformed")
    return _Observed(_number(values.get(metric), metric), n_id=_count(values.get("n_id")),
                     n_ood=_count(values.get("n_ood")))


# --- judging -------------------------------------------------------------------------------
_NEGATION = {">=": "<", ">": "<=", "<=": ">", "<": ">="}


def _holds(x: float, op: str, limit: float) -> bool:
    return {">=": x >= limit - TOLERANCE, ">": x > limit + TOLERANCE,
            "<=": x <= limit + TOLERANCE, "<": x < limit - TOLERANCE}[op]


def _judge(x: float, op: str, limit: float, warn: float | None) -> Status:
    if not _holds(x, op, limit):
        return Status.FAIL
    if warn is not None:
        margin_limit = limit + warn if op in (">=", ">") else limit - warn
        if not _holds(x, op, margin_limit):
            return Status.WARN
    return Status.PASS


def _pair(a: float, b: float, signed: bool = False) -> tuple[str, str]:
    """Both numbers with 3 decimals, or as many more as it takes to tell them apart."""
    sign = "+" if signed else ""
    for digits in range(3, 10):
        sa, sb = f"{a:{sign}.{digits}f}", f"{b:{sign}.{digits}f}"
        if sa != sb or abs(a - b) <= TOLERANCE:
            break
    return sa, sb


def _boxes(obs: _Observed) -> str:
    def n(x):
        return "?" if x is None else f"{x:,}"

    if obs.n_id is not None or obs.n_ood is not None:
        return f"{n(obs.n_id)} ID / {n(obs.n_ood)} OOD boxes"
    if obs.n_images is not None:
        return f"{n(obs.n_images)} images, {n(obs.n_boxes)} boxes"
    if obs.n_boxes is not None:
        return f"{n(obs.n_boxes)} boxes"
    return ""


def _label(metric: str, score: str | None) -> str:
    label = GATE_METRIC_TABLE[metric].label
    return f"{score} {label}" if score else label


def _result_name(policy: GatePolicy, score: str | None, dataset: str, n_targets: int) -> str:
    if policy.name:
        if n_targets == 1:
            return policy.name
        return f"{policy.name} [{score + ', ' if score else ''}{dataset}]"
    head = policy.metric + (f"[{score}]" if score else "") + f" {dataset}"
    if policy.is_baseline:
        limit = f"max_drop {policy.max_drop:g}" if policy.max_drop is not None else f"max_rise {policy.max_rise:g}"
        return f"{head} vs baseline ({limit})"
    return f"{head} {policy.op} {policy.value:g}"


def evaluate_policy(policy: GatePolicy, score: str | None, dataset: str, candidate: tuple[dict | None, str | None],
                    baseline: tuple[dict | None, str | None] | None, n_targets: int = 1) -> PolicyResult:
    """One policy on one (score, data set); never raises (a failure to judge is ERROR)."""
    what = _label(policy.metric, score)
    base = PolicyResult(
        name=_result_name(policy, score, dataset, n_targets), status=Status.ERROR, details="",
        metric=policy.metric, score=score, dataset=dataset, warn=policy.warn, policy=policy.describe(),
        where=policy.where, file=policy.file, line=policy.line, column=policy.column,
    )
    try:
        metrics, error = candidate
        if metrics is None:
            raise _Unavailable(f"results: {error}")
        obs = observe(metrics, policy.metric, score, dataset)
        counts = {"n_id": obs.n_id, "n_ood": obs.n_ood, "n_images": obs.n_images, "n_boxes": obs.n_boxes}
        boxes = _boxes(obs)
        where = f" on {dataset}" + (f" ({boxes})" if boxes else "")
        if not policy.is_baseline:
            status = _judge(obs.value, policy.op, policy.value, policy.warn)
            a, b = _pair(obs.value, policy.value)
            rel = _NEGATION[policy.op] if status is Status.FAIL else policy.op
            details = f"{what} {a} {rel} {b}{where}"
            if status is Status.WARN:
                details += f"; within the warn margin {policy.warn:g}"
            return replace(base, status=status, details=details, op=policy.op, threshold=policy.value,
                           observed=obs.value, **counts)
        if baseline is None:
            raise _Unavailable("no baseline given (pass --baseline DIR)", Status.SKIPPED)
        base_metrics, base_error = baseline
        if base_metrics is None:
            raise _Unavailable(f"baseline: {base_error}")
        try:
            ref = observe(base_metrics, policy.metric, score, dataset).value
        except _Unavailable as u:
            raise _Unavailable(f"baseline: {u.reason}", u.status) from None
        delta = obs.value - ref
        if policy.max_drop is not None:
            op, limit, allowed, kind = ">=", ref - policy.max_drop, -policy.max_drop, f"max_drop {policy.max_drop:g}"
        else:
            op, limit, allowed, kind = "<=", ref + policy.max_rise, policy.max_rise, f"max_rise {policy.max_rise:g}"
        status = _judge(obs.value, op, limit, policy.warn)
        a, r = _pair(obs.value, ref)
        d, al = _pair(delta, allowed, signed=True)
        rel = _NEGATION[op] if status is Status.FAIL else op
        details = f"{what} {a} vs baseline {r}: delta {d} {rel} {al} ({kind}){where}"
        if status is Status.WARN:
            details += f"; within the warn margin {policy.warn:g}"
        return replace(base, status=status, details=details, op=op, threshold=limit, observed=obs.value,
                       baseline=ref, delta=delta, **counts)
    except _Unavailable as u:
        return replace(base, status=u.status, details=f"{what} on {dataset}: {u.reason}")
    except Exception as e:  # noqa: BLE001 - a policy that cannot be judged is ERROR; the others go on
        return replace(base, status=Status.ERROR,
                       details=f"{what} on {dataset}: internal error {type(e).__name__}: {e} (please report it)")


def _notes(spec: Spec, candidate: dict | None, baseline: dict | None, results_dir: Path) -> list[GateNote]:
    notes = []
    if candidate is not None:
        theirs, ours = candidate.get("spec_fingerprint"), spec.fingerprint()
        if not isinstance(theirs, str):
            notes.append(GateNote(Status.WARN, "results provenance",
                                  f"{results_dir}/metrics.json carries no spec fingerprint: it cannot be "
                                  "matched to this spec"))
        elif theirs != ours:
            notes.append(GateNote(Status.WARN, "results provenance",
                                  f"{results_dir}/metrics.json was made with another spec (fingerprint "
                                  f"{theirs[:12]}, this spec {ours[:12]}: detector, data.fit, data.calibration, "
                                  "taps, scores or threshold differ); rerun `certood check` with this spec"))
    if candidate is not None and baseline is not None:
        if candidate.get("protocol") != baseline.get("protocol"):
            notes.append(GateNote(Status.WARN, "baseline protocol",
                                  "the baseline was measured under another box-level protocol: deltas may "
                                  "compare different things"))
    return notes


def _run_info(path: Path, metrics: dict | None, error: str | None) -> RunInfo:
    def text(key):
        value = metrics.get(key) if metrics else None
        return value if isinstance(value, str) else None

    return RunInfo(str(path), text("spec_fingerprint"), text("detector_sha256"), error)


def evaluate_gate(spec: Spec, policies: tuple[GatePolicy, ...] | list[GatePolicy], results_dir: Path,
                  baseline_dir: Path | None = None) -> GateReport:
    """Judge every policy on the ``certood check`` outputs in `results_dir` (and `baseline_dir`).

    Missing or corrupt results do not raise: every policy that needs them is ERROR, so a
    report (and a JUnit file) still comes out.
    """
    candidate = read_metrics(results_dir)
    baseline = read_metrics(baseline_dir) if baseline_dir is not None else None
    names = GateNames.from_spec(spec)
    results = []
    for policy in policies:
        pairs = targets(policy, names)
        for score, dataset in pairs:
            results.append(evaluate_policy(policy, score, dataset, candidate, baseline, len(pairs)))
    return GateReport(
        spec_path=str(spec.path) if spec.path else None,
        spec_fingerprint=spec.fingerprint(),
        candidate=_run_info(results_dir, *candidate),
        baseline=_run_info(baseline_dir, *baseline) if baseline is not None else None,
        notes=tuple(_notes(spec, candidate[0], baseline[0] if baseline else None, results_dir)),
        results=tuple(results),
    )


# --- rendering -----------------------------------------------------------------------------
def verdict(report: GateReport, warn_as_fail: bool = False) -> str:
    """One word (or three) for the whole gate, as the exit code will say it."""
    status = report.status
    if status is Status.FAIL or (warn_as_fail and status is Status.WARN):
        return "failed"
    if status is Status.ERROR:
        return "errored"
    if status is Status.WARN:
        return "passed with warnings"
    return "passed" if status is Status.PASS else "skipped everything"


def counts_line(report: GateReport) -> str:
    c = report.counts

    def n(k: str, one: str, many: str) -> str:
        return f"{c[k]} {one if c[k] == 1 else many}"

    return ", ".join([n("FAIL", "failed", "failed"), n("ERROR", "error", "errors"), n("WARN", "warning", "warnings"),
                      n("PASS", "passed", "passed"), n("SKIPPED", "skipped", "skipped")])


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "unknown"


def _header(report: GateReport) -> str:
    parts = [f"spec {report.spec_path} (fingerprint {_short(report.spec_fingerprint)})",
             f"results {report.candidate.dir} (detector {_short(report.candidate.detector_sha256)})"]
    if report.baseline:
        parts.append(f"baseline {report.baseline.dir} (detector {_short(report.baseline.detector_sha256)})")
    return ", ".join(parts)


def _rows(report: GateReport) -> list[tuple[Status, str, str, PolicyResult | None]]:
    """(status, name, details, result) for notes first, then policy results."""
    return ([(n.status, n.title, n.message, None) for n in report.notes]
            + [(r.status, r.name, r.details, r) for r in report.results])


def render_text(report: GateReport, warn_as_fail: bool = False) -> str:
    """Human-readable: one line per note and policy result, then the verdict."""
    lines = [f"certood gate: {_header(report)}"]
    for status, name, details, _ in _rows(report):
        lines.append(f"{status.value:<7}  {name}: {details}")
    lines.append(f"gate {verdict(report, warn_as_fail)}: {counts_line(report)}")
    return "\n".join(lines) + "\n"


def render_json(report: GateReport) -> str:
    return json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"


_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml(text: str) -> str:
    return _XML_BAD.sub("?", text)


def render_junit(report: GateReport, warn_as_fail: bool = False) -> str:
    """JUnit XML: one testcase per note and policy result. FAIL -> <failure>, ERROR -> <error>,
    SKIPPED -> <skipped>, WARN -> a passing case with the details in <system-out> (a
    <failure> under --warn-as-fail)."""
    cases, tally = [], {"failures": 0, "errors": 0, "skipped": 0}
    for status, name, details, result in _rows(report):
        case = ET.Element("testcase", {
            "classname": "certood.gate." + (result.dataset.replace("/", ".") if result else "inputs"),
            "name": _xml(name), "time": "0"})
        if result is not None and result.file:
            case.set("file", _xml(result.file))
            case.set("line", str(result.line))
        failing = status is Status.FAIL or (warn_as_fail and status is Status.WARN)
        if failing:
            tally["failures"] += 1
            ET.SubElement(case, "failure", {"type": status.value, "message": _xml(details)}).text = _xml(details)
        elif status is Status.ERROR:
            tally["errors"] += 1
            ET.SubElement(case, "error", {"type": "ERROR", "message": _xml(details)}).text = _xml(details)
        elif status is Status.SKIPPED:
            tally["skipped"] += 1
            ET.SubElement(case, "skipped", {"message": _xml(details)})
        else:
            ET.SubElement(case, "system-out").text = _xml(f"{status.value}: {details}")
        cases.append(case)
    counts = {"tests": str(len(cases)), **{k: str(v) for k, v in tally.items()}, "time": "0"}
    suites = ET.Element("testsuites", {"name": "certood gate", **counts})
    suite = ET.SubElement(suites, "testsuite", {"name": "certood gate", **counts})
    props = ET.SubElement(suite, "properties")
    for key, value in (("spec", report.spec_path), ("spec_fingerprint", report.spec_fingerprint),
                       ("results", report.candidate.dir),
                       ("results_spec_fingerprint", report.candidate.spec_fingerprint),
                       ("results_detector_sha256", report.candidate.detector_sha256),
                       ("baseline", report.baseline and report.baseline.dir),
                       ("baseline_spec_fingerprint", report.baseline and report.baseline.spec_fingerprint),
                       ("baseline_detector_sha256", report.baseline and report.baseline.detector_sha256),
                       ("status", report.status.value)):
        if value:
            ET.SubElement(props, "property", {"name": key, "value": _xml(value)})
    suite.extend(cases)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _gh_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(text: str) -> str:
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(report: GateReport, warn_as_fail: bool = False) -> str:
    """GitHub Actions workflow commands: ::error for FAIL and ERROR (and WARN under
    --warn-as-fail), ::warning for WARN, ::notice for SKIPPED and the closing verdict;
    annotations point at the policy's line in the spec or policy file. PASS stays quiet."""
    lines = []
    for status, name, details, result in _rows(report):
        if status is Status.PASS:
            continue
        command = {Status.FAIL: "error", Status.ERROR: "error", Status.SKIPPED: "notice",
                   Status.WARN: "error" if warn_as_fail else "warning"}[status]
        props = []
        if result is not None and result.file:
            props += [f"file={_gh_prop(result.file)}", f"line={result.line}", f"col={result.column}"]
        props.append(f"title={_gh_prop(f'certood gate {status.value}: {name}')}")
        lines.append(f"::{command} {','.join(props)}::{_gh_data(details)}")
    summary = f"gate {verdict(report, warn_as_fail)}: {counts_line(report)}"
    lines.append(f"::notice title=certood gate::{_gh_data(summary)}")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: GateReport, warn_as_fail: bool = False) -> str:
    """A Markdown summary (for $GITHUB_STEP_SUMMARY or a release note)."""
    lines = [f"## certood gate {verdict(report, warn_as_fail)}", "", counts_line(report) + ".", "",
             "| status | policy | details |", "|---|---|---|"]
    for status, name, details, _ in _rows(report):
        strong = status in (Status.FAIL, Status.ERROR) or (warn_as_fail and status is Status.WARN)
        shown = f"**{status.value}**" if strong else status.value
        lines.append(f"| {shown} | {_md(name)} | {_md(details)} |")
    lines += ["", f"Spec `{report.spec_path}` (fingerprint `{_short(report.spec_fingerprint)}`); "
              f"results `{report.candidate.dir}` (detector `{_short(report.candidate.detector_sha256)}`)"
              + (f"; baseline `{report.baseline.dir}` (detector `{_short(report.baseline.detector_sha256)}`)"
                 if report.baseline else "") + ".", ""]
    return "\n".join(lines)


__all__ = [
    "GateNote", "GateReport", "PolicyResult", "RunInfo", "Status", "evaluate_gate", "evaluate_policy",
    "observe", "read_metrics", "render_github", "render_json", "render_junit", "render_markdown",
    "render_text", "verdict",
]
