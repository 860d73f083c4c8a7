"""`certood recheck` re-proves the claim on file against the detector and the monitor.

One `certood check` on the tiny DigitsDet with the bundled detector (L-inf eps 0.005 at the RoI
tap, as specs/certified.yaml), then copies of its results, each altered in one way (the rows of
issue 21's audit, and a few more): every alteration must exit 1 with a message that names the
box (or the file and tensor) and what differs, while the honest results re-verify.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from certood import recheck as R
from certood.check import run_check
from certood.cli import main
from certood.spec import load_spec_text

EPS = 0.005
SPEC = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn", num_classes: 6}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train, max_images: 10}}
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 6}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test, max_images: 2}}
  ood:
    near: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 2}}
taps: {{roi: box_head.input, penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: 0.5, detector_score: f1}}
rule: "energy > t.energy or maha > t.maha"
certify: {{tap: roi, eps: {eps}, exact: z3}}
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory, digitsdet_root) -> Path:
    out = tmp_path_factory.mktemp("recheck") / "results"
    run_check(load_spec_text(SPEC.format(root=digitsdet_root, eps=EPS)), out)
    return out


# --- helpers: copy, alter, recheck --------------------------------------------------------------
def _records(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "boxes.jsonl").read_text().splitlines()]


def _write_records(d: Path, records: list[dict]) -> None:
    (d / "boxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _first(records: list[dict], verdicts=("certified_ood", "certified_id")) -> int:
    return next(i for i, r in enumerate(records) if r["certificate"]["verdict"] in verdicts)


def _edit_certificate(d: Path, change, verdicts=("certified_ood", "certified_id")) -> int:
    """Apply ``change(record)`` to the first box with one of ``verdicts``; its index."""
    records = _records(d)
    i = _first(records, verdicts)
    change(records[i])
    _write_records(d, records)
    return i


def _edit_features(d: Path, change, reseal: bool = True) -> None:
    """``change(tensors, meta)`` on the features file; ``reseal``: recompute its hashes, as a
    careful forger would (so only the ties to the detector and monitor can catch it)."""
    from safetensors.torch import save

    _, tensors, meta = R._load(d)
    change(tensors, meta)
    blob = R.features_blob(tensors, meta) if reseal else save(tensors, metadata={"certood": json.dumps(meta)})
    (d / R.FEATURES_FILE).write_bytes(blob)


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _copy(results: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(results, dst)
    return dst


def _recheck(d: Path, *flags: str) -> tuple[int, dict]:
    res = CliRunner().invoke(main, ["recheck", str(d), "--format", "json", *flags])
    assert res.exit_code in (0, 1), res.output
    return res.exit_code, json.loads(res.output)


def _detail(payload: dict, index: int) -> str:
    return next(b["detail"] for b in payload["disagreements"] if b["index"] == index)


# --- honest results -----------------------------------------------------------------------------
def test_honest_results_reverify(results):
    records = _records(results)
    verdicts = {r["certificate"]["verdict"] for r in records}
    assert {"certified_ood", "certified_id"} <= verdicts  # both kinds of certificate are rechecked
    code, payload = _recheck(results)
    assert code == 0, payload
    n = sum(r["certificate"]["verdict"] != "undecided" for r in records)
    assert payload["n_certified"] == n > 0 and payload["counts"]["confirmed"] == n
    assert payload["problems"] == [] and payload["detector_sha256"] == json.loads(
        (results / "metrics.json").read_text())["detector_sha256"]
    text = CliRunner().invoke(main, ["recheck", str(results)])
    assert text.exit_code == 0 and "all certificates re-verified" in text.output


def test_honest_results_reverify_from_the_images(results):
    code, payload = _recheck(results, "--from-images")
    assert code == 0, payload
    assert payload["from_images"] and payload["counts"]["confirmed"] == payload["n_certified"] > 0


# --- the audit's table: alterations that used to pass -------------------------------------------
def _last_bias(tensors) -> str:
    return max((k for k in tensors if k.startswith("head/") and k.endswith("/bias")),
               key=lambda k: int(k.split("/")[1]))


def test_head_bias_changed_in_the_features_file(results, tmp_path):
    d = _copy(results, tmp_path)
    key = {}

    def change(tensors, meta):
        key["k"] = _last_bias(tensors)
        tensors[key["k"]] = tensors[key["k"]] + 0.01

    _edit_features(d, change)
    code, payload = _recheck(d)
    assert code == 1
    msg = " ".join(payload["problems"])
    assert key["k"] in msg and "not the detector's" in msg and msg.count("sha256") >= 2


def test_mahalanobis_means_changed_in_the_features_file(results, tmp_path):
    d = _copy(results, tmp_path)
    _edit_features(d, lambda t, m: t.update({"score/maha/means": t["score/maha/means"] * 1.0001}))
    code, payload = _recheck(d)
    assert code == 1
    msg = " ".join(payload["problems"])
    assert "score/maha/means" in msg and "not the monitor's" in msg


def test_monitor_threshold_changed_in_the_manifest(results, tmp_path):
    d = _copy(results, tmp_path)
    _edit_json(d / "monitor" / "manifest.json", lambda m: m["thresholds"].update(maha=m["thresholds"]["maha"] * 10))
    code, payload = _recheck(d)
    assert code == 1
    assert any("manifest.json: thresholds maha" in p for p in payload["problems"]), payload["problems"]


def _move_feature(d: Path, index: int, delta: float) -> None:
    _edit_features(d, lambda t, m: t.update({f"box/{index}": t[f"box/{index}"] + delta}))


def _narrow_around_own(r: dict) -> None:
    """Stored bounds replaced by a false, narrower interval around the box's own scores."""
    r["certificate"]["score_bounds"] = {n: [v - 1e-6 * (1 + abs(v)), v + 1e-6 * (1 + abs(v))]
                                        for n, v in r["scores"].items()}


