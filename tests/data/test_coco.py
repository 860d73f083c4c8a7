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


# ----------------------------------------------------------------------------- pixel modes
def _png(tmp_path: Path, name: str, img: Image.Image, **save) -> Path:
    path = tmp_path / name
    img.save(path, **save)
    return path


def test_16_bit_gray_png_is_scaled_by_65535_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = _png(tmp_path, "deep.png", Image.fromarray(values))
    assert Image.open(path).mode == "I;16"
    img = read_image(path)
    expected = torch.from_numpy(values.astype(np.float32) / 65535.0)
    for c in range(3):
        torch.testing.assert_close(img[c], expected, rtol=0, atol=1e-7)  # was 0, 1, 1, 1 (clipped)


def test_int32_and_float_images_are_read_when_their_range_is_faithful(tmp_path):
    ok = read_image(_png(tmp_path, "i.tif", Image.fromarray(np.array([[0, 65535]], np.int32))))
    torch.testing.assert_close(ok[0], torch.tensor([[0.0, 1.0]]))
    wide = read_image(_png(tmp_path, "wide.tif", Image.fromarray(np.array([[0, 70000]], np.int32))))
    assert isinstance(wide, str) and "wide.tif" in wide and "[0, 70000]" in wide and "skipped" in wide
    f = read_image(_png(tmp_path, "f.tif", Image.fromarray(np.array([[0.0, 0.25]], np.float32))))
    torch.testing.assert_close(f[2], torch.tensor([[0.0, 0.25]]))
    big = read_image(_png(tmp_path, "big.tif", Image.fromarray(np.array([[0.0, 3.0]], np.float32))))
    assert isinstance(big, str) and "big.tif" in big and "outside [0, 1]" in big


def test_palette_with_transparency_cmyk_1_and_la_give_their_colours(tmp_path, recwarn):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    path = _png(tmp_path, "p.png", palette, transparency=b"\x00\x80\xff")  # per-entry alpha bytes
    img = read_image(path)
    torch.testing.assert_close(img, torch.eye(3)[:, :, None].permute(0, 2, 1).expand(3, 1, 3).contiguous())
    assert not [w for w in recwarn if "Transparency" in str(w.message)]  # PIL's RGB path warns
    cmyk = read_image(_png(tmp_path, "c.tif", Image.new("CMYK", (2, 1), (0, 255, 255, 0))))
    torch.testing.assert_close(cmyk[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    one = read_image(_png(tmp_path, "one.png", Image.new("1", (2, 1), 1)))
    assert one.eq(1).all()
    la = read_image(_png(tmp_path, "la.png", Image.fromarray(np.array([[[51, 0]]], np.uint8), mode="LA")))
    torch.testing.assert_close(la[:, 0, 0], torch.full((3,), 0.2))  # alpha dropped, gray kept


# ----------------------------------------------------------------------------- limits and file kinds


@pytest.mark.parametrize("side, why", [(9000, "MAX_IMAGE_PIXELS"),  # 81 M pixels: over certood's limit
                                       (100_000, "decompression-bomb")])  # over PIL's own error limit
def test_decompression_bomb_is_reported_without_decoding(tmp_path, side, why, bomb_png):
    path = bomb_png(tmp_path / "bomb.png", side, side)
    assert path.stat().st_size < 100
    msg = read_image(path)
    assert isinstance(msg, str) and "bomb.png" in msg and why in msg and msg.endswith("skipped")


def test_pil_decompression_bomb_error_is_a_message(tmp_path, monkeypatch):
    from certood.data import coco

    path = _png(tmp_path, "b.png", Image.new("L", (64, 64)))
    monkeypatch.setattr(coco, "MAX_IMAGE_PIXELS", 10**9)  # our own limit out of the way
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL: warning over 1000, error over 2000
    msg = read_image(path)
    assert isinstance(msg, str) and "decompression-bomb" in msg and "b.png" in msg
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 pixels: PIL's warning, made an error
    msg = read_image(path)
    assert isinstance(msg, str) and "decompression-bomb" in msg


def test_images_over_the_byte_limit_and_not_regular_are_skipped(tmp_path, monkeypatch):
    import os

    from certood.data import coco

    path = _png(tmp_path, "ok.png", Image.new("L", (8, 8)))
    monkeypatch.setattr(coco, "MAX_IMAGE_BYTES", 10)
    msg = read_image(path)
    assert isinstance(msg, str) and "ok.png" in msg and "over the limit of 10 bytes" in msg
    monkeypatch.undo()
    os.mkfifo(tmp_path / "fifo.png")  # open() would block for ever
    msg = read_image(tmp_path / "fifo.png")
    assert isinstance(msg, str) and "fifo.png" in msg and "a FIFO" in msg and "skipped" in msg
    msg = read_image(tmp_path)
    assert isinstance(msg, str) and "a directory" in msg


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_annotation_file_is_a_data_error(tmp_path, device):
    with pytest.raises(DataError, match=f"{device}: expected a regular annotation file, found a character device"):
        CocoDataset.load(Path(device), tmp_path)


def test_annotation_fifo_and_size_limit_are_data_errors(tmp_path, monkeypatch):
    import os

    from certood.data import coco

    os.mkfifo(tmp_path / "ann.json")
    with pytest.raises(DataError, match="ann.json: expected a regular annotation file, found a FIFO"):
        CocoDataset.load(tmp_path / "ann.json", tmp_path)
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"images": []}))
    monkeypatch.setattr(coco, "MAX_ANNOTATION_BYTES", 5)
    with pytest.raises(DataError, match="small.json: annotation file of 14 bytes is over the limit of 5 bytes"):
        CocoDataset.load(small, tmp_path)


