"""certood gate: statuses, details, formats and exit codes, on fake `certood check` outputs.

Each results directory holds a metrics.json of exactly the shape certood/check.py writes
(built here, no detector runs). CLI tests snapshot exit code, stdout and stderr, with the
temporary directory written as <tmp> and the spec fingerprint as <fp>.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from certood.cli import main
from certood.gate import (
    GateReport, PolicyResult, Status, _judge, evaluate_gate, evaluate_policy, observe, read_metrics,
)
from certood.spec import load_spec
from certood.spec.model import GatePolicy

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "specs" / "demo.yaml"
SHA = "d" * 64
BASE_SHA = "b" * 64

GATE = """gate:
  - {metric: auroc, score: energy, dataset: near, op: ">=", value: 0.85}
  - {metric: fpr95, score: energy, dataset: far, op: "<=", value: 0.5, warn: 0.05}
  - {metric: map50, op: ">=", value: 0.9, name: ID quality}
"""
LINE = DEMO.read_text().count("\n") + 2  # line of the first policy of a gate block appended to demo.yaml


def write_spec(tmp_path: Path, gate: str = GATE) -> Path:
    # demo.yaml's only relative path is output.dir, which the gate never reads
    spec = tmp_path / "spec.yaml"
    spec.write_text(DEMO.read_text() + gate)
    return spec


def ood_scores(auroc: float, fpr95: float, n_ood: int) -> dict:
    """One score's entry as certood.metrics.ood_metrics returns it."""
    return {"auroc": auroc, "aupr_in": 0.95, "aupr_out": 0.81, "fpr95": fpr95, "fpr95_first": fpr95 + 0.01,
            "n_id": 1204, "n_ood": n_ood}


def fake_metrics(spec: Path, sha: str = SHA, near_energy_auroc: float = 0.912, far_energy_fpr95: float = 0.31,
                 map50: float = 0.934) -> dict:
    """metrics.json as certood.check.run_check writes it (demo spec: id_test, ood near + far)."""
    return {
        "spec": str(spec),
        "spec_fingerprint": load_spec(spec).fingerprint(),
        "detector_sha256": sha,
        "protocol": "box-level (VOS): boxes with detector score >= the calibrated detector threshold; ...",
        "monitor": {"detector_threshold": 0.62, "thresholds": {"energy": -3.1, "maha": 41.7}, "tpr": 0.95,
                    "rule": "energy > t.energy or maha > t.maha", "calibration_issues": []},
        "id_test": {"map": 0.612, "map50": map50, "map75": 0.70, "n_images": 300, "n_boxes": 1204},
        "ood": {
            "near": {"n_images": 300, "n_boxes": 880, "boxes_per_image": 880 / 300,
                     "scores": {"energy": ood_scores(near_energy_auroc, 0.42, 880), "maha": ood_scores(0.874, 0.5, 880)},
                     "rule": {"id_tpr": 0.93, "ood_flag_rate": 0.71}},
            "far": {"n_images": 300, "n_boxes": 702, "boxes_per_image": 702 / 300,
                    "scores": {"energy": ood_scores(0.95, far_energy_fpr95, 702), "maha": ood_scores(0.97, 0.2, 702)},
                    "rule": {"id_tpr": 0.93, "ood_flag_rate": 0.88}},
        },
        "cost": {"detector_seconds_per_image": 0.05, "score_seconds_per_box": 1e-5, "score_to_detector_ratio": 2e-4},
        "issues": [],
        "versions": {"certood": "0.1.0", "torch": "2.14.1", "torchvision": "0.29.1", "python": "3.11.9"},
    }


def write_results(directory: Path, metrics: dict | str, complete: bool = True) -> Path:
    """A results directory with this metrics.json, closed by certood-results.json as run_check
    closes one (``complete=False``: as a killed run or an older certood left it)."""
    from certood.artifacts import write_results_marker

    directory.mkdir(parents=True, exist_ok=True)
    text = metrics if isinstance(metrics, str) else json.dumps(metrics, indent=2)
    (directory / "metrics.json").write_text(text)
    if complete:
        write_results_marker(directory, spec_fingerprint="test", detector_sha256="test")
    return directory


