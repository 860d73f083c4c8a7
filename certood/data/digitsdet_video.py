"""DigitsDet-Video: DigitsDet objects moving through short videos, in COCO-video format.

Each video is ``N_FRAMES`` frames of 128x128. Objects are the same real handwritten digits
(and font letters) as DigitsDet, upscaled once per object and moved with a smooth random
velocity plus jitter; most bounce off the borders, some leave the frame, and a third of
the videos have a dark vertical occluder drifting across. An object is annotated in a
frame while at least half of its bright pixels are visible, with the tight box of those.

Splits (every digit from DigitsDet's ``test`` source partition, dealt to the three splits
class by class, so no source digit image is in two splits or in DigitsDet train/val):

- ``video-val``  ID digits 0-4 only (calibration);
- ``video-test`` ID digits 0-4 only;
- ``video-ood``  ID digits, and in every video one unknown object (a digit 5-9 from
  DigitsDet's ``ood-near`` partition, or a font letter) that enters at a recorded frame.

Layout (the "CocoVID" shape of video detection / tracking sets, e.g. ImageNet-VID,
BDD100K MOT converted to COCO, TAO): a ``videos`` list; images with ``video_id`` and
``frame_id`` (0-based); annotations with ``instance_id`` (== ``track_id``, unique in the
split), ``video_id``, ``frame_id``, ``visibility`` and ``ood_entry_frame``; a ``tracks``
list with one entry per object and its ``ood_entry_frame`` (the first frame the unknown
object is annotated in; ``null`` for ID objects). Images are ``<video>/<frame>.png``.

The whole dataset is a deterministic function of the seed, and each video of its own
(seed, split, video index), so asking for more videos keeps the first ones.

>>> root = ensure_digitsdet_video()           # generated once into the cache, then reused
>>> ann, img_dir = split_paths(root, "video-val")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from certood.data.digitsdet import (
    CANVAS, ID_DIGITS, UNKNOWN_CATEGORY_ID, Glyph, _categories, _category_of, _patch,
    default_cache_dir, load_glyphs, split_paths, write_splits_atomically,
)
from certood.errors import CertoodError

__all__ = [
    "VIDEO_SPLITS", "N_FRAMES", "DEFAULT_VIDEOS", "video_dataset_dir", "video_sources",
    "generate_video", "generate_video_split", "generate_digitsdet_video", "ensure_digitsdet_video",
    "split_paths",
]

FORMAT_VERSION = 1
VIDEO_SPLITS = ("video-val", "video-test", "video-ood")
N_FRAMES = 24
DEFAULT_VIDEOS = {"video-val": 24, "video-test": 24, "video-ood": 32}
MIN_VISIBLE = 0.5  # fraction of an object's bright pixels visible for it to be annotated
MAX_SPEED = 4.0  # pixels per frame
OCCLUDER_PROB = 1 / 3


def video_dataset_dir(seed: int = 0, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"digitsdet-video-v{FORMAT_VERSION}-seed{seed}"


def video_sources(glyphs: dict[str, list[Glyph]]) -> dict[str, list[Glyph]]:
    """Deal DigitsDet's ``test`` digits to the three video splits (by class, round robin),
    and name the unknown pools of ``video-ood``.

    >>> g = {"test": [Glyph(np.zeros((8, 8)), f"digits:{i}", str(i // 3)) for i in range(6)],
    ...      "ood-near": [], "ood-far": []}
    >>> [x.source for x in video_sources(g)["video-val"]]
    ['digits:0', 'digits:3']
    """
    out: dict[str, list[Glyph]] = {s: [] for s in VIDEO_SPLITS}
    for digit in ID_DIGITS:
        same = [g for g in glyphs["test"] if g.name == str(digit)]
        for i, g in enumerate(same):
            out[VIDEO_SPLITS[i % len(VIDEO_SPLITS)]].append(g)
    out["unknown-near"] = list(glyphs["ood-near"])
    out["unknown-far"] = list(glyphs["ood-far"])
    return out


@dataclass
class _Object:
    """One moving object: its patch, position of the patch's top-left corner, velocity."""

    glyph: Glyph
    patch: np.ndarray
    x: float
    y: float
    vx: float
    vy: float
    start: int  # first frame it is drawn in
    bounce: bool  # reflect at the borders (else it may leave the frame)
    entry: str  # "start", "edge" or "appear"
    inside: bool = False  # has been fully inside the canvas (bouncing starts then)
    mask: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mask = self.patch > 0.1 * self.patch.max()

    def step(self, rng: np.random.Generator) -> None:
        """Smooth motion: velocity drifts a little, position moves by it plus jitter."""
        self.vx += float(rng.normal(0, 0.15))
        self.vy += float(rng.normal(0, 0.15))
        speed = float(np.hypot(self.vx, self.vy))
        if speed > MAX_SPEED:
            self.vx, self.vy = self.vx * MAX_SPEED / speed, self.vy * MAX_SPEED / speed
        self.x += self.vx + float(rng.normal(0, 0.4))
        self.y += self.vy + float(rng.normal(0, 0.4))
        ph, pw = self.patch.shape
        fully_inside = 0 <= self.x <= CANVAS - pw and 0 <= self.y <= CANVAS - ph
        self.inside = self.inside or fully_inside
        if self.bounce and self.inside:
            if self.x < 0 or self.x > CANVAS - pw:
                self.vx = -self.vx
                self.x = float(np.clip(self.x, 0, CANVAS - pw))
            if self.y < 0 or self.y > CANVAS - ph:
                self.vy = -self.vy
                self.y = float(np.clip(self.y, 0, CANVAS - ph))


def _velocity(rng: np.random.Generator) -> tuple[float, float]:
    speed, angle = float(rng.uniform(0.8, 3.0)), float(rng.uniform(0, 2 * np.pi))
    return speed * np.cos(angle), speed * np.sin(angle)


def _at_start(glyph: Glyph, rng: np.random.Generator, placed: list[tuple[float, ...]]) -> _Object:
    patch = _patch(glyph, rng)
    ph, pw = patch.shape
    for _ in range(50):  # keep objects apart in the first frame, as DigitsDet canvases do
        x, y = float(rng.integers(0, CANVAS - pw + 1)), float(rng.integers(0, CANVAS - ph + 1))
        box = (x, y, x + pw, y + ph)
        if all(_overlap(box, other) < 0.05 for other in placed):
            break
    placed.append(box)
    vx, vy = _velocity(rng)
    return _Object(glyph, patch, x, y, vx, vy, 0, bounce=bool(rng.random() < 0.75), entry="start",
                   inside=True)


def _entering(glyph: Glyph, rng: np.random.Generator, start: int, mode: str, bounce: bool) -> _Object:
    """An object that is first drawn at frame ``start``: from an edge (30% outside, moving
    in) or appearing anywhere (as if from behind something)."""
    patch = _patch(glyph, rng)
    ph, pw = patch.shape
    if mode == "appear":
        x, y = float(rng.integers(0, CANVAS - pw + 1)), float(rng.integers(0, CANVAS - ph + 1))
        vx, vy = _velocity(rng)
        return _Object(glyph, patch, x, y, vx, vy, start, bounce, "appear", inside=True)
    edge = int(rng.integers(4))  # left, right, top, bottom
    inward, along = float(rng.uniform(1.0, 3.0)), float(rng.uniform(-1.0, 1.0))
    if edge < 2:
        y = float(rng.integers(0, CANVAS - ph + 1))
        x = -0.3 * pw if edge == 0 else CANVAS - 0.7 * pw
        vx, vy = (inward if edge == 0 else -inward), along
    else:
        x = float(rng.integers(0, CANVAS - pw + 1))
        y = -0.3 * ph if edge == 2 else CANVAS - 0.7 * ph
        vx, vy = along, (inward if edge == 2 else -inward)
    return _Object(glyph, patch, x, y, vx, vy, start, bounce, "edge")


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _visible(obj: _Object, occluded: np.ndarray) -> tuple[tuple[float, ...] | None, float]:
    """(tight box of the visible bright pixels or None, visible fraction of them)."""
    ph, pw = obj.patch.shape
    x0, y0 = int(round(obj.x)), int(round(obj.y))
    ys, xs = np.nonzero(obj.mask)
    xs, ys = xs + x0, ys + y0
    on = (xs >= 0) & (xs < CANVAS) & (ys >= 0) & (ys < CANVAS)
    on[on] = ~occluded[ys[on], xs[on]]
    if not on.any():
        return None, 0.0
    box = (float(xs[on].min()), float(ys[on].min()), float(xs[on].max() + 1), float(ys[on].max() + 1))
    return box, float(on.mean())


def _draw(canvas: np.ndarray, obj: _Object) -> None:
    ph, pw = obj.patch.shape
    x0, y0 = int(round(obj.x)), int(round(obj.y))
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(CANVAS, x0 + pw), min(CANVAS, y0 + ph)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    region = canvas[cy0:cy1, cx0:cx1]
    np.maximum(region, obj.patch[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0], out=region)


@dataclass(frozen=True)
class VideoFrames:
    """One generated video: uint8 frames and, per frame, the annotated objects."""

    frames: list[np.ndarray]
    objects: list[_Object]
    annotations: list[list[tuple[int, tuple[float, ...], float]]]  # per frame: (object, box, visibility)
    ood_entry_frame: int | None
    occluder: tuple[float, float, float] | None  # x at frame 0, width, drift per frame


def entry_frames(n_frames: int) -> tuple[int, int]:
    """[first, last) frame an unknown object may enter at: after n/6 ID-only frames, with
    at least n/3 frames left to see it (24 frames: 4..15).

    >>> entry_frames(24)
    (4, 16)
    """
    return n_frames // 6, n_frames - n_frames // 3


def generate_video(id_pool: list[Glyph], unknown_pools: tuple[list[Glyph], list[Glyph]] | None,
                   rng: np.random.Generator, n_frames: int = N_FRAMES) -> VideoFrames:
    """One video. With ``unknown_pools`` (near, far), one unknown object enters at a frame
    in ``entry_frames(n_frames)`` and is annotated from exactly that frame on."""
    if n_frames < 8:
        raise CertoodError(f"n_frames: expected at least 8, found {n_frames}")
    objects: list[_Object] = []
    placed: list[tuple[float, ...]] = []
    for _ in range(int(rng.integers(1, 4))):
        objects.append(_at_start(id_pool[int(rng.integers(len(id_pool)))], rng, placed))
    if rng.random() < 0.3:  # an ID object that enters later, so new ID tracks appear too
        glyph = id_pool[int(rng.integers(len(id_pool)))]
        objects.append(_entering(glyph, rng, int(rng.integers(2, n_frames - 4)), "edge",
                                 bounce=bool(rng.random() < 0.75)))
    occluder = None
    if rng.random() < OCCLUDER_PROB:
        width = float(rng.integers(8, 17))
        occluder = (float(rng.uniform(16, CANVAS - 16 - width)), width, float(rng.uniform(-0.6, 0.6)))
    entry = None
    if unknown_pools is not None:
        entry = int(rng.integers(*entry_frames(n_frames)))
        pool = unknown_pools[int(rng.integers(2))]
        mode = "edge" if rng.random() < 0.6 else "appear"

    frames, annotations = [], []
    for t in range(n_frames):
        canvas = np.clip(rng.normal(0.08, 0.03, (CANVAS, CANVAS)), 0, 1).astype(np.float32)
        occluded = _occlusion(occluder, t)
        for obj in objects:
            if t > obj.start:
                obj.step(rng)
        if t == entry:
            objects.append(_unknown(pool, rng, t, mode, objects, occluded))
        frame_anns = []
        for i, obj in enumerate(objects):
            if t < obj.start:
                continue
            _draw(canvas, obj)
            box, vis = _visible(obj, occluded)
            if box is not None and vis >= MIN_VISIBLE:
                frame_anns.append((i, box, vis))
        if occluder is not None:  # dark, in front of every object
            canvas[occluded] = np.clip(rng.normal(0.05, 0.02, int(occluded.sum())), 0, 1)
        frames.append((canvas * 255).round().astype(np.uint8))
        annotations.append(frame_anns)
    return VideoFrames(frames, objects, annotations, entry, occluder)


def _unknown(pool: list[Glyph], rng: np.random.Generator, t: int, mode: str, objects: list[_Object],
             occluded: np.ndarray) -> _Object:
    """The unknown object entering at frame ``t``: visible (not behind the occluder) and,
    when possible, apart from the objects already there."""
    others = [(o.x, o.y, o.x + o.patch.shape[1], o.y + o.patch.shape[0]) for o in objects if o.start <= t]
    fallback = None
    for _ in range(100):
        obj = _entering(pool[int(rng.integers(len(pool)))], rng, t, mode, bounce=True)
        if _visible(obj, occluded)[1] < MIN_VISIBLE:
            continue
        fallback = fallback or obj
        box = (obj.x, obj.y, obj.x + obj.patch.shape[1], obj.y + obj.patch.shape[0])
        if all(_overlap(box, other) < 0.05 for other in others):
            return obj
    return fallback or obj


def _occlusion(occluder: tuple[float, float, float] | None, t: int) -> np.ndarray:
    mask = np.zeros((CANVAS, CANVAS), dtype=bool)
    if occluder is not None:
        x0 = occluder[0] + occluder[2] * t
        lo, hi = max(0, int(round(x0))), min(CANVAS, int(round(x0 + occluder[1])))
        mask[:, lo:hi] = True
    return mask


def generate_video_split(split: str, n_videos: int, sources: dict[str, list[Glyph]], out_dir: Path,
                         seed: int, n_frames: int = N_FRAMES) -> dict:
    """Write one split's frames into ``out_dir/split/<video>/`` and return its COCO-video dict."""
    img_dir = out_dir / split
    with_unknown = split == "video-ood"
    videos, images, annotations, tracks = [], [], [], []
    for v in range(n_videos):
        rng = np.random.default_rng([seed, 100 + VIDEO_SPLITS.index(split), v])
        unknown = (sources["unknown-near"], sources["unknown-far"]) if with_unknown else None
        video = generate_video(sources[split], unknown, rng, n_frames)
        video_id, name = v + 1, f"v{v + 1:04d}"
        (img_dir / name).mkdir(parents=True, exist_ok=True)
        instance_ids = {}
        for i, obj in enumerate(video.objects):
            frames_seen = [t for t, anns in enumerate(video.annotations) if any(j == i for j, _, _ in anns)]
            if not frames_seen:
                continue  # never annotated (left at once, or hidden): not an instance
            category = _category_of(obj.glyph)
            instance_ids[i] = len(tracks) + 1
            tracks.append({
                "id": instance_ids[i], "video_id": video_id, "category_id": category,
                "source": obj.glyph.source, "source_class": obj.glyph.name, "entry": obj.entry,
                "first_frame": frames_seen[0], "last_frame": frames_seen[-1],
                "ood_entry_frame": frames_seen[0] if category == UNKNOWN_CATEGORY_ID else None,
            })
        entries = [t["ood_entry_frame"] for t in tracks
                   if t["video_id"] == video_id and t["ood_entry_frame"] is not None]
        videos.append({"id": video_id, "name": name, "width": CANVAS, "height": CANVAS,
                       "n_frames": n_frames, "ood_entry_frame": min(entries) if entries else None,
                       "occluder": video.occluder is not None})
        for t, (pixels, anns) in enumerate(zip(video.frames, video.annotations)):
            image_id = len(images) + 1
            file_name = f"{name}/{t:06d}.png"
            Image.fromarray(pixels, mode="L").save(img_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": CANVAS, "height": CANVAS,
                           "video_id": video_id, "frame_id": t})
            for i, (x0, y0, x1, y1), vis in anns:
                track = tracks[instance_ids[i] - 1]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "video_id": video_id, "frame_id": t,
                    "category_id": track["category_id"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                    "instance_id": track["id"], "track_id": track["id"],
                    "visibility": round(vis, 4), "ood_entry_frame": track["ood_entry_frame"],
                    "source": track["source"], "source_class": track["source_class"],
                })
    return {
        "info": {"description": f"DigitsDet-Video {split}", "version": FORMAT_VERSION, "seed": seed,
                 "n_frames": n_frames},
        "videos": videos,
        "images": images,
        "annotations": annotations,
        "tracks": tracks,
        "categories": _categories(with_unknown=with_unknown),
    }


def generate_digitsdet_video(out_dir: Path, seed: int = 0, sizes: dict[str, int] | None = None,
                             splits: tuple[str, ...] = VIDEO_SPLITS, n_frames: int = N_FRAMES) -> Path:
    """Generate the video splits into ``out_dir`` (written aside, then moved in place).
    ``sizes``: videos per split."""
    sizes = {**DEFAULT_VIDEOS, **(sizes or {})}
    sources = video_sources(load_glyphs(seed))
    return write_splits_atomically(
        out_dir, splits,
        lambda split, tmp: generate_video_split(split, sizes[split], sources, tmp, seed, n_frames),
        {"seed": seed, "sizes": sizes, "n_frames": n_frames})


def ensure_digitsdet_video(seed: int = 0, cache_dir: Path | None = None) -> Path:
    """The generated DigitsDet-Video root, generating it on first use."""
    root = video_dataset_dir(seed, cache_dir)
    if not (root / "COMPLETE").exists():
        generate_digitsdet_video(root, seed)
    return root
