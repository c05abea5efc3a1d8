"""The prepared-volume cache: the contract between ``dagman data prepare`` and the pretraining sampler.

Layout of a cache folder ``CACHE``::

    CACHE/manifest.json        {"version": 1, "settings": {...}, "volumes": [entry, ...]}
    CACHE/skipped.json         [{"source": str, "reason": str}, ...]  (inputs that could not be used)
    CACHE/volumes/<id>.npy     one prepared volume each

A prepared volume is a ``float16`` array of shape ``(X, Y, Z)`` (voxel index order of the canonical
RAS+ orientation, as nibabel's ``as_closest_canonical`` gives), resampled to isotropic ``spacing`` mm,
HU clipped to ``[hu_min, hu_max]`` and scaled to ``[0, 1]``, cropped to the body. Stored as plain
``.npy`` so it opens memory-mapped (``np.load(path, mmap_mode="r")``): a random crop reads only the
pages it touches.

``settings`` records what produced the cache (spacing, hu window, min size, format version); a cache is
reused only when its settings match. A manifest entry::

    {"id": str,               # file stem under volumes/, unique, filesystem-safe
     "source": str,           # the input path (file, DICOM folder, or "dataset.json#<index>")
     "source_sha256": str,    # checksum of the source bytes (all files of a DICOM series, in order)
     "shape": [X, Y, Z],      # prepared shape
     "spacing": [s, s, s],    # prepared spacing in mm
     "source_shape": [...], "source_spacing": [...],
     "file": "volumes/<id>.npy",
     "sha256": str}           # checksum of the prepared .npy file
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagman.errors import DataError

MANIFEST = "manifest.json"
SKIPPED = "skipped.json"
VOLUMES_DIR = "volumes"
CACHE_FORMAT_VERSION = 1


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@dataclass(frozen=True)
class CacheEntry:
    id: str
    source: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    file: str
    raw: dict

    @classmethod
    def from_dict(cls, d: dict) -> "CacheEntry":
        return cls(
            id=d["id"],
            source=d["source"],
            shape=tuple(int(s) for s in d["shape"]),
            spacing=tuple(float(s) for s in d["spacing"]),
            file=d["file"],
            raw=d,
        )


def read_manifest(cache: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of a cache, or a one-line :class:`DataError`."""
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise DataError(f"{cache}: not a prepared cache (no {MANIFEST}); run 'dagman data prepare' first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or "volumes" not in manifest:
        raise DataError(f"{path}: not a dagman cache manifest")
    return manifest


def cache_entries(cache: str | os.PathLike) -> list[CacheEntry]:
    return [CacheEntry.from_dict(d) for d in read_manifest(cache)["volumes"]]


def open_volume(cache: str | os.PathLike, entry: CacheEntry) -> np.ndarray:
    """Memory-mapped, read-only view of a prepared volume, ``(X, Y, Z) float16``."""
    path = Path(cache) / entry.file
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot open prepared volume ({err})") from None
