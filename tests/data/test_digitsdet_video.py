"""DigitsDet-Video: deterministic, COCO-video fields consistent, unknown objects enter at the
recorded frame, no source digit shared with DigitsDet train/val or between video splits."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certood.data import digitsdet_video
from certood.data.coco import CocoDataset
from certood.data.digitsdet import CANVAS, ID_DIGITS, NEAR_DIGITS, UNKNOWN_CATEGORY_ID, partition_sources
from certood.data.digitsdet_video import (
    VIDEO_SPLITS, ensure_digitsdet_video, entry_frames, generate_digitsdet_video, split_paths,
)

SIZES = {"video-val": 3, "video-test": 3, "video-ood": 6}
N_FRAMES = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_digitsdet_video(tmp_path_factory.mktemp("dv") / "root", seed=0, sizes=SIZES,
                                    n_frames=N_FRAMES)


def _coco(root: Path, split: str) -> dict:
    return json.loads(split_paths(root, split)[0].read_text())


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical_for_a_seed_and_differs_across_seeds(root, tmp_path):
    again = generate_digitsdet_video(tmp_path / "again", seed=0, sizes=SIZES, n_frames=N_FRAMES)
    first, second = _tree(root), _tree(again)
    assert sorted(first) == sorted(second)
    assert sum(k.endswith(".png") for k in first) == N_FRAMES * sum(SIZES.values())
    assert [k for k in first if first[k] != second[k]] == []
    other = generate_digitsdet_video(tmp_path / "other", seed=1, sizes=SIZES, splits=("video-ood",),
                                     n_frames=N_FRAMES)
    assert (other / "video-ood.json").read_bytes() != first["video-ood.json"]


def test_each_video_depends_only_on_its_index(root, tmp_path):
    """Asking for more videos keeps the first ones (each video has its own generator)."""
    more = generate_digitsdet_video(tmp_path / "more", seed=0, sizes={"video-ood": 7},
                                    splits=("video-ood",), n_frames=N_FRAMES)
    for t in range(N_FRAMES):
        name = f"video-ood/v0006/{t:06d}.png"
        assert (more / name).read_bytes() == (root / name).read_bytes()


def test_ensure_generates_once_into_the_cache_then_reuses(tmp_path, monkeypatch):
    calls = []

    def fake(out_dir, seed=0):
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "COMPLETE").write_text("{}")
        return out_dir

    monkeypatch.setattr(digitsdet_video, "generate_digitsdet_video", fake)
    monkeypatch.setenv("CERTOOD_CACHE", str(tmp_path))
    first = ensure_digitsdet_video(seed=2)
    assert first == tmp_path / "digitsdet-video-v1-seed2" and ensure_digitsdet_video(seed=2) == first
    assert calls == [first]


@pytest.mark.parametrize("split", VIDEO_SPLITS)
def test_coco_video_fields_are_consistent(root, split):
    from pycocotools.coco import COCO

    coco = _coco(root, split)
    ann_file, img_dir = split_paths(root, split)
    with contextlib.redirect_stdout(io.StringIO()):
        index = COCO(str(ann_file))
    assert len(index.getImgIds()) == SIZES[split] * N_FRAMES
    videos = {v["id"]: v for v in coco["videos"]}
    assert len(videos) == SIZES[split]
    images = {im["id"]: im for im in coco["images"]}
    for vid in videos:
        frames = sorted(im["frame_id"] for im in coco["images"] if im["video_id"] == vid)
        assert frames == list(range(N_FRAMES)) and videos[vid]["n_frames"] == N_FRAMES
    for im in coco["images"][:: N_FRAMES // 2]:
        assert im["file_name"].startswith(videos[im["video_id"]]["name"] + "/")
        with Image.open(img_dir / im["file_name"]) as pic:
            assert pic.size == (CANVAS, CANVAS) and pic.mode == "L"
    tracks = {t["id"]: t for t in coco["tracks"]}
    seen: dict[tuple[int, int], int] = {}
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        assert (a["video_id"], a["frame_id"]) == (im["video_id"], im["frame_id"])
        assert a["instance_id"] == a["track_id"] and a["instance_id"] in tracks
        track = tracks[a["instance_id"]]
        assert track["video_id"] == a["video_id"] and track["category_id"] == a["category_id"]
        assert track["first_frame"] <= a["frame_id"] <= track["last_frame"]
        assert a["ood_entry_frame"] == track["ood_entry_frame"]
        assert 0.5 <= a["visibility"] <= 1.0
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and 0 <= x and 0 <= y and x + w <= CANVAS and y + h <= CANVAS
        key = (a["image_id"], a["instance_id"])
        assert key not in seen, "an instance annotated twice in one frame"
        seen[key] = a["id"]
    # CocoDataset keeps what the temporal code reads
    ds = CocoDataset.load(ann_file, img_dir)
    assert ds.issues == [] and {"video_id", "frame_id"} <= set(ds.coco["images"][0])
    assert "instance_id" in ds.coco["annotations"][0] and ds.coco["videos"] == coco["videos"]


def test_objects_move_smoothly(root):
    coco = _coco(root, "video-test")
    by_instance: dict[int, list[tuple[int, list[float]]]] = {}
    for a in coco["annotations"]:
        by_instance.setdefault(a["instance_id"], []).append((a["frame_id"], a["bbox"]))
    steps = []
    for anns in by_instance.values():
        anns.sort()
        for (f0, b0), (f1, b1) in zip(anns, anns[1:]):
            if f1 == f0 + 1 and b0[2:] == b1[2:]:  # both fully visible: the same tight box
                steps.append(np.hypot(b1[0] - b0[0], b1[1] - b0[1]))
    assert len(steps) > 20
    assert 0.5 < float(np.median(steps)) < 5 and max(steps) < 8, steps
    moving = [np.ptp([b[0] for _, b in anns]) for anns in by_instance.values()]
    assert max(moving) > 5  # objects really travel


def test_id_splits_hold_only_id_digits(root):
    for split in ("video-val", "video-test"):
        coco = _coco(root, split)
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
        assert {a["category_id"] for a in coco["annotations"]} <= {1, 2, 3, 4, 5}
        assert all(t["ood_entry_frame"] is None for t in coco["tracks"])
        assert all(v["ood_entry_frame"] is None for v in coco["videos"])


def test_unknown_objects_enter_at_the_recorded_frame(root):
    coco = _coco(root, "video-ood")
    assert UNKNOWN_CATEGORY_ID in {c["id"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    lo, hi = entry_frames(N_FRAMES)
    kinds = set()
    for video in coco["videos"]:
        unknown = [t for t in coco["tracks"] if t["video_id"] == video["id"] and t["category_id"] == UNKNOWN_CATEGORY_ID]
        assert len(unknown) == 1, video
        track = unknown[0]
        entry = track["ood_entry_frame"]
        assert lo <= entry < hi and video["ood_entry_frame"] == entry
        kinds.add("digit" if track["source"].startswith("digits:") else "letter")
        frames = sorted(a["frame_id"] for a in coco["annotations"] if a["instance_id"] == track["id"])
        assert frames[0] == entry  # annotated from its entry frame on, never before
        # before the entry, the video holds ID objects only
        before = [a for a in coco["annotations"] if a["video_id"] == video["id"] and a["frame_id"] < entry]
        assert before and all(a["category_id"] in {1, 2, 3, 4, 5} for a in before)
        assert all(images[a["image_id"]]["frame_id"] == a["frame_id"] for a in before)
    assert kinds == {"digit", "letter"}


def test_no_source_digit_is_shared_with_train_val_or_another_video_split(root):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    parts = partition_sources(targets, seed=0)
    used = {}
    for split in VIDEO_SPLITS:
        anns = _coco(root, split)["annotations"]
        used[split] = {int(a["source"].split(":")[1]) for a in anns if a["source"].startswith("digits:")
                       and a["category_id"] != UNKNOWN_CATEGORY_ID}
        unseen = {int(a["source"].split(":")[1]) for a in anns if a["source"].startswith("digits:")
                  and a["category_id"] == UNKNOWN_CATEGORY_ID}
        assert used[split] and used[split] <= set(parts["test"]), split
        assert set(targets[list(used[split])]) <= set(ID_DIGITS)
        assert unseen <= set(parts["ood-near"]) and set(targets[list(unseen)]) <= set(NEAR_DIGITS)
        for other in ("train", "val", "mixed"):
            assert not used[split] & set(parts[other]) and not unseen & set(parts[other])
    for a, b in itertools.combinations(VIDEO_SPLITS, 2):
        assert not used[a] & used[b], (a, b)


def test_some_objects_leave_or_hide(root):
    """Occlusion happens: by leaving the frame or by the dark occluder (gaps, early ends)."""
    coco = _coco(root, "video-ood") | {}
    tracks = coco["tracks"]
    assert any(v["occluder"] for s in VIDEO_SPLITS for v in _coco(root, s)["videos"])
    spans = [(t["last_frame"] - t["first_frame"] + 1,
              sum(a["instance_id"] == t["id"] for a in coco["annotations"])) for t in tracks]
    ended_or_gapped = [t for t, (span, n) in zip(tracks, spans)
                       if t["last_frame"] < N_FRAMES - 1 or n < span]
    assert ended_or_gapped, spans
