"""Proxy OOD families made from ID digits and the canvas background only (issue 14).

Each family is one *kind* of novelty. Every proxy object is built from the 8x8 ID digit images
of one DigitsDet split (digits 0-4; the evaluation sets use ``val``) or from noise drawn like
the canvas background (``N(0.08, 0.03)``), then composed on canvases exactly as DigitsDet
composes its splits (:func:`certood.data.digitsdet.write_canvases`: same size range, polarity
and background). No OOD split, no font and no external image is read.

| family | kind of novelty | how an object is made |
|---|---|---|
| ``chimera`` | recombined strokes | top/bottom or left/right halves of two ID digits of different classes |
| ``scramble`` | local texture of ID images | an ID digit's blocks (1, 2 or 4 px) shuffled |
| ``noise_patch`` | background texture | a patch of background-like noise (grain 1, 2 or 4), contrast-stretched |
| ``noise_blob`` | noise-filled blob | the blurred support of an ID digit, filled with stretched background noise |
| ``smooth_blob`` | smooth blob | an ID digit blurred until no stroke is left |
| ``geometry`` | geometry | an ID digit rotated by 90/270, flipped, or squeezed to half width / height |
| ``photometric`` | photometric | an ID digit inverted (whole or one half) or blurred and gamma-brightened |
| ``partial`` | partial objects | a zoomed crop of an ID digit, or the digit with a 4x4 block erased |
| ``overlap`` | merged objects | two ID digits of different classes superimposed with a small offset |

``overlap`` is the family argued for beyond the issue's five kinds: crowded scenes give a
detector one box over two objects, which is neither a new stroke arrangement (the two digits
are whole) nor a texture, and an ID classifier tends to answer it confidently with one class.

Texture objects are built at 16x16 (finer than the digits' 8x8) so that their grain survives
the upscaling to 16-40 px on the canvas.

>>> rng = np.random.default_rng(0)
>>> pool = [Glyph(np.eye(8, dtype=np.float32), "digits:0", "1"), Glyph(np.ones((8, 8), np.float32) / 2, "digits:1", "0")]
>>> sorted({make_object(f, pool, rng).pixels.shape for f in FAMILIES})
[(8, 8), (16, 16)]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from certood.data.digitsdet import ID_DIGITS, UNKNOWN_CATEGORY_ID, Glyph, compose_canvas, write_canvases

FAMILIES = {  # name -> the kind of novelty it stands for
    "chimera": "recombined strokes",
    "scramble": "local texture of ID images",
    "noise_patch": "background texture",
    "noise_blob": "noise-filled blob",
    "smooth_blob": "smooth blob",
    "geometry": "geometry",
    "photometric": "photometric",
    "partial": "partial objects",
    "overlap": "merged objects",
}
TEXTURE = 16  # resolution of the texture objects


def _resize(px: np.ndarray, h: int, w: int) -> np.ndarray:
    img = Image.fromarray(px.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _stretch(px: np.ndarray) -> np.ndarray:
    lo, hi = float(px.min()), float(px.max())
    return ((px - lo) / (hi - lo) if hi > lo else np.zeros_like(px)).astype(np.float32)


def background_noise(size: int, grain: int, rng: np.random.Generator) -> np.ndarray:
    """``size x size`` noise drawn like the canvas background, ``grain`` px per cell, stretched to [0, 1]."""
    cells = rng.normal(0.08, 0.03, (size // grain, size // grain))
    return _stretch(np.kron(cells, np.ones((grain, grain))))


def _shuffle_blocks(px: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    n = px.shape[0] // block
    blocks = px.reshape(n, block, n, block).transpose(0, 2, 1, 3).reshape(n * n, block, block)
    blocks = blocks[rng.permutation(n * n)]
    return blocks.reshape(n, n, block, block).transpose(0, 2, 1, 3).reshape(px.shape)


def _shift(px: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(px)
    h, w = px.shape
    out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = px[max(0, -dy):h - max(0, dy),
                                                                  max(0, -dx):w - max(0, dx)]
    return out


def _squeeze(px: np.ndarray, axis: int) -> np.ndarray:
    out = np.zeros_like(px)
    if axis == 1:
        out[:, 2:6] = _resize(px, 8, 4)
    else:
        out[2:6, :] = _resize(px, 4, 8)
    return out


def make_object(family: str, pool: list[Glyph], rng: np.random.Generator) -> Glyph:
    """One proxy object of ``family`` from the ID digit images ``pool`` (and background noise)."""
    a = pool[int(rng.integers(len(pool)))]
    others = [g for g in pool if g.name != a.name] or pool
    b = others[int(rng.integers(len(others)))]
    p = a.pixels.astype(np.float32)
    if family == "chimera":
        axis = int(rng.integers(2))
        px = np.concatenate([np.split(p, 2, axis)[0], np.split(b.pixels, 2, axis)[1]], axis=axis)
        how = f"halves{axis}:{a.source}+{b.source}"
    elif family == "scramble":
        block = int(rng.choice([1, 2, 4]))
        px, how = _shuffle_blocks(p, block, rng), f"blocks{block}:{a.source}"
    elif family == "noise_patch":
        grain = int(rng.choice([1, 2, 4]))
        px, how = background_noise(TEXTURE, grain, rng), f"noise{grain}:background"
    elif family == "noise_blob":
        support = gaussian_filter(_resize(p, TEXTURE, TEXTURE), 1.5)
        mask = support > 0.35 * support.max()
        grain = int(rng.choice([1, 2]))
        px = np.where(mask, 0.3 + 0.7 * background_noise(TEXTURE, grain, rng), 0.0)
        how = f"blob{grain}:{a.source}"
    elif family == "smooth_blob":
        sigma = float(rng.uniform(1.5, 3.0))
        px, how = _stretch(gaussian_filter(_resize(p, TEXTURE, TEXTURE), sigma)), f"smooth{sigma:.1f}:{a.source}"
    elif family == "geometry":
        op = str(rng.choice(["rot90", "rot270", "flip_lr", "flip_ud", "squeeze_x", "squeeze_y"]))
        px = {"rot90": lambda: np.rot90(p, 1), "rot270": lambda: np.rot90(p, 3), "flip_lr": lambda: p[:, ::-1],
              "flip_ud": lambda: p[::-1], "squeeze_x": lambda: _squeeze(p, 1), "squeeze_y": lambda: _squeeze(p, 0)}[op]()
        how = f"{op}:{a.source}"
    elif family == "photometric":
        op = str(rng.choice(["invert", "invert_half", "blur_gamma"]))
        if op == "invert":
            px = 1.0 - p
        elif op == "invert_half":
            half = np.zeros_like(p, dtype=bool)
            side = int(rng.integers(4))
            half[(slice(0, 4), slice(4, 8), slice(None), slice(None))[side],
                 (slice(None), slice(None), slice(0, 4), slice(4, 8))[side]] = True
            px = np.where(half, 1.0 - p, p)
        else:
            px = _stretch(gaussian_filter(p, 0.8)) ** 0.4
        how = f"{op}:{a.source}"
    elif family == "partial":
        if rng.random() < 0.5:
            k = int(rng.integers(4, 6))
            y, x = (int(v) for v in rng.integers(0, 9 - k, 2))
            px, how = _resize(p[y:y + k, x:x + k], 8, 8), f"crop{k}:{a.source}"
        else:
            y, x = (int(v) for v in rng.integers(0, 5, 2))
            px = p.copy()
            px[y:y + 4, x:x + 4] = 0.0
            how = f"occlude:{a.source}"
    elif family == "overlap":
        dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
        px, how = np.maximum(p, _shift(b.pixels.astype(np.float32), dy, dx)), f"overlap:{a.source}+{b.source}"
    else:
        raise ValueError(f"unknown proxy family {family!r}; expected one of {', '.join(FAMILIES)}")
    return Glyph(np.ascontiguousarray(np.clip(px, 0.0, 1.0), dtype=np.float32), f"{family}/{how}", f"~{a.name}")


def id_pool(glyphs: dict[str, list[Glyph]], split: str) -> list[Glyph]:
    """The ID digit images (0-4) of one split: the only objects proxies are made from."""
    return [g for g in glyphs[split] if g.source.startswith("digits:") and int(g.name) in ID_DIGITS]


def write_family(out: Path, family: str, pool: list[Glyph], n_images: int, seed: int) -> tuple[Path, Path]:
    """Canvases of one family (1-4 objects each, category ``unknown``) in COCO format under ``out``."""
    ann, folder = out / f"{family}.json", out / family
    if ann.exists():
        return ann, folder
    rng = np.random.default_rng([seed, list(FAMILIES).index(family), 2026])
    images, annotations = write_canvases(
        folder, n_images, lambda r: [make_object(family, pool, r) for _ in range(int(r.integers(1, 5)))], rng,
        lambda g: UNKNOWN_CATEGORY_ID)
    cats = [{"id": d + 1, "name": str(d)} for d in ID_DIGITS] + [{"id": UNKNOWN_CATEGORY_ID, "name": "unknown"}]
    tmp = ann.with_suffix(".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    tmp.replace(ann)
    return ann, folder


def picture(pool: list[Glyph], path: Path, per_family: int = 4, seed: int = 0) -> Path:
    """A PNG grid: one row per family, ``per_family`` example canvases (3 objects each)."""
    from PIL import ImageDraw

    label_w, size, pad = 170, 128, 4
    grid = Image.new("L", (label_w + per_family * (size + pad), len(FAMILIES) * (size + pad)), 255)
    draw = ImageDraw.Draw(grid)
    for row, family in enumerate(FAMILIES):
        rng = np.random.default_rng([seed, row])
        y = row * (size + pad)
        draw.text((4, y + size // 2 - 12), family, fill=0)
        draw.text((4, y + size // 2 + 2), FAMILIES[family], fill=90)
        for col in range(per_family):
            pixels, _ = compose_canvas([make_object(family, pool, rng) for _ in range(3)], rng)
            grid.paste(Image.fromarray(pixels, mode="L"), (label_w + col * (size + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
