"""The optional `certify` block: defaults, located errors, schema."""
from __future__ import annotations

from pathlib import Path

import pytest

from certood.spec import check_spec_text, json_schema, load_spec_text
from certood.spec.model import CertifySpec

DEMO = (Path(__file__).resolve().parents[2] / "specs" / "demo.yaml").read_text()


def _errors(block: str) -> list[str]:
    _, issues = check_spec_text(DEMO + block + "\n", "s.yaml")
    return [str(i) for i in issues if i.severity == "error"]


def test_defaults_and_absence():
    assert load_spec_text(DEMO).certify is None
    spec = load_spec_text(DEMO + "certify: {tap: roi, eps: 0.05}\n")
    assert spec.certify == CertifySpec(tap="roi", eps=0.05, norm="inf", method="crown", exact="none",
                                       timeout_s=2.0, radius=False, domain="nonnegative")
    assert spec.certify.engine == "auto"
    full = "certify: {tap: penultimate, eps: 1, norm: 2, method: alpha-crown, engine: auto_lirpa, exact: z3, " \
           "timeout_s: 0.5, radius: true, domain: any}"
    c = load_spec_text(DEMO + full + "\n").certify
    assert (c.tap, c.eps, c.norm, c.method, c.engine, c.exact, c.timeout_s, c.radius, c.domain) == \
        ("penultimate", 1.0, "2", "alpha-crown", "auto_lirpa", "z3", 0.5, True, "any")
    # certify is not part of what a calibration depends on
    assert spec.fingerprint() == load_spec_text(DEMO).fingerprint()


@pytest.mark.parametrize("block, expected", [
    ("certify: {tap: logits, eps: 0.1}", "certify.tap: expected a tap at box_head.input or box_head.output"),
    ("certify: {tap: rio, eps: 0.1}", "did you mean 'roi'?"),
    ("certify: {tap: roi, eps: 0}", "certify.eps: expected a number > 0, found integer 0"),
    ("certify: {tap: roi, eps: 0.1, norm: 1}", "certify.norm: expected one of: inf, 2"),
    ("certify: {tap: roi, eps: 0.1, method: crwn}", "did you mean 'crown'?"),
    ("certify: {tap: roi, eps: 0.1, engine: autolirpa}", "did you mean 'auto_lirpa'?"),
    ("certify: {tap: roi, eps: 0.1, timeout_s: -1}", "certify.timeout_s: expected a number > 0"),
    ("certify: {tap: roi, eps: 0.1, exact: yes}", "certify.exact: expected one of: none, z3, found boolean true"),
    ("certify: {tap: roi}", "certify.eps: expected key 'eps'"),
    ("certify: {tap: roi, eps: 0.1, region: 1}", "certify.region: expected one of the keys"),
])
def test_errors_are_located(block, expected):
    errors = _errors(block)
    assert any(expected in e for e in errors), errors
    line = DEMO.count("\n") + 1
    assert all(e.startswith(f"s.yaml:{line}:") for e in errors), errors


def test_schema_has_the_block():
    schema = json_schema()
    props = schema.get("$defs", {}).get("complete", schema)["properties"]["certify"]
    assert props["required"] == ["tap", "eps"]
    assert set(props["properties"]) == {"tap", "norm", "eps", "method", "engine", "exact", "timeout_s", "radius", "domain"}
