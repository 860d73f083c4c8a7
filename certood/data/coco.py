"""COCO-format detection datasets: robust loading, image IO that reports and skips bad files.

A bad annotation (wrong bbox, unknown image or category, a box outside its image) or an
unreadable image is recorded in ``dataset.issues`` and skipped; the run goes on. A file that
is not COCO at all, is not a regular file, is over :data:`MAX_ANNOTATION_BYTES`, or gives two
images the same id raises :class:`DataError`.

Limits (module constants, so that a hostile or broken file cannot hang or exhaust a run):

- :data:`MAX_ANNOTATION_BYTES` (2 GiB) per annotation JSON;
- :data:`MAX_IMAGE_BYTES` (256 MiB) per image file;
- :data:`MAX_IMAGE_PIXELS` (64 Mi pixels, e.g. 8192 x 8192) per decoded image, checked on the
  header before decoding (a decompression bomb is a few KiB on disk).

Only regular files are read (a FIFO would block, ``/dev/zero`` never ends): see
:func:`read_regular_file`.

Pixel values: 8-bit modes are divided by 255, 16-bit ones (``I;16*``, and ``I`` with values in
[0, 65535], as 16-bit PNG/TIFF open) by 65535; float images (``F``) are used as they are when
in [0, 1]; anything else without a faithful scale to [0, 1] is reported and skipped. Alpha is
dropped (colours are read as stored, as ``PIL.Image.convert("RGB")`` does); palette images
with transparency are expanded through RGBA first.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from certood.errors import DataError

VIDEO_IMAGE_KEYS = ("video_id", "frame_id")  # kept on images when present (CocoVID layout)
VIDEO_LISTS = ("videos", "tracks")  # top-level lists of video datasets, passed through

MAX_ANNOTATION_BYTES = 2 * 2**30  # a COCO annotation JSON larger than this is refused
MAX_IMAGE_BYTES = 256 * 2**20  # an image file larger than this is reported and skipped
MAX_IMAGE_PIXELS = 64 * 2**20  # width * height above this is reported and skipped (before decoding)
BOX_TOLERANCE_PX = 1.0  # a box may overhang its image by this much (rounding) before it is reported


@dataclass(frozen=True)
class ImageRecord:
    """One image and its ground truth (boxes xyxy in pixels, COCO category ids)."""

    image_id: int
    path: Path
    width: int
    height: int
    gt_boxes: torch.Tensor
    gt_categories: torch.Tensor


@dataclass
class CocoDataset:
    """A COCO detection dataset: annotation JSON + image folder.

    >>> ds = CocoDataset.load(Path("val.json"), Path("val/"))       # doctest: +SKIP
    >>> for record, image in ds.iter_images(): ...                  # doctest: +SKIP
    """

    name: str
    coco: dict
    records: list[ImageRecord]
    issues: list[str] = field(default_factory=list)
    annotations: Path | None = None  # the annotation file, for messages

    @property
    def category_ids(self) -> list[int]:
        return sorted(int(c["id"]) for c in self.coco.get("categories", []))

    @property
    def category_names(self) -> dict[int, str]:
        return {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco.get("categories", [])}

    @property
    def source(self) -> str:
        """The data set's name and annotation file, as messages name it: ``id_test (test.json)``."""
        return f"{self.name} ({self.annotations})" if self.annotations is not None else self.name

    def named_issues(self) -> list[str]:
        """Every issue, prefixed with the data set's name (``"fit: a.png: unreadable ..."``)."""
        return [f"{self.name}: {m}" for m in self.issues]

    @classmethod
    def load(cls, annotations: Path, images: Path, max_images: int | None = None,
             name: str | None = None) -> "CocoDataset":
        raw = _read_coco_json(Path(annotations))
        issues: list[str] = []
        categories = _categories(raw.get("categories", []), annotations, issues)
        images_by_id = _image_entries(raw["images"], annotations, issues)
        if max_images is not None:
            images_by_id = dict(list(images_by_id.items())[:max_images])
        anns = _annotations(raw.get("annotations", []), images_by_id, categories, annotations,
                            issues, subset=max_images is not None)
        coco = {"images": list(images_by_id.values()), "annotations": anns, "categories": categories}
        coco.update({k: raw[k] for k in VIDEO_LISTS if isinstance(raw.get(k), list)})
        by_image: dict[int, list[dict]] = {k: [] for k in images_by_id}
        for a in anns:
            by_image[a["image_id"]].append(a)
        records = []
        for image_id, im in images_by_id.items():
            boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                     for a in by_image[image_id]]
            records.append(ImageRecord(
                image_id, Path(images) / im["file_name"], im["width"], im["height"],
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor([a["category_id"] for a in by_image[image_id]], dtype=torch.long)))
        return cls(name or Path(annotations).stem, coco, records, issues, Path(annotations))

    def iter_images(self) -> Iterator[tuple[ImageRecord, torch.Tensor]]:
        """Yield (record, float CHW RGB image in [0, 1]); unreadable images are reported and
        skipped, an image whose size differs from the declared one is reported and kept (its
        boxes are taken as pixel coordinates of the file)."""
        for record in self.records:
            image, issues = decode_record(record)
            self.issues += issues
            if image is not None:
                yield record, image

    def pycocotools(self):
        """A pycocotools ``COCO`` index of this dataset (its prints silenced)."""
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = json.loads(json.dumps(self.coco))
            coco.createIndex()
        return coco