def run(tmp_path: Path, *args: str, raw: bool = False) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["gate", *[str(a) for a in args]], catch_exceptions=False)
    fp = load_spec(DEMO).fingerprint()[:12]  # a gate block leaves the fingerprint as it is

    def norm(text: str) -> str:
        return text if raw else text.replace(str(tmp_path), "<tmp>").replace(fp, "<fp>")

    return result.exit_code, norm(result.stdout), norm(result.stderr)


@pytest.fixture
def spec(tmp_path):
    return write_spec(tmp_path)


HEAD = "certood gate: spec <tmp>/spec.yaml (fingerprint <fp>), results <tmp>/run (detector dddddddddddd)\n"


# --- CLI snapshots ---------------------------------------------------------------------------
def test_passing_gate(tmp_path, spec):
    results = write_results(tmp_path / "run", fake_metrics(spec))
    assert run(tmp_path, spec, "--results", results) == (0, HEAD + (
        "PASS     auroc[energy] ood/near >= 0.85: energy AUROC 0.912 >= 0.850 on ood/near (1,204 ID / 880 OOD boxes)\n"
        "PASS     fpr95[energy] ood/far <= 0.5: energy FPR95 0.310 <= 0.500 on ood/far (1,204 ID / 702 OOD boxes)\n"
        "PASS     ID quality: mAP50 0.934 >= 0.900 on id_test (300 images, 1,204 boxes)\n"
        "gate passed: 0 failed, 0 errors, 0 warnings, 3 passed, 0 skipped\n"), "")


def test_failing_gate(tmp_path, spec):
    results = write_results(tmp_path / "run", fake_metrics(spec, near_energy_auroc=0.812, map50=0.85))
    assert run(tmp_path, spec, "--results", results) == (1, HEAD + (
        "FAIL     auroc[energy] ood/near >= 0.85: energy AUROC 0.812 < 0.850 on ood/near (1,204 ID / 880 OOD boxes)\n"
        "PASS     fpr95[energy] ood/far <= 0.5: energy FPR95 0.310 <= 0.500 on ood/far (1,204 ID / 702 OOD boxes)\n"
        "FAIL     ID quality: mAP50 0.850 < 0.900 on id_test (300 images, 1,204 boxes)\n"
        "gate failed: 2 failed, 0 errors, 0 warnings, 1 passed, 0 skipped\n"), "")


def test_warning_passes_unless_warn_as_fail(tmp_path, spec):
    results = write_results(tmp_path / "run", fake_metrics(spec, far_energy_fpr95=0.47))
    warn = ("WARN     fpr95[energy] ood/far <= 0.5: energy FPR95 0.470 <= 0.500 on ood/far (1,204 ID / 702 OOD boxes)"
            "; within the warn margin 0.05\n")
    code, out, err = run(tmp_path, spec, "--results", results)
    assert (code, err) == (0, "") and warn in out
    assert out.endswith("gate passed with warnings: 0 failed, 0 errors, 1 warning, 2 passed, 0 skipped\n")
    code, out, err = run(tmp_path, spec, "--results", results, "--warn-as-fail")
    assert (code, err) == (1, "") and warn in out
    assert out.endswith("gate failed: 0 failed, 0 errors, 1 warning, 2 passed, 0 skipped\n")


def test_results_missing_a_dataset_is_error_exit_3(tmp_path, spec):
    metrics = fake_metrics(spec)
    del metrics["ood"]["near"]
    results = write_results(tmp_path / "run", metrics)
    assert run(tmp_path, spec, "--results", results) == (3, HEAD + (
        "ERROR    auroc[energy] ood/near >= 0.85: energy AUROC on ood/near: the results have no OOD set 'near' "
        "(they hold: far)\n"
        "PASS     fpr95[energy] ood/far <= 0.5: energy FPR95 0.310 <= 0.500 on ood/far (1,204 ID / 702 OOD boxes)\n"
        "PASS     ID quality: mAP50 0.934 >= 0.900 on id_test (300 images, 1,204 boxes)\n"
        "gate errored: 0 failed, 1 error, 0 warnings, 2 passed, 0 skipped\n"), "")


