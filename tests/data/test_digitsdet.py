"""DigitsDet: source images never leak across splits, generation is deterministic, the COCO
files load in pycocotools, categories follow the split, and boxes fit their glyphs."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from certood.data import digitsdet
from certood.data.digitsdet import (
    CANVAS, ID_DIGITS, NEAR_DIGITS, SPLITS, UNKNOWN_CATEGORY_ID, compose_canvas, ensure_digitsdet,
    generate_digitsdet, load_glyphs, partition_sources, split_paths,
)

ID_SPLITS = ("train", "val", "test")
# Letters that read as an ID digit: O~0, I/i/l~1, Z/z~2 (D or Q, say, are shapes of their own).
CONFUSABLES = set("OoIilZz")


@pytest.fixture(scope="module")
def targets() -> np.ndarray:
    return load_digits().target


@pytest.fixture(scope="module")
def glyphs():
    return load_glyphs(seed=0)


def _coco(root: Path, split: str) -> dict:
    return json.loads(split_paths(root, split)[0].read_text())


def _digit_sources(coco: dict) -> set[int]:
    return {int(a["source"].split(":", 1)[1]) for a in coco["annotations"]
            if a["source"].startswith("digits:")}


# ----------------------------------------------------------------------------- source split
@pytest.mark.parametrize("seed", [0, 7])
def test_partition_sources_covers_all_1797_digits_exactly_once(targets, seed):
    parts = partition_sources(targets, seed)
    assert set(parts) == set(SPLITS)
    every = [i for idx in parts.values() for i in idx]
    assert len(targets) == 1797
    assert sorted(every) == list(range(1797))  # complete, and no index twice
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(parts[a]) & set(parts[b]), (a, b)
    # ID digits feed the ID splits (and mixed); unseen digits only ood-near and mixed.
    for split in ID_SPLITS:
        assert set(targets[parts[split]]) == set(ID_DIGITS)
    assert set(targets[parts["ood-near"]]) == set(NEAR_DIGITS)
    assert set(targets[parts["mixed"]]) == set(ID_DIGITS) | set(NEAR_DIGITS)
    assert parts["ood-far"] == []
    # shares per class: train 60% of each ID digit's images (to rounding)
    for d in ID_DIGITS:
        n = int((targets == d).sum())
        assert abs(int((targets[parts["train"]] == d).sum()) - 0.6 * n) <= 1


def test_partition_sources_depends_on_seed(targets):
    assert partition_sources(targets, 0) == partition_sources(targets, 0)
    assert partition_sources(targets, 0)["val"] != partition_sources(targets, 1)["val"]


def test_no_source_digit_image_appears_in_two_splits(digitsdet_root, targets):
    used = {split: _digit_sources(_coco(digitsdet_root, split)) for split in SPLITS}
    assert all(used[s] for s in SPLITS if s != "ood-far")
    for a, b in itertools.combinations(SPLITS, 2):
        assert not used[a] & used[b], f"digit images shared by {a} and {b}: {sorted(used[a] & used[b])[:5]}"
    # ...because each split draws only from its own partition
    parts = partition_sources(targets, seed=0)
    for split in SPLITS:
        assert used[split] <= set(parts[split]), split


def test_annotation_labels_are_the_true_labels_of_their_source_digits(digitsdet_root, targets):
    for split in SPLITS:
        for a in _coco(digitsdet_root, split)["annotations"]:
            if not a["source"].startswith("digits:"):
                continue
            digit = int(targets[int(a["source"].split(":")[1])])
            assert a["source_class"] == str(digit)
            expected = digit + 1 if digit in ID_DIGITS else UNKNOWN_CATEGORY_ID
            assert a["category_id"] == expected, (split, a)


# ----------------------------------------------------------------------------- determinism
def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical_for_a_seed_and_differs_across_seeds(digitsdet_root, tmp_path):
    sizes = {split: 40 for split in SPLITS}  # as the digitsdet_root fixture
    again = generate_digitsdet(tmp_path / "again", seed=0, sizes=sizes)
    first, second = _tree_bytes(digitsdet_root), _tree_bytes(again)
    assert sorted(first) == sorted(second)
    assert sum(k.endswith(".png") for k in first) == 40 * len(SPLITS)
    differing = [k for k in first if first[k] != second[k]]
    assert differing == []
    other = generate_digitsdet(tmp_path / "other", seed=1, sizes=sizes, splits=("val",))
    assert (other / "val.json").read_bytes() != first["val.json"]
    assert (other / "val" / "000001.png").read_bytes() != first["val/000001.png"]


def test_generation_leaves_no_temporary_directory(digitsdet_root):
    assert [p.name for p in digitsdet_root.parent.iterdir()] == [digitsdet_root.name]
    assert (digitsdet_root / "COMPLETE").exists()


def test_generation_replaces_only_what_it_generated(tmp_path):
    """`certood data digitsdet --out PATH` once deleted whatever PATH held (issue 19)."""
    from certood.errors import UsageError

    sizes = {split: 3 for split in SPLITS}
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a data set certood generated"):
        generate_digitsdet(project, seed=0, sizes=sizes, splits=("val",))
    assert [p.name for p in project.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(UsageError, match="not a directory"):
        generate_digitsdet(a_file, seed=0, sizes=sizes, splits=("val",))
    assert a_file.read_text() == "mine"
    # an earlier generated set is replaced whole, and so is an empty directory
    out = generate_digitsdet(tmp_path / "dd", seed=0, sizes=sizes, splits=("val",))
    before = _tree_bytes(out)
    again = generate_digitsdet(out, seed=1, sizes=sizes, splits=("val",))
    assert again == out and _tree_bytes(out) != before and (out / "COMPLETE").exists()
    # a generated set that a user added a file to is theirs now: refused
    (out / "extra.txt").write_text("mine")
    with pytest.raises(UsageError):
        generate_digitsdet(out, seed=0, sizes=sizes, splits=("val",))
    assert (out / "extra.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_digitsdet(empty, seed=0, sizes=sizes, splits=("val",)) / "COMPLETE").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dd", "empty", "project"]


def test_ensure_digitsdet_generates_once_then_reuses(tmp_path, monkeypatch):
    calls = []

    def fake_generate(out_dir, seed=0, sizes=None, splits=SPLITS):
        calls.append((out_dir, seed))
        out_dir.mkdir(parents=True)
        (out_dir / "COMPLETE").write_text("{}")
        return out_dir

    monkeypatch.setattr(digitsdet, "generate_digitsdet", fake_generate)
    monkeypatch.setenv("CERTOOD_CACHE", str(tmp_path / "env-cache"))
    root = ensure_digitsdet(seed=3)
    assert root == tmp_path / "env-cache" / "digitsdet-v1-seed3"
    assert ensure_digitsdet(seed=3) == root
    assert calls == [(root, 3)]
    # an explicit cache_dir wins over the environment; an incomplete dir is regenerated
    partial = tmp_path / "explicit" / "digitsdet-v1-seed0"
    partial.mkdir(parents=True)
    (partial / "val.json").write_text("{")
    monkeypatch.setattr(digitsdet, "generate_digitsdet", lambda out_dir, seed=0: calls.append(out_dir))
    assert ensure_digitsdet(seed=0, cache_dir=tmp_path / "explicit") == partial
    assert calls[-1] == partial


# ----------------------------------------------------------------------------- COCO / categories
@pytest.mark.parametrize("split", SPLITS)
def test_pycocotools_loads_every_split(digitsdet_root, split):
    from pycocotools.coco import COCO

    ann_file, img_dir = split_paths(digitsdet_root, split)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    assert len(coco.getImgIds()) == 40
    assert len(coco.getAnnIds()) >= 40
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img["width"], img["height"]) == (CANVAS, CANVAS)
        with Image.open(img_dir / img["file_name"]) as im:
            assert im.size == (CANVAS, CANVAS) and im.mode == "L"
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["image_id"] in coco.imgs and ann["category_id"] in coco.cats
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])


@pytest.mark.parametrize("split", ID_SPLITS)
def test_id_splits_have_only_the_five_digit_categories(digitsdet_root, split):
    coco = _coco(digitsdet_root, split)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in coco["categories"]] == ["0", "1", "2", "3", "4"]
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("split", ["ood-near", "ood-far"])
def test_ood_splits_annotate_every_object_as_unknown(digitsdet_root, split):
    coco = _coco(digitsdet_root, split)
    assert {c["id"]: c["name"] for c in coco["categories"]}[UNKNOWN_CATEGORY_ID] == "unknown"
    assert {a["category_id"] for a in coco["annotations"]} == {UNKNOWN_CATEGORY_ID}
    if split == "ood-near":
        assert {a["source_class"] for a in coco["annotations"]} <= {str(d) for d in NEAR_DIGITS}
    else:
        assert all(a["source"].startswith("font:") for a in coco["annotations"])


def test_mixed_split_has_id_and_unknown_objects_in_every_image(digitsdet_root):
    coco = _coco(digitsdet_root, "mixed")
    cats: dict[int, set[int]] = {im["id"]: set() for im in coco["images"]}
    for a in coco["annotations"]:
        cats[a["image_id"]].add(a["category_id"])
    for image_id, c in cats.items():
        assert UNKNOWN_CATEGORY_ID in c and c & {1, 2, 3, 4, 5}, (image_id, c)


def test_ood_far_letters_exclude_digit_lookalikes(glyphs, digitsdet_root):
    names = {g.name for g in glyphs["ood-far"]}
    assert len(names) >= 20
    assert all(n.isalpha() and len(n) == 1 for n in names)
    assert not names & CONFUSABLES, sorted(names & CONFUSABLES)
    used = {a["source_class"] for a in _coco(digitsdet_root, "ood-far")["annotations"]}
    assert used <= names and not used & CONFUSABLES
    for g in glyphs["ood-far"]:
        assert g.pixels.shape == (8, 8) and 0.0 <= g.pixels.min() and g.pixels.max() <= 1.0
        assert g.pixels.max() > 0.5, g.source  # the letter is visible


# ----------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("split", SPLITS)
def test_boxes_lie_inside_the_canvas_around_bright_pixels(digitsdet_root, split):
    coco = _coco(digitsdet_root, split)
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    img_dir = split_paths(digitsdet_root, split)[1]
    for im in coco["images"]:
        pixels = np.asarray(Image.open(img_dir / im["file_name"]))
        covered = np.zeros_like(pixels, dtype=bool)
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= CANVAS and y + h <= CANVAS, a["bbox"]
            x0, y0, x1, y1 = int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))
            assert pixels[y0:y1, x0:x1].max() >= 128, (split, im["id"], a["bbox"])  # the glyph is there
            covered[y0:y1, x0:x1] = True
        # outside every box only background noise remains (no unannotated glyph)
        if (~covered).any():
            assert pixels[~covered].max() < 100, (split, im["id"])


class _NoiseFree:
    """A numpy Generator whose background noise is zero, so the canvas holds glyphs only."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def normal(self, loc, scale, size):
        return np.zeros(size)

    def __getattr__(self, name):
        return getattr(self._rng, name)