# ----------------------------------------------------------------------------- annotation checks
def _write(tmp_path: Path, images: list, annotations: list, categories=({"id": 1, "name": "a"},)) -> Path:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return ann


def test_duplicate_image_ids_are_a_data_error_naming_both_files(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 4, "height": 4},
              {"id": 2, "file_name": "b.png", "width": 4, "height": 4},
              {"id": 1, "file_name": "c.png", "width": 4, "height": 4}]
    with pytest.raises(DataError, match=r"ann.json: image ids must be unique: images\[2\] \(c.png\) repeats "
                                        r"image id 1 of images\[0\] \(a.png\)"):
        CocoDataset.load(_write(tmp_path, images, []), tmp_path)


def test_unknown_categories_and_boxes_outside_the_image_are_reported(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
              {"id": 2, "file_name": "b.png", "width": 0, "height": 10}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},  # fine
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},  # unknown category
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [25, 1, 5, 5]},  # wholly outside
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [15, 5, 8, 5.5]},  # overhangs by 3 px
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20.5, 10.5]}]  # rounding: silent
    ds = CocoDataset.load(_write(tmp_path, images, anns), tmp_path)
    assert [a["bbox"] for a in ds.coco["annotations"]] == [[1, 1, 5, 5], [15, 5, 8, 5.5], [0, 0, 20.5, 10.5]]
    assert len(ds.issues) == 4, ds.issues
    size, unknown, outside, overhang = ds.issues
    assert "images[1] (b.png) declares a non-positive size 0x10; skipped" in size
    assert "annotations[1] has category id 7, not one of the file's categories [1]; skipped" in unknown
    assert "annotations[2] (image 1, a.png)" in outside and "lies outside the 20x10 image; skipped" in outside
    assert "annotations[3] (image 1, a.png)" in overhang and "extends outside the 20x10 image; kept" in overhang
    assert all(m.startswith(str(tmp_path / "ann.json")) for m in ds.issues)


def test_declared_size_different_from_the_file_is_reported_and_the_image_kept(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    ds = CocoDataset.load(_write(tmp_path, [{"id": 1, "file_name": "a.png", "width": 16, "height": 6}], []),
                          tmp_path, name="id_test")
    assert [r.image_id for r, _ in ds.iter_images()] == [1]
    assert ds.named_issues() == [f"id_test: {tmp_path / 'a.png'}: declared 16x6 in the annotations, "
                                 "the file is 8x6; read as the file is"]
