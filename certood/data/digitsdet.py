"""DigitsDet: real handwritten digits composed into a detection dataset, offline.

Objects are scikit-learn's ``load_digits`` images (1,797 real 8x8 handwritten digits,
UCI optical digits) upscaled and max-composited onto dark noisy 128x128 canvases.
Splits, written in COCO format so downstream code is the code users run on VOC/COCO:

- ``train``, ``val`` (calibration), ``test``: digits 0-4 (the ID classes);
- ``ood-near``: digits 5-9 only (unseen classes that look like the seen ones);
- ``ood-far``: letters rendered from the fonts matplotlib ships, passed through the same
  8x8 imaging pipeline as the digits so that only the shape is new;
- ``mixed``: ID digits and unseen digits in the same canvases (for the ground-truth
  matched protocol); unseen objects carry the category ``unknown``.

Every source digit image belongs to exactly one split (``SOURCE_SHARES``) and the whole
dataset is a deterministic function of the seed.

>>> root = ensure_digitsdet()                # generated once into the cache, then reused
>>> ann, img_dir = split_paths(root, "val")
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FORMAT_VERSION = 1
CANVAS = 128
ID_DIGITS = (0, 1, 2, 3, 4)
NEAR_DIGITS = (5, 6, 7, 8, 9)
UNKNOWN_CATEGORY_ID = 99
SPLITS = ("train", "val", "test", "ood-near", "ood-far", "mixed")
DEFAULT_SIZES = {"train": 2000, "val": 500, "test": 500, "ood-near": 300, "ood-far": 300, "mixed": 300}
# Which split each source digit image goes to (shares of each class's images).
SOURCE_SHARES = {
    "id": (("train", 0.6), ("val", 0.15), ("test", 0.15), ("mixed", 0.10)),
    "near": (("ood-near", 0.6), ("mixed", 0.4)),
}
# Letters that read as an ID digit (O~0, I/l/i~1, Z/z~2) would make "far" OOD ill-posed.
FAR_LETTERS = "".join(c for c in "ABCDEFGHJKLMNPQRSTUVWXYabdefghkmnpqrtuvwy")
FAR_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
    "cmr10.ttf", "cmss10.ttf", "STIXGeneral.ttf",
)


@dataclass(frozen=True)
class Glyph:
    """One source object: an 8x8 intensity image in [0, 1] and where it came from."""

    pixels: np.ndarray
    source: str  # "digits:<index>" or "font:<file>:<char>"
    name: str  # the digit or letter it shows


def default_cache_dir() -> Path:
    """``$CERTOOD_CACHE`` or ``~/.cache/certood``."""
    return Path(os.environ.get("CERTOOD_CACHE", Path.home() / ".cache" / "certood"))


def dataset_dir(seed: int = 0, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"digitsdet-v{FORMAT_VERSION}-seed{seed}"


def split_paths(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of one split under a generated root."""
    return root / f"{split}.json", root / split


def partition_sources(targets: np.ndarray, seed: int) -> dict[str, list[int]]:
    """Assign every digit image index to exactly one split, class by class.

    >>> parts = partition_sources(np.array([0, 0, 5, 5, 1]), seed=0)
    >>> sorted(i for v in parts.values() for i in v)
    [0, 1, 2, 3, 4]
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = np.flatnonzero(targets == digit)
        rng.shuffle(idx)
        shares = SOURCE_SHARES["id" if digit in ID_DIGITS else "near"]
        bounds = np.cumsum([0.0] + [s for _, s in shares])
        cuts = np.round(bounds * len(idx)).astype(int)
        for (split, _), lo, hi in zip(shares, cuts[:-1], cuts[1:]):
            parts[split].extend(int(i) for i in idx[lo:hi])
    return parts


def render_letter(font_path: Path, char: str) -> np.ndarray:
    """A letter rendered at 48 px, cropped and reduced to the digits' 8x8 look."""
    font = ImageFont.truetype(str(font_path), 40)
    img = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(img).text((32, 32), char, fill=255, font=font, anchor="mm")
    arr = np.asarray(img)
    ys, xs = np.nonzero(arr > 32)
    crop = img.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    # load_digits images keep a blank margin: fit into 6x8 like most digits, pad to 8x8.
    w, h = crop.size
    new_w = max(2, min(8, round(8 * w / h)))
    small = np.asarray(crop.resize((new_w, 8), Image.BOX), dtype=np.float32) / 255.0
    out = np.zeros((8, 8), dtype=np.float32)
    x0 = (8 - new_w) // 2
    out[:, x0 : x0 + new_w] = small
    return np.round(out * 16) / 16  # 17 grey levels, as in the UCI digits


