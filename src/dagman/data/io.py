"""Read a CT volume from any of the formats users bring, into one canonical form.

Formats:

- NIfTI (``.nii``, ``.nii.gz``) through nibabel;
- NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK;
- a DICOM series *folder* (files recognised by content: the ``DICM`` marker at byte 128) through pydicom,
  with slices sorted along the slice normal, RescaleSlope/Intercept applied, a gantry tilt (slices stacked
  obliquely to their plane) undone by shifting each slice onto an orthogonal grid, and mixed series, missing
  or duplicate slices, non-CT modalities, and values without RescaleIntercept that cannot be HU (all >= 0)
  refused;
- JSON lists of images: an MSD ``dataset.json`` (``"training": [{"image": ..., "label": ...}, ...]``,
  ``"test": [...]``) or a ``dagman data fetch-examples`` manifest (``"volumes": [{"image": ...}, ...]``);
  any JSON object with a list under ``training`` / ``validation`` / ``test`` / ``volumes`` / ``images`` whose
  items are paths or ``{"image": path}`` dicts, paths relative to the JSON's folder. Labels are ignored.

Every volume comes out as a :class:`CTVolume`: a ``float32`` HU array of shape ``(X, Y, Z)`` in the voxel
order of the closest canonical RAS+ orientation (what nibabel's ``as_closest_canonical`` gives), with the 4x4
voxel-to-RAS affine of that array. SimpleITK and DICOM geometry is in LPS; it is converted to RAS by flipping
the first two world axes. The source grid is kept (``source_affine``, ``source_shape``, ``to_source_grid``) so
that results can be written back in the geometry of the file they came from.

Geometry no CT has is refused rather than resampled into a wrong or gigantic array: a sheared voxel grid,
voxel sides outside ``[MIN_SPACING_MM, MAX_SPACING_MM]``, a field of view beyond ``MAX_WIDTH_MM`` x
``MAX_WIDTH_MM`` x ``MAX_EXTENT_MM``; so is an empty (0-byte) file.

Every failure is a :class:`ImageReadError` (a :class:`~dagman.errors.DataError`) whose message is
``"<path>: <short reason>"``.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dagman.errors import DataError, cli_text

# File name endings (lower case) of the single-file formats, and the reader family of each.
IMAGE_SUFFIXES: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}
# Endings that promise DICOM: such a file without the DICM marker is reported, not silently ignored.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Keys of a JSON image list (MSD dataset.json, fetch-examples manifest, or similar).
LIST_KEYS = ("training", "validation", "test", "volumes", "images")
# JSON files that, found while walking a folder, describe that folder's images (and take over its subtree,
# so that e.g. an MSD task's labelsTr/ is not mistaken for CT).
LIST_FILE_NAMES = ("dataset.json", "manifest.json")

# Two consecutive DICOM slices whose distance deviates from the median distance by more than this
# fraction mean a missing (or extra) slice.
SLICE_GAP_TOLERANCE = 0.15

FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage", "dicom": "DICOM"}

# A DICOM series whose slices are stacked obliquely to their own plane (gantry tilt) accumulates an in-plane
# offset over the stack; up to this many voxels in total it is ignored (rounding in ImagePositionPatient),
# beyond it every slice is shifted back onto an orthogonal grid.
GANTRY_TILT_TOLERANCE_VOXELS = 0.1
# Any other voxel grid whose axes are not orthogonal (|cosine| between two axes above this) is refused.
SHEAR_TOLERANCE = 1e-3
# Plausible geometry of a CT: voxel sides in [MIN_SPACING_MM, MAX_SPACING_MM]; a field of view of at most
# MAX_EXTENT_MM along its longest side and MAX_WIDTH_MM along the other two (scanner bores are < 1 m wide).
# Outside these the header is wrong (metres for millimetres, a bogus slice distance), and resampling it would
# give a meaningless or gigantic array.
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 20.0
MAX_EXTENT_MM = 2500.0
MAX_WIDTH_MM = 1000.0


class ImageReadError(DataError):
    """An input that cannot be used as a CT volume. ``str(err) == f"{path}: {reason}"`` (arguments named as in
    Python); ``reason``: the reason as the reports of ``data prepare`` show it (arguments named by their flags,
    :meth:`~dagman.errors.DagmanError.for_cli`)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self._raw_reason = reason
        self.reason = cli_text(reason)

    def __reduce__(self):  # picklable across worker processes despite the two-argument constructor
        return (self.__class__, (self.path, self._raw_reason))


