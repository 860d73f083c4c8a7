"""Shared fixtures: a tiny DigitsDet and a small random Faster R-CNN, each built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from certood.data.digitsdet import SPLITS, generate_digitsdet
from certood.detectors.torchvision_frcnn import digits_fasterrcnn

TINY_SIZES = {split: 40 for split in SPLITS}


@pytest.fixture(scope="session")
def digitsdet_root(tmp_path_factory) -> Path:
    """DigitsDet with 40 images per split, seed 0 (read-only: copy before corrupting)."""
    return generate_digitsdet(tmp_path_factory.mktemp("digitsdet") / "root", seed=0, sizes=TINY_SIZES)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """A randomly initialised 6-class ``digits_fasterrcnn`` (seed 0) saved as safetensors."""
    from safetensors.torch import save_file

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_fasterrcnn(num_classes=6)
    path = tmp_path_factory.mktemp("weights") / "random.safetensors"
    save_file(model.state_dict(), str(path))
    return path


SPEC_TEMPLATE = """\
version: 1
detector: {{kind: torchvision, arch: digits_fasterrcnn, weights: {weights}, num_classes: 6, score_thresh: 0.0}}
data:
  fit:         {{annotations: {root}/train.json, images: {root}/train, max_images: 10}}
  calibration: {{annotations: {root}/val.json, images: {root}/val, max_images: 10}}
  id_test:     {{annotations: {root}/test.json, images: {root}/test, max_images: 10}}
  ood:
    near: {{annotations: {root}/ood-near.json, images: {root}/ood-near, max_images: 10}}
    far:  {{annotations: {far}/ood-far.json, images: {far}/ood-far, max_images: 10}}
taps: {{penultimate: box_head.output, logits: cls_logits}}
scores:
  energy: {{tap: logits, temperature: {temperature}}}
  maha:   {{kind: mahalanobis, tap: penultimate}}
threshold: {{tpr: {tpr}, detector_score: 0.0}}
rule: "{rule}"
"""


@pytest.fixture(scope="session")
def make_tiny_spec(digitsdet_root, random_weights):
    """``make(**changes) -> Spec``: the random detector on 10 images of each tiny DigitsDet split,
    detector-score cut 0 (a random detector still has boxes); ``far`` relocates ood-far."""
    from certood.spec import load_spec_text

    def make(tpr=0.95, temperature=1.0, rule="energy > t.energy or maha > t.maha", far=None):
        return load_spec_text(SPEC_TEMPLATE.format(
            weights=random_weights, root=digitsdet_root, far=far or digitsdet_root, tpr=tpr,
            temperature=temperature, rule=rule))

    return make


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header declares ``width`` x ``height`` (a decompression bomb: tiny on disk)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="session")
def bomb_png():
    """``bomb_png(path, width, height) -> path``: a tiny PNG declaring a huge size."""
    return _bomb_png