def test_compose_canvas_boxes_are_tight_around_the_glyph(glyphs):
    picks = glyphs["val"][:12] + glyphs["ood-near"][:6] + glyphs["ood-far"][::40]
    for i, glyph in enumerate(picks):
        canvas, placed = compose_canvas([glyph], _NoiseFree(i))
        assert len(placed) == 1
        (x0, y0, x1, y1), g = placed[0]
        assert g is glyph
        box = tuple(int(v) for v in (x0, y0, x1, y1))
        assert box == (x0, y0, x1, y1) and 0 <= box[0] < box[2] <= CANVAS and 0 <= box[1] < box[3] <= CANVAS
        c = canvas.astype(np.int32)
        inside = c[box[1]:box[3], box[0]:box[2]]
        assert inside.max() == c.max() > 0, glyph.source  # the glyph's maximum is in the box
        cut = 0.1 * c.max()
        ys, xs = np.nonzero(c > cut + 1)  # bright for sure (1 grey level of rounding slack)
        assert box[0] <= xs.min() and xs.max() < box[2], glyph.source
        assert box[1] <= ys.min() and ys.max() < box[3], glyph.source
        # a 1-pixel shrink of any side loses a bright pixel
        edges = {"left": inside[:, 0], "right": inside[:, -1], "top": inside[0, :], "bottom": inside[-1, :]}
        for side, line in edges.items():
            assert line.max() >= cut - 1, (glyph.source, side)