def test_fail_outranks_error(tmp_path, spec):
    metrics = fake_metrics(spec, map50=0.5)
    del metrics["ood"]["near"]["scores"]["energy"]
    code, out, _ = run(tmp_path, spec, "--results", write_results(tmp_path / "run", metrics))
    assert code == 1
    assert "ERROR    auroc[energy] ood/near >= 0.85: energy AUROC on ood/near: the results have no score 'energy' " \
           "on ood/near (they hold: maha)\n" in out
    assert out.endswith("gate failed: 1 failed, 1 error, 0 warnings, 1 passed, 0 skipped\n")


def test_missing_results_directory_still_reports_every_policy(tmp_path, spec):
    junit = tmp_path / "gate.xml"
    code, out, err = run(tmp_path, spec, "--results", tmp_path / "nope", "--junit", junit)
    why = "<tmp>/nope: no such results directory (write one with `certood check SPEC --out DIR`)"
    assert code == 3
    assert out.splitlines()[1] == f"ERROR    auroc[energy] ood/near >= 0.85: energy AUROC on ood/near: results: {why}"
    assert err == f"error: results: {why}\nJUnit XML written to <tmp>/gate.xml\n"
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("3", "3", "0")


def test_an_incomplete_results_directory_is_error_not_judged(tmp_path, spec):
    # an interrupted run (or an older certood) left metrics.json without certood-results.json
    results = write_results(tmp_path / "run", fake_metrics(spec), complete=False)
    code, out, err = run(tmp_path, spec, "--results", results)
    why = ("<tmp>/run: no certood-results.json: not a complete `certood check` output (an interrupted "
           "run, or one from an older certood); rerun `certood check SPEC --out DIR`")
    assert code == 3 and out.count("ERROR    ") == 3 and "PASS" not in out
    assert err == f"error: results: {why}\n"


def test_a_metrics_json_changed_after_the_check_is_error(tmp_path, spec):
    # e.g. a stale metrics.json copied over a newer run's: its sha256 is not the one recorded
    results = write_results(tmp_path / "run", fake_metrics(spec))
    (results / "metrics.json").write_text(json.dumps(fake_metrics(spec, near_energy_auroc=0.99)))
    code, out, err = run(tmp_path, spec, "--results", results)
    assert code == 3 and out.count("ERROR    ") == 3
    assert err == ("error: results: <tmp>/run/metrics.json: not the file this check wrote (sha256 differs "
                   "from certood-results.json): stale or edited; rerun `certood check`\n")


@pytest.mark.parametrize("content,why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, found list"),
])
def test_corrupt_results_file_is_error(tmp_path, spec, content, why):
    code, out, err = run(tmp_path, spec, "--results", write_results(tmp_path / "run", content))
    assert code == 3 and out.count("ERROR    ") == 3 and why in err


def test_nan_and_malformed_values_are_errors_and_the_rest_goes_on(tmp_path, spec):
    metrics = fake_metrics(spec)
    metrics["ood"]["near"]["scores"]["energy"]["auroc"] = math.nan
    metrics["ood"]["far"]["scores"]["energy"] = "oops"
    results = write_results(tmp_path / "run", json.dumps(metrics))  # json writes NaN as NaN
    code, out, _ = run(tmp_path, spec, "--results", results)
    assert code == 3
    assert "ERROR    auroc[energy] ood/near >= 0.85: energy AUROC on ood/near: auroc is nan in the results\n" in out
    assert "ERROR    fpr95[energy] ood/far <= 0.5: energy FPR95 on ood/far: the results' metrics of score " \
           "'energy' on ood/far are malformed\n" in out
    assert "PASS     ID quality:" in out


def test_a_set_the_check_skipped_is_error_with_its_reason(tmp_path, spec):
    metrics = fake_metrics(spec)
    metrics["ood"]["near"] = {"n_images": 300, "n_boxes": 0, "boxes_per_image": 0.0, "scores": {},
                              "skipped": "the detector fired on no box of this set at the detector threshold"}
    code, out, _ = run(tmp_path, spec, "--results", write_results(tmp_path / "run", metrics))
    assert code == 3
    assert ("energy AUROC on ood/near: certood check skipped ood/near: the detector fired on no box of this set "
            "at the detector threshold\n") in out


