"""On-disk shards of a ``certood check`` run: what each box's record and the metrics need.

A shard is ``run.shard_images`` consecutive images of one data set after the monitor's
stages (:func:`certood.stages.run_shard`), in one safetensors file
``shards/<data set>/<index>.safetensors`` inside the check's staging directory:

- ``box/image_id``, ``box/box`` (xyxy), ``box/label``, ``box/det_score``, ``box/flag``,
  ``box/gt`` (best-overlapping ground-truth label, -1: none), ``box/gt_match`` (gt_matched
  sets), ``value/<score>``: one row per monitored box;
- ``all/...``: every detection of the ID test set (for mAP), without features;
- ``feature/<tap point>``: features ``--save-features`` exports; ``certify/feature`` and
  ``certify/row``: the certify-tap features of the boxes with a decided certificate (what
  ``certood recheck`` re-proves);
- metadata ``certood``: JSON with the data set, the shard's index and key (the image ids it
  covers), the images read, the data issues, seconds per stage and the certificates.

A killed check leaves its staging directory; ``certood check --resume`` adopts it
(:func:`certood.artifacts.stage_results`) and skips every shard whose key matches, so finished
images are not redone; the run key (``shards/run.json``: what the results depend on) must match
too, else the old shards are dropped.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from certood.artifacts import atomic_write_bytes, atomic_write_json
from certood.errors import ArtifactError
from certood.extract import DatasetDetections
from certood.stages import BatchResult

FORMAT = "certood shard v1"
RUN_FILE = "run.json"
MAX_SHARD_BYTES = 16 << 30  # a shard of many 800-px images' RoI features still fits


def shard_key(image_ids) -> str:
    """What a shard covers: sha256 of its image ids in order (16 hex digits)."""
    return hashlib.sha256(json.dumps([int(i) for i in image_ids]).encode()).hexdigest()[:16]


@dataclass
class Shard:
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def n_boxes(self) -> int:
        return int(self.tensors["box/image_id"].shape[0])

    def dets(self) -> DatasetDetections:
        """The monitored boxes, without features."""
        t = self.tensors
        return DatasetDetections(self.meta["dataset"], t["box/image_id"], t["box/box"], t["box/label"],
                                 t["box/det_score"], {}, len(self.meta["read_image_ids"]),
                                 self.meta["detector_seconds"], 0.0, tuple(self.meta["read_image_ids"]))

    def all_dets(self) -> DatasetDetections | None:
        t = self.tensors
        if "all/image_id" not in t:
            return None
        return DatasetDetections(self.meta["dataset"], t["all/image_id"], t["all/box"], t["all/label"],
                                 t["all/det_score"], {}, len(self.meta["read_image_ids"]), 0.0, 0.0,
                                 tuple(self.meta["read_image_ids"]))

    def values(self) -> dict[str, torch.Tensor]:
        return {name: self.tensors[f"value/{name}"] for name in self.meta["scores"]}


def make_shard(result: BatchResult, *, dataset: str, index: int, image_ids, read_image_ids,
               certify_keep=None) -> Shard:
    """The shard of a :func:`certood.stages.run_shard` result. ``certify_keep(certificate)``:
    whether a box's certify feature is stored (default: decided certificates)."""
    dets = result.dets
    t = {"box/image_id": dets.image_ids.long(), "box/box": dets.boxes.float(), "box/label": dets.labels.long(),
         "box/det_score": dets.det_scores.float(), "box/flag": result.flags.to(torch.uint8)}
    if result.gt is not None:
        t["box/gt"] = result.gt.long()
    if result.gt_match is not None:
        t["box/gt_match"] = result.gt_match.long()
    for name, v in result.values.items():
        t[f"value/{name}"] = v.detach()
    for point, f in dets.taps.items():
        t[f"feature/{point}"] = f.detach().float()
    if result.all_dets is not None:
        a = result.all_dets
        t.update({"all/image_id": a.image_ids.long(), "all/box": a.boxes.float(), "all/label": a.labels.long(),
                  "all/det_score": a.det_scores.float()})
    meta = {"format": FORMAT, "dataset": dataset, "index": index, "key": shard_key(image_ids),
            "read_image_ids": [int(i) for i in read_image_ids], "issues": list(result.issues),
            "scores": list(result.values), "detector_seconds": result.detector_seconds,
            "score_seconds": result.score_seconds, "certify_seconds": result.certify_seconds}
    if result.certificates is not None:
        keep = certify_keep or (lambda c: c.verdict != "undecided")
        rows = [i for i, c in enumerate(result.certificates) if keep(c)]
        meta["certificates"] = [c.to_json() for c in result.certificates]
        if rows:
            t["certify/row"] = torch.tensor(rows, dtype=torch.long)
            t["certify/feature"] = result.certify_features[rows].detach().float()
    return Shard({k: v.contiguous() for k, v in t.items()}, meta)


def _dir_name(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "__", dataset)


class ShardStore:
    """The shards of one run under ``root`` (``<staging>/shards``)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def open(self, run_key: dict) -> int:
        """Start or continue the run ``run_key`` (what its results depend on). Shards of another
        run are dropped (certood wrote them, in its own staging directory). Returns the number
        of shards kept."""
        path = self.root / RUN_FILE
        old = _read_json(path)
        if old != run_key and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if old != run_key:
            atomic_write_json(path, run_key)
            return 0
        return sum(1 for _ in self.root.glob("*/*.safetensors"))

    def path(self, dataset: str, index: int) -> Path:
        return self.root / _dir_name(dataset) / f"{index:06d}.safetensors"

    def done(self, dataset: str, index: int, image_ids) -> bool:
        """Whether the shard is on disk, complete, for these images."""
        meta = self._meta(self.path(dataset, index))
        return meta is not None and meta.get("key") == shard_key(image_ids) and meta.get("dataset") == dataset

    def write(self, shard: Shard) -> Path:
        from safetensors.torch import save

        path = self.path(shard.meta["dataset"], shard.meta["index"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(shard.tensors, metadata={"certood": json.dumps(shard.meta)}))
        return path

    def read(self, dataset: str, index: int, prefixes: tuple[str, ...] = ("box/", "value/", "all/")) -> Shard:
        """The shard's tensors whose names start with ``prefixes`` (features only when asked)."""
        from safetensors import safe_open

        path = self.path(dataset, index)
        meta = self._meta(path)
        if meta is None:
            raise ArtifactError(f"{path}: not a complete certood shard")
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
        return Shard(tensors, meta)

    def iter(self, dataset: str, count: int, prefixes: tuple[str, ...] = ("box/", "value/", "all/")) -> Iterator[Shard]:
        for index in range(count):
            yield self.read(dataset, index, prefixes)

    @staticmethod
    def _meta(path: Path) -> dict | None:
        """The metadata of a shard file certood wrote (None: missing, partial or foreign)."""
        from safetensors import safe_open

        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_SHARD_BYTES:
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("certood", "null"))
        except Exception:  # noqa: BLE001 - a torn or foreign file is simply not a finished shard
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _read_json(path: Path):
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