def decode_record(record: ImageRecord) -> tuple[torch.Tensor | None, list[str]]:
    """(float CHW RGB image in [0, 1] or None, issues) of one record's image file: unreadable
    images are an issue and None; a size other than the declared one is an issue, and the
    image is read as the file is (its boxes taken as pixel coordinates of the file)."""
    image = read_image(record.path)
    if isinstance(image, str):
        return None, [image]
    height, width = image.shape[1:]
    if (width, height) != (record.width, record.height):
        return image, [f"{record.path}: declared {record.width}x{record.height} in the annotations, "
                       f"the file is {width}x{height}; read as the file is"]
    return image, []


# --------------------------------------------------------------------------- annotation file
def _read_coco_json(annotations: Path) -> dict:
    raw_bytes = read_regular_file(annotations, MAX_ANNOTATION_BYTES, "annotation")
    try:
        raw = json.loads(raw_bytes)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{annotations}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DataError(f"{annotations}: expected a COCO object with an 'images' list")
    for key in ("annotations", "categories"):
        if not isinstance(raw.get(key, []), list):
            raise DataError(f"{annotations}: expected '{key}' to be a list, "
                            f"found {type(raw[key]).__name__}")
    return raw


def _categories(entries: list, annotations: Path, issues: list[str]) -> list[dict]:
    """The categories with an integer id, each id once (the first entry wins)."""
    out: dict[int, dict] = {}
    for i, c in enumerate(entries):
        try:
            cat_id = int(c["id"])
        except (KeyError, TypeError, ValueError):
            issues.append(f"{annotations}: categories[{i}] has no integer id; skipped")
            continue
        if cat_id in out:
            issues.append(f"{annotations}: categories[{i}] repeats category id {cat_id}; skipped")
            continue
        out[cat_id] = {**c, "id": cat_id}
    return list(out.values())


def _image_entries(entries: list, annotations: Path, issues: list[str]) -> dict[int, dict]:
    """Image id -> its entry. Two entries with one id raise DataError: which file an
    annotation of that id belongs to cannot be told, and dropping either would silently
    move its ground truth to the other."""
    images_by_id: dict[int, dict] = {}
    first_index: dict[int, int] = {}
    duplicates: list[str] = []
    for i, im in enumerate(entries):
        try:
            entry = {"id": int(im["id"]), "file_name": str(im["file_name"]),
                     "width": int(im["width"]), "height": int(im["height"])}
        except (KeyError, TypeError, ValueError):
            issues.append(f"{annotations}: images[{i}] lacks a valid id/file_name/width/height; skipped")
            continue
        if entry["width"] <= 0 or entry["height"] <= 0:
            issues.append(f"{annotations}: images[{i}] ({entry['file_name']}) declares a non-positive size "
                          f"{entry['width']}x{entry['height']}; skipped")
            continue
        if entry["id"] in images_by_id:
            j = first_index[entry["id"]]
            duplicates.append(f"images[{i}] ({entry['file_name']}) repeats image id {entry['id']} of "
                              f"images[{j}] ({images_by_id[entry['id']]['file_name']})")
            continue
        try:  # video datasets (CocoVID layout): which video, which frame
            entry.update({k: int(im[k]) for k in VIDEO_IMAGE_KEYS if im.get(k) is not None})
        except (TypeError, ValueError):
            issues.append(f"{annotations}: images[{i}] has a non-integer video_id/frame_id; "
                          "read as a still image")
        images_by_id[entry["id"]] = entry
        first_index[entry["id"]] = i
    if duplicates:
        more = f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""
        raise DataError(f"{annotations}: image ids must be unique: " + "; ".join(duplicates[:5]) + more)
    return images_by_id