@dataclass(frozen=True)
class Source:
    """One input found by :func:`list_sources`.

    ``path``: absolute path of the image file or of the DICOM series folder.
    ``kind``: ``"nifti" | "nrrd" | "metaimage" | "dicom"``, or ``"invalid"`` when ``error`` says why the input
    cannot be used (missing file, not an image, broken link, ...).
    ``files``: for DICOM, the series' files (sorted by name); empty otherwise.
    ``listed_in``: ``"<list.json>#<index>"`` when the image came from a dataset.json / manifest.
    """

    path: str
    kind: str
    files: tuple[str, ...] = ()
    error: str | None = None
    listed_in: str | None = None

    @property
    def name(self) -> str:
        """Short display name: the file name, or the folder name with a trailing ``/`` for DICOM folders."""
        base = os.path.basename(self.path.rstrip(os.sep)) or self.path
        return base + "/" if self.kind == "dicom" and os.path.isdir(self.path) else base

    @property
    def stem(self) -> str:
        """The name without image extensions (``ct_001.nii.gz`` -> ``ct_001``)."""
        base = os.path.basename(self.path.rstrip(os.sep)) or "volume"
        suffix = _image_suffix(base)
        if suffix and not os.path.isdir(self.path):
            return base[: -len(suffix)] or "volume"
        return base

    def data_files(self) -> list[str]:
        """Every file whose bytes make up this volume (``.mhd``/``.nhdr`` headers include their data file)."""
        if self.kind == "dicom":
            return list(self.files)
        files = [self.path]
        if self.kind in ("nrrd", "metaimage") and self.path.lower().endswith((".nhdr", ".mhd")):
            files += _detached_data_files(self.path)
        return files


@dataclass
class CTVolume:
    """A CT volume in canonical RAS+ voxel order.

    ``array``: ``(X, Y, Z) float32``, Hounsfield units; canonical RAS+: the index along axis 0, 1, 2 grows
    (approximately, for oblique scans) towards the patient's Right, Anterior, Superior.
    ``affine``: ``(4, 4) float64``, voxel index of ``array`` -> RAS world mm.
    ``spacing``: voxel size in mm along each array axis (column norms of ``affine``).
    ``source``: the path that was read (file or DICOM folder).
    ``meta``: ``format``, ``modality`` (None when the format does not say), ``series_uid`` (DICOM),
    ``source_orientation`` (axis codes of the stored grid, e.g. ``"LPS"``), ``source_shape`` and
    ``source_spacing`` (mm) of the stored grid in its own axis order, ``nonfinite_voxels`` (NaN/inf
    voxels replaced by the smallest finite value), and format-specific notes.
    ``source_affine``, ``source_shape``: the grid as stored in the file (DICOM: columns, rows, slices sorted
    along the slice normal), voxel -> RAS mm. ``to_canonical``: the nibabel orientation transform
    ``(3, 2)`` that took the stored grid to ``array``.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    meta: dict = field(default_factory=dict)
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, int, int] | None = None
    to_canonical: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def to_source_grid(self, array: np.ndarray) -> np.ndarray:
        """Reorder an array on the canonical grid ``(X, Y, Z, ...)`` back to the stored voxel order of the
        source (flips/transposes only; the inverse of what :func:`read_ct` did)."""
        from nibabel.orientations import apply_orientation, ornt_transform

        if self.to_canonical is None:
            return array
        identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        back = ornt_transform(identity, self.to_canonical)
        return apply_orientation(array, back)


# ----------------------------------------------------------------------------------------------------------
# Listing inputs


def list_sources(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Source]:
    """Expand input paths into image sources, in a stable order, without reading voxel data.

    - a NIfTI / NRRD / MetaImage file -> one source;
    - a folder -> searched recursively: every image file, and every folder that directly holds DICOM files
      (recognised by the ``DICM`` marker, not by extension) is one DICOM series candidate. A folder holding a
      ``dataset.json`` / ``manifest.json`` image list is expanded through that list instead. Hidden files
      (``.*``, including macOS ``._*`` forks) are ignored; other non-image files are ignored too, except ones
      that promise an image and are not (``*.dcm`` without the DICM marker, a folder named ``x.nii.gz``, a
      broken link named ``x.nrrd``): those are returned as invalid sources so they get reported;
    - a JSON image list (see module docstring) -> its images, each with ``listed_in``;
    - anything else named explicitly (missing path, text file, lone non-image) -> an invalid source.

    The same path reached twice is listed once. Returns ``list[Source]``; invalid ones have ``error`` set.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Source] = []
    seen: set[str] = set()
    for p in paths:
        _add_path(os.path.abspath(os.fspath(p)), out, seen, explicit=True, listed_in=None)
    return out


