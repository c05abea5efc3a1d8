"""``dagman data prepare``: turn CT in any supported format into the memory-mappable cache.

Per volume (:func:`prepare_volume`): read (:func:`dagman.data.io.read_ct`, canonical RAS+ HU) -> resample to
isotropic ``spacing`` mm (:func:`resample_isotropic`: separable linear interpolation, Gaussian anti-aliasing
along axes that shrink, same physical centre and extent up to half a voxel) -> crop to the body
(:func:`body_crop`, on HU, widened to ``BODY_MIN_SIDE`` voxels where the volume allows) -> refuse only a
degenerate volume (a side below ``min_size`` voxels, default 8) -> clip to the HU window and scale to
``[0, 1]`` (:func:`window_hu`) -> ``float16`` ``.npy`` written atomically -> manifest entry.

:func:`prepare` does that for many inputs, in parallel processes, idempotently (unchanged sources with the
same settings are not redone), reporting every unusable input with a one-line reason instead of aborting.
The cache layout and manifest fields are documented in :mod:`dagman.data.cache`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dagman.data import cache as cache_mod
from dagman.data.cache import CACHE_FORMAT_VERSION, MANIFEST, SKIPPED, VOLUMES_DIR
from dagman.data.io import CTVolume, ImageReadError, Source, list_sources, read_ct
from dagman.errors import ConfigError, DataError
from dagman.fileio import TMP_SUFFIX, WriteError, remove_stale_temp_files

BODY_THRESHOLD_HU = -500.0  # voxels above this (soft tissue, bone; not air or lung) count as body
BODY_MARGIN_MM = 10.0  # margin kept around the body's bounding box
BODY_COMPONENT_FRACTION = 0.1  # keep connected components with at least this fraction of the largest's voxels
RESAMPLING = "linear, gaussian anti-aliasing when downsampling"
#: the body box is widened to this many voxels per side where the volume allows it (the smallest input of a
#: 4-stage Swin at patch 2); thinner volumes are kept and padded with air at crop time by the sampler
BODY_MIN_SIDE = 32
#: default of ``min_size``: a side below this many voxels (16 mm at 2 mm) is not a usable CT volume
MIN_SIDE = 8
MIN_HU_RANGE = 50.0  # a CT in HU spans far more (air -1000 .. bone > 300); less means it is not in HU
MANIFEST_SAVE_INTERVAL_S = 15.0  # during long runs, the manifest is rewritten at most this often

STATUSES = ("prepared", "cached", "skipped")


# ----------------------------------------------------------------------------------------------------------
# Pure array steps


def resample_isotropic(array: np.ndarray, affine: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 3D volume to isotropic voxels of ``spacing`` mm.

    ``array``: ``(X, Y, Z) float32``; ``affine``: ``(4, 4)`` voxel -> world mm. Along each axis with ``n``
    voxels of size ``s`` the new grid has ``n' = max(1, round(n * s / spacing))`` voxels of size ``spacing``,
    centred on the old grid's centre, so the physical extent ``n' * spacing`` matches ``n * s`` to within
    half a voxel. Values are interpolated linearly along each axis in turn (= trilinear), with samples beyond
    the outermost voxel centres taking the edge value; axes that shrink by ``f > 1`` are first smoothed with a
    Gaussian of sigma ``(f - 1) / 2`` voxels against aliasing. Returns ``(array (X', Y', Z') float32,
    affine (4, 4))``; the new affine has the same directions and columns of length ``spacing``.
    """
    from scipy.ndimage import gaussian_filter1d

    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    array = np.asarray(array, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    old_spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    coords = []
    for n, s in zip(array.shape, old_spacing):
        n_new = max(1, int(round(n * s / spacing)))
        # centres of the new voxels, in old voxel index units, sharing the old grid's centre
        coords.append((n - 1) / 2.0 + (np.arange(n_new) - (n_new - 1) / 2.0) * (spacing / s))
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * (spacing / old_spacing)[None, :]
    first = np.array([c[0] for c in coords] + [1.0])
    new_affine[:3, 3] = (affine @ first)[:3]
    # shrink the volume first so that later passes touch fewer voxels
    for axis in sorted(range(3), key=lambda a: len(coords[a]) / array.shape[a]):
        n, c = array.shape[axis], coords[axis]
        if len(c) == n and np.allclose(c, np.arange(n)):
            continue
        factor = (c[1] - c[0]) if len(c) > 1 else n
        if factor > 1.0:
            array = gaussian_filter1d(array, sigma=(factor - 1.0) / 2.0, axis=axis, mode="nearest", truncate=3.0)
        array = _linear_along(array, axis, c)
    return np.ascontiguousarray(array, dtype=np.float32), new_affine


def _linear_along(array: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` at fractional indices ``coords`` (clamped to the edges)."""
    n = array.shape[axis]
    if n == 1:
        return np.repeat(array, len(coords), axis=axis)
    c = np.clip(coords, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(c).astype(np.intp), n - 2)
    w = (c - i0).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w.reshape(shape)
    low = np.take(array, i0, axis=axis)
    high = np.take(array, i0 + 1, axis=axis)
    high -= low
    high *= w
    low += high
    return low


def window_hu(array: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``[lo, hi]`` and scale linearly to ``[0, 1]``: ``(clip(x, lo, hi) - lo) / (hi - lo)``.
    Same shape, ``float32``."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    out = np.clip(np.asarray(array, dtype=np.float32), lo, hi)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def body_crop(
    hu: np.ndarray,
    spacing: float,
    *,
    min_size: int = 0,
    threshold: float = BODY_THRESHOLD_HU,
    margin_mm: float = BODY_MARGIN_MM,
) -> tuple[slice, slice, slice]:
    """The bounding box of the body in an isotropic HU volume ``(X, Y, Z)``, as three slices.

    Body = voxels above ``threshold`` HU, keeping the largest connected component and any other component
    with at least ``BODY_COMPONENT_FRACTION`` of its size (arms, legs), plus ``margin_mm`` on every side.
    Each side is then widened (around its centre, within the volume) to at least ``min_size`` voxels when the
    volume allows it. Never empty: with no voxel above the threshold, the whole volume is kept.
    """
    from scipy import ndimage

    full = tuple(slice(0, n) for n in hu.shape)
    mask = hu > threshold
    if not mask.any():
        return full  # type: ignore[return-value]
    labels, n_labels = ndimage.label(mask)
    if n_labels > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= BODY_COMPONENT_FRACTION * sizes.max()
        mask = keep[labels]
    margin = int(math.ceil(margin_mm / spacing))
    box = []
    for axis, n in enumerate(hu.shape):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start, stop = max(0, int(present[0]) - margin), min(n, int(present[-1]) + 1 + margin)
        want = min(n, max(min_size, stop - start))
        if stop - start < want:
            centre = (start + stop) / 2.0
            start = int(round(centre - want / 2.0))
            start = min(max(0, start), n - want)
            stop = start + want
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# One volume


def make_settings(spacing: float, hu_window: tuple[float, float], min_size: int) -> dict:
    """The settings dict recorded in (and compared against) a cache manifest."""
    return {
        "spacing": float(spacing),
        "hu_window": [float(hu_window[0]), float(hu_window[1])],
        "min_size": int(min_size),
        "body_threshold_hu": BODY_THRESHOLD_HU,
        "body_margin_mm": BODY_MARGIN_MM,
        "resampling": RESAMPLING,
        "dtype": "float16",
        "format_version": CACHE_FORMAT_VERSION,
    }


def source_signature(src: Source) -> dict:
    """Cheap change detector of a source's files: total size, newest mtime (ns), number of files."""
    size, mtime, n = 0, 0, 0
    for f in src.data_files():
        st = os.stat(f)
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
        n += 1
    return {"source_size": size, "source_mtime_ns": mtime, "source_files": n}


def source_sha256(src: Source) -> str:
    """sha256 of the source's bytes (every file of a DICOM series, in file-name order)."""
    return cache_mod.file_sha256(src.data_files())


def prepare_volume(volume: CTVolume, settings: dict) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice, slice]]:
    """Resample, crop and window one volume. Returns ``(array (X, Y, Z) float16 in [0, 1], affine (4, 4) of
    that array, crop slices in the resampled grid)``. Raises :class:`DataError` when a side is shorter than
    ``settings["min_size"]`` after resampling (a degenerate volume: thinner ones are kept, the sampler pads
    them to the crop), or when the values span less than ``MIN_HU_RANGE`` (an image already scaled to [0, 1]
    is not HU and would window to a blank volume)."""
    spacing = settings["spacing"]
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if hi - lo < MIN_HU_RANGE:
        raise ImageReadError(
            volume.source, f"values span only {lo:.1f}..{hi:.1f}: not Hounsfield units (already normalised?)"
        )
    hu, affine = resample_isotropic(volume.array, volume.affine, spacing)
    min_size = int(settings["min_size"])
    if min(hu.shape) < min_size:
        shape = "x".join(str(s) for s in hu.shape)
        raise ImageReadError(
            volume.source,
            f"too thin: {shape} voxels at {spacing:g} mm, a side below {min_size} voxels ({min_size * spacing:g} mm) "
            "is not a usable CT volume (<<min_size>>)",
        )
    box = body_crop(hu, spacing, min_size=BODY_MIN_SIDE)
    hu = hu[box]
    start = np.array([b.start for b in box] + [1.0])
    affine = affine.copy()
    affine[:3, 3] = (affine @ start)[:3]
    return window_hu(hu, settings["hu_window"]).astype(np.float16), affine, box


def _prepare_task(src: Source, vol_id: str, out: str, settings: dict) -> dict:
    """Worker body: prepare one source into ``out/volumes/<vol_id>.npy``. Never raises for bad data: returns
    ``{"status": "prepared", "entry": {...}, ...}`` or ``{"status": "skipped", "reason": str, ...}``."""
    t0 = time.perf_counter()
    result: dict = {"status": "skipped", "source_shape": None, "source_spacing": None}
    try:
        signature = source_signature(src)
        digest = source_sha256(src)
        volume = read_ct(src)
        result["source_shape"] = list(volume.shape)
        result["source_spacing"] = [round(s, 4) for s in volume.spacing]
        array, affine, box = prepare_volume(volume, settings)
        rel = f"{VOLUMES_DIR}/{vol_id}.npy"
        npy_sha = cache_mod.atomic_save_npy(Path(out) / rel, array)
        entry = {
            "id": vol_id,
            "source": src.path,
            "source_sha256": digest,
            "shape": [int(s) for s in array.shape],
            "spacing": [float(settings["spacing"])] * 3,
            "source_shape": result["source_shape"],
            "source_spacing": result["source_spacing"],
            "file": rel,
            "sha256": npy_sha,
            "format": volume.meta.get("format"),
            "modality": volume.meta.get("modality"),
            "affine": np.round(affine, 6).tolist(),
            "source_affine": np.round(volume.source_affine, 6).tolist(),
            "source_file_shape": list(volume.source_shape),
            "source_orientation": volume.meta.get("source_orientation"),
            "crop": [[b.start, b.stop] for b in box],
            **signature,
        }
        if src.listed_in:
            entry["listed_in"] = src.listed_in
        if volume.meta.get("series_uid"):
            entry["series_uid"] = volume.meta["series_uid"]
        result.update(status="prepared", entry=entry, shape=entry["shape"])
    except WriteError:  # the cache's storage, not this input: stop the whole run (disk full, quota, ...)
        raise
    except ImageReadError as err:
        result["reason"] = err.reason
    except DataError as err:
        result["reason"] = str(err)
    except OSError as err:
        result["reason"] = f"cannot read ({err.strerror or err})"
    except MemoryError:
        result["reason"] = "out of memory while preparing this volume (try fewer --workers)"
    except Exception as err:  # a bug or an exotic file must not abort the other volumes
        result["reason"] = f"unexpected error ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if result["status"] == "prepared":
        result["entry"]["seconds"] = result["seconds"]
    return result


# ----------------------------------------------------------------------------------------------------------
# Report


@dataclass
class VolumeRow:
    """One input's outcome. ``status``: ``prepared | cached | skipped``; ``shape``: prepared ``[X, Y, Z]``;
    ``source_shape`` / ``source_spacing`` (mm): canonical grid before resampling; ``reason`` when skipped."""

    source: str
    status: str
    name: str = ""
    id: str | None = None
    shape: list[int] | None = None
    source_shape: list[int] | None = None
    source_spacing: list[float] | None = None
    reason: str | None = None
    seconds: float = 0.0


@dataclass
class PrepareReport:
    """What :func:`prepare` did: one row per input, in input order, plus ``kept``, the number of volumes from
    earlier runs (over other inputs) that are still in the cache."""

    out: str
    settings: dict
    rows: list[VolumeRow] = field(default_factory=list)
    kept: int = 0

    def _with(self, status: str) -> list[VolumeRow]:
        return [r for r in self.rows if r.status == status]

    @property
    def prepared(self) -> list[VolumeRow]:
        return self._with("prepared")

    @property
    def cached(self) -> list[VolumeRow]:
        return self._with("cached")

    @property
    def skipped(self) -> list[VolumeRow]:
        return self._with("skipped")

    @property
    def usable(self) -> int:
        """Volumes in the cache after the run."""
        return len(self.prepared) + len(self.cached) + self.kept

    def summary_line(self) -> str:
        """``"6 prepared, 1 cached, 3 skipped -> CACHE"``."""
        parts = [f"{len(self.prepared)} prepared", f"{len(self.cached)} cached", f"{len(self.skipped)} skipped"]
        if self.kept:
            parts.append(f"{self.kept} kept from earlier runs")
        return ", ".join(parts) + f" -> {self.out}"

    def padded_lines(self, *, names: bool = True) -> list[str]:
        """A line naming the usable volumes of this run that are thinner than the crop of some ``--size`` preset
        (kept: the sampler pads them with air to the crop), with the presets concerned; empty when none.
        ``names=False``: the count only."""
        from dagman.config import SIZES, preset_config

        crops = sorted((int(preset_config(size).data.crop_size), size) for size in SIZES)
        thin = []
        for r in self.rows:
            if r.status in ("prepared", "cached") and r.shape:
                sizes = [size for crop, size in crops if min(int(v) for v in r.shape) < crop]
                if sizes:
                    thin.append(f"{r.name or os.path.basename(r.source)} ({_fmt_shape(r.shape)}: {', '.join(sizes)})")
        if not thin:
            return []
        more = f" and {len(thin) - 5} more" if len(thin) > 5 else ""
        presets = ", ".join(f"{size} {crop}" for crop, size in crops)
        which = f": {'; '.join(thin[:5])}{more}" if names else ""
        return [f"padded at crop time: {len(thin)} volume{'s' if len(thin) > 1 else ''} with a side shorter than the "
                f"crop of --size ({presets} voxels), kept and padded with air{which}"]

    def format_table(self, *, only_skipped: bool = False, total: bool = True) -> str:
        """Fixed-width table: source name, status, ``source shape @ spacing -> prepared shape`` or the reason;
        then the volumes that crops will pad (:meth:`padded_lines`) and the summary line."""
        rows = self.skipped if only_skipped else self.rows
        names = [_clip_left(r.name or os.path.basename(r.source), 40) for r in rows]
        width = max([len("source")] + [len(n) for n in names])
        lines = []
        if rows:
            lines.append(f"{'source':<{width}}  {'status':<8}  details")
            for name, r in zip(names, rows):
                if r.status == "skipped":
                    detail = r.reason or "skipped"
                else:
                    src = _fmt_shape(r.source_shape) if r.source_shape else "?"
                    if r.source_spacing:
                        src += " @ " + "x".join(f"{s:.3g}" for s in r.source_spacing) + " mm"
                    detail = f"{src} -> {_fmt_shape(r.shape) if r.shape else '?'}"
                lines.append(f"{name:<{width}}  {r.status:<8}  {detail}")
        if total:
            lines.extend(self.padded_lines(names=not only_skipped))
            lines.append(self.summary_line())
        return "\n".join(lines)


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _clip_left(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


# ----------------------------------------------------------------------------------------------------------
# Many volumes


#: what an id read back from a manifest must look like before it names a file (a tampered manifest must not
#: make prepare write outside the cache: no separators, no leading dot)
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def _safe_entry(entry: dict | None) -> dict | None:
    """``entry`` when its id is a plain file name and its file is ``volumes/<id>.npy``, else None."""
    if entry is None:
        return None
    vol_id = entry.get("id")
    if isinstance(vol_id, str) and _SAFE_ID.match(vol_id) and entry.get("file") == f"{VOLUMES_DIR}/{vol_id}.npy":
        return entry
    return None


def _volume_id(src: Source, used: set[str]) -> str:
    """Readable, filesystem-safe, unique id: ``<stem>-<10 hex of sha1(abs path)>``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.stem).strip("._-")[:60] or "volume"
    digest = hashlib.sha1(src.path.encode("utf-8", "surrogateescape")).hexdigest()
    for n in (10, 16, 40):
        candidate = f"{stem}-{digest[:n]}"
        if candidate not in used:
            return candidate
    k = 2
    while f"{stem}-{digest}-{k}" in used:
        k += 1
    return f"{stem}-{digest}-{k}"


class _CacheLock:
    """An exclusive lock on ``CACHE/.prepare.lock`` so that two runs never write one cache at once."""

    def __init__(self, out: Path):
        self.path = out / ".prepare.lock"
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            raise DataError(f"{self.path.parent}: another 'dagman data prepare' is writing this cache") from None
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # closing releases the lock


def _open_cache(out: Path, settings: dict, overwrite: bool) -> dict:
    """The cache's previous manifest (or an empty one). Refuses a cache made with other settings unless
    ``overwrite`` (which deletes its volumes)."""
    if not (out / MANIFEST).exists():
        return {"version": CACHE_FORMAT_VERSION, "settings": settings, "volumes": []}
    manifest = cache_mod.read_manifest(out)
    old = manifest.get("settings")
    if isinstance(old, dict) and "min_size" in old and {**old, "min_size": settings["min_size"]} == settings:
        # the refusal threshold changes no prepared volume: the cache stays, recording the new threshold
        return {**manifest, "settings": settings}
    if old != settings:
        if not overwrite:
            diff = _settings_diff(old if isinstance(old, dict) else {}, settings)
            raise DataError(
                f"{out}: cache was prepared with other settings ({diff}); "
                "use a new <<out>>, or <<overwrite>> to rebuild it"
            )
        _clear_cache(out, manifest)
        return {"version": CACHE_FORMAT_VERSION, "settings": settings, "volumes": []}
    return manifest


def _settings_diff(old: dict, new: dict) -> str:
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    return "; ".join(f"{k}: cache {_fmt_setting(old.get(k))}, asked {_fmt_setting(new.get(k))}" for k in keys[:3])


def _fmt_setting(value) -> str:
    if isinstance(value, list):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _clear_cache(out: Path, manifest: dict) -> None:
    """Delete what a cache owns (its .npy volumes, manifest, skipped list); nothing else."""
    volumes = out / VOLUMES_DIR
    if volumes.is_dir():
        for p in volumes.iterdir():
            if p.is_file() and (p.suffix == ".npy" or p.name.endswith(TMP_SUFFIX)):
                p.unlink()
    for name in (MANIFEST, SKIPPED):
        (out / name).unlink(missing_ok=True)


def _entry_is_current(entry: dict, src: Source, out: Path) -> bool:
    """True when the cached file exists and the source is unchanged (by size/mtime, else by checksum); on a
    checksum match the entry's size/mtime are refreshed in place."""
    if not (out / entry.get("file", "")).is_file():
        return False
    try:
        signature = source_signature(src)
        if all(entry.get(k) == v for k, v in signature.items()):
            return True
        if source_sha256(src) == entry.get("source_sha256"):
            entry.update(signature)
            return True
    except OSError:
        return False
    return False


def prepare(
    sources,
    out: str | os.PathLike,
    *,
    spacing: float = 2.0,
    hu_window: tuple[float, float] = (-750.0, 1750.0),
    min_size: int = MIN_SIDE,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> PrepareReport:
    """Prepare every CT found in ``sources`` into the cache folder ``out`` (layout: :mod:`dagman.data.cache`).

    ``sources``: paths (files, folders, DICOM series folders, dataset.json / manifest files) or
    :class:`~dagman.data.io.Source` objects. ``spacing``: isotropic voxel size in mm. ``hu_window``: HU
    clipped to ``[lo, hi]`` then scaled to ``[0, 1]``. ``min_size``: volumes with a side shorter than this
    many voxels after resampling are skipped as degenerate; volumes thinner than a training crop are kept
    (listed by :meth:`PrepareReport.padded_lines`; the sampler pads them). ``workers``: processes (1 = in
    this process).

    Idempotent: a source already in the cache with unchanged bytes is reported ``cached`` and not touched; a
    changed one is prepared again; volumes of other inputs from earlier runs stay (``report.kept``). A cache
    made with other settings is refused unless ``overwrite`` (which deletes its volumes first); only ``min_size``
    may change freely (it decides which inputs are refused, not how a volume is made).
    Unusable inputs are skipped with a one-line reason (report, ``CACHE/skipped.json``); the manifest is
    written also when interrupted. Raises :class:`DataError` (with ``.report`` attached) after writing the
    cache when no usable volume is in it, or when ``strict`` and anything was skipped.
    """
    if not spacing > 0:
        raise ConfigError(f"spacing must be positive, got {spacing}", option="spacing")
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if not hi > lo:
        raise ConfigError(f"hu_window: upper bound must exceed lower bound, got {lo:g} {hi:g}", option="hu_window")
    if int(min_size) < 1:
        raise ConfigError(f"min_size must be >= 1, got {min_size}", option="min_size")
    if int(workers) < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}", option="workers")
    out = Path(out).absolute()
    settings = make_settings(spacing, (lo, hi), int(min_size))

    if isinstance(sources, (str, os.PathLike, Source)):
        sources = [sources]
    srcs: list[Source] = []
    seen: set[str] = set()
    for item in sources:
        for src in [item] if isinstance(item, Source) else list_sources([item]):
            if src.path not in seen:
                seen.add(src.path)
                srcs.append(src)
    if not srcs:
        raise DataError("no inputs given")

    _check_out_folder(out)
    with _CacheLock(out):
        manifest = _open_cache(out, settings, overwrite)
        remove_stale_temp_files(out / VOLUMES_DIR)
        remove_stale_temp_files(out)
        old_by_source = {e["source"]: e for e in manifest["volumes"] if isinstance(e, dict) and "source" in e}
        this_run = {s.path for s in srcs}
        kept = [e for e in manifest["volumes"] if e.get("source") not in this_run and _safe_entry(e) is not None
                and (out / e["file"]).is_file()]
        used_ids = {e["id"] for e in manifest["volumes"]}
        rows: list[VolumeRow] = []
        entries: dict[int, dict] = {}  # row index -> manifest entry (prepared or cached)
        tasks: list[tuple[int, Source, str]] = []
        for i, src in enumerate(srcs):
            row = VolumeRow(source=src.path, status="skipped", name=src.name)
            rows.append(row)
            old = _safe_entry(old_by_source.get(src.path))
            if src.error is not None:
                row.reason = src.error
                continue
            if old is not None and _entry_is_current(old, src, out):
                row.status, row.id = "cached", old["id"]
                row.shape, row.source_shape, row.source_spacing = (
                    old["shape"],
                    old.get("source_shape"),
                    old.get("source_spacing"),
                )
                entries[i] = old
                continue
            vol_id = old["id"] if old is not None else _volume_id(src, used_ids)
            used_ids.add(vol_id)
            row.id = vol_id
            tasks.append((i, src, vol_id))
        pending_old = {i: old_by_source[src.path] for i, src, _ in tasks
                       if _safe_entry(old_by_source.get(src.path)) is not None}

        report = PrepareReport(out=str(out), settings=settings, rows=rows, kept=len(kept))
        last_save = [time.monotonic()]

        def save(final: bool) -> None:
            volumes = list(kept)
            for i in range(len(rows)):
                if i in entries:
                    volumes.append(entries[i])
                elif not final and i in pending_old:  # interrupted before re-preparing: keep the old volume
                    volumes.append(pending_old[i])
            manifest = {"version": CACHE_FORMAT_VERSION, "settings": settings, "volumes": volumes}
            _write_if_changed(out / MANIFEST, manifest)
            last_save[0] = time.monotonic()

        def on_result(i: int, result: dict) -> None:
            row = rows[i]
            row.seconds = float(result.get("seconds", 0.0))
            row.source_shape = result.get("source_shape")
            row.source_spacing = result.get("source_spacing")
            if result["status"] == "prepared":
                row.status, row.shape = "prepared", result["shape"]
                entries[i] = result["entry"]
            else:
                row.status, row.reason = "skipped", result.get("reason") or "unknown error"
            pending_old.pop(i, None)
            if time.monotonic() - last_save[0] > MANIFEST_SAVE_INTERVAL_S:
                save(final=False)

        from tqdm import tqdm

        bar = tqdm(
            total=len(srcs),
            initial=len(srcs) - len(tasks),
            unit="vol",
            desc="prepare",
            file=sys.stderr,
            disable=None if progress else True,
            dynamic_ncols=True,
        )
        completed = False
        try:

            def on_done(i: int, result: dict) -> None:
                on_result(i, result)
                bar.set_postfix_str(rows[i].name[-30:], refresh=False)
                bar.update(1)

            try:
                _run_tasks([(i, src, vol_id, str(out), settings) for i, src, vol_id in tasks], int(workers), on_done)
            except WriteError as err:
                raise WriteError(
                    f"{err}; stopped, the volumes prepared so far are kept: make room and run the same command "
                    "again to continue"
                ) from None
            completed = True
        finally:
            bar.close()
            save(final=completed)
            if completed:  # drop volumes no manifest entry refers to (sources now skipped, killed earlier runs)
                referenced = {e["file"] for e in kept} | {e["file"] for e in entries.values()}
                volumes_dir = out / VOLUMES_DIR
                if volumes_dir.is_dir():
                    for p in volumes_dir.glob("*.npy"):
                        if f"{VOLUMES_DIR}/{p.name}" not in referenced:
                            p.unlink(missing_ok=True)
            skipped = [{"source": r.source, "reason": r.reason} for r in rows if r.status == "skipped"]
            _write_if_changed(out / SKIPPED, skipped)

    if report.usable == 0:
        first = report.skipped[0] if report.skipped else None
        detail = f"; first: {first.name}: {first.reason}" if first else ""
        err = DataError(
            f"no usable CT volume: all {len(rows)} input(s) skipped (reasons in {out / SKIPPED}){detail}"
        )
        err.report = report  # type: ignore[attr-defined]
        raise err
    if strict and report.skipped:
        first = report.skipped[0]
        err = DataError(
            f"{len(report.skipped)} of {len(rows)} input(s) skipped (--strict; reasons in {out / SKIPPED}); "
            f"first: {first.name}: {first.reason}"
        )
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report


def _write_if_changed(path: Path, obj) -> None:
    """Atomically write ``obj`` as JSON unless the file already holds exactly that (keeps mtimes of an
    unchanged cache)."""
    text = json.dumps(obj, indent=2) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    cache_mod.atomic_write_text(path, text)


def _check_out_folder(out: Path) -> None:
    """Create ``out`` if needed; refuse a file, or a non-empty folder that is not a dagman cache."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another <<out>>")
    if out.is_dir() and not (out / MANIFEST).exists():
        ours = {MANIFEST, SKIPPED, VOLUMES_DIR, ".prepare.lock"}
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(TMP_SUFFIX)
        )
        if foreign:
            raise DataError(
                f"{out}: folder is not empty and is not a dagman cache (has {foreign[0]}); choose a new <<out>>"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the cache folder ({err.strerror or err})") from None


# ----------------------------------------------------------------------------------------------------------
# Execution: in-process, or a pool of worker processes


def _call_task(task: tuple) -> dict:
    _, src, vol_id, out, settings = task
    return _prepare_task(src, vol_id, out, settings)


def _run_tasks(tasks: list[tuple], workers: int, on_done, fn=_call_task) -> None:
    """Prepare ``tasks`` (``task[0]`` is its row index) with :func:`dagman.workers.run_tasks`, calling
    ``on_done(row, result)`` as each finishes; a volume whose worker process died is reported as skipped
    (:func:`_crash_result`); a :class:`~dagman.fileio.WriteError` (the cache's storage) stops everything."""
    from dagman.workers import run_tasks

    run_tasks(fn, tasks, workers, lambda task, result: on_done(task[0], result),
              crash=lambda task: _crash_result(), stop_on=(WriteError,),
              unexpected=lambda task, message: _crash_result(message),
              give_up="worker processes keep dying before finishing any volume; try --workers 1")


def _crash_result(
    reason: str = "the worker process died while preparing this volume (crash, or killed for lack of memory)",
) -> dict:
    return {
        "status": "skipped",
        "reason": reason,
        "source_shape": None,
        "source_spacing": None,
        "seconds": 0.0,
    }
