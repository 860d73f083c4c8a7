"""Monitor artifacts on disk and atomic output files.

A calibrated monitor is a directory::

    manifest.json        spec fingerprint, detector weights sha256, thresholds, versions, seed
    scores.safetensors   every fitted score's tensors, keys "<score name>/<tensor name>"

No pickle anywhere: JSON and safetensors only. Loading checks both fingerprints and
refuses a monitor made for another spec or detector, and validates every manifest value it
uses (types, finiteness, one threshold per score, the label map's length) before any work.

Output directories (a monitor, a ``certood check`` results directory) are replaced whole:
built in a staging directory beside the target (``.<name>.certood-staging.*``, holding a
``.certood-staging`` marker), then swapped in with one rename, so a reader sees the old
complete directory or the new one, whatever kills the run. certood only ever replaces a
directory it wrote (a monitor: its manifest; a results directory: ``certood-results.json``,
which lists every file of the run with its sha256) or an empty one, and a later run removes
the staging leftovers of killed runs (their name *and* marker say certood made them).
Files and directories are created with the permissions the umask gives (0644/0755 under 022).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from certood.errors import ArtifactError, CertoodError, UsageError
from certood.spec import Spec

FORMAT = "certood-monitor"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("spec_fingerprint", "detector_sha256", "detector_threshold", "thresholds",
                 "label_to_category", "scores_sha256")
MONITOR_FILES = ("manifest.json", "scores.safetensors")
RESULTS_MARKER = "certood-results.json"  # written last: a results directory is complete with it
RESULTS_FORMAT = "certood-results"
STAGING_MARKER = ".certood-staging"  # inside every staging directory certood creates
STAGING_FORMAT = "certood-staging"
TEST_DIE_AFTER = "CERTOOD_TEST_DIE_AFTER"  # test-only: see die_here_for_tests
MAX_MANIFEST_BYTES = 64 << 20  # per-class tables and calibration records of large label sets fit
MAX_SCORES_BYTES = 16 << 30  # fitted tensors: a kNN bank or per-class precisions of a large detector
MAX_RESULTS_JSON_BYTES = 256 << 20  # metrics.json: a few KiB per data set and score


# --- permissions -------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkdtemp(prefix: str, parent: Path) -> Path:
    """tempfile.mkdtemp (unique, never an existing path), but with the umask's mode, not 0700."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; a written output is the user's
            os.fchmod(fd, 0o666 & ~current_umask())
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


# --- whole-directory outputs ----------------------------------------------------------------
def die_here_for_tests(stage: str) -> None:
    """Test-only fault injection, inert unless ``CERTOOD_TEST_DIE_AFTER`` names ``stage``.

    ``CERTOOD_TEST_DIE_AFTER=<stage>`` kills the process with SIGKILL at that point,
    ``<stage>:TERM`` with SIGTERM, so tests can check what a killed run leaves behind. Stages:
    ``staged`` (a results staging directory exists), ``calibrated`` (monitor written into it),
    ``written`` (every output written, not yet swapped in), ``swapped`` (new directory in place,
    the old one not yet removed).
    """
    wanted = os.environ.get(TEST_DIE_AFTER)
    if not wanted:
        return
    name, _, how = wanted.partition(":")
    if name == stage:
        os.kill(os.getpid(), signal.SIGTERM if how == "TERM" else signal.SIGKILL)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_small_json(path: Path, limit: int = 1 << 20) -> object | None:
    """A small regular JSON file's value, or None (missing, special, too big, not JSON)."""
    if not _is_regular_file(path) or os.lstat(path).st_size > limit:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_monitor_dir(path: Path) -> bool:
    """A directory holding a certood monitor's manifest.json and nothing certood did not write."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    manifest = _read_small_json(path / "manifest.json")
    return (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and all(p.name in MONITOR_FILES for p in path.iterdir()))


def _walk_files(root: Path) -> list[str]:
    """Every non-directory under ``root`` (symlinks not followed), as POSIX paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out += [(rel / n).as_posix() for n in filenames]
        out += [(rel / n).as_posix() for n in dirnames if (Path(dirpath) / n).is_symlink()]
    return sorted(out)


