"""The one detection contract every detector adapter returns, validated in one place."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from certood.errors import CertoodError


@dataclass(frozen=True)
class Detections:
    """Detections of one image after NMS, with the features that produced each of them.

    boxes: float [N, 4] in ``box_format`` (always "xyxy", absolute pixels of the input image)
    labels: int [N], detector label (1..C-1 for torchvision, 0 is background)
    scores: float [N], the detector's confidence (softmax of the logits at the label)
    logits: float [N, C] class logits of the box, background column included
    taps: tap point -> float [N, ...] per-box features (row i belongs to box i)

    >>> d = Detections(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0),
    ...                torch.zeros(0, 6), {})
    >>> len(d)
    0
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    box_format: str = "xyxy"

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        problems = []
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            problems.append(f"boxes of shape [N, 4], got {tuple(self.boxes.shape)}")
        if self.box_format != "xyxy":
            problems.append(f"box_format 'xyxy', got {self.box_format!r}")
        for name, t in (("labels", self.labels), ("scores", self.scores), ("logits", self.logits),
                        *self.taps.items()):
            if t.shape[0] != n:
                problems.append(f"{name} with {n} rows (one per box), got {t.shape[0]}")
        if problems:
            raise CertoodError("invalid detections: expected " + "; ".join(problems))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, keep: torch.Tensor) -> "Detections":
        """The subset of boxes given by a boolean mask or index tensor."""
        return Detections(self.boxes[keep], self.labels[keep], self.scores[keep], self.logits[keep],
                          {k: v[keep] for k, v in self.taps.items()}, self.box_format)


def file_sha256(path: Path) -> str:
    """sha256 of a weights/model file, read in 1 MiB chunks (identifies what a monitor was calibrated on)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
