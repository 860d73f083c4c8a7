"""CLI contract: exit codes, stdout for payloads only, located messages on stderr."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from certood.cli import main

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "specs" / "demo.yaml"


def run(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_validate_demo_spec_is_valid():
    code, out, err = run("validate", str(DEMO))
    assert (code, out) == (0, "")
    assert "1 spec(s) valid" in err


def test_validate_reports_every_error_located(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = DEMO.read_text().replace("tap: logits,", "tap: logit,").replace("version: 1", "version: 7")
    bad.write_text(text + "extra_key: 1\n")
    code, out, err = run("validate", str(bad))
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith(str(bad))]
    assert len(lines) == 3, err
    version_line = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("version"))
    assert any(line.startswith(f"{bad}:{version_line}:") and "version" in line for line in lines)
    assert any("scores.energy.tap" in line and "logit" in line for line in lines)
    assert any("extra_key" in line for line in lines)


def test_validate_json_format_is_the_payload_only(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\n")
    code, out, _ = run("validate", "--format", "json", str(bad))
    assert code == 2
    issues = json.loads(out)
    assert {i["key_path"] for i in issues} >= {"detector", "data", "taps", "scores"}
    assert all(i["file"] == str(bad) and i["line"] >= 1 for i in issues)


def test_validate_missing_file_exits_2(tmp_path):
    code, _, err = run("validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


def test_schema_is_json_schema_accepting_the_demo():
    import jsonschema
    import yaml

    code, out, _ = run("schema")
    assert code == 0
    schema = json.loads(out)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(DEMO.read_text()), schema)


def test_check_on_malformed_spec_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndetector: !!python/object/apply:os.system ['echo hi']\n")
    code, out, err = run("check", str(bad), "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert "Traceback" not in err and f"{bad}:2:" in err
    assert not (tmp_path / "out").exists()


def test_check_with_missing_weights_is_a_runtime_error(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(DEMO.read_text().replace("builtin:digits_fasterrcnn", "missing.safetensors"))
    code, out, err = run("check", str(spec), "--out", str(tmp_path / "out"))
    assert code == 3 and out == ""
    assert "missing.safetensors" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # its staging directory removed


def test_check_refuses_a_directory_that_is_not_a_monitor(tmp_path):
    code, _, err = run("check", str(DEMO), "--monitor", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 3 and "manifest.json" in err


def test_data_digitsdet_generates_coco_files(tmp_path, monkeypatch):
    import certood.data.digitsdet as dd

    monkeypatch.setattr(dd, "DEFAULT_SIZES", {s: 3 for s in dd.SPLITS})
    code, out, _ = run("data", "digitsdet", "--out", str(tmp_path / "dd"), "--seed", "1")
    assert code == 0 and out.strip() == str(tmp_path / "dd")
    for split in dd.SPLITS:
        coco = json.loads((tmp_path / "dd" / f"{split}.json").read_text())
        assert len(coco["images"]) == 3


def test_data_digitsdet_video_generates_coco_video_files(tmp_path, monkeypatch):
    import certood.data.digitsdet_video as dv

    monkeypatch.setattr(dv, "DEFAULT_VIDEOS", {s: 1 for s in dv.VIDEO_SPLITS})
    code, out, _ = run("data", "digitsdet-video", "--out", str(tmp_path / "dv"), "--seed", "1")
    assert code == 0 and out.strip() == str(tmp_path / "dv")
    for split in dv.VIDEO_SPLITS:
        coco = json.loads((tmp_path / "dv" / f"{split}.json").read_text())
        assert len(coco["videos"]) == 1 and len(coco["images"]) == dv.N_FRAMES


@pytest.mark.parametrize("args", [["check"], ["calibrate"], ["nonsense"]])
def test_usage_errors_exit_2(args):
    code, _, _ = run(*args)
    assert code == 2