# what `certood check` wrote before results directories carried certood-results.json
_LEGACY_RESULTS = {"boxes.jsonl", "metrics.json", "summary.txt", "report.md", "report.html",
                   "certify_features.safetensors", "features.safetensors"}


def read_results_marker(results_dir: Path) -> dict | None:
    """certood-results.json of a results directory, or None when it is absent or not ours."""
    marker = _read_small_json(Path(results_dir) / RESULTS_MARKER, limit=16 << 20)
    if isinstance(marker, dict) and marker.get("format") == RESULTS_FORMAT and isinstance(marker.get("files"), dict):
        return marker
    return None


def foreign_results_entries(results_dir: Path) -> list[str] | None:
    """What in ``results_dir`` certood did not write ([] when everything is ours), or None
    when it is not a certood results directory at all (neither a marker nor our metrics.json)."""
    results_dir = Path(results_dir)
    files = _walk_files(results_dir)
    marker = read_results_marker(results_dir)
    if marker is not None:
        return [f for f in files if f != RESULTS_MARKER and f not in marker["files"]]
    metrics = _read_small_json(results_dir / "metrics.json", limit=256 << 20)
    if not (isinstance(metrics, dict) and "spec_fingerprint" in metrics and "protocol" in metrics):
        return None
    legacy = []  # a results directory of an older certood: only its known outputs are ours
    for f in files:
        top = f.split("/", 1)[0]
        if f in _LEGACY_RESULTS or (top == "plots" and f.endswith(".png")) or \
                (top == "monitor" and is_monitor_dir(results_dir / "monitor")):
            continue
        legacy.append(f)
    return legacy


