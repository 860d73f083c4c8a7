"""Gate policies (the spec's `gate:` list or a `--policy` file): what a per-key schema cannot see.

- names: a policy's score is a score of the spec (the rule is a flag, not a score), its data
  set is an OOD set of `data.ood` or `id_test`, and the metric exists on that set;
- direction: a baseline limit bounds the harmful direction (`max_drop` for AUROC, `max_rise`
  for FPR95);
- consistency: absolute policies on one (metric, score, data set) leave some value in [0, 1]
  that passes them all (a plain interval intersection).

Problems are reported as located `Problem`s, like every other spec check.

>>> names = GateNames(scores=("energy",), ood=("near",), has_id_test=True)
>>> targets(GatePolicy("auroc", op=">=", value=0.9), names)
[('energy', 'ood/near')]
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from certood.spec.model import GatePolicy
from certood.spec.schema import Collector, Problem, did_you_mean
from certood.spec.source import INVALID, KeyPath, Loc
from certood.spec.v1 import GATE_ID_TEST, GATE_METRIC_TABLE, SCORE_NAME

RULE_HINT = "the rule is a flag, not a score: gate it with rule_ood_flag_rate or rule_id_tpr"


@dataclass(frozen=True)
class GateNames:
    """The names a policy may refer to. None: unknown (that part of the spec is invalid and
    reported already), so checks against it are skipped rather than piling up."""

    scores: tuple[str, ...] | None
    ood: tuple[str, ...] | None
    has_id_test: bool | None

    @classmethod
    def from_raw(cls, raw: dict) -> GateNames:
        scores, data = raw.get("scores"), raw.get("data")
        ood = data.get("ood", {}) if isinstance(data, dict) else None
        return cls(
            scores=tuple(k for k in scores if re.fullmatch(SCORE_NAME, k)) if isinstance(scores, dict) else None,
            ood=tuple(ood) if isinstance(ood, dict) else None,
            has_id_test=("id_test" in data) if isinstance(data, dict) else None,
        )

    @classmethod
    def from_spec(cls, spec) -> GateNames:
        return cls(tuple(spec.scores), tuple(spec.data.ood), spec.data.id_test is not None)


def dataset_key(name: str) -> str:
    """How results name a data set: "id_test", or "ood/NAME" for an OOD set."""
    return name if name == GATE_ID_TEST else f"ood/{name}"


def targets(policy: GatePolicy, names: GateNames) -> list[tuple[str | None, str]]:
    """The (score or None, data set key) pairs a policy is evaluated on: an omitted score means
    every score of the spec, an omitted data set every set the metric exists on (each OOD
    set; id_test for mAP; id_test and each OOD set for certificate rates)."""
    metric = GATE_METRIC_TABLE[policy.metric]
    scores: list = [None] if not metric.per_score else [policy.score] if policy.score else list(names.scores or ())
    if policy.dataset is not None:
        sets = [dataset_key(policy.dataset)]
    else:
        ood = [dataset_key(n) for n in names.ood or ()]
        with_id = [GATE_ID_TEST] if names.has_id_test else []
        sets = {"ood": ood, "id_test": [GATE_ID_TEST], "any": with_id + ood}[metric.datasets]
    return [(s, d) for s in scores for d in sets]


# --- per-entry cross-checks ------------------------------------------------------------------
def check_policy_entries(entries: list, names: GateNames, ctx: Collector, prefix: KeyPath = ("gate",)) -> None:
    """Report names and directions that do not fit the spec, for each schema-normalised entry."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
            continue
        path = prefix + (i,)
        metric_name = entry["metric"]
        metric = GATE_METRIC_TABLE[metric_name]
        _check_score(entry.get("score"), metric_name, metric.per_score, names, path, ctx)
        _check_dataset(entry.get("dataset"), metric_name, metric.datasets, names, path, ctx)
        baseline = entry.get("baseline")
        if isinstance(baseline, dict) and len(baseline) == 1:  # both keys: reported by the schema
            wrong = "max_rise" if metric.higher_is_better else "max_drop"
            right = "max_drop" if metric.higher_is_better else "max_rise"
            if wrong in baseline:
                better = "higher" if metric.higher_is_better else "lower"
                ctx.add(path + ("baseline", wrong), f"{right} ({metric_name}: {better} is better)",
                        f"'{wrong}'", f"a {wrong} on {metric_name} would limit an improvement; use {right}",
                        at_key=True)


def _check_score(score, metric_name: str, per_score: bool, names: GateNames, path: KeyPath,
                 ctx: Collector) -> None:
    if not isinstance(score, str):
        return
    if not per_score:
        ctx.add(path + ("score",), f"no 'score' key ({metric_name} is not read per score)", f"score '{score}'",
                "remove it", at_key=True)
    elif names.scores is not None and score not in names.scores:
        expected = f"a score defined under scores (one of: {', '.join(names.scores)})"
        hint = RULE_HINT if score == "rule" else did_you_mean(score, names.scores)
        ctx.add(path + ("score",), expected, repr(score), hint)


