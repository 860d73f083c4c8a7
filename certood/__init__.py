"""certood: certified out-of-distribution monitoring for object detectors.

The Python API (certood.api): ``compile(spec)`` -> ``Monitor.calibrate()``, ``load(dir)`` /
``Monitor.save(dir)``, ``monitor(images)`` -> :class:`ImageResult` of :class:`BoxResult`,
``attach(model, monitor)`` for your own torchvision model or ONNX Runtime session, and
``monitor.stream()`` for video. Imported on first use, so ``import certood`` stays light.
"""
from typing import TYPE_CHECKING

from certood.errors import ArtifactError, CertoodError, DataError, SpecError, UsageError

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them
    from certood.api import BoxResult, ImageResult, Monitor, Stream, attach, compile, load  # noqa: F401

__version__ = "0.1.0"

_API = ("BoxResult", "ImageResult", "Monitor", "Stream", "attach", "compile", "load")

__all__ = ["ArtifactError", "CertoodError", "DataError", "SpecError", "UsageError", "__version__", *_API]


def __getattr__(name: str):
    """The API names, from certood.api when first asked for (it imports torch)."""
    if name in _API:
        from certood import api

        return getattr(api, name)
    raise AttributeError(f"module 'certood' has no attribute {name!r}")