def _forge_undecided(eps: float):
    def forge(r: dict) -> None:
        r["certificate"].update(verdict="certified_ood" if r["flag"] else "certified_id", eps=eps, reason=None)
    return forge


FLIP = {"certified_ood": "certified_id", "certified_id": "certified_ood"}
# one alteration per certified box (the audit's per-certificate rows): what the message must say
PER_BOX = [
    (lambda r: r["certificate"].update(domain="any"), "claims domain 'any'"),
    (lambda r: r["certificate"].update(tap="box_head.output"), "claims tap 'box_head.output'"),
    (lambda r: r["certificate"].update(norm="2"), "claims norm '2'"),
    (lambda r: r["certificate"].update(method="ibp"), "claims method 'ibp'"),
    (lambda r: r["certificate"].update(exact="none"), "claims exact 'none'"),
    (_narrow_around_own, "narrower than the re-proven"),
    (lambda r: r["certificate"].update(eps=0.5), "claims eps 0.5"),
    (lambda r: r["certificate"].update(verdict=FLIP[r["certificate"]["verdict"]]), "the stored bounds give"),
    (lambda r: r["certificate"].update(margin=r["certificate"]["margin"] * 2), "but the stored bounds give"),
]


@pytest.mark.parametrize("flags", [(), ("--allow-unconfirmed",)])
def test_each_altered_certificate_is_named(results, tmp_path, flags):
    """Every per-certificate row of the table, each on its own box of one copy: each box is
    contradicted with its own reason (also under --allow-unconfirmed), the rest confirmed."""
    d = _copy(results, tmp_path)
    records = _records(d)
    certified = [i for i, r in enumerate(records) if r["certificate"]["verdict"] != "undecided"]
    undecided = [i for i, r in enumerate(records) if r["certificate"]["verdict"] == "undecided"]
    assert len(certified) > len(PER_BOX) + 1 and undecided
    expected = {}
    for i, (change, message) in zip(certified, PER_BOX):
        change(records[i])
        expected[i] = message
        if change is _narrow_around_own:  # a careful forger writes the margin that goes with them
            records[i]["certificate"]["margin"] = _margin(d, records[i]["certificate"]["score_bounds"])
            narrowed = i
    _forge_undecided(0.0)(records[undecided[0]])  # an undecided box forged to a certificate, eps 0
    expected[undecided[0]] = f"no stored feature box/{undecided[0]}"
    _write_records(d, records)
    moved = certified[len(PER_BOX)]  # its stored feature moved by eps/2 (file resealed)
    _move_feature(d, moved, EPS / 2)
    expected[moved] = "the feature is not this box's"
    code, payload = _recheck(d, *flags)
    assert code == 1
    for i, message in expected.items():
        assert message in _detail(payload, i), (i, message, _detail(payload, i))
    assert "claims eps 0.0" in _detail(payload, undecided[0])
    assert "margin" not in _detail(payload, narrowed)  # caught by the re-proof alone
    assert {b["index"] for b in payload["disagreements"]} == set(expected)
    assert payload["counts"]["confirmed"] == len(certified) - len(PER_BOX) - 1


def test_feature_moved_with_scores_forged_to_match_is_caught_from_the_images(results, tmp_path):
    """A forger who moves the feature and rewrites the record's scores and flag to match:
    only the images can tell."""
    import torch

    from certood.recheck import _own_scores

    d = _copy(results, tmp_path)
    records = _records(d)
    i = _first(records)
    _move_feature(d, i, EPS / 2)
    _, tensors, meta = R._load(d)
    options_point = meta["taps"][meta["certify"]["tap"]]
    monitor = R._monitor(d, meta, tensors)
    head, _ = R._detector_problems(R._detector(meta), options_point, meta, tensors)
    spec = R._spec_namespace(meta)
    z = tensors[f"box/{i}"].double().reshape(1, -1)
    own = _own_scores(spec, monitor.scores, head.double(), options_point, z, records[i]["scores"])
    records[i]["scores"] = own
    records[i]["flag"] = bool(spec.rule.evaluate({k: torch.tensor([v], dtype=torch.float64) for k, v in own.items()},
                                                 monitor.thresholds)[0])
    _write_records(d, records)
    code, payload = _recheck(d, "--from-images")
    assert code == 1
    assert "stored feature differs from the detector's on the image" in _detail(payload, i)


