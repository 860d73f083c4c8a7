"""Images decoded and batched ahead of the detector, in DataLoader worker processes.

``certood check`` feeds its detector through :func:`image_batches`: a torch ``DataLoader``
over a data set's image records with ``workers`` processes decoding (0: in the calling
process), ``prefetch`` batches queued per worker and pinned memory when the detector runs on
a GPU, so the detector does not wait on IO. Batches come in the order asked for; an image that
cannot be read comes back as its issue (:func:`certood.data.coco.decode_record`, as
:meth:`CocoDataset.iter_images` reads) and is left out of its batch, so the run goes on without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from certood.data.coco import ImageRecord, decode_record


@dataclass(frozen=True)
class ImageBatch:
    """One batch: the readable images with their records, and the issues of the others."""

    records: list[ImageRecord]
    images: list[torch.Tensor]
    issues: list[str]
    indices: list[int]  # positions in the data set's records of every image asked for (read or not)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[ImageRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        image, issues = decode_record(self.records[index])
        return index, image, issues


def _collate(items) -> tuple[list[int], list, list[list[str]]]:
    return [i for i, _, _ in items], [im for _, im, _ in items], [m for _, _, m in items]


def image_batches(records: Sequence[ImageRecord], batches: Sequence[Sequence[int]], workers: int = 0,
                  pin_memory: bool = False, prefetch: int = 2) -> Iterator[ImageBatch]:
    """Yield one :class:`ImageBatch` per entry of ``batches`` (lists of positions in
    ``records``), in that order, decoded by ``workers`` processes."""
    if not batches:
        return
    if workers == 0:
        for batch in batches:
            yield _batch(records, *_collate([(i, *decode_record(records[i])) for i in batch]))
        return
    loader = torch.utils.data.DataLoader(
        _Decoded(records), batch_sampler=[list(b) for b in batches], num_workers=workers,
        collate_fn=_collate, pin_memory=pin_memory, prefetch_factor=prefetch, persistent_workers=False)
    for indices, images, issues in loader:
        yield _batch(records, indices, images, issues)


def _batch(records, indices, images, issues) -> ImageBatch:
    read = [(records[i], im) for i, im in zip(indices, images) if im is not None]
    return ImageBatch([r for r, _ in read], [im for _, im in read], [m for ms in issues for m in ms], list(indices))
