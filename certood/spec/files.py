"""Reading a user's file: a regular file only, and only up to a size limit.

A FIFO given as a spec, an `extends:` target or a policy file blocks `open()` until a writer
comes; a device (`/dev/zero`, `/dev/urandom`) reads without end. So a file is stat-ed
before it is opened, opened with O_NONBLOCK (a FIFO swapped in after the stat cannot
block), fstat-ed again through the descriptor, and read up to `max_bytes` + 1 bytes (a
file that grows past the limit while it is read is refused too).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "m.yaml")
>>> _ = open(path, "w").write("version: 1\\n")
>>> read_regular_file(path, 100, "spec file")
b'version: 1\\n'
>>> read_regular_file(os.devnull, 100, "spec file")
Traceback (most recent call last):
...
certood.spec.files.UnreadableFile: /dev/null: expected a readable spec file, found a character device, not a regular file
"""
from __future__ import annotations

import os
import stat

from certood.errors import CertoodError

MAX_SPEC_BYTES = 1 << 20  # 1 MiB for a spec or policy file: the largest example spec is under 2 KiB
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_CHUNK = 1 << 16


class UnreadableFile(CertoodError):
    """A user's file that cannot be used as one: missing, not a regular file, too large.

    `reason` reads on its own ("a FIFO (named pipe), not a regular file") and never quotes
    the file's content; `what` names the role of the file ("spec file", "policy file").
    """

    exit_code = 2

    def __init__(self, path, what: str, reason: str, hint: str = ""):
        self.path, self.what, self.reason, self.hint = str(path), what, reason, hint
        message = f"{self.path}: expected a readable {what}, found {reason}"
        super().__init__(message + (f" (hint: {hint})" if hint else ""))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for people.

    >>> file_kind(stat.S_IFIFO), file_kind(stat.S_IFDIR)
    ('a FIFO (named pipe)', 'a directory')
    """
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def size_text(n: int) -> str:
    """A byte count for people: MiB/KiB when exact, else bytes.

    >>> size_text(1 << 20), size_text(3 << 10), size_text(1234)
    ('1 MiB', '3 KiB', '1,234 bytes')
    """
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n:,} bytes"


def _oserror_reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def read_regular_file(path, max_bytes: int, what: str = "file", hint_too_large: str = "") -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them; raises
    UnreadableFile (exit code 2) for anything else, without blocking and without reading
    more than `max_bytes` + 1 bytes."""
    def refuse(reason: str, hint: str = "") -> UnreadableFile:
        return UnreadableFile(path, what, reason, hint)

    def too_large(size: str) -> UnreadableFile:
        return refuse(f"{size} (over the {size_text(max_bytes)} limit)", hint_too_large)

    try:
        before = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise refuse(_oserror_reason(e)) from None
    if not stat.S_ISREG(before.st_mode):
        raise refuse(f"{file_kind(before.st_mode)}, not a regular file")
    if before.st_size > max_bytes:
        raise too_large(f"{before.st_size:,} bytes")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as e:
        raise refuse(_oserror_reason(e)) from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode):  # swapped between the stat and the open
            raise refuse(f"{file_kind(now.st_mode)}, not a regular file")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise refuse(_oserror_reason(e)) from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise too_large("more bytes than when it was opened")
    return b"".join(chunks)


def read_spec_bytes(path, what: str = "spec file") -> bytes:
    """The bytes of a spec, `extends:` target or policy file: a regular file of at most
    MAX_SPEC_BYTES; raises UnreadableFile."""
    return read_regular_file(path, MAX_SPEC_BYTES, what, "specs are small: is this the right file?")
