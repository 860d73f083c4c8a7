"""`certood check --save-features`: every monitored box's tapped features and logits in
features.safetensors, aligned with boxes.jsonl, enough to recompute scores outside certood."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from certood.artifacts import load_monitor
from certood.check import load_spec_detector
from certood.cli import main
from certood.spec import load_spec
from tests.conftest import SPEC_TEMPLATE


@pytest.fixture(scope="module")
def exported(digitsdet_root, random_weights, tmp_path_factory):
    work = tmp_path_factory.mktemp("features")
    spec_path = work / "spec.yaml"
    spec_path.write_text(SPEC_TEMPLATE.format(weights=random_weights, root=digitsdet_root, far=digitsdet_root,
                                              tpr=0.95, temperature=2.0, rule="energy > t.energy or maha > t.maha"))
    result = CliRunner().invoke(main, ["check", str(spec_path), "--out", str(work / "out"), "--save-features",
                                       "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    out = work / "out"
    boxes = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    return out, boxes, spec_path


def test_features_file_has_every_dataset_and_tap(exported):
    out, boxes, _ = exported
    tensors = load_file(str(out / "features.safetensors"))
    datasets = {"id_test", "ood/near", "ood/far"}
    taps = {"box_head.output", "cls_logits"}  # the spec's taps; the logits always travel too
    assert set(tensors) == {f"{d}/{t}" for d in datasets for t in taps | {"box_index"}}
    for d in datasets:
        n = len(tensors[f"{d}/box_index"])
        assert n == sum(b["dataset"] == d for b in boxes) > 0
        assert tensors[f"{d}/box_head.output"].shape == (n, 256)
        assert tensors[f"{d}/cls_logits"].shape == (n, 6)
        assert tensors[f"{d}/box_index"].dtype == torch.int64
        assert all(boxes[i]["dataset"] == d for i in tensors[f"{d}/box_index"].tolist())
    every = torch.cat([tensors[f"{d}/box_index"] for d in datasets]).sort().values
    assert torch.equal(every, torch.arange(len(boxes)))  # each line of boxes.jsonl exactly once
    with safe_open(str(out / "features.safetensors"), "pt") as f:
        meta = f.metadata()
    metrics = json.loads((out / "metrics.json").read_text())
    assert meta["spec_fingerprint"] == metrics["spec_fingerprint"]
    assert meta["detector_sha256"] == metrics["detector_sha256"]


def test_energy_recomputed_from_saved_logits_matches_boxes_jsonl(exported):
    out, boxes, _ = exported
    tensors = load_file(str(out / "features.safetensors"))
    for d in ("id_test", "ood/near", "ood/far"):
        logits = tensors[f"{d}/cls_logits"].double()[:, 1:]  # drop the background column
        energy = -2.0 * torch.logsumexp(logits / 2.0, dim=1)  # temperature 2 in this spec
        written = np.array([boxes[i]["scores"]["energy"] for i in tensors[f"{d}/box_index"].tolist()])
        np.testing.assert_allclose(energy.numpy(), written, rtol=1e-5, atol=1e-5)
        # the detector score is the softmax of the saved logits at the box's label
        labels = torch.tensor([boxes[i]["label"] for i in tensors[f"{d}/box_index"].tolist()])
        soft = torch.softmax(tensors[f"{d}/cls_logits"].double(), dim=1)[torch.arange(len(labels)), labels]
        det = np.array([boxes[i]["det_score"] for i in tensors[f"{d}/box_index"].tolist()])
        np.testing.assert_allclose(soft.numpy(), det, atol=1e-4)


def test_fitted_score_recomputed_from_saved_features_matches(exported):
    out, boxes, spec_path = exported
    spec = load_spec(spec_path)
    detector = load_spec_detector(spec)
    monitor = load_monitor(out / "monitor", spec, detector.weights_sha256, detector.foreground_head())
    tensors = load_file(str(out / "features.safetensors"))
    features = tensors["ood/near/box_head.output"]
    maha = monitor.scores["maha"].score(features).double().numpy()
    written = np.array([boxes[i]["scores"]["maha"] for i in tensors["ood/near/box_index"].tolist()])
    np.testing.assert_allclose(maha, written, rtol=1e-4)


def test_without_the_flag_no_features_file(digitsdet_root, random_weights, tmp_path):
    from certood.check import run_check
    from certood.spec import load_spec_text

    spec = load_spec_text(SPEC_TEMPLATE.format(weights=random_weights, root=digitsdet_root, far=digitsdet_root,
                                               tpr=0.95, temperature=1.0, rule="energy > t.energy"))
    spec = type(spec)(**{**spec.__dict__, "data": type(spec.data)(
        fit=spec.data.fit, calibration=spec.data.calibration, id_test=None, ood={"near": spec.data.ood["near"]})})
    run_check(spec, tmp_path)
    assert (tmp_path / "boxes.jsonl").exists() and not (tmp_path / "features.safetensors").exists()
