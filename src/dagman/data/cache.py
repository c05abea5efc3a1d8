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
     "source": str,           # the input path: image file or DICOM folder (an image listed in a
                              # dataset.json keeps its own path; see "listed_in")
     "source_sha256": str,    # checksum of the source bytes (all files of a DICOM series, in order)
     "shape": [X, Y, Z],      # prepared shape
     "spacing": [s, s, s],    # prepared spacing in mm
     "source_shape": [...], "source_spacing": [...],
     "file": "volumes/<id>.npy",
     "sha256": str}           # checksum of the prepared .npy file

Fields added by ``dagman data prepare`` (readers must not require them)::

     "listed_in": str,        # "<dataset.json>#<index>" when the source came from an image list
     "format": str,           # "nifti" | "nrrd" | "metaimage" | "dicom"
     "modality": str | None,  # DICOM Modality ("CT"); None when the format does not record it
     "series_uid": str,       # DICOM SeriesInstanceUID (DICOM only)
     "affine": 4x4,           # voxel index of the prepared array -> RAS world mm
     "source_affine": 4x4,    # voxel index of the grid *as stored in the source* -> RAS mm (DICOM: columns,
                              # rows, slices sorted along the normal), so inv(source_affine) @ affine maps
                              # prepared voxels into the source file's voxels
     "source_file_shape": [...],  # shape of that stored grid
     "source_orientation": str,  # its axis codes, e.g. "LPS"
     "crop": [[x0, x1], [y0, y1], [z0, z1]],  # body crop, half-open, in the resampled (uncropped) grid
     "source_size": int, "source_mtime_ns": int, "source_files": int,
                              # quick change check: when all three are unchanged the source is trusted to
                              # still match source_sha256; otherwise it is hashed again
     "seconds": float}        # time it took to prepare

The ``source`` of every entry is an absolute path; ``source_shape`` / ``source_spacing`` are in the canonical
``(X, Y, Z)`` axis order. ``skipped.json`` lists the inputs of the latest run that could not be used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagman.errors import DataError
from dagman.fileio import atomic_write

MANIFEST = "manifest.json"
SKIPPED = "skipped.json"
VOLUMES_DIR = "volumes"
CACHE_FORMAT_VERSION = 1


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`dagman.fileio.atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text), text=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class _HashingWriter:
    """File-like wrapper that computes the sha256 of everything written through it."""

    def __init__(self, fh):
        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.fh.write(data)




def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Save ``array`` as ``.npy`` at ``path`` atomically; returns the sha256 (hex) of the file's bytes.

    Writes ``.<name>.<random>.tmp`` in the same folder, fsyncs and renames; the temporary file is removed
    on any exception, including ``KeyboardInterrupt``, so no partial ``.npy`` is ever left at ``path``.
    """

    def write(fh) -> str:
        writer = _HashingWriter(fh)
        np.lib.format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
        return writer.digest.hexdigest()

    return atomic_write(path, write)


def file_sha256(paths: "list[str | os.PathLike] | str | os.PathLike", chunk: int = 1 << 20) -> str:
    """sha256 (hex) of the concatenated bytes of one file or of several files in the given order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while True:
                block = fh.read(chunk)
                if not block:
                    break
                digest.update(block)
    return digest.hexdigest()


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
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
        raise DataError(f"{path}: cannot open prepared volume ({err or type(err).__name__})") from None