def _image_suffix(name: str) -> str | None:
    low = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return suffix
    return None


def image_kind(name: str) -> str | None:
    """The reader family for a file name (``"nifti"``, ``"nrrd"``, ``"metaimage"``), or None."""
    suffix = _image_suffix(name)
    return IMAGE_SUFFIXES[suffix] if suffix else None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM Part 10 preamble: ``b"DICM"`` at byte offset 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _invalid(path: str, reason: str, listed_in: str | None = None) -> Source:
    return Source(path=path, kind="invalid", error=reason, listed_in=listed_in)


def _add(src: Source, out: list[Source], seen: set[str]) -> None:
    if src.path not in seen:
        seen.add(src.path)
        out.append(src)


def _add_path(path: str, out: list[Source], seen: set[str], *, explicit: bool, listed_in: str | None) -> None:
    if not os.path.exists(path):
        reason = "broken symbolic link" if os.path.islink(path) else "no such file or directory"
        _add(_invalid(path, reason, listed_in), out, seen)
        return
    if os.path.isdir(path):
        if _image_suffix(os.path.basename(path)) and not _holds_dicom(path):
            _add(_invalid(path, "is a directory, not an image file", listed_in), out, seen)
            return
        n_before = len(out)
        _walk(path, out, seen, listed_in=listed_in)
        if explicit and len(out) == n_before:
            _add(_invalid(path, "no images found (NIfTI, NRRD, MetaImage files or DICOM series)"), out, seen)
        return
    name = os.path.basename(path)
    kind = image_kind(name)
    if kind is not None:
        _add(Source(path=path, kind=kind, listed_in=listed_in), out, seen)
    elif name.lower().endswith(".json"):
        _expand_list_file(path, out, seen)
    elif is_dicom_file(path):
        _add(Source(path=path, kind="dicom", files=(path,), listed_in=listed_in), out, seen)
    else:
        ext = "".join(Path(name).suffixes[-1:]) or "no extension"
        _add(_invalid(path, f"not an image (unsupported file type: {ext})", listed_in), out, seen)


def _holds_dicom(folder: str) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(is_dicom_file(os.path.join(folder, n)) for n in names if not n.startswith("."))


def _walk(root: str, out: list[Source], seen: set[str], *, listed_in: str | None) -> None:
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop or a folder reached twice
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames.sort()
        filenames.sort()
        visible = [f for f in filenames if not f.startswith(".")]
        list_file = next((f for f in LIST_FILE_NAMES if f in visible), None)
        if list_file and _is_image_list(os.path.join(dirpath, list_file)):
            _expand_list_file(os.path.join(dirpath, list_file), out, seen)
            dirnames[:] = []
            continue
        keep_dirs = []
        for d in dirnames:
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            if _image_suffix(d) and not _holds_dicom(full):
                _add(_invalid(full, "is a directory, not an image file", listed_in), out, seen)
                continue
            keep_dirs.append(d)
        dirnames[:] = keep_dirs
        dicom_files: list[str] = []
        for f in visible:
            full = os.path.join(dirpath, f)
            kind = image_kind(f)
            if kind is not None:
                if not os.path.exists(full):
                    _add(_invalid(full, "broken symbolic link", listed_in), out, seen)
                else:
                    _add(Source(path=full, kind=kind, listed_in=listed_in), out, seen)
            elif f.upper() == "DICOMDIR":
                continue  # a media directory record, not an image
            elif is_dicom_file(full):
                dicom_files.append(full)
            elif f.lower().endswith(DICOM_SUFFIXES) and os.path.isfile(full):
                _add(_invalid(full, "not a DICOM file (no 'DICM' marker at byte 128)", listed_in), out, seen)
        if dicom_files:
            _add(Source(path=dirpath, kind="dicom", files=tuple(dicom_files), listed_in=listed_in), out, seen)


def _load_json(path: str) -> object:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _has_image_items(data: object) -> bool:
    """True for a JSON object with a list under one of ``LIST_KEYS`` holding a path or an ``{"image": path}``."""
    if not isinstance(data, dict):
        return False
    for key in LIST_KEYS:
        items = data.get(key)
        if isinstance(items, list) and any(
            isinstance(it, str) or (isinstance(it, dict) and isinstance(it.get("image"), str)) for it in items
        ):
            return True
    return False


