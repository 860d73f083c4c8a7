"""The optional `temporal` block: defaults, the example video spec, located errors and
warnings, the JSON Schema, and the fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from certood.spec import check_spec_text, json_schema, load_spec, load_spec_text
from certood.spec.model import TemporalSpec

REPO = Path(__file__).resolve().parents[2]
VIDEO = (REPO / "specs" / "video.yaml").read_text()
BASE = """\
version: 1
detector: {kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn"}
data:
  calibration: {digitsdet: video-val}
  id_test: {digitsdet: video-test}
  ood: {video: {digitsdet: video-ood}}
taps: {logits: cls_logits}
scores: {energy: {tap: logits}}
"""


def issues(text: str, severity: str) -> list[tuple[str, int, int, str]]:
    _, found = check_spec_text(text, "v.yaml")
    return [(i.key_path, i.line, i.column, str(i)) for i in found if i.severity == severity]


def test_the_video_example_loads_with_its_temporal_block():
    spec = load_spec(REPO / "specs" / "video.yaml")
    assert spec.temporal == TemporalSpec(iou=0.3, max_age=3, aggregate="ema", alpha=0.3,
                                         certified_k=3, certified_n=5)
    assert spec.data.calibration.digitsdet == "video-val" and spec.data.ood["video"].digitsdet == "video-ood"
    assert spec.warnings == ()


def test_an_empty_temporal_block_takes_the_defaults_and_no_block_is_none():
    assert load_spec_text(BASE + "temporal: {}\n").temporal == TemporalSpec()
    assert load_spec_text(BASE).temporal is None
    spec = load_spec_text(BASE + "temporal: {aggregate: cusum, cusum: {k: 1, target_false_alarm_rate: 0.02}}\n")
    assert (spec.temporal.aggregate, spec.temporal.cusum_k, spec.temporal.cusum_false_alarm_rate) == ("cusum", 1.0, 0.02)


def test_every_temporal_error_is_reported_at_once_and_located():
    text = BASE + (
        "temporal:\n"
        "  tracker: {iou: 0, max_age: -1}\n"      # line 10
        "  aggregate: median\n"                   # line 11
        "  alpah: 0.3\n"                          # line 12
        "  certified: {k: 6, n: 5}\n"             # line 13
        "  cusum: {k: -1}\n"                      # line 14
    )
    found = {(path, line, col) for path, line, col, _ in issues(text, "error")}
    assert found == {
        ("temporal.tracker.iou", 10, 18), ("temporal.tracker.max_age", 10, 30),
        ("temporal.aggregate", 11, 14), ("temporal.alpah", 12, 3), ("temporal.certified.k", 13, 18),
        ("temporal.cusum.k", 14, 14),
    }
    messages = " | ".join(m for *_, m in issues(text, "error"))
    assert "one of: mean, ema, max, cusum" in messages and "did you mean 'alpha'" in messages
    assert "k <= n (n = 5)" in messages


def test_temporal_needs_video_calibration_data():
    text = BASE.replace("{digitsdet: video-val}", "{digitsdet: val}") + "temporal: {}\n"
    [(path, line, col, message)] = issues(text, "error")
    assert (path, line, col) == ("data.calibration.digitsdet", 4, 28) and "video-val" in message
    # still-image test sets are allowed, with a warning: they are skipped by the track metrics
    text = BASE.replace("{digitsdet: video-test}", "{digitsdet: test}") + "temporal: {}\n"
    assert issues(text, "error") == []
    [(path, line, *_)] = issues(text, "warning")
    assert (path, line) == ("data.id_test.digitsdet", 5)


def test_parameters_of_another_aggregate_are_warnings():
    text = BASE + "temporal: {aggregate: max, alpha: 0.5, cusum: {k: 1}}\n"
    warned = {path for path, *_ in issues(text, "warning")}
    assert warned == {"temporal.alpha", "temporal.cusum"} and issues(text, "error") == []
    assert load_spec_text(text).temporal.aggregate == "max"


def test_json_schema_knows_the_temporal_block_and_the_video_splits():
    import jsonschema
    import yaml

    schema = json_schema()
    temporal = schema["properties"]["temporal"]
    assert temporal["properties"]["aggregate"]["enum"] == ["mean", "ema", "max", "cusum"]
    jsonschema.validate(yaml.safe_load(VIDEO), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(VIDEO.replace("aggregate: ema", "aggregate: median")), schema)
    json.dumps(schema)


def test_temporal_enters_the_fingerprint_only_when_present():
    plain = load_spec_text(BASE)
    with_block = load_spec_text(BASE + "temporal: {aggregate: mean}\n")
    other = load_spec_text(BASE + "temporal: {aggregate: max}\n")
    assert len({plain.fingerprint(), with_block.fingerprint(), other.fingerprint()}) == 3
    # a spec without the block hashes exactly as before the block existed
    import hashlib

    raw = plain.raw
    payload = {"version": 1, "detector": raw["detector"], "data.fit": None,
               "data.calibration": raw["data"]["calibration"], "taps": raw["taps"], "scores": raw["scores"],
               "threshold": None}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert plain.fingerprint() == hashlib.sha256(text.encode()).hexdigest()