def _check_dataset(dataset, metric_name: str, kind: str, names: GateNames, path: KeyPath,
                   ctx: Collector) -> None:
    ood = list(names.ood) if names.ood is not None else None
    if dataset is None:  # defaults: they must exist
        if kind == "id_test" and names.has_id_test is False:
            ctx.add(path + ("metric",), f"{metric_name} on data.id_test", "a spec without data.id_test",
                    "add data.id_test to the spec")
        elif kind == "ood" and ood == []:
            ctx.add(path + ("metric",), f"{metric_name} on the OOD sets of data.ood", "a spec without OOD sets",
                    "add data.ood to the spec")
        return
    if not isinstance(dataset, str):
        return
    if kind == "id_test":
        if dataset != GATE_ID_TEST:
            ctx.add(path + ("dataset",), f"{GATE_ID_TEST} ({metric_name} is measured on ID test data)",
                    repr(dataset), "remove the key: it defaults to id_test")
        elif names.has_id_test is False:
            ctx.add(path + ("dataset",), "a data set the spec defines", "'id_test', but data.id_test is missing",
                    "add data.id_test to the spec")
        return
    if dataset == GATE_ID_TEST:
        if kind == "ood":
            ctx.add(path + ("dataset",), f"an OOD set ({metric_name} compares ID with OOD boxes)"
                    + (f": one of {', '.join(ood)}" if ood else ""), repr(dataset),
                    "name an OOD set of data.ood, or remove the key for all of them")
        elif names.has_id_test is False:
            ctx.add(path + ("dataset",), "a data set the spec defines", "'id_test', but data.id_test is missing",
                    "add data.id_test to the spec")
        return
    if ood is not None and dataset not in ood:
        choices = ood + ([GATE_ID_TEST] if kind == "any" and names.has_id_test else [])
        expected = (f"an OOD set defined under data.ood (one of: {', '.join(choices)})" if choices
                    else "an OOD set defined under data.ood (the spec defines none)")
        ctx.add(path + ("dataset",), expected, repr(dataset), did_you_mean(dataset, choices))


def build_policies(entries: list, values: dict, file: str, bad: set[int],
                   prefix: KeyPath = ("gate",)) -> list[tuple[KeyPath, GatePolicy]]:
    """GatePolicy objects (with their source position) for the entries without problems."""
    out = []
    for i, entry in enumerate(entries):
        if i in bad or not isinstance(entry, dict) or any(v is INVALID for v in entry.values()):
            continue
        loc = values.get(prefix + (i,)) or Loc(1, 1)
        baseline = entry.get("baseline") or {}
        out.append((prefix + (i,), GatePolicy(
            metric=entry["metric"], op=entry.get("op"), value=entry.get("value"), score=entry.get("score"),
            dataset=entry.get("dataset"), max_drop=baseline.get("max_drop"), max_rise=baseline.get("max_rise"),
            warn=entry.get("warn"), name=entry.get("name"), file=loc.file or file, line=loc.line, column=loc.column,
        )))
    return out


# --- consistency: interval intersection ------------------------------------------------------
@dataclass(frozen=True)
class _Interval:
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    @property
    def empty(self) -> bool:
        return self.lo > self.hi or (self.lo == self.hi and (self.lo_open or self.hi_open))

    def __and__(self, other: _Interval) -> _Interval:
        if self.lo != other.lo:
            lo, lo_open = max((self.lo, self.lo_open), (other.lo, other.lo_open), key=lambda b: b[0])
        else:
            lo, lo_open = self.lo, self.lo_open or other.lo_open
        if self.hi != other.hi:
            hi, hi_open = min((self.hi, self.hi_open), (other.hi, other.hi_open), key=lambda b: b[0])
        else:
            hi, hi_open = self.hi, self.hi_open or other.hi_open
        return _Interval(lo, hi, lo_open, hi_open)


DOMAIN = _Interval(0.0, 1.0)  # every gate metric is a rate, an AUC or an AP
_INF = float("inf")


def _passing(policy: GatePolicy) -> _Interval:
    v = policy.value
    return {">=": _Interval(v, _INF), ">": _Interval(v, _INF, lo_open=True),
            "<=": _Interval(-_INF, v), "<": _Interval(-_INF, v, hi_open=True)}[policy.op]


def conflicts(policies: list[tuple[KeyPath | None, GatePolicy]], names: GateNames) -> list[Problem]:
    """Problems for absolute policies no value can pass: alone (outside [0, 1]) or together
    with earlier policies on the same (metric, score, data set). Entries with path None
    (e.g. the spec's policies when checking a policy file) are compared with but not reported."""
    problems: list[Problem] = []
    accepted: dict[tuple, tuple[_Interval, list[GatePolicy]]] = {}
    for path, policy in policies:
        if policy.is_baseline:
            continue
        passing = _passing(policy)
        if (passing & DOMAIN).empty:
            if path is not None:
                problems.append(Problem(path, f"a bound that some {policy.metric} value in [0, 1] passes",
                                        f"'{policy.describe()}'", f"{policy.metric} always lies in [0, 1]"))
            continue
        reported = False
        for score, dataset in targets(policy, names):
            key = (policy.metric, score, dataset)
            interval, earlier = accepted.get(key, (DOMAIN, []))
            both = interval & passing
            if not both.empty:
                accepted[key] = (both, earlier + [policy])
            elif path is not None and not reported:
                reported = True
                clash = [p for p in earlier if (_passing(p) & passing & DOMAIN).empty] or earlier
                what = "; ".join(f"'{p.describe()}' at {p.where}" for p in clash)
                on = f"{policy.metric}" + (f"[{score}]" if score else "") + f" on {dataset}"
                problems.append(Problem(path, f"a bound compatible with {what}",
                                        f"'{policy.describe()}': no {on} passes both",
                                        "contradictory policies: remove or relax one of them"))
    return problems