def _annotations(entries: list, images_by_id: dict[int, dict], categories: list[dict], annotations: Path,
                 issues: list[str], subset: bool) -> list[dict]:
    """The usable annotations, renumbered 1..n. Skipped (reported): no valid bbox/ids, a
    degenerate box, an unknown image (unless ``subset``: dropped with its image by
    ``max_images``), an unknown category (when the file declares categories), a box wholly
    outside its image. Reported and kept: a box overhanging its image by more than
    :data:`BOX_TOLERANCE_PX` (the evaluation takes the ground truth as given)."""
    known_categories = {c["id"] for c in categories}
    anns: list[dict] = []
    for i, a in enumerate(entries):
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            image_id, cat = int(a["image_id"]), int(a["category_id"])
            area, iscrowd = float(a.get("area", w * h)), int(a.get("iscrowd", 0))
        except (KeyError, TypeError, ValueError):
            issues.append(f"{annotations}: annotations[{i}] has no valid bbox/image_id/"
                          "category_id/area/iscrowd; skipped")
            continue
        if not (w > 0 and h > 0 and np.isfinite([x, y, w, h]).all()):
            issues.append(f"{annotations}: annotations[{i}] has a degenerate bbox {a['bbox']}; skipped")
            continue
        if image_id not in images_by_id:
            if not subset:
                issues.append(f"{annotations}: annotations[{i}] points to unknown image {image_id}; skipped")
            continue
        if known_categories and cat not in known_categories:
            issues.append(f"{annotations}: annotations[{i}] has category id {cat}, not one of the file's "
                          f"categories {sorted(known_categories)}; skipped")
            continue
        im = images_by_id[image_id]
        where = f"{annotations}: annotations[{i}] (image {image_id}, {im['file_name']}) bbox {[x, y, w, h]}"
        if x >= im["width"] or y >= im["height"] or x + w <= 0 or y + h <= 0:
            issues.append(f"{where} lies outside the {im['width']}x{im['height']} image; skipped")
            continue
        tol = BOX_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > im["width"] + tol or y + h > im["height"] + tol:
            issues.append(f"{where} extends outside the {im['width']}x{im['height']} image; kept as given")
        anns.append({**a, "id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                     "bbox": [x, y, w, h], "area": area, "iscrowd": iscrowd})
    return anns


# --------------------------------------------------------------------------- file and image IO
def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_regular_file(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes``; else DataError.

    Why this care: ``open()`` on a FIFO blocks forever and ``/dev/zero`` never ends. The path
    is stat-ed first, then opened with ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot
    block the open) and the descriptor fstat-ed again, and at most ``max_bytes + 1`` bytes
    are read (a file growing past the limit is refused too).

    >>> read_regular_file(Path("/dev/zero"), 10, "annotation")      # doctest: +SKIP
    DataError: /dev/zero: expected a regular annotation file, found a character device
    """
    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: expected a regular {what} file, found {_file_kind(st.st_mode)}")
        if st.st_size > max_bytes:
            raise DataError(f"{path}: {what} file of {st.st_size:,} bytes is over the limit of "
                            f"{max_bytes:,} bytes")

    try:
        check(os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open the {what} file ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        check(os.fstat(f.fileno()))
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise DataError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise DataError(f"{path}: {what} file grew over the limit of {max_bytes:,} bytes while read")
    return data


class _UnfaithfulPixels(ValueError):
    """An image whose pixel values have no faithful scale to [0, 1]."""


def image_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as float32 HxWx3 RGB in [0, 1] (scales: the module docstring).

    >>> a = image_to_rgb(Image.fromarray(np.array([[0, 65535]], np.uint16)))
    >>> a.shape, float(a.max())
    ((1, 2, 3), 1.0)
    """
    mode = img.mode
    if mode.startswith("I;16"):  # 16-bit gray; convert("RGB") would clip it to white
        gray = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        values = np.asarray(img)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise _UnfaithfulPixels(f"32-bit integer pixels span [{lo}, {hi}], outside the 16-bit range "
                                    "[0, 65535]: no faithful scale to [0, 1]")
        gray = values.astype(np.float32) / 65535.0
    elif mode == "F":
        gray = np.asarray(img, dtype=np.float32)
        if gray.size and not (np.isfinite(gray).all() and gray.min() >= 0.0 and gray.max() <= 1.0):
            raise _UnfaithfulPixels("float pixels outside [0, 1] (or not finite): no faithful scale to [0, 1]")
    else:
        if mode == "P" and "transparency" in img.info:  # via RGBA: PIL warns on RGB
            img = img.convert("RGBA")
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.asarray(rgb, dtype=np.float32) / 255.0
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_image(path: Path) -> torch.Tensor | str:
    """The image as a float CHW RGB tensor in [0, 1], or a message saying why it can't be read
    (not a regular file, over :data:`MAX_IMAGE_BYTES` or :data:`MAX_IMAGE_PIXELS`, not an
    image, no faithful scale to [0, 1])."""
    try:
        data = read_regular_file(Path(path), MAX_IMAGE_BYTES, "image")
    except DataError as e:
        return f"{e}; skipped"
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning is an error here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    return (f"{path}: image of {width}x{height} = {width * height:,} pixels is over the limit "
                            f"of {MAX_IMAGE_PIXELS:,} (certood.data.coco.MAX_IMAGE_PIXELS); skipped")
                img.load()
                arr = image_to_rgb(img)
    except _UnfaithfulPixels as e:
        return f"{path}: {img.mode} image: {e}; skipped"
    except UnidentifiedImageError:  # PIL's own message names the in-memory buffer, not the file
        return f"{path}: unreadable image (UnidentifiedImageError: not an image format PIL can identify); skipped"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"{path}: image over PIL's decompression-bomb limit ({e}); skipped"
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        return f"{path}: unreadable image ({type(e).__name__}: {e}); skipped"
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
