"""The one exception family of certood.

Library code raises these; only the CLI turns them into messages and exit codes
(2 for usage/spec errors, 3 for runtime/data errors).
"""
from __future__ import annotations

from dataclasses import dataclass


class CertoodError(Exception):
    """Base class of every error certood raises on purpose."""

    exit_code = 3


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec file, located for a person to fix.

    >>> str(SpecIssue("m.yaml", 3, 5, "scores.energy.tap", "one of: logits", "'logit'"))
    "m.yaml:3:5: scores.energy.tap: expected one of: logits, found 'logit'"
    """

    file: str
    line: int  # 1-based
    column: int  # 1-based
    key_path: str  # dotted path, "" for the document itself
    expected: str
    found: str
    hint: str = ""
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        key = f" {self.key_path}:" if self.key_path else ""
        msg = f"{where}:{key} expected {self.expected}, found {self.found}"
        if self.hint:
            msg += f" (hint: {self.hint})"
        return msg


class SpecError(CertoodError):
    """A spec file is invalid. Carries every issue found in it, not only the first."""

    exit_code = 2

    def __init__(self, issues: list[SpecIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class UsageError(CertoodError):
    """The command line or its combination of inputs is wrong."""

    exit_code = 2


class DataError(CertoodError):
    """A dataset, image or annotation file cannot be used."""

    exit_code = 3


class ArtifactError(CertoodError):
    """A monitor artifact is missing, corrupt, or belongs to another spec/detector."""

    exit_code = 3