def _is_image_list(path: str) -> bool:
    try:
        data = _load_json(path)
    except (OSError, ValueError):
        return False
    return _has_image_items(data)


def _expand_list_file(path: str, out: list[Source], seen: set[str]) -> None:
    """Add the images of a dataset.json / manifest (paths relative to its folder)."""
    try:
        data = _load_json(path)
    except OSError as err:
        _add(_invalid(path, f"cannot read ({err.strerror or err})"), out, seen)
        return
    except ValueError as err:
        _add(_invalid(path, f"not an image list (invalid JSON: {err})"), out, seen)
        return
    if (
        isinstance(data, dict)
        and "settings" in data
        and isinstance(data.get("volumes"), list)
        and not _has_image_items(data)
    ):
        _add(
            _invalid(path, "a prepared dagman cache, not an image list (use it as --data, not as SRC)"), out, seen
        )
        return
    if not _has_image_items(data):
        keys = "/".join(f"'{k}'" for k in LIST_KEYS)
        _add(_invalid(path, f"not an image list (a JSON object with a {keys} list of image paths)"), out, seen)
        return
    base = os.path.dirname(path)
    index = 0
    for key in LIST_KEYS:
        items = data.get(key)
        if not isinstance(items, list):
            continue
        for position, item in enumerate(items):
            rel = item if isinstance(item, str) else item.get("image") if isinstance(item, dict) else None
            tag = f"{path}#{index}"
            index += 1
            if not isinstance(rel, str) or not rel:
                _add(_invalid(tag, f"entry {key}[{position}] has no 'image' path"), out, seen)
                continue
            target = os.path.normpath(os.path.join(base, rel))
            if not os.path.exists(target) and not os.path.islink(target):
                _add(_invalid(target, f"listed in {os.path.basename(path)} but missing", tag), out, seen)
                continue
            _add_path(target, out, seen, explicit=True, listed_in=tag)


def _detached_data_files(header: str) -> list[str]:
    """Data files named by a detached ``.nhdr`` / ``.mhd`` header (for checksums); [] when not found."""
    key = "element_data_file" if header.lower().endswith(".mhd") else "data file"
    try:
        with open(header, encoding="latin-1") as fh:
            lines = fh.read(65536).splitlines()
    except OSError:
        return []
    for line in lines:
        name, sep, value = line.partition("=" if key == "element_data_file" else ":")
        if sep and name.strip().lower().replace(" ", "_") == key.replace(" ", "_"):
            value = value.strip()
            candidate = os.path.join(os.path.dirname(header), value)
            return [candidate] if value and os.path.isfile(candidate) else []
    return []


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_ct(path: str | os.PathLike | Source, *, index: int | None = None) -> CTVolume:
    """Read one CT volume (see module docstring for formats) as a canonical :class:`CTVolume`.

    ``path`` may be an image file, a DICOM series folder, a folder or JSON list holding several images
    (then ``index`` picks the ``index``-th source of :func:`list_sources`), or a :class:`Source`.
    Raises :class:`ImageReadError` (``"<path>: <reason>"``) for anything that is not a usable 3D CT: missing,
    truncated, empty or corrupt file, not an image, 2D, 4D, non-CT DICOM, mixed or incomplete DICOM series,
    DICOM values of unknown HU offset, sheared grid, implausible spacing or field of view, all-NaN or constant
    voxels.
    """
    if isinstance(path, Source):
        src = path
    else:
        sources = list_sources([path])
        label = os.fspath(path)
        if index is not None:
            if not -len(sources) <= index < len(sources):
                raise ImageReadError(label, f"index {index} out of range ({len(sources)} images)")
            src = sources[index]
        elif len(sources) == 1:
            src = sources[0]
        else:
            raise ImageReadError(label, f"holds {len(sources)} images; choose one with index=")
    if src.error is not None:
        raise ImageReadError(src.path, src.error)
    if src.kind != "dicom" and os.path.isfile(src.path) and os.path.getsize(src.path) == 0:
        raise ImageReadError(src.path, "empty file (0 bytes)")
    if src.kind == "nifti":
        array, affine, meta = _read_nifti(src.path)
    elif src.kind in ("nrrd", "metaimage"):
        array, affine, meta = _read_sitk(src.path, src.kind)
    elif src.kind == "dicom":
        array, affine, meta = _read_dicom(src.path, src.files)
    else:
        raise ImageReadError(src.path, f"unknown source kind {src.kind!r}")
    return _finish(src.path, array, affine, meta)