def test_malformed_policy_file_exits_2_with_located_errors(tmp_path, spec):
    policy = tmp_path / "policy.yaml"
    policy.write_text('gate:\n  - {metric: auroc, score: rule, op: ">=", value: 0.9}\n  - {metric: map, op: "=>", value: 2}\n')
    results = write_results(tmp_path / "run", fake_metrics(spec))
    assert run(tmp_path, spec, "--results", results, "--policy", policy) == (2, "", (
        "<tmp>/policy.yaml:2:28: gate[0].score: expected a score defined under scores (one of: energy, maha), "
        "found 'rule' (hint: the rule is a flag, not a score: gate it with rule_ood_flag_rate or rule_id_tpr)\n"
        "<tmp>/policy.yaml:3:23: gate[1].op: expected one of: >=, <=, >, <, found '=>' (hint: did you mean '>='?)\n"
        "<tmp>/policy.yaml:3:36: gate[1].value: expected a number >= 0 and <= 1, found integer 2\n"
        "3 error(s)\n"))
    # --exit-zero never hides a usage error
    assert run(tmp_path, spec, "--results", results, "--policy", policy, "--exit-zero")[0] == 2


def test_malformed_gate_in_spec_exits_2(tmp_path):
    spec = write_spec(tmp_path, "gate:\n  - {metric: auroc, op: \">=\", value: 0.9}\n  - {metric: auroc, op: \"<\", value: 0.8}\n")
    code, out, err = run(tmp_path, spec, "--results", tmp_path)
    assert (code, out) == (2, "")
    assert err.startswith(f"<tmp>/spec.yaml:{LINE + 1}:5: gate[1]: expected a bound compatible with 'auroc >= 0.9' "
                          f"at <tmp>/spec.yaml:{LINE}:5, found 'auroc < 0.8'")


def test_no_policies_is_a_usage_error(tmp_path):
    spec = write_spec(tmp_path, "")
    assert run(tmp_path, spec, "--results", tmp_path) == (
        2, "", "error: <tmp>/spec.yaml: no gate policies: add a gate: list to the spec or pass --policy FILE\n")


def test_missing_results_option_is_a_usage_error(tmp_path, spec):
    code, out, err = run(tmp_path, spec)
    assert (code, out) == (2, "") and "Missing option '--results'" in err


def test_policy_file_adds_to_the_spec_policies(tmp_path, spec):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ngate:\n  - {metric: rule_ood_flag_rate, op: \">=\", value: 0.8}\n")
    code, out, _ = run(tmp_path, spec, "--results", write_results(tmp_path / "run", fake_metrics(spec)),
                       "--policy", policy)
    assert code == 1
    assert out.splitlines()[-3:] == [
        "FAIL     rule_ood_flag_rate ood/near >= 0.8: rule OOD flag rate 0.710 < 0.800 on ood/near (1,204 ID / 880 OOD boxes)",
        "PASS     rule_ood_flag_rate ood/far >= 0.8: rule OOD flag rate 0.880 >= 0.800 on ood/far (1,204 ID / 702 OOD boxes)",
        "gate failed: 1 failed, 0 errors, 0 warnings, 4 passed, 0 skipped",
    ]


def test_results_from_another_spec_are_a_warning(tmp_path, spec):
    metrics = fake_metrics(spec)
    metrics["spec_fingerprint"] = "0123456789ab" + "0" * 52
    results = write_results(tmp_path / "run", metrics)
    code, out, err = run(tmp_path, spec, "--results", results)
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == (
        "WARN     results provenance: <tmp>/run/metrics.json was made with another spec (fingerprint 0123456789ab, "
        "this spec <fp>: detector, data.fit, data.calibration, taps, scores or threshold differ); rerun "
        "`certood check` with this spec")
    assert out.endswith("gate passed with warnings: 0 failed, 0 errors, 1 warning, 3 passed, 0 skipped\n")
    assert run(tmp_path, spec, "--results", results, "--warn-as-fail")[0] == 1


