"""CocoDataset: bad images and bad annotations are reported and skipped, non-COCO files raise
DataError, images come out as float CHW RGB in [0, 1]."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certood.data.coco import CocoDataset, read_image
from certood.errors import DataError

W, H = 16, 12


def _pixels(seed: int, channels: int | None) -> np.ndarray:
    shape = (H, W) if channels is None else (H, W, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture()
def tiny_coco(tmp_path) -> tuple[Path, Path]:
    """5 images: gray, rgb, a truncated PNG, a missing file, rgb; good and bad annotations."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.fromarray(_pixels(1, None), mode="L").save(img_dir / "gray.png")
    Image.fromarray(_pixels(2, 3), mode="RGB").save(img_dir / "rgb.png")
    Image.fromarray(_pixels(3, 3), mode="RGB").save(img_dir / "full.png")
    Image.fromarray(_pixels(4, 3), mode="RGB").save(img_dir / "last.png")
    whole = (img_dir / "full.png").read_bytes()
    (img_dir / "corrupt.png").write_bytes(whole[: len(whole) // 2])
    (img_dir / "full.png").unlink()
    names = ["gray.png", "rgb.png", "corrupt.png", "missing.png", "last.png"]
    images = [{"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)]
    good = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0.5, 0, 10, 5.5]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 4, 2, 2]},
        {"id": 4, "image_id": 5, "category_id": 2, "bbox": [0, 0, 16, 12]},
    ]
    bad = [
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},  # length 3
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]},  # negative width
        {"id": 7, "image_id": 42, "category_id": 1, "bbox": [1, 2, 3, 4]},  # unknown image
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": ["a", 2, 3, 4]},  # non-numeric
        {"id": 9, "image_id": "one", "category_id": 1, "bbox": [1, 2, 3, 4]},  # non-numeric id
        {"id": 10, "image_id": 1, "bbox": [1, 2, 3, 4]},  # no category
        {"id": 11, "image_id": 5, "category_id": 1, "bbox": [1, 1, 0, 4]},  # zero width
    ]
    coco = {"images": images, "annotations": good[:2] + bad + good[2:],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return ann, img_dir


def test_bad_images_are_reported_and_skipped(tiny_coco):
    ann, img_dir = tiny_coco
    ds = CocoDataset.load(ann, img_dir)
    assert [r.image_id for r in ds.records] == [1, 2, 3, 4, 5]
    ds.issues.clear()
    yielded = [(r.image_id, img) for r, img in ds.iter_images()]
    assert [i for i, _ in yielded] == [1, 2, 5]
    assert len(ds.issues) == 2
    corrupt, missing = ds.issues
    assert "corrupt.png" in corrupt and "unreadable" in corrupt
    assert "missing.png" in missing and "not found" in missing


def test_bad_annotations_are_reported_and_skipped(tiny_coco):
    ann, img_dir = tiny_coco
    ds = CocoDataset.load(ann, img_dir)
    assert len(ds.issues) == 7
    for position in range(2, 9):  # the bad ones sit at annotations[2..8]
        assert sum(f"annotations[{position}]" in m for m in ds.issues) == 1, position
    assert any("unknown image 42" in m for m in ds.issues)
    kept = ds.coco["annotations"]
    assert [(a["image_id"], a["bbox"]) for a in kept] == [
        (1, [1.0, 2.0, 3.0, 4.0]), (2, [0.5, 0.0, 10.0, 5.5]), (2, [4.0, 4.0, 2.0, 2.0]),
        (5, [0.0, 0.0, 16.0, 12.0])]
    by_id = {r.image_id: r for r in ds.records}
    torch.testing.assert_close(by_id[1].gt_boxes, torch.tensor([[1.0, 2.0, 4.0, 6.0]]))
    torch.testing.assert_close(by_id[2].gt_boxes, torch.tensor([[0.5, 0.0, 10.5, 5.5], [4.0, 4.0, 6.0, 6.0]]))
    assert by_id[2].gt_categories.tolist() == [2, 1]
    assert by_id[3].gt_boxes.shape == (0, 4) and by_id[3].gt_categories.shape == (0,)
    # what is left is valid COCO for pycocotools
    coco = ds.pycocotools()
    assert sorted(coco.getAnnIds()) == [1, 2, 3, 4]
    assert coco.getAnnIds(imgIds=[2]) == [2, 3]


def test_non_numeric_area_is_reported_and_skipped(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x.png", "width": 4, "height": 4}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": "big"},
                        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]}))
    ds = CocoDataset.load(ann, tmp_path)
    assert len(ds.coco["annotations"]) == 1
    assert len(ds.issues) == 1 and "annotations[0]" in ds.issues[0]


def test_max_images_keeps_the_first_images_and_their_annotations(tiny_coco):
    ann, img_dir = tiny_coco
    ds = CocoDataset.load(ann, img_dir, max_images=2, name="two")
    assert ds.name == "two"
    assert [r.image_id for r in ds.records] == [1, 2]
    assert {a["image_id"] for a in ds.coco["annotations"]} == {1, 2}
    assert not any("unknown image" in m for m in ds.issues)  # dropped by max_images, not an error


@pytest.mark.parametrize("content", [
    b"not json at all",
    b'{"images": [{"id": 1',
    b"[1, 2, 3]",
    b'{"annotations": []}',
    b'{"images": "a.png"}',
    b"\xff\xfe\x00garbage",
])
def test_non_coco_files_raise_data_error(tmp_path, content):
    ann = tmp_path / "ann.json"
    ann.write_bytes(content)
    with pytest.raises(DataError, match="ann.json"):
        CocoDataset.load(ann, tmp_path)


@pytest.mark.parametrize("annotations", [5, None])
def test_annotations_that_are_not_a_list_raise_data_error(tmp_path, annotations):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": annotations}))
    with pytest.raises(DataError):
        CocoDataset.load(ann, tmp_path)


def test_missing_annotation_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CocoDataset.load(tmp_path / "nope.json", tmp_path)


def test_images_are_float_chw_rgb_in_unit_range(tiny_coco):
    ann, img_dir = tiny_coco
    images = {r.image_id: img for r, img in CocoDataset.load(ann, img_dir).iter_images()}
    gray, rgb = images[1], images[2]
    for img in (gray, rgb):
        assert img.dtype == torch.float32 and img.shape == (3, H, W)
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    expected_gray = torch.from_numpy(_pixels(1, None).astype(np.float32) / 255.0)
    for c in range(3):  # grayscale is repeated into 3 channels
        torch.testing.assert_close(gray[c], expected_gray, rtol=0, atol=1e-7)
    expected_rgb = torch.from_numpy(_pixels(2, 3).astype(np.float32) / 255.0).permute(2, 0, 1)
    torch.testing.assert_close(rgb, expected_rgb, rtol=0, atol=1e-7)


def test_read_image_returns_a_message_for_unreadable_files(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    msg = read_image(tmp_path / "text.png")
    assert isinstance(msg, str) and "text.png" in msg
    msg = read_image(tmp_path / "absent.png")
    assert isinstance(msg, str) and "not found" in msg
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert img.shape == (3, 2, 3) and img[0].eq(1).all() and img[1:].eq(0).all()
