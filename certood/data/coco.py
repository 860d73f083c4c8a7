"""COCO-format detection datasets: robust loading, image IO that reports and skips bad files.

A bad annotation (wrong bbox, unknown image) or an unreadable image is recorded in
``dataset.issues`` and skipped; the run goes on. A file that is not COCO at all raises
:class:`DataError`.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from certood.errors import DataError

VIDEO_IMAGE_KEYS = ("video_id", "frame_id")  # kept on images when present (CocoVID layout)
VIDEO_LISTS = ("videos", "tracks")  # top-level lists of video datasets, passed through


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

    @property
    def category_ids(self) -> list[int]:
        return sorted(int(c["id"]) for c in self.coco.get("categories", []))

    @property
    def category_names(self) -> dict[int, str]:
        return {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco.get("categories", [])}

    @classmethod
    def load(cls, annotations: Path, images: Path, max_images: int | None = None,
             name: str | None = None) -> "CocoDataset":
        try:
            raw = json.loads(Path(annotations).read_bytes())
        except FileNotFoundError:
            raise DataError(f"annotation file not found: {annotations}") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{annotations}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
            raise DataError(f"{annotations}: expected a COCO object with an 'images' list")
        for key in ("annotations", "categories"):
            if not isinstance(raw.get(key, []), list):
                raise DataError(f"{annotations}: expected '{key}' to be a list, "
                                f"found {type(raw[key]).__name__}")
        issues: list[str] = []
        images_by_id: dict[int, dict] = {}
        for i, im in enumerate(raw["images"]):
            try:
                images_by_id[int(im["id"])] = {"id": int(im["id"]), "file_name": str(im["file_name"]),
                                               "width": int(im["width"]), "height": int(im["height"])}
            except (KeyError, TypeError, ValueError):
                issues.append(f"{annotations}: images[{i}] lacks a valid id/file_name/width/height; skipped")
                continue
            try:  # video datasets (CocoVID layout): which video, which frame
                images_by_id[int(im["id"])].update(
                    {k: int(im[k]) for k in VIDEO_IMAGE_KEYS if im.get(k) is not None})
            except (TypeError, ValueError):
                issues.append(f"{annotations}: images[{i}] has a non-integer video_id/frame_id; "
                              "read as a still image")
        if max_images is not None:
            images_by_id = dict(list(images_by_id.items())[:max_images])
        anns: list[dict] = []
        for i, a in enumerate(raw.get("annotations", [])):
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
                if max_images is None:
                    issues.append(f"{annotations}: annotations[{i}] points to unknown image {image_id}; skipped")
                continue
            anns.append({**a, "id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x, y, w, h], "area": area, "iscrowd": iscrowd})
        coco = {"images": list(images_by_id.values()), "annotations": anns,
                "categories": raw.get("categories", [])}
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
        return cls(name or Path(annotations).stem, coco, records, issues)

    def iter_images(self) -> Iterator[tuple[ImageRecord, torch.Tensor]]:
        """Yield (record, float CHW RGB image in [0, 1]); unreadable images are reported and skipped."""
        for record in self.records:
            image = read_image(record.path)
            if isinstance(image, str):
                self.issues.append(image)
                continue
            yield record, image

    def pycocotools(self):
        """A pycocotools ``COCO`` index of this dataset (its prints silenced)."""
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = json.loads(json.dumps(self.coco))
            coco.createIndex()
        return coco


def read_image(path: Path) -> torch.Tensor | str:
    """The image as a float CHW RGB tensor in [0, 1], or a message saying why it can't be read."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        return f"{path}: image file not found; skipped"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"{path}: unreadable image ({type(e).__name__}: {e}); skipped"
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