def test_exit_zero(tmp_path, spec):
    failing = write_results(tmp_path / "run", fake_metrics(spec, map50=0.1))
    code, out, _ = run(tmp_path, spec, "--results", failing, "--exit-zero")
    assert code == 0 and "gate failed" in out
    code, out, _ = run(tmp_path, spec, "--results", tmp_path / "nope", "--exit-zero")
    assert code == 0 and "gate errored" in out


# --- baseline ---------------------------------------------------------------------------------
BASELINE_GATE = """gate:
  - {metric: auroc, score: energy, dataset: near, baseline: {max_drop: 0.02}}
  - {metric: fpr95, score: energy, dataset: far, baseline: {max_rise: 0.05}, warn: 0.02}
  - {metric: map50, baseline: {max_drop: 0.02}, name: mAP50 holds}
"""


def test_baseline_comparisons(tmp_path):
    spec = write_spec(tmp_path, BASELINE_GATE)
    baseline = write_results(tmp_path / "base", fake_metrics(spec, BASE_SHA, 0.90, 0.30, 0.90))
    results = write_results(tmp_path / "run", fake_metrics(spec, SHA, 0.87, 0.34, 0.88))
    assert run(tmp_path, spec, "--results", results, "--baseline", baseline) == (1, (
        "certood gate: spec <tmp>/spec.yaml (fingerprint <fp>), results <tmp>/run (detector dddddddddddd), "
        "baseline <tmp>/base (detector bbbbbbbbbbbb)\n"
        "FAIL     auroc[energy] ood/near vs baseline (max_drop 0.02): energy AUROC 0.870 vs baseline 0.900: "
        "delta -0.030 < -0.020 (max_drop 0.02) on ood/near (1,204 ID / 880 OOD boxes)\n"
        "WARN     fpr95[energy] ood/far vs baseline (max_rise 0.05): energy FPR95 0.340 vs baseline 0.300: "
        "delta +0.040 <= +0.050 (max_rise 0.05) on ood/far (1,204 ID / 702 OOD boxes); within the warn margin 0.02\n"
        "PASS     mAP50 holds: mAP50 0.880 vs baseline 0.900: delta -0.020 >= -0.020 (max_drop 0.02) on id_test "
        "(300 images, 1,204 boxes)\n"
        "gate failed: 1 failed, 0 errors, 1 warning, 1 passed, 0 skipped\n"), "")


def test_baseline_policies_without_baseline_are_skipped(tmp_path):
    spec = write_spec(tmp_path, BASELINE_GATE)
    code, out, _ = run(tmp_path, spec, "--results", write_results(tmp_path / "run", fake_metrics(spec)))
    assert code == 0
    assert out.splitlines()[1] == ("SKIPPED  auroc[energy] ood/near vs baseline (max_drop 0.02): energy AUROC on "
                                   "ood/near: no baseline given (pass --baseline DIR)")
    assert out.endswith("gate skipped everything: 0 failed, 0 errors, 0 warnings, 0 passed, 3 skipped\n")


def test_a_broken_baseline_errors_only_the_baseline_policies(tmp_path):
    spec = write_spec(tmp_path, BASELINE_GATE + '  - {metric: map, op: ">=", value: 0.5}\n')
    results = write_results(tmp_path / "run", fake_metrics(spec))
    baseline = fake_metrics(spec)
    del baseline["id_test"]
    code, out, err = run(tmp_path, spec, "--results", results, "--baseline", write_results(tmp_path / "b", baseline))
    assert code == 3 and err == ""
    assert "ERROR    mAP50 holds: mAP50 on id_test: baseline: the results have no id_test metrics\n" in out
    assert "PASS     map id_test >= 0.5: mAP 0.612 >= 0.500 on id_test (300 images, 1,204 boxes)\n" in out
    code, _, err = run(tmp_path, spec, "--results", results, "--baseline", tmp_path / "nope")
    assert code == 3 and err.startswith("error: baseline: <tmp>/nope: no such results directory")


def test_unused_baseline_is_noted_on_stderr(tmp_path, spec):
    results = write_results(tmp_path / "run", fake_metrics(spec))
    assert run(tmp_path, spec, "--results", results, "--baseline", results)[2] == (
        "note: --baseline given, but no policy compares with a baseline\n")


