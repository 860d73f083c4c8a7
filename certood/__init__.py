"""certood: certified out-of-distribution monitoring for object detectors."""
from certood.errors import ArtifactError, CertoodError, DataError, SpecError, UsageError

__version__ = "0.1.0"

__all__ = ["ArtifactError", "CertoodError", "DataError", "SpecError", "UsageError", "__version__"]