def _finish(path: str, array: np.ndarray, affine: np.ndarray, meta: dict) -> CTVolume:
    """Shape and value checks, NaN handling, reorientation to canonical RAS+."""
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

    if array.ndim != 3:
        raise ImageReadError(path, f"not a 3D image (shape {_fmt_shape(array.shape)})")
    if min(array.shape) < 2:
        raise ImageReadError(path, f"2D image (a single slice: {_fmt_shape(array.shape)}); need a 3D volume")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(path, "invalid geometry (singular or non-finite voxel-to-world affine)")
    _check_geometry(path, array.shape, affine)
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    n_bad = int(array.size - np.count_nonzero(finite))
    if n_bad == array.size:
        raise ImageReadError(path, "all voxels are NaN or infinite")
    lo = float(array[finite].min()) if n_bad else float(array.min())
    hi = float(array[finite].max()) if n_bad else float(array.max())
    if lo == hi:
        raise ImageReadError(path, f"constant volume (every voxel = {lo:g})")
    if n_bad:
        array = np.where(finite, array, np.float32(lo))
    meta = dict(meta)
    meta["nonfinite_voxels"] = n_bad
    meta["source_orientation"] = "".join(aff2axcodes(affine))
    meta["source_shape"] = [int(n) for n in array.shape]
    meta["source_spacing"] = [round(float(v), 6) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
    ornt = io_orientation(affine)
    canonical = np.ascontiguousarray(apply_orientation(array, ornt), dtype=np.float32)
    can_affine = affine @ inv_ornt_aff(ornt, array.shape)
    spacing = tuple(float(s) for s in np.sqrt((can_affine[:3, :3] ** 2).sum(axis=0)))
    return CTVolume(
        array=canonical,
        affine=can_affine,
        spacing=spacing,  # type: ignore[arg-type]
        source=path,
        meta=meta,
        source_affine=np.asarray(affine, dtype=np.float64),
        source_shape=tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
        to_canonical=ornt,
    )


def _check_geometry(path: str, shape, affine: np.ndarray) -> None:
    """Refuse a voxel grid that no CT has: axes not orthogonal (a sheared grid, e.g. an uncorrected gantry tilt
    in a converted file; resampling it as if it were orthogonal would distort the anatomy), a voxel side
    outside [MIN_SPACING_MM, MAX_SPACING_MM], or a field of view beyond MAX_WIDTH_MM x MAX_WIDTH_MM x
    MAX_EXTENT_MM. ``shape``: the stored ``(X, Y, Z)``; ``affine``: its ``(4, 4)`` voxel -> world mm."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.sqrt((axes**2).sum(axis=0))
    unit = axes / spacing
    cosines = [abs(float(unit[:, a] @ unit[:, b])) for a, b in ((0, 1), (0, 2), (1, 2))]
    if max(cosines) > SHEAR_TOLERANCE:
        a, b = ((0, 1), (0, 2), (1, 2))[int(np.argmax(cosines))]
        angle = float(np.degrees(np.arccos(min(1.0, max(cosines)))))
        raise ImageReadError(
            path,
            f"sheared voxel grid (axes {a} and {b} meet at {angle:.1f} degrees, not 90; an uncorrected gantry "
            "tilt?): resample it to an orthogonal grid first (dcm2niix corrects tilt)",
        )
    shown = "x".join(f"{v:.3g}" for v in spacing)
    if spacing.min() < MIN_SPACING_MM:
        raise ImageReadError(
            path,
            f"implausible voxel spacing {shown} mm (below {MIN_SPACING_MM:g} mm: a header in metres, or a "
            "wrong affine?)",
        )
    if spacing.max() > MAX_SPACING_MM:
        raise ImageReadError(
            path,
            f"implausible voxel spacing {shown} mm (above {MAX_SPACING_MM:g} mm between voxels: a localiser, "
            "or a wrong slice distance in the header?)",
        )
    extent = np.sort(np.asarray(shape[:3], dtype=np.float64) * spacing)
    if extent[2] > MAX_EXTENT_MM or extent[1] > MAX_WIDTH_MM:
        raise ImageReadError(
            path,
            "implausible field of view "
            + " x ".join(f"{v:.0f}" for v in np.asarray(shape[:3], dtype=np.float64) * spacing)
            + f" mm (a CT covers at most {MAX_WIDTH_MM:.0f} x {MAX_WIDTH_MM:.0f} x {MAX_EXTENT_MM:.0f} mm): "
            f"wrong voxel spacing {shown} mm in the header?",
        )


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_reason(err: OSError) -> str | None:
    if isinstance(err, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(err, FileNotFoundError):
        return "no such file or directory"
    if isinstance(err, PermissionError):
        return "permission denied"
    return None


def _gzip_diagnosis(path: str) -> str | None:
    """Why a ``.gz`` file does not decompress (truncated / not gzip / corrupt), or None if it does."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except EOFError:
        return "truncated file (compressed data ends early)"
    except gzip.BadGzipFile:
        return "not a gzip file despite the .gz name (corrupt or mislabelled)"
    except zlib.error as err:
        return f"corrupt compressed data ({_short(err, 60)})"
    except OSError as err:
        return _os_reason(err) or f"cannot read ({_short(err, 80)})"
    return None


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    import nibabel as nib

    gz = path.lower().endswith(".gz")
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for bad files; each becomes a one-line reason
        raise ImageReadError(path, _nifti_reason(path, err, gz)) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(path, f"not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is 3D
        shape = shape[:-1]
    if len(shape) < 3:
        raise ImageReadError(path, f"2D image ({_fmt_shape(shape)}); need a 3D volume")
    if len(shape) > 3:
        n = int(np.prod(shape[3:]))
        raise ImageReadError(
            path, f"{len(shape)}D image ({_fmt_shape(shape)}: {n} volumes); split it into 3D files first"
        )
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise ImageReadError(path, f"not a scalar image (voxel type {dtype}); need grey values")
    try:
        array = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as err:
        raise ImageReadError(path, _nifti_reason(path, err, gz)) from None
    hdr = img.header
    meta = {
        "format": "nifti",
        "modality": None,
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
    }
    return array, np.asarray(img.affine, dtype=np.float64), meta


def _nifti_reason(path: str, err: Exception, gz: bool) -> str:
    if isinstance(err, OSError) and _os_reason(err):
        return _os_reason(err)  # type: ignore[return-value]
    if gz:
        diagnosis = _gzip_diagnosis(path)
        if diagnosis:
            return diagnosis
    text = str(err)
    if isinstance(err, EOFError):
        return "truncated file (compressed data ends early)"
    if isinstance(err, zlib.error):
        return f"corrupt compressed data ({_short(text, 60)})"
    if ("Expected" in text and "bytes" in text) or "mmap length" in text:
        return "truncated file (less voxel data than the header declares)"
    if "Cannot work out file type" in text or "not a gzip file" in text:
        return "not a NIfTI image (unrecognised header)"
    return f"cannot read as NIfTI ({type(err).__name__}: {_short(text, 100)})"


def _itk_message(err: Exception) -> str:
    text = str(err)
    if "Unable to determine ImageIO reader" in text:
        return "unrecognised header"
    if "sitk::ERROR:" in text:
        text = text.split("sitk::ERROR:", 1)[1]
    return _short(text.strip().splitlines()[0] if text.strip() else type(err).__name__, 100)


def _read_sitk(path: str, kind: str) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    fmt = FORMAT_NAMES[kind]
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ImageReadError(path, _os_reason(err) or f"cannot open ({_short(err, 80)})") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(path, f"not a readable {fmt} image ({_itk_message(err).replace(path, '')})") from None
    dim = reader.GetDimension()
    size = tuple(int(s) for s in reader.GetSize())
    while len(size) > 3 and size[-1] == 1:
        size = size[:-1]
    if len(size) < 3:
        raise ImageReadError(path, f"2D image ({_fmt_shape(size)}); need a 3D volume")
    if len(size) > 3:
        n = int(np.prod(size[3:]))
        raise ImageReadError(path, f"{dim}D image ({_fmt_shape(size)}: {n} volumes); split it into 3D files first")
    if reader.GetNumberOfComponents() != 1:
        raise ImageReadError(
            path, f"vector image ({reader.GetNumberOfComponents()} components per voxel); need grey values"
        )
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise ImageReadError(
            path, f"corrupt or truncated {fmt} file ({_itk_message(err).replace(path, '')})"
        ) from None
    if image.GetDimension() != 3:  # (X, Y, Z, 1) stored as 4D
        extractor = sitk.ExtractImageFilter()
        extractor.SetSize(list(size) + [0] * (image.GetDimension() - 3))
        extractor.SetIndex([0] * image.GetDimension())
        image = extractor.Execute(image)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False).transpose(2, 1, 0)  # (z,y,x)->(x,y,z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    lps[:3, 3] = image.GetOrigin()
    meta = {"format": kind, "modality": None}
    return np.ascontiguousarray(array), lps_to_ras(lps), meta


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Voxel->LPS affine (ITK, DICOM) to voxel->RAS (nibabel): negate the first two world axes."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_lps, dtype=np.float64)


def _read_dicom(folder: str, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a DICOM series: header checks first (cheap), then pixel data slice by slice."""
    import pydicom

    headers = []
    non_image = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as err:
            raise ImageReadError(
                folder, f"unreadable DICOM file {os.path.basename(f)} ({_short(err, 80)})"
            ) from None
        if "Rows" not in ds or "Columns" not in ds:  # structured report, RT structure set, presentation state...
            non_image += 1
            continue
        headers.append((f, ds))
    if not headers:
        raise ImageReadError(folder, "no DICOM images (only non-image DICOM objects)")
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(uids) > 1:
        shown = ", ".join("..." + u[-8:] if len(u) > 11 else u or "(none)" for u in uids[:3])
        raise ImageReadError(
            folder,
            f"mixed series: {len(uids)} SeriesInstanceUIDs in one folder ({shown}); "
            "put each series in its own folder",
        )
    modalities = sorted({str(ds.get("Modality", "") or "").upper() for _, ds in headers} - {""})
    if modalities and modalities != ["CT"]:
        raise ImageReadError(folder, f"modality {'/'.join(modalities)}, not CT")
    frames = max(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in headers)
    if frames > 1:
        raise ImageReadError(
            folder,
            f"multi-frame DICOM ({frames} frames in one file) is not supported; "
            "convert it to NIfTI (e.g. dcm2niix)",
        )
    if len(headers) < 2:
        raise ImageReadError(folder, "2D image (a single DICOM slice); pass the folder holding the whole series")
    for f, ds in headers:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            raise ImageReadError(
                folder, f"{os.path.basename(f)} lacks ImagePositionPatient/ImageOrientationPatient/PixelSpacing"
            )
    first = headers[0][1]
    iop0 = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    ps0 = np.asarray(first.PixelSpacing, dtype=np.float64)
    rows0, cols0 = int(first.Rows), int(first.Columns)
    for f, ds in headers[1:]:
        name = os.path.basename(f)
        if (int(ds.Rows), int(ds.Columns)) != (rows0, cols0):
            raise ImageReadError(
                folder, f"inconsistent slice size: {name} is {ds.Columns}x{ds.Rows}, others {cols0}x{rows0}"
            )
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop0, atol=1e-3):
            raise ImageReadError(folder, f"inconsistent ImageOrientationPatient ({name} differs)")
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), ps0, rtol=1e-3, atol=1e-4):
            raise ImageReadError(folder, f"inconsistent PixelSpacing ({name} differs)")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 1e-6:
        raise ImageReadError(folder, "invalid ImageOrientationPatient (row and column directions are parallel)")
    normal /= np.linalg.norm(normal)
    ipp = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in headers])
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    along, ipp = along[order], ipp[order]
    headers = [headers[i] for i in order]
    steps = np.diff(along)
    median = float(np.median(steps))
    if median <= 1e-4 or np.any(steps <= 1e-3 * max(median, 1e-3)):
        n_dup = int(np.count_nonzero(steps <= 1e-3 * max(median, 1e-3)))
        raise ImageReadError(
            folder,
            f"duplicate slice positions ({n_dup} extra slice(s) at an occupied position: a copied file, a time "
            "series or mixed series?)",
        )
    bad = np.flatnonzero(np.abs(steps - median) > SLICE_GAP_TOLERANCE * median)
    if bad.size:
        k = int(bad[0])
        kind = "missing slice(s)" if steps[k] > median else "irregular slice spacing"
        raise ImageReadError(
            folder,
            f"{kind}: {steps[k]:.2f} mm between slices {k} and {k + 1} (sorted), expected {median:.2f} mm",
        )

    with_intercept = sum(1 for _, ds in headers if _has_value(ds, "RescaleIntercept"))
    if 0 < with_intercept < len(headers):
        raise ImageReadError(
            folder, f"RescaleIntercept in only {with_intercept} of {len(headers)} slices: HU scaling inconsistent"
        )

    volume = np.empty((cols0, rows0, len(headers)), dtype=np.float32)
    for k, (f, _) in enumerate(headers):
        volume[:, :, k] = _dicom_slice_hu(folder, f).T  # (rows, cols) -> (cols, rows) = (i, j)
    meta = {
        "format": "dicom",
        "modality": modalities[0] if modalities else None,
        "series_uid": uids[0] or None,
        "n_slices": len(headers),
        "non_image_objects": non_image,
        "slice_step_mm": median,
    }
    if not with_intercept:
        # Stored values are HU only if they can be: a CT in HU always holds air (about -1000). All values >= 0
        # (typically unsigned 0..4095) means an offset (usually -1024) that the files do not state.
        lo, hi = float(volume.min()), float(volume.max())
        if lo >= 0:
            raise ImageReadError(
                folder,
                f"no RescaleIntercept and every stored value is >= 0 ({lo:g}..{hi:g}): the offset to Hounsfield "
                "units is unknown (often -1024); add RescaleIntercept/RescaleSlope to the files",
            )
        meta["rescale"] = "no RescaleIntercept: stored values taken as HU"
    row_spacing, col_spacing = float(ps0[0]), float(ps0[1])  # PixelSpacing = [between rows, between columns]
    # k: mean step between sorted slices. With a gantry tilt it leaves the slice normal; its in-plane part is a
    # per-slice shift of the image, undone here so that the grid is orthogonal (as dcm2niix does).
    step = (ipp[-1] - ipp[0]) / (len(headers) - 1)
    along_step = float(step @ normal)
    in_plane = step - along_step * normal
    per_slice = np.array(
        [
            in_plane @ row_dir / np.linalg.norm(row_dir) / col_spacing,  # voxels along i per slice
            in_plane @ col_dir / np.linalg.norm(col_dir) / row_spacing,  # voxels along j per slice
        ]
    )
    if np.abs(per_slice).max() * (len(headers) - 1) > GANTRY_TILT_TOLERANCE_VOXELS:
        _undo_gantry_tilt(volume, per_slice)
        meta["gantry_tilt_deg"] = round(float(np.degrees(np.arctan2(np.linalg.norm(in_plane), along_step))), 3)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i: along a row (increasing column index)
    lps[:3, 1] = col_dir * row_spacing  # j: down a column (increasing row index)
    lps[:3, 2] = along_step * normal  # k: perpendicular to the slices
    lps[:3, 3] = ipp[0]
    return volume, lps_to_ras(lps), meta


def _has_value(ds, keyword: str) -> bool:
    """True when the DICOM data set holds a non-empty ``keyword`` element (a value of 0 counts)."""
    value = ds.get(keyword, None)
    return value is not None and str(value).strip() != ""


def _undo_gantry_tilt(volume: np.ndarray, per_slice: np.ndarray) -> None:
    """In place: shift slice ``k`` of ``volume`` ``(I, J, K) float32`` by ``k * per_slice`` voxels along
    ``(i, j)`` (``per_slice``: ``(2,)``, linear interpolation), so that voxel ``(i, j, k)`` lies at
    ``first slice origin + k * (slice step along the normal) + i * (pixel step along a row) + j * (pixel step
    down a column)``. Voxels that come from outside the acquired field of view get the volume's minimum."""
    from scipy.ndimage import shift

    fill = float(volume.min())
    for k in range(1, volume.shape[2]):
        offset = np.round(k * per_slice, 6)  # so that an edge pixel reached exactly is not lost to rounding
        volume[:, :, k] = shift(volume[:, :, k], offset, order=1, mode="constant", cval=fill)


def _dicom_slice_hu(folder: str, path: str) -> np.ndarray:
    """One slice in HU, ``(rows, cols) float32``: stored values x RescaleSlope + RescaleIntercept."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except Exception as pydicom_err:
        # Compressed transfer syntaxes pydicom has no decoder for: GDCM inside SimpleITK reads them and
        # applies the rescale itself.
        try:
            import SimpleITK as sitk

            image = sitk.ReadImage(path)
            return sitk.GetArrayFromImage(image).astype(np.float32).reshape(image.GetSize()[1], image.GetSize()[0])
        except Exception:
            raise ImageReadError(
                folder, f"cannot decode pixel data of {os.path.basename(path)} ({_short(pydicom_err, 80)})"
            ) from None
    if stored.ndim != 2:
        raise ImageReadError(
            folder, f"{os.path.basename(path)}: not a grey-value slice (pixel array {stored.shape})"
        )
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