# --- machine formats --------------------------------------------------------------------------
MIXED_GATE = """gate:
  - {metric: auroc, score: energy, dataset: near, op: ">=", value: 0.95, name: "near: AUROC, energy"}
  - {metric: fpr95, score: energy, dataset: far, op: "<=", value: 0.5, warn: 0.2}
  - {metric: map50, op: ">=", value: 0.9}
  - {metric: certified_rate, dataset: near, op: ">=", value: 0.5}
  - {metric: auroc, score: maha, dataset: far, op: ">=", value: 0.9}
"""


def mixed_run(tmp_path):
    spec = write_spec(tmp_path, MIXED_GATE)
    metrics = fake_metrics(spec)
    del metrics["ood"]["far"]["scores"]["maha"]
    return spec, write_results(tmp_path / "run", metrics)


def test_github_format(tmp_path):
    spec, results = mixed_run(tmp_path)
    code, out, err = run(tmp_path, spec, "--results", results, "--format", "github")
    assert (code, err) == (1, "")
    f = "<tmp>/spec.yaml"
    assert out.splitlines() == [
        f"::error file={f},line={LINE},col=5,title=certood gate FAIL%3A near%3A AUROC%2C energy::"
        "energy AUROC 0.912 < 0.950 on ood/near (1,204 ID / 880 OOD boxes)",
        f"::warning file={f},line={LINE + 1},col=5,title=certood gate WARN%3A fpr95[energy] ood/far <= 0.5::"
        "energy FPR95 0.310 <= 0.500 on ood/far (1,204 ID / 702 OOD boxes); within the warn margin 0.2",
        f"::notice file={f},line={LINE + 3},col=5,title=certood gate SKIPPED%3A certified_rate ood/near >= 0.5::"
        "certified rate on ood/near: the results carry no certificates (certification did not run)",
        f"::error file={f},line={LINE + 4},col=5,title=certood gate ERROR%3A auroc[maha] ood/far >= 0.9::"
        "maha AUROC on ood/far: the results have no score 'maha' on ood/far (they hold: energy)",
        "::notice title=certood gate::gate failed: 1 failed, 1 error, 1 warning, 1 passed, 1 skipped",
    ]


def test_github_format_escapes_newlines_and_percent():
    from certood.gate import _gh_data, _gh_prop

    assert _gh_data("50% of\nboxes\r") == "50%25 of%0Aboxes%0D"
    assert _gh_prop("a:b,c%") == "a%3Ab%2Cc%25"


def junit_suite(xml_text: str) -> ET.Element:
    root = ET.fromstring(xml_text)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return suite


def test_junit_format_counts_match_the_statuses(tmp_path):
    spec, results = mixed_run(tmp_path)
    code, out, err = run(tmp_path, spec, "--results", results, "--format", "junit", raw=True)
    assert (code, err) == (1, "")
    suite = junit_suite(out)
    cases = suite.findall("testcase")
    assert [suite.get(k) for k in ("tests", "failures", "errors", "skipped")] == ["5", "1", "1", "1"]
    assert len(cases) == 5
    assert [c.find("failure") is not None for c in cases].count(True) == 1
    assert [c.find("error") is not None for c in cases].count(True) == 1
    assert [c.find("skipped") is not None for c in cases].count(True) == 1
    failure = cases[0].find("failure")
    assert cases[0].get("name") == "near: AUROC, energy" and cases[0].get("classname") == "certood.gate.ood.near"
    assert failure.get("message") == "energy AUROC 0.912 < 0.950 on ood/near (1,204 ID / 880 OOD boxes)"
    assert cases[1].find("system-out").text.startswith("WARN: energy FPR95 0.310 <= 0.500")
    assert (cases[0].get("file"), cases[0].get("line")) == (str(spec), str(LINE))
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["results_detector_sha256"] == SHA and props["status"] == "FAIL"
    assert props["spec_fingerprint"] == props["results_spec_fingerprint"]


def test_junit_file_with_warn_as_fail_counts_warnings_as_failures(tmp_path):
    spec, results = mixed_run(tmp_path)
    junit = tmp_path / "out" / "gate.xml"
    code, out, err = run(tmp_path, spec, "--results", results, "--junit", junit, "--warn-as-fail")
    assert code == 1 and out.startswith("certood gate:") and err == "JUnit XML written to <tmp>/out/gate.xml\n"
    suite = junit_suite(junit.read_text())
    assert [suite.get(k) for k in ("tests", "failures", "errors", "skipped")] == ["5", "2", "1", "1"]


