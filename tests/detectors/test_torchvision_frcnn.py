"""The Faster R-CNN adapter: every kept detection is tied to the feature rows that produced it,
outputs equal torchvision's own forward, and weights load safely and strictly."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from certood.detectors.base import Detections
from certood.detectors.torchvision_frcnn import (
    JITTER_TAP, JITTERS, TAP_POINTS, TorchvisionFasterRCNN, digits_fasterrcnn, jitter_boxes, load_detector,
    load_state_dict,
)
from certood.errors import CertoodError


def _random_model(**options):
    """Random weights (seed 0); a sharpened classifier so labels and scores vary across boxes."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_fasterrcnn(6, box_score_thresh=0.0, **options)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(40.0)
    return model.eval()


def _images(sizes=((128, 128), (128, 128), (128, 128)), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.fixture(scope="module")
def detector() -> TorchvisionFasterRCNN:
    return TorchvisionFasterRCNN(_random_model())


@pytest.fixture(scope="module")
def batch(detector):
    images = _images(((128, 128), (96, 128), (128, 128)))
    return images, detector.detect(images)


def test_random_detector_gives_many_varied_detections(batch):
    _, dets = batch
    assert len(dets) == 3
    for d in dets:
        assert len(d) >= 50  # score threshold 0: NMS and detections_per_img are what limit
        assert len(d.labels.unique()) >= 2 and float(d.scores.std()) > 1e-3
        assert set(d.taps) == set(TAP_POINTS)
        assert d.taps["box_head.input"].shape == (len(d), 64 * 7 * 7)
        assert d.taps["box_head.output"].shape == (len(d), 256)
        assert d.logits.shape == (len(d), 6) and d.box_format == "xyxy"


def test_boxes_scores_labels_equal_torchvision_forward(detector, batch):
    images, dets = batch
    with torch.no_grad():
        reference = detector.model(images)
    for d, ref in zip(dets, reference):
        assert torch.equal(d.boxes, ref["boxes"])
        assert torch.equal(d.scores, ref["scores"])
        assert torch.equal(d.labels, ref["labels"])


def test_detector_score_is_softmax_of_the_box_logits_at_its_label(batch):
    for d in batch[1]:
        probs = F.softmax(d.logits, dim=-1)
        torch.testing.assert_close(probs[torch.arange(len(d)), d.labels], d.scores, rtol=0, atol=1e-6)
        assert torch.equal(d.taps["cls_logits"], d.logits)


def test_logits_recomputed_from_the_roi_tap_match(detector, batch):
    head = detector.monitored_head().eval()
    for d in batch[1]:
        with torch.no_grad():
            logits = head(d.taps["box_head.input"])  # box_head flattens: the tap is [N, 3136]
        torch.testing.assert_close(logits, d.taps["cls_logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, d.logits, rtol=1e-5, atol=1e-5)


def test_logits_recomputed_from_the_penultimate_tap_match(detector, batch):
    rh = detector.model.roi_heads
    for d in batch[1]:
        with torch.no_grad():
            penultimate = rh.box_head(d.taps["box_head.input"])
            logits = rh.box_predictor.cls_score(d.taps["box_head.output"])
        torch.testing.assert_close(penultimate, d.taps["box_head.output"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, d.logits, rtol=1e-5, atol=1e-5)


def test_a_batch_equals_single_image_calls(detector, same_detections):
    images = _images(seed=2)
    batched = detector.detect(images)
    for image, d in zip(images, batched):
        [single] = detector.detect([image])
        # another batch size sums in another order: equal to tolerance, near ties in any order
        same_detections(single, d, box_atol=1e-3, score_atol=1e-5, taps=TAP_POINTS)


def test_boxes_are_mapped_back_when_the_model_resizes():
    model = _random_model(min_size=64, max_size=64)
    det = TorchvisionFasterRCNN(model)
    images = _images(((128, 128), (128, 128)), seed=3)
    dets = det.detect(images)
    with torch.no_grad():
        reference = model(images)
    for d, ref in zip(dets, reference):
        torch.testing.assert_close(d.boxes, ref["boxes"], rtol=1e-6, atol=1e-4)
        assert torch.equal(d.labels, ref["labels"])
        assert float(d.boxes.max()) > 64  # original 128x128 coordinates, not the 64x64 input
        assert float(d.boxes.min()) >= 0 and float(d.boxes.max()) <= 128


def test_jitter_tap_is_the_box_logits_then_the_jittered_boxes_logits():
    """Recomputed independently: torchvision.ops.roi_align on the backbone map at the jittered
    boxes (in the resized image's coordinates), then the box head and classifier."""
    from torchvision.ops import roi_align

    model = _random_model(min_size=64, max_size=64)  # resizes: jitter in the feature maps' frame
    det = TorchvisionFasterRCNN(model)
    images = _images(((128, 128), (128, 96)), seed=4)
    plain = det.detect(images)
    dets = det.detect(images, optional=[JITTER_TAP])
    rh = model.roi_heads
    for image, d, p in zip(images, dets, plain):
        assert JITTER_TAP not in p.taps and torch.equal(d.boxes, p.boxes)
        C = d.logits.shape[1]
        assert d.taps[JITTER_TAP].shape == (len(d), (JITTERS + 1) * C)
        torch.testing.assert_close(d.taps[JITTER_TAP][:, :C], d.logits)
        with torch.no_grad():
            batch, _ = model.transform([image])
            feature = model.backbone(batch.tensors)
            (h, w), (oh, ow) = batch.image_sizes[0], image.shape[-2:]
            boxes = d.boxes[:5] * torch.tensor([w / ow, h / oh, w / ow, h / oh])
            jittered = jitter_boxes(boxes, (h, w)).reshape(-1, 4)
            scale = feature.shape[-1] / batch.tensors.shape[-1]
            pooled = roi_align(feature, [jittered], output_size=rh.box_roi_pool.output_size,
                               spatial_scale=scale, sampling_ratio=rh.box_roi_pool.sampling_ratio)
            logits = rh.box_predictor.cls_score(rh.box_head(pooled)).reshape(len(boxes), -1)
        torch.testing.assert_close(d.taps[JITTER_TAP][:5, C:], logits, rtol=1e-4, atol=1e-4)


def test_jitter_tap_only_for_boxes_at_or_above_min_score(detector):
    images = _images(seed=5)
    full = detector.detect(images, optional=[JITTER_TAP])
    cut = float(torch.cat([f.scores for f in full]).median())
    part = detector.detect(images, optional=[JITTER_TAP], min_score=cut)
    for f, p in zip(full, part):
        keep = p.scores >= cut
        assert 0 < int(keep.sum()) < len(p)
        assert bool(torch.isnan(p.taps[JITTER_TAP][~keep, 6:]).all())
        torch.testing.assert_close(p.taps[JITTER_TAP][keep], f.taps[JITTER_TAP][keep], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(p.taps[JITTER_TAP][:, :6], p.logits)  # the box's own logits: always


def test_jitter_boxes_stay_inside_the_image():
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [90.0, 50.0, 100.0, 64.0]])
    j = jitter_boxes(boxes, (64, 100))
    assert j.shape == (2, JITTERS, 4)
    assert float(j[..., 0::2].min()) >= 0 and float(j[..., 0::2].max()) <= 100
    assert float(j[..., 1::2].min()) >= 0 and float(j[..., 1::2].max()) <= 64
    assert not torch.equal(j[:, 0], j[:, 1])


# ----------------------------------------------------------------------------- weights
@pytest.fixture()
def weights_file(tmp_path):
    from safetensors.torch import save_file

    model = _random_model()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_load_detector_round_trips_safetensors(weights_file):
    model, path = weights_file
    det = load_detector("digits_fasterrcnn", str(path))  # num_classes inferred from the weights
    assert det.num_classes == 6
    loaded = det.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert det.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not det.model.training


def test_loaded_detector_detects_like_the_original(weights_file):
    model, path = weights_file
    det = load_detector("digits_fasterrcnn", str(path), num_classes=6, box_score_thresh=0.0)
    image = _images(((128, 128),), seed=4)
    [a] = det.detect(image)
    [b] = TorchvisionFasterRCNN(model).detect(image)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits)


def test_missing_and_unexpected_keys_are_named(weights_file, tmp_path):
    from safetensors.torch import save_file

    model, _ = weights_file
    state = dict(model.state_dict())
    del state["rpn.head.cls_logits.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(CertoodError) as err:
        load_detector("digits_fasterrcnn", str(path), num_classes=6)
    message = str(err.value)
    assert "rpn.head.cls_logits.bias" in message and "extra.weight" in message
    assert "missing" in message and "unexpected" in message and "odd.safetensors" in message


@pytest.mark.parametrize("arch, num_classes, needle", [
    ("digits_fasterrcnn", 4, r"shape mismatch .*cls_score"),
    ("fasterrcnn_mobilenet_v3_large_fpn", 6, r"missing: backbone\.body.*unexpected: backbone\.0"),
])
def test_wrong_num_classes_or_arch_raises_certood_error(weights_file, arch, num_classes, needle):
    _, path = weights_file
    with pytest.raises(CertoodError, match=needle):
        load_detector(arch, str(path), num_classes=num_classes)


def test_torch_file_loads_with_weights_only(weights_file, tmp_path):
    model, _ = weights_file
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"model": model.state_dict(), "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        det = load_detector("digits_fasterrcnn", str(path))
        assert torch.equal(det.model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                           model.state_dict()["roi_heads.box_predictor.cls_score.weight"])
        assert det.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CertoodError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pt")


EXECUTED = []


class Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (EXECUTED.append, ("pickle code ran",))


def test_pickled_custom_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(Exception):  # noqa: B017 - any refusal; the type is pinned below
        load_state_dict(path)
    assert EXECUTED == []


def test_pickled_custom_objects_raise_certood_error(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CertoodError, match="evil.pt"):
        load_state_dict(path)


def test_corrupt_safetensors_raise_certood_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CertoodError, match="broken.safetensors"):
        load_state_dict(path)


def test_missing_weights_and_unknown_arch_raise_certood_error(weights_file, tmp_path):
    with pytest.raises(CertoodError, match="not found"):
        load_detector("digits_fasterrcnn", str(tmp_path / "absent.safetensors"))
    with pytest.raises(CertoodError, match="unknown detector arch"):
        load_detector("resnet9000", str(weights_file[1]))
    with pytest.raises(CertoodError, match="unknown builtin"):
        load_detector("digits_fasterrcnn", "builtin:nope")


# ----------------------------------------------------------------------------- Detections
def _dets(n_boxes=3, n_labels=3, n_scores=3, n_logits=3, taps=None, box_cols=4, fmt="xyxy"):
    return Detections(torch.zeros(n_boxes, box_cols), torch.zeros(n_labels, dtype=torch.long),
                      torch.zeros(n_scores), torch.zeros(n_logits, 6), taps or {}, fmt)


def test_detections_accept_consistent_rows_and_select_keeps_them_aligned():
    d = Detections(torch.arange(12.0).reshape(3, 4), torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.2, 0.3]),
                   torch.arange(18.0).reshape(3, 6), {"f": torch.arange(6.0).reshape(3, 2)})
    assert len(d) == 3
    s = d.select(torch.tensor([False, True, True]))
    assert s.labels.tolist() == [2, 3] and s.taps["f"].tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert s.boxes[0].tolist() == [4.0, 5.0, 6.0, 7.0] and s.logits[1, 0] == 12.0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(n_labels=2), "labels with 3 rows"),
    (dict(n_scores=4), "scores with 3 rows"),
    (dict(n_logits=0), "logits with 3 rows"),
    (dict(taps={"box_head.output": torch.zeros(2, 8)}), "box_head.output with 3 rows"),
    (dict(box_cols=5), "boxes of shape [N, 4]"),
    (dict(fmt="xywh"), "box_format 'xyxy'"),
])
def test_detections_reject_mismatched_rows(kwargs, needle):
    with pytest.raises(CertoodError, match="invalid detections") as err:
        _dets(**kwargs)
    assert needle in str(err.value)


def test_detections_report_every_problem_at_once():
    with pytest.raises(CertoodError) as err:
        _dets(n_labels=1, n_scores=2)
    assert "labels with 3 rows" in str(err.value) and "scores with 3 rows" in str(err.value)