def results_incomplete(results_dir: Path) -> str | None:
    """Why ``results_dir`` is not a complete ``certood check`` output, or None when it is.

    Complete means certood-results.json is there: it is written last, and the directory is
    swapped in whole, so a killed or failed run never leaves one behind with it.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return f"{results_dir}: no such results directory (write one with `certood check SPEC --out DIR`)"
    if read_results_marker(results_dir) is None:
        if not (results_dir / "metrics.json").exists():
            return f"{results_dir}: no metrics.json (not a `certood check` output directory)"
        return (f"{results_dir}: no {RESULTS_MARKER}: not a complete `certood check` output (an "
                "interrupted run, or one from an older certood); rerun `certood check SPEC --out DIR`")
    return None


def results_file_changed(results_dir: Path, name: str) -> str | None:
    """Why ``name`` in ``results_dir`` is not the file the check wrote (sha256), or None."""
    marker = read_results_marker(results_dir)
    path = Path(results_dir) / name
    want = (marker or {}).get("files", {}).get(name)
    if want is None:
        return f"{path}: not listed in {RESULTS_MARKER}"
    try:  # a regular file of bounded size only: what is hashed here is then read whole
        got = hashlib.sha256(read_artifact_file(path, MAX_RESULTS_JSON_BYTES, "results file")).hexdigest()
    except ArtifactError:
        got = None
    if got != want:
        return (f"{path}: not the file this check wrote (sha256 differs from {RESULTS_MARKER}): stale "
                "or edited; rerun `certood check`")
    return None


def write_results_marker(directory: Path, **identity) -> None:
    """Write certood-results.json last into a finished results directory: every file with its sha256."""
    directory = Path(directory)
    files = {}
    for rel in _walk_files(directory):
        if rel in (RESULTS_MARKER, STAGING_MARKER):
            continue
        h = hashlib.sha256()
        with open(directory / rel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        files[rel] = h.hexdigest()
    atomic_write_json(directory / RESULTS_MARKER, {
        "format": RESULTS_FORMAT, "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **identity, "files": files})


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _age_hours(created: object) -> float:
    try:
        then = datetime.fromisoformat(str(created))
    except ValueError:
        return math.inf
    return (datetime.now(timezone.utc) - then).total_seconds() / 3600


def _is_our_leftover(path: Path) -> bool:
    """A staging or set-aside directory of an earlier certood run that is no longer running:
    recognised by its name (checked by the caller) and by a marker of ours inside."""
    if path.is_symlink() or not path.is_dir():
        return False
    marker = _read_small_json(path / STAGING_MARKER)
    if isinstance(marker, dict) and marker.get("format") == STAGING_FORMAT:
        if marker.get("host") != socket.gethostname():  # a shared file system: that run may be alive
            return _age_hours(marker.get("created")) > 24
        return not (marker.get("pid") != os.getpid() and _pid_alive(marker.get("pid")))
    # the moments between the marker's removal and the swap, or after a swap (the old directory)
    return read_results_marker(path) is not None or is_monitor_dir(path) or foreign_results_entries(path) == []


def remove_leftovers(target: Path, keep: Path | None = None) -> list[Path]:
    """Remove the staging directories that killed certood runs left beside ``target`` (all
    but ``keep``, one a resumed run adopted)."""
    target = Path(target)
    removed = []
    prefixes = (f".{target.name}.certood-staging.", f".{target.name}.certood-old.")
    # what certood before staging markers left: .<name>.XXXXXXXX (a monitor being built) and
    # .<name>.old.XXXXXXXX/monitor (the replaced one), taken only when they hold a monitor
    legacy = re.compile(rf"\.{re.escape(target.name)}\.(old\.)?[a-z0-9_]{{8}}")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        ours = entry.name.startswith(prefixes) and _is_our_leftover(entry)
        if not ours and legacy.fullmatch(entry.name) and not entry.is_symlink():
            ours = is_monitor_dir(entry) or is_monitor_dir(entry / "monitor")
        if ours and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot; fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StagedDir:
    """A directory built aside and swapped in whole over ``target`` by :meth:`commit`.

    Created by :func:`stage_dir`; as a context manager it removes the staging directory when
    the block raises (a SIGKILL leaves it, and the next run's :func:`remove_leftovers` takes it).
    """

    def __init__(self, target: Path, path: Path, replaceable):
        self.target, self.path, self._replaceable = target, path, replaceable
        self.keep_on_interrupt: str | None = None  # a subdirectory worth a resume (check: "shards")

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and self.keep_on_interrupt \
                and (self.path / self.keep_on_interrupt).is_dir():
            return  # interrupted: left for `--resume` (the next run without it removes it)
        self.discard()

    def discard(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        """Swap the staging directory in: readers see the old target or the new one, never a mix."""
        target = self.target
        why = _why_not_replaceable(target, self._replaceable)  # files may have appeared meanwhile
        if why:
            raise UsageError(why)
        (self.path / STAGING_MARKER).unlink(missing_ok=True)
        parent = target.parent
        if target.is_dir() and any(target.iterdir()):
            if _exchange(self.path, target):
                die_here_for_tests("swapped")
                shutil.rmtree(self.path, ignore_errors=True)  # now the old directory
            else:
                aside = _mkdtemp(f".{target.name}.certood-old.", parent)
                _write_staging_marker(aside)
                os.replace(target, aside / "old")
                os.replace(self.path, target)
                die_here_for_tests("swapped")
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.path, target)  # over nothing, or over an empty directory
        _fsync_dir(parent)
        return target


def _write_staging_marker(path: Path) -> None:
    atomic_write_json(path / STAGING_MARKER, {
        "format": STAGING_FORMAT, "pid": os.getpid(), "host": socket.gethostname(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _why_not_replaceable(target: Path, replaceable) -> str | None:
    if target.is_symlink():
        return f"{target}: is a symbolic link; pass the directory itself"
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{target}: exists and is not a directory; certood will not replace it"
    if not any(target.iterdir()):
        return None
    return replaceable(target)


def _os_error(path: Path, e: OSError, what: str) -> CertoodError:
    cls = UsageError if isinstance(e, (NotADirectoryError, FileExistsError)) else CertoodError
    return cls(f"{path}: cannot {what} ({e.strerror or e})")


def adoptable_staging(target: Path, holds: str) -> Path | None:
    """The newest staging directory a killed certood run left beside ``target`` that holds
    ``holds`` (``certood check --resume``: its ``shards``), or None."""
    prefix = f".{target.name}.certood-staging."
    try:
        found = [e for e in target.parent.iterdir()
                 if e.name.startswith(prefix) and _is_our_leftover(e) and (e / holds).is_dir()]
    except OSError:
        return None
    return max(found, key=lambda e: (e / holds).stat().st_mtime, default=None)


def stage_dir(target: Path, replaceable, adopt: str | None = None) -> StagedDir:
    """Check that ``target`` may be written, and open a staging directory beside it.

    ``replaceable(target) -> str | None`` says why a non-empty existing directory must not be
    replaced (None: it may). Refusals are UsageErrors (exit 2) naming the path; a location
    that cannot be written (read-only, full disk, no permission) is a CertoodError (exit 3).
    Both come before any work: the caller stages first. Missing parents are created (as
    ``mkdir -p``; pytest's --junitxml and ruff's --output-file do the same).
    """
    target = Path(os.path.abspath(target))  # "." and "..": the staging must sit beside, not inside
    if target == target.parent:
        raise UsageError(f"{target}: the file system root cannot be an output directory")
    why = _why_not_replaceable(target, replaceable)
    if why:
        raise UsageError(why)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(target.parent, e, "create the output's parent directory") from None
    adopted = adoptable_staging(target, adopt) if adopt else None
    remove_leftovers(target, keep=adopted)
    try:
        path = adopted or _mkdtemp(f".{target.name}.certood-staging.", target.parent)
    except OSError as e:
        raise _os_error(target.parent, e, "write the output here") from None
    try:
        _write_staging_marker(path)  # an adopted directory is this run's now
    except OSError as e:
        shutil.rmtree(path, ignore_errors=True)
        raise _os_error(target.parent, e, "write the output here") from None
    return StagedDir(target, path, replaceable)


def _monitor_replaceable(target: Path) -> str | None:
    if is_monitor_dir(target):
        return None
    manifest = _read_small_json(target / "manifest.json")
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        foreign = sorted(p.name for p in target.iterdir() if p.name not in MONITOR_FILES)
        return (f"{target}: holds files certood did not write ({', '.join(foreign)}); a monitor is "
                "replaced whole: move them away or choose another path")
    return (f"{target}: exists and is not a certood monitor (no manifest.json of format {FORMAT!r}); "
            "certood replaces only a monitor it wrote or an empty directory: choose another path")


def results_replaceable(target: Path) -> str | None:
    """None when ``target`` is a certood results directory holding only what certood wrote."""
    foreign = foreign_results_entries(target)
    if foreign is None:
        return (f"{target}: exists, is not empty and is not a `certood check` results directory "
                f"(no {RESULTS_MARKER} or metrics.json of certood); choose another --out or empty it")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (f"{target}: holds files certood did not write ({shown}); a new check replaces the "
                "directory whole: move them away or choose another --out")
    return None


def stage_monitor(target: Path) -> StagedDir:
    """:func:`stage_dir` for a monitor directory (replaces only a monitor, or an empty directory)."""
    return stage_dir(target, _monitor_replaceable)


def stage_results(target: Path, resume: bool = False) -> StagedDir:
    """:func:`stage_dir` for a ``certood check`` results directory; ``resume``: continue in
    the staging directory of a killed check of the same target (its ``shards``), if any."""
    return stage_dir(target, results_replaceable, adopt="shards" if resume else None)


def versions() -> dict[str, str]:
    import torchvision

    import certood

    return {"certood": certood.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version()}


def save_monitor(monitor, out_dir: Path, staged: StagedDir | None = None) -> Path:
    """Write ``monitor`` (a :class:`certood.monitor.Monitor`) into ``out_dir``, replacing it whole.

    ``out_dir`` may be missing, empty, or a monitor certood wrote; anything else is refused
    (UsageError) and left as it is. ``staged`` is :func:`stage_monitor`'s result when the
    caller checked the location before calibrating (``certood calibrate`` does).
    """
    out_dir = Path(out_dir)
    with staged or stage_monitor(out_dir) as staged:
        try:
            write_monitor_files(monitor, staged.path)
            return staged.commit()
        except OSError as e:
            raise CertoodError(f"{out_dir}: cannot write the monitor ({e.strerror or e})") from None


def write_monitor_files(monitor, directory: Path) -> None:
    """manifest.json and scores.safetensors of ``monitor`` in ``directory`` (the manifest pins
    the tensors' sha256, so a mixture of two monitors is refused on load)."""
    from safetensors.torch import save

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
    atomic_write_bytes(directory / "scores.safetensors", blob)
    atomic_write_json(directory / "manifest.json", manifest)


def read_artifact_file(path: Path, max_bytes: int, what: str) -> bytes:
    """A monitor file's bytes: a regular file of at most ``max_bytes`` (a FIFO or a device
    never blocks or streams), else an ArtifactError naming it (exit 3)."""
    from certood.spec.files import UnreadableFile, read_regular_file

    try:
        return read_regular_file(path, max_bytes, what)
    except UnreadableFile as e:
        raise ArtifactError(str(e)) from None


def read_manifest(monitor_dir: Path) -> dict:
    path = Path(monitor_dir) / "manifest.json"
    if not os.path.lexists(path):
        raise ArtifactError(f"{monitor_dir}: not a monitor directory (no manifest.json); "
                            "create one with `certood calibrate SPEC -o DIR`")
    try:
        manifest = json.loads(read_artifact_file(path, MAX_MANIFEST_BYTES, "monitor manifest").decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError too
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
    problems = manifest_problems(manifest)
    if problems:
        raise ArtifactError(f"{path}: " + "; ".join(problems) + " (a damaged or edited manifest: recalibrate)")
    return manifest


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _describe(x) -> str:
    text = json.dumps(x, allow_nan=True) if not isinstance(x, float) else repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _number_table_problems(key: str, table, length: int | None = None) -> list[str]:
    if not isinstance(table, dict):
        return [f"{key}: expected an object of score name -> number, found {_describe(table)}"]
    out = []
    for name, v in table.items():
        if length is None and not _is_number(v):
            out.append(f"{key}.{name}: expected a finite number, found {_describe(v)}")
        elif length is not None and not (isinstance(v, list) and all(_is_number(x) for x in v)):
            out.append(f"{key}.{name}: expected a list of finite numbers, found {_describe(v)}")
    return out


def manifest_problems(manifest: dict) -> list[str]:
    """Every manifest value certood uses that has the wrong type or is not finite, located by key.

    >>> manifest_problems({"spec_fingerprint": "f", "detector_sha256": "d", "scores_sha256": "s",
    ...     "detector_threshold": "high", "thresholds": {"energy": "abc"}, "label_to_category": [1]})
    ['detector_threshold: expected a finite number, found "high"', 'thresholds.energy: expected a finite number, found "abc"']
    """
    out = [f"{k}: expected a string, found {_describe(manifest[k])}"
           for k in ("spec_fingerprint", "detector_sha256", "scores_sha256") if not isinstance(manifest[k], str)]
    if not _is_number(manifest["detector_threshold"]):
        out.append(f"detector_threshold: expected a finite number, found {_describe(manifest['detector_threshold'])}")
    out += _number_table_problems("thresholds", manifest["thresholds"])
    if manifest.get("class_thresholds") is not None:
        out += _number_table_problems("class_thresholds", manifest["class_thresholds"], length=-1)
    cats = manifest["label_to_category"]
    if not (isinstance(cats, list) and cats and all(isinstance(c, int) and not isinstance(c, bool) for c in cats)):
        out.append(f"label_to_category: expected a non-empty list of category ids (integers), found {_describe(cats)}")
    scores = manifest.get("scores", {})
    if not isinstance(scores, dict) or not all(isinstance(v, dict) for v in scores.values()):
        out.append(f"scores: expected an object of score name -> object, found {_describe(scores)}")
    else:
        out += [f"scores.{n}.feature_dim: expected an integer, found {_describe(v.get('feature_dim'))}"
                for n, v in scores.items() if v.get("feature_dim") is not None
                and (not isinstance(v.get("feature_dim"), int) or isinstance(v.get("feature_dim"), bool))]
    if not isinstance(manifest.get("calibration", {}), dict):
        out.append(f"calibration: expected an object, found {_describe(manifest['calibration'])}")
    return out


def manifest_fit_problems(manifest: dict, spec: Spec, num_classes: int | None = None) -> list[str]:
    """What in a (well-typed) manifest does not fit ``spec``: a threshold per score the spec
    sets one for, per-class tables and the label map as long as the detector's classes."""
    expected = set(spec.threshold.fixed) if spec.threshold.method == "fixed" else set(spec.scores)
    have = set(manifest["thresholds"])
    out = []
    if expected - have:
        out.append(f"thresholds: missing {', '.join(sorted(expected - have))} (one per score of the spec)")
    if have - expected:
        out.append(f"thresholds: {', '.join(sorted(have - expected))} not a score of this spec")
    if num_classes is None:
        num_classes = spec.detector.num_classes
    n_labels = len(manifest["label_to_category"])
    if num_classes is not None and n_labels != num_classes - 1:
        out.append(f"label_to_category: expected {num_classes - 1} category ids (the detector has "
                   f"{num_classes} classes with background), found {n_labels}")
    for name, table in (manifest.get("class_thresholds") or {}).items():
        if name not in spec.scores:
            out.append(f"class_thresholds.{name}: not a score of this spec")
        elif len(table) != n_labels + 1:
            out.append(f"class_thresholds.{name}: expected {n_labels + 1} values (background and each "
                       f"label), found {len(table)}")
    scores = manifest.get("scores", {})
    out += [f"scores: missing {name} (a score of this spec)" for name in spec.scores
            if scores and name not in scores]
    return out


def check_manifest_fits(monitor_dir: Path, manifest: dict, spec: Spec, num_classes: int | None = None) -> None:
    """Refuse (ArtifactError naming the file and keys) a manifest that does not fit ``spec``."""
    problems = manifest_fit_problems(manifest, spec, num_classes)
    if problems:
        raise ArtifactError(f"{Path(monitor_dir) / 'manifest.json'}: " + "; ".join(problems)
                            + " (a damaged or edited manifest: recalibrate)")


def load_monitor(monitor_dir: Path, spec: Spec, detector_sha256: str, head=None, num_classes: int | None = None):
    """Load a monitor for ``spec`` and the detector with ``detector_sha256``, or refuse.

    ``head`` (the detector's RoI-feature -> foreground-logits callable) is given back to
    scores that run it (ODIN): code is never stored in an artifact. ``num_classes`` (the
    detector's, with background; default the spec's) checks the label map's length.
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
    check_manifest_fits(monitor_dir, manifest, spec, num_classes)
    scores_path = Path(monitor_dir) / "scores.safetensors"
    blob = read_artifact_file(scores_path, MAX_SCORES_BYTES, "monitor tensor file")
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