def test_json_format_is_the_report_and_round_trips(tmp_path):
    spec, results = mixed_run(tmp_path)
    baseline = write_results(tmp_path / "base", fake_metrics(spec, BASE_SHA))
    result = CliRunner().invoke(main, ["gate", str(spec), "--results", str(results), "--baseline", str(baseline),
                                       "--format", "json"])
    assert result.exit_code == 1 and result.stderr == "note: --baseline given, but no policy compares with a baseline\n"
    payload = json.loads(result.stdout)
    assert payload["format"] == "certood-gate" and payload["status"] == "FAIL"
    assert payload["counts"] == {"PASS": 1, "WARN": 1, "FAIL": 1, "ERROR": 1, "SKIPPED": 1}
    fingerprint = load_spec(spec).fingerprint()
    assert payload["spec"] == {"path": str(spec), "fingerprint": fingerprint}
    assert payload["candidate"] == {"dir": str(results), "spec_fingerprint": fingerprint, "detector_sha256": SHA,
                                    "error": None}
    assert payload["baseline"]["detector_sha256"] == BASE_SHA
    first = payload["results"][0]
    assert {k: first[k] for k in ("status", "metric", "score", "dataset", "op", "threshold", "observed", "n_id",
                                  "n_ood")} == {"status": "FAIL", "metric": "auroc", "score": "energy",
                                                "dataset": "ood/near", "op": ">=", "threshold": 0.95,
                                                "observed": 0.912, "n_id": 1204, "n_ood": 880}
    report = GateReport.from_dict(payload)
    assert report.to_dict() == payload and report.status is Status.FAIL


def test_summary_is_markdown_written_atomically(tmp_path):
    spec, results = mixed_run(tmp_path)
    summary = tmp_path / "summary.md"
    summary.write_text("old")
    code, out, err = run(tmp_path, spec, "--results", results, "--summary", summary, "--format", "github")
    assert code == 1 and err == "Markdown summary written to <tmp>/summary.md\n"
    text = summary.read_text()
    assert text.startswith("## certood gate failed\n\n1 failed, 1 error, 1 warning, 1 passed, 1 skipped.\n")
    assert "| **FAIL** | near: AUROC, energy | energy AUROC 0.912 < 0.950 on ood/near (1,204 ID / 880 OOD boxes) |" in text
    assert "| SKIPPED | certified_rate ood/near >= 0.5 |" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".summary")] == []  # no temp file left


def test_unwritable_junit_path_is_a_runtime_error(tmp_path, spec):
    results = write_results(tmp_path / "run", fake_metrics(spec))
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(tmp_path, spec, "--results", results, "--junit", blocker / "gate.xml")
    assert code == 3 and err.startswith("error: <tmp>/file/gate.xml: cannot write the JUnit XML")
    assert run(tmp_path, spec, "--results", results, "--junit", blocker / "gate.xml", "--exit-zero")[0] == 0


# --- library ----------------------------------------------------------------------------------
@pytest.mark.parametrize("x,op,limit,warn,expected", [
    (0.90, ">=", 0.90, None, Status.PASS),
    (0.90, ">", 0.90, None, Status.FAIL),
    (0.89, ">=", 0.90, None, Status.FAIL),
    (0.91, ">=", 0.90, 0.02, Status.WARN),
    (0.92, ">=", 0.90, 0.02, Status.PASS),
    (0.10, "<=", 0.10, None, Status.PASS),
    (0.10, "<", 0.10, None, Status.FAIL),
    (0.09, "<", 0.10, 0.05, Status.WARN),
    (0.04, "<", 0.10, 0.05, Status.PASS),
    (0.9 - 0.02, ">=", 0.88, None, Status.PASS),  # float noise of a baseline limit is not a failure
])
def test_judge(x, op, limit, warn, expected):
    assert _judge(x, op, limit, warn) is expected