def load_glyphs(seed: int) -> dict[str, list[Glyph]]:
    """Source glyphs per split: digits partitioned by image, letters for ood-far."""
    from matplotlib import get_data_path
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    targets = digits.target
    parts = partition_sources(targets, seed)
    glyphs: dict[str, list[Glyph]] = {}
    for split, idx in parts.items():
        glyphs[split] = [Glyph(images[i], f"digits:{i}", str(targets[i])) for i in idx]
    font_dir = Path(get_data_path()) / "fonts" / "ttf"
    glyphs["ood-far"] = [
        Glyph(render_letter(font_dir / f, c), f"font:{f}:{c}", c)
        for f in FAR_FONTS
        if (font_dir / f).exists()
        for c in FAR_LETTERS
    ]
    return glyphs


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _patch(glyph: Glyph, rng: np.random.Generator) -> np.ndarray:
    size = int(rng.integers(16, 41))
    aspect = float(rng.uniform(0.85, 1.15))
    w, h = max(8, int(round(size * aspect))), size
    img = Image.fromarray((glyph.pixels * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0 * float(rng.uniform(0.7, 1.0))


def compose_canvas(glyphs: list[Glyph], rng: np.random.Generator, max_tries: int = 50):
    """Max-composite glyph patches on dark noise; returns (uint8 image, [(x0,y0,x1,y1), glyph])."""
    canvas = np.clip(rng.normal(0.08, 0.03, (CANVAS, CANVAS)), 0, 1).astype(np.float32)
    placed: list[tuple[tuple[float, ...], Glyph]] = []
    for glyph in glyphs:
        patch = _patch(glyph, rng)
        ys, xs = np.nonzero(patch > 0.1 * patch.max())
        if len(xs) == 0:
            continue
        ph, pw = patch.shape
        for _ in range(max_tries):
            x, y = int(rng.integers(0, CANVAS - pw + 1)), int(rng.integers(0, CANVAS - ph + 1))
            box = (x + xs.min(), y + ys.min(), x + xs.max() + 1.0, y + ys.max() + 1.0)
            if all(_iou(box, other) < 0.05 for other, _ in placed):
                region = canvas[y : y + ph, x : x + pw]
                np.maximum(region, patch, out=region)
                placed.append((tuple(float(v) for v in box), glyph))
                break
    return (canvas * 255).round().astype(np.uint8), placed


def _categories(with_unknown: bool) -> list[dict]:
    cats = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in ID_DIGITS]
    if with_unknown:
        cats.append({"id": UNKNOWN_CATEGORY_ID, "name": "unknown", "supercategory": "ood"})
    return cats


def _category_of(glyph: Glyph) -> int:
    if glyph.source.startswith("digits:") and int(glyph.name) in ID_DIGITS:
        return int(glyph.name) + 1
    return UNKNOWN_CATEGORY_ID


def _pick(split: str, glyphs: dict[str, list[Glyph]], rng: np.random.Generator) -> list[Glyph]:
    n = int(rng.integers(1, 5))
    pool = glyphs[split]
    if split != "mixed":
        return [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    # mixed: at least one ID and one unseen digit per canvas
    known = [g for g in pool if int(g.name) in ID_DIGITS]
    unknown = [g for g in pool if int(g.name) not in ID_DIGITS]
    n = max(n, 2)
    picks = [known[int(rng.integers(len(known)))], unknown[int(rng.integers(len(unknown)))]]
    picks += [pool[int(i)] for i in rng.integers(0, len(pool), n - 2)]
    return picks


def write_canvases(img_dir: Path, n_images: int, pick: Callable[[np.random.Generator], list[Glyph]],
                   rng: np.random.Generator, category_of: Callable[[Glyph], int] = _category_of
                   ) -> tuple[list[dict], list[dict]]:
    """Compose ``n_images`` canvases of the glyphs ``pick(rng)`` chooses, write their PNGs into
    ``img_dir``, and return the COCO ``images`` and ``annotations`` (ids from 1)."""
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        pixels, placed = compose_canvas(pick(rng), rng)
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels, mode="L").save(img_dir / name)
        images.append({"id": image_id, "file_name": name, "width": CANVAS, "height": CANVAS})
        for (x0, y0, x1, y1), glyph in placed:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": category_of(glyph),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0, "source": glyph.source, "source_class": glyph.name,
            })
    return images, annotations


