"""Monitor export to ONNX: the graph passes onnx.checker, and ONNX Runtime computes the scores
and the flag of Monitor.score_boxes / Monitor.flag; non-exportable kinds are named."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from certood.errors import CertoodError
from certood.export import EXPORTABLE_KINDS, export_monitor_onnx, run_monitor_onnx
from certood.extract import DatasetDetections
from certood.monitor import Monitor
from certood.scores import build_score
from certood.spec import load_spec_text

SPEC = """\
version: 1
detector: {kind: torchvision, arch: digits_fasterrcnn, weights: "builtin:digits_fasterrcnn", num_classes: 6}
data:
  fit: {digitsdet: train}
  calibration: {digitsdet: val}
taps: {penultimate: box_head.output, logits: cls_logits, roi: box_head.input}
scores:
%s
rule: "%s"
"""
ALL_KINDS = """\
  energy: {tap: logits, temperature: 2.0}
  msp: {tap: logits, temperature: 1.5}
  max_logit: {tap: logits}
  maha: {kind: mahalanobis, tap: penultimate}
"""
RULE = "energy > t.energy or (maha > t.maha and msp > t.msp) or not max_logit <= t.max_logit"


def _features(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"cls_logits": torch.randn(n, 6, generator=g) * 3,
            "box_head.output": torch.randn(n, 16, generator=g).relu() * 2 + (seed % 3),
            "box_head.input": torch.randn(n, 20, generator=g)}


def _dets(features: dict[str, torch.Tensor]) -> DatasetDetections:
    n = len(features["cls_logits"])
    return DatasetDetections("x", torch.zeros(n, dtype=torch.long), torch.zeros(n, 4), torch.ones(n, dtype=torch.long),
                             torch.ones(n), features, 1, 0.0)


def make_monitor(scores: str = ALL_KINDS, rule: str = RULE) -> Monitor:
    spec = load_spec_text(SPEC % (scores, rule))
    fit = _features(300, 0)
    labels = torch.arange(300) % 5
    fitted = {}
    for name, s in spec.scores.items():
        score = build_score(s.kind, s.params)
        x = _dets(fit)
        from certood.monitor import score_input

        if score.needs_fit:
            score.fit(score_input(spec, name, x), labels)
        fitted[name] = score
    monitor = Monitor(spec, fitted, {}, 0.3, [1, 2, 3, 4, 5], "f" * 64)
    values = monitor.score_boxes(_dets(_features(200, 1)))
    monitor.thresholds.update({k: float(torch.quantile(v.double(), 0.8)) for k, v in values.items()})
    return monitor


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    monitor = make_monitor()
    path = tmp_path_factory.mktemp("export") / "monitor.onnx"
    result = export_monitor_onnx(monitor, path)
    return monitor, result


def test_exported_graph_passes_the_checker_and_records_the_calibration(exported):
    monitor, result = exported
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["box_head.output", "cls_logits"]
    assert [o.name for o in model.graph.output] == ["score/energy", "score/msp", "score/max_logit",
                                                    "score/maha", "flag"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["certood.thresholds"]) == monitor.thresholds
    assert meta["certood.spec_fingerprint"] == monitor.spec.fingerprint()
    assert meta["certood.rule"] == RULE and float(meta["certood.detector_threshold"]) == 0.3
    assert result.inputs == {"box_head.output": [None, 16], "cls_logits": [None, 6]}


@pytest.mark.parametrize("n, seed", [(1, 2), (57, 3), (400, 4)])
def test_onnx_runtime_scores_and_flag_equal_the_monitor(exported, n, seed):
    monitor, result = exported
    features = _features(n, seed)
    expected = monitor.score_boxes(_dets(features))
    flags = monitor.flag(expected)
    got = run_monitor_onnx(result.path, features)
    for name, value in expected.items():
        assert got[f"score/{name}"].shape == (n,)
        torch.testing.assert_close(got[f"score/{name}"].double(), value.double(), rtol=1e-5, atol=1e-5)
    assert got["flag"].dtype == torch.bool and got["flag"].shape == (n,)
    # a flag may differ only where a score sits within float tolerance of its threshold
    near = torch.zeros(n, dtype=torch.bool)
    for name, value in expected.items():
        near |= (value.double() - monitor.thresholds[name]).abs() < 1e-4
    assert torch.equal(got["flag"][~near], flags[~near])
    assert 0 < int(flags.sum()) < n or n == 1


def test_every_exportable_kind_alone_matches(tmp_path):
    lines = {"energy": "  energy: {tap: logits}", "max_logit": "  max_logit: {tap: logits}",
             "msp": "  msp: {tap: logits}", "mahalanobis": "  m: {kind: mahalanobis, tap: penultimate}"}
    assert set(lines) == set(EXPORTABLE_KINDS)
    for kind, line in lines.items():
        name = line.split(":")[0].strip()
        monitor = make_monitor(line + "\n", f"{name} > t.{name}")
        export_monitor_onnx(monitor, tmp_path / f"{kind}.onnx")
        features = _features(64, 7)
        expected = monitor.score_boxes(_dets(features))[name]
        got = run_monitor_onnx(tmp_path / f"{kind}.onnx", features)
        torch.testing.assert_close(got[f"score/{name}"].double(), expected.double(), rtol=1e-5, atol=1e-5)


def test_non_exportable_kinds_are_listed_with_the_exportable_ones(tmp_path):
    monitor = make_monitor("  energy: {tap: logits}\n  ent: {kind: entropy, tap: logits}\n"
                           "  nn: {kind: knn, tap: penultimate, k: 3}\n", "energy > t.energy or ent > t.ent or nn > t.nn")
    with pytest.raises(CertoodError) as err:
        export_monitor_onnx(monitor, tmp_path / "m.onnx")
    message = str(err.value)
    assert "ent (entropy)" in message and "nn (knn)" in message and "energy (" not in message
    assert all(kind in message for kind in EXPORTABLE_KINDS)
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------- CLI
def _cli(*args):
    from click.testing import CliRunner

    from certood.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _saved_monitor(tmp_path, random_weights, scores=ALL_KINDS, rule=RULE):
    """A monitor for a spec file on disk and the random detector weights, saved as an artifact."""
    import hashlib

    from certood.artifacts import save_monitor
    from certood.spec import load_spec

    text = (SPEC % (scores, rule)).replace('"builtin:digits_fasterrcnn"', str(random_weights))
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    made = make_monitor(scores, rule)
    monitor = Monitor(load_spec(path), made.scores, made.thresholds, made.detector_threshold,
                      made.label_to_category, hashlib.sha256(random_weights.read_bytes()).hexdigest())
    save_monitor(monitor, tmp_path / "monitor")
    return path, monitor


def test_cli_export_writes_a_graph_that_matches_the_monitor(tmp_path, random_weights):
    spec_path, monitor = _saved_monitor(tmp_path, random_weights)
    out = tmp_path / "m.onnx"
    code, stdout, stderr = _cli("export", str(spec_path), "--monitor", str(tmp_path / "monitor"),
                                "--onnx", str(out), "--format", "json")
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert payload["outputs"][-1] == "flag" and payload["path"] == str(out)
    features = _features(33, 9)
    expected = monitor.score_boxes(_dets(features))
    got = run_monitor_onnx(out, features)
    for name, value in expected.items():
        torch.testing.assert_close(got[f"score/{name}"].double(), value.double(), rtol=1e-5, atol=1e-5)


def test_cli_export_of_a_non_exportable_score_exits_2(tmp_path, random_weights):
    spec_path, _ = _saved_monitor(tmp_path, random_weights, "  ent: {kind: entropy, tap: logits}\n",
                                  "ent > t.ent")
    code, stdout, stderr = _cli("export", str(spec_path), "--monitor", str(tmp_path / "monitor"),
                                "--onnx", str(tmp_path / "m.onnx"))
    assert code == 2 and stdout == ""
    assert "ent (entropy)" in stderr and "energy, max_logit, msp, mahalanobis" in stderr
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_with_detector_needs_an_onnx_two_stage_detector(tmp_path, random_weights):
    spec_path, _ = _saved_monitor(tmp_path, random_weights)
    code, stdout, stderr = _cli("export", str(spec_path), "--monitor", str(tmp_path / "monitor"),
                                "--onnx", str(tmp_path / "m.onnx"), "--with-detector")
    assert code == 2 and stdout == "" and "two_stage" in stderr


def test_per_class_thresholds_take_the_labels_as_an_input(tmp_path):
    monitor = make_monitor("  energy: {tap: logits}\n  maha: {kind: mahalanobis, tap: penultimate}\n",
                           "energy > t.energy[class] or maha > t.maha")
    g = torch.Generator().manual_seed(5)
    monitor.class_thresholds["energy"] = (torch.randn(6, generator=g) - 4).tolist()  # indexed by label 0..5
    result = export_monitor_onnx(monitor, tmp_path / "m.onnx")
    assert "labels" in [i.name for i in onnx.load(str(result.path)).graph.input]
    features = _features(120, 6)
    labels = torch.randint(1, 6, (120,), generator=g)
    expected = monitor.score_boxes(_dets(features))
    flags = monitor.flag(expected, labels)
    got = run_monitor_onnx(result.path, {**features, "labels": labels})
    assert torch.equal(got["flag"], flags) and 0 < int(flags.sum()) < 120