def test_details_show_enough_digits_to_tell_values_apart(tmp_path, spec):
    metrics = fake_metrics(spec, near_energy_auroc=0.84996)
    policy = GatePolicy("auroc", ">=", 0.85, score="energy", dataset="near")
    r = evaluate_policy(policy, "energy", "ood/near", (metrics, None), None)
    assert r.status is Status.FAIL and r.details.startswith("energy AUROC 0.84996 < 0.85000 on ood/near")


def test_certificates_are_read_when_present(tmp_path, spec):
    metrics = fake_metrics(spec)
    metrics["certificates"] = {"near": {"certified_rate": 0.4, "undecided_rate": 0.6, "n_boxes": 880},
                               "id_test": {"certified_rate": 0.9, "undecided_rate": 0.1, "n_boxes": 1204}}
    fail = evaluate_policy(GatePolicy("certified_rate", ">=", 0.5, dataset="near"), None, "ood/near",
                           (metrics, None), None)
    ok = evaluate_policy(GatePolicy("undecided_rate", "<=", 0.2), None, "id_test", (metrics, None), None)
    missing = evaluate_policy(GatePolicy("undecided_rate", "<=", 0.2), None, "ood/far", (metrics, None), None)
    assert (fail.status, fail.details) == (Status.FAIL, "certified rate 0.400 < 0.500 on ood/near (880 boxes)")
    assert (ok.status, ok.details) == (Status.PASS, "undecided rate 0.100 <= 0.200 on id_test (1,204 boxes)")
    assert (missing.status, missing.details) == (
        Status.ERROR, "undecided rate on ood/far: the results have no certificates for ood/far")


def test_evaluate_gate_carries_identities_and_is_immutable(tmp_path, spec):
    results = write_results(tmp_path / "run", fake_metrics(spec))
    baseline = write_results(tmp_path / "base", fake_metrics(spec, BASE_SHA))
    loaded = load_spec(spec)
    report = evaluate_gate(loaded, loaded.gate, results, baseline)
    assert report.spec_fingerprint == loaded.fingerprint() == report.candidate.spec_fingerprint
    assert (report.candidate.detector_sha256, report.baseline.detector_sha256) == (SHA, BASE_SHA)
    assert report.status is Status.PASS and report.notes == ()
    with pytest.raises(AttributeError):
        report.results[0].status = Status.FAIL  # frozen
    assert PolicyResult.from_dict(json.loads(json.dumps(report.results[0].to_dict()))) == report.results[0]


def test_one_policy_raising_does_not_stop_the_others(tmp_path, spec, monkeypatch):
    import certood.gate as gate

    real = gate.observe

    def flaky(metrics, metric, score, dataset):
        if metric == "auroc":
            raise ZeroDivisionError("boom")
        return real(metrics, metric, score, dataset)

    monkeypatch.setattr(gate, "observe", flaky)
    loaded = load_spec(spec)
    report = evaluate_gate(loaded, loaded.gate, write_results(tmp_path / "run", fake_metrics(spec)))
    assert [r.status for r in report.results] == [Status.ERROR, Status.PASS, Status.PASS]
    assert "internal error ZeroDivisionError: boom" in report.results[0].details


def test_read_metrics_and_observe(tmp_path, spec):
    assert read_metrics(tmp_path / "nope")[0] is None
    assert "no metrics.json" in read_metrics(tmp_path)[1]
    metrics = fake_metrics(spec)
    obs = observe(metrics, "rule_id_tpr", None, "ood/far")
    assert (obs.value, obs.n_id, obs.n_ood) == (0.93, 1204, 702)
    metrics["id_test"]["map75"] = -1  # pycocotools' "no ground truth", passed through by certood.metrics
    r = evaluate_policy(GatePolicy("map75", ">=", 0.5), None, "id_test", (metrics, None), None)
    assert (r.status, r.details) == (
        Status.ERROR, "mAP75 on id_test: map75 is -1 in the results (pycocotools: id_test has no ground truth)")
    metrics["id_test"]["map"] = 1.5
    r = evaluate_policy(GatePolicy("map", ">=", 0.5), None, "id_test", (metrics, None), None)
    assert (r.status, r.details) == (Status.ERROR, "mAP on id_test: map is 1.5, outside [0, 1], in the results")
