"""Crash-safe file writing shared by the cache, checkpoints and the encoder export.

:func:`atomic_write` writes through a temporary file in the destination folder (``.<name>.<random>.tmp``),
fsyncs it, renames it over the destination and fsyncs the folder; on any exception (Ctrl-C included) the
temporary file is removed. A reader therefore sees the old file or the new one, never a partial one, and a
writer killed outright leaves only a ``.tmp`` that :func:`remove_stale_temp_files` clears later.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from dagman.errors import DagmanError

TMP_SUFFIX = ".tmp"

# what a user should read into the errno of a failed write
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file would exceed the file-size limit",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "no permission to write there",
    errno.EIO: "the storage reported an I/O error",
}


class WriteError(DagmanError):
    """Writing an output file failed (disk full, quota, size limit, read-only, I/O error). Raised by
    :func:`atomic_write`, which leaves no partial file behind; the previous version of the file is untouched."""


def write_error(path: str | os.PathLike, err: OSError) -> WriteError:
    """``WriteError("cannot write PATH: <strerror> (<what it means>)")``."""
    reason = err.strerror or type(err).__name__
    hint = _WRITE_HINTS.get(err.errno or 0)
    return WriteError(f"cannot write {path}: {reason}" + (f" ({hint})" if hint else ""))


def is_storage_error(err: BaseException) -> bool:
    """True for an OSError that says the storage cannot take more data (full, quota, size limit, read-only,
    I/O error): the CLI reports those on one line instead of a traceback."""
    return isinstance(err, OSError) and err.errno in _WRITE_HINTS and err.errno != errno.EACCES


def file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (0666 minus the umask); ``mkstemp`` uses 0600,
    which would hide a shared cache or run folder from other users."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """File proxy that remembers the first OSError of ``write``: serialisers such as ``torch.save`` turn it
    into an unrelated RuntimeError, and the cause (disk full, ...) would be lost."""

    def __init__(self, fh: IO[Any]):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> Any:
        try:
            return self._fh.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, text: bool = False) -> Any:
    """Call ``write(file)`` on a temporary file next to ``path`` (binary, or UTF-8 text with ``text``), then
    fsync, rename over ``path`` and fsync the folder. Returns what ``write`` returned. An OSError on the way
    (disk full, quota, file-size limit, ...) becomes a one-line :class:`WriteError` naming ``path``; on any
    exception the temporary file is removed and ``path`` keeps its previous content."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from None
    proxy = None
    try:
        os.fchmod(fd, file_mode())
        with (os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")) as fh:
            proxy = _RecordingFile(fh)
            result = write(proxy)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = proxy.error if proxy is not None and proxy.error is not None else err
        if isinstance(cause, OSError):
            raise write_error(path, cause) from None
        raise
    fsync_dir(path.parent)
    return result


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete temporary files (``.*.tmp``) left in ``folder`` by a killed writer; returns how many."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed
