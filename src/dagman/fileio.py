"""Crash-safe file writing shared by the cache, checkpoints and the encoder export.

:func:`atomic_write` writes through a temporary file in the destination folder (``.<name>.<random>.tmp``),
fsyncs it, renames it over the destination and fsyncs the folder; on any exception (Ctrl-C included) the
temporary file is removed. A reader therefore sees the old file or the new one, never a partial one, and a
writer killed outright leaves only a ``.tmp`` that :func:`remove_stale_temp_files` clears later.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

TMP_SUFFIX = ".tmp"


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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, text: bool = False) -> Any:
    """Call ``write(file)`` on a temporary file next to ``path`` (binary, or UTF-8 text with ``text``), then
    fsync, rename over ``path`` and fsync the folder. Returns what ``write`` returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with (os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")) as fh:
            result = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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