# --- beyond the table ---------------------------------------------------------------------------
def test_features_file_altered_without_resealing(results, tmp_path):
    d = _copy(results, tmp_path)
    i = _first(_records(d))
    _edit_features(d, lambda t, m: t.update({f"box/{i}": t[f"box/{i}"] * 1.0}), reseal=False)
    assert _recheck(d)[0] == 0  # the same bytes: nothing altered
    _edit_features(d, lambda t, m: m["certify"].update(eps=2 * EPS), reseal=False)
    code, payload = _recheck(d)
    assert code == 1 and any("manifest sha256" in p and "altered" in p for p in payload["problems"])


def test_rule_changed_in_the_features_file(results, tmp_path):
    d = _copy(results, tmp_path)
    _edit_features(d, lambda t, m: m.update(rule="energy > t.energy"))
    code, payload = _recheck(d)
    assert code == 1 and any(p.startswith("metrics.json: monitor.rule") for p in payload["problems"])


def test_missing_monitor_is_a_data_error(results, tmp_path):
    d = _copy(results, tmp_path)
    shutil.rmtree(d / "monitor")
    res = CliRunner().invoke(main, ["recheck", str(d)])
    assert res.exit_code == 3 and "manifest.json" in res.output and "Traceback" not in res.output


# --- --allow-unconfirmed: tighter methods, and recheck's own attack -------------------------------
def _margin(d: Path, bounds: dict) -> float:
    """The rule's margin under score ``bounds`` (as certood.certify.Certifier.decide gives it),
    with the monitor's thresholds: what a careful forger writes beside forged bounds."""
    import torch

    from certood.certify import rule_under_bounds
    from certood.spec.rule import parse_rule

    rule = json.loads((d / "metrics.json").read_text())["monitor"]["rule"]
    thresholds = json.loads((d / "monitor" / "manifest.json").read_text())["thresholds"]
    r = rule_under_bounds(parse_rule(rule).tree, {n: (torch.tensor([lo], dtype=torch.float64),
                                                      torch.tensor([hi], dtype=torch.float64))
                                                  for n, (lo, hi) in bounds.items()}, thresholds)
    m = torch.where(~r.may_false, r.margin_lo,
                    torch.where(~r.may_true, -r.margin_hi, torch.maximum(r.margin_lo, -r.margin_hi)))
    return float(m[0])


def _as_alpha_crown(d: Path, shrink: float | None = None) -> list[int]:
    """Relabel the whole run as alpha-CROWN (features file, metrics.json, every certificate),
    each stored interval shrunk toward the box's own score by ``shrink`` (narrower than the
    recheck's CROWN, as alpha-CROWN's may be; margins to match); the certified indices."""
    _edit_features(d, lambda t, m: m["certify"].update(method="alpha-crown"))
    _edit_json(d / "metrics.json", lambda m: m["certify"].update(method="alpha-crown"))
    records = _records(d)
    certified = []
    for i, r in enumerate(records):
        c = r["certificate"]
        c["method"] = "alpha-crown"
        if c["verdict"] != "undecided":
            certified.append(i)
            if shrink is not None:
                c["score_bounds"] = {n: [v - shrink * (v - lo), v + shrink * (hi - v)]
                                     for n, (lo, hi) in c["score_bounds"].items() for v in [r["scores"][n]]}
                c["margin"] = _margin(d, c["score_bounds"])
    _write_records(d, records)
    return certified


def test_tighter_method_unproven_passes_only_after_surviving_the_attack(results, tmp_path):
    d = _copy(results, tmp_path)
    certified = _as_alpha_crown(d, shrink=0.999)
    code, payload = _recheck(d)
    assert code == 1 and payload["counts"]["unconfirmed"] == len(certified)
    assert "narrower than the re-proven" in _detail(payload, certified[0])
    code, payload = _recheck(d, "--allow-unconfirmed")
    assert code == 0, payload
    assert all(b["attacked_points"] > 0 and "survived the recheck's attack" in b["detail"]
               for b in payload["disagreements"])


def test_tighter_method_refuted_by_the_attack(results, tmp_path):
    d = _copy(results, tmp_path)
    certified = _as_alpha_crown(d, shrink=1e-3)  # a thousandth of each interval, around the own score
    code, payload = _recheck(d, "--allow-unconfirmed")
    assert code == 1
    detail = _detail(payload, certified[0])
    assert "the recheck's attack refutes it" in detail and "outside the stored" in detail


def test_certificate_downgraded_to_undecided(results, tmp_path):
    """A certificate withdrawn from boxes.jsonl (its feature still stored) is named too."""
    d = _copy(results, tmp_path)
    i = _edit_certificate(d, lambda r: r["certificate"].update(verdict="undecided"))
    code, payload = _recheck(d)
    assert code == 1
    assert any(p.startswith(f"box {i}: boxes.jsonl says 'undecided'") for p in payload["problems"])
    assert any(p.startswith("metrics.json: certificates.") for p in payload["problems"])
