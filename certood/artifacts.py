"""Monitor artifacts on disk and atomic output files.

A calibrated monitor is a directory::

    manifest.json        spec fingerprint, detector weights sha256, thresholds, versions, seed
    scores.safetensors   every fitted score's tensors, keys "<score name>/<tensor name>"

No pickle anywhere: JSON and safetensors only. Loading checks both fingerprints and
refuses a monitor made for another spec or detector.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from certood.errors import ArtifactError
from certood.spec import Spec

FORMAT = "certood-monitor"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("spec_fingerprint", "detector_sha256", "detector_threshold", "thresholds",
                 "label_to_category", "scores_sha256")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def versions() -> dict[str, str]:
    import torchvision

    import certood

    return {"certood": certood.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version()}


def save_monitor(monitor, out_dir: Path) -> Path:
    """Write ``monitor`` (a :class:`certood.monitor.Monitor`) into ``out_dir``."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    tensors = {f"{name}/{key}": t.detach().cpu().contiguous()
               for name, score in monitor.scores.items() for key, t in score.state_tensors().items()}
    blob = save(tensors)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec_fingerprint": monitor.spec.fingerprint(),
        "spec_path": str(monitor.spec.path) if monitor.spec.path else None,
        "detector_sha256": monitor.detector_sha256,
        "detector_threshold": monitor.detector_threshold,
        "thresholds": monitor.thresholds,
        "class_thresholds": monitor.class_thresholds,  # per predicted class tables (index: detector label)
        # how the thresholds were set: method, target, the boxes, per-class counts and fallbacks
        "threshold_rule": {**({"tpr": monitor.spec.threshold.tpr} if monitor.spec.threshold.method == "tpr" else {}),
                           **monitor.calibration.get("threshold", {"on": "calibration ID boxes"})},
        "label_to_category": monitor.label_to_category,
        "scores": {name: {"kind": s.kind, "tap": s.tap, "params": monitor.scores[name].params(),
                          "feature_dim": monitor.scores[name].feature_dim}
                   for name, s in monitor.spec.scores.items()},
        "calibration": monitor.calibration,
        "seed": 0,
        "scores_sha256": hashlib.sha256(blob).hexdigest(),
        "versions": versions(),
    }
    # The whole directory is built aside and swapped in, so a reader sees the old monitor or
    # the new one; the manifest also pins the tensors' hash, so a mixture is refused on load.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        atomic_write_bytes(staging / "scores.safetensors", blob)
        atomic_write_json(staging / "manifest.json", manifest)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "monitor")
        os.replace(staging, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def read_manifest(monitor_dir: Path) -> dict:
    path = Path(monitor_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{monitor_dir}: not a monitor directory (no manifest.json); "
                            "create one with `certood calibrate SPEC -o DIR`") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: expected format {FORMAT!r}, found {manifest.get('format')!r}"
                            if isinstance(manifest, dict) else f"{path}: expected a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: expected format_version {FORMAT_VERSION}, "
                            f"found {manifest.get('format_version')!r}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: expected keys {', '.join(REQUIRED_KEYS)}, "
                            f"missing {', '.join(missing)}")
    return manifest


def load_monitor(monitor_dir: Path, spec: Spec, detector_sha256: str, head=None):
    """Load a monitor for ``spec`` and the detector with ``detector_sha256``, or refuse.

    ``head`` (the detector's RoI-feature -> foreground-logits callable) is given back to
    scores that run it (ODIN): code is never stored in an artifact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from certood.monitor import Monitor
    from certood.scores import build_score

    manifest = read_manifest(monitor_dir)
    if manifest["spec_fingerprint"] != spec.fingerprint():
        raise ArtifactError(
            f"{monitor_dir}: calibrated for another spec (fingerprint "
            f"{manifest['spec_fingerprint'][:12]}, this spec {spec.fingerprint()[:12]}: detector, "
            "data.fit, data.calibration, taps, scores or threshold changed); recalibrate")
    if manifest["detector_sha256"] != detector_sha256:
        raise ArtifactError(
            f"{monitor_dir}: calibrated for other detector weights (sha256 "
            f"{manifest['detector_sha256'][:12]}, these weights {detector_sha256[:12]}); recalibrate")
    scores_path = Path(monitor_dir) / "scores.safetensors"
    try:
        blob = scores_path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{scores_path}: unreadable ({e})") from None
    if hashlib.sha256(blob).hexdigest() != manifest["scores_sha256"]:
        raise ArtifactError(f"{scores_path}: does not belong to this manifest (sha256 differs); "
                            "recalibrate")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"{scores_path}: unreadable ({e})") from None
    scores = {}
    for name, s in spec.scores.items():
        score = build_score(s.kind, s.params)
        prefix = f"{name}/"
        score.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if score.needs_head:
            if head is None:
                raise ArtifactError(f"score {name!r} ({s.kind}) runs the detector head: load it "
                                    "with the detector's head")
            score.attach_head(head, manifest["scores"][name].get("feature_dim") or 0)
        scores[name] = score
    return Monitor(spec=spec, scores=scores, thresholds={k: float(v) for k, v in manifest["thresholds"].items()},
                   detector_threshold=float(manifest["detector_threshold"]),
                   label_to_category=[int(c) for c in manifest["label_to_category"]],
                   detector_sha256=detector_sha256, calibration=manifest.get("calibration", {}),
                   class_thresholds={k: [float(x) for x in v] for k, v in (manifest.get("class_thresholds") or {}).items()})