def generate_split(split: str, n_images: int, glyphs: dict[str, list[Glyph]], out_dir: Path,
                   seed: int) -> dict:
    """Write one split's PNGs into ``out_dir/split`` and return its COCO dict."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    images, annotations = write_canvases(out_dir / split, n_images, lambda r: _pick(split, glyphs, r), rng)
    return {
        "info": {"description": f"DigitsDet {split}", "version": FORMAT_VERSION, "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": _categories(with_unknown=split not in ("train", "val", "test")),
    }


def generate_digitsdet(out_dir: Path, seed: int = 0, sizes: dict[str, int] | None = None,
                       splits: tuple[str, ...] = SPLITS) -> Path:
    """Generate the splits into ``out_dir`` (written to a temp dir, then moved in place)."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    glyphs = load_glyphs(seed)
    return write_splits_atomically(
        out_dir, splits, lambda split, tmp: generate_split(split, sizes[split], glyphs, tmp, seed),
        {"seed": seed, "sizes": sizes})


def _generated_dir_replaceable(splits) -> Callable[[Path], str | None]:
    """Why an existing directory is not a generated dataset certood may replace (None: it is).

    Only a directory holding the COMPLETE marker and nothing but the splits' files is one: a
    command never deletes what it did not create (``--out ~/project`` is refused, not wiped).
    """
    ours = {"COMPLETE"} | {f"{split}.json" for split in splits} | set(splits)

    def why(target: Path) -> str | None:
        if (target / "COMPLETE").is_file() and all(e.name in ours for e in target.iterdir()):
            return None
        return (f"{target}: exists and is not a data set certood generated (no COMPLETE marker, "
                "or other files inside); certood will not replace it: pass a new or empty directory")
    return why


def write_splits_atomically(out_dir: Path, splits, make_split, complete: dict) -> Path:
    """Build every split in a staging dir beside ``out_dir`` (``make_split(split, tmp)`` writes
    its images and returns its COCO dict), mark it COMPLETE, then swap it in whole.

    ``out_dir`` may be missing, empty, or an earlier generated data set (replaced whole);
    anything else is refused (UsageError) before any work.
    """
    from certood.artifacts import atomic_write_text, stage_dir

    with stage_dir(Path(out_dir), _generated_dir_replaceable(splits)) as staged:
        for split in splits:
            atomic_write_text(staged.path / f"{split}.json", json.dumps(make_split(split, staged.path)))
        atomic_write_text(staged.path / "COMPLETE", json.dumps(complete))
        return staged.commit()


def ensure_digitsdet(seed: int = 0, cache_dir: Path | None = None) -> Path:
    """The generated dataset root, generating it on first use."""
    root = dataset_dir(seed, cache_dir)
    if not (root / "COMPLETE").exists():
        generate_digitsdet(root, seed)
    return root
